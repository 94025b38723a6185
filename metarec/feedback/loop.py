"""The round loop: recommend, let simulated users react, grow their histories, admit new users.

Round r = 0, 1, ..., R. In each round every present user is shown one top-k list chosen by the
policy, reacts through the choice model, and each accepted item becomes a rating drawn from the
oracle that joins the user's history (their support set). Round 0 is shown before any feedback has
entered, so it is the offline situation. At the start of each round r >= 1 a cohort of new users
arrives with a few of their real ratings.

The population is a cold-start split (users the models never trained on): each user brings real
support ratings and real held-out query ratings. Query items are never shown, so the model's
accuracy on them each round measures how the grown support set changes its cold-start accuracy
on real ratings; with zero rounds and every user present from the start this is exactly the
offline evaluation.

How models follow the loop is their public `predict(tasks)`: the support set of each task is the
user's whole current history, so meta-learners adapt on the grown support set and the classic
models refit with it folded in (metarec.models.classic), as in the offline audit. The
meta-learners' global parameters are not re-meta-trained between rounds.

Randomness comes from generators keyed by (seed, purpose, round, user): the policies' draws, the
users' reactions and the bootstrap are separate streams, so two policies that show the same list
to a user get the same reaction (common random numbers), and epsilon-greedy with epsilon = 1
reproduces the random arm exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from metarec.errors import ConfigError
from metarec.feedback import policies
from metarec.feedback.choice import ChoiceModel
from metarec.feedback.oracle import Oracle
from metarec.models.base import Recommender
from metarec.predict import predict_in_chunks
from metarec.seeding import rng
from metarec.tasks import Task


@dataclass(frozen=True)
class LoopConfig:
    """The `feedback:` loop parameters of params.yaml."""

    rounds: int = 5
    k: int = 10
    initial_fraction: float = 0.7   # share of the population present at round 0; the rest arrive in R cohorts
    cohort_support: int = 3         # real ratings a newly arriving user brings
    epsilon: float = 0.1
    ucb_c: float = 1.0              # UCB score = prediction + ucb_c x bootstrap standard deviation
    n_bootstrap: int = 4            # support-set resamples behind the uncertainty estimate
    ucb_shortlist: int = 50         # UCB re-ranks the best-predicted items this many deep (only they need a bootstrap)

    @classmethod
    def from_params(cls, p: Mapping) -> "LoopConfig":
        known = set(cls.__dataclass_fields__)
        cfg = cls(**{k: type(getattr(cls, k))(v) for k, v in p.items() if k in known})
        checks = [(cfg.rounds >= 0, "rounds", "an integer >= 0"), (cfg.k >= 1, "k", "an integer >= 1"),
                  (0.0 < cfg.initial_fraction <= 1.0, "initial_fraction", "in (0, 1]"),
                  (cfg.cohort_support >= 1, "cohort_support", "an integer >= 1"),
                  (0.0 <= cfg.epsilon <= 1.0, "epsilon", "in [0, 1]"), (cfg.ucb_c >= 0, "ucb_c", ">= 0"),
                  (cfg.n_bootstrap >= 2, "n_bootstrap", "an integer >= 2"),
                  (cfg.ucb_shortlist >= cfg.k, "ucb_shortlist", f"an integer >= k ({cfg.k})")]
        for ok, name, what in checks:
            if not ok:
                raise ConfigError(f"params.yaml feedback.{name} is {getattr(cfg, name)!r}; expected {what}")
        return cfg


@dataclass(frozen=True)
class SimUser:
    user_id: int
    attrs: Mapping[str, object]
    support_items: np.ndarray     # real support, oldest first
    support_ratings: np.ndarray
    query_items: np.ndarray       # real held-out ratings, never shown
    query_ratings: np.ndarray


def population_from(pairs: Sequence[tuple[Task, np.ndarray]]) -> list[SimUser]:
    """Simulation users from (task, query ratings) pairs, e.g. `TaskSet.tasks_with_truth()`."""
    return [SimUser(t.user_id, t.user_attrs, np.asarray(t.support_items, np.int64),
                    np.asarray(t.support_ratings, np.float64), np.asarray(t.candidates, np.int64),
                    np.asarray(y, np.float64)) for t, y in pairs]


@dataclass
class SimulationLog:
    """What happened: one row per shown item, per scored held-out rating, and per arrival rating."""

    shown: pd.DataFrame      # round, user_id, rank, item_id, utility, score, p_accept, accepted, rating
    heldout: pd.DataFrame    # round, user_id, item_id, y_true, y_pred (model policies only)
    arrivals: pd.DataFrame   # user_id, round, item_id, rating: the history each user arrives with


@dataclass
class _State:
    """Mutable per-run state: histories as item -> rating dicts (insertion order = time)."""

    history: dict[int, dict[int, float]] = field(default_factory=dict)
    accepted_counts: np.ndarray | None = None


def arrival_rounds(n_users: int, cfg: LoopConfig, seed: int) -> np.ndarray:
    """Round at which each population user arrives (0 for the initial share)."""
    order = rng(seed, "arrival").permutation(n_users)
    n_init = n_users if cfg.rounds == 0 else max(1, int(round(cfg.initial_fraction * n_users)))
    out = np.zeros(n_users, dtype=np.int64)
    for r, block in enumerate(np.array_split(order[n_init:], max(cfg.rounds, 1)), start=1):
        out[block] = r
    return out


def simulate(policy: str, population: Sequence[SimUser], catalogue: np.ndarray, oracle: Oracle, choice: ChoiceModel,
             cfg: LoopConfig, seed: int, *, model: Recommender | None = None, popularity: np.ndarray | None = None,
             acceptance: Mapping[int, float] | None = None, cache: dict | None = None) -> SimulationLog:
    """Run one policy for rounds 0..R.

    `catalogue`: sorted item ids that may be shown; `popularity`: rating counts aligned with it
    (the popularity arm adds the simulation's accepted items as they come); `acceptance`: a
    per-user factor on acceptance probabilities (a planted bias; 1 for absent users); `cache`: a
    dict shared by runs of the same model (any policy or oracle) that reuses the prediction for a
    task whose history was already scored (round 0 is the same for every policy, and a user who
    accepted nothing keeps their history). Predictions depend only on the task, so reuse is exact.
    """
    if policy not in policies.MODEL_POLICIES + policies.REFERENCE_POLICIES:
        raise ConfigError(f"params.yaml feedback.policies: unknown policy {policy!r}; expected some of "
                          f"{', '.join(policies.MODEL_POLICIES + policies.REFERENCE_POLICIES)}")
    if policy in policies.MODEL_POLICIES and model is None:
        raise ValueError(f"policy {policy!r} needs a model")
    catalogue = np.asarray(catalogue, dtype=np.int64)
    col = {int(i): c for c, i in enumerate(catalogue)}
    arrive = arrival_rounds(len(population), cfg, seed)
    state = _State(accepted_counts=np.zeros(len(catalogue)))
    shown, heldout, arrivals = [], [], []
    for r in range(cfg.rounds + 1):
        for idx in np.flatnonzero(arrive == r):
            u = population[idx]
            n = len(u.support_items) if r == 0 else min(cfg.cohort_support, len(u.support_items))
            state.history[u.user_id] = dict(zip(u.support_items[:n].tolist(), u.support_ratings[:n].tolist()))
            arrivals.append(pd.DataFrame({"user_id": u.user_id, "round": r, "item_id": u.support_items[:n],
                                          "rating": u.support_ratings[:n]}))
        present = [population[i] for i in np.flatnonzero(arrive <= r)]
        allowed = np.ones((len(present), len(catalogue)), dtype=bool)
        for row, u in enumerate(present):
            allowed[row, [col[i] for i in (*state.history[u.user_id], *u.query_items.tolist()) if i in col]] = False
        preds = None
        if model is not None and policy in policies.MODEL_POLICIES:
            preds, scored = _predict(model, present, state, catalogue, {} if cache is None else cache)
            heldout.append(_heldout_rows(r, present, scored, preds, col))
        lists, scores = _choose(policy, preds, allowed, present, state, catalogue, oracle, cfg, seed, r, model, popularity)
        shown.append(_react(r, present, lists, scores, catalogue, oracle, choice, seed, acceptance, state, col))
    cat = lambda frames: pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    return SimulationLog(cat(shown), cat(heldout), cat(arrivals))


def _tasks(present: Sequence[SimUser], state: _State, catalogue: np.ndarray) -> list[Task]:
    out = []
    for u in present:
        h = state.history[u.user_id]
        items = np.fromiter(h.keys(), dtype=np.int64, count=len(h))
        out.append(Task(u.user_id, u.attrs, items, np.fromiter(h.values(), dtype=np.float32, count=len(h)),
                        np.setdiff1d(catalogue, items, assume_unique=True), scenario="feedback"))
    return out


def _task_key(t: Task) -> tuple:
    return (int(t.user_id), t.support_items.tobytes(), t.support_ratings.tobytes())


def _predict(model: Recommender, present: Sequence[SimUser], state: _State, catalogue: np.ndarray,
             cache: dict) -> tuple[np.ndarray, list[Task]]:
    """[users, catalogue] predictions (NaN on the history) and the tasks that produced them.

    A classic model folds every task of one call into one refit, so its answers depend on the
    whole call: it is never served from the cache (`predict_chunk = None` marks such models)."""
    tasks = _tasks(present, state, catalogue)
    joint = hasattr(model, "predict_chunk") and model.predict_chunk is None
    todo = [t for t in tasks if joint or _task_key(t) not in cache]
    fresh = dict(zip(map(_task_key, todo), predict_in_chunks(model, todo))) if todo else {}
    if not joint:
        cache.update(fresh)
    out = np.full((len(present), len(catalogue)), np.nan)
    for row, t in enumerate(tasks):
        out[row, np.searchsorted(catalogue, t.candidates)] = fresh.get(_task_key(t), cache.get(_task_key(t)))
    return out, tasks


def _bootstrap_std(model: Recommender, tasks: Sequence[Task], shortlist: np.ndarray, catalogue: np.ndarray,
                   cfg: LoopConfig, seed: int, r: int) -> np.ndarray:
    """Std of the predictions over support sets resampled with replacement: how much the model's
    adapted prediction for this user rests on which of their few ratings it happened to see.
    Computed for each user's shortlist (column indices) only; zero elsewhere."""
    boot = []
    for t, cols in zip(tasks, shortlist):
        g = rng(seed, "bootstrap", r, int(t.user_id))
        for _ in range(cfg.n_bootstrap):
            pick = g.integers(0, len(t.support_items), len(t.support_items))
            boot.append(t.replace(support_items=t.support_items[pick], support_ratings=t.support_ratings[pick],
                                  candidates=catalogue[cols]))
    preds = predict_in_chunks(model, boot)
    out = np.zeros((len(tasks), len(catalogue)))
    for row, cols in enumerate(shortlist):
        stack = np.stack(preds[row * cfg.n_bootstrap:(row + 1) * cfg.n_bootstrap])
        out[row, cols] = stack.std(axis=0, ddof=1)
    return out


def _choose(policy: str, preds: np.ndarray | None, allowed: np.ndarray, present: Sequence[SimUser], state: _State,
            catalogue: np.ndarray, oracle: Oracle, cfg: LoopConfig, seed: int, r: int, model: Recommender | None,
            popularity: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    gens = [rng(seed, "policy", r, u.user_id) for u in present]
    masked = lambda s: np.where(allowed, s, -np.inf)
    score = np.full(allowed.shape, np.nan) if preds is None else preds
    if policy == "random":
        return policies.random_lists(allowed, cfg.k, gens), score
    if policy == "greedy":
        return policies.greedy(masked(preds), cfg.k), score
    if policy == "epsilon_greedy":
        return policies.epsilon_greedy(masked(preds), cfg.k, cfg.epsilon, gens), score
    if policy == "ucb":
        # a small catalogue may leave fewer items than the shortlist: re-rank all of them then
        room = int(allowed.sum(axis=1).min()) if len(allowed) else cfg.k
        shortlist = policies.greedy(masked(preds), max(cfg.k, min(cfg.ucb_shortlist, room)))
        std = _bootstrap_std(model, _tasks(present, state, catalogue), shortlist, catalogue, cfg, seed, r)
        on_list = np.zeros(allowed.shape, dtype=bool)
        np.put_along_axis(on_list, shortlist, True, axis=1)
        return policies.greedy(np.where(on_list, preds + cfg.ucb_c * std, -np.inf), cfg.k), score
    if policy == "popularity":
        base = np.zeros(len(catalogue)) if popularity is None else np.asarray(popularity, dtype=float)
        return policies.greedy(masked(np.broadcast_to(base + state.accepted_counts, allowed.shape)), cfg.k), score
    truth = oracle.utility[np.ix_(oracle.rows([u.user_id for u in present]), oracle.cols(catalogue))]
    return policies.greedy(masked(truth), cfg.k), score


def _react(r: int, present: Sequence[SimUser], lists: np.ndarray, scores: np.ndarray, catalogue: np.ndarray,
           oracle: Oracle, choice: ChoiceModel, seed: int, acceptance: Mapping[int, float] | None, state: _State,
           col: Mapping[int, int]) -> pd.DataFrame:
    users = np.array([u.user_id for u in present], dtype=np.int64)
    items = catalogue[lists]
    utility = oracle.utility[oracle.rows(users)[:, None], oracle.cols(items)]
    factor = np.array([(acceptance or {}).get(int(u), 1.0) for u in users], dtype=float)
    p = choice.accept_probability(utility, factor)
    k = lists.shape[1]
    draws = [rng(seed, "choice", r, int(u)) for u in users]
    coins = np.array([g.random(k) for g in draws]).reshape(len(users), k)
    noise = np.array([g.standard_normal(k) for g in draws]).reshape(len(users), k)
    accepted = coins < p
    ratings = oracle.draw(utility, noise)
    for row, u in enumerate(users):
        for j in np.flatnonzero(accepted[row]):
            state.history[int(u)][int(items[row, j])] = float(ratings[row, j])
            state.accepted_counts[lists[row, j]] += 1
    return pd.DataFrame({
        "round": r, "user_id": np.repeat(users, k), "rank": np.tile(np.arange(1, k + 1), len(users)),
        "item_id": items.ravel(), "utility": utility.ravel(),
        "score": np.take_along_axis(scores, lists, axis=1).ravel(), "p_accept": p.ravel(),
        "accepted": accepted.ravel(), "rating": np.where(accepted, ratings, np.nan).ravel()})


def _heldout_rows(r: int, present: Sequence[SimUser], tasks: Sequence[Task], preds: np.ndarray,
                  col: Mapping[int, int]) -> pd.DataFrame:
    rows, cols, users, items, truth = [], [], [], [], []
    for row, u in enumerate(present):
        for i, y in zip(u.query_items.tolist(), u.query_ratings.tolist()):
            if i in col:
                rows.append(row), cols.append(col[i]), users.append(u.user_id), items.append(i), truth.append(y)
    return pd.DataFrame({"round": r, "user_id": np.asarray(users, dtype=np.int64), "item_id": np.asarray(items, dtype=np.int64),
                         "y_true": np.asarray(truth, dtype=float), "y_pred": preds[rows, cols] if rows else np.zeros(0)})
