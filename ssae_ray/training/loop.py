"""The multi-SAE training loop: one activation batch (all hooks from one LM forward) feeds every
SAE; each SAE has its own Adam, λ controller and loss scale, so K SAEs trained together take
exactly the steps of K single-hook runs.

Written here rather than with sae-lens' `SAETrainer`, which has no TERM objective and clips the
gradient norm. Every GSAE sae-lens loads as a ReLU, JumpReLU, TopK or BatchTopK SAE is trained in
one trainable form with unit-norm decoder rows (`archs.py`: its import is exact and checked, its
export goes back to the GSAE's own sae-lens class), with its architecture's per-token loss
(`losses.py`: L1, L0 by straight-through estimator, or MSE + auxiliary dead-latent loss).

Activation scale. With `TrainConfig.scale_activations` the loop trains on c·x with
c = sqrt(d_in / E||x||^2), so λ means the same at every hook and model (docs/CALIBRATION.md). The
scale lives in the saved SAE: it is folded into its weights (b_enc / c, b_dec / c, θ / c; f_raw =
f_scaled / c), the SAE reads raw activations, and `cfg.metadata.act_scale` records c, which later
finetunes reuse.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import torch
from sae_lens import SAE, StandardSAE, StandardSAEConfig
from torch import Tensor

from ssae_ray import precision as prec
from ssae_ray.config import Config, TrainConfig
from ssae_ray.training.archs import SPARSITY_KNOB, export_form, import_gsae
from ssae_ray.training.losses import (
    AdaptiveLambda,
    LossScale,
    SAEStep,
    TrainingError,
    check_lam_tilt,
    jumprelu_loss_and_grads,
    normalize_decoder,
    project_decoder_grad,
    sae_loss_and_grads,
    term_weights,
    tilted_loss,
    topk_loss_and_grads,
)

log = logging.getLogger("ssae_ray")

Batch = dict[str, Tensor]
"""hook -> [n_tokens, d_in] activations (position 0 and padding already dropped)."""
Callback = Callable[[int, dict[str, float]], Any]
"""Called after every step with (step, metrics)."""
Gather = Callable[[Tensor], tuple[Tensor, int]]
"""Data-parallel: all-gather a [n] tensor of per-token losses into the global batch's; returns it
and where this replica's tokens start in it."""


class FinetuneResult(NamedTuple):
    saes: dict[str, SAE]
    """The trained SAEs, reading raw activations (scale folded in), each in its GSAE's sae-lens class."""
    history: list[dict[str, float]]
    """One dict of metrics per step (see `HookTrainer.step` for the keys)."""


def check_train_config(tc: TrainConfig) -> None:
    check_lam_tilt(tc.lam, tc.tilt)
    if tc.tilt_mode not in ("raw", "scaled"):
        raise TrainingError(f"train.tilt_mode must be 'raw' or 'scaled', got {tc.tilt_mode!r}")
    for name in ("lr", "batch_tokens", "steps"):
        if not getattr(tc, name) > 0:
            raise TrainingError(f"train.{name} must be > 0, got {getattr(tc, name)}")
    if tc.decay_steps < 0 or tc.lr_end < 0 or tc.warmup_steps < 0:
        raise TrainingError("train.decay_steps, train.lr_end and train.warmup_steps must be >= 0")
    if not tc.jumprelu_bandwidth > 0:
        raise TrainingError(f"train.jumprelu_bandwidth must be > 0, got {tc.jumprelu_bandwidth}")
    if tc.aux_coefficient < 0 or not 0 <= tc.topk_threshold_lr <= 1:
        raise TrainingError("train.aux_coefficient must be >= 0 and train.topk_threshold_lr in [0, 1]")
    if tc.k is not None and not tc.k > 0:
        raise TrainingError(f"train.k must be > 0 (latents per token of TopK/BatchTopK SAEs), got {tc.k}")


def lr_at(tc: TrainConfig, step: int, steps: int | None = None) -> float:
    """Linear warm-up over `warmup_steps`, constant lr, then linear decay to `lr_end` over the last
    `decay_steps` steps."""
    steps = steps or tc.steps
    left = steps - step
    peak = tc.lr * min(1.0, (step + 1) / tc.warmup_steps) if tc.warmup_steps > 0 else tc.lr
    if tc.decay_steps <= 0 or left > tc.decay_steps:
        return peak
    return tc.lr_end + (peak - tc.lr_end) * max(left, 0) / tc.decay_steps


def act_scale(d_in: int, mean_sq_norm: float) -> float:
    """c = sqrt(d_in / E||x||^2), so that E||c·x||^2 = d_in (the one place this is computed)."""
    if not math.isfinite(mean_sq_norm) or mean_sq_norm <= 0:
        raise TrainingError(f"cannot scale activations: mean squared norm is {mean_sq_norm}")
    return math.sqrt(d_in / mean_sq_norm)


def estimate_act_scale(x: Tensor) -> float:
    """`act_scale` of a batch of activations [n, d_in]."""
    return act_scale(x.shape[-1], float(x.double().pow(2).sum(-1).mean()))


def export_sae(W_enc: Tensor, b_enc: Tensor, W_dec: Tensor, b_dec: Tensor, hook: str, act_scale: float,
               like: SAE | None = None) -> StandardSAE:  # fmt: skip
    """A raw-activation StandardSAE from weights trained on c·x (see the module docstring)."""
    cfg = StandardSAEConfig(d_in=W_enc.shape[0], d_sae=W_enc.shape[1], device=str(W_enc.device))
    if like is not None:
        cfg.metadata = type(like.cfg.metadata)(**like.cfg.metadata.to_dict())
    cfg.metadata.hook_name = hook
    cfg.metadata.act_scale = act_scale
    sae = StandardSAE(cfg)
    with torch.no_grad():
        sae.W_enc.copy_(W_enc)
        sae.W_dec.copy_(W_dec)
        sae.b_enc.copy_(b_enc / act_scale)
        sae.b_dec.copy_(b_dec / act_scale)
    return sae


class HookTrainer:
    """One SAE under training: its trainable form (`archs.TrainForm`, in the scaled space), Adam,
    λ controller, loss scale and dead-latent counters. Any `archs.arch_of` GSAE: imported exactly
    (checked), trained with its architecture's per-token loss under TERM, exported in its class."""

    def __init__(self, tc: TrainConfig, sae: SAE, hook: str, act_scale: float, device: str = "cpu"):
        check_train_config(tc)
        self.tc, self.hook, self.act_scale, self.like = tc, hook, act_scale, sae
        self.form = import_gsae(sae, act_scale, device)
        self.arch = self.form.arch
        if tc.k is not None:
            if SPARSITY_KNOB[self.arch] != "k":
                raise TrainingError(
                    f"train.k={tc.k:g} sets k of TopK/BatchTopK SAEs, but the GSAE at {hook} is a {self.arch} SAE "
                    "(its sparsity knob is train.lam)"
                )
            if not 0 < tc.k <= self.d_sae:
                raise TrainingError(f"train.k must be in (0, d_sae={self.d_sae}] for {hook}, got {tc.k:g}")
            self.form.k = float(int(tc.k)) if self.arch == "topk" else float(tc.k)
        self.params = self.form.params()
        self.opt = torch.optim.Adam(self.params, lr=tc.lr, fused=True)  # one kernel: 6x faster on CPU
        self.lam = AdaptiveLambda(tc.lam, tc.l0_band, tc.adapt_rate)
        self.scale = LossScale(tc.loss_scale_decay)
        self.tokens_since_fired = torch.zeros(self.d_sae, dtype=torch.long, device=device)
        self.precision = prec.choose(tc.precision, device, "the SAE step")
        """What the step's matmuls run in (`train.precision`); weights and Adam state stay fp32."""

    @property
    def d_sae(self) -> int:
        return self.form.d_sae

    @property
    def W_enc(self) -> Tensor:
        return self.form.W_enc

    @property
    def b_enc(self) -> Tensor:
        return self.form.b_enc

    @property
    def W_dec(self) -> Tensor:
        return self.form.W_dec

    @property
    def b_dec(self) -> Tensor:
        return self.form.b_dec

    def loss_and_grads(self, x: Tensor, lam: float, objective: Callable[[Tensor], Tensor]) -> SAEStep:
        """The architecture's per-token loss on scaled inputs and the gradient of `objective` of it."""
        fm, tc = self.form, self.tc
        w = (fm.W_enc, fm.b_enc, fm.W_dec, fm.b_dec)
        mm = self.precision.dtype
        if self.arch == "relu":
            return sae_loss_and_grads(x, *w, lam, objective, mm)
        if self.arch == "jumprelu":
            assert fm.threshold is not None
            return jumprelu_loss_and_grads(x, *w, fm.threshold, lam, tc.jumprelu_bandwidth, objective, mm)
        dead = self.tokens_since_fired >= tc.dead_window_tokens
        return topk_loss_and_grads(x, *w, float(fm.k or 0), objective, batch=self.arch == "batchtopk",
                                   select=fm.select, dead=dead, aux_coefficient=tc.aux_coefficient, mm=mm)  # fmt: skip

    def step(self, x: Tensor, lr: float, step: int, gather: Gather | None = None) -> dict[str, Any]:
        """Forward and backward on [n, d_in] raw activations; `apply` then takes the step."""
        tc, h = self.tc, self.hook
        if x.ndim != 2 or x.shape[1] != self.W_enc.shape[0]:
            raise TrainingError(
                f"step {step}, hook {h}: expected activations [n_tokens, {self.W_enc.shape[0]}], "
                f"got {tuple(x.shape)}"
            )
        x = x.to(self.W_enc.device, torch.float32, non_blocking=True)
        if not bool(torch.isfinite(x).all()):
            bad = int((~torch.isfinite(x)).any(-1).sum())
            raise TrainingError(
                f"step {step}, hook {h}: {bad} of {x.shape[0]} activation rows hold NaN or inf; the batch "
                "was not trained on. Check the model's dtype (fp16 overflow) and the cached activations."
            )
        x = x * self.act_scale
        lam = self.lam.lam
        glob: dict[str, float] = {}
        if gather is None:
            scale = self.scale.value

            def objective(losses: Tensor) -> Tensor:
                s = scale if scale is not None else float(losses.detach().mean())
                return tilted_loss(losses, tc.tilt, tc.tilt_mode, s)

        else:  # data parallel: weights from the global batch's losses, gradients summed by the caller

            def objective(losses: Tensor) -> Tensor:
                all_l, off = gather(losses.detach())
                s = self.scale.value if self.scale.value is not None else float(all_l.mean())
                t = tc.tilt / s if tc.tilt_mode == "scaled" else tc.tilt
                glob["objective"] = float(tilted_loss(all_l, tc.tilt, tc.tilt_mode, s))  # the global value
                return (term_weights(all_l, t)[off : off + losses.shape[0]] * losses).sum()

        out = self.loss_and_grads(x, lam, objective)
        if not bool(torch.isfinite(out.objective)):
            raise TrainingError(
                f"step {step}, hook {h}: the loss became {float(out.objective)} (lr {lr:g}, λ {lam:g}); "
                "lower train.lr"
            )
        for group in self.opt.param_groups:
            group["lr"] = lr
        for p, g in zip(self.params, out.grads, strict=True):
            p.grad = g
        return {"out": out, "x": x, "lam": lam, "global": glob}

    @torch.no_grad()
    def apply(self, pending: dict[str, Any], collective: Any = None) -> dict[str, float]:
        """Take the optimizer step (after any gradient all-reduce) and compute the step's metrics.
        Data parallel (`collective`, a `training.collective.DistCollective`): the step's statistics,
        and so the loss scale, the adaptive λ's L0 and the dead-latent counters, are those of the
        global batch, as in one process."""
        project_decoder_grad(self.W_dec)
        self.opt.step()
        normalize_decoder(self.W_dec)
        out, x = pending["out"], pending["x"]
        th = self.form.threshold
        if self.arch == "jumprelu" and th is not None:
            th.clamp_(min=0.0)  # as sae-lens: below 0 the gate would pass negative pre-activations
        elif self.arch == "batchtopk" and th is not None:
            kept = out.f[out.f > 0]
            low = kept.min() if kept.numel() else torch.tensor(float("inf"), device=th.device)
            if collective is not None:  # the global batch's minimum
                low = -collective.max(-low.reshape(1))[0]
            if bool(torch.isfinite(low)):  # sae-lens: θ <- (1 - r) θ + r min(kept activation)
                r = self.tc.topk_threshold_lr
                th.mul_(1 - r).add_(r * low.float())
        if collective is not None:
            return self._metrics(self._global_stats(pending, collective), pending)
        n = x.shape[0]
        tl = out.losses
        scale = self.scale.value if self.scale.value is not None else float(tl.loss.mean())
        self.tokens_since_fired += n
        self.tokens_since_fired[out.f.amax(0) > 0] = 0
        w = out.weights.double()
        stats = torch.stack([
            torch.sign(out.f).sum(dtype=torch.float64) / n,  # 2x faster than count_nonzero on CPU; f may be bf16
            (self.tokens_since_fired >= self.tc.dead_window_tokens).sum().double(),
            tl.sse.double().sum(),
            (x - x.mean(0)).pow(2).sum().double().clamp_min(1e-12),
            tl.loss.double().mean(),
            (tl.l1 if self.arch == "relu" else out.f.sum(-1, dtype=torch.float64)).mean(),
            tl.l1.double().mean(),
            w.sum().pow(2) / w.pow(2).sum().clamp_min(1e-300) / n,  # effective sample share
            out.objective.double(),
        ]).tolist()  # fmt: skip
        l0, dead, sse, var, mean_loss, l1, sparsity, eff, obj = stats
        return self._metrics(dict(n=n, l0=l0, dead=dead, sse=sse, var=var, loss=mean_loss, l1=l1,
                                  sparsity=sparsity, eff=eff, obj=obj, scale=scale), pending)  # fmt: skip

    def _global_stats(self, pending: dict[str, Any], coll: Any) -> dict[str, float]:
        """The step's statistics over every replica's tokens (sums all-reduced, fired latents max-reduced)."""
        out, x = pending["out"], pending["x"]
        tl, w = out.losses, out.weights.double()
        local = torch.stack([
            torch.tensor(float(x.shape[0]), dtype=torch.float64, device=x.device),
            torch.sign(out.f).sum(dtype=torch.float64),  # f may be bf16
            tl.sse.double().sum(),
            x.double().pow(2).sum(),
            tl.loss.double().sum(),
            (tl.l1.double() if self.arch == "relu" else out.f.sum(-1, dtype=torch.float64)).sum(),
            tl.l1.double().sum(),
            w.sum(),
            w.pow(2).sum(),
        ])  # fmt: skip
        tot = coll.sum(torch.cat([local, x.double().sum(0)]))
        n, nnz, sse, x2, loss, l1, sparsity, w1, w2 = tot[:9].tolist()
        xsum = tot[9:]
        fired = coll.max((out.f.amax(0) > 0).to(torch.uint8)) > 0
        scale = self.scale.value if self.scale.value is not None else loss / n
        self.tokens_since_fired += int(n)
        self.tokens_since_fired[fired] = 0
        return dict(
            n=n, l0=nnz / n, dead=float((self.tokens_since_fired >= self.tc.dead_window_tokens).sum()),
            sse=sse, var=max(x2 - float(xsum.pow(2).sum()) / n, 1e-12), loss=loss / n, l1=l1 / n,
            sparsity=sparsity / n, eff=w1**2 / max(w2, 1e-300) / n, obj=pending["global"]["objective"],
            scale=scale,
        )  # fmt: skip

    def _metrics(self, st: dict[str, float], pending: dict[str, Any]) -> dict[str, float]:
        """Update the loss scale and λ controller from the step's statistics; the metrics dict."""
        l0, dead, sse, var, mean_loss, l1, sparsity, eff, obj, scale, n = (
            st[k] for k in ("l0", "dead", "sse", "var", "loss", "l1", "sparsity", "eff", "obj", "scale", "n")
        )
        self.scale.update(mean_loss)
        self.lam.update(l0)
        h = self.hook
        return {
            f"{h}/loss": mean_loss,
            f"{h}/objective": obj,
            f"{h}/mse": sse / n / self.act_scale**2,
            f"{h}/fvu": sse / var,
            f"{h}/l1": l1,
            f"{h}/l0": l0,
            f"{h}/sparsity": sparsity,
            f"{h}/dead": dead,
            f"{h}/lam": pending["lam"],
            f"{h}/loss_scale": scale,
            f"{h}/term_eff_share": eff,
        }

    def export(self) -> SAE:
        """The SAE in its GSAE's sae-lens class, reading raw activations (see `archs.export_form`)."""
        return export_form(self.form, self.hook)

    @torch.no_grad()
    def load_weights(self, sae: SAE) -> None:
        """Continue from `sae` (a checkpoint this trainer exported): its trainable form's weights."""
        if (sae.cfg.d_in, sae.cfg.d_sae) != (self.W_enc.shape[0], self.d_sae):
            raise TrainingError(
                f"cannot resume {self.hook}: the checkpoint holds an SAE of width {sae.cfg.d_sae} "
                f"(d_in {sae.cfg.d_in}) but this run trains width {self.d_sae} (d_in {self.W_enc.shape[0]}); "
                "use a fresh output folder or the same sae.d_sae / sae.slice_to"
            )
        form = import_gsae(sae, self.act_scale, self.W_enc.device)
        if form.arch != self.arch:
            raise TrainingError(
                f"cannot resume {self.hook}: the checkpoint is a {form.arch} SAE, this run trains {self.arch}"
            )
        for dst, src in ((self.form.W_enc, form.W_enc), (self.form.b_enc, form.b_enc), (self.form.W_dec, form.W_dec),
                         (self.form.b_dec, form.b_dec), (self.form.threshold, form.threshold)):  # fmt: skip
            if dst is not None and src is not None:
                dst.copy_(src)
        self.form.k, self.form.row_norms, self.form.select = form.k, form.row_norms, form.select

    def state_dict(self) -> dict[str, Any]:
        """The optimizer, λ, loss-scale and dead-latent state, and the trainable weights as they are
        (`params`: the sae-lens copy beside it stores them with the activation scale folded in,
        which moves each by an ulp or so; a resume from that alone drifts from the uninterrupted run,
        by ~1e-6 after hundreds of fp32 steps and by ~0.1 in bf16, where one ulp flips the rounding
        of the step's bf16 matmuls)."""
        return {
            "params": [p.detach().cpu().clone() for p in self.params],
            "opt": self.opt.state_dict(),
            "lam": self.lam.state_dict(),
            "scale": self.scale.state_dict(),
            "tokens_since_fired": self.tokens_since_fired.cpu(),
            "act_scale": self.act_scale,
            "d_in": self.W_enc.shape[0],
            "d_sae": self.d_sae,
            "arch": self.arch,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if (state["d_in"], state["d_sae"]) != (self.W_enc.shape[0], self.d_sae):
            raise TrainingError(
                f"cannot resume {self.hook}: the checkpoint holds an SAE of width {state['d_sae']} "
                f"(d_in {state['d_in']}) but this run trains width {self.d_sae} (d_in {self.W_enc.shape[0]}); "
                "use a fresh output folder or the same sae.d_sae / sae.slice_to"
            )
        if state.get("arch", "relu") != self.arch:
            raise TrainingError(
                f"cannot resume {self.hook}: the checkpoint trained a {state.get('arch', 'relu')} SAE, this run a "
                f"{self.arch} SAE; use a fresh output folder"
            )
        if "params" in state:  # bit-exact weights (checkpoints from before hold only the sae-lens copy)
            if [tuple(p.shape) for p in state["params"]] != [tuple(p.shape) for p in self.params]:
                raise TrainingError(f"cannot resume {self.hook}: the checkpoint's weights have other shapes")
            with torch.no_grad():
                for dst, src in zip(self.params, state["params"], strict=True):
                    dst.copy_(src)
        self.opt.load_state_dict(state["opt"])
        self.lam.load_state_dict(state["lam"])
        self.scale.load_state_dict(state["scale"])
        self.tokens_since_fired = state["tokens_since_fired"].to(self.W_enc.device)


def act_scale_for(tc: TrainConfig, sae: SAE, first_batch: Tensor) -> float:
    """The SAE's recorded scale (so λ means what it meant in pretraining), else one estimated
    from the first batch; 1 when `scale_activations` is off."""
    if not tc.scale_activations:
        return 1.0
    c = getattr(sae.cfg.metadata, "act_scale", None)
    return float(c) if c else estimate_act_scale(first_batch)


def make_trainers(
    tc: TrainConfig, saes: dict[str, SAE], first: Batch, device: str = "cpu"
) -> dict[str, HookTrainer]:
    missing = [h for h in saes if h not in first]
    if missing:
        raise TrainingError(f"the activation batches have no hook {missing[0]!r}; they hold {sorted(first)}")
    return {h: HookTrainer(tc, sae, h, act_scale_for(tc, sae, first[h]), device) for h, sae in saes.items()}


def train_step(
    trainers: dict[str, HookTrainer],
    batch: Batch,
    step: int,
    steps: int,
    gather: Gather | None = None,
    allreduce: Callable[[list[Tensor]], None] | None = None,
    collective: Any = None,
) -> dict[str, float]:
    """One step of every SAE on one batch (each SAE's graph is freed before the next is built).
    Data parallel: pass a `training.collective.DistCollective` (or its `gather` / `allreduce`
    alone, which leaves the step's statistics per replica)."""
    if collective is not None:
        gather, allreduce = collective.gather, collective.allreduce
    metrics: dict[str, float] = {}
    for h, tr in trainers.items():
        lr = lr_at(tr.tc, step, steps)
        pending = tr.step(batch[h], lr, step, gather)
        if allreduce is not None:
            allreduce([p.grad for p in tr.params])
        metrics.update(tr.apply(pending, collective))
        metrics["lr"] = lr
    return metrics


def summarize(metrics: dict[str, float], hooks: Iterable[str]) -> dict[str, float]:
    hooks = list(hooks)
    for k in ("loss", "l0", "fvu", "dead"):
        metrics[k] = sum(metrics[f"{h}/{k}"] for h in hooks) / len(hooks)
    return metrics


def run_steps(
    trainers: dict[str, HookTrainer],
    batches: Iterator[Batch],
    start: int,
    steps: int,
    callback: Callback | None = None,
    progress: bool = True,
    gather: Gather | None = None,
    allreduce: Callable[[list[Tensor]], None] | None = None,
    on_step: Callable[[int], None] | None = None,
    desc: str = "finetune",
    stop: int | None = None,
    collective: Any = None,
) -> list[dict[str, float]]:
    """Steps `start .. stop-1` of a `steps`-step run (lr schedule over `steps`); metrics per step
    (tokens/s included) go to `callback` and the returned history."""
    from tqdm.auto import tqdm

    history: list[dict[str, float]] = []
    bar = tqdm(total=steps, initial=start, desc=desc, unit="step", disable=not progress, dynamic_ncols=True)
    tokens = 0
    try:
        for step in range(start, steps if stop is None else min(stop, steps)):
            t0 = time.perf_counter()
            try:
                batch = next(batches)
            except StopIteration:
                log.warning("%s: the activations ran out after %d of %d steps", desc, step, steps)
                break
            n = next(iter(batch.values())).shape[0]
            m = summarize(train_step(trainers, batch, step, steps, gather, allreduce, collective), trainers)
            dt = time.perf_counter() - t0
            tokens += n
            m.update(step=float(step), tokens=float(tokens), tokens_per_s=n / max(dt, 1e-9))
            history.append(m)
            if callback is not None:
                callback(step, m)
            if on_step is not None:
                on_step(step + 1)
            bar.update(1)
            bar.set_postfix(tok_s=f"{m['tokens_per_s']:.0f}", l0=f"{m['l0']:.1f}", loss=f"{m['loss']:.4g}")
    finally:
        bar.close()
    return history


def finetune(
    cfg: Config | TrainConfig,
    saes: dict[str, SAE],
    batches: Iterable[Batch] | str | Path,
    callback: Callback | None = None,
    progress: bool = True,
    device: str | None = None,
    buffer_batches: int = 4,
) -> FinetuneResult:
    """Finetune every SAE on its hook's activations, in one process (no Ray).

    `batches` is an activation-cache folder (`cache_activations`; read in a seeded permutation per
    epoch) or an iterable of {hook: [n, d_in]} dicts (re-cut into `batch_tokens` batches through a
    shuffle buffer of `buffer_batches` batches).
    """
    from ssae_ray.training.cache import iter_cache_batches, shuffle_buffer

    tc = cfg.train if isinstance(cfg, Config) else cfg
    check_train_config(tc)
    if not saes:
        raise TrainingError("no SAEs to train")
    hooks = list(saes)
    if isinstance(batches, str | Path):
        it = iter_cache_batches(batches, hooks, tc.batch_tokens, seed=tc.seed)
    else:
        it = shuffle_buffer(iter(batches), tc.batch_tokens, buffer_batches, seed=tc.seed)
    it = _peekable(it)
    dev = device or str(next(iter(saes.values())).W_dec.device)
    trainers = make_trainers(tc, saes, it.peek(), dev)
    history = run_steps(trainers, it, 0, tc.steps, callback, progress)
    return FinetuneResult({h: tr.export() for h, tr in trainers.items()}, history)


class _peekable(Iterator[Batch]):
    def __init__(self, it: Iterator[Batch]):
        self.it, self.head = it, None

    def peek(self) -> Batch:
        if self.head is None:
            try:
                self.head = next(self.it)
            except StopIteration:
                raise TrainingError("no activations to train on (empty selection or cache)") from None
        return self.head

    def __next__(self) -> Batch:
        if self.head is not None:
            head, self.head = self.head, None
            return head
        return next(self.it)


def with_train(tc: TrainConfig, **changes: Any) -> TrainConfig:
    return dataclasses.replace(tc, **changes)
