"""Dashboard build time and peak memory on an evaluated sweep, and the LM pass's share.

    python benchmarks/bench_dashboard.py --preset local          # after `make physics`
    python benchmarks/bench_dashboard.py --preset tiny workdir=/tmp/t

Rebuilds the sweep's dashboard (its evaluation must exist; it is reused), logs it to the sweep's
MLflow parent run as `ssae-ray dashboard --force` does, and prints the time of each part (in-domain + general LM forwards, the rest of the scans, the second
in-domain pass for SAEDashboard's statistics, tables and logit lens, pages and export), the process's peak resident memory above its level with the LM and
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
    ap.add_argument(
        "--standin",
        type=int,
        default=0,
        metavar="N",
        help="no evaluated sweep needed: the preset's pretrained GSAE (a sparse random SAE while it "
        "is not pretrained yet) and N perturbed copies standing in for the SSAEs",
    )
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    from ssae_ray import pipeline, tracking
    from ssae_ray.config import load_config
    from ssae_ray.dashboard import build_sweep_dashboard, log_dashboard
    from ssae_ray.runtime import setup_logging

    setup_logging()
    cfg = load_config(args.preset, None, args.overrides)
    lm = pipeline._lm(cfg)
    if args.standin:
        return standin(cfg, lm, args.standin)
    report = pipeline.stage_eval(cfg, lm=lm)
    corpus_dir = pipeline.stage_corpus(cfg, lm)
    gsae_dir = pipeline.stage_gsaes(cfg, lm, corpus_dir)
    texts, general = pipeline._texts(corpus_dir, "test"), pipeline._texts(corpus_dir, "general_test")
    base = rss_mb()
    t0 = time.perf_counter()
    with PeakRSS() as peak:
        out, _ = build_sweep_dashboard(cfg, lm, report.parent.parent, gsae_dir, texts, general, force=True)
    wall = time.perf_counter() - t0
    t1 = time.perf_counter()
    run_id = pipeline._sweep_run_id(cfg, out.parent)
    if run_id:
        log_dashboard(tracking.tracking_uri(cfg), run_id, out)
    t_log = time.perf_counter() - t1
    man = json.loads((out / "manifest.json").read_text())
    print_table(cfg, man, wall, peak.peak, base, t_log)


def print_table(cfg, man, wall, peak, base, t_log) -> None:
    sec = man["seconds"]
    rows = [
        ("LM forwards (in-domain + general text)", sec["lm"]),
        (
            "rest of the scans (SAE encode, top-k / sample / window merges, histograms)",
            sec["scan"] - sec["lm"],
        ),
        (
            "second in-domain pass: SAEDashboard's statistics (LM, histograms, token samples, correlations)",
            sec.get("stats", 0.0),
        ),
        ("tables, logit lens, nearest GSAE rows", sec["tables"]),
        ("pages, index, diff", sec["pages"] - sec.get("export", 0.0)),
        ("Neuronpedia export", sec.get("export", 0.0)),
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
    if t_log is not None:
        print(f"| MLflow logging (after the build) | {t_log:.1f} | |")
    print(f"\npeak RSS {peak:.0f} MiB; {peak - base:.0f} MiB above the {base:.0f} MiB with the LM loaded")
    print(f"site: {man['files']} files, {man['bytes'] / 2**20:.1f} MiB, {man['feature_pages']} feature pages")
    for e in man.get("neuronpedia", []):
        print(f"Neuronpedia source {e['path']}: {e['features']} features exported, {e['skipped']} never fire")


def standin(cfg, lm, n: int) -> None:
    """Build the dashboard of the GSAE and `n` stand-in SSAEs (10% of decoder rows replaced, the
    others nudged) on the preset's real test and general texts, into a temp folder."""
    import copy
    import tempfile

    import torch

    from ssae_ray import pipeline
    from ssae_ray.dashboard import SAESpec, build_dashboard, scan_contexts
    from ssae_ray.dashboard.build import in_domain_contexts
    from ssae_ray.models import capture, tokenize_docs
    from ssae_ray.saes import load_sae, make_random_sae
    from ssae_ray.stages import read_manifest

    hook = (cfg.sweep.hooks or cfg.sae.hooks)[0]
    corpus_dir = pipeline.stage_corpus(cfg, lm)
    texts, general = pipeline._texts(corpus_dir, "test"), pipeline._texts(corpus_dir, "general_test")
    done = [
        d for d in sorted((cfg.root / "gsae_pretrain").glob("*")) if read_manifest(d) and (d / hook).is_dir()
    ]
    if done:
        gsae, source = load_sae(done[-1] / hook, "cpu"), f"pretrained GSAE {done[-1]}"
    else:  # a sparse random SAE: encoder thresholds at the 99th percentile of its pre-activations
        gsae, source = make_random_sae(lm.d_model, cfg.sae.d_sae, hook), "random sparse SAE (no GSAE yet)"
        tb = tokenize_docs(lm.tokenizer, texts[:16], cfg.model.context_len)
        x = capture(lm, tb.input_ids, tb.attention_mask, [hook])[hook][:, 1:][tb.attention_mask[:, 1:].bool()]
        with torch.no_grad():
            gsae.b_enc.copy_(-torch.quantile(x[:4096] @ gsae.W_enc, 0.99, dim=0))
    specs = [SAESpec("gsae", "GSAE", gsae, hook, None)]
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        s = copy.deepcopy(gsae)
        with torch.no_grad():
            rows = torch.randperm(s.W_dec.shape[0], generator=g)[: s.W_dec.shape[0] // 10]
            s.W_dec[rows] = (
                torch.randn(len(rows), s.W_dec.shape[1], generator=g)
                * s.W_dec[rows].norm(dim=1, keepdim=True)
                / s.W_dec.shape[1] ** 0.5
            )
            s.W_enc.mul_(1 + 0.05 * torch.randn(s.W_enc.shape, generator=g))
        specs.append(SAESpec(f"standin{i}", f"stand-in SSAE {i}", s, hook, "gsae"))
    print(f"stand-ins: {source} at {hook} and {n} perturbed copies")
    base = rss_mb()
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    with PeakRSS() as peak, tempfile.TemporaryDirectory() as tmp:
        indexes = scan_contexts(cfg, lm, {s.name: (s.sae, s.hook) for s in specs}, in_domain_contexts(cfg, lm, texts),
                                timings)  # fmt: skip
        out = build_dashboard(cfg, lm, specs, indexes, general, Path(tmp) / "site", timings=timings)
        man = json.loads((out / "manifest.json").read_text())
        wall = time.perf_counter() - t0
    print_table(cfg, man, wall, peak.peak, base, None)


if __name__ == "__main__":
    main()
