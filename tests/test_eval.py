"""Evaluation math on hand-computed cases; spliced CE on a tiny LM (exact SAE = clean; the fast
tail equals the full spliced forward); logit-lens coverage on a planted decoder; bad input."""

from __future__ import annotations

import contextlib
import math

import numpy as np
import pytest
import torch
from sae_lens import StandardSAE, StandardSAEConfig
from torch import nn

from ssae_ray.eval import features as F
from ssae_ray.eval import metrics as M
from ssae_ray.eval.curves import at_l0, build_curve
from ssae_ray.eval.evaluate import evaluate_sae, prepare_test_set
from ssae_ray.eval.logit_lens import feature_top_tokens, tail_coverage
from ssae_ray.eval.splice import spliced_losses, tail_start

# ---------------------------------------------------------------------------------------------
# Metrics


def test_l0_mse_fvu_by_hand():
    x = torch.tensor([[1.0, 0.0], [3.0, 2.0]])
    x_hat = torch.tensor([[1.0, 1.0], [2.0, 2.0]])
    f = torch.tensor([[0.0, 2.0, 0.0], [1.0, 1.0, 1.0]])
    r = M.recon_metrics(x, x_hat, f)
    assert r.l0 == 2.0  # (1 + 3) / 2
    assert r.mse == 1.0  # (1 + 1) / 2 tokens
    # variance: mean (2, 1); sum of squares 1+1+1+1 = 4; residual 2 -> FVU 0.5
    assert r.fvu == pytest.approx(0.5)
    with pytest.raises(M.EvalError, match="no tokens"):
        M.recon_metrics(x[:0], x_hat[:0], f[:0])


def test_ce_recovered_and_mean_ce():
    assert M.ce_loss_recovered(2.0, 3.0, 12.0) == pytest.approx(0.9)
    assert M.ce_loss_recovered(2.0, 2.0, 12.0) == 1.0
    loss = torch.tensor([[1.0, 5.0], [3.0, 0.0]])
    mask = torch.tensor([[True, False], [True, False]])
    assert M.mean_ce(loss, mask) == 2.0
    with pytest.raises(M.EvalError, match="no valid target"):
        M.mean_ce(loss, torch.zeros_like(mask))


def test_pareto_auc_of_known_piecewise_curve():
    l0, ppl = [0, 10, 20], [10, 20, 10]
    # range [5, 15]: trapezoids (15+20)/2*5 + (20+15)/2*5 = 175, / width 10
    assert M.pareto_auc(l0, ppl, (5, 15)) == pytest.approx(17.5)
    assert M.pareto_auc(l0, ppl, (0, 20)) == pytest.approx(15.0)
    assert M.pareto_auc([20, 0, 10], [10, 10, 20], (0, 10)) == pytest.approx(15.0)  # order-free
    with pytest.raises(M.EvalError, match="no lambda reaches"):
        M.pareto_auc(l0, ppl, (60, 140))
    with pytest.raises(M.EvalError, match="empty"):
        M.pareto_auc(l0, ppl, (15, 5))


def test_bootstrap_ci_over_documents():
    loss_a = torch.tensor([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]])
    mask = torch.ones(3, 2, dtype=torch.bool)
    doc = torch.tensor([0, 0, 1])  # contexts 0, 1 from doc 0
    sums, counts = M.doc_sums(loss_a, mask, doc)
    assert sums.tolist() == [6.0, 6.0] and counts.tolist() == [4.0, 2.0]
    same = M.ce_diff_ci(loss_a, loss_a, mask, doc, n_boot=100)
    assert (same.value, same.lo, same.hi) == (0.0, 0.0, 0.0)
    shifted = M.ce_diff_ci(loss_a + 0.5, loss_a, mask, doc, n_boot=100)
    assert shifted.value == pytest.approx(0.5) and shifted.lo == pytest.approx(0.5)
    rng = torch.Generator().manual_seed(0)
    noisy = torch.randn(40, 8, generator=rng)
    ci = M.ce_diff_ci(
        noisy, torch.zeros_like(noisy), torch.ones(40, 8, dtype=torch.bool), torch.arange(40) // 2
    )
    assert ci.lo < ci.value < ci.hi and ci.hi - ci.lo > 0.05


def test_curve_interpolates_per_token_losses_and_averages_seeds():
    la, lb = torch.full((2, 3), 1.0), torch.full((2, 3), 3.0)
    c = build_curve([(1.0, 0, 10.0, 1.0, la), (1.0, 1, 12.0, 1.2, la * 1.2), (0.1, 0, 30.0, 3.0, lb)])
    assert [p.n_seeds for p in c.points] == [2, 1]
    assert c.points[0].l0 == 11.0 and c.points[0].ce == pytest.approx(1.1)
    mid = at_l0(c, 20.5)  # halfway between L0 11 and 30
    assert mid.ce == pytest.approx((1.1 + 3.0) / 2)
    assert float(mid.loss.mean()) == pytest.approx((1.1 + 3.0) / 2)
    with pytest.raises(M.EvalError, match="outside"):
        at_l0(c, 40)


# ---------------------------------------------------------------------------------------------
# Logit lens and feature statistics


def test_logit_lens_coverage_on_planted_decoder():
    vocab = d = 8
    w_u = torch.eye(vocab)  # token i's logit is the direction's i-th coordinate
    w_dec = torch.zeros(3, d)
    w_dec[0, 5], w_dec[1, 6], w_dec[2, 1] = 1.0, 1.0, 1.0  # latents point at tokens 5, 6, 1
    top = feature_top_tokens(w_dec, w_u, None, k=1)
    assert top[:, 0].tolist() == [5, 6, 1]
    counts = np.array([0, 50, 40, 30, 20, 10, 5, 0])  # types 1..6, token 1 most frequent
    cov = tail_coverage(top, counts, n_buckets=3)  # buckets: {1,2}, {3,4}, {5,6}
    assert cov.bucket_coverage.tolist() == [0.5, 0.0, 1.0]
    assert cov.covered_share == pytest.approx(3 / 6)
    # Figure 6 curve, rarest first: 6(5), 5(10), 4(20), 3(30), 2(40), 1(50); covered 6, 5, 1
    assert cov.cum_tokens[-1] == pytest.approx(1.0) and cov.cum_covered[-1] == pytest.approx(1.0)
    assert cov.cum_covered[1] == pytest.approx(15 / 65)


def test_logit_lens_folds_final_norm_scale_and_centres_layernorm():
    w_u = torch.eye(4)
    ln = nn.LayerNorm(4)
    with torch.no_grad():
        ln.weight.copy_(torch.tensor([1.0, 1.0, 10.0, 1.0]))
        ln.bias.copy_(torch.tensor([100.0, 0, 0, 0]))  # a bias would put token 0 first everywhere
    top = feature_top_tokens(torch.tensor([[0.0, 1.0, 0.5, 0.0]]), w_u, ln, k=1)
    assert top.item() == 2  # 0.5 * 10 beats 1.0 * 1; bias ignored


def test_feature_statistics():
    assert F.log2_count_ratio(torch.tensor([3, 0]), torch.tensor([1, 1])).tolist() == [1.0, -1.0]
    with pytest.raises(ValueError, match="same width"):
        F.log2_count_ratio(torch.tensor([1]), torch.tensor([1, 2]))
    assert F.activation_rank_curve(torch.tensor([1, 5, 3])).tolist() == [5, 3, 1]
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 2, generator=g) @ torch.randn(2, 16, generator=g)  # rank 2
    n90, cum = F.pca_components(w)
    assert n90 <= 2 and cum[1] == pytest.approx(1.0)
    dens, edges = F.decoder_cosines(torch.eye(6))
    mid = (edges[1:] + edges[:-1]) / 2
    assert abs(float((dens * (edges[1] - edges[0]) * mid).sum())) < 0.01  # orthogonal rows: all ~0
    eb = F.error_by_frequency(torch.tensor([7, 7, 7, 9]), torch.tensor([1.0, 1.0, 1.0, 5.0]), n_buckets=2)
    assert eb.bucket_mean.tolist() == [1.0, 3.0]


# ---------------------------------------------------------------------------------------------
# Spliced CE on a tiny LM

TEXTS = [
    "The quantum field of the electron interacts with the photon. " * (1 + i % 3) + f"Note {i}."
    for i in range(6)
]
HOOKS = [
    "blocks.0.hook_resid_post",
    "blocks.1.hook_mlp_out",
    "blocks.1.hook_attn_out",
    "blocks.1.hook_resid_pre",
]


def exact_sae(d: int, hook: str) -> StandardSAE:
    """relu(x) - relu(-x) = x: an SAE with zero reconstruction error."""
    cfg = StandardSAEConfig(d_in=d, d_sae=2 * d)
    cfg.metadata.hook_name = hook
    sae = StandardSAE(cfg)
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(torch.cat([eye, -eye], 0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


@pytest.fixture(scope="module", params=["gpt_neox", "llama"])
def tiny(request, tmp_path_factory):
    from ssae_ray.config import ModelConfig
    from ssae_ray.models import load_lm

    cfg = ModelConfig(source="tiny", tiny_arch=request.param, precision="fp32")  # exact comparisons
    lm = load_lm(cfg, tmp_path_factory.mktemp("m"))
    return lm, prepare_test_set(lm, "test", TEXTS, HOOKS, context_len=16, batch_size=8)


def test_exact_sae_spliced_ce_equals_clean(tiny):
    lm, ts = tiny
    for h in HOOKS:
        ev = evaluate_sae(lm, exact_sae(lm.d_model, h), h, ts)
        assert ev.fvu < 1e-10 and ev.ce_spliced == pytest.approx(ev.ce_clean, abs=1e-5)
        assert ev.ce_recovered == pytest.approx(1.0, abs=1e-3)
        assert ev.l0 > 0 and ev.token_ids.shape[0] == ts.tokens.attention_mask[:, 1:].sum()


def test_fast_tail_equals_full_spliced_forward(tiny):
    from ssae_ray.models import sae_splice, token_losses, zero_splice
    from ssae_ray.saes import make_random_sae

    lm, ts = tiny
    ids, mask = ts.tokens.input_ids, ts.tokens.attention_mask
    for h in HOOKS:
        sae = make_random_sae(lm.d_model, 96, h, seed=1)
        ev = evaluate_sae(lm, sae, h, ts, batch_size=5)
        full = token_losses(lm, ids, mask, splice={h: sae_splice(sae)})
        assert torch.equal(full.mask, ts.mask)
        assert torch.allclose(ev.loss, full.loss, atol=1e-4), h
        assert ev.ce_spliced != pytest.approx(ev.ce_clean, abs=1e-6)  # the splice did something
        zero = token_losses(lm, ids, mask, splice={h: zero_splice()})
        assert torch.allclose(ts.zero[h], zero.loss, atol=1e-4), h
    # attn_out of a sequential-residual model has no exact tail: it falls back to the full forward
    if lm.arch == "llama":
        assert tail_start(lm, "blocks.1.hook_attn_out") is None
        out = spliced_losses(lm, "blocks.1.hook_attn_out", zero_splice(), ids, mask)
        assert torch.allclose(out.loss, ts.zero["blocks.1.hook_attn_out"], atol=1e-4)


def test_test_set_is_batched_longest_first_with_the_same_tokens(tiny):
    """Contexts are reordered by length (less padding); every token keeps its document and its
    clean CE is the one of a forward over its document alone."""
    from ssae_ray.models import token_losses, tokenize_docs

    lm, ts = tiny
    lengths = ts.tokens.attention_mask.sum(1)
    assert lengths.tolist() == sorted(lengths.tolist(), reverse=True)
    assert sorted(ts.tokens.doc_index.tolist()) != ts.tokens.doc_index.tolist()  # really reordered
    ref = tokenize_docs(lm.tokenizer, TEXTS, 16)
    assert int(ref.attention_mask.sum()) == int(ts.tokens.attention_mask.sum())
    for d, text in enumerate(TEXTS):
        alone = tokenize_docs(lm.tokenizer, [text], 16)
        out = token_losses(lm, alone.input_ids, alone.attention_mask)
        rows = ts.tokens.doc_index == d
        mine = ts.clean[rows][ts.mask[rows]].sort().values
        theirs = out.loss[out.mask].sort().values
        assert torch.allclose(mine, theirs, atol=1e-5), d


# Matmuls on the path to each hook's output (6 per layer; `test_models._PATH_MATMULS`) and on to the
# logits: the whole 2-layer stack plus the unembedding.
_LOGIT_MATMULS = 2 * 6 + 1


def test_bf16_test_set_and_splices_within_bf16_error_of_fp32(tiny, auto_bf16):
    """`precision=auto` resolved to bf16 (forced where emulated): the clean CE of the test set and
    every hook's spliced CE through the fast tail are within the bf16 bound of fp32 (propagated
    from the final hidden states; `testing.precision.ce_bound`) and really computed in bf16; in
    bf16 too the fast tail equals the full spliced forward."""
    from ssae_ray.models import sae_splice, token_losses
    from ssae_ray.saes import make_random_sae
    from ssae_ray.testing.precision import assert_bf16_ce_close, ce_bound

    lm, ts = tiny
    lm16 = lm._replace(precision=auto_bf16)
    ts16 = prepare_test_set(lm16, "test", TEXTS, HOOKS, context_len=16, batch_size=8)
    ids, mask, real = ts.tokens.input_ids, ts.tokens.attention_mask, ts.mask
    assert torch.equal(ts16.tokens.input_ids, ids) and torch.equal(ts16.mask, real)
    hg = _fp32_hidden_and_grads(lm, ids, mask, {}, real)
    assert_bf16_ce_close(ts16.clean[real], ts.clean[real], *hg, _LOGIT_MATMULS, "clean CE")
    for h in HOOKS:
        sae = make_random_sae(lm.d_model, 96, h, seed=1)
        splice = {h: sae_splice(sae)}
        ev16, ev32 = (
            evaluate_sae(lm16, sae, h, ts16, batch_size=5),
            evaluate_sae(lm, sae, h, ts, batch_size=5),
        )
        hg = _fp32_hidden_and_grads(lm, ids, mask, splice, real)
        assert_bf16_ce_close(ev16.loss[real], ev32.loss[real], *hg, _LOGIT_MATMULS, f"spliced CE {h}")
        full16 = token_losses(lm16, ids, mask, splice=splice).loss[real]
        assert float((ev16.loss[real] - full16).norm()) <= ce_bound(*hg, _LOGIT_MATMULS), h


def _fp32_hidden_and_grads(lm, ids, mask, splice, real):
    """At the scored tokens (`real`, aligned with `TokenLoss`): the fp32 final hidden states (the
    unembedding's input) with `splice` applied, and the gradient of each token's CE there,
    W_U^T (softmax(z) - onehot(next token))."""
    from ssae_ray.models import hooked

    assert not lm.precision.bf16
    head = lm.model.get_output_embeddings()
    got = {}
    grab = head.register_forward_hook(lambda m, a, o: got.__setitem__("h", a[0]))
    hooks = (
        hooked(lm, list(splice), lambda n, a: splice[n](a).to(a.dtype))
        if splice
        else contextlib.nullcontext()
    )
    try:
        with torch.no_grad(), hooks:
            logits = lm.model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1][real]
    finally:
        grab.remove()
    p = logits.double().softmax(-1)
    p[torch.arange(len(p)), ids[:, 1:][real]] -= 1
    return got["h"][:, :-1][real], p @ head.weight.double()


def test_missing_or_empty_test_set_is_a_clear_error(tiny):
    lm, _ = tiny
    with pytest.raises(M.EvalError, match="has no documents"):
        prepare_test_set(lm, "ood", [], HOOKS, 16)
    with pytest.raises(M.EvalError, match="not captured"):
        evaluate_sae(lm, exact_sae(lm.d_model, "blocks.0.hook_mlp_out"), "blocks.0.hook_mlp_out", tiny[1])


def test_perplexity():
    assert M.perplexity(math.log(7.0)) == pytest.approx(7.0)


def test_matched_l0_moves_to_the_common_span_when_a_test_set_shifts_l0():
    from ssae_ray.eval.runner import _match_for

    class C:
        def __init__(self, lo, hi):
            self._s = (lo, hi)

        def span(self):
            return self._s

    assert _match_for({"a": C(10, 40), "b": C(15, 30)}, 24.0) == 24.0
    assert _match_for({"a": C(35, 60), "b": C(38, 64)}, 24.0) == (38 + 60) / 2
    assert _match_for({"a": C(10, 20), "b": C(30, 40)}, 24.0) == 24.0  # no common span: rows say so


def test_auc_range_moves_to_the_common_span_when_curves_miss_the_configured_range():
    from ssae_ray.eval.runner import _auc_range

    class C:
        def __init__(self, lo, hi):
            self._s = (lo, hi)

        def span(self):
            return self._s

    assert _auc_range({"a": C(10, 40), "b": C(15, 30)}, (20.0, 28.0)) == (20.0, 28.0)
    # the local in-domain set: the random-corpus curve starts above 20, so all use [21.8, 31.9]
    assert _auc_range({"a": C(17.9, 32.5), "b": C(21.8, 39.7), "c": C(17.8, 31.9)}, (20.0, 28.0)) == (
        21.8,
        31.9,
    )
    assert _auc_range({"a": C(10, 20), "b": C(30, 40)}, (20.0, 28.0)) == (20.0, 28.0)  # nothing shared
    lo, hi = _auc_range({"a": C(35, 60), "b": C(38, 64)}, (20.0, 28.0))
    assert M.pareto_auc([35, 60], [10, 20], (lo, hi)) == pytest.approx(
        10 + 10 * (49 - 35) / 25
    )  # the line at mid-span 49
