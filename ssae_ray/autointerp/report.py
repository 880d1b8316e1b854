"""Outputs of an auto-interp run: Parquet tables (atomic), F1 plots (Figure 8), a markdown report,
and MLflow logging when a run is active. Offline-backend outputs are labelled as such everywhere."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd

from ssae_ray.autointerp.offline import LABEL as OFFLINE_LABEL

log = logging.getLogger("ssae_ray")


def backend_label(backend: str, model: str) -> str:
    return OFFLINE_LABEL if backend == "offline" else f"Claude {model}"


def write_parquet_atomic(df: pd.DataFrame, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        df.to_parquet(tmp, index=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _save_fig(fig: Any, path: Path) -> Path:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    os.replace(tmp, path)
    return path


def plot_f1(df: pd.DataFrame, sae: str, label: str, path: Path) -> Path:
    """Figure 8 for one SAE: the distribution of feature F1 scores."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    f1 = df.loc[(df.sae == sae) & (df.status == "ok"), "f1"].astype(float)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.hist(f1, bins=[i / 10 for i in range(11)], color="tab:blue", edgecolor="white")
    if len(f1):
        ax.axvline(f1.mean(), color="k", ls="--", lw=1, label=f"mean {f1.mean():.2f}")
        ax.legend()
    ax.set(xlabel="F1 (Predictor vs true activation)", ylabel="features", xlim=(0, 1))
    ax.set_title(f"Auto-interp F1, {sae} (n={len(f1)})\n{label}", fontsize=9)
    try:
        return _save_fig(fig, path)
    finally:
        plt.close(fig)


def plot_comparison(df: pd.DataFrame, label: str, path: Path) -> Path:
    """F1 distributions of all SAEs side by side (box plots with the means marked)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = df[df.status == "ok"]
    names = list(dict.fromkeys(df.sae))
    data = [ok.loc[ok.sae == n, "f1"].astype(float).to_numpy() for n in names]
    fig, ax = plt.subplots(figsize=(1.6 * len(names) + 2.5, 3.8))
    ax.boxplot(data, showmeans=True)
    ax.set_xticks(range(1, len(names) + 1), [f"{n}\n(n={len(d)})" for n, d in zip(names, data)], fontsize=8)
    ax.set(ylabel="F1", ylim=(-0.02, 1.02))
    ax.set_title(f"Auto-interp F1 by SAE\n{label}", fontsize=9)
    try:
        return _save_fig(fig, path)
    finally:
        plt.close(fig)


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """One row per SAE: scored features, F1 mean / median, diversity mean, failures, usage."""
    out = []
    for sae, g in df.groupby("sae", sort=False):
        ok = g[g.status == "ok"]
        out.append(
            {
                "sae": sae,
                "n_features": len(g),
                "n_scored": len(ok),
                "n_failed": int((g.status == "failed").sum()),
                "n_error": int((g.status == "error").sum()),
                "n_not_run": int(g.status.isin(["spend_cap", "api_down"]).sum()),
                "f1_mean": float(ok.f1.astype(float).mean()) if len(ok) else float("nan"),
                "f1_median": float(ok.f1.astype(float).median()) if len(ok) else float("nan"),
                "diversity_mean": float(pd.to_numeric(ok.diversity).mean()) if len(ok) else float("nan"),
                "requests": int(g.requests.sum()),
                "cached_calls": int(g.cached_calls.sum()),
                "input_tokens": int(g.input_tokens.sum()),
                "output_tokens": int(g.output_tokens.sum()),
            }
        )
    return pd.DataFrame(out)


def report_markdown(
    summary: pd.DataFrame, dead: dict[str, tuple[int, int]], label: str, meta: dict[str, Any]
) -> str:
    lines = [f"# Auto-interpretability: {label}", ""]
    if meta.get("backend") == "offline":
        lines += [
            "**Offline keyword baseline: no language model was asked; these are not the paper's scores.**",
            "",
        ]
    if meta.get("stopped"):
        again = ("rerun when the API answers" if meta.get("usage", {}).get("stop_kind") == "api_down"
                 else "rerun with a higher cap")  # fmt: skip
        lines += [f"**Stopped early: {meta['stopped']}.** Finished features are saved below and in the cache; "
                  f"{again} to finish (cached calls are free).", ""]  # fmt: skip
    lines += [
        f"Test set: {meta['n_contexts']} contexts, {meta['n_tokens']} tokens (position 0 excluded). "
        f"Interpreter: top {meta['n_top']} examples; Predictor: {meta['n_predict']} activating + "
        f"{meta['n_predict']} non-activating.",
        "",
        "| SAE | dead / width | scored | failed | error | not run | F1 mean | F1 median | diversity |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in summary.itertuples():
        nd, width = dead.get(r.sae, (0, 0))
        lines.append(
            f"| {r.sae} | {nd} / {width} | {r.n_scored} | {r.n_failed} | {r.n_error} | {r.n_not_run} | "
            f"{r.f1_mean:.3f} | {r.f1_median:.3f} | {r.diversity_mean:.1f} |"
        )
    usage = meta.get("usage") or {}
    lines += ["", f"Backend: {label}. Paid calls: {usage.get('calls', 0)}, tokens in/out: "
              f"{usage.get('input_tokens', 0)}/{usage.get('output_tokens', 0)}, est. ${usage.get('usd', 0):.4f}."]  # fmt: skip
    return "\n".join(lines) + "\n"


def mlflow_active() -> bool:
    try:
        import mlflow
    except ImportError:
        return False
    return mlflow.active_run() is not None


def log_mlflow(out_dir: Path, summary: pd.DataFrame, params: dict[str, Any]) -> bool:
    """Log params, per-SAE metrics and the output folder to the active MLflow run, if any."""
    if not mlflow_active():
        return False
    import mlflow

    mlflow.log_params({f"autointerp.{k}": v for k, v in params.items()})
    for r in summary.itertuples():
        name = str(r.sae).replace("/", "_")
        metrics = {"f1_mean": r.f1_mean, "f1_median": r.f1_median, "n_scored": r.n_scored,
                   "n_failed": r.n_failed, "diversity_mean": r.diversity_mean}  # fmt: skip
        mlflow.log_metrics({f"autointerp/{name}/{k}": float(v) for k, v in metrics.items() if v == v})
    mlflow.log_artifacts(str(out_dir), artifact_path="autointerp")
    return True
