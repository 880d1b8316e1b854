"""Streaming evaluation: the same numbers as the whole-test-set implementation it replaced (kept
here, verbatim, as `_reference_*`), several SAEs scored in one pass over the test set, and peak RSS
that does not grow with the number of test tokens (measured in a subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from ssae_ray.eval import metrics
from ssae_ray.eval.evaluate import doc_counts, evaluate_sae, evaluate_saes_on, prepare_test_set
from ssae_ray.eval.splice import resid_hook_for, spliced_losses
from ssae_ray.models import (
    by_length,
    cap_tokens,
    iter_batches,
    sae_splice,
    token_losses,
    tokenize_docs,
    zero_splice,
)

TEXTS = [
    "The quantum field of the electron interacts with the photon. " * (1 + i % 3) + f"Note {i}."
    for i in range(7)
]
HOOKS = [
    "blocks.0.hook_resid_post",
    "blocks.1.hook_mlp_out",
    "blocks.1.hook_attn_out",
    "blocks.1.hook_resid_pre",
]


# ---------------------------------------------------------------------------------------------
# The implementation before streaming (whole-test-set activation tensors), as the reference.


def _reference_prepare(lm, texts, hooks, context_len, batch_size=8):
    tokens = by_length(cap_tokens(tokenize_docs(lm.tokenizer, list(texts), context_len), None))
    need = list(dict.fromkeys([*hooks, *(r for h in hooks if (r := resid_hook_for(h)))]))
    n, t = tokens.input_ids.shape
    acts = {h: torch.zeros(n, t, lm.d_model) for h in need}
    clean, mask = torch.zeros(n, t - 1), torch.zeros(n, t - 1, dtype=torch.bool)
    zero = {h: torch.zeros(n, t - 1) for h in hooks}
    s = 0
    for b in iter_batches(tokens, batch_size):
        k, w = b.input_ids.shape
        grabbed = {}

        def rec(h, grabbed=grabbed):
            def fn(x):
                grabbed[h] = x.detach().float().cpu()
                return x

            return fn

        out = token_losses(lm, b.input_ids, b.attention_mask, splice={h: rec(h) for h in need})
        clean[s : s + k, : w - 1], mask[s : s + k, : w - 1] = out.loss.cpu(), out.mask.cpu()
        for h in need:
            acts[h][s : s + k, :w] = grabbed[h]
        for h in hooks:
            r = resid_hook_for(h)
            z = spliced_losses(lm, h, zero_splice(), b.input_ids, b.attention_mask, grabbed[h],
                               grabbed[r] if r else None)  # fmt: skip
            zero[h][s : s + k, : w - 1] = z.loss.cpu()
        s += k
    return tokens, acts, clean, mask, zero


@torch.no_grad()
def _reference_eval(lm, sae, hook, ref, batch_size=8):
    tokens, acts, clean, mask, zero = ref
    pos = tokens.attention_mask.bool().clone()
    pos[:, 0] = False
    x = acts[hook][pos]
    fs, recon, counts, ent, mx = [], [], torch.zeros(sae.cfg.d_sae, dtype=torch.long), [], []
    for s in range(0, x.shape[0], 4096):
        f = sae.encode(x[s : s + 4096])
        recon.append(sae.decode(f).float())
        counts += (f != 0).sum(0)
        fs.append((f != 0).sum(-1))
        p = f.clamp_min(0) / f.clamp_min(0).sum(-1, keepdim=True).clamp_min(1e-12)
        ent.append(-(p * p.clamp_min(1e-30).log()).sum(-1))
        mx.append(f.max(-1).values)
    x_hat = torch.cat(recon)
    loss = torch.zeros_like(clean)
    r = resid_hook_for(hook)
    for s in range(0, tokens.input_ids.shape[0], batch_size):
        m = tokens.attention_mask[s : s + batch_size]
        w = int(m.sum(1).max())
        out = spliced_losses(lm, hook, sae_splice(sae), tokens.input_ids[s : s + batch_size, :w], m[:, :w],
                             acts[hook][s : s + batch_size, :w], acts[r][s : s + batch_size, :w] if r else None)  # fmt: skip
        loss[s : s + batch_size, : w - 1] = out.loss.cpu()
    return {
        "l0": float(torch.cat(fs).double().mean()), "mse": metrics.mse(x, x_hat), "fvu": metrics.fvu(x, x_hat),
        "ce_clean": metrics.mean_ce(clean, mask), "ce_spliced": metrics.mean_ce(loss, mask),
        "ce_zero": metrics.mean_ce(zero[hook], mask), "loss": loss, "feature_counts": counts,
        "token_ids": tokens.input_ids[pos], "sse": (x - x_hat).pow(2).sum(-1), "entropy": torch.cat(ent),
        "max_act": torch.cat(mx),
    }  # fmt: skip


@pytest.fixture(scope="module", params=["gpt_neox", "llama"])
def tiny(request, tmp_path_factory):
    from ssae_ray.config import ModelConfig
    from ssae_ray.models import load_lm

    lm = load_lm(
        ModelConfig(source="tiny", tiny_arch=request.param, precision="fp32"), tmp_path_factory.mktemp("m")
    )
    return lm


def test_streaming_eval_matches_the_whole_test_set_reference(tiny):
    """Every scalar and per-token output of the streaming evaluation equals the old implementation's
    (float tolerance), for each hook kind, one SAE at a time and several in one pass, with batch
    sizes that differ between preparation and scoring."""
    from ssae_ray.saes import make_random_sae

    lm = tiny
    ref = _reference_prepare(lm, TEXTS, HOOKS, 16, batch_size=8)
    ts = prepare_test_set(lm, "test", TEXTS, HOOKS, context_len=16, batch_size=8)
    assert not hasattr(ts, "acts")  # no whole-test-set activation tensor is kept
    assert torch.equal(ts.tokens.input_ids, ref[0].input_ids)
    torch.testing.assert_close(ts.clean, ref[2], atol=1e-5, rtol=1e-5)
    assert torch.equal(ts.mask, ref[3])
    for h in HOOKS:
        torch.testing.assert_close(ts.zero[h], ref[4][h], atol=1e-5, rtol=1e-5)
    saes = [(make_random_sae(lm.d_model, 96, h, seed=i), h) for i, h in enumerate(HOOKS)]
    together = evaluate_saes_on(lm, saes, ts, batch_size=3)
    for (sae, h), ev_multi in zip(saes, together, strict=True):
        want = _reference_eval(lm, sae, h, ref, batch_size=5)
        for ev in (evaluate_sae(lm, sae, h, ts, batch_size=5), ev_multi):
            assert ev.hook == h
            for k in ("l0", "mse", "fvu", "ce_clean", "ce_spliced", "ce_zero"):
                assert getattr(ev, k) == pytest.approx(want[k], rel=1e-5, abs=1e-6), (h, k)
            for k in ("loss", "sse", "entropy", "max_act"):
                torch.testing.assert_close(getattr(ev, k), want[k], atol=1e-4, rtol=1e-4, msg=f"{h} {k}")
            assert torch.equal(ev.feature_counts, want["feature_counts"]) and torch.equal(
                ev.token_ids, want["token_ids"]
            )
    # Per-document sums instead of per-token CE: the same CE and the same bootstrap CIs.
    docs = evaluate_saes_on(lm, saes, ts, batch_size=4, doc_loss=True)
    counts = doc_counts(ts)
    for full, d in zip(together, docs, strict=True):
        sums, n = metrics.doc_sums(full.loss, ts.mask, ts.tokens.doc_index, ts.n_docs)
        assert d.loss.shape == (ts.n_docs,) and np.allclose(d.loss.numpy(), sums, atol=1e-4)
        assert np.array_equal(counts.numpy(), n) and d.ce_spliced == pytest.approx(full.ce_spliced, rel=1e-6)
    a = metrics.ce_diff_ci(together[0].loss, together[1].loss, ts.mask, ts.tokens.doc_index, 200)
    b = metrics.ce_diff_ci(docs[0].loss, docs[1].loss, counts, None, 200)
    assert (a.value, a.lo, a.hi) == pytest.approx((b.value, b.lo, b.hi), abs=1e-6)
    light = evaluate_saes_on(lm, saes[:1], ts, per_token=False)[0]
    assert (
        light.sse.numel() == 0 and light.token_ids.numel() == 0 and light.l0 == pytest.approx(together[0].l0)
    )


_RSS_SCRIPT = textwrap.dedent(
    """
    import json, sys, threading, time
    import torch
    torch.set_num_threads(1)
    from ssae_ray.config import ModelConfig
    from ssae_ray.models import load_lm
    from ssae_ray.eval.evaluate import evaluate_saes_on, prepare_test_set
    from ssae_ray.saes import make_random_sae

    cache, base = sys.argv[1], int(sys.argv[2])
    lm = load_lm(ModelConfig(source="tiny", tiny_arch="gpt_neox", precision="fp32"), cache)
    hooks = ["blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"]
    saes = [(make_random_sae(lm.d_model, 256, h, seed=i), h) for i, h in enumerate(hooks)]
    peak = [0]

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    def sample():
        while True:
            peak[0] = max(peak[0], rss())
            time.sleep(0.002)

    threading.Thread(target=sample, daemon=True).start()
    out = {}
    for mult in (1, 8):  # 1x first: its peak is the bar; 8x may reuse what 1x freed, never less
        texts = [f"Document {i} about the quantum field of particle {i % 97} and wave {i % 13}. " * 12
                 for i in range(base * mult)]
        time.sleep(0.05)
        peak[0] = rss()
        ts = prepare_test_set(lm, "test", texts, hooks, 64, batch_size=8)
        evs = evaluate_saes_on(lm, saes, ts, batch_size=8, per_token=False)
        time.sleep(0.05)
        out[mult] = {"tokens": int(ts.tokens.attention_mask.sum()), "peak": peak[0], "l0": evs[0].l0}
        del ts, evs, texts
    print(json.dumps(out))
    """
)


def _peak_rss(tmp_path, base: int) -> dict[str, dict]:
    """Peak RSS (sampled every 2 ms from /proc) while preparing and scoring a test set of `base`
    documents, then one of 8 x `base` documents, in one fresh process."""
    from ssae_ray.config import ModelConfig
    from ssae_ray.models import load_lm

    load_lm(ModelConfig(source="tiny", tiny_arch="gpt_neox", precision="fp32"), tmp_path)  # build once
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(tmp_path), str(base)], env=env,
                         capture_output=True, text=True, timeout=600, check=True)  # fmt: skip
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["8"]["tokens"] > 7 * got["1"]["tokens"]
    return got


def test_eval_peak_rss_does_not_grow_with_the_test_set(tmp_path):
    """The same evaluation at 1x and 8x the test tokens: peak RSS within 1.2x (about 1.4k and 11k
    tokens here; the slow variant scales to where the old whole-set activations would not fit)."""
    got = _peak_rss(tmp_path, 8)
    assert got["8"]["peak"] <= 1.2 * got["1"]["peak"], got


@pytest.mark.slow
def test_eval_peak_rss_flat_at_a_size_the_old_eval_would_not_fit(tmp_path):
    """~7k vs ~57k test tokens: the old [N, 64, d] float32 activations of 3 hooks alone would add
    ~45 MB at 8x; streaming stays within 1.2x of the 1x peak."""
    got = _peak_rss(tmp_path, 40)
    assert got["8"]["peak"] <= 1.2 * got["1"]["peak"], got


@pytest.mark.ray
@pytest.mark.slow
def test_groups_of_saes_spread_over_ray_tasks_score_the_same(ray_local, tiny_cfg, tmp_path, caplog):
    """`eval.workers=2` on a 2-CPU Ray node: the groups of SSAEs are scored in two Ray tasks (each
    loading the LM), with the numbers of the in-process evaluation, groups back in order."""
    import logging

    from ssae_ray.eval.runner import eval_slots, score_groups
    from ssae_ray.models import load_lm
    from ssae_ray.saes import make_random_sae

    h = "blocks.1.hook_resid_post"
    cfg = tiny_cfg.replace(eval={"workers": 2, "saes_in_flight": 2})
    lm = load_lm(cfg.model, cfg.root / "models")
    test = {
        "test": prepare_test_set(lm, "test", TEXTS, [h], 16),
        "ood": prepare_test_set(lm, "ood", TEXTS[:3], [h], 16),
    }
    groups = [[i, i + 1] for i in range(0, 6, 2)]

    def load(group):
        return [(make_random_sae(lm.d_model, 48, h, seed=i), h) for i in group]

    assert eval_slots(cfg) == (2, {"num_cpus": 1})
    with caplog.at_level(logging.INFO, logger="ssae_ray"):
        remote = list(score_groups(cfg, lm, groups, load, test, 4))
    assert "over 2 Ray tasks" in caplog.text
    local = list(score_groups(cfg.replace(eval={"workers": 1}), lm, groups, load, test, 4))
    assert [g for g, _, _ in remote] == groups
    for (_, _, a), (_, _, b) in zip(remote, local, strict=True):
        for name in ("test", "ood"):
            for x, y in zip(a[name], b[name], strict=True):
                assert x.row() == pytest.approx(y.row()) and torch.equal(x.feature_counts, y.feature_counts)
        assert a["test"][0].sse.numel() == 0 and a["test"][0].loss.shape == (test["test"].n_docs,)


def test_sweep_validation_scores_every_hook_from_one_capture_pass(tiny, tiny_cfg, monkeypatch):
    """A trial's validation (`sweep._val_metrics`) of SAEs at several hooks: each hook's CE, L0 and
    FVU equal scoring that hook alone, from one LM forward per batch for all hooks together (it
    was one capture pass per hook: 19 per validation on Pythia-70M)."""
    from ssae_ray import sweep
    from ssae_ray.saes import make_random_sae

    lm = tiny
    ts = prepare_test_set(lm, "val", TEXTS, HOOKS, context_len=16, batch_size=8)
    saes = {h: make_random_sae(lm.d_model, 96, h, seed=i) for i, h in enumerate(HOOKS)}
    calls = []
    real = type(lm.model).forward

    def counted(self, *a, **k):
        calls.append(1)
        return real(self, *a, **k)

    monkeypatch.setattr(type(lm.model), "forward", counted)
    val = sweep._val_metrics(tiny_cfg.replace(eval={"batch_size": 4}), lm, saes, ts)
    captures = len(calls)  # one capture per batch, plus the spliced suffix passes
    monkeypatch.setattr(type(lm.model), "forward", real)
    for h, sae in saes.items():
        ev = evaluate_sae(lm, sae, h, ts, batch_size=4)
        assert val[f"val_ce/{h}"] == pytest.approx(ev.ce_spliced, rel=1e-6), h
        assert val[f"val_l0/{h}"] == pytest.approx(ev.l0, rel=1e-6) and val[f"val_fvu/{h}"] == pytest.approx(
            ev.fvu, rel=1e-6
        )
    assert val["val_ce"] == pytest.approx(sum(val[f"val_ce/{h}"] for h in HOOKS) / len(HOOKS))
    n_batches = -(-ts.tokens.input_ids.shape[0] // 4)
    # one full forward per batch captures all four hooks; per-hook scoring took four
    calls.clear()
    monkeypatch.setattr(type(lm.model), "forward", counted)
    for h, sae in saes.items():
        sweep._val_metrics(tiny_cfg.replace(eval={"batch_size": 4}), lm, {h: sae}, ts)
    assert captures <= len(calls) - (len(HOOKS) - 1) * n_batches, (captures, len(calls), n_batches)
