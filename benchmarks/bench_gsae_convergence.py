"""Issue 17's measurement tables: the converged GSAE and what finetuning does to it.

    python benchmarks/bench_gsae_convergence.py [--preset local-converged] [--eval DIR] [--lams 2,2.5,3] [overrides...]

It runs `ssae-ray pretrain` for the preset (the corpus, the activation cache of the whole general
corpus, then training to convergence; stages already built are reused, so after a run of the job
it only loads the LM to find the GSAE folder) and prints its wall time, then:

0. with `--lams`: one converged GSAE per pretrain λ (cached), their validation L0 / FVU / CE, to
   choose `train.pretrain_lam` so the GSAE's L0 falls in the range the sweep compares at;
1. the GSAE: tokens seen, passes over the corpus, why training stopped, final validation FVU / L0 /
   dead share / CE, capture and training seconds;
2. the validation curve (every validation; CE where it was scored);
3. with an evaluation folder (`--eval`, default: the newest `<workdir>/sweep/*/eval` holding
   `control.csv`): the random-corpus control criterion, decoder movement per SSAE and the
   tail-concept test with CIs, from `control.csv`, `movement.csv` and `tail.csv`.

The whole measurement (GSAE, sweep, evaluation, per-stage wall times in `timings.md`) is
`python jobs/physics.py --preset local-converged`; this script tabulates its results.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

from ssae_ray.config import load_config


def table(rows: list[dict], keys: list[str]) -> str:
    out = ["| " + " | ".join(keys) + " |", "|" + " --- |" * len(keys)]
    for r in rows:
        cells = []
        for k in keys:
            v = r.get(k, "")
            try:
                f = float(v)
                cells.append(f"{f:.4g}" if not float(f).is_integer() or "." in str(v) else str(v))
            except (TypeError, ValueError):
                cells.append(str(v) if v not in (None, "") else "–")
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="local-converged")
    ap.add_argument("--eval", type=Path, help="an evaluation folder (default: the newest under the work dir)")
    ap.add_argument(
        "--lams", help="comma-separated pretrain λ to scan first (one converged GSAE each, cached)"
    )
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    cfg = load_config(a.preset, overrides=a.overrides)
    from ssae_ray import pipeline

    if a.lams:
        scan = []
        for lam in (float(v) for v in a.lams.split(",")):
            c = load_config(a.preset, overrides=[*a.overrides, f"train.pretrain_lam={lam}"])
            t0 = time.perf_counter()
            m = json.loads((pipeline.stage_pretrain(c) / "manifest.json").read_text())
            for h, v in m.get("final_validation", m["final"]).items():
                scan.append({"pretrain λ": lam, "hook": h, "val L0": v.get("l0"), "val FVU": v.get("fvu"),
                             "val CE": v.get("ce"), "dead": v.get("dead"), "stop": m.get("stop_reason"),
                             "tokens": m.get("tokens_seen"), "wall s": round(time.perf_counter() - t0)})  # fmt: skip
        print("# Pretrain λ scan (pick the λ whose L0 falls in sweep.l0_range)\n")
        print(table(scan, list(scan[0])) + "\n")
    t0 = time.perf_counter()
    folder = pipeline.stage_pretrain(cfg)
    wall = time.perf_counter() - t0
    man = json.loads((folder / "manifest.json").read_text())
    print(f"# GSAE ({a.preset}): {folder}\n")
    print(f"wall time of `ssae-ray pretrain` in this call (stages already built are reused): {wall:.0f} s\n")
    hooks = man["hooks"]
    fin = man.get("final_validation", {})
    rows = [{"hook": h, "tokens seen": man.get("tokens_seen"), "passes": man.get("epochs"),
             "corpus tokens": man.get("corpus_tokens"), "stop": man.get("stop_reason"), "steps": man["steps"],
             **{f"val {k}": fin.get(h, {}).get(k) for k in ("fvu", "l0", "dead", "ce")},
             "resamples": sum(r["latents"] for r in man.get("resamples", []) if r["hook"] == h),
             "capture s": man.get("seconds_capture"), "train s": man.get("seconds_train")} for h in hooks]  # fmt: skip
    print(table(rows, list(rows[0])))
    curve = man.get("validation_curve") or []
    if curve:
        from ssae_ray.training.pretrain import curve_table

        print("\n## Validation curve\n")
        print(curve_table(curve, hooks))
    else:
        print("\n(no validation curve: train.pretrain_val_tokens was 0)")
    ev = a.eval
    if ev is None:
        found = sorted(cfg.root.glob("sweep/*/eval/control.csv"), key=lambda p: p.stat().st_mtime)
        ev = found[-1].parent if found else None
    if ev is None or not (ev / "control.csv").is_file():
        print("\n(no evaluation with control.csv yet: run `python jobs/physics.py --preset local-converged`)")
        return
    for name, title in (("control.csv", "Random-corpus control"), ("vs_gsae.csv", "Each SSAE − GSAE at the GSAE's L0"),
                        ("movement.csv", "Decoder movement"), ("tail.csv", "Tail concepts with CIs")):  # fmt: skip
        if not (ev / name).is_file():
            continue
        with open(ev / name) as f:
            rows = list(csv.DictReader(f))
        if rows:
            print(f"\n## {title} ({ev / name})\n")
            print(table(rows, list(rows[0])))


if __name__ == "__main__":
    main()
