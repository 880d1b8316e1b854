"""Ray Train finetuning: a killed worker resumes from its checkpoint and ends where an
uninterrupted run ends; data-parallel replicas take the single-process step."""

from __future__ import annotations

import json

import pytest
from sae_lens import SAE

from ssae_ray.saes import load_sae
from ssae_ray.training import finetune
from ssae_ray.training.cache import cache_activations
from ssae_ray.training.pretrain import pretrain_gsaes
from ssae_ray.training.ray_train import run_finetune

pytestmark = [pytest.mark.ray]

TEXTS = [
    "Energy and momentum are conserved in every collision of particles. " * 3,
    "The river runs through the old city where people sell bread and fish. " * 3,
    "Music, painting and poetry flourished; the composer wrote a symphony. " * 3,
] * 20


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from ssae_ray.config import load_config
    from ssae_ray.models import load_lm

    root = tmp_path_factory.mktemp("ray_train")
    # precision fp32: the runs are compared exactly
    cfg = load_config("tiny", overrides=[f"workdir={root}", "train.steps=12", "train.checkpoint_every=4",
                                         "train.pretrain_steps=10", "train.tilt=1.0", "train.max_failures=2",
                                         "model.precision=fp32", "train.precision=fp32"])  # fmt: skip
    lm = load_lm(cfg.model, cache_dir=root / "models")
    gsaes = pretrain_gsaes(cfg, lm, TEXTS, progress=False)
    cache = cache_activations(cfg, lm, TEXTS, cfg.sae.hooks, progress=False)
    return cfg, gsaes, cache, root


def _assert_same(out, ref, hooks, atol, max_lr_steps=None):
    """Weights equal within `atol`. With `max_lr_steps` (data parallel: gradients summed over two
    half-batches differ from the whole batch's in the last bits, and Adam turns a near-zero
    gradient's noise into a step of up to lr), at most 1% of entries may differ by more, each by
    at most lr · steps."""
    for h in hooks:
        got = SAE.load_from_disk(out / h)
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            diff = (getattr(got, name) - getattr(ref.saes[h], name)).abs()
            if max_lr_steps is None:
                assert diff.max() <= atol, (h, name, float(diff.max()))
            else:
                assert (diff > atol).float().mean() < 0.01 and diff.max() <= max_lr_steps, (h, name)


def test_killed_worker_resumes_and_matches_uninterrupted_run(setup, ray_local):
    cfg, gsaes, cache, root = setup
    hooks = list(cfg.sae.hooks)
    out = run_finetune(cfg, gsaes, cache, root / "out", num_workers=2, placement="by_hook", fail_at_step=6)
    man = json.loads((out / "manifest.json").read_text())
    assert man["placement"] == "by_hook" and man["steps"] == 12 and man["injected_failure"]
    history = json.loads((out / "history.json").read_text())
    assert [int(m["step"]) for m in history] == list(range(12))
    assert all(f"{h}/l0" in history[-1] for h in hooks)
    # checkpoints in Ray's storage hold sae-lens SAEs plus the trainer state
    ckpt = man["checkpoint"]
    for h in hooks:
        assert SAE.load_from_disk(f"{ckpt}/{h}").cfg.metadata.hook_name == h
    # the uninterrupted single-process run on the same cache ends at the same weights
    ref = finetune(cfg, {h: load_sae(gsaes / h) for h in hooks}, cache, progress=False)
    _assert_same(out, ref, hooks, atol=1e-5)


def test_data_parallel_replicas_take_the_single_process_step(setup, ray_local):
    cfg, gsaes, cache, root = setup
    hooks = list(cfg.sae.hooks)[:1]
    cfg = cfg.replace(sae={"hooks": hooks}, train={"steps": 20, "checkpoint_every": 10, "tilt_mode": "scaled",
                                                   "l0_band": [1.0, 2.0], "dead_window_tokens": 512})  # fmt: skip
    out = run_finetune(cfg, gsaes, cache, root / "out_dp", num_workers=2)
    assert json.loads((out / "manifest.json").read_text())["placement"] == "data_parallel"
    ref = finetune(cfg, {h: load_sae(gsaes / h) for h in hooks}, cache, progress=False)
    # loss scale, λ's L0 and dead counters from the global batch: equal to float error at every step
    _assert_same(out, ref, hooks, atol=1e-5)
    history = json.loads((out / "history.json").read_text())
    for a, b in zip(history, ref.history, strict=True):
        assert a[f"{hooks[0]}/lam"] == pytest.approx(b[f"{hooks[0]}/lam"], rel=1e-9)
        assert a["dead"] == b["dead"] and a["l0"] == pytest.approx(b["l0"], rel=1e-5)
