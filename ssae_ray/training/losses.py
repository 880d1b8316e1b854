"""The SSAE objectives as pure functions: Eq. 1 per token, TERM (tilted ERM), the loss scale of
the `scaled` tilt mode, the adaptive-λ controller of appendix E, and the per-token loss with its
hand-written gradient for each architecture (ReLU/L1, JumpReLU/L0, TopK and BatchTopK/aux).

Unit-norm decoder rows are kept by projection (see `project_decoder_grad`, `normalize_decoder`),
so the L1 term is the plain ||f||_1 of Eq. 1, not a decoder-norm-weighted one.
No Ray and no SAE classes here: everything takes and returns tensors.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor


class TrainingError(ValueError):
    """Bad training input or settings: a negative λ or tilt, NaN/inf activations, a width mismatch."""


class SAEOut(NamedTuple):
    f: Tensor
    """[N, d_sae] feature activations f(x) = ReLU((x - b_dec) W_enc + b_enc)."""
    x_hat: Tensor
    """[N, d_in] reconstruction f W_dec + b_dec."""


class TokenLosses(NamedTuple):
    loss: Tensor
    """[N] per-token loss L_i = ||x_i - x_hat_i||^2 + the architecture's sparsity term (Eq. 1 for
    ReLU: lam ||f_i||_1)."""
    sse: Tensor
    """[N] ||x_i - x_hat_i||^2."""
    l1: Tensor
    """[N] the sparsity term before its coefficient: ||f_i||_1 (ReLU), L0_i (JumpReLU), the
    weighted auxiliary dead-latent loss (TopK, BatchTopK; already in `loss`)."""


def check_lam_tilt(lam: float, tilt: float) -> None:
    if not math.isfinite(lam) or lam < 0:
        raise TrainingError(f"lam (the sparsity coefficient λ) must be a finite number >= 0, got {lam}")
    if not (math.isfinite(tilt) and tilt >= 0):
        raise TrainingError(
            f"tilt must be >= 0 (0 is ERM, large values approach the max-loss objective), got {tilt}; "
            "negative tilts (min-loss) are not supported; for the max-loss limit use a large finite tilt (1e9)"
        )


def sae_forward(x: Tensor, W_enc: Tensor, b_enc: Tensor, W_dec: Tensor, b_dec: Tensor) -> SAEOut:
    """The sae-lens StandardSAE forward (`apply_b_dec_to_input=True`) on raw weights."""
    f = torch.relu(torch.addmm(b_enc, x - b_dec, W_enc))
    return SAEOut(f, torch.addmm(b_dec, f, W_dec))


def sae_loss(x: Tensor, out: SAEOut, lam: float) -> TokenLosses:
    """Eq. 1 per token: ||x - x_hat||^2 + lam ||f(x)||_1 (f >= 0 after ReLU, so ||f||_1 = sum f)."""
    sse = (x - out.x_hat).pow(2).sum(-1)
    l1 = out.f.sum(-1)
    return TokenLosses(sse + lam * l1, sse, l1)


def term_loss(losses: Tensor, tilt: float) -> Tensor:
    """TERM: (1/t) log(mean_i exp(t L_i)); exactly the mean (ERM) at t = 0.

    Written as mean(L) + (1/t) log mean exp(t (L - mean L)) and reduced in float64, so the value
    keeps its precision at small t (no cancellation of log N against t·mean L) and stays finite
    at t = 1e9 with losses in the thousands (logsumexp subtracts the max). The gradient with
    respect to L_i is softmax(t L)_i: at large t all of it goes to the worst tokens.
    """
    check_lam_tilt(0.0, tilt)
    if tilt == 0:
        return losses.mean()
    ld = losses.double()
    mean = ld.mean().detach()
    lse = torch.logsumexp(tilt * (ld - mean), dim=0) - math.log(ld.numel())
    return (mean + lse / tilt).to(losses.dtype)


def tilted_loss(losses: Tensor, tilt: float, mode: str, scale: float | None) -> Tensor:
    """TERM in the two tilt modes. `raw`: t on the losses as they are (the paper). `scaled`: t on
    L_i / s with s a running mean loss (detached), returned times s so t = 0 is still mean(L):
    s · (1/t) log mean exp(t L_i / s). One scaled tilt means the same at every hook, λ and model."""
    if mode == "raw" or tilt == 0:
        return term_loss(losses, tilt)
    if mode != "scaled":
        raise TrainingError(f"tilt_mode must be 'raw' or 'scaled', got {mode!r}")
    if scale is None or not scale > 0:
        raise TrainingError(f"the scaled tilt mode needs a positive loss scale, got {scale}")
    return term_loss(losses / scale, tilt) * scale


def term_weights(losses: Tensor, tilt: float) -> Tensor:
    """[N] the share of the gradient each token carries under TERM (softmax(t L); uniform at t = 0)."""
    if tilt == 0:
        return torch.full_like(losses, 1.0 / losses.numel())
    return torch.softmax(tilt * losses.double(), dim=0).to(losses.dtype)


@dataclass
class LossScale:
    """Running (EMA) mean loss s for the `scaled` tilt mode; initialised to the first batch's mean."""

    decay: float = 0.99
    value: float | None = None

    def update(self, mean_loss: float) -> float:
        if not math.isfinite(mean_loss):
            return self.value if self.value is not None else 1.0
        m = max(mean_loss, 1e-12)
        self.value = m if self.value is None else self.decay * self.value + (1 - self.decay) * m
        return self.value

    def state_dict(self) -> dict[str, float | None]:
        return {"decay": self.decay, "value": self.value}

    def load_state_dict(self, state: dict[str, float | None]) -> None:
        self.decay = float(state["decay"])  # type: ignore[arg-type]
        self.value = state["value"]


@dataclass
class AdaptiveLambda:
    """Appendix E: raise λ (× (1 + rate)) while L0 is above `band`, lower it (÷ (1 + rate)) below;
    hold it inside. Without a band λ stays fixed."""

    lam: float
    band: tuple[float, float] | None = None
    rate: float = 0.02

    def __post_init__(self) -> None:
        check_lam_tilt(self.lam, 0.0)
        if self.band is not None and not 0 <= self.band[0] <= self.band[1]:
            raise TrainingError(f"l0_band must be (low, high) with 0 <= low <= high, got {self.band}")
        if self.rate < 0:
            raise TrainingError(f"adapt_rate must be >= 0, got {self.rate}")

    def update(self, l0: float) -> float:
        if self.band is not None and math.isfinite(l0):
            lo, hi = self.band
            if l0 > hi:
                self.lam *= 1 + self.rate
            elif l0 < lo:
                self.lam /= 1 + self.rate
        return self.lam

    def state_dict(self) -> dict[str, object]:
        return {"lam": self.lam, "band": self.band, "rate": self.rate}

    def load_state_dict(self, state: dict[str, object]) -> None:
        self.lam = float(state["lam"])  # type: ignore[arg-type]


@torch.no_grad()
def project_decoder_grad(W_dec: Tensor) -> None:
    """Remove from W_dec.grad the component parallel to each (unit-norm) decoder row, so the step
    moves rows along the sphere; `normalize_decoder` after the step removes the rest."""
    if W_dec.grad is None:
        return
    rows = W_dec / W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
    W_dec.grad -= (W_dec.grad * rows).sum(1, keepdim=True) * rows


@torch.no_grad()
def normalize_decoder(W_dec: Tensor) -> None:
    W_dec /= W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)


class SAEStep(NamedTuple):
    losses: TokenLosses
    """Per-token losses (detached)."""
    objective: Tensor
    """The scalar objective (ERM mean or TERM) whose gradient `grads` holds."""
    grads: tuple[Tensor, ...]
    """d objective / d (W_enc, b_enc, W_dec, b_dec[, threshold])."""
    f: Tensor
    """[N, d_sae] feature activations."""
    weights: Tensor
    """[N] d objective / d L_i: 1/N for ERM, softmax(t L)_i for TERM."""


@contextlib.contextmanager
def one_thread(device: torch.device) -> Iterator[None]:
    """Run ops on [N]-sized vectors on one CPU thread: on a busy machine, waking a second OpenMP
    thread for a 4096-element exp costs ~10 ms (measured), 50x the op itself."""
    n = torch.get_num_threads()
    if device.type != "cpu" or n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _token_weights(
    loss: Tensor, objective: Callable[[Tensor], Tensor], dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """(objective value, [N, 1] g_i = d objective / d L_i): autograd on the [N] loss vector only."""
    with one_thread(loss.device), torch.enable_grad():
        leaf = loss.detach().requires_grad_()
        obj = objective(leaf)
        (g,) = torch.autograd.grad(obj, leaf)
    # weights below float32's normal range (TERM at large t) would only add denormals
    g = g.to(dtype)
    g = g.masked_fill(g.abs() < torch.finfo(g.dtype).tiny, 0.0)[:, None]
    return obj.detach(), g


def _encoder_grads(xc: Tensor, dpre: Tensor, W_enc: Tensor, db_dec: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """dW_enc, db_enc and db_dec (the decoder-side part plus the path through the encoder input
    x - b_dec: -(sum_i dpre_i) W_enc^T, a matrix-vector product). `xc` and `dpre` may be bf16 (the
    matmul dtype); the gradients come out fp32 and the sum is reduced in fp32."""
    db_enc = dpre.sum(0, dtype=W_enc.dtype)
    return (xc.T @ dpre.to(xc.dtype)).to(W_enc.dtype), db_enc, db_dec.sub_(W_enc @ db_enc)


def _affine(bias: Tensor, a: Tensor, w: Tensor) -> Tensor:
    """a @ w + bias in the bias' dtype (fp32); the matmul in a's dtype (fp32 or bf16, fp32
    accumulation either way). One fused addmm when the dtypes agree (the fp32 path)."""
    if a.dtype == bias.dtype:
        return torch.addmm(bias, a, w)
    return (a @ w).to(bias.dtype).add_(bias)


def _lo(t: Tensor, dtype: torch.dtype) -> Tensor:
    """`t` in the matmul dtype (a no-op for fp32)."""
    return t if t.dtype == dtype else t.to(dtype)


@torch.no_grad()
def sae_loss_and_grads(x: Tensor, W_enc: Tensor, b_enc: Tensor, W_dec: Tensor, b_dec: Tensor, lam: float,
                       objective: Callable[[Tensor], Tensor], mm: torch.dtype | None = None) -> SAEStep:  # fmt: skip
    """Eq. 1 per token and the exact gradient of `objective(per-token losses)` (ERM mean, TERM)
    by a hand-written backward: autograd runs only on the [N] loss vector, whose gradient g_i
    (1/N for ERM, softmax(t L)_i for TERM) weights each token. Same values as autograd through
    `sae_forward`/`sae_loss`, with fewer passes: b_dec's gradient through the encoder input is
    (sum_i dpre_i) W_enc^T, a matrix-vector product, not the [N, d] matmul autograd would form.

    `mm=torch.bfloat16` runs the five [N, *] matmuls in bf16 (fp32 accumulation) on bf16 copies
    of x - b_dec, the weights and f; the reconstruction error, per-token losses, TERM weights and
    every gradient stay fp32 (the weights passed in are the fp32 masters)."""
    mm = mm or x.dtype
    xc = x - b_dec
    xl, We, Wd = _lo(xc, mm), _lo(W_enc, mm), _lo(W_dec, mm)
    f = torch.addmm(_lo(b_enc, mm), xl, We).relu_()  # [N, d_sae] in the matmul dtype
    e = _affine(b_dec, f, Wd).sub_(x)  # x_hat - x, fp32
    sse = e.pow(2).sum(-1)
    l1 = f.sum(-1, dtype=x.dtype)
    loss = sse + lam * l1
    obj, g = _token_weights(loss, objective, x.dtype)
    de = e.mul_(2 * g)  # d obj / d x_hat
    dl = _lo(de, mm)
    dW_dec = (f.T @ dl).to(x.dtype)
    db_dec = de.sum(0)
    dpre = torch.ops.aten.threshold_backward(torch.addmm(_lo(lam * g, mm), dl, Wd.T), f, 0.0)
    dW_enc, db_enc, db_dec = _encoder_grads(xl, dpre, W_enc, db_dec)
    return SAEStep(TokenLosses(loss, sse, l1), obj, (dW_enc, db_enc, dW_dec, db_dec), f, g[:, 0])


# ---------------------------------------------------------------------------------------------
# JumpReLU (Gemma Scope): L0 through a straight-through estimator


def jumprelu(pre: Tensor, threshold: Tensor) -> Tensor:
    """f = pre * [pre > θ] (θ >= 0, so f >= 0): sae-lens' JumpReLUSAE activation."""
    return pre * (pre > threshold)


@torch.no_grad()
def jumprelu_loss_and_grads(x: Tensor, W_enc: Tensor, b_enc: Tensor, W_dec: Tensor, b_dec: Tensor,
                            threshold: Tensor, lam: float, bandwidth: float,
                            objective: Callable[[Tensor], Tensor], mm: torch.dtype | None = None) -> SAEStep:  # fmt: skip
    """Per token L_i = ||x_i - x_hat_i||^2 + lam * L0_i with f = pre [pre > θ] and L0_i = sum_j
    [pre_ij > θ_j], and the gradient of `objective(L)` w.r.t. (W_enc, b_enc, W_dec, b_dec, θ).

    The step function's derivative is the straight-through estimator of sae-lens' `jumprelu`
    training ("step" sparsity mode, DeepMind's Gemma Scope recipe, `jumprelu_ste_to_input=False`):
    with the window K(u) = [|u| < ε/2] / ε, d[pre > θ]/dθ = -K(pre - θ) and dJumpReLU/dθ =
    -θ K(pre - θ); the L0 term sends no gradient to the pre-activations. Hand-written like
    `sae_loss_and_grads`; equal to autograd through sae-lens' `JumpReLU` and `Step` functions.
    With `mm=torch.bfloat16` the decoder and backward matmuls run in bf16, but the encoder matmul
    stays fp32: the threshold's straight-through gradient counts tokens whose pre-activation lies
    within ε/2 of θ, and bf16 pre-activations (3 significant digits) moved it by 20% (measured,
    tests/test_precision.py), where the other gradients moved by under 1%."""
    mm = mm or x.dtype
    xc = x - b_dec
    xl, Wd = _lo(xc, mm), _lo(W_dec, mm)
    pre = torch.addmm(b_enc, xc, W_enc)
    gate = pre > threshold
    f = pre * gate
    fl = _lo(f, mm)
    e = _affine(b_dec, fl, Wd).sub_(x)
    sse = e.pow(2).sum(-1)
    l0 = gate.sum(-1, dtype=x.dtype)
    loss = sse + lam * l0
    obj, g = _token_weights(loss, objective, x.dtype)
    de = e.mul_(2 * g)
    dl = _lo(de, mm)
    dW_dec = (fl.T @ dl).to(x.dtype)
    db_dec = de.sum(0)
    dfeat = (dl @ Wd.T).to(x.dtype)  # d obj / d f
    window = ((pre - threshold).abs_() < bandwidth / 2).to(x.dtype)
    dthreshold = (threshold * (dfeat * window).sum(0)).add_(g[:, 0] @ window, alpha=lam).div_(-bandwidth)
    dpre = dfeat.mul_(gate)
    dW_enc, db_enc, db_dec = _encoder_grads(xl, dpre, W_enc, db_dec)
    return SAEStep(TokenLosses(loss, sse, l0), obj, (dW_enc, db_enc, dW_dec, db_dec, dthreshold), f, g[:, 0])


# ---------------------------------------------------------------------------------------------
# TopK (sparsify) and BatchTopK: k fixed, MSE plus the auxiliary dead-latent loss


def topk_acts(pre: Tensor, k: int, select: Tensor | None = None) -> Tensor:
    """Per token, the k largest pre-activations (ranked by pre * select when given: sae-lens'
    `rescale_acts_by_decoder_norm=False` ranking of a folded SAE), ReLU'd; zeros elsewhere."""
    idx = (pre if select is None else pre * select).topk(k, dim=-1, sorted=False).indices
    return torch.zeros_like(pre).scatter_(-1, idx, pre.gather(-1, idx).relu_())


def batch_topk_acts(pre: Tensor, k: float) -> Tensor:
    """BatchTopK: the int(k N) largest ReLU'd pre-activations of the whole [N, d_sae] batch, so
    k latents fire per token on average (sae-lens' `BatchTopK`)."""
    acts = pre.relu()
    flat = acts.flatten()
    n_keep = min(int(k * pre.shape[0]), flat.numel())
    top = flat.topk(n_keep, sorted=False)
    return torch.zeros_like(flat).scatter_(0, top.indices, top.values).view_as(pre)


@torch.no_grad()
def topk_loss_and_grads(x: Tensor, W_enc: Tensor, b_enc: Tensor, W_dec: Tensor, b_dec: Tensor, k: float,
                        objective: Callable[[Tensor], Tensor], batch: bool = False, select: Tensor | None = None,
                        dead: Tensor | None = None, aux_coefficient: float = 1.0,
                        mm: torch.dtype | None = None) -> SAEStep:  # fmt: skip
    """Per token L_i = ||x_i - x_hat_i||^2 + aux_i for TopK (`batch=False`, exactly k latents per
    token) or BatchTopK (`batch=True`, k per token on average over the batch), and the gradient of
    `objective(L)` w.r.t. (W_enc, b_enc, W_dec, b_dec). The selection is piecewise constant:
    gradients flow through the kept values only.

    aux_i is sae-lens' (and sparsify's) auxiliary loss: with D dead latents (`dead`, [d_sae] bool),
    the top k_aux = min(d_in / 2, D) dead pre-activations of each token reconstruct the detached
    residual x - x_hat through the decoder (no bias): aux_i = α min(D / (d_in / 2), 1)
    ||ê_i - (x_i - x_hat_i)||^2, so dead latents learn to point at what the live ones miss.
    With `mm=torch.bfloat16` the decoder and backward matmuls run in bf16; the encoder matmul stays
    fp32, as for JumpReLU: the top-k choice among near-equal bf16 pre-activations flipped latents
    and moved per-token losses by 2% on a random SAE (measured, tests/test_precision.py)."""
    mm = mm or x.dtype
    xc = x - b_dec
    xl, Wd = _lo(xc, mm), _lo(W_dec, mm)
    pre = torch.addmm(b_enc, xc, W_enc)
    f = batch_topk_acts(pre, k) if batch else topk_acts(pre, int(k), select)
    fl = _lo(f, mm)
    e = _affine(b_dec, fl, Wd).sub_(x)  # x_hat - x
    sse = e.pow(2).sum(-1)
    n_dead = int(dead.sum()) if dead is not None else 0
    aux_acts = None
    if n_dead > 0 and aux_coefficient > 0:
        # only the dead latents' columns: D / d_sae of the work of the same loss over all latents
        half = max(x.shape[1] // 2, 1)
        alpha = aux_coefficient * min(n_dead / half, 1.0)
        cols = dead.nonzero()[:, 0]  # type: ignore[union-attr]
        pre_dead = pre[:, cols]
        top = pre_dead.topk(min(half, n_dead), dim=-1, sorted=False)
        aux_acts = torch.zeros_like(pre_dead).scatter_(-1, top.indices, top.values)
        aux_mask = torch.zeros_like(pre_dead, dtype=torch.bool).scatter_(-1, top.indices, True)
        W_dead = _lo(W_dec[cols], mm)
        r = (_lo(aux_acts, mm) @ W_dead).to(x.dtype).add_(e)  # ê - (x - x_hat)
        aux = alpha * r.pow(2).sum(-1)
    else:
        aux = torch.zeros_like(sse)
    loss = sse + aux
    obj, g = _token_weights(loss, objective, x.dtype)
    de = e.mul_(2 * g)
    dl = _lo(de, mm)
    dW_dec = (fl.T @ dl).to(x.dtype)
    db_dec = de.sum(0)
    dpre = (dl @ Wd.T).to(x.dtype).mul_(f > 0)
    if aux_acts is not None:
        dr = r.mul_(2 * alpha * g)  # d obj / d ê; the residual is detached
        drl = _lo(dr, mm)
        dW_dec.index_add_(0, cols, (_lo(aux_acts, mm).T @ drl).to(x.dtype))
        dpre.index_add_(1, cols, (drl @ W_dead.T).to(x.dtype).mul_(aux_mask))
    dW_enc, db_enc, db_dec = _encoder_grads(xl, dpre, W_enc, db_dec)
    return SAEStep(TokenLosses(loss, sse, aux), obj, (dW_enc, db_enc, dW_dec, db_dec), f, g[:, 0])
