"""Data sources (MovieLens-100K, bring-your-own csv/parquet, synthetic), validation and schema."""

from metarec.data.schema import AttrSpec, DataSpec, RatingData

__all__ = ["AttrSpec", "DataSpec", "RatingData"]
