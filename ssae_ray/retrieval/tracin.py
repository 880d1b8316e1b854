"""SAE-TracIn: score(z) = grad L(z) . grad L(seed), w.r.t. the SAE weights (W_enc, b_enc, W_dec, b_dec).

L is the GSAE's per-token training loss (`token_loss`: Eq. 1 for ReLU SAEs, ||x - x_hat||^2 + lam L0
for JumpReLU, ||x - x_hat||^2 for TopK / BatchTopK), averaged over a passage's valid tokens
(position 0 excluded). For one token, with x_in = x - b_dec, pre = x_in W_enc + b_enc, A the set of
latents the activation passes (pre > 0, pre > θ, or the top k), f = pre [A], x_hat = f W_dec + b_dec,
e = 2 (x_hat - x) and delta = (W_dec e + lam [ReLU]) * [A]:

    dW_enc = x_in delta^T    db_enc = delta    dW_dec = f e^T    db_dec = e - W_enc delta

Each weight gradient is an outer product, so against the seed gradient G (computed once):
    score(z) = mean_t [ x_in,t^T G_enc delta_t + f_t^T G_dec e_t + delta_t . g_benc + (e_t - W_enc delta_t) . g_bdec ]
which costs O(T d d_sae) per passage and never materialises a per-example gradient.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor


class SAEGrad(NamedTuple):
    W_enc: Tensor
    """[d_in, d_sae]"""
    b_enc: Tensor
    """[d_sae]"""
    W_dec: Tensor
    """[d_sae, d_in]"""
    b_dec: Tensor
    """[d_in]"""


class TokenFactors(NamedTuple):
    x_in: Tensor
    """[..., d_in] SAE input after subtracting b_dec."""
    f: Tensor
    """[..., d_sae] latents."""
    e: Tensor
    """[..., d_in] dL/dx_hat = 2 (x_hat - x)."""
    delta: Tensor
    """[..., d_sae] dL/dpre."""


class SAEView(NamedTuple):
    """An SAE's trainable form as the finetune sees it (`training.archs.TrainForm`: inputs c·x,
    latent j scaled by c·n_j, unit decoder rows), with leaf weights."""

    W_enc: Tensor
    b_enc: Tensor
    W_dec: Tensor
    b_dec: Tensor
    cfg: Any
    form: Any = None
    """The `TrainForm` (architecture, θ, k); None for a plain ReLU view."""


def training_view(sae: Any, c: float) -> SAEView:
    """Leaf copies of the weights in the space the finetune trains in (activation scale `c`), for
    any architecture `training.archs` imports (exactly, checked)."""
    from ssae_ray.training.archs import import_gsae

    form = import_gsae(sae, c, sae.W_dec.device)

    def leaf(t: Tensor) -> Tensor:
        return t.detach().clone().requires_grad_(True)

    return SAEView(leaf(form.W_enc), leaf(form.b_enc), leaf(form.W_dec), leaf(form.b_dec), sae.cfg, form)


def _params(sae: Any) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    if getattr(sae.cfg, "normalize_activations", "none") not in ("none", None):
        raise ValueError(
            "SAE-TracIn supports SAEs without activation normalisation (normalize_activations='none')"
        )
    return sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec


def _b_dec_in(sae: Any) -> float:
    if isinstance(sae, SAEView):
        return 1.0  # the trainable form always subtracts b_dec
    return 1.0 if getattr(sae.cfg, "apply_b_dec_to_input", True) else 0.0


def _arch(sae: Any) -> tuple[str, Tensor | None, float | None, Tensor | None]:
    """(architecture, θ, k, TopK ranking weights) of a view or a plain sae-lens SAE."""
    if isinstance(sae, SAEView):
        if sae.form is None:
            return "relu", None, None, None
        f = sae.form
        return f.arch, f.threshold, f.k, f.select
    from ssae_ray.training.archs import arch_of, batchtopk_k

    arch = arch_of(sae)
    th = sae.threshold.detach() if arch in ("jumprelu", "batchtopk") else None
    k = float(sae.cfg.k) if arch == "topk" else batchtopk_k(sae) if arch == "batchtopk" else None
    if arch == "topk" and not sae.cfg.rescale_acts_by_decoder_norm:
        return arch, th, k, 1 / sae.W_dec.detach().norm(dim=1)
    return arch, th, k, None


def _active(sae: Any, pre: Tensor) -> Tensor:
    """[..., d_sae] where the SAE's inference activation passes its pre-activation through (ReLU:
    pre > 0; JumpReLU, BatchTopK saved as JumpReLU: pre > θ; TopK: the k kept)."""
    from ssae_ray.training.losses import topk_acts

    arch, th, k, select = _arch(sae)
    if arch == "relu":
        return pre > 0
    if arch == "topk":
        flat = pre.detach().reshape(-1, pre.shape[-1])
        return (topk_acts(flat, int(k or 0), select) > 0).reshape(pre.shape)
    assert th is not None
    return (pre > th) & (pre > 0)


def token_loss(sae: Any, x: Tensor, lam: float) -> Tensor:
    """The GSAE's per-token training loss, differentiable in (W_enc, b_enc, W_dec, b_dec):
    ||x - x_hat||^2 + lam ||f||_1 (ReLU, Eq. 1), + lam L0 (JumpReLU; no gradient to these weights),
    or ||x - x_hat||^2 alone (TopK, BatchTopK: k fixes the sparsity; the aux loss is a training aid)."""
    W_enc, b_enc, W_dec, b_dec = _params(sae)
    pre = (x - _b_dec_in(sae) * b_dec) @ W_enc + b_enc
    active = _active(sae, pre)
    f = pre * active
    x_hat = f @ W_dec + b_dec
    sse = (x - x_hat).pow(2).sum(-1)
    arch = _arch(sae)[0]
    if arch == "relu":
        return sse + lam * f.abs().sum(-1)
    if arch == "jumprelu":
        return sse + lam * active.sum(-1).to(sse.dtype)
    return sse


def token_factors(sae: Any, x: Tensor, lam: float) -> TokenFactors:
    W_enc, b_enc, W_dec, b_dec = (p.detach() for p in _params(sae))
    x_in = x - _b_dec_in(sae) * b_dec
    pre = x_in @ W_enc + b_enc
    active = _active(sae, pre)
    f = pre * active
    e = 2 * (f @ W_dec + b_dec - x)
    l1 = lam if _arch(sae)[0] == "relu" else 0.0  # the L0 term sends nothing to these weights
    delta = (e @ W_dec.T + l1) * active
    return TokenFactors(x_in, f, e, delta)


def valid_tokens(attention_mask: Tensor) -> Tensor:
    """[B, T] bool: real tokens, position 0 excluded."""
    valid = attention_mask.bool().clone()
    valid[:, 0] = False
    return valid


def seed_gradient(sae: Any, acts: list[Tensor], masks: list[Tensor], lam: float) -> SAEGrad:
    """Gradient of the mean token loss over every valid token of the seed set (batches of
    [B, T, d] activations with their [B, T] valid masks), by autograd, once."""
    params = _params(sae)
    n = sum(int(m.sum()) for m in masks)
    if n == 0:
        raise ValueError("the seed set has no valid tokens (every context is a single token)")
    grads = [torch.zeros_like(p) for p in params]
    for x, m in zip(acts, masks, strict=True):
        loss = token_loss(sae, x[m].to(params[0].dtype), lam).sum() / n
        for g, dg in zip(grads, torch.autograd.grad(loss, params), strict=True):
            g += dg
    return SAEGrad(*grads)


def tracin_token_terms(sae: Any, acts: Tensor, seed: SAEGrad, lam: float) -> Tensor:
    """[B, T] each token's contribution grad l_t . grad L(seed) (before averaging)."""
    x = acts.to(seed.W_enc.dtype)
    with torch.no_grad():
        t = token_factors(sae, x, lam)
        W_enc = sae.W_enc.detach()
        return (
            ((t.x_in @ seed.W_enc) * t.delta).sum(-1)
            + ((t.f @ seed.W_dec) * t.e).sum(-1)
            + t.delta @ seed.b_enc
            + (t.e - t.delta @ W_enc.T) @ seed.b_dec
        )


def tracin_scores(sae: Any, acts: Tensor, valid: Tensor, seed: SAEGrad, lam: float) -> Tensor:
    """[B] TracIn score of each passage ([B, T, d] activations, [B, T] valid mask), factorised."""
    terms = tracin_token_terms(sae, acts, seed, lam)
    m = valid.to(terms.dtype)
    return (terms * m).sum(1) / m.sum(1).clamp_min(1)


def tracin_scores_naive(sae: Any, acts: Tensor, valid: Tensor, seed: SAEGrad, lam: float) -> Tensor:
    """The reference: one autograd gradient per passage, dotted with the seed gradient."""
    params = _params(sae)
    out = []
    for x, m in zip(acts, valid, strict=True):
        if not m.any():
            out.append(torch.zeros((), dtype=params[0].dtype))
            continue
        loss = token_loss(sae, x[m].to(params[0].dtype), lam).mean()
        grads = torch.autograd.grad(loss, params)
        out.append(sum((g * s).sum() for g, s in zip(grads, seed, strict=True)))
    return torch.stack(out).detach()
