"""The `device` option of the torch models: exact validation, CPU results unchanged to the bit, every
tensor on the model's device, GPU runs (when there is a GPU), and the device in the fingerprint."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from metarec.errors import ConfigError
from metarec.models import registry
from metarec.models.device import batch_to, device_record, resolve_device, saved_device
from metarec.models.melu import MeLU
from tests.device_reference import CONFIGS, FINGERPRINT, REFERENCE, fingerprint, model_class, predictions
from tests.helpers_tiny import make_tiny, mixed_batch

TORCH_MODELS = ("melu", "global", "finetune", "ensemble")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="no CUDA device here (torch.cuda.is_available() is False)")


@pytest.fixture(scope="module")
def tiny():
    return make_tiny(seed=0, n_train=64, n_val=16)


@pytest.fixture(scope="module")
def reference():
    return dict(np.load(REFERENCE))


def _assert_same_as_reference(got: np.ndarray, want: np.ndarray) -> None:
    """Bitwise on the software and CPU the reference was computed on; elsewhere CPU kernels may
    round differently, so there only closeness can be asked (and the bitwise claim was checked
    where it could be)."""
    if json.loads(FINGERPRINT.read_text()) == fingerprint():
        assert np.array_equal(got, want), f"max |diff| {np.abs(got - want).max():.3g}"
    else:
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


# ------------------------------------------------------------------------------------------ validation
@pytest.mark.parametrize("name", TORCH_MODELS)
@pytest.mark.parametrize("value", ["gpu", "CUDA", 0, None])
def test_a_bad_device_is_refused_in_fit_with_one_sentence(tiny, name, value):
    model = registry.build(name, {"device": value}, 0)      # the constructor stores, fit checks
    with pytest.raises(ConfigError) as err:
        model.fit(tiny.train, None, tiny.encoder)
    assert str(err.value) == f"model_params.{name}.device: expected auto, cpu or cuda, got {value!r}"


def test_the_message_is_the_documented_sentence(tiny):
    with pytest.raises(ConfigError) as err:
        MeLU(device="gpu").fit(tiny.train, None, tiny.encoder)
    assert str(err.value) == "model_params.melu.device: expected auto, cpu or cuda, got 'gpu'"


@pytest.mark.parametrize("name", TORCH_MODELS)
def test_cuda_without_a_cuda_device_is_a_config_error(tiny, name, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError) as err:
        registry.build(name, {"device": "cuda"}, 0).fit(tiny.train, None, tiny.encoder)
    assert str(err.value) == (f"model_params.{name}.device: cuda was asked for, but no CUDA device is available "
                              f"on this machine (torch.cuda.is_available() is False); use auto or cpu")


def test_auto_is_cuda_exactly_when_cuda_is_available(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("melu", "auto") == torch.device("cpu")
    assert resolve_device("melu", "cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert resolve_device("melu", "auto") == torch.device("cuda", 1)
    assert resolve_device("melu", "cuda") == torch.device("cuda", 1)
    assert resolve_device("melu", "cpu") == torch.device("cpu")     # asked for explicitly: the CPU


def test_auto_resolves_to_the_cpu_here_and_the_model_records_it(tiny):
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device: auto resolves to it (test_cuda_* cover that)")
    model = MeLU(embedding_dim=4, hidden=(8,), epochs=1, threads=1).fit(tiny.train, None, tiny.encoder)
    assert model.device == "auto" and model.fitted_on_ == {"device": "cpu", "name": None}
    assert model.network_.device == torch.device("cpu")


# ------------------------------------------------------------------------------------------ CPU unchanged
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_cpu_results_with_device_unset_are_bitwise_the_saved_ones(name, reference):
    _assert_same_as_reference(predictions(name), reference[name])


@pytest.mark.parametrize("name", ["melu", "ensemble"])
def test_cpu_results_with_device_cpu_are_bitwise_the_saved_ones(name, reference):
    _assert_same_as_reference(predictions(name, device="cpu"), reference[name])


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_tensor_follows_the_model_device_not_torch_default(name, reference):
    """With torch's default device set to "meta" (tensors without data, which refuse to mix with CPU
    ones), a model on the CPU still trains and predicts the same numbers: no tensor anywhere in
    training or scoring is created on the default device instead of the model's. On a GPU, such a
    tensor would sit on the CPU next to CUDA ones and fail, so this is the CUDA plumbing, tested
    without a GPU."""
    with torch.device("meta"):
        got = predictions(name, device="cpu")
    _assert_same_as_reference(got, reference[name])


# ------------------------------------------------------------------------------------------ plumbing
def test_batch_to_moves_every_field_and_is_free_when_already_there(tiny):
    batch = mixed_batch(tiny)
    assert batch_to(batch, torch.device("cpu")) is batch
    moved = batch_to(batch, torch.device("meta"))
    assert {getattr(moved, f).device.type for f in moved.__dataclass_fields__} == {"meta"}
    assert [getattr(moved, f).shape for f in moved.__dataclass_fields__] == \
        [getattr(batch, f).shape for f in batch.__dataclass_fields__]


def test_a_fitted_or_loaded_network_moves_to_where_device_resolves_at_predict_time(tiny, tmp_path, monkeypatch):
    """The network follows `device` as it resolves when it is used: a model saved on one device is
    read onto the CPU and placed on the current one (here "meta", standing in for a GPU)."""
    from metarec.models import training

    model = MeLU(embedding_dim=4, hidden=(8,), epochs=1, threads=1).fit(tiny.train, None, tiny.encoder)
    model.save(tmp_path)
    loaded = MeLU.load(tmp_path)
    assert loaded.network_.device == torch.device("cpu") and loaded.fitted_on_ == model.fitted_on_
    monkeypatch.setattr(training, "resolve_device", lambda name, value: torch.device("meta"))
    for m in (model, loaded):
        net = m._placed_network()
        assert {t.device.type for t in (*net.parameters(), *net.buffers())} == {"meta"}


def test_saved_weights_are_cpu_tensors_and_config_says_where_it_was_fitted(tiny, tmp_path):
    from safetensors import safe_open

    model = registry.build("ensemble", {"n_clusters": 3, "max_epochs": 2, "device": "cpu"}, 0)
    model.fit(tiny.train, None, tiny.encoder).save(tmp_path)
    with safe_open(str(tmp_path / "weights.safetensors"), framework="pt") as fh:
        assert {fh.get_tensor(k).device.type for k in fh.keys()} == {"cpu"}
    assert saved_device(tmp_path) == {"device": "cpu", "name": None}
    assert registry.load("ensemble", tmp_path).fitted_on_ == {"device": "cpu", "name": None}


# ------------------------------------------------------------------------------------------ seeding
def test_seeding_seeds_cuda_and_keeps_ieee_float32_when_cuda_is_there(monkeypatch):
    from metarec.seeding import seed_everything

    seeded = []
    before = torch.backends.cuda.matmul.fp32_precision
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "manual_seed_all", seeded.append)
    try:
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        info = seed_everything(7, threads=torch.get_num_threads())
        assert seeded and set(seeded) == {7} and info["cuda_seeded"] is True
        assert torch.backends.cuda.matmul.fp32_precision == "ieee"
    finally:
        torch.backends.cuda.matmul.fp32_precision = before
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert seed_everything(7, threads=torch.get_num_threads())["cuda_seeded"] is False


# ------------------------------------------------------------------------------------------ fingerprint
def test_the_fingerprint_records_accelerators_and_each_torch_models_device(tiny, tmp_path, monkeypatch):
    from audit.fingerprint import accelerators, environment
    from pipelines.reproducibility import devices

    acc = accelerators()
    assert acc["cuda_available"] is torch.cuda.is_available()
    assert len(acc["devices"]) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    assert environment(tmp_path)["accelerators"] == acc
    monkeypatch.chdir(tmp_path)
    MeLU(embedding_dim=4, hidden=(8,), epochs=1, threads=1, device="cpu").fit(
        tiny.train, None, tiny.encoder).save("models/melu/seed3")
    registry.build("mean", {}, 3).fit(tiny.train, None, tiny.encoder).save("models/mean/seed3")
    got = devices({"models": ["melu", "mean", "finetune"], "seeds": [3, 4]})
    assert got == [{"model": "melu", "seed": 3, "device": "cpu", "name": None}]   # mean runs no torch
    assert device_record(torch.device("cpu")) == {"device": "cpu", "name": None}


# ------------------------------------------------------------------------------------------ on a GPU
@needs_cuda
@pytest.mark.parametrize("name", ["melu", "finetune", "ensemble"])
def test_cuda_training_is_deterministic_and_close_to_the_cpu(name, reference):
    """On a GPU: the model trains and scores there, returns CPU float64, repeats itself bit for bit,
    and lands near the CPU numbers (not on them: float32 sums are ordered differently on a GPU)."""
    a, b = predictions(name, device="cuda"), predictions(name, device="cuda")
    assert a.dtype == np.float64 and np.array_equal(a, b)
    np.testing.assert_allclose(a, reference[name], rtol=0, atol=5e-3)


@needs_cuda
def test_a_model_fitted_on_cuda_saves_cpu_tensors_and_predicts_on_the_cpu(tiny, tmp_path):
    path, params = CONFIGS["melu"]
    model = model_class(path)(**params, device="cuda").fit(tiny.train, tiny.val, tiny.encoder)
    assert model.fitted_on_["device"].startswith("cuda") and model.fitted_on_["name"]
    assert model.network_.device.type == "cuda"
    on_gpu = model.predict(tiny.val.tasks())
    model.save(tmp_path)
    loaded = MeLU.load(tmp_path).set_params(device="cpu")
    on_cpu = loaded.predict(tiny.val.tasks())
    assert loaded.network_.device == torch.device("cpu") and loaded.fitted_on_ == model.fitted_on_
    np.testing.assert_allclose(np.concatenate(on_cpu), np.concatenate(on_gpu), rtol=0, atol=1e-5)
