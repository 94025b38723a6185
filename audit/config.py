"""The declared schema of the whole params.yaml, and the checks that need params and data together.

Why here: the `prepare` stage and `metarec-audit data` must catch every configuration error before
anything is written, with one sentence naming the field and what was expected. The metarec
sections (data, tasks, features) are declared in metarec/config.py; this module adds the audit
sections, the cross-references between sections (the meta-learner is an audited model, the
determinism check's run exists, gates name metrics files a stage writes) and the data-level checks
that depend on params (every split keeps a user under tasks.min_ratings, small sensitive groups).
Gate semantics stay in audit/gate.py; its validator is called, not repeated.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from importlib.metadata import entry_points
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, field_validator, model_validator

from audit.gate import GATE_FILES
from metarec.config import DataConfig, FeaturesConfig, OpenSection, Section, TasksConfig, validated
from metarec.data.schema import RatingData
from metarec.errors import ConfigError, MetarecError

ENTRY_POINT_GROUP = "metarec_audit.models"
Scenario = Literal["warm", "user_cold", "item_cold", "user_item_cold"]
Share = Annotated[float, Field(ge=0, le=1)]
Positive = Annotated[int, Field(ge=1)]
# Metrics files a gate may read when no dvc.yaml is at hand (metarec-audit data on a lone params file).
DEFAULT_METRICS = GATE_FILES


def builtin_models() -> tuple[str, ...]:
    """Built-in model names plus those registered under the `metarec_audit.models` entry points."""
    from metarec.models.registry import NAMES

    return tuple(NAMES) + tuple(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))


class SampleConfig(Section):
    """`evaluation.sample` (audit.sampling): null keys evaluate everyone."""

    half_width: Annotated[float, Field(gt=0)] | None = None   # target 95% half-width of each group's mean MAE
    max_per_group: Positive | None = None


class EvaluationConfig(OpenSection):
    like_threshold: float
    ndcg_k: list[Positive] = [1, 3, 5]
    catalogue_k: Positive
    bootstrap: Positive
    permutations: Positive
    alpha: Annotated[float, Field(gt=0, lt=1)]
    seed: int = 0
    sample: SampleConfig | None = None


class StrataConfig(OpenSection):
    attributes: list[str] | None = None
    intersections: list[list[str]] | None = None   # null: the first two sensitive attributes
    min_group_size: Positive = 10


class FairnessConfig(OpenSection):
    models: list[str] = []
    counterfactual_models: list[str] = []
    counterfactual_scenarios: list[Scenario] = []


class AttributeNoiseConfig(OpenSection):
    attribute: str | None = None      # null: the first sensitive attribute (audit.robustness)
    levels: list[Share]


class DemographicShiftConfig(OpenSection):
    attribute: str | None = None      # null: the first sensitive attribute
    mix: dict[str, Annotated[float, Field(ge=0)]] | None = None   # null: an equal share of the groups


class ShillingConfig(OpenSection):
    models: list[str] = []
    strategies: list[Literal["random", "average", "bandwagon"]] = []
    fractions: list[Annotated[float, Field(gt=0, lt=1)]] = []
    n_targets: Positive = 5
    filler_size: Positive = 30


class RobustnessConfig(OpenSection):
    seed: int
    models: list[str] = []
    scenarios: list[Scenario] = []
    support_size: list[Positive] = []
    rating_noise: list[Share] = []
    attribute_noise: AttributeNoiseConfig | None = None
    demographic_shift: DemographicShiftConfig | None = None
    shilling: ShillingConfig | None = None


class DeterminismConfig(OpenSection):
    model: str
    seed: int


class SigningConfig(OpenSection):
    key_path: str = "keys/signing.key"


class ComputeConfig(OpenSection):
    """Where jobs run (metarec.compute.ComputeConfig reads the same keys); never a DVC param."""

    address: str | None = None
    workers: Positive | None = None
    backend: Literal["auto", "ray", "serial"] = "auto"
    cell_cpus: Positive = 1


class Params(OpenSection):
    """The whole params.yaml. Sections other stages add pass through (their owners check them)."""

    data: DataConfig
    tasks: TasksConfig
    features: FeaturesConfig = FeaturesConfig()
    seeds: Annotated[list[int], Field(min_length=1)]
    models: Annotated[list[str], Field(min_length=1)]
    meta_learner: str
    model_params: dict[str, dict[str, Any] | None] = {}
    evaluation: EvaluationConfig
    strata: StrataConfig
    fairness: FairnessConfig
    robustness: RobustnessConfig
    determinism: DeterminismConfig
    signing: SigningConfig = SigningConfig()
    compute: ComputeConfig | None = None
    baseline: str | dict[str, Any] | None = None
    gates: list[Any]

    @field_validator("seeds", "models")
    @classmethod
    def _distinct(cls, v: list[Any], info: Any) -> list[Any]:
        twice = [x for i, x in enumerate(v) if x in v[:i]]
        if twice:
            what = ("seed {0}", "distinct integers") if info.field_name == "seeds" else ("model {0!r}", "each model once")
            raise ValueError(f"lists {what[0].format(twice[0])} twice; expected {what[1]}")
        return v

    @model_validator(mode="after")
    def _references(self) -> "Params":
        from metarec.models.registry import EXTERNAL_KEYS

        audited = list(self.models)
        for name in audited:
            own = any(k in (self.model_params.get(name) or {}) for k in EXTERNAL_KEYS)
            if not own and name not in builtin_models():
                raise ValueError(f"models names unknown model {name!r}; expected one of "
                                 f"{', '.join(builtin_models())}, or model_params.{name} with class or endpoint")
            if name not in self.model_params:
                raise ValueError(f"model_params has no entry for model {name!r}; expected one per name in models "
                                 f"({{}} for its defaults, or class/endpoint for a model of your own)")
        known = set(builtin_models()) | set(audited)
        if self.meta_learner not in audited:
            raise ValueError(f"meta_learner is {self.meta_learner!r}, which is not in models "
                             f"({', '.join(audited)}); expected one of the audited models")
        lists = {"fairness.models": self.fairness.models,
                 "fairness.counterfactual_models": self.fairness.counterfactual_models,
                 "robustness.models": self.robustness.models,
                 "robustness.shilling.models": self.robustness.shilling.models if self.robustness.shilling else []}
        for where, names in lists.items():
            for name in names:
                if name not in known:
                    raise ValueError(f"{where} names unknown model {name!r}; expected one of "
                                     f"{', '.join(sorted(known))}")
        if self.determinism.model not in audited:
            raise ValueError(f"determinism.model is {self.determinism.model!r}, which is not in models "
                             f"({', '.join(audited)}); expected a model the pipeline trains")
        sample = self.evaluation.sample
        if sample and sample.max_per_group is not None and sample.max_per_group < self.strata.min_group_size:
            raise ValueError(f"evaluation.sample.max_per_group is {sample.max_per_group}, below strata.min_group_size "
                             f"({self.strata.min_group_size}); expected at least that floor (no group is sampled "
                             f"below it)")
        for where, seed in (("determinism", self.determinism.seed), ("robustness", self.robustness.seed)):
            if seed not in self.seeds:
                raise ValueError(f"{where}.seed is {seed}, which is not in seeds {self.seeds}; expected a "
                                 f"seed the pipeline trains")
        return self


def metrics_files(workdir: Path) -> tuple[str, ...]:
    """Stems of the gateable metrics files (audit.gate.GATE_FILES) that a stage of workdir/dvc.yaml
    writes: a gate on the feedback file needs the feedback stage."""
    from audit.gate import GATE_FILES

    path = workdir / "dvc.yaml"
    if not path.is_file():
        return DEFAULT_METRICS
    stages = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("stages", {})
    found = set()
    for name, stage in stages.items():
        if name == "gate" or not isinstance(stage, dict):
            continue
        for key in ("metrics", "outs"):
            for entry in stage.get(key) or []:
                for out in (entry if isinstance(entry, dict) else {entry: None}):
                    if str(out).startswith("metrics/") and str(out).endswith(".json"):
                        found.add(str(out)[len("metrics/"):-len(".json")])
    return tuple(sorted(found & set(GATE_FILES))) or DEFAULT_METRICS


def check_gates(params: dict, workdir: Path) -> None:
    """audit.gate's own shape check, then: every gate reads a metrics file that a stage writes."""
    from audit.gate import validate_gates

    files = metrics_files(workdir)
    for i, gate in enumerate(validate_gates(params)):
        stem = gate["file"].removesuffix(".json")
        if stem not in files:
            raise ConfigError(f"params.yaml: gates[{i}] ({gate['name']!r}) reads file {gate['file']!r}, which no "
                              f"pipeline stage writes; expected one of {', '.join(files)}")


def validate_params(params: Any, workdir: str | Path = ".") -> Params:
    """The whole params.yaml against its schema; a ConfigError with one sentence on the first problem."""
    if not isinstance(params, dict):
        raise ConfigError("params.yaml: the file does not hold a mapping of sections; expected data, tasks, "
                          "seeds, models and the audit sections")
    cfg = validated(Params, params)
    check_gates(params, Path(workdir))
    if params.get("feedback"):   # the feedback stage's own reading of its section, here at prepare
        from metarec.feedback.experiment import Experiment

        Experiment.from_params(params["feedback"], params["seeds"], params["models"])
    return cfg


def check_data(cfg: Params, data: RatingData, params: dict[str, Any], log: Callable[[str], None] = print) -> None:
    """The checks that need both params and data: raise on what would fail later, warn on the rest.

    - every split that has candidate users keeps one under tasks.min_ratings (users lost are logged);
    - strata, intersections and the perturbed attributes resolve against this data's schema (the
      planners of audit.strata and audit.robustness, which the later stages use too);
    - sensitive groups smaller than strata.min_group_size are a warning with their sizes.
    """
    from audit.robustness import plan_attribute_perturbations
    from audit.strata import plan_strata
    from metarec.data.validate import group_labels
    from metarec.splits import SplitConfig, check_coverage, coverage, coverage_lines

    strata = plan_strata(params.get("strata"), data.spec)   # names first: a typo beats a count
    plan_attribute_perturbations(params.get("robustness"), data, min_size=strata.min_group_size)
    split_cfg = SplitConfig(**cfg.tasks.model_dump())
    cov = coverage(data, split_cfg)
    check_coverage(cov, split_cfg)
    for line in coverage_lines(cov, split_cfg):
        log(f"tasks: {line}")
    floor = cfg.strata.min_group_size
    for name in data.spec.sensitive:
        counts = group_labels(data.users, data.spec, name).dropna().astype(str).value_counts().sort_index()
        small = counts[counts < floor]
        if len(small):
            sizes = ", ".join(f"{g} ({int(n)} user{'s' if n != 1 else ''})" for g, n in small.items())
            log(f"warning: sensitive attribute {name!r} has groups smaller than strata.min_group_size "
                f"({floor}): {sizes}")


def load_checked(params: Any, workdir: str | Path = ".", log: Callable[[str], None] = print
                 ) -> tuple[Params, RatingData]:
    """One validation pass: params schema, then the data (metarec.data.load), then both together."""
    from metarec.data.load import load_dataset

    cfg = validate_params(params, workdir)
    data = load_dataset(params["data"], workdir=workdir, log=log)
    check_data(cfg, data, params, log=log)
    return cfg, data


def check_command(params_path: str) -> int:
    """`metarec-audit data`: the prepare stage's checks without writing; 0, or 2 with one sentence."""
    from metarec.data.load import summary

    path = Path(params_path)
    try:
        try:
            params = yaml.safe_load(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read the params file ({exc.strerror or exc})") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
        _, data = load_checked(params, path.parent, log=lambda msg: print(msg, file=sys.stderr))
    except MetarecError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    for line in summary(data):
        print(line)
    return 0

