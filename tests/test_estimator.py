"""One estimator contract for every model: parameters, checks in fit, one fit signature, safe persistence."""

from __future__ import annotations

import inspect
import json

import numpy as np
import pytest
from sklearn.base import clone

from metarec.errors import ConfigError
from metarec.models import registry
from metarec.models.base import Estimator
from tests.helpers_tiny import make_tiny

# small settings so that every model fits on the tiny fixture in well under a second
SMALL = {
    "melu": {"embedding_dim": 4, "hidden": (8, 8), "epochs": 2, "meta_batch_size": 8, "threads": 1},
    "finetune": {"embedding_dim": 4, "hidden": (8, 8), "epochs": 2, "batch_size": 32, "threads": 1, "steps": 2},
    "global": {"embedding_dim": 4, "hidden": (8, 8), "epochs": 2, "batch_size": 32, "threads": 1},
    "ensemble": {"n_clusters": 4, "max_epochs": 10},
    "svd": {"n_epochs": 3}, "bias": {"n_epochs": 3}, "itemknn": {"n_epochs": 3},
}

# (model, hyperparameter, bad value, the error fit must raise)
BAD = [
    ("melu", "order", "third", "melu: order must be one of ('first', 'second'), got 'third'."),
    ("melu", "local_steps", 101, "melu: local_steps must be an integer in [0, 100], got 101."),
    ("melu", "meta_batch_size", 0, "melu: meta_batch_size must be an integer >= 1, got 0."),
    ("finetune", "steps", -1, "finetune: steps must be an integer >= 0, got -1."),
    ("global", "epochs", 2.5, "global: epochs must be an integer >= 0, got 2.5."),
    ("ensemble", "holdout", 1.0, "ensemble: holdout must be a number in [0.0, 1.0), got 1.0."),
    ("ensemble", "lr", "1e-3", "ensemble: lr must be a number >= 0.0, got '1e-3'."),
    ("ensemble", "n_clusters", True, "ensemble: n_clusters must be an integer >= 1, got True."),
    ("pop", "shrinkage", -1.0, "pop: shrinkage must be >= 0, got -1.0."),
    ("itemknn", "k", 0, "itemknn: k must be >= 1 and min_k >= 0, got k=0, min_k=1."),
    ("svd", "rating_scale", (5, 1), "svd: rating_scale must be None or [min, max] with min < max, got (5, 1)."),
]


@pytest.fixture(scope="module")
def tiny():
    return make_tiny(seed=3, n_train=24, n_val=8)


@pytest.mark.parametrize("name", registry.NAMES)
def test_registry_holds_estimator_classes_that_name_and_describe_themselves(name):
    cls = registry.model_class(name)
    assert isinstance(cls, type) and issubclass(cls, Estimator)
    assert cls.name == name
    assert isinstance(cls.description, str) and len(cls.description) > 40 and not cls.description.endswith(".")
    # one fit for all: the base's, which checks the hyperparameters and takes the encoder
    assert cls.fit is Estimator.fit
    assert "get_params" not in vars(cls) and "set_params" not in vars(cls)


@pytest.mark.parametrize("name", registry.NAMES)
def test_constructor_only_stores_and_params_round_trip(name):
    cls = registry.model_class(name)
    names = cls.param_names()
    assert names == sorted(p for p in inspect.signature(cls.__init__).parameters if p != "self")
    assert "encoder" not in names and "seed" in names
    sentinels = {p: object() for p in names}
    model = cls(**sentinels)            # nothing is checked or converted here...
    assert all(model.get_params()[p] is v for p, v in sentinels.items())
    fresh = cls()
    defaults = fresh.get_params()
    assert fresh.set_params(**sentinels).get_params() == sentinels
    assert clone(cls(**defaults)).get_params() == defaults
    with pytest.raises(ValueError, match="Invalid parameter"):
        cls().set_params(no_such_parameter=1)


@pytest.mark.parametrize("name, param, value, message", BAD)
def test_fit_checks_the_hyperparameters(tiny, name, param, value, message):
    model = registry.build(name, {**SMALL.get(name, {}), param: value}, seed=0)   # ...it is checked by fit
    with pytest.raises(ConfigError) as err:
        model.fit(tiny.train, tiny.val, tiny.encoder)
    assert str(err.value) == message


def test_registry_refuses_unknown_models_and_hyperparameters():
    with pytest.raises(ConfigError, match="unknown model 'mf'; expected one of melu, ensemble, finetune"):
        registry.model_class("mf")
    with pytest.raises(ConfigError, match=r"model_params\.svd: unknown hyperparameter\(s\) \['factors'\]"):
        registry.build("svd", {"factors": 3}, seed=0)
    with pytest.raises(ConfigError, match=r"model_params\.melu: unknown hyperparameter\(s\) \['seed'\].*seeds"):
        registry.build("melu", {"seed": 3}, seed=0)
    with pytest.raises(ConfigError, match=r"unknown hyperparameter\(s\) \['encoder'\]"):
        registry.build("melu", {"encoder": None}, seed=0)


@pytest.mark.parametrize("name", ["melu", "finetune", "global", "ensemble"])
def test_feature_models_ask_for_the_encoder_in_fit(tiny, name):
    with pytest.raises(ConfigError, match=f"^{name}: fit\\(\\) needs the FeatureEncoder of the task split"):
        registry.build(name, SMALL.get(name), seed=0).fit(tiny.train, tiny.val)


@pytest.mark.parametrize("name", registry.NAMES)
def test_every_model_fits_the_same_way_and_saves_without_pickle(tiny, tmp_path, name):
    tasks = tiny.val.tasks()
    model = registry.build(name, SMALL.get(name), seed=4)
    assert model.fit(tiny.train, tiny.val, tiny.encoder) is model
    preds = model.predict(tasks)
    assert [len(p) for p in preds] == [len(t.candidates) for t in tasks]
    model.save(tmp_path)
    assert {p.suffix for p in tmp_path.iterdir()} <= {".json", ".safetensors", ".parquet"}
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model"] == name and config["params"] == model.config_params()
    assert config["params"]["seed"] == 4
    loaded = registry.load(name, tmp_path, train=tiny.train)
    assert type(loaded) is type(model) and loaded.get_params() == model.get_params()
    for a, b in zip(preds, loaded.predict(tasks)):
        assert np.array_equal(a, b)
    # a saved model of another kind is refused by name
    other = "mean" if name != "mean" else "pop"
    with pytest.raises(ConfigError, match=f"holds a '{name}' model, not '{other}'"):
        registry.load(other, tmp_path, train=tiny.train)


def test_set_params_then_fit_equals_a_fresh_constructor(tiny):
    tasks = tiny.val.tasks()
    a = registry.build("svd", {"n_epochs": 3, "n_factors": 4}, seed=1).fit(tiny.train).predict(tasks)
    reused = registry.build("svd", {"n_epochs": 7}, seed=9).fit(tiny.train)
    b = reused.set_params(n_epochs=3, n_factors=4, seed=1).fit(tiny.train).predict(tasks)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
