"""Shared set-up of the auto-interp tests and benchmark: the tiny LM, a sparse random SAE, texts."""

from __future__ import annotations

import random
from pathlib import Path

import torch

from ssae_ray.config import Config, load_config
from ssae_ray.models import LM, capture, load_lm, tokenize_docs
from ssae_ray.saes import make_random_sae

HOOK = "blocks.1.hook_resid_post"
KEY = "sk-ant-test-SECRET123"

_WORDS = (
    "quantum field electron photon energy momentum charge river city market bread fish fruit king "
    "queen music painting poetry symphony orchestra history laws wars morning people old"
).split()


def make_texts(n: int = 60, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(12, 24))) + "." for _ in range(n)]


def tiny_lm(folder: Path) -> LM:
    cfg = load_config("tiny", overrides=[f"workdir={folder}", "model.precision=fp32"])  # exact comparisons
    return load_lm(cfg.model, folder / "models")


def sparse_sae(lm: LM, texts: list[str], d_sae: int = 128, quantile: float = 0.97, seed: int = 0):
    """A random SAE whose encoder bias puts each feature's threshold at a high quantile of its
    pre-activations, so features are sparse and token-selective."""
    sae = make_random_sae(lm.d_model, d_sae, HOOK, seed=seed)
    batch = tokenize_docs(lm.tokenizer, texts[:16], 32)
    x = capture(lm, batch.input_ids, batch.attention_mask, [HOOK])[HOOK][:, 1:]
    x = x[batch.attention_mask[:, 1:].bool()]
    with torch.no_grad():
        pre = x @ sae.W_enc
        sae.b_enc.copy_(-torch.quantile(pre, quantile, dim=0))
    return sae


def ai_config(workdir: Path, **autointerp) -> Config:
    base = {
        "max_features": 8,
        "n_top": 5,
        "n_predict": 3,
        "window": 16,
        "num_actors": 2,
        "max_concurrency": 4,
        "retry_base_s": 0.01,
        "requests_per_minute": 100_000,
        "tokens_per_minute": 100_000_000,
        "cache_path": str(workdir / "cache.sqlite"),
    }
    base.update(autointerp)
    overrides = [f"workdir={workdir}", "model.context_len=32", "model.batch_size=16"]
    overrides += [f"autointerp.{k}={v if v is not None else 'null'}" for k, v in base.items()]
    return load_config("tiny", overrides=overrides)
