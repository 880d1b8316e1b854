"""Batches of contexts in document order vs longest first (`models.by_length`), on the local
preset's real text: padded positions, the multi-hook capture that feeds activation caches, and
spliced-CE evaluation of one SAE on a test set. The two orders alternate round by round; the same
tokens are scored, and the table says how far their per-token losses differ. Asserts nothing.

    python benchmarks/bench_batching.py                 # needs the local corpus (make physics builds it)
    python benchmarks/bench_batching.py --rounds 3 --tokens 20000
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def padded(tb, batch_size: int) -> int:
    from ssae_ray.models import iter_batches

    return sum(b.input_ids.numel() for b in iter_batches(tb, batch_size))


def reorder(ts, idx: torch.Tensor):
    """A TestSet with its contexts in the order `idx`."""
    from ssae_ray.eval.evaluate import TestSet
    from ssae_ray.models import TokenBatch

    tok = TokenBatch(ts.tokens.input_ids[idx], ts.tokens.attention_mask[idx], ts.tokens.doc_index[idx])
    return TestSet(ts.name, tok, {h: a[idx] for h, a in ts.acts.items()}, ts.clean[idx], ts.mask[idx],
                   {h: z[idx] for h, z in ts.zero.items()}, ts.n_docs)  # fmt: skip


def main() -> None:
    from ssae_ray.config import load_config
    from ssae_ray.eval.evaluate import evaluate_sae, prepare_test_set
    from ssae_ray.models import by_length, cap_tokens, capture, iter_batches, load_lm, tokenize_docs
    from ssae_ray.pipeline import _texts, stage_corpus
    from ssae_ray.saes import make_random_sae

    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="local")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=10000, help="tokens captured per round")
    a = ap.parse_args()
    cfg = load_config(a.preset)
    lm = load_lm(cfg.model, cfg.root / "models")
    corpus = stage_corpus(cfg, lm)
    hook = cfg.sae.hooks[0]
    bs_cap, bs_eval, ctx = cfg.model.batch_size, cfg.eval.batch_size, cfg.model.context_len

    print(
        f"model {cfg.model.source}, hooks {list(cfg.sae.hooks)}, context {ctx}, {torch.get_num_threads()} threads"
    )
    rows = []
    # 1. Padded positions per real token, per split, at the batch sizes the pipeline uses.
    for split, bs in (("corpus", bs_cap), ("test", bs_eval), ("ood", bs_eval), ("general_test", bs_eval)):
        tb = cap_tokens(
            tokenize_docs(lm.tokenizer, _texts(corpus, split), ctx),
            a.tokens if split == "corpus" else cfg.eval.test_tokens,
        )
        real = int(tb.attention_mask.sum())
        rows.append((f"positions computed / real tokens: {split} (batch {bs})",
                     f"{padded(tb, bs) / real:.2f}", f"{padded(by_length(tb), bs) / real:.2f}", ""))  # fmt: skip

    # 2. Capture of every preset hook on `--tokens` corpus tokens (what activation caches do).
    tb = cap_tokens(tokenize_docs(lm.tokenizer, _texts(corpus, "corpus"), ctx), a.tokens, True)
    variants = {"document order": tb, "longest first": by_length(tb)}
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(a.rounds):
        for name, batch in variants.items():
            t0 = time.perf_counter()
            for b in iter_batches(batch, bs_cap):
                capture(lm, b.input_ids, b.attention_mask, list(cfg.sae.hooks))
            times[name].append(time.perf_counter() - t0)
    n = int(tb.attention_mask.sum())
    doc, srt = (statistics.median(times[k]) for k in variants)
    rows.append((f"capture {len(cfg.sae.hooks)} hooks, {n} tokens: s (tokens/s)", f"{doc:.1f} ({n / doc:,.0f})",
                 f"{srt:.1f} ({n / srt:,.0f})", f"{doc / srt:.2f}x"))  # fmt: skip

    # 3. Spliced CE of one SAE on the in-domain test set, both orders, same tokens.
    ts = prepare_test_set(lm, "test", _texts(corpus, "test"), [hook], ctx, cfg.eval.test_tokens, bs_eval)
    order = torch.argsort(
        cap_tokens(tokenize_docs(lm.tokenizer, _texts(corpus, "test"), ctx), cfg.eval.test_tokens)
        .attention_mask.sum(1), descending=True, stable=True,
    )  # fmt: skip
    ts_doc = reorder(ts, torch.argsort(order))  # back to document order
    sae = make_random_sae(lm.d_model, cfg.sae.d_sae, hook, seed=0)
    times = {"document order": [], "longest first": []}
    losses = {}
    for _ in range(a.rounds):
        for name, t in (("document order", ts_doc), ("longest first", ts)):
            t0 = time.perf_counter()
            e = evaluate_sae(lm, sae, hook, t, bs_eval)
            times[name].append(time.perf_counter() - t0)
            losses[name] = e.loss if name == "longest first" else e.loss[order]
    diff = float((losses["document order"] - losses["longest first"]).abs().max())
    doc, srt = (statistics.median(times[k]) for k in times)
    ntest = int(ts.mask.sum())
    rows.append(
        (f"evaluate_sae on test ({ntest} tokens): s", f"{doc:.1f}", f"{srt:.1f}", f"{doc / srt:.2f}x")
    )
    rows.append(("max |per-token CE difference| between orders", "", f"{diff:.1e}", ""))

    print(f"\n{a.rounds} alternating rounds, medians\n")
    print("| measurement | document order | longest first | speed-up |")
    print("| --- | --- | --- | --- |")
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
