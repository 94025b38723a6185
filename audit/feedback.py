"""Feedback-loop audit: per-round metrics of simulated runs, overall and per group, with intervals,
group-gap tests, gap growth over the rounds, and what exploration costs and buys.

Input: `Run`s, each the log of one (oracle, seed, model, policy) simulation (metarec.feedback).
Per user and round: the attention-weighted true utility of the shown list (`utility_shown`), the
true utility of what was accepted (`utility_accepted`, and its running total `utility_cum`), the
number accepted, ARP of the list, genre miscalibration of the list against the user's current
history (Steck 2018), MAE on the round's new ratings (`mae_new`), MAE on the user's real held-out
ratings (`mae_heldout`), and the mean Jaccard similarity of the user's consumed items with every
other present user's (`jaccard`). Per round and population (overall or one group): catalogue
coverage of the round's lists, position-weighted exposure Gini, mean pairwise Jaccard, and
homogenisation = that Jaccard over the oracle arm's in the same oracle, seed and round (Chaney,
Stewart and Engelhardt, RecSys 2018).

Intervals (95%) and tests, users as the unit: a per-user metric is first averaged over the seeds
in which the user took part, then its round mean gets a Student-t interval over users; a
population metric gets a t interval over seeds. A group gap is group minus the rest of the users,
tested with Welch's t (scipy.stats.ttest_ind, unequal variances) with its interval; gap growth is
the same test on each user's change from round 0 to round R (users present at round 0), so the
growth is paired within user. p-values are Benjamini-Hochberg adjusted within each record kind.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
from scipy import stats as st

from audit.fairness import miscalibration_per_user
from audit.metrics import gini
from audit.stats import t_interval

PER_USER = ("utility_shown", "utility_accepted", "utility_cum", "accepted", "arp", "miscalibration",
            "mae_new", "mae_heldout", "jaccard")
POPULATION = ("coverage", "exposure_gini", "jaccard_population", "homogenisation")
GAP_METRICS = ("utility_shown", "utility_cum", "mae_heldout")
KEYS = ["oracle", "seed", "model", "policy"]
LEVEL = 0.95


@dataclass
class Run:
    oracle: str
    seed: int
    model: str          # "reference" for the model-free arms
    policy: str
    shown: pd.DataFrame
    heldout: pd.DataFrame
    arrivals: pd.DataFrame


def _key(run: Run) -> dict:
    return {"oracle": run.oracle, "seed": int(run.seed), "model": run.model, "policy": run.policy}


def attention_weights(k: int, decay: float) -> np.ndarray:
    return np.arange(1, k + 1, dtype=float) ** -decay


JACCARD_BLOCK = 2048    # users per block of the intersection counts (bounds memory whatever the population)


def _jaccard_sums(consumed: pd.DataFrame, users: np.ndarray, labels: pd.DataFrame,
                  block: int = JACCARD_BLOCK) -> tuple[np.ndarray, dict[tuple[str, str], float]]:
    """(per user: sum of its Jaccard similarities with every other user; per (attribute, group),
    ("all", "all") included: the sum over ordered pairs of distinct users inside it).

    Why not the users x users matrix: at 10M ratings a scenario has about 14,000 users, and the
    dense matrix with its intersection and union is several GB per round. Jaccard is zero unless two
    consumed sets intersect, so only the nonzeros of the sparse intersection counts matter; they are
    taken a block of users at a time. Users whose sets are empty have similarity 0 with everyone.
    `labels`: users' groups, one column per attribute, indexed like `users`.
    """
    from scipy import sparse

    n = len(users)
    pos = {int(u): i for i, u in enumerate(users)}
    c = consumed[consumed["user_id"].isin(pos)]
    items, codes = np.unique(c["item_id"].to_numpy(), return_inverse=True)
    x = sparse.csr_matrix((np.ones(len(c)), (c["user_id"].map(pos).to_numpy(), codes)),
                          shape=(n, max(len(items), 1)))
    x.sum_duplicates()
    x.data[:] = 1.0                                  # sets, not counts
    size = np.asarray(x.sum(axis=1)).ravel()
    xt = x.T.tocsr()
    group_codes = {a: pd.Categorical(labels[a].astype(object).where(labels[a].notna()),
                                     categories=sorted(labels[a].dropna().unique(), key=str))
                   for a in labels.columns}
    row = np.zeros(n)
    pairs = {("all", "all"): 0.0}
    within = {a: np.zeros(len(cat.categories)) for a, cat in group_codes.items()}
    for start in range(0, n, block):
        b = (x[start:start + block] @ xt).tocoo()
        i, j, inter = b.row + start, b.col, b.data
        off = i != j
        i, j, inter = i[off], j[off], inter[off]
        v = inter / (size[i] + size[j] - inter)
        row += np.bincount(i, v, n)
        pairs[("all", "all")] += float(v.sum())
        for a, cat in group_codes.items():
            ci, cj = cat.codes[i], cat.codes[j]
            same = (ci == cj) & (ci >= 0)
            within[a] += np.bincount(ci[same], v[same], len(cat.categories))
    for a, cat in group_codes.items():
        pairs.update({(a, str(g)): float(t) for g, t in zip(cat.categories, within[a])})
    return row, pairs


def _miscalibration(arrivals: pd.DataFrame, consumed: pd.DataFrame, shown: pd.DataFrame, genres: pd.Series,
                    k: int) -> pd.DataFrame:
    """Steck's C_KL of each round's list against the user's history at that round (the items the
    user arrived with plus those accepted in earlier rounds), in one call of the audit's own
    function: each (round, user) becomes one pseudo-user key."""
    rounds = np.sort(shown["round"].unique())
    hist = pd.concat([arrivals[["round", "user_id", "item_id"]], consumed.assign(round=consumed["round"] + 1)],
                     ignore_index=True)
    span = int(max(shown["user_id"].max(), hist["user_id"].max() if len(hist) else 0)) + 1
    per_round = [hist[hist["round"] <= r].assign(user_id=lambda f, r=r: r * span + f["user_id"]) for r in rounds]
    lists = shown.assign(user_id=shown["round"] * span + shown["user_id"])
    m = miscalibration_per_user(pd.concat(per_round, ignore_index=True), lists[["user_id", "item_id", "rank"]],
                                genres, k=k)
    key = m.index.to_numpy()
    return pd.DataFrame({"round": key // span, "user_id": key % span, "miscalibration": m.to_numpy()})


def run_metrics(run: Run, popularity: pd.Series, genres: pd.Series, catalogue: np.ndarray, groups: pd.DataFrame,
                decay: float) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(per-user long frame: round, user_id, metric, value; population long frame: round, attribute,
    group, metric, value) for one run. `groups`: user_id plus one column per sensitive attribute."""
    s = run.shown
    k = int(s["rank"].max())
    w = attention_weights(k, decay)
    s = s.assign(w=w[s["rank"].to_numpy() - 1], acc_u=np.where(s["accepted"], s["utility"], 0.0),
                 pop=s["item_id"].map(popularity).fillna(0.0).to_numpy(float))
    s["wu"] = s["w"] * s["utility"]
    g = s.groupby(["round", "user_id"], sort=True)
    sums = g[["wu", "w", "acc_u"]].sum()
    wide = pd.DataFrame({
        "utility_shown": sums["wu"] / sums["w"], "utility_accepted": sums["acc_u"],
        "accepted": g["accepted"].sum().astype(float), "arp": g["pop"].mean()}).reset_index()
    wide["utility_cum"] = wide.groupby("user_id")["utility_accepted"].cumsum()
    acc = s[s["accepted"]]
    if s["score"].notna().any():
        new = acc.assign(e=(acc["score"] - acc["rating"]).abs()).groupby(["round", "user_id"])["e"].mean()
        wide = wide.merge(new.rename("mae_new").reset_index(), on=["round", "user_id"], how="left")
    if len(run.heldout):
        h = run.heldout.assign(e=(run.heldout["y_pred"] - run.heldout["y_true"]).abs())
        wide = wide.merge(h.groupby(["round", "user_id"])["e"].mean().rename("mae_heldout").reset_index(),
                          on=["round", "user_id"], how="left")
    consumed_all = acc[["round", "user_id", "item_id"]]
    mis = _miscalibration(run.arrivals, consumed_all, s, genres, k)
    jac, pop_rows = [], []
    group_cols = [c for c in groups.columns if c != "user_id"]
    gtab = groups.set_index("user_id")
    catalogue = np.asarray(catalogue)
    s = s.assign(code=np.searchsorted(catalogue, s["item_id"].to_numpy()), e=1.0 / np.log2(1.0 + s["rank"]))
    s = s[catalogue[np.minimum(s["code"], len(catalogue) - 1)] == s["item_id"]]   # catalogue items only
    for r, lists in s.groupby("round", sort=True):
        users = np.unique(lists["user_id"].to_numpy())
        labels = gtab.reindex(users)
        row, pair_sums = _jaccard_sums(consumed_all[consumed_all["round"] <= r], users, labels[group_cols])
        n = len(users)
        per = row / max(n - 1, 1) if n > 1 else np.full(n, np.nan)
        jac.append(pd.DataFrame({"round": r, "user_id": users, "jaccard": per}))
        scopes = [("all", "all", np.ones(n, dtype=bool))]
        for a in group_cols:
            for grp in sorted(labels[a].dropna().unique(), key=str):
                scopes.append((a, str(grp), (labels[a] == grp).to_numpy()))
        row_user = np.searchsorted(users, lists["user_id"].to_numpy())
        codes, e = lists["code"].to_numpy(), lists["e"].to_numpy()
        for a, grp, mask in scopes:
            inside = mask[row_user]
            exposure = np.bincount(codes[inside], e[inside], len(catalogue))
            m = int(mask.sum())
            pair_mean = pair_sums[(a, grp)] / (m * (m - 1)) if m > 1 else np.nan
            for metric, value in (("coverage", float(np.mean(exposure > 0))), ("exposure_gini", gini(exposure)),
                                  ("jaccard_population", pair_mean)):
                pop_rows.append({"round": r, "attribute": a, "group": grp, "metric": metric, "value": value})
    wide = wide.merge(mis, on=["round", "user_id"], how="left").merge(pd.concat(jac), on=["round", "user_id"], how="left")
    per_user = wide.melt(id_vars=["round", "user_id"], var_name="metric", value_name="value").dropna(subset=["value"])
    return per_user.assign(**_key(run)), pd.DataFrame(pop_rows).assign(**_key(run))


def collect(runs: Iterable[Run], popularity: pd.Series, genres: pd.Series, catalogue: np.ndarray,
            groups: pd.DataFrame, decay: float) -> tuple[pd.DataFrame, pd.DataFrame]:
    """All runs' per-user and population frames; adds homogenisation relative to the oracle arm."""
    pu, pop = zip(*(run_metrics(r, popularity, genres, catalogue, groups, decay) for r in runs))
    per_user, population = pd.concat(pu, ignore_index=True), pd.concat(pop, ignore_index=True)
    jp = population[population["metric"] == "jaccard_population"]
    ref = jp[jp["policy"] == "oracle"][["oracle", "seed", "round", "attribute", "group", "value"]]
    rel = jp.merge(ref.rename(columns={"value": "ref"}), on=["oracle", "seed", "round", "attribute", "group"])
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = rel.assign(metric="homogenisation", value=np.where(rel["ref"] > 0, rel["value"] / rel["ref"], np.nan))
    population = pd.concat([population, rel.drop(columns="ref")], ignore_index=True)
    return per_user, population


# ------------------------------------------------------------------------------------- summaries
ARM = ["oracle", "model", "policy"]


def _seed_averaged(per_user: pd.DataFrame) -> pd.DataFrame:
    return per_user.groupby([*ARM, "round", "metric", "user_id"], sort=True)["value"].mean().reset_index()


def curves(per_user: pd.DataFrame, population: pd.DataFrame, groups: pd.DataFrame) -> list[dict]:
    """Per round mean and 95% interval, overall and per group (kind `curve`)."""
    recs = []
    avg = _seed_averaged(per_user)
    labelled = _label(avg, groups)
    for (arm, r, metric, a, grp), f in _iter_scopes(labelled):
        ti = t_interval(f["value"].to_numpy())
        recs.append({"kind": "curve", **dict(zip(ARM, arm)), "round": int(r), "attribute": a, "group": grp,
                     "metric": metric, "mean": ti["mean"], "ci_low": ti["ci_low"], "ci_high": ti["ci_high"],
                     "n": ti["n"], "interval": "t over users of seed-averaged values"})
    for key, f in population.groupby([*ARM, "round", "attribute", "group", "metric"], sort=True):
        ti = t_interval(f["value"].to_numpy())
        recs.append({"kind": "curve", **dict(zip(ARM, key[:3])), "round": int(key[3]), "attribute": key[4],
                     "group": key[5], "metric": key[6], "mean": ti["mean"], "ci_low": ti["ci_low"],
                     "ci_high": ti["ci_high"], "n": ti["n"], "interval": "t over seeds"})
    return recs


def _label(avg: pd.DataFrame, groups: pd.DataFrame) -> pd.DataFrame:
    """Seed-averaged per-user values, once overall (attribute 'all') and once per attribute's group."""
    long = groups.melt(id_vars="user_id", var_name="attribute", value_name="group").dropna(subset=["group"])
    long["group"] = long["group"].astype(str)
    per_group = avg.merge(long, on="user_id", how="inner")
    return pd.concat([avg.assign(attribute="all", group="all"), per_group], ignore_index=True)


def _iter_scopes(labelled: pd.DataFrame):
    for key, f in labelled.groupby([*ARM, "round", "metric", "attribute", "group"], sort=True):
        yield (key[:3], key[3], key[4], key[5], key[6]), f


def _welch(a: np.ndarray, b: np.ndarray) -> dict:
    res = st.ttest_ind(a, b, equal_var=False)
    ci = res.confidence_interval(LEVEL)
    return {"diff": float(np.mean(a) - np.mean(b)), "ci_low": float(ci.low), "ci_high": float(ci.high),
            "p_value": float(res.pvalue), "n_group": int(len(a)), "n_rest": int(len(b)), "test": "welch_t"}


def _bh(records: list[dict]) -> list[dict]:
    p = np.array([r["p_value"] for r in records], dtype=float)
    ok = np.isfinite(p)
    adj = np.full(len(p), np.nan)
    if ok.any():
        adj[ok] = st.false_discovery_control(p[ok], method="bh")
    for r, q in zip(records, adj):
        r.update(p_adjusted=float(q), adjustment="benjamini-hochberg")
    return records


def _group_tests(values: pd.DataFrame, groups: pd.DataFrame, min_size: int) -> Iterable[tuple[str, str, dict]]:
    """(attribute, group, Welch result of group vs the rest) for one set of per-user values."""
    v = values.set_index("user_id")["value"]
    indexed = groups.set_index("user_id").reindex(v.index)
    for a in indexed.columns:
        lab = indexed[a]
        for grp in sorted(lab.dropna().unique(), key=str):
            inside = (lab == grp).to_numpy()
            outside = lab.notna().to_numpy() & ~inside
            if inside.sum() >= min_size and outside.sum() >= min_size:
                yield a, str(grp), _welch(v.to_numpy()[inside], v.to_numpy()[outside])


def gaps(per_user: pd.DataFrame, groups: pd.DataFrame, min_size: int, metrics: Sequence[str] = GAP_METRICS) -> list[dict]:
    """Group minus rest, per round (kind `gap`)."""
    avg = _seed_averaged(per_user[per_user["metric"].isin(metrics)])
    recs = []
    for (o, m, p, r, metric), f in avg.groupby([*ARM, "round", "metric"], sort=True):
        for a, grp, res in _group_tests(f, groups, min_size):
            recs.append({"kind": "gap", "oracle": o, "model": m, "policy": p, "round": int(r), "metric": metric,
                         "attribute": a, "group": grp, **res})
    return _bh(recs)


def gap_growth(per_user: pd.DataFrame, groups: pd.DataFrame, min_size: int, rounds: int,
               metrics: Sequence[str] = GAP_METRICS) -> list[dict]:
    """Change of each group's gap from round 0 to round R (kind `gap_growth`), tested on each
    user's own change (users present at round 0), so the comparison is paired within user.

    `widening_ci_high`: the upper 95% bound of the growth in the direction that widens the round-0
    gap (growth's ci_high when the round-0 gap is >= 0, else -ci_low): what a "no wider than at
    round 0 plus a margin" gate compares with its margin.
    """
    f = per_user[per_user["metric"].isin(metrics) & per_user["round"].isin([0, rounds])]
    wide = f.pivot_table(index=[*KEYS, "metric", "user_id"], columns="round", values="value").dropna()
    if rounds == 0 or wide.empty:
        return []
    wide = wide.assign(change=wide[rounds] - wide[0]).reset_index()
    change = wide.groupby([*ARM, "metric", "user_id"])["change"].mean().rename("value").reset_index()
    start = wide.groupby([*ARM, "metric", "user_id"])[0].mean().rename("value").reset_index()
    recs = []
    for (o, m, p, metric), fch in change.groupby([*ARM, "metric"], sort=True):
        f0 = start[(start.oracle == o) & (start.model == m) & (start.policy == p) & (start.metric == metric)]
        base = {(a, g): res for a, g, res in _group_tests(f0, groups, min_size)}
        for a, grp, res in _group_tests(fch, groups, min_size):
            g0 = base[(a, grp)]["diff"]
            widen = res["ci_high"] if g0 >= 0 else -res["ci_low"]
            recs.append({"kind": "gap_growth", "oracle": o, "model": m, "policy": p, "metric": metric,
                         "attribute": a, "group": grp, "from_round": 0, "to_round": int(rounds),
                         "gap_start": g0, "gap_end": g0 + res["diff"], "growth": res["diff"],
                         "ci_low": res["ci_low"], "ci_high": res["ci_high"], "widening_ci_high": widen,
                         "p_value": res["p_value"], "n_group": res["n_group"], "n_rest": res["n_rest"],
                         "test": "welch_t on per-user change"})
    return _bh(recs)


def exploration(per_user: pd.DataFrame, population: pd.DataFrame, rounds: int,
                exploring: Sequence[str] = ("epsilon_greedy", "ucb")) -> list[dict]:
    """What each exploring policy costs and buys against greedy, per oracle and model (kind
    `exploration`): paired differences (exploring minus greedy) with 95% t intervals, over users
    (seed-averaged) for per-user metrics and over seeds for population metrics. `cost` is the
    utility of the shown lists in the early rounds (0 and 1); the rest are at round R."""
    early = sorted({0, min(1, rounds)})
    asks = [("utility_shown", early, per_user), ("utility_cum", [rounds], per_user),
            ("mae_heldout", [rounds], per_user), ("jaccard", [rounds], per_user),
            ("coverage", [rounds], population), ("homogenisation", [rounds], population)]
    recs = []
    for metric, rnds, frame in asks:
        f = frame[(frame["metric"] == metric) & frame["round"].isin(rnds)]
        if "attribute" in f:
            f = f[f["attribute"] == "all"]
        unit = "user_id" if frame is per_user else "seed"
        vals = f.groupby([*ARM, unit])["value"].mean().rename("value").reset_index()
        for (o, m), fm in vals.groupby(["oracle", "model"], sort=True):
            piv = fm.pivot_table(index=unit, columns="policy", values="value")
            if "greedy" not in piv:
                continue
            for p in [x for x in exploring if x in piv]:
                d = (piv[p] - piv["greedy"]).dropna().to_numpy()
                ti = t_interval(d)
                recs.append({"kind": "exploration", "oracle": o, "model": m, "policy": p, "metric": metric,
                             "rounds": [int(x) for x in rnds], "diff": ti["mean"], "ci_low": ti["ci_low"],
                             "ci_high": ti["ci_high"], "n": ti["n"], "unit": unit.replace("user_id", "user"),
                             "policy_mean": float(piv[p].mean()), "greedy_mean": float(piv["greedy"].mean())})
    return recs


def _verdict(lo: float, hi: float) -> str:
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return "undetermined"
    return "up" if lo > 0 else "down" if hi < 0 else "no evidence"


def oracle_sensitivity(records: Sequence[dict], oracles: Sequence[str]) -> list[dict]:
    """For every gap-growth and exploration finding, the conclusion under each oracle (`up`, `down`
    or `no evidence` from its 95% interval) and whether they agree (kind `oracle_sensitivity`)."""
    if len(oracles) < 2:
        return []
    by: dict[tuple, dict[str, dict]] = {}
    for r in records:
        if r["kind"] in ("gap_growth", "exploration"):
            key = (r["kind"], r["model"], r["policy"], r["metric"], r.get("attribute", "all"), r.get("group", "all"))
            by.setdefault(key, {})[r["oracle"]] = r
    out = []
    for (kind, m, p, metric, a, g), per in sorted(by.items()):
        if not all(o in per for o in oracles):
            continue
        field = "growth" if kind == "gap_growth" else "diff"
        verdicts = {o: _verdict(per[o]["ci_low"], per[o]["ci_high"]) for o in oracles}
        out.append({"kind": "oracle_sensitivity", "finding": kind, "model": m, "policy": p, "metric": metric,
                    "attribute": a, "group": g, **{f"{field}_{o}": per[o][field] for o in oracles},
                    **{f"verdict_{o}": v for o, v in verdicts.items()}, "agree": len(set(verdicts.values())) == 1})
    return out


def long_records(per_user: pd.DataFrame, population: pd.DataFrame, groups: pd.DataFrame,
                 scenario: str) -> pd.DataFrame:
    """Per-seed round means in results/metrics_long.parquet's columns; `perturbation` is
    `feedback:<policy>:<oracle>@round<r>` (the robustness stage's `<name>:<qualifier>@<level>`)."""
    lab = _label(per_user, groups)
    means = lab.groupby([*KEYS, "round", "attribute", "group", "metric"], sort=True)["value"].mean().reset_index()
    both = pd.concat([means, population], ignore_index=True)
    return pd.DataFrame({
        "model": both["model"].to_numpy(), "seed": both["seed"].astype("int64").to_numpy(), "scenario": scenario,
        "perturbation": [f"feedback:{p}:{o}@round{int(r)}" for p, o, r in zip(both["policy"], both["oracle"], both["round"])],
        "attribute": both["attribute"].astype(str).to_numpy(), "group": both["group"].astype(str).to_numpy(),
        "metric": both["metric"].to_numpy(), "value": both["value"].astype(float).to_numpy()})


_PICK_KEYS = ("kind", "oracle", "model", "policy", "round", "attribute", "group", "metric")


def _pick(index: Mapping[tuple, dict], **where) -> dict | None:
    return index.get(tuple(where.get(k) for k in _PICK_KEYS))


def headline(records: Sequence[dict], models: Sequence[str], policies_: Sequence[str], attribute: str,
             group: str, rounds: int) -> list[dict]:
    """Round 0 and round R, per oracle, model and policy: utility of the shown lists,
    homogenisation, coverage and `group`'s utility gap (each with its 95% interval)."""
    out = []
    oracles = sorted({r["oracle"] for r in records if "oracle" in r})
    index: dict[tuple, dict] = {}
    for rec in records:
        if rec["kind"] in ("curve", "gap"):
            index.setdefault(tuple(rec.get(k) for k in _PICK_KEYS), rec)
    for o in oracles:
        for m in models:
            for p in policies_:
                row = {"oracle": o, "model": m, "policy": p, "attribute": attribute, "group": group}
                for r in sorted({0, rounds}):
                    for metric in ("utility_shown", "homogenisation", "coverage"):
                        c = _pick(index, kind="curve", oracle=o, model=m, policy=p, round=r, attribute="all",
                                  group="all", metric=metric)
                        if c:
                            row[f"{metric}@round{r}"] = [c["mean"], c["ci_low"], c["ci_high"]]
                    g = _pick(index, kind="gap", oracle=o, model=m, policy=p, round=r, attribute=attribute,
                              group=group, metric="utility_shown")
                    if g:
                        row[f"utility_gap@round{r}"] = [g["diff"], g["ci_low"], g["ci_high"]]
                out.append(row)
    return out


def audit_records(per_user: pd.DataFrame, population: pd.DataFrame, groups: pd.DataFrame, *, min_size: int,
                  rounds: int, oracles: Sequence[str]) -> list[dict]:
    """Every record of metrics/feedback.json's `records` list (kinds curve, gap, gap_growth,
    exploration, oracle_sensitivity)."""
    recs = curves(per_user, population, groups) + gaps(per_user, groups, min_size)
    recs += gap_growth(per_user, groups, min_size, rounds) + exploration(per_user, population, rounds)
    return recs + oracle_sensitivity(recs, oracles)
