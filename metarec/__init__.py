"""metarec: data, cold-start tasks, meta-learned recommenders and their baselines.

This package knows nothing of audits; `audit` consumes it through `metarec.models.base.Recommender`.
"""

__version__ = "0.1.0"
