"""Which SAEs a sweep's dashboard shows, and the stage that builds it and logs it to MLflow.

The GSAE and, per (strategy, tilt), the best-on-validation SSAE whose in-domain test L0 is nearest
the matched L0 (first seed): the same choice as the evaluation's feature figures, read back from
`eval/metrics.csv` and `sweep_trials.csv`.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ssae_ray.config import Config
from ssae_ray.dashboard.build import (
    SAESpec,
    build_dashboard,
    explanations_from,
    in_domain_contexts,
    scan_contexts,
)
from ssae_ray.stages import StageError, read_manifest, stage_key

log = logging.getLogger("ssae_ray")


def sae_name(strategy: str, tilt: float, lam: float, seed: int) -> str:
    """Auto-interp's name of a sweep SSAE (`pipeline.best_ssaes`)."""
    return f"{strategy}-tilt{tilt:g}-lam{lam:g}-seed{seed}"


def matched_ssaes(cfg: Config, sweep_dir: Path, hook: str) -> list[tuple[str, str, Path]]:
    """(name, label, SAE folder) per (strategy, tilt) at the matched L0."""
    metrics, trials = sweep_dir / "eval" / "metrics.csv", sweep_dir / "sweep_trials.csv"
    for p in (metrics, trials):
        if not p.is_file():
            raise StageError(f"{p} is missing: run `ssae-ray eval` before the dashboard")
    lo, hi = cfg.sweep.l0_range
    match = cfg.sweep.match_l0 if cfg.sweep.match_l0 is not None else (lo + hi) / 2
    with open(trials) as f:
        paths = {(r["strategy"], float(r["tilt"]), float(r["lam"]), int(r["seed"])): r["best_path"]
                 for r in csv.DictReader(f) if r["best_for_lam"] in ("1", "True", "true") and r["best_path"]}  # fmt: skip
    best: dict[tuple[str, float], tuple[float, int, float, str]] = {}
    with open(metrics) as f:
        for r in csv.DictReader(f):
            if r["test"] != "test" or r["hook"] != hook or r["strategy"] == "gsae":
                continue
            key = (r["strategy"], float(r["tilt"]), float(r["lam"]), int(r["seed"]))
            if key not in paths:
                continue
            cand = (abs(float(r["l0"]) - match), key[3], float(r["l0"]), r["lam"])
            if (key[0], key[1]) not in best or cand < best[(key[0], key[1])]:
                best[(key[0], key[1])] = cand
    out = []
    for (s, tilt), (_, seed, l0, lam) in sorted(best.items()):
        label = f"{s}{'' if tilt == 0 else f'+TERM(t={tilt:g})'} (λ {float(lam):g}, L0 {l0:.1f})"
        out.append(
            (sae_name(s, tilt, float(lam), seed), label, Path(paths[(s, tilt, float(lam), seed)]) / hook)
        )
    if not out:
        raise StageError(f"no evaluated SSAE at {hook} in {metrics}")
    return out


def sweep_specs(cfg: Config, lm: Any, sweep_dir: Path, gsae_dir: Path, hook: str) -> list[SAESpec]:
    from ssae_ray.saes import load_sae

    dev = str(lm.device)
    specs = [SAESpec("gsae", "GSAE", load_sae(gsae_dir / hook, dev), hook, None)]
    for name, label, path in matched_ssaes(cfg, sweep_dir, hook):
        specs.append(SAESpec(name, label, load_sae(path, dev), hook, "gsae"))
    return specs


def build_sweep_dashboard(
    cfg: Config,
    lm: Any,
    sweep_dir: Path,
    gsae_dir: Path,
    texts: list[str],
    general_texts: list[str],
    autointerp: Callable[[dict[str, Any] | None], Path | None] | None = None,
    extra: dict[str, tuple[Any, str]] | None = None,
    force: bool = False,
) -> tuple[Path, bool]:
    """The sweep's dashboard in `<sweep>/dashboard` (first sweep hook). `extra` SAEs (`name ->
    (sae, hook)`, e.g. auto-interp's every-λ set) join the one in-domain LM pass; `autointerp`, when
    given, is then called with all the indexes, so auto-interp reads its examples from that pass,
    and its explanations land in the index. Cached: a rebuild needs a new evaluation or a changed
    `dashboard` / `autointerp` config (or `force`). Returns the folder and whether it was built."""
    import time

    hook = (cfg.sweep.hooks or cfg.sae.hooks)[0]
    out = sweep_dir / "dashboard"
    stamp = sweep_dir / "eval" / "eval_key.txt"
    key = stage_key("dashboard", cfg.dashboard, cfg.autointerp, cfg.model.context_len, cfg.seed, hook,
                    stamp.read_text() if stamp.is_file() else "", autointerp is not None)  # fmt: skip
    if not force and (read_manifest(out) or {}).get("key") == key:
        log.info("dashboard cached at %s", out)
        if autointerp:  # auto-interp still runs (its own scan; its answers are cached)
            autointerp(None)
        return out, False
    specs = sweep_specs(cfg, lm, sweep_dir, gsae_dir, hook)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    contexts = in_domain_contexts(cfg, lm, texts)
    targets = {**(extra or {}), **{s.name: (s.sae, s.hook) for s in specs}}
    indexes = scan_contexts(cfg, lm, targets, contexts, timings)
    results = autointerp(indexes) if autointerp else None
    if results is None and (sweep_dir / "autointerp" / "results.parquet").is_file():
        results = sweep_dir / "autointerp"
    expl = explanations_from(results / "results.parquet" if results else None)
    build_dashboard(cfg, lm, specs, indexes, general_texts, out, expl,
                    f"{cfg.name}: SSAE feature dashboard ({hook})", timings, key)  # fmt: skip
    log.info("dashboard: %s (%.1f s, of which LM %.1f s)", out / "index.html", time.perf_counter() - t0,
             timings.get("lm", 0.0))  # fmt: skip
    return out, True


def log_dashboard(tracking_uri: str, run_id: str, folder: Path) -> None:
    """Log the site as the run's `dashboard/` artifact folder (its index.html opens in the viewer)."""
    from mlflow.tracking import MlflowClient

    MlflowClient(tracking_uri=tracking_uri).log_artifacts(run_id, str(folder), "dashboard")
