"""The declared schema of params.yaml's metarec sections (data, tasks, features), and the one
sentence a schema violation becomes.

Why pydantic models rather than checks in each stage: a bad value must stop `prepare` (and
`metarec-audit data`) before anything is written, with the field path and what was expected, not
surface as a traceback three stages later. audit/config.py composes these models with the audit
sections (gates, strata, fairness, robustness) into the whole file's schema; metarec/ stays
ignorant of audits.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from metarec.errors import ConfigError

# Type words for pydantic's error types, used in "expected ..." (the fallback is pydantic's own text).
_EXPECTED = {
    "int_type": "an integer", "int_parsing": "an integer", "int_from_float": "an integer",
    "float_type": "a number", "float_parsing": "a number", "bool_type": "true or false",
    "bool_parsing": "true or false", "string_type": "a string", "list_type": "a list",
    "tuple_type": "a list", "dict_type": "a mapping", "model_type": "a mapping",
    "model_attributes_type": "a mapping", "none_required": "null",
}


class Section(BaseModel):
    """A params.yaml section: YAML types taken as written (no "10" -> 10), unknown keys refused."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


class OpenSection(Section):
    """A section other engineers extend: its declared keys are checked, further keys pass through."""

    model_config = ConfigDict(strict=True, extra="allow", frozen=True)


def field_path(loc: tuple[Any, ...]) -> str:
    """('data', 'schema', 'user_attributes', 1, 'edges') -> 'data.schema.user_attributes[1].edges'."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif str(part).startswith(("function-", "tagged-union", "list[", "dict[", "union[")) or str(part) in (
                "str", "int", "float", "bool", "none", "ModelSpec"):
            continue  # pydantic's names of union members and validators, not a user's key
        else:
            out += f".{part}" if out else str(part)
    return out


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def sentence(exc: ValidationError, source: str = "params.yaml", prefix: tuple[Any, ...] = ()) -> str:
    """The first error of a ValidationError as one sentence: file, field path, value, what was expected."""
    err = exc.errors(include_url=False)[0]
    path = field_path(prefix + tuple(err["loc"]))
    kind, msg = err["type"], err["msg"]
    if kind == "value_error" and not path:  # a cross-section rule: its message names its fields
        return f"{source}: {msg.removeprefix('Value error, ')}"
    if kind == "missing":
        return f"{source}: {path} is missing; expected it to be set"
    if kind == "extra_forbidden":
        return f"{source}: {path} is not a known setting; expected only the documented keys (check the spelling)"
    if kind == "value_error":
        return f"{source}: {path} {msg.removeprefix('Value error, ')}"
    shown = _shown(err.get("input"))
    if kind in _EXPECTED:
        return f"{source}: {path} is {shown}; expected {_EXPECTED[kind]}"
    if kind == "literal_error":
        return f"{source}: {path} is {shown}; expected {msg.removeprefix('Input should be ')}"
    expected = msg.removeprefix("Input should be ")
    if kind == "too_short":
        n = err.get("ctx", {}).get("min_length", 1)
        expected = f"a list of at least {n} item{'s' if n != 1 else ''}"
    elif kind == "string_too_short":
        expected = "a non-empty string"
    elif msg.startswith("Input should be "):
        expected = "a value " + expected
    return f"{source}: {path} is {shown}; expected {expected}"


def validated(model: type[BaseModel], value: Any, prefix: tuple[Any, ...] = ()) -> Any:
    """`model.model_validate(value)`, a ConfigError with one sentence on failure."""
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        raise ConfigError(sentence(exc, prefix=prefix)) from None


def _increasing(values: list[float], what: str) -> list[float]:
    if any(b <= a for a, b in zip(values, values[1:])):
        shown = "[" + ", ".join(f"{v:g}" for v in values) + "]"
        raise ValueError(f"is {shown}; expected {what} in strictly increasing order")
    return values


Probability = Annotated[float, Field(ge=0, lt=1)]


class AttrConfig(Section):
    """One declared column: categorical (optionally its values), numeric (bucket edges and labels)
    or multi-label (separator)."""

    name: Annotated[str, Field(min_length=1)]
    kind: Literal["categorical", "numeric", "multilabel"]
    edges: list[float] = []
    labels: list[str] = []
    separator: Annotated[str, Field(min_length=1)] = "|"
    values: list[str | int] | None = None

    @field_validator("edges")
    @classmethod
    def _sorted_edges(cls, v: list[float]) -> list[float]:
        return _increasing(v, "bucket edges")

    @model_validator(mode="after")
    def _labels_fit(self) -> "AttrConfig":
        if self.kind == "numeric" and self.labels and len(self.labels) != len(self.edges) + 1:
            raise ValueError(f"has {len(self.labels)} labels for {len(self.edges)} edges; expected "
                             f"{len(self.edges) + 1} labels, one per bucket")
        return self


class SchemaConfig(Section):
    """`data.schema` of bring-your-own data."""

    user_attributes: Annotated[list[AttrConfig], Field(min_length=1)]
    item_features: list[AttrConfig] = []
    sensitive: list[str] = []
    rating_min: float = 1.0
    rating_max: float = 5.0

    @model_validator(mode="after")
    def _consistent(self) -> "SchemaConfig":
        declared = [a.name for a in self.user_attributes]
        for name in self.sensitive:
            if name not in declared:
                raise ValueError(f"names {name!r} in sensitive, which is not in user_attributes "
                                 f"({', '.join(sorted(declared))}); expected declared user attributes")
        for key, attrs in (("user_attributes", self.user_attributes), ("item_features", self.item_features)):
            names = [a.name for a in attrs]
            twice = [n for i, n in enumerate(names) if n in names[:i]]
            if twice:
                raise ValueError(f"declares {twice[0]!r} twice in {key}; expected each column once")
        if self.rating_min >= self.rating_max:
            raise ValueError(f"has rating_min {self.rating_min:g} >= rating_max {self.rating_max:g}; expected "
                             f"rating_min below rating_max")
        return self


class EffectConfig(Section):
    """One planted effect of the synthetic source (metarec.data.synthetic checks the group exists)."""

    type: Literal["bias", "noise"]
    attribute: str
    group: str | int
    size: float


class SyntheticConfig(Section):
    """`data.synthetic`: metarec.data.synthetic.DEFAULTS, each key optional."""

    seed: int = 0
    n_users: Annotated[int, Field(ge=2)] = 943
    n_items: Annotated[int, Field(ge=2)] = 1682
    n_ratings: Annotated[int, Field(ge=1)] = 100000
    min_per_user: Annotated[int, Field(ge=1)] = 20
    n_factors: Annotated[int, Field(ge=1)] = 8
    zipf_exponent: Annotated[float, Field(ge=0)] = 0.9
    activity_sigma: Annotated[float, Field(ge=0)] = 1.0
    noise_std: Annotated[float, Field(ge=0)] = 0.5
    global_mean: float = 3.3
    effects: list[EffectConfig] | None = []


class DataConfig(Section):
    """params.yaml `data`: which source, where its files are, and the schema of bring-your-own data."""

    source: Literal["movielens-100k", "csv", "parquet", "synthetic"]
    path: str | None = None
    cache_dir: str = "data/raw"
    duplicates: Literal["error", "keep_latest"] = "error"
    synthetic: SyntheticConfig | None = None
    interactions: str | None = None
    users: str | None = None
    items: str | None = None
    schema_: Annotated[SchemaConfig | None, Field(alias="schema")] = None
    verify_checksums: bool = True
    url: str | None = None
    timeout: Annotated[float, Field(gt=0)] = 30.0
    pypi_fallback: bool = True
    pip_timeout: Annotated[float, Field(gt=0)] = 300.0

    @model_validator(mode="after")
    def _tables(self) -> "DataConfig":
        if self.source in ("csv", "parquet"):
            for key in ("interactions", "users", "items"):
                if not getattr(self, key):
                    raise ValueError(f"has no {key} path; expected data.{key} to name the {key} {self.source} "
                                     f"file when data.source is {self.source}")
            if self.schema_ is None:
                raise ValueError(f"has no schema; expected data.schema (user_attributes, item_features, sensitive, "
                                 f"rating_min, rating_max) when data.source is {self.source}")
        return self


class TasksConfig(Section):
    """params.yaml `tasks`: the cold-start partition and task sizes (metarec.splits.SplitConfig)."""

    new_item_year: int = 1997
    new_user_fraction: Probability = 0.2
    val_fraction: Probability = 0.15
    min_ratings: Annotated[int, Field(ge=2)] = 13
    max_ratings: Annotated[int, Field(ge=2)] | None = None
    query_size: Annotated[int, Field(ge=1)] = 10
    query_selection: Literal["random", "latest"] = "random"
    seed: int = 0

    @model_validator(mode="after")
    def _sizes(self) -> "TasksConfig":
        if self.min_ratings <= self.query_size:
            raise ValueError(f"has min_ratings {self.min_ratings} and query_size {self.query_size}; expected "
                             f"min_ratings above query_size so every task keeps a support rating")
        if self.max_ratings is not None and self.max_ratings < self.min_ratings:
            raise ValueError(f"has max_ratings {self.max_ratings} below min_ratings {self.min_ratings}; expected "
                             f"max_ratings >= min_ratings (or null)")
        return self


class FeaturesConfig(Section):
    drop_sensitive: bool = False
    item_id_feature: bool = True
    min_count: Annotated[int, Field(ge=1)] = 1
