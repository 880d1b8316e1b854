"""`run_autointerp`: examples for every SAE, scoring on Ray actors (or in-process), outputs.

Outputs in `out_dir`: `results.parquet` (one row per scored feature, all SAEs), one
`features_<sae>.parquet` per SAE (activation counts of every feature, dead ones included),
`f1_<sae>.png` (Figure 8), `f1_comparison.png`, `report.md`, `manifest.json` (written last;
`complete: false` when the spend cap stopped the run). The response cache lives outside
`out_dir` (`autointerp.cache_path`), so a rerun or a resumed run makes no paid call twice.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from ssae_ray.autointerp import report
from ssae_ray.autointerp.actors import score_local, score_on_ray
from ssae_ray.autointerp.client import AutoInterpError, api_key_from_env
from ssae_ray.autointerp.examples import feature_examples, scan_many, select_features
from ssae_ray.autointerp.score import Job
from ssae_ray.collect import ActivationIndex
from ssae_ray.config import AutoInterpConfig, Config
from ssae_ray.models import LM, tokenize_docs
from ssae_ray.stages import write_json_atomic

log = logging.getLogger("ssae_ray")


def check_config(ai: AutoInterpConfig) -> None:
    if ai.backend not in ("claude", "offline"):
        raise AutoInterpError(f"autointerp.backend must be 'claude' or 'offline', got {ai.backend!r}")
    if ai.diversity_sets < 0:
        raise AutoInterpError(f"autointerp.diversity_sets must be 0 or more, got {ai.diversity_sets}")
    for name in ("n_top", "n_predict", "window", "num_actors", "max_concurrency", "max_features"):
        if getattr(ai, name) < 1:
            raise AutoInterpError(f"autointerp.{name} must be at least 1, got {getattr(ai, name)}")
    if ai.spend_cap_tokens is not None and ai.spend_cap_tokens <= 0:
        raise AutoInterpError(
            f"autointerp.spend_cap_tokens must be positive or null, got {ai.spend_cap_tokens}"
        )


def cache_path(cfg: Config) -> Path:
    ai = cfg.autointerp
    return Path(ai.cache_path).expanduser() if ai.cache_path else cfg.root / "autointerp" / "cache.sqlite"


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def build_jobs(
    cfg: Config,
    lm: LM,
    saes: dict[str, Any],
    hook: str | None,
    texts: Sequence[str],
    out_dir: Path,
    indexes: dict[str, ActivationIndex] | None = None,
) -> tuple[list[Job], dict[str, Any]]:
    """Scan the test texts once for all SAEs (one LM forward per batch) and build the examples of
    the features to score. `hook` None takes each SAE's own `cfg.metadata.hook_name`. `indexes`:
    a scan already made (by the dashboard's shared pass, `scan_contexts(cfg, ...)`, with at least
    this config's `n_top` and sample size) is used instead of a new one."""
    ai = cfg.autointerp
    contexts = (
        next(iter(indexes.values())).contexts
        if indexes
        else tokenize_docs(
            lm.tokenizer,
            list(texts),
            cfg.model.context_len,
            ai.max_contexts,
            prepend_bos=cfg.model.prepend_bos,
        )
    )
    if contexts.input_ids.shape[0] == 0:
        raise AutoInterpError("autointerp got no test text (every text was empty or shorter than 2 tokens)")
    targets: dict[str, tuple[Any, str]] = {}
    for name, sae in saes.items():
        width = int(sae.W_dec.shape[0])
        bad = [f for f in ai.features if not 0 <= f < width]
        if bad:
            raise AutoInterpError(f"autointerp.features {bad} are outside SAE {name!r} (width {width})")
        h = hook or getattr(getattr(sae.cfg, "metadata", None), "hook_name", None)
        if not h:
            raise AutoInterpError(f"SAE {name!r} names no hook point; pass hook= to run_autointerp")
        if int(sae.W_enc.shape[0]) != lm.d_model:
            raise AutoInterpError(
                f"SAE {name!r} has d_in {sae.W_enc.shape[0]} but the LM's d_model is {lm.d_model}"
            )
        targets[name] = (sae, h)
    k_sample = sample_size(ai)
    if indexes is None:
        indexes = scan_many(
            lm, targets, contexts, ai.n_top, k_sample, cfg.model.batch_size, ai.act_threshold, cfg.seed
        )
    else:
        missing = [n for n in targets if n not in indexes]
        if missing:
            raise AutoInterpError(f"the shared scan holds no index for SAEs {missing}")
        indexes = {n: indexes[n].head(ai.n_top, k_sample) for n in targets}
    jobs: list[Job] = []
    meta: dict[str, Any] = {"n_contexts": int(contexts.input_ids.shape[0]), "dead": {}, "n_tokens": 0}
    for name, (sae, h) in targets.items():
        index = indexes[name]
        width = int(sae.W_dec.shape[0])
        meta["n_tokens"] = index.n_tokens
        n_dead = int((index.n_active_ctx == 0).sum())
        meta["dead"][name] = (n_dead, width)
        stats = pd.DataFrame({
            "feature": range(width),
            "n_active_ctx": index.n_active_ctx.numpy(),
            "n_active_tok": index.n_active_tok.numpy(),
            "max_act": index.top_acts[:, 0].clamp(min=0).numpy(),
        })  # fmt: skip
        report.write_parquet_atomic(stats, out_dir / f"features_{_safe(name)}.parquet")
        feats = list(ai.features) or select_features(index, ai.max_features, cfg.seed)
        log.info("autointerp %s: %d of %d features never activate on %d tokens; scoring %d",
                 name, n_dead, width, index.n_tokens, len(feats))  # fmt: skip
        exs = feature_examples(lm, sae, h, index, feats, ai.n_top, ai.n_predict, ai.window,
                               ai.act_threshold, cfg.seed, cfg.model.batch_size,
                               ai.diversity_sets if ai.diversity else 0)  # fmt: skip
        jobs += [Job(name, h, ex) for ex in exs]
    return jobs, meta


def sample_size(ai: AutoInterpConfig) -> int:
    """Activating contexts sampled per feature: Predictor positives and the diversity sets (drawn from
    the top half of the sample, so it holds twice as many)."""
    return ai.n_top + ai.n_predict + (2 * ai.diversity_sets * ai.n_top if ai.diversity else 0)


def run_autointerp(
    cfg: Config,
    lm: LM,
    saes: dict[str, Any],
    hook: str | None,
    texts: Sequence[str],
    out_dir: str | Path,
    use_ray: bool | None = None,
    indexes: dict[str, ActivationIndex] | None = None,
) -> Path:
    """Score features of each SAE (Interpreter -> Predictor -> F1, diversity) and write the outputs.

    `saes` maps a display name (`gsae`, `ssae-dense-lam2.5`) to an SAE; all are read at `hook`, or
    at each SAE's own metadata hook when `hook` is None.
    `use_ray`: None uses Ray actors when Ray is initialised, else scores in-process. `indexes`: a
    shared scan of the test texts (see `build_jobs`)."""
    ai = cfg.autointerp
    check_config(ai)
    api_key = api_key_from_env() if ai.backend == "claude" else None  # fail before any slow work
    if not saes:
        raise AutoInterpError("run_autointerp got no SAEs")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    jobs, meta = build_jobs(cfg, lm, saes, hook, texts, out, indexes)
    if use_ray is None:
        import ray

        use_ray = ray.is_initialized()
    runner = score_on_ray if use_ray else score_local
    rows, usage = runner(jobs, ai, api_key, cache_path(cfg))
    df = pd.DataFrame(rows)
    report.write_parquet_atomic(df, out / "results.parquet")
    model = "offline-keywords" if ai.backend == "offline" else ai.model
    label = report.backend_label(ai.backend, model)
    for name in saes:
        report.plot_f1(df, name, label, out / f"f1_{_safe(name)}.png")
    report.plot_comparison(df, label, out / "f1_comparison.png")
    summary = report.summarize(df)
    report.write_parquet_atomic(summary, out / "summary.parquet")
    stopped = usage.get("stopped")
    meta.update(backend=ai.backend, n_top=ai.n_top, n_predict=ai.n_predict, usage=usage, stopped=stopped)
    text = report.report_markdown(summary, meta["dead"], label, meta)
    (out / "report.md.tmp").write_text(text)
    (out / "report.md.tmp").replace(out / "report.md")
    params = {"backend": ai.backend, "model": model, "n_top": ai.n_top, "n_predict": ai.n_predict,
              "window": ai.window, "max_features": ai.max_features, "hooks": ",".join(sorted({j.hook for j in jobs}))}  # fmt: skip
    logged = report.mlflow_active()
    write_json_atomic(
        out / "manifest.json",
        {
            "stage": "autointerp",
            "complete": stopped is None,
            "stopped": stopped,
            "backend": ai.backend,
            "backend_label": label,
            "model": model,
            "hooks": {j.sae: j.hook for j in jobs},
            "saes": list(saes),
            "summary": summary.to_dict(orient="records"),
            "dead": meta["dead"],
            "usage": usage,
            "ray": bool(use_ray),
            "mlflow": logged,
            "seconds": round(time.perf_counter() - t0, 3),
        },
    )
    if logged:
        report.log_mlflow(out, summary, params)
    for r in summary.itertuples():
        log.info("autointerp %s [%s]: %d scored, F1 mean %.3f", r.sae, label, r.n_scored, r.f1_mean)
    if usage.get("stop_kind") == "api_down":
        n_ok = int((df.status == "ok").sum()) if len(df) else 0
        raise AutoInterpError(
            f"stopped: {stopped}. {n_ok} finished features are kept in {out}; rerun when the API answers "
            "(finished calls are cached and not paid again)"
        )
    if stopped:
        log.warning("autointerp stopped early: %s. Partial results in %s; rerun with a higher cap to finish "
                    "(finished calls are cached)", stopped, out)  # fmt: skip
    return out
