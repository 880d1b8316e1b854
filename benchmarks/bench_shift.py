"""SHIFT's two speed tricks, measured side by side in one run on a random GPT-NeoX (CPU or GPU):

1. attribution patching: the IE of every SAE feature at every hook from one forward + backward,
   against true zero-ablation (one forward per feature; timed on a few, extrapolated per feature);
2. the prefix cache: the layers before the first spliced hook run once per set, not per forward
   (every skyline step is a forward over the dev set).

    python benchmarks/bench_shift.py [--layers 6] [--d-model 256] [--bios 64] [--tokens 64]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from ssae_ray.models import LM, load_lm, make_tiny_model, pick_device
from ssae_ray.saes import make_random_sae
from ssae_ray.shift.attribution import attribute
from ssae_ray.shift.probe import make_prefix, pooled_reps, train_probe
from ssae_ray.shift.shift import feature_ablation


def build_lm(layers: int, d_model: int, folder: Path) -> LM:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from ssae_ray.config import ModelConfig

    tiny = load_lm(ModelConfig(source=str(make_tiny_model(folder / "tiny"))))
    cfg = GPTNeoXConfig(vocab_size=len(tiny.tokenizer), hidden_size=d_model, num_hidden_layers=layers,
                        num_attention_heads=8, intermediate_size=4 * d_model, rotary_pct=0.25)  # fmt: skip
    torch.manual_seed(0)
    dev = pick_device()
    model = GPTNeoXForCausalLM(cfg).eval().to(dev).requires_grad_(False)
    return LM(model, tiny.tokenizer, "gpt_neox", layers, d_model, dev)


def timed(fn, repeats: int = 3) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--d-sae", type=int, default=1024)
    p.add_argument("--bios", type=int, default=64)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--n-true", type=int, default=4, help="features ablated for real (time per feature)")
    a = p.parse_args()
    torch.set_grad_enabled(False)
    with tempfile.TemporaryDirectory() as tmp:
        lm = build_lm(a.layers, a.d_model, Path(tmp))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, len(lm.tokenizer), (a.bios, a.tokens), generator=g)
    from ssae_ray.models import TokenBatch

    batch = TokenBatch(ids, torch.ones_like(ids), torch.arange(a.bios))
    layer = a.layers - 2
    first = layer // 2
    hooks = [
        f"blocks.{i}.hook_{k}" for i in range(first, layer + 1) for k in ("resid_post", "mlp_out", "attn_out")
    ]
    saes = {
        h: make_random_sae(a.d_model, a.d_sae, h, seed=i, device=str(lm.device)) for i, h in enumerate(hooks)
    }
    y = torch.arange(a.bios) % 2
    probe = train_probe(pooled_reps(lm, batch, layer), y).to(lm.device)
    n_feat = len(hooks) * a.d_sae

    t_atp = timed(lambda: attribute(lm, batch, probe, y, layer, saes))
    t_true = timed(lambda: [pooled_reps(lm, batch, layer, feature_ablation(saes, [(hooks[0], i)]))
                            for i in range(a.n_true)], repeats=1) / a.n_true  # fmt: skip
    prefix = make_prefix(lm, batch, first)
    splice = feature_ablation(saes, [(h, 0) for h in hooks])
    t_full = timed(lambda: pooled_reps(lm, batch, layer, splice))
    t_pre = timed(lambda: pooled_reps(lm, batch, layer, splice, prefix=prefix))
    t_make = timed(lambda: make_prefix(lm, batch, first), repeats=1)

    print(f"device {lm.device}, GPT-NeoX {a.layers} layers d={a.d_model}, probe at layer {layer}, "
          f"{len(hooks)} SAEs x {a.d_sae} latents (layers {first}..{layer}), {a.bios} bios x {a.tokens} tokens")  # fmt: skip
    rows = [
        ("IE of all features: attribution patching (1 fwd+bwd)", t_atp, f"{n_feat} features"),
        (
            "IE of all features: true ablation (extrapolated)",
            t_true * n_feat,
            f"{t_true * 1e3:.1f} ms/feature",
        ),
        ("skyline step (spliced forward), full model", t_full, ""),
        (
            f"skyline step, prefix cache (skip layers 0..{first - 1})",
            t_pre,
            f"cache built once in {t_make:.3f} s",
        ),
    ]
    print(f"| {'what':<58} | {'seconds':>9} | {'ratio':>8} | note |")
    print(f"| {'-' * 58} | {'-' * 9} | {'-' * 8} | --- |")
    for i, (name, t, note) in enumerate(rows):
        base = rows[i - i % 2][1]
        print(f"| {name:<58} | {t:>9.3f} | {t / base:>7.2f}x | {note} |")


if __name__ == "__main__":
    main()
