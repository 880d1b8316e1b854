"""GSAE pretraining from scratch (for presets without published GSAEs, e.g. `local`), with the
same loop as finetuning: random init as in sae-lens / Anthropic's April update (unit-norm decoder
rows, W_enc = W_dec^T, zero biases), activations scaled so E||x||^2 = d_in (the scale is folded
into the saved SAE, see `loop`), ERM at `pretrain_lam`, lr `pretrain_lr` decayed linearly over
the last fifth of `pretrain_steps`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ssae_ray.config import Config
from ssae_ray.saes import make_random_sae, save_sae
from ssae_ray.stages import run_stage, stage_key
from ssae_ray.training.cache import cache_activations, iter_cache_batches, open_cache
from ssae_ray.training.loop import act_scale, make_trainers, run_steps, with_train


def pretrain_key(cfg: Config, texts: Sequence[str]) -> str:
    h = hashlib.sha256("\0".join(texts).encode()).hexdigest()
    t = cfg.train
    # (the 4 stands where the removed, never-read train.shuffle_buffer_batches was: existing
    # pretrained GSAEs keep their key)
    return stage_key(
        "gsae-pretrain-v1", cfg.model.source, cfg.model.tiny_arch, cfg.model.dtype, cfg.model.context_len,
        list(cfg.sae.hooks), cfg.sae.d_sae, h, t.pretrain_steps, t.pretrain_lr, t.pretrain_lam,
        t.pretrain_tokens, t.batch_tokens, 4, t.scale_activations, cfg.seed, t.seed,
    )  # fmt: skip


def pretrain_gsaes(cfg: Config, lm: Any, texts: Sequence[str], progress: bool = True) -> Path:
    """Train one GSAE per `cfg.sae.hooks` on `texts` (general text; at most `pretrain_tokens`
    tokens, cached). Returns a folder with one sae-lens SAE folder per hook, named by the hook,
    plus `history.json`; reused when its inputs are unchanged."""
    hooks = list(cfg.sae.hooks)
    tc = with_train(
        cfg.train, lr=cfg.train.pretrain_lr, lam=cfg.train.pretrain_lam, steps=cfg.train.pretrain_steps,
        decay_steps=max(cfg.train.pretrain_steps // 5, 1), tilt=0.0, l0_band=None,
    )  # fmt: skip

    def build(tmp: Path) -> dict[str, Any]:
        cache = cache_activations(
            cfg, lm, texts, hooks, max_tokens=cfg.train.pretrain_tokens, progress=progress
        )
        info = open_cache(cache)
        saes = {}
        for i, h in enumerate(hooks):
            sae = make_random_sae(info.d[h], cfg.sae.d_sae, h, seed=cfg.seed + 1000 * tc.seed + i)
            sae.cfg.metadata.model_name = cfg.model.source
            if tc.scale_activations:
                sae.cfg.metadata.act_scale = act_scale(info.d[h], info.mean_sq_norm[h])
            saes[h] = sae
        batches = iter_cache_batches(cache, hooks, tc.batch_tokens, seed=tc.seed)
        first = next(iter_cache_batches(cache, hooks, tc.batch_tokens, seed=tc.seed))
        trainers = make_trainers(tc, saes, first, str(lm.device))
        history = run_steps(trainers, batches, 0, tc.steps, progress=progress, desc="pretrain GSAEs")
        for h, tr in trainers.items():
            save_sae(tr.export().to("cpu"), tmp / h)
        (tmp / "history.json").write_text(json.dumps(history))
        last = history[-1]
        return {
            "hooks": hooks, "d_sae": cfg.sae.d_sae, "steps": len(history), "activations": str(cache),
            "final": {h: {k: last[f"{h}/{k}"] for k in ("l0", "fvu", "dead", "mse")} for h in hooks},
        }  # fmt: skip

    return run_stage(cfg.root, "gsae_pretrain", pretrain_key(cfg, texts), build)
