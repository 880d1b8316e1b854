"""Finetune speed per GSAE architecture: our training step (`HookTrainer` + `train_step`, hand-written
backward) against sae-lens' own `SAETrainer.step` on that architecture's training SAE, side by side
in one run: same SAE weights, same activations, same batch.

    python benchmarks/bench_archs.py [--d-in 576] [--d-sae 4608] [--tokens 4096] [--k 64] [--repeats 5]
                                     [--device cpu|cuda] [--dead 0.0]

| arch | ours | sae-lens |
| --- | --- | --- |
| relu | Eq. 1, unit-norm rows | `StandardTrainingSAE` (L1 weighted by decoder norm) |
| jumprelu | MSE + λ L0, STE thresholds | `JumpReLUTrainingSAE` ("step" L0, same bandwidth) |
| topk | MSE + aux | `TopKTrainingSAE` (same k, aux coefficient) |
| batchtopk | MSE + aux, running θ | `BatchTopKTrainingSAE` |

`--dead` marks that share of the latents dead in both trainers (their aux losses then run). Variants
are interleaved inside every repeat (the machine is shared and noisy); the table reports the
median and the best of the repeats (on a contended machine the best is the steadier estimate of
each step's own cost) and tokens/s. ERM (tilt 0) for both: sae-lens has no TERM.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from ssae_ray.config import TrainConfig
from ssae_ray.saes import make_random_sae
from ssae_ray.training.loop import HookTrainer, train_step

sys.path.insert(0, str(Path(__file__).parent))
from bench_training import timed  # noqa: E402


def sae_lens_trainer(arch: str, sae, x: torch.Tensor, tc: TrainConfig, k: int, dead: float, device: str):
    """sae-lens' SAETrainer on the training class of `arch`, initialised with `sae`'s weights."""
    from sae_lens import (
        BatchTopKTrainingSAE,
        BatchTopKTrainingSAEConfig,
        JumpReLUTrainingSAE,
        JumpReLUTrainingSAEConfig,
        StandardTrainingSAE,
        StandardTrainingSAEConfig,
        TopKTrainingSAE,
        TopKTrainingSAEConfig,
    )
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    d, m = sae.cfg.d_in, sae.cfg.d_sae
    if arch == "relu":
        tsae = StandardTrainingSAE(
            StandardTrainingSAEConfig(d_in=d, d_sae=m, l1_coefficient=tc.lam, device=device)
        )
    elif arch == "jumprelu":
        tsae = JumpReLUTrainingSAE(JumpReLUTrainingSAEConfig(d_in=d, d_sae=m, l0_coefficient=tc.lam, device=device,
                                                             jumprelu_bandwidth=tc.jumprelu_bandwidth))  # fmt: skip
    elif arch == "topk":
        tsae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d, d_sae=m, k=k, device=device,
                                                     aux_loss_coefficient=tc.aux_coefficient))  # fmt: skip
    else:
        tsae = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=d, d_sae=m, k=k, device=device,
                                                               aux_loss_coefficient=tc.aux_coefficient))  # fmt: skip
    tsae.load_state_dict(
        {k_: v for k_, v in sae.state_dict().items() if k_ in tsae.state_dict()}, strict=False
    )
    tsae.to(device)
    trainer = SAETrainer(
        SAETrainerConfig(total_training_samples=10**9, train_batch_size_samples=x.shape[0], lr=tc.lr,
                         lr_end=tc.lr, device=device, dead_feature_window=10**9),
        tsae, iter(()),
    )  # fmt: skip
    if dead > 0:  # the same latents dead in both trainers
        trainer.n_forward_passes_since_fired[: int(dead * m)] = 2 * 10**9
    return lambda: trainer.step(x)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--d-in", type=int, default=576)
    ap.add_argument("--d-sae", type=int, default=4608)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--dead", type=float, default=0.0)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--archs", default="relu,jumprelu,topk,batchtopk")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    dev, n, d, m = args.device, args.tokens, args.d_in, args.d_sae
    torch.manual_seed(0)
    x = torch.randn(n, d, device=dev) * 3
    tc = TrainConfig(lr=5e-5, lam=1.0, steps=10**9, decay_steps=0, scale_activations=False,
                     dead_window_tokens=10**12)  # fmt: skip
    variants: dict[str, Callable[[], object]] = {}
    for arch in args.archs.split(","):
        sae = make_random_sae(d, m, "h", device=dev, arch=arch, k=args.k, threshold=0.05)
        with torch.no_grad():
            sae.b_enc.fill_(-0.02 if arch in ("relu", "jumprelu") else 0.0)
        trainers = {"h": HookTrainer(tc, sae, "h", 1.0, dev)}
        if args.dead > 0:
            trainers["h"].tokens_since_fired[: int(args.dead * m)] = 10**13
        batch = {"h": x}
        variants[f"{arch}|ours"] = lambda t=trainers, b=batch: train_step(t, b, 0, 10**9)
        variants[f"{arch}|sae-lens"] = sae_lens_trainer(arch, sae, x, tc, args.k, args.dead, dev)
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.repeats):
        for k, fn in variants.items():
            times[k].append(timed(fn, dev, args.iters))
    med = {k: statistics.median(v) for k, v in times.items()}
    best = {k: min(v) for k, v in times.items()}
    print(f"\n## Finetune step per architecture: d_in {d} -> d_sae {m}, {n}-token batches, k {args.k}, "
          f"dead share {args.dead:g}, {dev}, {torch.get_num_threads()} threads, median of {args.repeats}")  # fmt: skip
    print("| arch | ours ms/step (median, best) | ours tokens/s (median) | sae-lens ms/step (median, best) "
          "| sae-lens tokens/s (median) | speed-up: sae-lens ms / ours ms (median) | (best) |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for arch in args.archs.split(","):
        a, b = med[f"{arch}|ours"], med[f"{arch}|sae-lens"]
        a0, b0 = best[f"{arch}|ours"], best[f"{arch}|sae-lens"]
        print(f"| {arch} | {a * 1e3:.1f}, {a0 * 1e3:.1f} | {n / a:,.0f} | {b * 1e3:.1f}, {b0 * 1e3:.1f} | "
              f"{n / b:,.0f} | {b / a:.2f}x | {b0 / a0:.2f}x |")  # fmt: skip


if __name__ == "__main__":
    main()
