"""Dashboard build time and peak memory on an evaluated sweep, and the LM pass's share.

    python benchmarks/bench_dashboard.py --preset local          # after `make physics`
    python benchmarks/bench_dashboard.py --preset tiny workdir=/tmp/t

Rebuilds the sweep's dashboard (its evaluation must exist; it is reused), logs it to the sweep's
MLflow parent run as `ssae-ray dashboard --force` does, and prints the time of each part (in-domain + general LM forwards, the rest of the scans, tables and
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
    from ssae_ray import pipeline, tracking
    from ssae_ray.config import load_config
    from ssae_ray.dashboard import build_sweep_dashboard, log_dashboard
    from ssae_ray.runtime import setup_logging

    setup_logging()
    cfg = load_config(args.preset, None, args.overrides)
    lm = pipeline._lm(cfg)
    report = pipeline.stage_eval(cfg, lm=lm)
    corpus_dir = pipeline.stage_corpus(cfg, lm)
    gsae_dir = pipeline.stage_gsaes(cfg, lm, corpus_dir)
    texts, general = pipeline._texts(corpus_dir, "test"), pipeline._texts(corpus_dir, "general_test")
    base = rss_mb()
    t0 = time.perf_counter()
    with PeakRSS() as peak:
        out = build_sweep_dashboard(cfg, lm, report.parent.parent, gsae_dir, texts, general, force=True)
    wall = time.perf_counter() - t0
    t1 = time.perf_counter()
    run_id = pipeline._sweep_run_id(cfg)
    if run_id:
        log_dashboard(tracking.tracking_uri(cfg), run_id, out)
    t_log = time.perf_counter() - t1
    man = json.loads((out / "manifest.json").read_text())
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
    rows.append(("loading the SAEs, tokenising, other", wall - sum(v for _, v in rows)))
    saes = man["saes"]
    print(f"\ndashboard of {cfg.name}: {len(saes)} SAEs x {saes[0]['d_sae']} features "
          f"({', '.join(s['label'] for s in saes)})")  # fmt: skip
    print(
        f"{man['n_contexts']} in-domain contexts ({man['n_tokens']} tokens), {man['general_tokens']} general tokens\n"
    )
    print("| part | seconds | share |\n| --- | --- | --- |")
    for name, v in rows:
        print(f"| {name} | {v:.1f} | {100 * v / wall:.0f}% |")
    print(f"| **total build** | {wall:.1f} | |")
    print(f"| MLflow logging (after the build) | {t_log:.1f} | |\n")
    print(
        f"peak RSS {peak.peak:.0f} MiB; {peak.peak - base:.0f} MiB above the {base:.0f} MiB with the LM loaded"
    )
    print(f"site: {man['files']} files, {man['bytes'] / 2**20:.1f} MiB, {man['feature_pages']} feature pages")


if __name__ == "__main__":
    main()
