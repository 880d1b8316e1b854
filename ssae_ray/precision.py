"""Which precision the matmuls of this process run in: bf16 where the hardware does it fast, fp32
otherwise, detected here and never assumed.

bf16 is used for the bulk matmuls only (LM forwards under autocast, the retriever, the SAE step's
six matmuls); master weights, Adam state, losses, TERM weights, metrics and log-softmax / CE stay
fp32 (see `training/losses.py`, `models.ce_from_logits`). On a CPU without native bf16 (no
AVX512-BF16 / AMX) PyTorch emulates bf16 matmuls, which are tens of times slower than fp32: such
a machine keeps fp32. `auto` therefore asks two questions: does the backend report native bf16,
and is a bf16 matmul of the SAE step's shape measurably faster than fp32 here (a 0.1 s probe, once
per process). `fp32` forces fp32 everywhere (exact comparisons); `bf16` forces bf16 (slow where it
is emulated, with a warning).

The environment variable `SSAE_RAY_AUTO_PRECISION` (`bf16` or `fp32`) makes `auto` resolve to that
precision whatever the hardware: the test suite runs its bf16 paths with it on CPUs that only
emulate bf16 (`SSAE_RAY_AUTO_PRECISION=bf16 make test`), and a user can keep `auto` presets on fp32
without editing them. Ray workers inherit it from the environment the cluster was started with.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import time
from collections.abc import Iterator
from typing import NamedTuple

import torch

log = logging.getLogger("ssae_ray")

CHOICES = ("auto", "fp32", "bf16")
AUTO_ENV = "SSAE_RAY_AUTO_PRECISION"
"""Environment variable: what `auto` resolves to regardless of the hardware (`bf16` or `fp32`)."""
MIN_SPEEDUP = 1.3
"""`auto` takes bf16 on a CPU only when its bf16 matmul is at least this much faster than fp32."""


class PrecisionError(ValueError):
    """A precision setting that is not one of `CHOICES`."""


class Precision(NamedTuple):
    name: str
    """`fp32` or `bf16`: what the matmuls run in."""
    reason: str
    """One line: why this one was chosen (logged once)."""

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.name == "bf16" else torch.float32

    @property
    def bf16(self) -> bool:
        return self.name == "bf16"


class Bf16Support(NamedTuple):
    native: bool
    """The backend reports native bf16 matmuls (CUDA: compute capability >= 8; CPU: oneDNN bf16,
    i.e. AVX512-BF16 or AMX)."""
    speedup: float | None
    """bf16 / fp32 matmul throughput measured by the probe (None: not measured)."""
    detail: str


def cpu_capability() -> str:
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except Exception:  # older torch
        return "unknown"


def _native_bf16(device: torch.device) -> bool:
    if device.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:
        return False


def _matmul_speedup(device: torch.device, n: int = 1024, k: int = 576, m: int = 2304) -> float:
    """bf16 over fp32 throughput of an [n, k] x [k, m] matmul (the SAE step's encoder shape)."""

    def rate(dtype: torch.dtype) -> float:
        a = torch.randn(n, k, device=device, dtype=dtype)
        b = torch.randn(k, m, device=device, dtype=dtype)
        a @ b  # warm-up
        best = float("inf")
        for _ in range(3):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            a @ b
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            best = min(best, time.perf_counter() - t0)
        return 1.0 / max(best, 1e-9)

    return rate(torch.bfloat16) / rate(torch.float32)


@functools.lru_cache(maxsize=8)
def bf16_support(device_type: str = "cpu") -> Bf16Support:
    """Native bf16 on this device, and (on CPU) how much faster it is; cached per process."""
    device = torch.device(device_type)
    native = _native_bf16(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device) if torch.cuda.is_available() else "no CUDA"
        return Bf16Support(native, None, f"{name} {'supports' if native else 'has no'} bf16")
    cap = cpu_capability()
    if not native:
        return Bf16Support(False, None, f"CPU ({cap}) has no native bf16 (no AVX512-BF16 / AMX)")
    speedup = _matmul_speedup(device)
    return Bf16Support(True, speedup, f"CPU ({cap}) bf16 matmul {speedup:.1f}x fp32")


def auto_override() -> str | None:
    """`SSAE_RAY_AUTO_PRECISION` when set (`bf16` or `fp32`), else None."""
    value = os.environ.get(AUTO_ENV, "").strip().lower()
    if not value:
        return None
    if value not in ("fp32", "bf16"):
        raise PrecisionError(f"{AUTO_ENV} must be fp32 or bf16 (or unset), got {value!r}")
    return value


def resolve(setting: str, device: torch.device | str = "cpu") -> Precision:
    """The precision for `setting` (`auto`, `fp32`, `bf16`) on `device`."""
    if setting not in CHOICES:
        raise PrecisionError(f"precision must be one of {', '.join(CHOICES)}, got {setting!r}")
    device = torch.device(device)
    if setting == "fp32":
        return Precision("fp32", "forced by the config (precision=fp32)")
    forced = auto_override() if setting == "auto" else None
    if forced == "fp32":
        return Precision("fp32", f"{AUTO_ENV}=fp32")
    sup = bf16_support(device.type)
    if forced == "bf16":
        how = "native" if sup.native else "emulated, slow"
        return Precision("bf16", f"{AUTO_ENV}=bf16 ({sup.detail}; {how})")
    if setting == "bf16":
        if not sup.native:
            log.warning("precision=bf16 forced although %s: bf16 is emulated and slow here", sup.detail)
        return Precision("bf16", f"forced by the config ({sup.detail})")
    if not sup.native:
        return Precision("fp32", sup.detail)
    if sup.speedup is not None and sup.speedup < MIN_SPEEDUP:
        return Precision("fp32", f"{sup.detail}: below the {MIN_SPEEDUP}x that bf16 must win by")
    return Precision("bf16", sup.detail)


def key_part(setting: str, device: torch.device | str = "cpu") -> tuple[str, ...]:
    """What a stage key adds for the precision: nothing for fp32 (keys from before precision
    existed stay valid), `("bf16",)` when the work runs in bf16."""
    return ("bf16",) if resolve(setting, device).bf16 else ()


def setting_key_part(setting: str) -> tuple[str, ...]:
    """What a stage key adds for the precision *setting*, the same on every process: nothing for
    fp32, `("bf16",)` for bf16, `("auto",)` for auto. `key_part` resolves `auto` on the calling
    process (fp32 on a CPU driver, bf16 in a GPU task), so a key planned on the driver would never
    match the one its GPU task builds; stages whose work may run elsewhere key on the setting and
    record the precision they resolved in their manifest."""
    if setting not in CHOICES:
        raise PrecisionError(f"precision must be one of {', '.join(CHOICES)}, got {setting!r}")
    return () if setting == "fp32" else (setting,)


_logged: set[tuple[str, str, str]] = set()


def choose(setting: str, device: torch.device | str, what: str) -> Precision:
    """`resolve`, logging one line per (what, device, choice) in this process."""
    p = resolve(setting, device)
    key = (what, str(device), p.name)
    if key not in _logged:
        _logged.add(key)
        log.info("precision for %s on %s: %s (%s)", what, device, p.name, p.reason)
    return p


@contextlib.contextmanager
def autocast(p: Precision, device: torch.device | str) -> Iterator[None]:
    """bf16 autocast for the block when `p` is bf16 (matmuls and linears in bf16, reductions,
    norms and softmax in fp32 as autocast keeps them); a no-op for fp32."""
    device = torch.device(device)
    if not p.bf16:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
        yield


@contextlib.contextmanager
def fp32(device: torch.device | str) -> Iterator[None]:
    """Leave any enclosing autocast: the block runs in the tensors' own dtype (SAEs inside a
    spliced bf16 forward stay fp32)."""
    with torch.autocast(device_type=torch.device(device).type, enabled=False):
        yield
