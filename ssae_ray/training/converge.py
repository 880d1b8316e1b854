"""Training a GSAE to convergence: the learning-rate schedule, the validation-curve stopping rule
and dead-latent resampling that `pretrain.py` uses.

- `wsd_lr`: warm-up, stable, decay (the "WSD" schedule): linear warm-up over `warmup` steps, the
  peak lr until the stable phase ends (convergence or the step cap), then a linear decay to
  `lr_end` over a decay phase sized as a share of the steps taken. The end of the stable phase is
  not known in advance, which is what lets a convergence test end it.
- `Convergence`: the stopping rule on a held-out validation curve. A point is appended every
  validation; the run has converged when the best value in the last `window_tokens` training
  tokens improved on the best value before that window by less than `rel_tol` (relative). Points
  before `restart()` (a resampling changes the SAE) are not compared with later ones.
- `resample_dead`: Anthropic's dead-latent resampling (Towards Monosemanticity, 2023; the
  `resample_neurons` of dictionary_learning): each dead latent gets an input drawn with
  probability proportional to its squared reconstruction error; its decoder row becomes that
  input's unit direction, its encoder column the same direction times 0.2 × the mean norm of the
  live encoder columns, its encoder bias 0 (JumpReLU: its threshold the initial one), and Adam's
  moments of those rows are reset so the stale moments do not push them back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ssae_ray.training.losses import TrainingError

METRICS = ("loss", "fvu", "ce")
"""Validation metrics the stopping rule can watch (lower is better for each)."""


def wsd_lr(
    step: int, lr: float, warmup: int, stable_end: int | None, decay: int, lr_end: float = 0.0
) -> float:
    """The lr at `step`: linear warm-up to `lr` over steps 0..warmup-1, `lr` until `stable_end`,
    then linear decay to `lr_end` over `decay` steps (reached at step stable_end + decay).
    `stable_end=None`: the stable phase has not ended yet."""
    peak = lr * min(1.0, (step + 1) / warmup) if warmup > 0 else lr
    if stable_end is None or step < stable_end or decay <= 0:
        return peak
    left = stable_end + decay - step
    return lr_end + (peak - lr_end) * max(left, 0) / decay


@dataclass
class Convergence:
    """The validation-curve flattening test (see the module docstring)."""

    window_tokens: int
    rel_tol: float
    min_tokens: int = 0
    """No verdict before this many training tokens (e.g. the warm-up)."""
    points: list[tuple[int, float]] = field(default_factory=list)
    """(training tokens, validation value) since the last `restart`."""

    def __post_init__(self) -> None:
        if self.window_tokens <= 0:
            raise TrainingError(f"the convergence window must be > 0 tokens, got {self.window_tokens}")
        if not (math.isfinite(self.rel_tol) and self.rel_tol >= 0):
            raise TrainingError(f"the convergence tolerance must be >= 0, got {self.rel_tol}")

    def add(self, tokens: int, value: float) -> None:
        if not math.isfinite(value):
            raise TrainingError(f"the validation metric became {value} after {tokens} tokens; lower the lr")
        self.points.append((tokens, float(value)))

    def restart(self) -> None:
        """Forget the curve so far (the SAE was changed, e.g. by resampling)."""
        self.points.clear()

    def improvement(self) -> float | None:
        """Relative improvement of the best value within the last window over the best value before
        it; None while the curve is shorter than one window (or before `min_tokens`)."""
        if not self.points:
            return None
        now = self.points[-1][0]
        if now < self.min_tokens:
            return None
        before = [v for t, v in self.points if t <= now - self.window_tokens]
        inside = [v for t, v in self.points if t > now - self.window_tokens]
        if not before or not inside:
            return None
        ref, best = min(before), min(inside)
        return (ref - best) / max(abs(ref), 1e-12)

    def converged(self) -> bool:
        imp = self.improvement()
        return imp is not None and imp < self.rel_tol


@torch.no_grad()
def resample_dead(tr: Any, x: Tensor, dead: Tensor, generator: torch.Generator | None = None,
                  enc_scale: float = 0.2) -> int:  # fmt: skip
    """Re-initialise the latents of `tr` (a `loop.HookTrainer`) marked in `dead` [d_sae] towards
    inputs of `x` [n, d_in] (raw activations) it reconstructs worst; returns how many were
    resampled (at most the number of inputs with a non-zero error)."""
    form = tr.form
    idx = torch.nonzero(dead.to(form.W_dec.device)).flatten()
    if idx.numel() == 0:
        return 0
    xs = x.to(form.W_dec.device, torch.float32) * tr.act_scale
    err = (xs - form.decode(form.encode(xs))).pow(2).sum(-1).double()
    n = int(min(idx.numel(), int((err > 0).sum())))
    if n == 0:
        return 0
    idx = idx[:n]
    pick = torch.multinomial(err.cpu(), n, replacement=False, generator=generator).to(xs.device)
    v = xs[pick] - form.b_dec
    v = v / v.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    alive = torch.ones(form.d_sae, dtype=torch.bool, device=idx.device)
    alive[idx] = False
    norms = form.W_enc[:, alive].norm(dim=0)
    enc_norm = float(norms.mean()) if norms.numel() else 1.0
    form.W_dec[idx] = v
    form.W_enc[:, idx] = (v * enc_norm * enc_scale).T
    form.b_enc[idx] = 0.0
    if form.arch == "jumprelu" and form.threshold is not None:
        form.threshold[idx] = getattr(tr, "init_threshold", 0.01)
    for p, rows in ((form.W_enc, (slice(None), idx)), (form.b_enc, (idx,)), (form.W_dec, (idx,)),
                    (form.threshold, (idx,))):  # fmt: skip
        state = tr.opt.state.get(p) if p is not None else None
        if state:
            for k in ("exp_avg", "exp_avg_sq"):
                if k in state:
                    state[k][rows] = 0.0
    tr.tokens_since_fired[idx] = 0
    return n
