"""The report's model card states facts from their source: each model class's own description, and
the prepared data's metadata (data/prepared/meta.json), for every model in params.yaml `models`."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest
import yaml
from markupsafe import escape

import audit.report
from audit.report import ReportError, build_context, render_report
from metarec.models import classic, ensemble, registry
from tests.fixtures_metrics import write_fixture_project

REPO = Path(__file__).resolve().parent.parent
PARAMS_MODELS = yaml.safe_load((REPO / "params.yaml").read_text())["models"]


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    root = write_fixture_project(tmp_path_factory.mktemp("card"))
    # a data source unlike the fixture's constants, so the card can only have read it from meta.json
    meta_path = root / "data" / "prepared" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta.update(source="csv", counts={"ratings": 12345, "users": 321, "items": 77})
    meta["spec"].update(rating_min=0.5, rating_max=10.0,
                        user_attributes=[{"name": "gender"}, {"name": "region"}],
                        item_features=[{"name": "genres"}, {"name": "price"}])
    meta["provenance"]["files"] = {"interactions": {"path": "in/ratings.csv", "sha256": "ab" * 32}}
    meta_path.write_text(json.dumps(meta))
    return root


def _card(root: Path, focal: str) -> tuple[dict, str]:
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["models"] = list(PARAMS_MODELS)
    params["report"] = {"focal_model": focal}
    ctx = build_context(root, params)
    return ctx, render_report(ctx)


@pytest.mark.parametrize("focal", PARAMS_MODELS)
def test_model_card_describes_every_model_from_its_class(project, focal):
    ctx, page = _card(project, focal)
    details = dict((k, v) for k, v in ctx["model_card"]["details"])
    assert details["Model"] == focal
    assert details["Type"] == registry.model_class(focal).description
    others = [m for m in PARAMS_MODELS if m != focal]
    assert details["Compared against"] == ", ".join(others)
    for m in others:
        assert details[f"Compared model: {m}"] == registry.model_class(m).description
    for m in PARAMS_MODELS:
        assert str(escape(registry.model_class(m).description)) in page


def test_model_card_data_comes_from_the_prepared_metadata(project):
    ctx, page = _card(project, PARAMS_MODELS[0])
    card = ctx["model_card"]
    assert card["training_data"][0] == ("csv: 12345 ratings by 321 users on 77 items; rated 0.5 to 10; "
                                        "user attributes gender, region; item features genres, price.")
    assert card["intended_use"][0].startswith("Predicting ratings on the 0.5 to 10 scale ")
    assert " on csv, and auditing " in card["intended_use"][0]
    assert ctx["data"]["files"] == [{"name": "interactions", "sha256": "ab" * 32}]
    assert str(escape(card["training_data"][0])) in page
    # the fixture's params still say movielens-100k: the card must not have taken the source from there
    assert "movielens" not in " ".join(card["training_data"] + card["intended_use"])


def test_descriptions_live_in_the_classes_only():
    source = inspect.getsource(audit.report)
    for name in registry.NAMES:
        assert registry.model_class(name).description not in source
    assert "MODEL_DESCRIPTIONS" not in source


def test_descriptions_match_what_the_code_does(project):
    # the support-set ensemble is made of its own small item-feature learners, not of MeLU models
    ens = registry.model_class("ensemble")
    assert ens is ensemble.SupportSetEnsemble and "MeLU" not in ens.description
    assert "not meta-learned" in ens.description
    # `mean` predicts the global mean of the training ratings, not each item's mean
    assert registry.model_class("mean") is classic.GlobalMean
    assert "global mean" in classic.GlobalMean.description and "item's mean" not in classic.GlobalMean.description


def test_an_unregistered_model_is_an_error_not_a_made_up_description(project):
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["models"] = ["melu", "mystery"]
    params["report"] = {"focal_model": "melu"}
    with pytest.raises(ReportError, match="cannot describe model 'mystery' in the model card: unknown model"):
        build_context(project, params)
