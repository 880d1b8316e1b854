"""Capture all hooks in one forward vs one forward per hook; capture tokens/s for SmolLM2.

    python benchmarks/bench_capture.py [--preset local] [--tokens 4096] [--repeats 3]

Variants are interleaved within each repeat so machine noise hits them alike; the table reports
the median. FLOPs are counted with torch's FlopCounterMode on the same batch.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from ssae_ray.config import load_config
from ssae_ray.models import capture, load_lm, tokenize_docs

TEXT = (
    "The electron is a subatomic particle whose electric charge is negative one elementary charge. "
    "Electrons belong to the first generation of the lepton particle family and are generally thought "
    "to be elementary particles because they have no known components or substructure. "
)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="local")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cfg = load_config(args.preset)
    lm = load_lm(cfg.model)
    hooks = list(cfg.sae.hooks)
    ctx = cfg.model.context_len
    b = tokenize_docs(
        lm.tokenizer, [TEXT * 40] * (args.tokens // ctx + 1), ctx, max_contexts=args.tokens // ctx
    )
    n_tok = int(b.attention_mask.sum())

    def one_pass():
        return capture(lm, b.input_ids, b.attention_mask, hooks)

    def per_hook():
        return [capture(lm, b.input_ids, b.attention_mask, [h]) for h in hooks]

    def full_forward():
        with torch.no_grad():
            lm.model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False)

    variants = {
        "one forward, all hooks": one_pass,
        "one forward per hook": per_hook,
        "full model forward": full_forward,
    }
    flops = {}
    for name, fn in variants.items():
        with FlopCounterMode(display=False) as fc:
            fn()
        flops[name] = fc.get_total_flops()
    times = {k: [] for k in variants}
    for _ in range(args.repeats):
        for name, fn in variants.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    base = statistics.median(times["one forward, all hooks"])
    print(
        f"\nmodel {cfg.model.source} ({lm.n_layers} layers, d {lm.d_model}); hooks ({len(hooks)}): {', '.join(hooks)}"
    )
    print(f"{n_tok} tokens per pass, {torch.get_num_threads()} threads, median of {args.repeats}\n")
    print("| variant | GFLOP | FLOP ratio | seconds | tokens/s | time ratio |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name in variants:
        s = statistics.median(times[name])
        print(
            f"| {name} | {flops[name] / 1e9:.1f} | {flops[name] / flops['one forward, all hooks']:.2f} | "
            f"{s:.2f} | {n_tok / s:,.0f} | {s / base:.2f} |"
        )


if __name__ == "__main__":
    main()
