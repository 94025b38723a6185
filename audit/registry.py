"""The metric registry: what every reported metric name means, in one place.

Why one module: a metric's direction decides which model the report marks best, which way a
robustness delta counts as damage, and how a comparison is signed; its wording is what a reviewer
reads in the glossary. When those facts live in several tables they drift (they did: the report
once marked the highest popularity bias as best while summary.json picked the lowest). Every
comparison, delta, gate message, "best" mark and glossary entry reads from here, and a test fails
on any metric name in the outputs that is not registered.

Names are exact strings, or a family with a cut-off written ``name@{k}`` (``ndcg@5``,
``list_ndcg@10``). Distinct computations get distinct names: ``ndcg@k`` is graded nDCG within the
query set, ``list_ndcg@k`` binary nDCG of the top-k catalogue list; ``gini`` counts list
appearances, ``exposure_gini`` weighs them by position.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable

__all__ = ["Metric", "METRICS", "lookup", "is_registered", "unregistered", "direction",
           "lower_is_better", "better", "anchor", "glossary"]

LOWER, HIGHER, NEITHER = "lower", "higher", "neither"
_SIGN = {LOWER: -1, HIGHER: 1, NEITHER: 0}


@dataclass(frozen=True)
class Metric:
    """One metric: ``name`` may hold ``{k}`` for a cut-off family."""

    name: str
    family: str        # rating error | ranking | lists and exposure | fairness | robustness | feedback loop | count
    direction: str     # lower | higher | neither (which way is better)
    unit: str
    per: str           # user | list | scenario | group | attack: the unit one value describes
    definition: str    # one sentence
    reference: str
    function: str      # dotted path of the function that computes it

    def __post_init__(self) -> None:
        if self.direction not in _SIGN:
            raise ValueError(f"metric {self.name}: direction must be one of {sorted(_SIGN)}")

    def title(self, k: int | None = None) -> str:
        return self.name.replace("{k}", str(k)) if k is not None else self.name


_M = "audit.metrics"
_F = "audit.fairness"
_FB = "audit.feedback"
METRICS: tuple[Metric, ...] = (
    # rating error within the query set (one value per user)
    Metric("mae", "rating error", LOWER, "rating points", "user",
           "Mean absolute error of the predicted ratings over the user's query items.",
           "MeLU protocol (Lee et al., KDD 2019)", f"{_M}.per_user_accuracy"),
    Metric("mse", "rating error", LOWER, "squared rating points", "user",
           "Mean squared error of the predicted ratings over the user's query items.",
           "standard", f"{_M}.per_user_accuracy"),
    Metric("rmse", "rating error", LOWER, "rating points", "user",
           "Root of the mean squared error over the user's query items; for a group or a scenario, "
           "the root of the mean of its users' squared errors.", "standard", f"{_M}.per_user_accuracy"),
    Metric("n_query", "count", NEITHER, "ratings", "user",
           "Number of query ratings scored for the user (a count, not a quality measure).",
           "MeLU protocol", f"{_M}.per_user_accuracy"),
    # ranking
    Metric("ndcg@{k}", "ranking", HIGHER, "0 to 1", "user",
           "Graded nDCG@k of the user's query items ordered by predicted rating: gain 2^r - 1, "
           "log2 discount, ideal order from the true ratings, ties in the predictions at random.",
           "MeLU protocol (Lee et al., KDD 2019); Jarvelin & Kekalainen, TOIS 2002",
           f"{_M}.per_user_query_ndcg"),
    Metric("list_ndcg@{k}", "ranking", HIGHER, "0 to 1", "list",
           "Binary nDCG@k of the top-k list over the user's candidate catalogue items, a hit being a "
           "liked query item (rating >= the like threshold).",
           "Jarvelin & Kekalainen, TOIS 2002", f"{_M}.per_user_catalogue"),
    Metric("precision@{k}", "ranking", HIGHER, "0 to 1", "list",
           "Share of the top-k catalogue list that are items the user liked in the query set.",
           "standard", f"{_M}.per_user_catalogue"),
    Metric("recall@{k}", "ranking", HIGHER, "0 to 1", "list",
           "Share of the user's liked query items that appear in the top-k catalogue list.",
           "standard", f"{_M}.per_user_catalogue"),
    Metric("auc", "ranking", HIGHER, "0 to 1", "scenario",
           "ROC AUC of the predicted rating as a score for liked (true rating >= the like "
           "threshold), pooled over the scenario's query ratings.", "standard",
           f"{_M}.pooled_metrics"),
    Metric("precision", "ranking", HIGHER, "0 to 1", "scenario",
           "Precision of 'liked' predictions (predicted rating >= the like threshold), pooled over "
           "the scenario's query ratings.", "standard", f"{_M}.pooled_metrics"),
    Metric("recall", "ranking", HIGHER, "0 to 1", "scenario",
           "Recall of 'liked' predictions (predicted rating >= the like threshold), pooled over the "
           "scenario's query ratings.", "standard", f"{_M}.pooled_metrics"),
    # lists and exposure
    Metric("arp", "lists and exposure", LOWER, "training ratings per item", "list",
           "Average recommendation popularity: mean training popularity of the listed items "
           "(lower means less popularity bias).", "Abdollahpouri et al., FLAIRS 2019; Elliot",
           f"{_M}.per_user_beyond"),
    Metric("aplt", "lists and exposure", HIGHER, "0 to 1", "list",
           "Average percentage of long-tail items: share of the list outside the short head (the "
           "most popular items holding 80% of training ratings).",
           "Abdollahpouri et al., FLAIRS 2019; Elliot", f"{_M}.per_user_beyond"),
    Metric("novelty", "lists and exposure", HIGHER, "bits", "list",
           "Mean self-information -log2 of the listed items' (add-one smoothed) popularity share.",
           "Zhou et al., PNAS 2010", f"{_M}.per_user_beyond"),
    Metric("diversity", "lists and exposure", HIGHER, "0 to 1", "list",
           "Intra-list diversity: mean pairwise Jaccard distance of the listed items' genre sets.",
           "Ziegler et al., WWW 2005", f"{_M}.per_user_beyond"),
    Metric("coverage", "lists and exposure", HIGHER, "0 to 1", "scenario",
           "Share of the scenario's catalogue that appears in at least one top-k list.",
           "Ge et al., RecSys 2010", f"{_M}.catalogue_coverage"),
    Metric("gini", "lists and exposure", LOWER, "0 to 1", "scenario",
           "Gini index of how often each catalogue item appears in the top-k lists (count-based; "
           "0 = every item equally often).", "Elliot (Anelli et al., SIGIR 2021)", f"{_M}.gini"),
    Metric("exposure_gini", "lists and exposure", LOWER, "0 to 1", "scenario",
           "Gini index of position-weighted exposure, each list position j giving 1 / log2(1 + j).",
           "Singh & Joachims, KDD 2018", f"{_F}.exposure"),
    # fairness
    Metric("demographic_parity_difference", "fairness", LOWER, "0 to 1", "group",
           "Largest difference between groups in the share of query ratings predicted as liked.",
           "fairlearn; Dwork et al., ITCS 2012", f"{_F}.parity"),
    Metric("equalized_odds_difference", "fairness", LOWER, "0 to 1", "group",
           "Largest difference between groups in true- or false-positive rate of 'liked' "
           "predictions (fairlearn's worst case).", "fairlearn; Hardt et al., NeurIPS 2016",
           f"{_F}.parity"),
    Metric("ugf", "fairness", LOWER, "metric units", "group",
           "User-oriented group fairness: absolute difference of a metric's mean between the most "
           "active 5% of users and the rest.", "Li et al., WWW 2021", f"{_F}.ugf"),
    Metric("miscalibration", "fairness", LOWER, "nats", "list",
           "Steck's C_KL between the genre mix of the user's support ratings and of the top-k list "
           "(alpha = 0.01 smoothing).", "Steck, RecSys 2018", f"{_F}.miscalibration_per_user"),
    Metric("mean_abs_delta", "fairness", LOWER, "rating points", "user",
           "Counterfactual test: mean absolute change of a user's catalogue scores when only a "
           "sensitive attribute is replaced.", "Kusner et al., NeurIPS 2017 (counterfactual fairness)",
           "audit.counterfactual.counterfactual_test"),
    Metric("top10_jaccard", "fairness", HIGHER, "0 to 1", "user",
           "Counterfactual test: Jaccard overlap of the user's top-10 lists before and after the "
           "attribute is replaced (1 = unchanged).", "Kusner et al., NeurIPS 2017",
           "audit.counterfactual.counterfactual_test"),
    Metric("delta_ndcg", "fairness", NEITHER, "0 to 1", "user",
           "Counterfactual test: change of the user's list nDCG when the attribute is replaced.",
           "Kusner et al., NeurIPS 2017", "audit.counterfactual.counterfactual_test"),
    # robustness
    Metric("prediction_shift", "robustness", LOWER, "rating points", "attack",
           "Shilling attack: mean change of the target items' predicted ratings for genuine users.",
           "Mobasher et al., TOIT 2007", "audit.shilling.attack_effect"),
    Metric("hit_ratio", "robustness", LOWER, "0 to 1", "attack",
           "Shilling attack: share of (user, target item) pairs where the target enters the "
           "top-k list after the attack.", "Mobasher et al., TOIT 2007",
           "audit.shilling.attack_effect"),
    # feedback loop (closed-loop simulation; the utility is the oracle's expected rating)
    Metric("utility_shown", "feedback loop", HIGHER, "rating points", "user",
           "True utility of the shown top-k list: the oracle's expected ratings averaged with the "
           "rank-attention weights j^-0.8.", "Chaney, Stewart & Engelhardt, RecSys 2018",
           f"{_FB}.run_metrics"),
    Metric("utility_accepted", "feedback loop", HIGHER, "rating points", "user",
           "Sum of the true utilities of the items the user accepted in the round.",
           "Chaney, Stewart & Engelhardt, RecSys 2018", f"{_FB}.run_metrics"),
    Metric("utility_cum", "feedback loop", HIGHER, "rating points", "user",
           "Running total of utility_accepted from round 0 to the round.",
           "Chaney, Stewart & Engelhardt, RecSys 2018", f"{_FB}.run_metrics"),
    Metric("accepted", "count", NEITHER, "items", "user",
           "Number of listed items the user accepted in the round (a count, not a quality measure).",
           "choice model: rank attention x logistic acceptance", f"{_FB}.run_metrics"),
    Metric("mae_new", "rating error", LOWER, "rating points", "user",
           "MAE of the model's prediction against the simulated rating of each item the user "
           "accepted in the round.", "standard", f"{_FB}.run_metrics"),
    Metric("mae_heldout", "rating error", LOWER, "rating points", "user",
           "MAE on the user's real held-out query ratings, the model adapted on the user's "
           "current (grown) history; at round 0 the offline MAE.", "MeLU protocol (Lee et al., KDD 2019)",
           f"{_FB}.run_metrics"),
    Metric("jaccard", "feedback loop", LOWER, "0 to 1", "user",
           "Mean Jaccard similarity of the items the user consumed in the simulation so far with "
           "each other present user's.", "Chaney, Stewart & Engelhardt, RecSys 2018", f"{_FB}.run_metrics"),
    Metric("jaccard_population", "feedback loop", LOWER, "0 to 1", "scenario",
           "Mean Jaccard similarity of consumed-item sets over all pairs of present users (of one "
           "group, for a group).", "Chaney, Stewart & Engelhardt, RecSys 2018", f"{_FB}.run_metrics"),
    Metric("homogenisation", "feedback loop", LOWER, "ratio", "scenario",
           "jaccard_population divided by the oracle arm's in the same oracle, seed and round "
           "(1 = as homogeneous as the ideal recommender).", "Chaney, Stewart & Engelhardt, RecSys 2018",
           f"{_FB}.collect"),
)

_BY_NAME = {m.name: m for m in METRICS}
_EXACT = {m.name: m for m in METRICS if "{k}" not in m.name}
_FAMILIES = [(re.compile("^" + re.escape(m.name).replace(r"\{k\}", r"([1-9][0-9]*)") + "$"), m)
             for m in METRICS if "{k}" in m.name]


def lookup(name: str) -> Metric:
    """The registry entry of a metric name (``ndcg@5`` finds ``ndcg@{k}``)."""
    if name in _EXACT:
        return _EXACT[name]
    if name in _BY_NAME:   # a family by its own name, "ndcg@{k}"
        return _BY_NAME[name]
    for pattern, metric in _FAMILIES:
        if pattern.match(name):
            return metric
    raise KeyError(f"metric {name!r} is not in the metric registry (audit/registry.py); "
                   f"register it with its direction and definition")


def is_registered(name: str) -> bool:
    try:
        lookup(name)
    except KeyError:
        return False
    return True


def unregistered(names: Iterable[str]) -> list[str]:
    """The names among ``names`` that the registry does not know, sorted and unique."""
    return sorted({str(n) for n in names if not is_registered(str(n))})


def direction(name: str) -> int:
    """+1 when higher is better, -1 when lower is better, 0 when neither."""
    return _SIGN[lookup(name).direction]


def lower_is_better(name: str) -> bool:
    return lookup(name).direction == LOWER


def better(name: str, values: Iterable[float]) -> float | None:
    """The best of ``values`` for this metric, or None when the metric has no direction."""
    d = direction(name)
    vals = [v for v in values if v is not None and v == v]
    if d == 0 or not vals:
        return None
    return max(vals) if d > 0 else min(vals)


def anchor(name: str) -> str:
    """The HTML id of a metric's glossary entry (``ndcg@5`` and ``ndcg@10`` share one)."""
    return "metric-" + re.sub(r"[^a-z0-9]+", "-", lookup(name).name).strip("-")


def glossary(names: Iterable[str]) -> list[dict[str, str]]:
    """Glossary rows for the names a report shows, one per registry entry, in registry order."""
    wanted = {lookup(str(n)).name for n in names}
    return [{"name": m.name.replace("{k}", "k"), "anchor": anchor(m.name),
             "family": m.family, "direction": m.direction, "unit": m.unit, "per": m.per,
             "definition": m.definition, "reference": m.reference}
            for m in METRICS if m.name in wanted]
