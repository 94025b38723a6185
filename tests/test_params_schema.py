"""params.yaml against its declared schema: each bad value is one sentence naming the field and what
was expected, from audit.config, from `metarec-audit data` and from the prepare stage (exit 2,
nothing written)."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

from audit.config import Params, metrics_files, validate_params
from metarec.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
BASE = yaml.safe_load((REPO / "params.yaml").read_text())
BYO = {"source": "csv", "interactions": "r.csv", "users": "u.csv", "items": "i.csv", "schema": {
    "sensitive": ["age"], "user_attributes": [{"name": "age", "kind": "numeric", "edges": [30, 45]}],
    "item_features": [{"name": "genres", "kind": "multilabel", "separator": "|"}]}}
MODELS = "melu, ensemble, finetune, global, mean, bias, pop, itemknn, svd"


def edited(edit: Callable[[dict], Any]) -> dict:
    params = copy.deepcopy(BASE)
    edit(params)
    return params


def byo(edit: Callable[[dict], Any]) -> Callable[[dict], Any]:
    def apply(params: dict) -> None:
        params["data"] = copy.deepcopy(BYO)
        edit(params["data"]["schema"])
    return apply


CASES = [
    ("unsorted edges", byo(lambda s: s["user_attributes"][0].update(edges=[56, 18])),
     "params.yaml: data.schema.user_attributes[0].edges is [56, 18]; expected bucket edges in strictly increasing order"),
    ("edges not a list", byo(lambda s: s["user_attributes"][0].update(edges=18)),
     "params.yaml: data.schema.user_attributes[0].edges is 18; expected a list"),
    ("empty separator", byo(lambda s: s["item_features"][0].update(separator="")),
     "params.yaml: data.schema.item_features[0].separator is ''; expected a non-empty string"),
    ("unknown kind", byo(lambda s: s["item_features"][0].update(kind="text")),
     "params.yaml: data.schema.item_features[0].kind is 'text'; expected 'categorical', 'numeric' or 'multilabel'"),
    ("labels per bucket", byo(lambda s: s["user_attributes"][0].update(labels=["young"])),
     "params.yaml: data.schema.user_attributes[0] has 1 labels for 2 edges; expected 3 labels, one per bucket"),
    ("sensitive undeclared", byo(lambda s: s.update(sensitive=["age", "race"])),
     "params.yaml: data.schema names 'race' in sensitive, which is not in user_attributes (age); expected "
     "declared user attributes"),
    ("rating range", byo(lambda s: s.update(rating_min=5, rating_max=1)),
     "params.yaml: data.schema has rating_min 5 >= rating_max 1; expected rating_min below rating_max"),
    ("attribute twice", byo(lambda s: s["user_attributes"].append({"name": "age", "kind": "categorical"})),
     "params.yaml: data.schema declares 'age' twice in user_attributes; expected each column once"),
    ("query_size text", lambda p: p["tasks"].update(query_size="ten"),
     "params.yaml: tasks.query_size is 'ten'; expected an integer"),
    ("query_size zero", lambda p: p["tasks"].update(query_size=0),
     "params.yaml: tasks.query_size is 0; expected a value greater than or equal to 1"),
    ("min_ratings vs query_size", lambda p: p["tasks"].update(min_ratings=5),
     "params.yaml: tasks has min_ratings 5 and query_size 10; expected min_ratings above query_size so every "
     "task keeps a support rating"),
    ("fraction range", lambda p: p["tasks"].update(new_user_fraction=1.5),
     "params.yaml: tasks.new_user_fraction is 1.5; expected a value less than 1"),
    ("unknown tasks key", lambda p: p["tasks"].update(min_rating=5),
     "params.yaml: tasks.min_rating is not a known setting; expected only the documented keys (check the spelling)"),
    ("seeds text", lambda p: p.update(seeds="abc"), "params.yaml: seeds is 'abc'; expected a list"),
    ("seed not an int", lambda p: p.update(seeds=[0, "1"]), "params.yaml: seeds[1] is '1'; expected an integer"),
    ("seed twice", lambda p: p.update(seeds=[0, 0]), "params.yaml: seeds lists seed 0 twice; expected distinct integers"),
    ("no seeds", lambda p: p.update(seeds=[]), "params.yaml: seeds is []; expected a list of at least 1 item"),
    ("unknown model", lambda p: p.update(models=["melu", "bogus"]),
     f"params.yaml: models names unknown model 'bogus'; expected one of {MODELS}, or model_params.bogus with "
     "class or endpoint"),
    ("model without params", lambda p: p["model_params"].pop("svd"),
     "params.yaml: model_params has no entry for model 'svd'; expected one per name in models ({} for its "
     "defaults, or class/endpoint for a model of your own)"),
    ("mapping in models", lambda p: p["models"].append({"name": "x", "class": "a:B"}),
     "params.yaml: models[9] is {'name': 'x', 'class': 'a:B'}; expected a string"),
    ("meta-learner not audited", lambda p: p.update(meta_learner="svdpp"),
     f"params.yaml: meta_learner is 'svdpp', which is not in models ({MODELS}); expected one of the audited models"),
    ("fairness model unknown", lambda p: p["fairness"].update(models=["nope"]),
     "params.yaml: fairness.models names unknown model 'nope'; expected one of bias, ensemble, finetune, global, "
     "itemknn, mean, melu, pop, svd"),
    ("determinism model not trained", lambda p: p.update(models=["mean", "bias"], meta_learner="bias"),
     "params.yaml: determinism.model is 'melu', which is not in models (mean, bias); expected a model the "
     "pipeline trains"),
    ("robustness seed not trained", lambda p: p["robustness"].update(seed=9),
     "params.yaml: robustness.seed is 9, which is not in seeds [0, 1, 2, 3, 4]; expected a seed the pipeline trains"),
    ("gate file", lambda p: p["gates"][0].update(file="fairnes"),
     "gate 'determinism_holds': file 'fairnes' is not one of the audit's metrics files (summary, fairness, "
     "robustness, reproducibility, regression, feedback)"),
    ("gate op (audit.gate's validator)", lambda p: p["gates"][0].update(op="=~"),
     "gate 'determinism_holds': op '=~' is not one of <, <=, >, >=, =="),
    ("no gates", lambda p: p.pop("gates"), "params.yaml: gates is missing; expected it to be set"),
    ("feedback seed not trained", lambda p: p["feedback"].update(seeds=[0, 7]),
     "params.yaml feedback.seeds: [7] not among [0, 1, 2, 3, 4] (models and seeds must be trained by the train "
     "stage)"),
    ("unknown source", lambda p: p["data"].update(source="sql"),
     "params.yaml: data.source is 'sql'; expected 'movielens-100k', 'csv', 'parquet' or 'synthetic'"),
    ("csv without schema", lambda p: p.update(data={"source": "csv", "interactions": "a", "users": "b", "items": "c"}),
     "params.yaml: data has no schema; expected data.schema (user_attributes, item_features, sensitive, rating_min, "
     "rating_max) when data.source is csv"),
    ("csv without users", lambda p: p.update(data={"source": "csv", "interactions": "a", "items": "c"}),
     "params.yaml: data has no users path; expected data.users to name the users csv file when data.source is csv"),
    ("alpha", lambda p: p["evaluation"].update(alpha=1.5), "params.yaml: evaluation.alpha is 1.5; expected a value less than 1"),
    ("min_group_size", lambda p: p["strata"].update(min_group_size=0),
     "params.yaml: strata.min_group_size is 0; expected a value greater than or equal to 1"),
    ("shilling strategy", lambda p: p["robustness"]["shilling"].update(strategies=["random", "sybil"]),
     "params.yaml: robustness.shilling.strategies[1] is 'sybil'; expected 'random', 'average' or 'bandwagon'"),
    ("compute workers", lambda p: p["compute"].update(workers=0),
     "params.yaml: compute.workers is 0; expected a value greater than or equal to 1"),
    ("compute backend", lambda p: p["compute"].update(backend="dask"),
     "params.yaml: compute.backend is 'dask'; expected 'auto', 'ray' or 'serial'"),
    ("duplicates policy", lambda p: p["data"].update(duplicates="first"),
     "params.yaml: data.duplicates is 'first'; expected 'error' or 'keep_latest'"),
    ("boolean flag", lambda p: p["features"].update(drop_sensitive="yes"),
     "params.yaml: features.drop_sensitive is 'yes'; expected true or false"),
    ("noise level", lambda p: p["robustness"].update(rating_noise=[0.1, 2]),
     "params.yaml: robustness.rating_noise[1] is 2; expected a value less than or equal to 1"),
    ("synthetic effect", lambda p: p["data"].update(source="synthetic", synthetic={"effects": [
        {"type": "shift", "attribute": "gender", "group": "F", "size": 1}]}),
     "params.yaml: data.synthetic.effects[0].type is 'shift'; expected 'bias' or 'noise'"),
    ("data typo", lambda p: p["data"].update(pth="x"),
     "params.yaml: data.pth is not a known setting; expected only the documented keys (check the spelling)"),
]


def test_default_params_are_valid() -> None:
    cfg = validate_params(copy.deepcopy(BASE), REPO)
    assert isinstance(cfg, Params) and cfg.tasks.query_size == 10 and cfg.seeds == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("edit,message", [(e, m) for _, e, m in CASES], ids=[c[0] for c in CASES])
def test_each_rule_has_its_sentence(edit: Callable[[dict], Any], message: str) -> None:
    with pytest.raises(Exception) as info:
        validate_params(edited(edit), REPO)
    assert str(info.value) == message
    assert info.type.__name__ in ("ConfigError", "GateInputError")


def test_sections_other_stages_add_pass_through() -> None:
    params = edited(lambda p: (p.update(later_stage={"rounds": 3}), p["evaluation"].update(new_knob=1)))
    cfg = validate_params(params, REPO)
    assert cfg.model_extra["later_stage"] == {"rounds": 3} and cfg.evaluation.model_extra == {"new_knob": 1}


def test_synthetic_schema_declares_every_generator_default() -> None:
    from metarec.config import SyntheticConfig
    from metarec.data.synthetic import DEFAULTS

    assert SyntheticConfig().model_dump() == DEFAULTS


def test_metrics_files_come_from_dvc_yaml(tmp_path: Path) -> None:
    assert metrics_files(REPO) == ("fairness", "feedback", "regression", "reproducibility", "robustness", "summary")
    (tmp_path / "dvc.yaml").write_text("stages:\n  extra:\n    cmd: x\n    metrics: [metrics/feedback.json]\n"
                                       "  gate:\n    cmd: y\n    metrics: [{metrics/gate.json: {cache: false}}]\n")
    assert metrics_files(tmp_path) == ("feedback",)


def test_not_a_mapping() -> None:
    with pytest.raises(ConfigError, match="^params.yaml: the file does not hold a mapping of sections; expected "
                                          "data, tasks, seeds, models and the audit sections$"):
        validate_params(["data"], REPO)


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_prepare_and_data_command_refuse_with_exit_2_and_write_nothing(tmp_path: Path) -> None:
    params = edited(byo(lambda s: s["user_attributes"][0].update(edges=[56, 18])))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    shutil_copy = (REPO / "dvc.yaml").read_text()
    (tmp_path / "dvc.yaml").write_text(shutil_copy)
    expected = "params.yaml: data.schema.user_attributes[0].edges is [56, 18]; expected bucket edges in strictly increasing order"
    prep = _run([sys.executable, "-m", "pipelines.prepare"], tmp_path)
    assert prep.returncode == 2 and prep.stderr.strip() == f"error: {expected}"
    assert not (tmp_path / "data").exists()
    cli = _run([sys.executable, "-m", "audit.cli", "data", "--root", str(tmp_path)], tmp_path)
    assert cli.returncode == 2 and cli.stderr.strip() == expected
