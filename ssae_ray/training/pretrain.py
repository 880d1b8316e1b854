"""GSAE pretraining from scratch (for presets without published GSAEs, e.g. `local`), with the
same per-SAE step as finetuning: random init as in sae-lens / Anthropic's April update (unit-norm
decoder rows, W_enc = W_dec^T, zero biases), activations scaled so E||x||^2 = d_in (the scale is
folded into the saved SAE, see `loop`), ERM at `pretrain_lam`.

Two modes (`train.pretrain_converge`):

- fixed length: `pretrain_steps` steps, the lr decayed linearly over the last
  `pretrain_decay_fraction` of them (the historical behaviour, and its cache keys);
- to convergence: passes (epochs) over the cached activations of the general corpus
  (`pretrain_tokens`, None = all of it; memory-mapped shards, read in a seeded order) under a
  warm-up-stable-decay lr schedule; every `pretrain_val_every` steps the SAEs are scored on the
  activations of held-out documents (FVU, L0, loss; spliced CE every `pretrain_ce_every`
  validations); when every hook's validation curve has flattened (`converge.Convergence`) or the
  step cap `pretrain_steps` comes near, the lr decays over `pretrain_decay_fraction` of the run
  and training stops. Dead latents are resampled during the stable phase when
  `pretrain_resample_every` is set (`converge.resample_dead`); TopK GSAEs also have their aux loss.

The folder's manifest records the tokens seen, why training stopped, the final validation FVU / L0
/ dead share and the whole validation curve (also in `validation.json`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ssae_ray.config import Config, TrainConfig
from ssae_ray.saes import make_random_sae, save_sae
from ssae_ray.stages import run_stage, stage_key
from ssae_ray.training.cache import cache_activations, iter_cache_batches, open_cache
from ssae_ray.training.converge import METRICS, Convergence, resample_dead, wsd_lr
from ssae_ray.training.loop import Batch, HookTrainer, act_scale, make_trainers, summarize, with_train
from ssae_ray.training.losses import TrainingError

log = logging.getLogger("ssae_ray")


def pretrain_key(cfg: Config, texts: Sequence[str]) -> str:
    h = hashlib.sha256("\0".join(texts).encode()).hexdigest()
    t = cfg.train
    # (the 4 stands where the removed, never-read train.shuffle_buffer_batches was: existing
    # pretrained GSAEs keep their key)
    return stage_key(
        "gsae-pretrain-v1", cfg.model.source, cfg.model.tiny_arch, cfg.model.dtype, cfg.model.context_len,
        list(cfg.sae.hooks), cfg.sae.d_sae, h, t.pretrain_steps, t.pretrain_lr, t.pretrain_lam,
        t.pretrain_tokens, t.batch_tokens, 4, t.scale_activations, cfg.seed, t.seed,
        *((cfg.sae.arch, cfg.sae.k, t.jumprelu_bandwidth, t.aux_coefficient, t.topk_threshold_lr)
          if cfg.sae.arch != "relu" else ()),
        *(("bos",) if cfg.model.prepend_bos else ()),
        *(("schedule", t.pretrain_warmup_steps, t.pretrain_decay_fraction, t.lr_end)
          if (t.pretrain_warmup_steps, t.pretrain_decay_fraction, t.lr_end) != (0, 0.2, 0.0) else ()),
        *(("converge", t.pretrain_converge, t.pretrain_val_tokens, t.pretrain_val_every, t.pretrain_ce_every,
           t.pretrain_ce_tokens, t.pretrain_converge_metric, t.pretrain_converge_window_tokens,
           t.pretrain_converge_rel_tol, t.pretrain_resample_every, t.pretrain_resample_max, t.dead_window_tokens)
          if t.pretrain_converge or t.pretrain_val_tokens or t.pretrain_resample_every else ()),
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# The plan and the loop (no LM: tested on planted problems)


@dataclass(frozen=True)
class PretrainPlan:
    """When the lr moves, when to validate and resample, when to stop."""

    max_steps: int
    lr: float
    lr_end: float = 0.0
    warmup: int = 0
    decay_fraction: float = 0.2
    converge: bool = False
    val_every: int = 50
    ce_every: int = 0
    metric: str = "loss"
    window_tokens: int = 2_000_000
    rel_tol: float = 0.01
    resample_every: int = 0
    resample_max: int = 4

    @classmethod
    def from_config(cls, t: TrainConfig) -> PretrainPlan:
        return cls(
            max_steps=t.pretrain_steps, lr=t.pretrain_lr, lr_end=t.lr_end, warmup=t.pretrain_warmup_steps,
            decay_fraction=t.pretrain_decay_fraction, converge=t.pretrain_converge, val_every=t.pretrain_val_every,
            ce_every=t.pretrain_ce_every, metric=t.pretrain_converge_metric,
            window_tokens=t.pretrain_converge_window_tokens, rel_tol=t.pretrain_converge_rel_tol,
            resample_every=t.pretrain_resample_every, resample_max=t.pretrain_resample_max,
        )  # fmt: skip

    def check(self, has_validation: bool) -> None:
        if self.max_steps < 1 or not self.lr > 0 or self.warmup < 0 or self.val_every < 1:
            raise TrainingError(
                "train.pretrain_steps and train.pretrain_val_every must be >= 1, train.pretrain_lr > 0 and "
                f"train.pretrain_warmup_steps >= 0; got {self.max_steps}, {self.val_every}, {self.lr}, {self.warmup}"
            )
        if not 0 <= self.decay_fraction < 1:
            raise TrainingError(f"train.pretrain_decay_fraction must be in [0, 1), got {self.decay_fraction}")
        if self.metric not in METRICS:
            raise TrainingError(
                f"train.pretrain_converge_metric must be one of {METRICS}, got {self.metric!r}"
            )
        if self.converge and not has_validation:
            raise TrainingError(
                "train.pretrain_converge needs a validation curve: set train.pretrain_val_tokens > 0 "
                "(held-out documents of the general corpus)"
            )
        if self.converge and self.metric == "ce" and self.ce_every < 1:
            raise TrainingError(
                "train.pretrain_converge_metric=ce needs train.pretrain_ce_every >= 1 (and a model to splice into)"
            )
        if self.resample_every < 0 or self.resample_max < 0 or self.ce_every < 0:
            raise TrainingError(
                "train.pretrain_resample_every, pretrain_resample_max and pretrain_ce_every must be >= 0"
            )

    def decay_steps(self, stable_end: int) -> int:
        """Steps of the decay after a stable phase ending at `stable_end` (a share of the whole run)."""
        if self.decay_fraction <= 0:
            return 0
        return max(int(stable_end * self.decay_fraction / (1 - self.decay_fraction) + 1e-9), 1)

    def cap_stable_end(self) -> int:
        """The step at which the stable phase ends at the latest: the whole run then fits `max_steps`."""
        if self.decay_fraction <= 0:
            return self.max_steps
        return self.max_steps - max(int(self.max_steps * self.decay_fraction + 1e-9), 1)


Validate = Callable[[dict[str, HookTrainer], bool], dict[str, dict[str, float]]]
"""(trainers, with_ce) -> {hook: {"fvu", "l0", "loss", "mse", "dead", ["ce"]}} on held-out data."""


@dataclass
class PretrainResult:
    history: list[dict[str, float]]
    """One dict of training metrics per step (as `loop.run_steps`)."""
    curve: list[dict[str, Any]]
    """One entry per validation: step, tokens, lr, phase and {hook: metrics}."""
    steps: int
    tokens: int
    stop_reason: str
    """`converged`, `step_cap` (the curve had not flattened by the cap) or `fixed` (fixed length)."""
    stable_end: int
    resamples: list[dict[str, Any]]


def train_gsaes(
    trainers: dict[str, HookTrainer],
    batches: Iterator[Batch],
    plan: PretrainPlan,
    validate: Validate | None = None,
    resample_inputs: Callable[[], Batch] | None = None,
    progress: bool = True,
    seed: int = 0,
) -> PretrainResult:
    """Train `trainers` on `batches` under `plan`; see the module docstring."""
    from tqdm.auto import tqdm

    plan.check(validate is not None)
    hooks = list(trainers)
    conv = {h: Convergence(plan.window_tokens, plan.rel_tol) for h in hooks}
    cap = plan.cap_stable_end()
    stable_end: int | None = None if plan.converge else cap
    end = plan.max_steps
    decided = not plan.converge
    gen = torch.Generator().manual_seed(seed)
    history: list[dict[str, float]] = []
    curve: list[dict[str, Any]] = []
    resamples: list[dict[str, Any]] = []
    tokens, n_val, step = 0, 0, 0
    stop_reason = "fixed" if not plan.converge else "step_cap"
    bar = tqdm(total=end, desc="pretrain GSAEs", unit="step", disable=not progress, dynamic_ncols=True)

    def do_validate(step_done: int, lr: float, phase: str, last: bool = False) -> None:
        nonlocal n_val
        assert validate is not None
        with_ce = plan.ce_every > 0 and (n_val % plan.ce_every == 0 or last)  # the final SAE always
        vals = validate(trainers, with_ce)
        n_val += 1
        curve.append({"step": step_done, "tokens": tokens, "lr": lr, "phase": phase, **vals})
        if phase == "stable":
            for h in hooks:
                v = vals[h].get(plan.metric)
                if v is not None:
                    conv[h].add(tokens, v)
        log.info("pretrain step %d (%d tokens): %s", step_done, tokens,
                 ", ".join(f"{h} fvu {vals[h]['fvu']:.4f} l0 {vals[h]['l0']:.1f}" for h in hooks))  # fmt: skip

    try:
        while step < end:
            t0 = time.perf_counter()
            try:
                batch = next(batches)
            except StopIteration:
                log.warning("pretrain: the activations ran out after %d steps", step)
                stop_reason = "data_ran_out"
                break
            decay = 0 if stable_end is None else end - stable_end
            lr = wsd_lr(step, plan.lr, plan.warmup, stable_end, decay, plan.lr_end)
            metrics: dict[str, float] = {}
            for h, tr in trainers.items():
                pending = tr.step(batch[h], lr, step)
                metrics.update(tr.apply(pending))
            n = next(iter(batch.values())).shape[0]
            tokens += n
            m = summarize(metrics, hooks)
            m.update(
                lr=lr,
                step=float(step),
                tokens=float(tokens),
                tokens_per_s=n / max(time.perf_counter() - t0, 1e-9),
            )
            history.append(m)
            step += 1
            bar.update(1)
            bar.set_postfix(l0=f"{m['l0']:.1f}", fvu=f"{m['fvu']:.3f}", lr=f"{lr:.2g}")
            phase = "stable" if stable_end is None or step <= stable_end else "decay"
            if (
                phase == "stable" and plan.resample_every > 0 and resample_inputs is not None
                and step % plan.resample_every == 0 and len(resamples) < plan.resample_max
            ):  # fmt: skip
                x = resample_inputs()
                for h, tr in trainers.items():
                    dead = tr.tokens_since_fired >= tr.tc.dead_window_tokens
                    k = resample_dead(tr, x[h], dead, gen)
                    if k:
                        resamples.append({"step": step, "tokens": tokens, "hook": h, "latents": k})
                        conv[h].restart()
                        log.info("pretrain step %d: resampled %d dead latents of %s", step, k, h)
            if validate is not None and (step % plan.val_every == 0 or step == end):
                do_validate(step, lr, phase, last=step == end)
                if stable_end is None and plan.converge and all(c.converged() for c in conv.values()):
                    stop_reason, stable_end = "converged", step
                elif stable_end is None and step >= cap:
                    stable_end = step
            elif stable_end is None and step >= cap:
                stable_end = step
            if not decided and stable_end is not None:
                decided = True
                end = min(stable_end + plan.decay_steps(stable_end), plan.max_steps)
                bar.total = end
                log.info("pretrain: %s at step %d; lr decays over %d more steps",
                         stop_reason.replace("_", " "), stable_end, end - stable_end)  # fmt: skip
        if validate is not None and (not curve or curve[-1]["step"] != step):
            do_validate(step, history[-1]["lr"] if history else plan.lr, "final", last=True)
    finally:
        bar.close()
    return PretrainResult(history, curve, step, tokens, stop_reason, stable_end or step, resamples)


# ---------------------------------------------------------------------------------------------
# Validation on held-out activations


@torch.no_grad()
def activation_metrics(tr: HookTrainer, x: Tensor, chunk: int = 4096) -> dict[str, float]:
    """FVU, L0, MSE (raw space), loss (the training objective without TERM or the aux loss, in the
    scaled space) and the share of latents that never fire, of `tr`'s SAE on raw activations `x`."""
    form = tr.form
    lam = tr.lam.lam
    sse = l0 = sparsity = 0.0
    fired = torch.zeros(form.d_sae, dtype=torch.bool, device=form.W_dec.device)
    xs_all = x.to(form.W_dec.device, torch.float32) * tr.act_scale
    for s in range(0, xs_all.shape[0], chunk):
        xs = xs_all[s : s + chunk]
        f = form.encode(xs)
        sse += float((xs - form.decode(f)).pow(2).sum(dtype=torch.float64))
        l0 += float((f != 0).sum(dtype=torch.float64))
        if tr.arch == "relu":
            sparsity += float(f.sum(dtype=torch.float64))
        elif tr.arch == "jumprelu":
            sparsity += float((f != 0).sum(dtype=torch.float64))
        fired |= (f != 0).any(0)
    n = xs_all.shape[0]
    var = float((xs_all.double() - xs_all.double().mean(0)).pow(2).sum())
    return {
        "fvu": sse / max(var, 1e-12),
        "l0": l0 / n,
        "mse": sse / n / tr.act_scale**2,
        "loss": (sse + lam * sparsity) / n,
        "dead": float((~fired).double().mean()),
    }


def _read_all(cache: Path, hooks: Sequence[str]) -> Batch:
    info = open_cache(cache)
    return next(iter_cache_batches(cache, hooks, info.n_tokens, seed=0))


def split_validation(tokenizer: Any, texts: Sequence[str], val_tokens: int) -> tuple[list[str], list[str]]:
    """(train, held-out): the last documents of `texts` until they hold `val_tokens` tokens."""
    texts = list(texts)
    if val_tokens <= 0:
        return texts, []
    got, cut = 0, len(texts)
    while cut > 1 and got < val_tokens:
        cut -= 1
        got += len(tokenizer(texts[cut], add_special_tokens=False)["input_ids"])
    if cut < len(texts) // 2:
        raise TrainingError(
            f"train.pretrain_val_tokens={val_tokens} would hold out more than half of the {len(texts)} "
            f"pretraining documents ({got} tokens in the last {len(texts) - cut}); lower it"
        )
    return texts[:cut], texts[cut:]


# ---------------------------------------------------------------------------------------------
# The stage


def pretrain_gsaes(cfg: Config, lm: Any, texts: Sequence[str], progress: bool = True) -> Path:
    """Train one GSAE of architecture `cfg.sae.arch` per `cfg.sae.hooks` on `texts` (general text;
    the activations of at most `pretrain_tokens` tokens, cached; `pretrain_lam` is the L1 or L0
    coefficient). Returns a folder with one sae-lens SAE folder per hook, named by the hook, plus
    `history.json` (and `validation.json` with a validation curve); reused when its inputs are
    unchanged."""
    hooks = list(cfg.sae.hooks)
    t = cfg.train
    plan = PretrainPlan.from_config(t)
    plan.check(t.pretrain_val_tokens > 0)
    tc = with_train(t, lr=t.pretrain_lr, lam=t.pretrain_lam, steps=t.pretrain_steps, tilt=0.0, l0_band=None,
                    warmup_steps=0, decay_steps=0)  # fmt: skip

    def build(tmp: Path) -> dict[str, Any]:
        t0 = time.perf_counter()
        train_texts, val_texts = split_validation(lm.tokenizer, texts, t.pretrain_val_tokens)
        cache = cache_activations(
            cfg, lm, train_texts, hooks, max_tokens=t.pretrain_tokens, progress=progress
        )
        info = open_cache(cache)
        validate, val_cache = None, None
        if val_texts:
            val_cache = cache_activations(cfg, lm, val_texts, hooks, max_tokens=t.pretrain_val_tokens,
                                          progress=progress)  # fmt: skip
            validate = _validator(cfg, lm, val_cache, val_texts, hooks, plan.ce_every > 0)
        t_capture = time.perf_counter() - t0
        saes = {}
        for i, h in enumerate(hooks):
            c = act_scale(info.d[h], info.mean_sq_norm[h]) if tc.scale_activations else 1.0
            # JumpReLU starts at sae-lens' jumprelu_init_threshold (0.01 in the scaled space)
            sae = make_random_sae(info.d[h], cfg.sae.d_sae, h, seed=cfg.seed + 1000 * tc.seed + i,
                                  arch=cfg.sae.arch, k=cfg.sae.k, threshold=0.01 / c)  # fmt: skip
            sae.cfg.metadata.model_name = cfg.model.source
            sae.cfg.metadata.prepend_bos = cfg.model.prepend_bos
            if tc.scale_activations:
                sae.cfg.metadata.act_scale = c
            saes[h] = sae
        batches = iter_cache_batches(cache, hooks, tc.batch_tokens, seed=tc.seed)
        first = next(iter_cache_batches(cache, hooks, tc.batch_tokens, seed=tc.seed))
        trainers = make_trainers(tc, saes, first, str(lm.device))
        resample_it = iter_cache_batches(
            cache, hooks, min(tc.batch_tokens * 4, info.n_tokens), seed=tc.seed + 7919
        )
        res = train_gsaes(
            trainers, batches, plan, validate, lambda: next(resample_it), progress, seed=cfg.seed
        )
        for h, tr in trainers.items():
            save_sae(tr.export().to("cpu"), tmp / h)
        (tmp / "history.json").write_text(json.dumps(res.history))
        last = res.history[-1]
        out: dict[str, Any] = {
            "hooks": hooks, "d_sae": cfg.sae.d_sae, "steps": res.steps, "activations": str(cache),
            "final": {h: {k: last[f"{h}/{k}"] for k in ("l0", "fvu", "dead", "mse")} for h in hooks},
            "tokens_seen": res.tokens, "corpus_tokens": info.n_tokens, "epochs": res.tokens / info.n_tokens,
            "stop_reason": res.stop_reason, "converged": res.stop_reason == "converged",
            "stable_end_step": res.stable_end, "resamples": res.resamples,
            "seconds_capture": round(t_capture, 1), "seconds_train": round(time.perf_counter() - t0 - t_capture, 1),
            "plan": dataclasses.asdict(plan),
        }  # fmt: skip
        if res.curve:
            (tmp / "validation.json").write_text(json.dumps(res.curve))
            fin = res.curve[-1]
            out.update(validation=str(val_cache), validation_curve=res.curve,
                       final_validation={h: fin[h] for h in hooks})  # fmt: skip
        return out

    return run_stage(cfg.root, "gsae_pretrain", pretrain_key(cfg, texts), build)


def _validator(
    cfg: Config, lm: Any, val_cache: Path, val_texts: list[str], hooks: list[str], ce: bool
) -> Validate:
    x = _read_all(val_cache, hooks)
    ts = None
    if ce:
        from ssae_ray.eval.evaluate import prepare_test_set

        ts = prepare_test_set(lm, "pretrain-val", val_texts, hooks, cfg.model.context_len,
                              cfg.train.pretrain_ce_tokens, cfg.eval.batch_size, cfg.model.prepend_bos)  # fmt: skip

    def validate(trainers: dict[str, HookTrainer], with_ce: bool) -> dict[str, dict[str, float]]:
        out = {h: activation_metrics(tr, x[h]) for h, tr in trainers.items()}
        if with_ce and ts is not None:
            from ssae_ray.eval.evaluate import evaluate_sae

            for h, tr in trainers.items():
                out[h]["ce"] = evaluate_sae(lm, tr.export(), h, ts, cfg.eval.batch_size).ce_spliced
        return out

    return validate


def curve_table(curve: list[dict[str, Any]], hooks: Sequence[str]) -> str:
    """The validation curve as a markdown table (README / notes)."""
    keys = ["fvu", "l0", "dead", "loss", "ce"]
    rows = [
        "| step | tokens | lr | phase | hook | " + " | ".join(keys) + " |",
        "|" + " --- |" * (5 + len(keys)),
    ]
    for p in curve:
        for h in hooks:
            v = p.get(h, {})
            cells = [f"{v[k]:.4g}" if k in v and np.isfinite(v[k]) else "–" for k in keys]
            rows.append(
                f"| {p['step']} | {p['tokens']} | {p['lr']:.3g} | {p['phase']} | `{h}` | "
                + " | ".join(cells)
                + " |"
            )
    return "\n".join(rows)
