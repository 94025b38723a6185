"""Which k items each user is shown, given scores over the catalogue.

Scores are a [users, items] matrix with -inf on items a user may not be shown (already consumed, or
held out for measuring accuracy); item columns are in ascending item id, so a stable sort breaks
score ties by item id. The model policies are greedy (exploit the prediction), epsilon-greedy and
upper-confidence (prediction + c x uncertainty); the reference arms are random, popularity and the
oracle (greedy on the true utility, the ideal recommender).

Epsilon-greedy draws, per user, a random order of the allowed items and then one coin per slot:
an exploring slot takes the next unused item of the random order, the others the next unused item
of the greedy order. The random arm draws the same random order first, so with epsilon = 1 the two
show identical lists under the same generator.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from metarec.errors import ConfigError

MODEL_POLICIES = ("greedy", "epsilon_greedy", "ucb")
REFERENCE_POLICIES = ("random", "popularity", "oracle")


def greedy(scores: np.ndarray, k: int) -> np.ndarray:
    """[users, k] column indices of the k best-scored allowed items (ties: lower item id)."""
    _check_room(scores, k)
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def random_lists(allowed: np.ndarray, k: int, gens: Sequence[np.random.Generator]) -> np.ndarray:
    _check_room(np.where(allowed, 0.0, -np.inf), k)
    return np.stack([g.permutation(np.flatnonzero(row))[:k] for row, g in zip(allowed, gens)]) \
        if len(allowed) else np.zeros((0, k), dtype=np.int64)


def epsilon_greedy(scores: np.ndarray, k: int, epsilon: float, gens: Sequence[np.random.Generator]) -> np.ndarray:
    # the greedy slots never need more than the 2k best: at most k - 1 of those go to exploring slots
    _check_room(scores, k)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :2 * k]
    out = np.empty((len(scores), k), dtype=np.int64)
    for u, g in enumerate(gens):
        perm = g.permutation(np.flatnonzero(np.isfinite(scores[u])))
        explore = g.random(k) < epsilon
        chosen: list[int] = []
        best = order[u][np.isfinite(scores[u, order[u]])]
        sources = {True: iter(perm), False: iter(best)}
        for slot in range(k):
            for item in sources[bool(explore[slot])]:
                if item not in chosen:
                    chosen.append(int(item))
                    break
        out[u] = chosen
    return out


def _check_room(scores: np.ndarray, k: int) -> None:
    allowed = np.isfinite(scores).sum(axis=1) if scores.size else np.zeros(0)
    if len(allowed) and allowed.min() < k:
        raise ConfigError(f"params.yaml feedback: a user has only {int(allowed.min())} items left to show; "
                          f"k={k} needs more (lower feedback.k or feedback.rounds)")
