"""GlobalModel and FineTune: they learn, fine-tuning with 0 steps is the global model, vectorised
fine-tuning equals fine-tuning one task at a time, and persistence round-trips."""

from __future__ import annotations

import json

import numpy as np
import pytest

from metarec.models.training import mae
from metarec.models.transfer import FineTune, GlobalModel
from tests.helpers_tiny import make_tiny

COMMON = dict(embedding_dim=8, hidden=(16, 16), epochs=12, patience=100, batch_size=32, global_lr=3e-3,
              threads=1, seed=4)


@pytest.fixture(scope="module")
def tiny():
    return make_tiny(seed=0, n_train=64, n_val=16)


@pytest.fixture(scope="module")
def global_model(tiny):
    return GlobalModel(**COMMON).fit(tiny.train, tiny.val, tiny.encoder)


def test_global_model_beats_the_mean(tiny, global_model):
    pairs = tiny.val.tasks_with_truth()
    tasks, truth = [t for t, _ in pairs], [y for _, y in pairs]
    mean = float(tiny.train.frame["rating"].mean())
    baseline = mae([np.full(len(y), mean) for y in truth], truth)
    preds = global_model.predict(tasks)
    assert mae(preds, truth) < baseline - 0.1
    assert all(((p >= 1.0) & (p <= 5.0)).all() for p in preds)
    assert len(global_model.history_) == COMMON["epochs"]


def test_global_model_ignores_the_support_set(tiny, global_model):
    tasks = tiny.val.tasks()
    stripped = [t.replace(support_items=t.support_items[:0], support_ratings=t.support_ratings[:0]) for t in tasks]
    for a, b in zip(global_model.predict(tasks), global_model.predict(stripped)):
        assert np.array_equal(a, b)


def test_finetune_with_zero_steps_equals_global_model(tiny, global_model):
    ft = FineTune(**COMMON, steps=0).fit(tiny.train, tiny.val, tiny.encoder)
    tasks = tiny.val.tasks()
    for a, b in zip(ft.predict(tasks), global_model.predict(tasks)):
        assert np.array_equal(a, b)
    assert [h["val_loss"] for h in ft.history_] == [h["val_loss"] for h in global_model.history_]


def test_finetune_vectorised_equals_one_task_at_a_time(tiny):
    ft = FineTune(**COMMON, steps=3, lr=0.05).fit(tiny.train, None, tiny.encoder)
    tasks = tiny.val.tasks()
    together = ft.predict(tasks)
    alone = [ft.predict([t])[0] for t in tasks]
    for a, b in zip(together, alone):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
    base = GlobalModel(**COMMON).fit(tiny.train, None, tiny.encoder).predict(tasks)
    assert not all(np.allclose(a, b) for a, b in zip(together, base))


def test_finetune_save_load_round_trip(tiny, tmp_path):
    ft = FineTune(**{**COMMON, "epochs": 2}, steps=2, lr=0.02, adapt_layers=(-1,)).fit(tiny.train, tiny.val,
                                                                                         tiny.encoder)
    ft.save(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model"] == "finetune" and cfg["params"]["steps"] == 2 and cfg["params"]["adapt_layers"] == [-1]
    loaded = FineTune.load(tmp_path)
    tasks = tiny.val.tasks()
    for a, b in zip(ft.predict(tasks), loaded.predict(tasks)):
        assert np.array_equal(a, b)
    with pytest.raises(Exception):
        GlobalModel.load(tmp_path)
