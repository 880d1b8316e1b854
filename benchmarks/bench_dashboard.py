"""Dashboard build time and peak memory on an evaluated sweep, and the LM pass's share.

    python benchmarks/bench_dashboard.py --preset local          # after `make physics`
    python benchmarks/bench_dashboard.py --preset tiny workdir=/tmp/t

Runs `ssae-ray dashboard` with `--force` (the sweep's evaluation must exist; it is reused) and
prints the time of each part (in-domain + general LM forwards, the rest of the scans, tables and
logit lens, pages and export), the process's peak resident memory above its level with the LM and
the SAEs loaded, and the site's size.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class PeakRSS:
    """Samples the resident set size every 20 ms on a thread."""

    def __init__(self) -> None:
        self.peak, self.stop = rss_mb(), threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, rss_mb())
            time.sleep(0.02)

    def __enter__(self) -> PeakRSS:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="local")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    from ssae_ray import pipeline
    from ssae_ray.config import load_config
    from ssae_ray.runtime import setup_logging

    setup_logging()
    cfg = load_config(args.preset, None, args.overrides)
    lm = pipeline._lm(cfg)
    report = pipeline.stage_eval(cfg, lm=lm)
    base = rss_mb()
    t0 = time.perf_counter()
    with PeakRSS() as peak:
        index = pipeline.stage_dashboard(cfg, lm, report, force=True)
    wall = time.perf_counter() - t0
    man = json.loads((index.parent / "manifest.json").read_text())
    sec = man["seconds"]
    rows = [
        ("LM forwards (in-domain + general text)", sec["lm"]),
        (
            "rest of the scans (SAE encode, top-k / sample / window merges, histograms)",
            sec["scan"] - sec["lm"],
        ),
        ("tables, logit lens, nearest GSAE rows", sec["tables"]),
        ("pages, index, diff, Neuronpedia export", sec["pages"]),
    ]
    rows.append(("SAE loading, tokenising, MLflow logging, other", wall - sum(v for _, v in rows)))
    saes = man["saes"]
    print(f"\ndashboard of {cfg.name}: {len(saes)} SAEs x {saes[0]['d_sae']} features "
          f"({', '.join(s['label'] for s in saes)})")  # fmt: skip
    print(
        f"{man['n_contexts']} in-domain contexts ({man['n_tokens']} tokens), {man['general_tokens']} general tokens\n"
    )
    print("| part | seconds | share |\n| --- | --- | --- |")
    for name, v in rows:
        print(f"| {name} | {v:.1f} | {100 * v / wall:.0f}% |")
    print(f"| **total** | {wall:.1f} | |\n")
    print(
        f"peak RSS {peak.peak:.0f} MiB; {peak.peak - base:.0f} MiB above the {base:.0f} MiB with the LM loaded"
    )
    print(f"site: {man['files']} files, {man['bytes'] / 2**20:.1f} MiB, {man['feature_pages']} feature pages")


if __name__ == "__main__":
    main()
