"""Table 1 as CSV and markdown, skyline plots, and logging to MLflow."""

from __future__ import annotations

import contextlib
import csv
import io
import os
import re
from pathlib import Path
from typing import Any

from ssae_ray.shift.shift import Row, ShiftResult
from ssae_ray.stages import write_json_atomic

COLUMNS = ("method", "profession", "gender", "worst", "n_ablated")


def table_rows(rows: list[Row]) -> list[dict[str, Any]]:
    """Percentages with one decimal, as in the paper."""
    return [
        {"method": r.method, "profession": round(100 * r.acc.profession, 1), "gender": round(100 * r.acc.gender, 1),
         "worst": round(100 * r.acc.worst, 1), "n_ablated": "" if r.n_ablated is None else r.n_ablated}
        for r in rows
    ]  # fmt: skip


def to_csv(rows: list[Row]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    w.writeheader()
    w.writerows(table_rows(rows))
    return buf.getvalue()


def _cell(r: dict[str, Any], row: Row, key: str) -> str:
    if not row.ci or key not in row.ci:
        return f"{r[key]:.1f}"
    lo, hi = row.ci[key]
    return f"{r[key]:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"


def to_markdown(rows: list[Row], notes: list[str] = ()) -> str:
    """Table 1's layout: balanced-set accuracy (%) for profession (up), gender (down), worst group
    (up), each with its bootstrap CI over test documents when the rows carry one."""
    lines = ["| Method | ↑Prof. | ↓Gen. | ↑Worst | ablated |", "| --- | --- | --- | --- | --- |"]
    for r, row in zip(table_rows(rows), rows, strict=True):
        cells = " | ".join(_cell(r, row, k) for k in ("profession", "gender", "worst"))
        lines.append(f"| {r['method']} | {cells} | {r['n_ablated']} |")
    return "\n".join(lines + [""] + [f"- {n}" for n in notes]) + "\n"


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_outputs(result: ShiftResult, folder: str | Path, meta: dict[str, Any] | None = None) -> list[Path]:
    """table.csv, table.md, result.json and skyline.png / table.png under `folder` (each written atomically)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta = meta or {}
    notes = list(meta.get("notes", []))
    _write_text(folder / "table.csv", to_csv(result.rows))
    _write_text(folder / "table.md", to_markdown(result.rows, notes))
    write_json_atomic(folder / "result.json", {
        "rows": [{**r, "groups": row.acc.groups, "ci": row.ci} for r, row in zip(table_rows(result.rows), result.rows,
                                                                                   strict=True)],
        "curves": result.curves, "circuits": result.circuits, "seconds": result.seconds, "probe_layer": result.layer,
        **meta,
    })  # fmt: skip
    paths = [folder / "table.csv", folder / "table.md", folder / "result.json"]
    paths += plot(result, folder)
    return paths


def plot(result: ShiftResult, folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = []
    if result.curves:
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), sharex=True)
        for name, curve in result.curves.items():
            ks = [c["k"] for c in curve]
            for ax, key in zip(axes, ("profession", "gender", "worst"), strict=True):
                ax.plot(ks, [100 * c[key] for c in curve], marker="o", label=name)
        for ax, title in zip(
            axes, ("profession (dev, ↑)", "gender (dev, ↓)", "worst group (dev, ↑)"), strict=True
        ):
            ax.set_xscale("log")
            ax.set_xlabel("nodes ablated")
            ax.set_title(title)
            ax.grid(alpha=0.3)
        axes[0].set_ylabel("accuracy (%)")
        axes[-1].legend(fontsize=7)
        fig.tight_layout()
        p = folder / "skyline.png"
        fig.savefig(p, dpi=120)
        plt.close(fig)
        out.append(p)
    fig, ax = plt.subplots(figsize=(9, 0.35 * len(result.rows) + 1.2))
    names = [r.method for r in result.rows][::-1]
    for j, (key, color) in enumerate(
        (("profession", "tab:blue"), ("gender", "tab:gray"), ("worst", "tab:green"))
    ):
        vals = [100 * getattr(r.acc, key) for r in result.rows][::-1]
        ax.barh([i + 0.27 * (j - 1) for i in range(len(names))], vals, height=0.27, color=color, label=key)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_xlabel("balanced test accuracy (%)")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    p = folder / "table.png"
    fig.savefig(p, dpi=120)
    plt.close(fig)
    return [*out, p]


def metric_name(method: str, column: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.\-/ ]", "_", f"shift/{method}/{column}").replace(" ", "_")


def log_mlflow(
    result: ShiftResult,
    folder: str | Path,
    params: dict[str, Any] | None = None,
    uri: str | None = None,
    experiment: str = "ssae-ray",
) -> bool:
    """Log Table 1 as metrics and the output folder as artifacts: into the active MLflow run (as a
    nested `shift` run), else into a new run when a tracking URI is set (`MLFLOW_TRACKING_URI` or
    `uri`). Returns False (and logs nothing) when MLflow is not configured."""
    import mlflow

    from ssae_ray.tracking import safe_params

    active = mlflow.active_run()
    uri = os.environ.get("MLFLOW_TRACKING_URI") or uri
    if active is None and not uri:
        return False
    from ssae_ray.tracking import fluent

    with (
        fluent(uri, experiment) if active is None else contextlib.nullcontext(),
        mlflow.start_run(run_name="shift", nested=active is not None),
    ):
        if params:
            mlflow.log_params(safe_params(params))
        metrics = {}
        for r in result.rows:
            for col in ("profession", "gender", "worst"):
                metrics[metric_name(r.method, col)] = getattr(r.acc, col)
        metrics.update({metric_name("seconds", k): v for k, v in result.seconds.items()})
        mlflow.log_metrics(metrics)
        mlflow.log_artifacts(str(folder), artifact_path="shift")
    return True
