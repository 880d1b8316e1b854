"""Ray Train placement: SAEs spread over workers (`by_hook`) vs data-parallel replicas.

    python benchmarks/bench_placement.py [--steps 60] [--d-sae 1024] [--workers 2]

Same GSAEs (3 hooks of a tiny GPT-NeoX, widened to --d-sae), same activation cache and steps; the
variants alternate over --rounds so machine noise hits them alike. Reports wall time of
`run_finetune` (Ray Train start-up included) and tokens/s of the training steps.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--d-sae", type=int, default=1024)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()

    from ssae_ray.config import load_config
    from ssae_ray.models import load_lm
    from ssae_ray.runtime import init_ray
    from ssae_ray.saes import make_random_sae, save_sae
    from ssae_ray.training import cache_activations
    from ssae_ray.training.ray_train import run_finetune

    root = Path(tempfile.mkdtemp(prefix="bench-placement-"))
    cfg = load_config("tiny", overrides=[f"workdir={root}", f"train.steps={args.steps}",
                                         f"train.checkpoint_every={args.steps}", "train.batch_tokens=1024"])  # fmt: skip
    lm = load_lm(cfg.model, root / "models")
    hooks = list(cfg.sae.hooks)
    gsae = root / "gsae"
    for i, h in enumerate(hooks):
        save_sae(make_random_sae(lm.d_model, args.d_sae, h, seed=i), gsae / h)
    texts = [
        f"Energy and momentum are conserved in collision number {i} of the particles." for i in range(600)
    ]
    cache = cache_activations(cfg, lm, texts, hooks, progress=False)
    init_ray(cfg.ray)
    variants = {"1 worker": (1, "by_hook"), f"{args.workers} workers, by_hook": (args.workers, "by_hook"),
                f"{args.workers} workers, data_parallel": (args.workers, "data_parallel")}  # fmt: skip
    times: dict[str, list[float]] = {k: [] for k in variants}
    tps: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(args.rounds):
        for name, (n, place) in variants.items():
            out = root / f"out-{r}-{n}-{place}"
            t = time.perf_counter()
            run_finetune(cfg, gsae, cache, out, num_workers=n, placement=place, storage_path=root / "ray")
            times[name].append(time.perf_counter() - t)
            hist = json.loads((out / "history.json").read_text())
            rows = hist if isinstance(hist, list) else hist.get("history", [])
            vals = [h.get("tokens_per_s") for h in rows if isinstance(h, dict) and h.get("tokens_per_s")]
            if vals:
                tps[name].append(statistics.median(vals))
    print(f"\n{len(hooks)} SAEs {lm.d_model} -> {args.d_sae}, {args.steps} steps x 1024 tokens, "
          f"median of {args.rounds} alternated rounds, {os.cpu_count()} CPUs\n")  # fmt: skip
    print("| placement | wall s (Ray Train start included) | train tokens/s (median step) |")
    print("| --- | --- | --- |")
    for name in variants:
        tp = f"{statistics.median(tps[name]):,.0f}" if tps[name] else "-"
        print(f"| {name} | {statistics.median(times[name]):.1f} | {tp} |")


if __name__ == "__main__":
    main()
