"""Where one sweep trial's time goes: `sweep.run_trial` in this process (no Tune) under cProfile, on
the caches a finished `physics` run left in its work dir. Asserts nothing.

    python benchmarks/profile_trial.py --workdir ~/.cache/ssae-ray/local            # dense, λ 2.5
    python benchmarks/profile_trial.py --workdir W --strategy random --lam 1.5 --top 60

Measured on `local` (2-core AMD EPYC with AVX-512 bf16, 2026-12-08): 51.7 s a trial = training
32.4 s (300 steps) + validation 13.1 s (3 x 4.4 s) + MLflow 4.9 s (one log_batch per step, since
batched per flush) + LM load.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="local")
    ap.add_argument("--workdir", required=True, help="a work dir holding the preset's finished caches")
    ap.add_argument("--strategy", default="dense")
    ap.add_argument("--lam", type=float, default=2.5)
    ap.add_argument("--tilt", type=float, default=0.0)
    ap.add_argument("--top", type=int, default=45, help="rows of the profile to print")
    a = ap.parse_args()

    from ssae_ray import pipeline, sweep, tracking
    from ssae_ray.config import load_config
    from ssae_ray.runtime import setup_logging

    setup_logging()
    cfg = load_config(a.preset, overrides=[f"workdir={a.workdir}"])
    t = time.perf_counter()
    lm = pipeline._lm(cfg)
    print(f"LM load {time.perf_counter() - t:.1f} s")
    plan = pipeline.plan_sweep(cfg, lm, pipeline.Timer())
    scfg = pipeline.sweep_config(cfg)
    val = pipeline._test_sets(scfg, lm, plan.corpus_dir, ("val",))["val"]
    out = Path(tempfile.mkdtemp(prefix="profile-trial-"))
    uri = f"sqlite:///{out}/mlflow.db"
    client, exp_id = tracking.open_experiment(uri, "profile-trial", out / "artifacts")
    parent = sweep._parent_run(client, exp_id, uri, scfg, out)
    ctx = {"cfg": scfg.to_dict(), "gsae_dir": str(plan.gsae_dir), "out": str(out), "uri": uri, "exp_id": exp_id,
           "caches": {k: str(v) for k, v in plan.caches.items()}, "parent": parent,
           "lm_cache": str(cfg.root / "models"), "checked": False}  # fmt: skip
    trial = sweep.Trial(a.strategy, a.lam, a.tilt, 0)
    tdir = out / "trials" / trial.name
    tdir.mkdir(parents=True)
    prof = cProfile.Profile()
    t = time.perf_counter()
    prof.enable()
    sweep.run_trial(scfg, trial, ctx, val, tdir, report=lambda m: None)
    prof.disable()
    print(f"trial {trial.name}: {time.perf_counter() - t:.1f} s ({out})")
    pstats.Stats(prof).sort_stats("cumulative").print_stats(a.top)


if __name__ == "__main__":
    main()
