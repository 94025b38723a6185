"""Seeded MovieLens-shaped data with planted group effects, so the audit can be checked against a
known truth.

Users carry gender, age (int), occupation and zip drawn from ML-100K's marginals; items carry
multi-label genres and a release year skewed towards the late 1990s. Item popularity follows a Zipf
law and user activity a lognormal (every user has at least `min_per_user` ratings), as in real
rating logs where fairness gaps and cold-start effects come from exactly these skews. Ratings are
a latent-factor model (global mean + user and item biases + dot product + Gaussian noise), rounded
and clipped to 1..5. Planted effects act on the latent rating of one user group:
`{"type": "bias", "attribute": "gender", "group": "F", "size": -0.3}` adds `size`,
`{"type": "noise", "attribute": "age", "group": "56+", "size": 0.5}` adds N(0, size^2) noise.
The same draws are used with and without the effects, so the ground truth can state the realised
shift of each group's mean rating exactly.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from metarec.data.movielens import GENRES, OCCUPATIONS
from metarec.data.schema import MOVIELENS_SPEC, RatingData
from metarec.errors import ConfigError

DEFAULTS = {"seed": 0, "n_users": 943, "n_items": 1682, "n_ratings": 100_000, "min_per_user": 20,
            "n_factors": 8, "zipf_exponent": 0.9, "activity_sigma": 1.0, "noise_std": 0.5,
            "global_mean": 3.3, "effects": []}
# ML-100K marginals (u.user counts; age buckets of MOVIELENS_SPEC, ML-1M edges).
_OCC_WEIGHTS = (79, 28, 7, 95, 67, 18, 32, 16, 7, 12, 51, 26, 9, 105, 66, 14, 12, 31, 196, 27, 45)
_AGE_RANGES = ((7, 17), (18, 24), (25, 34), (35, 44), (45, 49), (50, 55), (56, 73))
_AGE_WEIGHTS = (0.038, 0.21, 0.329, 0.206, 0.085, 0.077, 0.055)
# ML-100K genre counts without "unknown" (Action..Western).
_GENRE_WEIGHTS = (251, 135, 42, 122, 505, 109, 50, 725, 22, 24, 92, 56, 61, 247, 101, 251, 71, 27)
_T0, _T1 = 874_724_710, 893_286_638  # ML-100K's first and last timestamps
# data-block keys of the other sources, tolerated so one params.yaml can switch source by one line
_OTHER_KEYS = {"source", "synthetic", "duplicates", "path", "url", "cache_dir", "timeout", "pip_timeout",
               "pypi_fallback", "verify_checksums", "interactions", "users", "items", "schema"}
_STREAMS = {"users": 1, "items": 2, "activity": 3, "choice": 4, "latent": 5, "noise": 6, "effects": 7, "time": 8}


def _rng(seed: int, stream: str) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), _STREAMS[stream]]))


def _users(n: int, rng: np.random.Generator) -> pd.DataFrame:
    bucket = rng.choice(len(_AGE_RANGES), size=n, p=np.asarray(_AGE_WEIGHTS) / sum(_AGE_WEIGHTS))
    lo = np.array([r[0] for r in _AGE_RANGES])[bucket]
    hi = np.array([r[1] for r in _AGE_RANGES])[bucket]
    occ_p = np.asarray(_OCC_WEIGHTS, dtype=float) / sum(_OCC_WEIGHTS)
    return pd.DataFrame({
        "user_id": np.arange(1, n + 1, dtype=np.int64),
        "age": rng.integers(lo, hi + 1).astype(np.int64),
        "gender": pd.Series(np.where(rng.random(n) < 0.71, "M", "F"), dtype=object),
        "occupation": pd.Series(np.asarray(OCCUPATIONS, dtype=object)[rng.choice(len(OCCUPATIONS), n, p=occ_p)],
                                dtype=object),
        "zip": pd.Series([f"{z:05d}" for z in rng.integers(0, 100_000, size=n)], dtype=object),
    })


def _items(n: int, rng: np.random.Generator) -> pd.DataFrame:
    year = np.clip(1998 - np.floor(rng.exponential(6.0, size=n)), 1922, 1998)
    names = np.asarray(GENRES[1:], dtype=object)
    logw = np.log(np.asarray(_GENRE_WEIGHTS, dtype=float))
    keys = logw[None, :] + rng.gumbel(size=(n, len(names)))
    order = np.argsort(-keys, axis=1)
    k = 1 + rng.binomial(2, 0.35, size=n)
    genres = []
    for row, kk in zip(order, k):
        picked = np.sort(row[:kk])  # u.genre order
        genres.append("|".join(names[picked]))
    ids = np.arange(1, n + 1, dtype=np.int64)
    return pd.DataFrame({
        "item_id": ids,
        "title": pd.Series([f"Synthetic film {i} ({int(y)})" for i, y in zip(ids, year)], dtype=object),
        "release_date": pd.to_datetime(pd.Series(year.astype(int).astype(str)) + "-01-01").astype("datetime64[ns]"),
        "release_year": year.astype(float),
        "genres": pd.Series(genres, dtype=object),
    })


def _activity(n_users: int, n_items: int, n_ratings: int, minimum: int, sigma: float,
              rng: np.random.Generator) -> np.ndarray:
    """Ratings per user: `minimum` each plus a lognormal-weighted share, capped at n_items."""
    weight = rng.lognormal(0.0, sigma, size=n_users)
    counts = minimum + rng.multinomial(n_ratings - minimum * n_users, weight / weight.sum())
    while (over := counts > n_items).any():
        excess = int((counts[over] - n_items).sum())
        counts[over] = n_items
        room = counts < n_items
        w = np.where(room, weight, 0.0)
        counts += rng.multinomial(excess, w / w.sum())
    return counts


def _choose_items(counts: np.ndarray, popularity: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Distinct items per user, drawn by popularity without replacement (Gumbel top-k)."""
    n_items = len(popularity)
    logp = np.log(popularity)
    chunk = max(1, 4_000_000 // n_items)
    users, items = [], []
    cols = np.arange(n_items)
    for start in range(0, len(counts), chunk):
        c = counts[start:start + chunk]
        keys = logp[None, :] + rng.gumbel(size=(len(c), n_items))
        kmax = int(c.max())
        if kmax < n_items:
            top = np.argpartition(-keys, kmax - 1, axis=1)[:, :kmax]
            top_keys = np.take_along_axis(keys, top, axis=1)
            order = np.take_along_axis(top, np.argsort(-top_keys, axis=1), axis=1)
        else:
            order = np.argsort(-keys, axis=1)
        mask = cols[None, :order.shape[1]] < c[:, None]
        items.append(order[mask])
        users.append(np.repeat(np.arange(start, start + len(c)), c))
    return np.concatenate(users), np.concatenate(items)


def _groups(users: pd.DataFrame, attribute: str) -> np.ndarray:
    attr = MOVIELENS_SPEC.user_attr(attribute)
    if attr.kind == "numeric":
        return attr.bucketize(users[attribute]).to_numpy(dtype=object)
    return users[attribute].to_numpy(dtype=object)


def _check_effects(effects: list, users: pd.DataFrame) -> list[dict]:
    if effects in (None, "none"):
        return []
    if not isinstance(effects, list):
        raise ConfigError("params.yaml: data.effects must be a list of {type, attribute, group, size} or none")
    names = [a.name for a in MOVIELENS_SPEC.user_attributes]
    out = []
    for i, eff in enumerate(effects):
        where = f"data.effects[{i}]"
        if not isinstance(eff, dict) or eff.get("type") not in ("bias", "noise"):
            raise ConfigError(f"params.yaml: {where}.type must be 'bias' or 'noise'")
        if eff.get("attribute") not in names:
            raise ConfigError(f"params.yaml: {where}.attribute is {eff.get('attribute')!r}; expected one of {', '.join(names)}")
        attr = MOVIELENS_SPEC.user_attr(eff["attribute"])
        possible = attr.bucket_labels() if attr.kind == "numeric" else sorted(set(users[attr.name]))
        if str(eff.get("group")) not in possible:
            raise ConfigError(f"params.yaml: {where}.group is {eff.get('group')!r}; expected one of {', '.join(possible)}")
        try:
            size = float(eff["size"])
        except (KeyError, TypeError, ValueError):
            raise ConfigError(f"params.yaml: {where}.size must be a number") from None
        if eff["type"] == "noise" and size < 0:
            raise ConfigError(f"params.yaml: {where}.size is a noise std and must be >= 0, got {size:g}")
        out.append({"type": eff["type"], "attribute": attr.name, "group": str(eff["group"]), "size": size})
    return out


def generate(cfg: dict) -> tuple[RatingData, dict]:
    """Make a synthetic dataset and the ground truth of its planted effects (deterministic in cfg)."""
    unknown = set(cfg) - set(DEFAULTS) - _OTHER_KEYS
    p = {**DEFAULTS, **{k: v for k, v in cfg.items() if k in DEFAULTS}}
    if unknown:
        raise ConfigError(f"params.yaml: data has unknown synthetic key {sorted(unknown)[0]!r}; expected "
                          f"{', '.join(sorted(DEFAULTS))}")
    seed, nu, ni, nr, mn = (int(p[k]) for k in ("seed", "n_users", "n_items", "n_ratings", "min_per_user"))
    if nu < 2 or ni < 2 or mn < 1 or mn > ni:
        raise ConfigError(f"params.yaml: data.n_users ({nu}) and data.n_items ({ni}) must be >= 2 and "
                          f"data.min_per_user ({mn}) between 1 and n_items")
    if not nu * mn <= nr <= nu * ni:
        raise ConfigError(f"params.yaml: data.n_ratings is {nr}; expected between n_users*min_per_user "
                          f"({nu * mn}) and n_users*n_items ({nu * ni})")

    users = _users(nu, _rng(seed, "users"))
    items = _items(ni, _rng(seed, "items"))
    effects = _check_effects(p["effects"], users)

    rng = _rng(seed, "activity")
    counts = _activity(nu, ni, nr, mn, float(p["activity_sigma"]), rng)
    pop_rank = rng.permutation(ni)
    popularity = 1.0 / (pop_rank + 1.0) ** float(p["zipf_exponent"])
    u, i = _choose_items(counts, popularity / popularity.sum(), _rng(seed, "choice"))

    rng = _rng(seed, "latent")
    k = int(p["n_factors"])
    scale = (0.36 / k) ** 0.25  # dot-product std ~0.6
    user_bias = rng.normal(0.0, 0.4, nu)
    logpop = np.log(popularity)
    item_bias = rng.normal(0.0, 0.4, ni) + 0.25 * (logpop - logpop.mean()) / logpop.std()
    P, Q = rng.normal(0.0, scale, (nu, k)), rng.normal(0.0, scale, (ni, k))
    latent = float(p["global_mean"]) + user_bias[u] + item_bias[i] + np.einsum("nk,nk->n", P[u], Q[i])
    latent += _rng(seed, "noise").normal(0.0, float(p["noise_std"]), len(u))

    contributions = []
    eff_rng = _rng(seed, "effects")
    for eff in effects:
        member = (_groups(users, eff["attribute"]) == eff["group"])[u]
        if eff["type"] == "bias":
            contributions.append(eff["size"] * member)
        else:
            contributions.append(member * eff_rng.normal(0.0, eff["size"], len(u)))
    planted = np.sum(contributions, axis=0) if contributions else np.zeros(len(u))
    rating = np.clip(np.rint(latent + planted), 1, 5)
    base = np.clip(np.rint(latent), 1, 5)

    ts = _rng(seed, "time").integers(_T0, _T1 + 1, size=len(u))
    ratings = pd.DataFrame({"user_id": users["user_id"].to_numpy()[u], "item_id": items["item_id"].to_numpy()[i],
                            "rating": rating.astype(np.float64), "timestamp": ts.astype(np.int64)})
    truth = _ground_truth(p, effects, users, u, latent, rating, base, contributions)
    data = RatingData(ratings=ratings, users=users, items=items, spec=MOVIELENS_SPEC, source="synthetic",
                      provenance={"source": "synthetic", "seed": seed, "params": {k: p[k] for k in DEFAULTS if k != "effects"},
                                  "effects": effects})
    return data, truth


def _ground_truth(p: dict, effects: list[dict], users: pd.DataFrame, u: np.ndarray, latent: np.ndarray,
                  rating: np.ndarray, base: np.ndarray, contributions: list[np.ndarray]) -> dict:
    """The realised shift of mean ratings: per effect (that effect alone, on its group) and per group
    of each affected attribute (all effects together), both as rating-with minus rating-without.

    Rounding and clipping to 1..5 make the realised shift differ from the planted size (a -0.3 bias
    moves the mean rating by about -0.27), which is why estimates are judged against these values.
    """
    out_effects = []
    shift = rating - base
    for eff, contrib in zip(effects, contributions):
        member = (_groups(users, eff["attribute"]) == eff["group"])[u]
        alone = np.clip(np.rint(latent + contrib), 1, 5) - base
        rec = {**eff, "n_users": int((_groups(users, eff["attribute"]) == eff["group"]).sum()),
               "n_ratings": int(member.sum()),
               "realised_mean_shift": float(alone[member].mean()) if member.any() else 0.0,
               "realised_latent_shift": float(contrib[member].mean()) if member.any() else 0.0}
        if eff["type"] == "noise":
            rec["realised_noise_std"] = float(contrib[member].std()) if member.any() else 0.0
        out_effects.append(rec)
    group_shift: dict[str, dict[str, float]] = {}
    for attribute in sorted({e["attribute"] for e in effects}):
        labels = _groups(users, attribute)[u]
        group_shift[attribute] = {str(g): float(shift[labels == g].mean()) for g in sorted(set(labels) - {None})}
    return {"seed": int(p["seed"]), "effects": out_effects, "group_mean_shift": group_shift,
            "global_mean": float(p["global_mean"]), "noise_std": float(p["noise_std"]),
            "mean_rating": float(rating.mean()), "n_ratings": int(len(rating))}
