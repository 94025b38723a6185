"""Every arm of the feedback experiment: for each oracle and seed, the reference arms once and each
audited model under each model policy, loaded through the model registry (public interface only).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np

from metarec.data.schema import RatingData
from metarec.errors import ConfigError
from metarec.feedback import policies
from metarec.feedback.choice import ChoiceModel
from metarec.feedback.loop import LoopConfig, SimulationLog, SimUser, simulate
from metarec.feedback.oracle import Oracle, fit_oracle
from metarec.models.base import Recommender
from metarec.seeding import rng


@dataclass(frozen=True)
class Arm:
    oracle: str
    seed: int
    model: str          # "reference" for the model-free arms
    policy: str


@dataclass(frozen=True)
class Experiment:
    oracles: tuple[str, ...]
    seeds: tuple[int, ...]
    models: tuple[str, ...]
    policies: tuple[str, ...]
    loop: LoopConfig
    temperature: float
    attention_decay: float
    oracle_rank: int
    seed: int
    max_users: int | None = None    # simulate a seeded simple random sample of this many users (None: all)

    @classmethod
    def from_params(cls, p: Mapping, trained_seeds: Sequence[int], trained_models: Sequence[str]) -> "Experiment":
        cap = p.get("max_users")
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 2):
            raise ConfigError(f"params.yaml feedback.max_users is {cap!r}; expected null (every user) or an "
                              f"integer >= 2")
        exp = cls(tuple(p["oracles"]), tuple(int(s) for s in p["seeds"]), tuple(p["models"]), tuple(p["policies"]),
                  LoopConfig.from_params(p), float(p.get("acceptance_temperature", 0.5)),
                  float(p.get("attention_decay", 0.8)), int(p.get("oracle_rank", 16)), int(p.get("seed", 0)), cap)
        for name, values, allowed in (("seeds", exp.seeds, trained_seeds), ("models", exp.models, trained_models),
                                      ("policies", exp.policies, policies.MODEL_POLICIES + policies.REFERENCE_POLICIES)):
            missing = [v for v in values if v not in allowed]
            if missing:
                raise ConfigError(f"params.yaml feedback.{name}: {missing} not among {list(allowed)} "
                                  f"(models and seeds must be trained by the train stage)")
        if "oracle" not in exp.policies:
            raise ConfigError("params.yaml feedback.policies must include 'oracle': homogenisation is relative to it")
        return exp

    def sample_population(self, population: Sequence[SimUser]) -> list[SimUser]:
        """The users to simulate: everyone, or a seeded simple random sample of `max_users` of them in
        their original order.

        Why a cap: every round scores each simulated user against the whole catalogue, so the stage
        grows with users x items (33x from MovieLens-1M to -10M). A meta-learner's lists depend on
        each user's own history only, so for its arms a simple random sample keeps per-user means
        unbiased and their t intervals over users valid, and pairwise Jaccard means unbiased (not
        their intervals: users' Jaccard values share pairs).
        Users do interact in two places, which then see only the simulated users: the popularity
        arm's acceptance counts and a classic model's joint refit. Coverage and exposure Gini are
        unions and concentrations over the simulated lists: with a cap they describe a population
        of `max_users` users, comparable across data sizes but not with an uncapped run."""
        if self.max_users is None or len(population) <= self.max_users:
            return list(population)
        picked = np.sort(rng(self.seed, "feedback-population").choice(len(population), self.max_users, replace=False))
        return [population[i] for i in picked]

    def choice(self, data: RatingData) -> ChoiceModel:
        return ChoiceModel(center=float(data.ratings["rating"].mean()), temperature=self.temperature,
                           attention_decay=self.attention_decay)

    def fit_oracles(self, data: RatingData, users: np.ndarray) -> dict[str, Oracle]:
        return {o: fit_oracle(o, data, self.seed, self.oracle_rank, only_users=users) for o in self.oracles}

    def arms(self) -> list[Arm]:
        out = []
        for s in self.seeds:
            for m in self.models:
                out += [Arm(o, s, m, p) for o in self.oracles for p in self.policies if p in policies.MODEL_POLICIES]
            out += [Arm(o, s, "reference", p) for o in self.oracles for p in self.policies
                    if p in policies.REFERENCE_POLICIES]
        return out


def run_all(exp: Experiment, population: Sequence[SimUser], catalogue: np.ndarray, oracles: Mapping[str, Oracle],
            choice: ChoiceModel, popularity: np.ndarray, load_model: Callable[[str, int], Recommender],
            acceptance: Mapping[int, float] | None = None) -> Iterator[tuple[Arm, SimulationLog]]:
    """Simulate every arm; each model is loaded once per seed and its predictions for a given
    history are shared by every policy and oracle of that seed (loop.simulate's cache)."""
    loaded: dict[tuple[str, int], Recommender] = {}
    caches: dict[tuple[str, int], dict] = {}
    for arm in exp.arms():
        model = None
        if arm.model != "reference":
            model = loaded.get((arm.model, arm.seed))
            if model is None:
                loaded.clear()
                caches.clear()
                model = loaded[(arm.model, arm.seed)] = load_model(arm.model, arm.seed)
        yield arm, simulate(arm.policy, population, catalogue, oracles[arm.oracle], choice, exp.loop, arm.seed,
                            model=model, popularity=popularity, acceptance=acceptance,
                            cache=caches.setdefault((arm.model, arm.seed), {}))
