"""`report.md`: the strategies compared at matched L0 on every test set, AUCs, TERM against ERM at
matched L0, feature statistics, and the figures, written from `runner.write_tables`' results."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ssae_ray.config import Config

STRATEGY_NAMES = {
    "gsae": "GSAE",
    "random": "random-corpus finetune",
    "bm25": "BM25",
    "dense": "dense",
    "dense+tracin": "dense+TracIn",
    "bm25+tracin": "BM25+TracIn",
}


def _f(v: Any, nd: int = 3) -> str:
    if v is None or v == "" or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    return f"{v:.{nd}f}" if isinstance(v, float) else str(v)


def _name(s: str, tilt: float) -> str:
    base = STRATEGY_NAMES.get(s, s)
    return base if not tilt else f"{base} + TERM (tilt {tilt:g})"


def write_report(cfg: Config, res: dict[str, Any], path: str | Path, sweep: Any = None) -> Path:
    """Write the markdown report (atomically) and return its path."""
    path = Path(path)
    ref = res["reference"]
    match = res["match_l0"]
    lines = [
        f"# SSAE report: {cfg.name}",
        "",
        f"Model `{cfg.model.source}`; hooks {', '.join(f'`{h}`' for h in cfg.sae.hooks)}; "
        f"grid λ {list(cfg.sweep.lams)} × tilt {list(cfg.sweep.tilts)} ({cfg.train.tilt_mode}) × seeds "
        f"{list(cfg.sweep.seeds)} × strategies {list(cfg.sweep.strategies)}; {cfg.train.steps} finetune steps.",
        "Each trial's checkpoint is chosen on the validation set "
        f"(`{cfg.sweep.select_metric}`); the test sets below were never used for selection.",
        "",
    ]
    if len(cfg.sweep.lams) < 8 or len(cfg.sweep.seeds) < 3:
        lines += [
            f"> This is a reduced grid ({len(cfg.sweep.lams)} λ, {len(cfg.sweep.seeds)} seed(s)) sized for this "
            "machine, not the paper's 8 λ × 3 seeds: read the curves as indicative.",
            "",
        ]
    lines += [
        f"## Headline: cross-entropy at matched L0 = {match:g}",
        "",
        f"CE (nats) of the LM with the SAE spliced in, interpolated on each seed-averaged Pareto curve at L0 "
        f"{match:g}; ± is the spread over seeds; Δ is CE minus the {STRATEGY_NAMES.get(ref, ref)} at the same L0 "
        f"with a {cfg.eval.ci_level:.0%} bootstrap CI over test documents ({cfg.eval.bootstrap} resamples). "
        "Lower is better. The GSAE is shown at its own L0. Where a test set's curves do not all reach "
        f"L0 {match:g} (L0 shifts between test sets), they are compared at the middle of their common "
        "span instead: the L0 column says where.",
        "",
        "| test | hook | SAE | L0 | CE ± seeds | perplexity | ppl / GSAE | Δ CE [CI] | note |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    dkey = f"d_ce_vs_{ref}"
    for r in res["headline"]:
        ci = f"{_f(r.get(dkey))} [{_f(r.get('ci_lo'))}, {_f(r.get('ci_hi'))}]" if dkey in r else "–"
        spread = "ce_seed_std" in r and r.get("n_seeds", 1) > 1  # one seed has no spread to show
        ce = f"{_f(r.get('ce'))} ± {_f(r.get('ce_seed_std'))}" if spread else _f(r.get("ce"))
        lines.append(f"| {r['test']} | `{r['hook']}` | {_name(r['strategy'], r['tilt'])} | {_f(r.get('l0'), 1)} | "
                     f"{ce} | {_f(r.get('ppl'), 2)} | {_f(r.get('ppl_rel_gsae'))} | {ci} | {r.get('note', '')} |")  # fmt: skip
    clean = {(r["test"]): r.get("ce_clean") for r in res["headline"] if "ce_clean" in r}
    zero = {(r["test"], r["hook"]): r.get("ce_zero") for r in res["headline"] if "ce_zero" in r}
    lines += ["", "Clean CE: " + ", ".join(f"{k} {_f(v)}" for k, v in clean.items()) + "; zero-ablation CE: "
              + ", ".join(f"{k[0]}/{k[1]} {_f(v)}" for k, v in zero.items()) + ".", ""]  # fmt: skip
    lo, hi = cfg.sweep.l0_range
    lines += [
        f"## Pareto AUC over L0 {lo:g}–{hi:g}",
        "",
        "Mean perplexity over the range: the trapezoid area of the piecewise-linear perplexity-vs-L0 curve "
        "restricted to the range, divided by its width (and the same for perplexity relative to the GSAE). "
        "Lower is better. Where a test set's curves do not all cover the range (L0 shifts between test "
        "sets), that set's AUCs are taken over the span its curves share instead: the range column says "
        "which; – where a curve does not span it.",
        "",
        "| test | hook | SAE | L0 span | AUC range | AUC perplexity | AUC rel. GSAE |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in res["auc"]:
        rng = f"{_f(r['auc_lo'], 1)}–{_f(r['auc_hi'], 1)}" if "auc_lo" in r else f"{lo:g}–{hi:g}"
        lines.append(f"| {r['test']} | `{r['hook']}` | {_name(r['strategy'], r['tilt'])} | "
                     f"{_f(r['l0_min'], 1)}–{_f(r['l0_max'], 1)} | {rng} | {_f(r.get('auc_ppl'))} | "
                     f"{_f(r.get('auc_ppl_rel_gsae'))} |")  # fmt: skip
    lines += ["", "## TERM beside ERM at matched L0", ""]
    if res["term_vs_erm"]:
        lines += [
            "Every TERM point against the ERM curve of the same selection interpolated at the same L0 "
            "(TERM mostly raises L0, so unmatched comparisons mislead: docs/CALIBRATION.md).",
            "",
            "| test | hook | selection | tilt | λ | L0 | CE TERM | CE ERM @ L0 | Δ [CI] | note |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in res["term_vs_erm"]:
            lines.append(f"| {r['test']} | `{r['hook']}` | {r['strategy']} | {r['tilt']:g} | {r['lam']:g} | "
                         f"{_f(r['l0'], 1)} | {_f(r['ce_term'])} | {_f(r.get('ce_erm_matched'))} | "
                         f"{_f(r.get('d_ce'))} [{_f(r.get('ci_lo'))}, {_f(r.get('ci_hi'))}] | {r.get('note', '')} |")  # fmt: skip
    else:
        lines.append("No TERM runs in this sweep (sweep.tilts holds only 0).")
    lines += [
        "",
        "## Features on the in-domain test set",
        "",
        f"One SAE per selection / tilt: the λ whose test L0 is nearest {match:g} (first seed). Coverage: share of "
        f"the test set's token types among the top-{cfg.eval.logit_lens_topk} logit-lens tokens of some latent "
        "(decoder rows through the final norm's scale and W_U). Diagnostics: PCA components for 90% of decoder "
        "variance, mean decoder cosine, squared-error mean / p99 / max per token, activation entropy, max "
        "activation, dead share.",
        "",
        "| hook | SAE | L0 | CE | coverage | PCA90 | cos mean | err mean | err p99 | err max | entropy | max act | dead |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in res["features"]:
        lines.append(f"| `{r['hook']}` | {r['sae']} | {_f(r['l0'], 1)} | {_f(r['ce'])} | {_f(r['coverage'])} | "
                     f"{r['pca90']} | {_f(r['cos_mean'])} | {_f(r['err_mean'], 2)} | {_f(r['err_p99'], 2)} | "
                     f"{_f(r['err_max'], 2)} | {_f(r['entropy_mean'])} | {_f(r['max_act_mean'], 2)} | "
                     f"{_f(r['dead'])} |")  # fmt: skip
    lines += _vs_gsae_section(cfg, res) + _movement_section(cfg, res) + _control_section(cfg, res)
    lines += _tail_section(cfg, res)
    figs = [f for f in res["files"] if f.endswith(".png")]
    lines += ["", "## Figures", ""] + [f"![{f}]({f})" for f in figs]
    lines += ["", "Tables: " + ", ".join(f"`{f}`" for f in res["files"] if f.endswith(".csv")) + "."]
    if sweep is not None:
        lines += [
            "",
            f"Sweep folder `{sweep.folder}`; MLflow parent run `{sweep.parent_run_id}` at {sweep.tracking_uri}.",
        ]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(path)
    return path


def _ci(r: dict[str, Any], key: str, nd: int = 3) -> str:
    if key not in r:
        return "–"
    return f"{_f(r[key], nd)} [{_f(r.get(key + '_lo'), nd)}, {_f(r.get(key + '_hi'), nd)}]"


def _vs_gsae_section(cfg: Config, res: dict[str, Any]) -> list[str]:
    rows = res.get("vs_gsae") or []
    if not rows:
        return []
    lines = [
        "",
        "## Against the GSAE at its own L0",
        "",
        "CE of each SSAE curve interpolated at the GSAE's L0 on that test set, minus the GSAE's CE (Δ, with a "
        f"{cfg.eval.ci_level:.0%} bootstrap CI over test documents, paired per token). Negative: the finetune "
        "reconstructs that text better than the GSAE at the same sparsity.",
        "",
        "| test | hook | SAE | GSAE L0 | GSAE CE | SSAE CE | Δ CE vs GSAE [CI] | note |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(f"| {r['test']} | `{r['hook']}` | {_name(r['strategy'], r['tilt'])} | {_f(r['gsae_l0'], 1)} | {_f(r['gsae_ce'])} | "
                     f"{_f(r.get('ce'))} | {_ci(r, 'd_ce')} | {r.get('note', '')} |")  # fmt: skip
    return lines


def _movement_section(cfg: Config, res: dict[str, Any]) -> list[str]:
    rows = res.get("movement") or []
    th = cfg.eval.moved_cosine
    lines = ["", "## Decoder movement from the GSAE", ""]
    if not rows:
        return [*lines, "No SSAE of the GSAE's width was evaluated (no decoder movement to show)."]
    lines += [
        "Cosine between each SSAE decoder row and the same GSAE row (an SSAE is a finetuned GSAE): the median "
        f"and 1st percentile over latents, rows below cosine {th:g} (moved), and rows with no GSAE row at all "
        f"within {th:g} (new directions). A finetune that specialises moves few rows; one that retrains moves most.",
        "",
        "| hook | SAE | λ | seed | test L0 | median cos | 1st pct cos | moved | new directions |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(f"| `{r['hook']}` | {_name(r['strategy'], r['tilt'])} | {r['lam']:g} | {r['seed']} | "
                     f"{_f(r['l0'], 1)} | {_f(r['median_cos'])} | {_f(r['p01_cos'])} | "
                     f"{r['moved']} / {r['n']} ({_f(r['moved_share'])}) | {r['unmatched']} |")  # fmt: skip
    return lines


def _yes(v: Any) -> str:
    return "–" if v is None else ("yes" if v else "**no**")


def _control_section(cfg: Config, res: dict[str, Any]) -> list[str]:
    ec = cfg.eval
    lines = [
        "",
        "## Does the random-corpus control change the GSAE little?",
        "",
        "The random-corpus finetune sees the distribution the GSAE was trained on, so a converged GSAE should "
        f"barely change under it. Criterion: its in-domain CE at the GSAE's own L0 within {ec.control_max_ce_change:g} "
        f"nats of the GSAE's (Δ, with a {ec.ci_level:.0%} bootstrap CI over test documents; *equivalent* when the "
        f"whole CI is inside ±{ec.control_max_ce_change:g}) and its median decoder-row cosine to the GSAE (trial "
        f"nearest that L0) at least {ec.control_min_cosine:g}. Beside it: does the dense SSAE still beat the "
        "random-corpus one in-domain at matched L0, with a CI excluding 0?",
        "",
        "| hook | GSAE L0 | GSAE CE | random λ (L0) | Δ CE random − GSAE [CI] | equivalent | median cos | "
        "criterion met | dense − random [CI] | dense beats random | note |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in res.get("control") or []:
        lam = f"{r['random_lam']:g} ({_f(r.get('random_l0'), 1)})" if "random_lam" in r else "–"
        d = (
            _ci({"d": r.get("d_ce"), "d_lo": r.get("d_ce_lo"), "d_hi": r.get("d_ce_hi")}, "d")
            if "d_ce" in r
            else "–"
        )
        dr = (_ci({"d": r.get("dense_minus_random"), "d_lo": r.get("dense_lo"), "d_hi": r.get("dense_hi")}, "d")
              if "dense_minus_random" in r else "–")  # fmt: skip
        lines.append(f"| `{r['hook']}` | {_f(r['gsae_l0'], 1)} | {_f(r['gsae_ce'])} | {lam} | {d} | "
                     f"{_yes(r.get('ce_equivalent'))} | {_f(r.get('median_cos'))} | {_yes(r.get('met'))} | {dr} | "
                     f"{_yes(r.get('dense_beats'))} | {r.get('note', '')} |")  # fmt: skip
    return lines


def tail_findings(rows: list[dict[str, Any]], ref: str = "GSAE", prefix: str = "d_") -> list[str]:
    """One sentence per SSAE: does it cover more tail token types than `ref`, with the CI
    (`<prefix>tail_coverage` and its `_lo` / `_hi`: `d_` against the GSAE, `vr_` against random)."""
    out = []
    key = f"{prefix}tail_coverage"
    for r in rows:
        if r["sae"] == ref or not math.isfinite(r.get(key, float("nan"))):
            continue
        lo, hi, d = r[f"{key}_lo"], r[f"{key}_hi"], r[key]
        if lo > 0:
            verdict = "covers **more** tail token types than"
        elif hi < 0:
            verdict = "covers **fewer** tail token types than"
        else:
            verdict = "is **not distinguishable** in tail coverage from"
        out.append(
            f"`{r['hook']}` {r['sae']} (L0 {_f(r['l0'], 1)}) {verdict} the {STRATEGY_NAMES.get(ref, ref)}: "
            f"Δ {d:+.3f} [{lo:+.3f}, {hi:+.3f}]."
        )
    return out


def _tail_section(cfg: Config, res: dict[str, Any]) -> list[str]:
    ec = cfg.eval
    rows = res.get("tail") or []
    lines = [
        "",
        "## Tail concepts, with confidence intervals",
        "",
        f"Logit-lens coverage (Fig. 2, 6): share of the in-domain test set's token types among the top-"
        f"{ec.logit_lens_topk} tokens of some latent; *tail*: the rarest {ec.tail_fraction:.0%} of the types. "
        "Activation counts (Fig. 7): share of latents active on the test set, median activation count over latents. "
        f"{ec.ci_level:.0%} percentile bootstrap CIs ({ec.bootstrap} resamples) over the units each statistic "
        "averages: token types for coverage (the tail types for tail coverage), latents for the activation "
        "statistics; Δ paired against the GSAE (by token type; by latent, an SSAE latent being finetuned from "
        "the GSAE latent of the same index). Same SAEs as the feature table.",
        "",
        "| hook | SAE | L0 | coverage [CI] | tail coverage [CI] | Δ tail vs GSAE [CI] | Δ tail vs random [CI] | "
        "active latents [CI] | median count [CI] | Δ median count [CI] |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(f"| `{r['hook']}` | {r['sae']} | {_f(r['l0'], 1)} | {_ci(r, 'coverage')} | "
                     f"{_ci(r, 'tail_coverage')} | {_ci(r, 'd_tail_coverage')} | {_ci(r, 'vr_tail_coverage')} | "
                     f"{_ci(r, 'active_latents')} | "
                     f"{_ci(r, 'median_count', 1)} | {_ci(r, 'd_median_count', 1)} |")  # fmt: skip
    found = tail_findings(rows)
    if found:
        lines += ["", "Finding (tail coverage vs the GSAE):", ""] + [f"- {s}" for s in found]
    found = tail_findings([r for r in rows if r["sae"] != "GSAE"], "random", "vr_")
    if found:
        lines += [
            "",
            "Finding (tail coverage vs the random-corpus finetune, as the paper's Fig. 2 compares):",
            "",
        ]
        lines += [f"- {s}" for s in found]
    return lines
