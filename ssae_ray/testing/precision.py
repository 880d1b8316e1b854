"""bf16 in tests: tolerances derived from bf16's precision, and the check that bf16 really ran.

Tests that check exactness pin `precision="fp32"`. The bf16 paths run on every CPU: the environment
variable `SSAE_RAY_AUTO_PRECISION=bf16` (`ssae_ray.precision.AUTO_ENV`, set per test by the
`auto_bf16` fixture of `tests/conftest.py`) makes `precision=auto` resolve to bf16 even where bf16 is
emulated, and their results are compared with the fp32 ones within `bf16_rtol`.

The bound. A bf16 matmul under autocast rounds its two operands and its output to bf16 and
accumulates in fp32 (the accumulation error is fp32's, negligible here). Each rounding perturbs a
tensor by a relative error uniform in [-u, u] (u = 2**-8, bf16's unit roundoff), of RMS u / sqrt(3),
independently of the others. Perturbations that reach the compared output through the rest of the
network add in quadrature, so r roundings give a relative (norm-wise) error of about
sqrt(r) * u / sqrt(3), when nothing downstream amplifies them. `bf16_rtol` allows `LAMBDA` = 4 times
that: the tails of the random-rounding model and the modest gain of the layers downstream (layer
norms renormalise; residual streams dilute a branch's error). A real bug (a wrong position, a
missing residual, bf16 weights where fp32 master weights belong) moves results by far more.
"""

from __future__ import annotations

import math

import torch

BF16_U = torch.finfo(torch.bfloat16).eps / 2
"""bf16's unit roundoff, 2**-8: round-to-nearest moves a value by at most this relative amount."""
LAMBDA = 4.0
"""How many standard deviations of the random-rounding model a bound allows."""
ROUNDINGS_PER_MATMUL = 3
"""Two operands and the output of each matmul run under bf16 autocast."""
RAN_BF16 = 64 * torch.finfo(torch.float32).eps
"""A result recomputed in fp32 (another batch shape, another kernel) differs from the fp32 one by a
few fp32 roundings (~1e-7 relative); one computed in bf16 by far more than this (measured >= 1e-4
even on cross-entropies, whose log-normaliser dilutes the logits' error): the check that bf16 ran."""


def bf16_rtol(matmuls: int) -> float:
    """The bound on the relative error of a result computed through `matmuls` chained bf16 matmuls
    (each counted where it lies on the path from the inputs to the compared tensor)."""
    r = ROUNDINGS_PER_MATMUL * max(1, matmuls)
    return LAMBDA * math.sqrt(r) * BF16_U / math.sqrt(3)


def ce_bound(hidden: torch.Tensor, grads: torch.Tensor, matmuls: int) -> float:
    """The bound on ||ce_bf16 - ce_fp32|| (per-token cross-entropies, norm over tokens) when the
    final hidden states `hidden` `[tokens, d]` (the unembedding's input) come through `matmuls` bf16
    matmuls; `grads` `[tokens, d]` are dCE_t / dh_t in fp32. To first order a token's CE moves by
    g_t . dh_t, so ||dCE|| <= max_t ||g_t|| ||dh||_F <= max_t ||g_t|| bf16_rtol(matmuls) ||h||_F
    (count the unembedding in `matmuls`: its rounding acts like an error in h). A relative bound on
    the CEs themselves would be loose: their log-normaliser dilutes the logits' error."""
    g = float(grads.detach().double().norm(dim=-1).max())
    return g * bf16_rtol(matmuls) * float(hidden.detach().double().norm())


def assert_bf16_ce_close(
    actual: torch.Tensor,
    expected: torch.Tensor,
    hidden: torch.Tensor,
    grads: torch.Tensor,
    matmuls: int,
    what: str = "",
) -> float:
    """Per-token CEs computed in bf16 within `ce_bound` of the fp32 ones (`hidden`, `grads`: the fp32
    final hidden states of the same tokens and the CEs' gradients there), and away from them by
    more than fp32 noise. Returns ||dCE|| / bound."""
    assert actual.shape == expected.shape == hidden.shape[:-1] == grads.shape[:-1], what
    diff = float((actual.double() - expected.double()).norm())
    bound = ce_bound(hidden, grads, matmuls)
    assert diff <= bound, f"{what}: ||dCE|| {diff:.2e} above the bf16 bound {bound:.2e} ({matmuls} matmuls)"
    assert rel_err(actual, expected) >= RAN_BF16, f"{what}: CE equal to fp32's: did this run in bf16?"
    return diff / bound


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected||, in float64."""
    a = actual.detach().double().cpu()
    b = expected.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def assert_bf16_close(
    actual: torch.Tensor, expected: torch.Tensor, matmuls: int, what: str = "", vs_fp32: bool = True
) -> float:
    """`actual` (a bf16 computation) within `bf16_rtol(matmuls)` of `expected`; with `vs_fp32`
    (`expected` computed in fp32) also at least `RAN_BF16` away from it, so a silent fp32 fallback
    fails. Returns the relative error."""
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    err = rel_err(actual, expected)
    bound = bf16_rtol(matmuls)
    assert err <= bound, (
        f"{what}: relative error {err:.2e} above the bf16 bound {bound:.2e} ({matmuls} matmuls)"
    )
    if vs_fp32:
        assert err >= RAN_BF16, f"{what}: relative error {err:.1e} vs fp32: did this really run in bf16?"
    return err
