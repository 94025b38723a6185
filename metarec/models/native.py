"""The compiled local update (`gram_step.c`): built on first use with the system C compiler, cached.

Why: on CPUs the batched closed form (`gram.py`) spends most of a meta-batch outside its products,
in elementwise passes and kernel launches over padded blocks; the C kernel runs each task on its
own rows with the elementwise work fused into the step (benchmarks/meta_train.py prints both).
It covers the configuration MeLU trains and predicts with (two hidden layers, a one-unit output,
every layer adapted, the first in Gram form, hidden widths multiples of 16, supports a prefix of
each row); everything else, and any machine without a C compiler, keeps the batched form, which is
the same function.

The library is compiled with `-march=native`, so the cache key holds the compiler, the CPU model
and the source's hash; it lives in $METAREC_CACHE_DIR, else $XDG_CACHE_HOME/metarec, else
~/.cache/metarec, and is written under a temporary name and renamed, so concurrent first uses
(DVC's parallel stages, pytest-xdist) cannot load a half-written file. METAREC_NATIVE=0 turns
the kernel off (the tests use it to compare both forms).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

SOURCE = Path(__file__).with_name("gram_step.c")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-std=gnu11")

_I, _F, _P = ctypes.c_int, ctypes.c_float, ctypes.c_void_p
_SIGNATURES = {
    # B, S, H0, H1, steps, lr, threads, then 20 arrays (gram_step.c)
    "metarec_gram_local_update": [_I] * 5 + [_F, _I] + [_P] * 20,
    # B, S, S16, H0, H1, steps, lr, threads, then 16 arrays
    "metarec_gram_local_update_reverse": [_I] * 6 + [_F, _I] + [_P] * 16,
}

_lock = threading.Lock()
_state: dict[str, object] = {}


def enabled() -> bool:
    """Whether the kernel may be used (METAREC_NATIVE is not 0/false/no/off)."""
    return os.environ.get("METAREC_NATIVE", "1").strip().lower() not in ("0", "false", "no", "off")


def _cache_dir() -> Path:
    if os.environ.get("METAREC_CACHE_DIR"):
        return Path(os.environ["METAREC_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "metarec"


def _cpu_model() -> str:
    """The CPU's model and instruction-set flags (the first core's): what `-march=native` sees."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    first = {}
    for line in lines:
        key = line.split(":", 1)[0].strip()
        if key in ("model name", "flags", "Features", "CPU part") and key not in first:
            first[key] = line
    return "\n".join(first.values()) or platform.processor()


def _build(compiler: list[str]) -> Path:
    """Compile the kernel unless a build for this compiler, CPU and source is cached; its path.
    `compiler`: the command, possibly with arguments (`CC="ccache gcc"`)."""
    version = subprocess.run([*compiler, "--version"], capture_output=True, text=True, errors="replace",
                             check=True).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), " ".join(FLAGS), version, _cpu_model(),
                                    platform.machine()]).encode()).hexdigest()[:16]
    out = _cache_dir() / f"gram_step-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, suffix=".so.tmp")
    os.close(fd)
    try:
        proc = subprocess.run([*compiler, *FLAGS, "-o", tmp, str(SOURCE)], capture_output=True, text=True,
                              errors="replace")
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(compiler)} failed on {SOURCE.name}: {proc.stderr.strip()[:2000]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def library() -> ctypes.CDLL | None:
    """The loaded kernel, or None (turned off, or it cannot be built or loaded here: warned once,
    the batched form runs)."""
    if not enabled():
        return None
    with _lock:
        if "lib" not in _state:
            cc = os.environ.get("CC", "").strip()
            compiler = shlex.split(cc) if cc else [c for c in (shutil.which("cc") or shutil.which("gcc"),) if c]
            lib = None
            try:
                if not compiler:
                    raise RuntimeError("no C compiler (cc, gcc or $CC) on PATH")
                path = _build(compiler)
                lib = ctypes.CDLL(str(path))
                for name, argtypes in _SIGNATURES.items():
                    getattr(lib, name).restype = ctypes.c_int
                    getattr(lib, name).argtypes = argtypes
                _state["status"] = f"compiled ({path.name}, {' '.join(compiler)})"
            except Exception as err:  # noqa: BLE001 - whatever fails here, the batched form still works
                warnings.warn(f"metarec: the compiled local update is unavailable ({err}); "
                              "using the batched form (same function, slower)", RuntimeWarning, stacklevel=2)
                lib = None
                _state["status"] = f"batched form (the kernel is unavailable: {err})"
            _state["lib"] = lib
        return _state["lib"]  # type: ignore[return-value]


def status() -> str:
    """Which form runs MeLU's local update in this process, for the environment fingerprint: the
    two agree to float32 rounding, not bit for bit."""
    if not enabled():
        return "batched form (METAREC_NATIVE turns the kernel off)"
    library()
    return str(_state["status"])


def handles(hidden: Sequence[int]) -> bool:
    """Whether the kernel is available for a network with these hidden widths: two hidden layers,
    each a multiple of 16 wide (whole 16-float vectors)."""
    return len(hidden) == 2 and all(int(h) % 16 == 0 for h in hidden) and library() is not None


def supports(W: Sequence[Tensor], xs: Tensor, ms: Tensor) -> bool:
    """Whether the kernel computes this block: the kernel is available, two hidden layers, a
    one-unit output, widths that are multiples of 16, float32 CPU tensors, every task's real
    support rows first, and no torch.func transform active."""
    if len(W) != 3 or W[2].shape[0] != 1 or not handles((W[0].shape[0], W[1].shape[0])):
        return False
    if xs.dtype != torch.float32 or any(w.dtype != torch.float32 for w in W):
        return False
    if xs.device.type != "cpu" or any(w.device.type != "cpu" for w in W) or xs.shape[1] == 0:
        return False                                   # (no support rows at all: nothing to compute)
    if torch._C._are_functorch_transforms_active():    # wrapped tensors: no raw memory to hand over
        return False
    counts = ms.sum(1)
    return bool((ms == (torch.arange(ms.shape[1]) < counts[:, None])).all())


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _call(name: str, *args) -> None:
    """Call a kernel entry point with exactly its declared arguments (ctypes would pass extra
    ones through unchecked, as C ints)."""
    lib = library()
    assert lib is not None, f"native.{name} needs the compiled kernel (check native.library())"
    if len(args) != len(_SIGNATURES[name]):
        raise TypeError(f"{name} takes {len(_SIGNATURES[name])} arguments, got {len(args)}")
    if getattr(lib, name)(*args) != 0:
        raise MemoryError("metarec: the compiled local update could not allocate its scratch memory")


def local_update(zs: Tensor, k_ss: Tensor, ys: Tensor, ms: Tensor, W: list[Tensor], b: list[Tensor], lr: float,
                 steps: int, save: bool) -> tuple[list[Tensor], list[Tensor], Tensor, list[Tensor]]:
    """The support loop of `gram.gram_adapt_predict` for every task of a block, without autograd.

    zs [B, S, H0] (support pre-activations of layer 0), k_ss [B, S, S], ys [B, S], ms [B, S];
    W, b: the shared dense layers. Returns (per-task W_1, W_2 [B, 1, H1], per-task b_1, b_2 [B, 1],
    acc = lr * sum of layer 0's deltas [B, S, H0], and with `save` the state of every step for
    `local_update_reverse`: seven [steps, B, ...] arrays zs, a_1, e_0, e_1, e_2, W_1, W_2, each
    written on the tasks' real rows only)."""
    B, S, H0 = zs.shape
    H1 = W[1].shape[0]
    f32 = dict(dtype=torch.float32)
    zs = zs.detach().contiguous()
    if not save:                                       # first order updates it in place
        zs = zs.clone()
    k_ss, ys = k_ss.detach().contiguous(), ys.detach().to(torch.float32).contiguous()
    w1, b1 = W[1].detach().contiguous(), b[1].detach().contiguous()
    w2, b2 = W[2].detach().reshape(H1).contiguous(), b[2].detach().reshape(1).contiguous()
    counts = ms.sum(1).to(torch.int32).contiguous()
    W1o, b1o = torch.empty(B, H1, H0, **f32), torch.empty(B, H1, **f32)
    w2o, b2o = torch.empty(B, 1, H1, **f32), torch.empty(B, 1, **f32)
    acc = torch.zeros(B, S, H0, **f32)
    T = int(steps)
    # Only each task's real rows are written, and only those are read back (`local_update_reverse`).
    saved = ([torch.empty(T, B, S, H0, **f32), torch.empty(T, B, S, H1, **f32), torch.empty(T, B, S, H0, **f32),
              torch.empty(T, B, S, H1, **f32), torch.empty(T, B, S, 1, **f32), torch.empty(T, B, H1, H0, **f32),
              torch.empty(T, B, 1, H1, **f32)] if save else [None] * 7)
    _call("metarec_gram_local_update", B, S, H0, H1, T, float(lr), torch.get_num_threads(), _ptr(counts),
          _ptr(zs), _ptr(k_ss), _ptr(ys), _ptr(w1), _ptr(b1), _ptr(w2), _ptr(b2), _ptr(W1o), _ptr(b1o), _ptr(w2o),
          _ptr(b2o), _ptr(acc), *(_ptr(s) for s in saved))
    return [W1o, w2o], [b1o, b2o], acc, [s for s in saved if s is not None]


def local_update_reverse(saved: list[Tensor], k_ss: Tensor, counts: Tensor, g_acc: Tensor, gW: list[Tensor],
                         gb: list[Tensor], lr: float, steps: int) -> tuple[Tensor, Tensor]:
    """The reverse of `local_update(..., save=True)`, as `gram_reverse`'s per-step loop computes it.

    saved: the seven [steps, B, ...] arrays `local_update` returned; g_acc [B, S, H0]: lr times
    the adjoint of acc; gW = [W_1's, W_2's], gb = [b_1's, b_2's]: the per-task adjoints of the
    adapted weights from the query side, carried back to the initial weights in place. Returns
    the adjoints of the initial support pre-activations [B, S, H0] and of K [B, S, S]."""
    B, S, H0 = g_acc.shape
    H1 = gW[0].shape[1]
    S16 = (S + 15) // 16 * 16
    for t in (*gW, *gb, *saved, k_ss, g_acc):
        if not t.is_contiguous() or t.dtype != torch.float32:
            raise ValueError("native.local_update_reverse needs contiguous float32 arrays")
    counts32 = counts.to(torch.int32).contiguous()
    g_zs = torch.zeros(B, S, H0, dtype=torch.float32)
    g_k = torch.zeros(B, S, S16, dtype=torch.float32)
    _call("metarec_gram_local_update_reverse", B, S, S16, H0, H1, int(steps), float(lr), torch.get_num_threads(),
          _ptr(counts32), _ptr(k_ss), *(_ptr(s) for s in saved), _ptr(g_acc),
          *(_ptr(t) for t in (gW[0], gb[0], gW[1], gb[1])), _ptr(g_zs), _ptr(g_k))
    return g_zs, g_k[..., :S]
