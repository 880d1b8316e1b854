"""What must hold of any correct physics run, checked on its outputs (end-to-end tests reuse it).

`check_physics_run(sweep_dir, cfg)` reads the sweep folder a run wrote (`<workdir>/sweep/<key>`)
and asserts, for every test set, hook and SAE:
- every cross-entropy is finite, and zero-ablating a hook costs more than the clean model;
- an SAE that explains some variance (FVU < 1) lands between the clean and the zero-ablation CE,
  and so does every headline row (the SSAEs at the matched L0, the GSAE at its own);
- the SSAEs are compared at an L0 inside `sweep.l0_range`;
- each Δ lies inside its own bootstrap CI;
- the report's headline table shows exactly the numbers of `headline.csv`;
- the dashboard has a page for every feature of every SAE it lists, and the index links them;
- the MLflow store holds the sweep's parent run with one finished child run per trial.
It returns the parsed headline rows for result-specific assertions.
"""

from __future__ import annotations

import csv
import html
import json
import math
import re
from pathlib import Path
from typing import Any

from ssae_ray.config import Config

_ROW = re.compile(r"^\| (\w+) \| `([^`]+)` \| ([^|]+?) \| ([-\d.]+) \| ([-\d.–]+)")


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _num(v: str) -> float:
    return float(v) if v not in ("", None) else math.nan


def check_ce_order(metrics: list[dict[str, str]], headline: list[dict[str, str]]) -> None:
    for r in metrics:
        clean, spliced, zero = _num(r["ce_clean"]), _num(r["ce_spliced"]), _num(r["ce_zero"])
        assert all(map(math.isfinite, (clean, spliced, zero))), r
        assert clean < zero, ("zero-ablation must cost something", r)
        if _num(r["fvu"]) < 1:
            assert clean <= spliced <= zero, ("an SAE with FVU < 1 lands between clean and zero", r)
    for r in headline:
        assert _num(r["ce_clean"]) <= _num(r["ce"]) <= _num(r["ce_zero"]), ("headline CE out of order", r)


def check_headline(cfg: Config, headline: list[dict[str, str]]) -> None:
    lo, hi = cfg.sweep.l0_range
    for r in headline:
        if r["strategy"] != "gsae":
            assert lo <= _num(r["l0"]) <= hi, ("SSAEs compared outside sweep.l0_range", r)
            d, ci_lo, ci_hi = _num(r["d_ce_vs_random"]), _num(r["ci_lo"]), _num(r["ci_hi"])
            assert ci_lo - 1e-9 <= d <= ci_hi + 1e-9, ("Δ outside its own CI", r)


def check_report_matches_headline(report: str, headline: list[dict[str, str]]) -> None:
    """Every headline row appears in the report's first table with the CSV's L0 (1 decimal) and CE
    (3 decimals), up to rounding."""
    from ssae_ray.eval.report import _name

    table = report.split("## Headline", 1)[1].split("\n## ", 1)[0]
    shown = {}
    for line in table.splitlines():
        m = _ROW.match(line)
        if m:
            shown[(m[1], m[2], m[3].strip())] = (m[4], m[5])
    assert len(shown) == len(headline), (len(shown), len(headline))
    for r in headline:
        key = (r["test"], r["hook"], _name(r["strategy"], float(r["tilt"] or 0)))
        assert key in shown, (key, sorted(shown))
        # equal up to the two roundings: the report's (1 and 3 decimals) of the value the CSV holds
        # rounded to 4 decimals (2.6785 in the CSV may be 2.678 in the report, from 2.67848)
        l0, ce = (float(v) for v in shown[key])
        assert abs(l0 - _num(r["l0"])) <= 0.05 + 5e-5 and abs(ce - _num(r["ce"])) <= 5e-4 + 5e-5, (
            key,
            shown[key],
            r,
        )


def check_dashboard(folder: Path) -> list[str]:
    """Every SAE the dashboard lists has a row in the index and one page (`f/<name>/<i>.html`) per
    feature the index counts as alive in-domain; returns the SAE names."""
    man = json.loads((folder / "manifest.json").read_text())
    index = (folder / "index.html").read_text()
    names = [s["name"] for s in man["saes"]]
    assert "gsae" in names and len(names) >= 2, names
    total = 0
    for s in man["saes"]:
        pages = {p.name for p in (folder / "f" / s["name"]).glob("*.html")}
        assert pages and pages <= {f"{i}.html" for i in range(s["d_sae"])}, (s["name"], len(pages))
        label = re.escape(html.escape(s["label"], quote=False))
        row = re.search(
            rf"<td>{label}</td><td>[^<]*</td><td class='n'>(\d+)</td><td class='n'>(\d+)</td>", index
        )
        assert row, ("no index row", s["label"])
        assert (int(row[1]), int(row[2])) == (s["d_sae"], len(pages)), (s["name"], row.groups(), len(pages))
        total += len(pages)  # one page per feature alive in-domain, as the index counts them
    assert man["feature_pages"] == total
    return names


def check_mlflow(sweep_dir: Path, n_trials: int) -> tuple[str, list[Any]]:
    """The parent run recorded in the sweep folder exists in its store and has `n_trials` finished
    child runs; returns (parent id, children)."""
    from mlflow.tracking import MlflowClient

    rec = json.loads((sweep_dir / "mlflow_parent_run.json").read_text())
    client = MlflowClient(tracking_uri=rec["tracking_uri"])
    parent = client.get_run(rec["run_id"])
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{rec['run_id']}'"
    )
    assert len(children) == n_trials, (len(children), n_trials)
    assert all(c.info.status == "FINISHED" for c in children), [c.info.status for c in children]
    return rec["run_id"], children


def check_physics_run(sweep_dir: Path, cfg: Config, dashboard: bool = True) -> list[dict[str, str]]:
    from ssae_ray.pipeline import sweep_config
    from ssae_ray.sweep import grid

    ev = sweep_dir / "eval"
    headline, metrics = _csv(ev / "headline.csv"), _csv(ev / "metrics.csv")
    hooks = set(sweep_config(cfg).sae.hooks)
    assert {r["hook"] for r in metrics} == hooks and {r["hook"] for r in headline} == hooks
    assert {r["strategy"] for r in headline} == {*cfg.sweep.strategies, "gsae"}
    check_ce_order(metrics, headline)
    check_headline(cfg, headline)
    check_report_matches_headline((ev / "report.md").read_text(), headline)
    if dashboard:
        check_dashboard(sweep_dir / "dashboard")
    check_mlflow(sweep_dir, len(grid(cfg)))
    return headline
