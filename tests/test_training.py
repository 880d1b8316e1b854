"""Training: losses, the multi-SAE loop, the activation cache, GSAE pretraining (no Ray)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from sae_lens import SAE

from ssae_ray.config import ConfigError
from ssae_ray.saes import make_random_sae
from ssae_ray.training import finetune
from ssae_ray.training.cache import (
    cache_activations,
    iter_cache_batches,
    lm_activations,
    lm_batches,
    open_cache,
    shuffle_buffer,
)
from ssae_ray.training.loop import HookTrainer, export_sae, lr_at, with_train
from ssae_ray.training.losses import (
    AdaptiveLambda,
    TrainingError,
    project_decoder_grad,
    sae_forward,
    sae_loss,
    sae_loss_and_grads,
    term_loss,
    term_weights,
    tilted_loss,
)
from ssae_ray.training.pretrain import pretrain_gsaes
from ssae_ray.training.ray_train import assign_hooks, choose_placement, load_checkpoint, save_checkpoint

TEXTS = [
    "Energy and momentum are conserved in every collision of particles. " * 3,
    "The river runs through the old city where people sell bread and fish. " * 3,
    "The quantum field of the electron interacts with the photon in a box. " * 3,
    "Music, painting and poetry flourished; the composer wrote a symphony. " * 3,
] * 20


def synthetic(n_batches: int, n: int = 128, d: int = 32, hooks=("a", "b"), seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(64, d, generator=g)
    out = []
    for _ in range(n_batches):
        codes = torch.rand(n, 64, generator=g) * (torch.rand(n, 64, generator=g) < 0.08)
        out.append(
            {h: codes @ dirs * (1 + i) + 0.05 * torch.randn(n, d, generator=g) for i, h in enumerate(hooks)}
        )
    return out


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny steps: see conftest


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    from ssae_ray.config import load_config
    from ssae_ray.models import load_lm

    cfg = load_config("tiny")
    return load_lm(cfg.model, cache_dir=tmp_path_factory.mktemp("models"))


# --------------------------------------------------------------------------------------------- losses


def test_term_is_erm_at_zero_and_max_at_large_tilt():
    losses = torch.tensor([1.0, 2.0, 3.0, 10.0])
    assert term_loss(losses, 0.0).item() == losses.mean().item()
    for t in (1e-6, 1e-3, 0.5):  # against the definition in float64 (fine at these t)
        ref = math.log(sum(math.exp(t * v) for v in losses.tolist()) / 4) / t
        assert term_loss(losses.double(), t).item() == pytest.approx(ref, rel=1e-9)
    # small t in float32: mean + t var / 2, no cancellation of log N against t mean(L)
    assert term_loss(losses, 1e-6).item() - 4.0 == pytest.approx(1e-6 / 2 * 12.5, rel=1e-2)
    vals = [term_loss(losses, t).item() for t in (0.1, 1.0, 10.0, 100.0)]
    assert vals == sorted(vals) and vals[0] > 4.0
    assert term_loss(losses, 1e9).item() == pytest.approx(10.0, rel=1e-6)


def test_term_finite_with_finite_gradients_at_huge_tilt_and_large_losses():
    for t in (1e-3, 1.0, 500.0, 1e9):
        losses = (torch.rand(4096, generator=torch.Generator().manual_seed(0)) * 900 + 100).requires_grad_()
        out = term_loss(losses, t)
        out.backward()
        assert torch.isfinite(out) and torch.isfinite(losses.grad).all()
        # the gradient is softmax(t L): weights summing to one
        assert losses.grad.sum().item() == pytest.approx(1.0, abs=1e-5)
        assert torch.allclose(losses.grad, term_weights(losses.detach(), t), atol=1e-6)
    assert losses.grad.argmax() == losses.detach().argmax() and losses.grad.max().item() == pytest.approx(1.0)


def test_scaled_tilt_is_scale_free():
    losses = torch.rand(256, generator=torch.Generator().manual_seed(1)) * 5 + 1
    a = losses.clone().requires_grad_()
    b = (losses * 100).requires_grad_()
    tilted_loss(a, 2.0, "scaled", float(losses.mean())).backward()
    tilted_loss(b, 2.0, "scaled", float(losses.mean() * 100)).backward()
    assert torch.allclose(a.grad, b.grad, atol=1e-6)  # same token weights at any loss scale
    assert tilted_loss(losses, 0.0, "scaled", 3.0).item() == pytest.approx(losses.mean().item())


def test_negative_lam_and_tilt_are_refused(tiny_cfg):
    saes = {"a": make_random_sae(32, 64, "a")}
    # refused when the config is loaded, and again by the loop for configs built in code (the sweep's)
    with pytest.raises(ConfigError, match="train.lam=-1.0: must be >= 0"):
        tiny_cfg.replace(train={"lam": -1.0})
    with pytest.raises(TrainingError, match="lam .* >= 0"):
        finetune(with_train(tiny_cfg.train, lam=-1.0), saes, synthetic(2, hooks=("a",)), progress=False)
    with pytest.raises(TrainingError, match="tilt must be >= 0"):
        finetune(with_train(tiny_cfg.train, tilt=-0.5), saes, synthetic(2, hooks=("a",)), progress=False)
    with pytest.raises(TrainingError, match="tilt must be >= 0"):
        term_loss(torch.ones(3), -1.0)


def test_sae_forward_matches_sae_lens():
    sae = make_random_sae(16, 48, "h", seed=3)
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_()
    x = torch.randn(10, 16)
    out = sae_forward(x, sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec)
    assert torch.allclose(out.f, sae.encode(x), atol=1e-5)
    assert torch.allclose(out.x_hat, sae.decode(sae.encode(x)), atol=1e-5)
    tl = sae_loss(x, out, 2.0)
    assert torch.allclose(tl.loss, ((x - out.x_hat) ** 2).sum(-1) + 2.0 * out.f.abs().sum(-1))


@pytest.mark.parametrize(("tilt", "mode"), [(0.0, "raw"), (0.05, "raw"), (1e9, "raw"), (2.0, "scaled")])
def test_hand_written_backward_equals_autograd(tilt, mode):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 16, generator=g) * 4
    ps = [torch.randn(16, 48, generator=g) * 0.3, torch.randn(48, generator=g) * 0.1,
          torch.nn.functional.normalize(torch.randn(48, 16, generator=g), dim=1), torch.randn(16, generator=g)]  # fmt: skip

    def objective(losses):
        return tilted_loss(losses, tilt, mode, 30.0)

    fast = sae_loss_and_grads(x, *ps, 0.7, objective)
    leaves = [p.clone().requires_grad_() for p in ps]
    tl = sae_loss(x, sae_forward(x, *leaves), 0.7)
    obj = objective(tl.loss)
    obj.backward()
    assert torch.allclose(fast.objective, obj.detach(), rtol=1e-5)
    assert torch.allclose(fast.losses.loss, tl.loss.detach(), rtol=1e-5)
    for mine, leaf in zip(fast.grads, leaves, strict=True):
        assert torch.allclose(mine, leaf.grad, rtol=1e-4, atol=1e-5)


def test_decoder_grad_projection_and_unit_norm_rows(tiny_cfg):
    w = torch.nn.functional.normalize(torch.randn(8, 5), dim=1).requires_grad_()
    w.grad = torch.randn(8, 5)
    project_decoder_grad(w)
    assert torch.allclose((w.grad * w).sum(1), torch.zeros(8), atol=1e-6)
    cfg = tiny_cfg.replace(train={"lr": 1e-2, "steps": 15})
    res = finetune(cfg, {"a": make_random_sae(32, 64, "a")}, synthetic(40, hooks=("a",)), progress=False)
    norms = res.saes["a"].W_dec.detach().norm(dim=1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)
    assert len(res.history) == 15 and res.history[-1]["a/fvu"] < res.history[0]["a/fvu"]


def test_adaptive_lambda_moves_l0_into_band(tiny_cfg):
    ctl = AdaptiveLambda(1.0, (5.0, 10.0), 0.1)
    assert ctl.update(20.0) == pytest.approx(1.1) and ctl.update(7.0) == pytest.approx(1.1)
    assert ctl.update(1.0) == pytest.approx(1.0)
    cfg = tiny_cfg.replace(train={"lr": 5e-3, "steps": 150, "decay_steps": 0, "lam": 0.05, "l0_band": [4.0, 8.0],
                                  "adapt_rate": 0.05, "batch_tokens": 128})  # fmt: skip
    saes = {"a": make_random_sae(32, 64, "a")}
    res = finetune(cfg, saes, synthetic(160, hooks=("a",)), progress=False)
    assert res.history[0]["a/l0"] > 15  # started far above the band
    tail = [m["a/l0"] for m in res.history[-10:]]
    assert 3.0 <= sum(tail) / len(tail) <= 9.0, tail
    assert res.history[-1]["a/lam"] > 0.05


def test_nan_batch_is_reported_not_trained_on(tiny_cfg):
    sae = make_random_sae(32, 64, "a")
    batches = synthetic(3, hooks=("a",))
    batches[1]["a"][5, 3] = float("nan")
    tc = with_train(tiny_cfg.train, batch_tokens=128)
    tr = HookTrainer(tc, sae, "a", 1.0)
    tr.apply(tr.step(batches[0]["a"], 1e-3, 0))
    before = [p.detach().clone() for p in tr.params]
    with pytest.raises(TrainingError, match=r"step 1, hook a: 1 of 128 activation rows hold NaN"):
        tr.step(batches[1]["a"], 1e-3, 1)
    assert all(torch.equal(a, b) for a, b in zip(before, tr.params, strict=True))


def test_scale_is_folded_into_the_saved_sae():
    g = torch.Generator().manual_seed(0)
    W_enc, W_dec = torch.randn(16, 40, generator=g), torch.nn.functional.normalize(torch.randn(40, 16), dim=1)
    b_enc, b_dec = torch.randn(40, generator=g), torch.randn(16, generator=g)
    c = 0.3
    sae = export_sae(W_enc, b_enc, W_dec, b_dec, "h", c)
    x = torch.randn(7, 16, generator=g) * 10
    scaled = sae_forward(x * c, W_enc, b_enc, W_dec, b_dec)
    assert torch.allclose(sae.encode(x), scaled.f / c, atol=1e-4)
    assert torch.allclose(sae.decode(sae.encode(x)), scaled.x_hat / c, atol=1e-4)
    assert sae.cfg.metadata.act_scale == c and torch.allclose(sae.W_dec.norm(dim=1), torch.ones(40))


def test_lr_schedule():
    from ssae_ray.config import TrainConfig

    tc = TrainConfig(lr=1.0, steps=10, decay_steps=4, lr_end=0.0)
    assert [lr_at(tc, s) for s in range(10)] == [1, 1, 1, 1, 1, 1, 1.0, 0.75, 0.5, 0.25]


# --------------------------------------------------------------------------------------------- multi-SAE


def test_one_forward_feeding_k_saes_equals_k_single_hook_runs(tiny_cfg, lm):
    hooks = list(tiny_cfg.sae.hooks)
    cfg = tiny_cfg.replace(train={"steps": 6, "batch_tokens": 64, "tilt": 1.0})
    saes = {h: make_random_sae(lm.d_model, 96, h, seed=i) for i, h in enumerate(hooks)}

    def stream(hs):
        return lm_batches(cfg, lm, TEXTS, hs)

    joint = finetune(cfg, saes, stream(hooks), progress=False)
    for h in hooks:
        single = finetune(cfg, {h: saes[h]}, stream([h]), progress=False)
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            assert torch.allclose(getattr(joint.saes[h], name), getattr(single.saes[h], name), atol=1e-6), (
                h,
                name,
            )
        assert [m[f"{h}/loss"] for m in joint.history] == [m[f"{h}/loss"] for m in single.history]


def test_shuffle_buffer_emits_every_token_once():
    stream = [{"a": torch.arange(s, s + 50).float()[:, None], "b": -torch.arange(s, s + 50).float()[:, None]}
              for s in range(0, 500, 50)]  # fmt: skip
    out = list(shuffle_buffer(iter(stream), 64, 3, seed=0))
    assert all(b["a"].shape == (64, 1) for b in out) and len(out) == 500 // 64
    seen = torch.cat([b["a"] for b in out]).flatten()
    assert len(set(seen.tolist())) == len(seen) and torch.equal(
        torch.cat([b["b"] for b in out]).flatten(), -seen
    )
    assert not torch.equal(seen[:64], torch.arange(64.0))  # shuffled


# --------------------------------------------------------------------------------------------- cache


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_cache_round_trip_and_deterministic_order(tiny_cfg, lm, dtype):
    hooks = list(tiny_cfg.sae.hooks)
    cfg = tiny_cfg.replace(train={"cache_dtype": dtype, "cache_shard_tokens": 300})
    path = cache_activations(cfg, lm, TEXTS, hooks, max_tokens=1000, progress=False)
    info = open_cache(path)
    assert info.n_tokens == 1000 and info.shards == [300, 300, 300, 100] and info.dtype == dtype
    assert all((path / h / "shard_00003.npy").is_file() for h in hooks)
    assert cache_activations(cfg, lm, TEXTS, hooks, max_tokens=1000) == path  # reused
    # rows equal a direct capture (position 0 dropped), to the storage precision
    direct = torch.cat([a[hooks[2]] for a, _ in lm_activations(cfg, lm, TEXTS, hooks, 1000)])
    tol = 2e-2 if dtype == "bfloat16" else 2e-3
    all_rows = next(iter_cache_batches(path, hooks[2:], 1000, seed=0))[hooks[2]]
    perm = torch.randperm(1000, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(all_rows, direct[perm], rtol=tol, atol=tol)
    assert (np.load(path / "tokens.npy")[:, 2] > 0).all()  # no position 0 (columns: token, doc, position)
    # order is a function of (seed, step): resuming at step 7 reads what step 7 read
    it = iter_cache_batches(path, hooks, 128, seed=3)
    run = [next(it) for _ in range(9)]  # crosses an epoch (7 batches per epoch)
    again = next(iter_cache_batches(path, hooks, 128, seed=3, start_step=7))
    assert all(torch.equal(run[7][h], again[h]) for h in hooks)
    halves = [
        next(iter_cache_batches(path, hooks, 128, seed=3, start_step=7, rank=r, world=2)) for r in (0, 1)
    ]
    assert torch.equal(torch.cat([halves[0][hooks[0]], halves[1][hooks[0]]]), run[7][hooks[0]])
    with pytest.raises(TrainingError, match="no hook 'blocks.9.hook_mlp_out'"):
        next(iter_cache_batches(path, ["blocks.9.hook_mlp_out"], 128))


def test_finetune_from_cache_path(tiny_cfg, lm):
    hooks = list(tiny_cfg.sae.hooks)[:2]
    path = cache_activations(tiny_cfg, lm, TEXTS, hooks, progress=False)
    saes = {h: make_random_sae(lm.d_model, 64, h, seed=i) for i, h in enumerate(hooks)}
    seen = []
    res = finetune(tiny_cfg, saes, path, callback=lambda s, m: seen.append((s, m["l0"])), progress=False)
    assert [s for s, _ in seen] == list(range(tiny_cfg.train.steps)) and len(
        res.history
    ) == tiny_cfg.train.steps
    assert {"tokens_per_s", "lr", f"{hooks[0]}/dead", f"{hooks[1]}/l0"} <= set(res.history[-1])


# --------------------------------------------------------------------------------------------- pretrain / resume


def test_pretrain_gsaes_folder_loads_in_sae_lens(tiny_cfg, lm):
    cfg = tiny_cfg.replace(train={"pretrain_steps": 30, "pretrain_tokens": 2000})
    out = pretrain_gsaes(cfg, lm, TEXTS, progress=False)
    man = json.loads((out / "manifest.json").read_text())
    hist = json.loads((out / "history.json").read_text())
    assert len(hist) == 30
    for h in cfg.sae.hooks:
        sae = SAE.load_from_disk(out / h)
        assert sae.cfg.d_sae == cfg.sae.d_sae and sae.cfg.metadata.hook_name == h
        assert math.isclose(sae.W_dec.norm(dim=1).mean().item(), 1.0, rel_tol=1e-5)
        assert man["final"][h]["fvu"] < hist[0][f"{h}/fvu"]
    assert pretrain_gsaes(cfg, lm, TEXTS, progress=False) == out  # cached


def test_checkpoint_round_trip_and_width_mismatch_refused(tiny_cfg, tmp_path):
    tc = with_train(tiny_cfg.train, lr=1e-2)
    batches = synthetic(3, hooks=("a",))
    tr = HookTrainer(tc, make_random_sae(32, 64, "a"), "a", 0.5)
    for s in range(2):
        tr.apply(tr.step(batches[s]["a"], 1e-2, s))
    save_checkpoint(tmp_path, {"a": tr}, step=2)
    assert SAE.load_from_disk(tmp_path / "a").cfg.d_sae == 64
    back = HookTrainer(tc, make_random_sae(32, 64, "a", seed=9), "a", 0.5)
    assert load_checkpoint(tmp_path, {"a": back}) == 2
    for p, q in zip(tr.params, back.params, strict=True):
        assert torch.allclose(p, q, atol=1e-6)
    narrow = HookTrainer(tc, make_random_sae(32, 48, "a"), "a", 0.5)
    with pytest.raises(TrainingError, match="width 64 .* this run trains width 48"):
        load_checkpoint(tmp_path, {"a": narrow})


def test_placement_rule_and_assignment():
    assert choose_placement("auto", 4, 2) == "by_hook" and choose_placement("auto", 1, 2) == "data_parallel"
    with pytest.raises(TrainingError, match="at least as many SAEs as workers"):
        choose_placement("by_hook", 1, 2)
    parts = assign_hooks({"a": 4, "b": 1, "c": 2, "d": 1}, 2)
    assert sorted(sum(parts, [])) == ["a", "b", "c", "d"] and np.isin(["a"], parts[0]).all()
