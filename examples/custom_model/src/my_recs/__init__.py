"""An example team package for metarec-audit: a recommender of its own (my_recs.models)."""
