"""Models from outside the package: a team's class (with or without fit, save, load), an entry
point, and every way a bad entry stops the stage with one sentence naming the model."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from metarec.errors import ConfigError
from metarec.models import registry
from metarec.models.external import ExternalModel
from tests.helpers_tiny import make_tiny


@pytest.fixture(scope="module")
def tiny():
    return make_tiny(seed=5)


def _defn(cls: str, **params) -> dict:
    return {"class": f"tests.team_models:{cls}", "params": params}


def test_pretrained_model_is_audited_as_is(tiny, tmp_path: Path) -> None:
    tasks = tiny.val.tasks()
    m = registry.build("shipped", _defn("Pretrained", base=3.0), seed=4)
    assert m.pretrained and m.fit(tiny.train, tiny.val) is m
    want = [np.clip(3.0 + 0.01 * (t.candidates % 7), 1, 5) for t in tasks]
    got = m.predict(tasks)
    assert all(np.array_equal(g, w) for g, w in zip(got, want))
    m.save(tmp_path / "m")
    again = registry.load("shipped", tmp_path / "m")
    assert all(np.array_equal(g, w) for g, w in zip(again.predict(tasks), want))
    # every seed evaluates the same model
    other = registry.build("shipped", _defn("Pretrained", base=3.0), seed=9)
    assert all(np.array_equal(a, b) for a, b in zip(other.predict(tasks), got))


@pytest.mark.parametrize("cls", ["ItemMeans", "SavedItemMeans"])
def test_fitted_model_reloads_to_the_same_predictions(tiny, tmp_path: Path, cls: str) -> None:
    tasks = tiny.val.tasks()
    m = registry.build("team", _defn(cls, shrink=1.0), seed=0).fit(tiny.train, tiny.val)
    m.save(tmp_path / "m")
    back = registry.load("team", tmp_path / "m", train=tiny.train)
    assert (tmp_path / "m" / "model" / "m.json").exists() == (cls == "SavedItemMeans")
    for a, b in zip(m.predict(tasks), back.predict(tasks)):
        np.testing.assert_array_equal(a, b)
    # the item means are those of the training ratings, shrunk to the mean (an independent check)
    f = tiny.train.frame
    item = int(f["item_id"].iloc[0])
    r = f.loc[f["item_id"] == item, "rating"]
    assert m.inner.means_[item] == pytest.approx((r.sum() + f["rating"].mean()) / (len(r) + 1.0))


def test_seed_is_passed_when_the_constructor_takes_it() -> None:
    assert registry.build("team", _defn("ItemMeans"), seed=7).inner.seed == 7


def test_description_comes_from_the_class_or_the_definition() -> None:
    assert registry.describe("team", _defn("ItemMeans")) == (
        "tests.team_models:ItemMeans: fit learns item means from the training ratings; no save/load "
        "(refitted when needed).")
    assert registry.describe("team", {**_defn("ItemMeans"), "description": "Our v7 ranker."}) == "Our v7 ranker."
    assert "served over HTTP at http://127.0.0.1:9/score" in registry.describe("prod", {"endpoint": "http://127.0.0.1:9/score"})


@pytest.mark.parametrize("cls, message", [
    ("WrongLength", "model 'team': predict returned shape ({n},) for user {u}; expected ({m},), one score per candidate"),
    ("Missing", "model 'team': predict returned {k} results for {t} tasks; expected a list with one array per task"),
    ("NaNs", "model 'team': predict returned NaN or infinite ratings for user {u}"),
    ("OffScale", "model 'team': predict returned ratings outside the rating scale [1, 5] for user {u} (min 9.5, max 9.5)"),
])
def test_bad_predictions_stop_with_the_model_named(tiny, cls: str, message: str) -> None:
    tasks = tiny.val.tasks()[:3]
    m = registry.build("team", _defn(cls), seed=0)
    m.rating_scale = (1.0, 5.0)
    with pytest.raises(ConfigError) as err:
        m.predict(tasks)
    t = tasks[0]
    assert str(err.value) == message.format(n=len(t.candidates) - 1, m=len(t.candidates), u=t.user_id, k=2, t=3)


@pytest.mark.parametrize("definition, message", [
    ({"class": "no_such_pkg.models:X"}, "model 'team': cannot import 'no_such_pkg.models' (No module named 'no_such_pkg'); is its package installed?"),
    ({"class": "tests.team_models"}, "model 'team': class 'tests.team_models' is not of the form 'package.module:Class'"),
    ({"class": "tests.team_models:Nope"}, "model 'team': 'tests.team_models' has no 'Nope'"),
    ({"class": "tests.team_models:NoPredict"}, "model 'team': tests.team_models:NoPredict has no predict(tasks) method"),
    ({"class": "tests.team_models:ItemMeans", "params": {"depth": 3}},
     "model 'team': tests.team_models:ItemMeans(depth, seed) failed: ItemMeans.__init__() got an unexpected keyword argument 'depth'"),
    ({"class": "tests.team_models:ItemMeans", "endpoint": "http://x"}, "model 'team': a custom model names exactly one of 'class' or 'endpoint'"),
    ({"endpoint": "http://x", "retry": 3}, "model 'team': unknown endpoint option(s) ['retry']; expected some of ['batch_size', 'timeout', 'retries', 'backoff']"),
])
def test_bad_definitions_stop_with_the_model_named(definition: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        registry.build("team", definition, seed=0)
    assert str(err.value) == message


def test_a_builtin_name_cannot_be_redefined() -> None:
    with pytest.raises(ConfigError, match="params.yaml model_params.svd: 'svd' is a built-in model"):
        registry.build("svd", {"class": "tests.team_models:Pretrained"}, seed=0)


def test_entry_point_names_a_model(tmp_path: Path, monkeypatch, tiny) -> None:
    dist = tmp_path / "team_recs-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: team-recs\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[metarec_audit.models]\nitem_means = tests.team_models:ItemMeans\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert registry.entry_points()["item_means"] == "tests.team_models:ItemMeans"
    m = registry.build("item_means", {"shrink": 3.0}, seed=0)
    assert isinstance(m, ExternalModel) and m.inner.shrink == 3.0
    assert registry.known("item_means", None) and not registry.known("nobody", None)


def test_a_pretrained_model_is_asked_with_the_owners_text_ids(tmp_path: Path) -> None:
    import pandas as pd

    from metarec.data.ids import IdMap
    from metarec.tasks import Task
    from tests.team_models import Echo

    users = IdMap.build(pd.Series(["u-a", "u-b"], dtype="string"))
    items = IdMap.build(pd.Series(["sku-1", "sku-2", "sku-3"], dtype="string"))
    m = registry.build("shipped", _defn("Echo"), seed=0)
    m.original_ids = {"user_id": users, "item_id": items}
    task = Task(user_id=1, user_attrs={}, support_items=np.array([0]), support_ratings=np.array([4.0], np.float32),
                candidates=np.array([1, 2]))
    m.predict([task])
    assert Echo.seen == [("u-b", ["sku-1"], ["sku-2", "sku-3"])]
    m.save(tmp_path / "m")
    registry.load("shipped", tmp_path / "m").predict([task])
    assert Echo.seen == [("u-b", ["sku-1"], ["sku-2", "sku-3"])]
