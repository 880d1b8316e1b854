"""Evaluate a sweep on the test sets: every trial's best-on-validation SSAEs and the GSAEs, on the
in-domain, OOD and general test sets; then curves, AUCs, matched-L0 tables with CIs, logit-lens
coverage, feature statistics and TERM diagnostics, written as CSVs and PNGs with a report.

`evaluate_sweep(cfg, lm, sweep, gsaes, test_sets, out)` is what the pipeline calls.
"""

from __future__ import annotations

import csv
import logging
from collections import defaultdict
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from tqdm.auto import tqdm

from ssae_ray.config import Config
from ssae_ray.eval import curves as C
from ssae_ray.eval import features as F
from ssae_ray.eval import plots
from ssae_ray.eval.evaluate import SAEEval, TestSet, doc_counts, evaluate_saes_on, iter_captured
from ssae_ray.eval.logit_lens import feature_top_tokens, lm_unembed, tail_coverage, token_counts
from ssae_ray.eval.metrics import CI, EvalError, pareto_auc, perplexity
from ssae_ray.eval.movement import Movement, control_check, decoder_movement
from ssae_ray.stages import atomic_dir

log = logging.getLogger("ssae_ray")

GSAE = "gsae"


class EvalOutputs(NamedTuple):
    folder: Path
    """CSVs, PNGs and report.md."""
    headline: list[dict[str, Any]]
    auc: list[dict[str, Any]]
    term_vs_erm: list[dict[str, Any]]


def check_eval_inputs(cfg: Config, sweep: Any, test_sets: dict[str, TestSet | None]) -> None:
    """Clear errors before any LM work: a missing test set, or an L0 range no curve reaches (on
    validation L0s of the selected checkpoints)."""
    if "test" not in test_sets:
        raise EvalError(
            f"no in-domain test set (`test`) given; have {sorted(test_sets)}. Build it with the corpus stage"
        )
    for name, ts in test_sets.items():
        if ts is None or ts.tokens.input_ids.shape[0] == 0:
            raise EvalError(
                f"test set {name!r} is missing or empty; check corpus.{name}_path / the corpus stage"
            )
    lo, hi = cfg.sweep.l0_range
    spans = defaultdict(list)
    for t, rec in sweep.best.items():
        for h in cfg.sae.hooks:
            spans[(t.strategy, t.tilt, h)].append(rec.val.get(f"val_l0/{h}", rec.val["val_l0"]))
    reach = [k for k, v in spans.items() if min(v) <= lo and max(v) >= hi]
    if not reach:
        desc = ", ".join(
            f"{s} tilt {t:g} {h}: [{min(v):.1f}, {max(v):.1f}]" for (s, t, h), v in spans.items()
        )
        raise EvalError(
            f"no curve's validation L0 covers sweep.l0_range [{lo:g}, {hi:g}] (spans: {desc}). Widen "
            "sweep.lams (smaller lambda -> higher L0) or set sweep.l0_range inside the spans."
        )


def evaluate_sweep(
    cfg: Config, lm: Any, sweep: Any, gsaes: dict[str, Any], test_sets: dict[str, TestSet], out: str | Path
) -> EvalOutputs:
    """Score every selected checkpoint and GSAE on every test set and write the tables, figures and
    report into `out` (atomically)."""
    from ssae_ray.saes import load_sae

    check_eval_inputs(cfg, sweep, test_sets)
    hooks = list(cfg.sae.hooks)
    bs = cfg.eval.batch_size
    evals: dict[tuple, SAEEval] = {}  # (strategy, tilt, lam, seed, hook, test) -> SAEEval
    moves: dict[tuple, Movement] = {}  # (strategy, tilt, lam, seed, hook) -> decoder movement from the GSAE
    fly = max(1, int(getattr(cfg.eval, "saes_in_flight", 8)))
    for name, ts in test_sets.items():
        # Per-token statistics are only used on the in-domain test set (the feature figures).
        got = evaluate_saes_on(
            lm, [(gsaes[h], h) for h in hooks], ts, bs, per_token=name == "test", doc_loss=True
        )
        for h, e in zip(hooks, got, strict=True):
            evals[(GSAE, 0.0, 0.0, 0, h, name)] = e.check_finite("the GSAE")
    jobs = [(t, rec, h) for t, rec in sweep.best.items() for h in hooks]
    bar = tqdm(total=len(jobs) * len(test_sets), desc="eval SSAEs", unit="sae")
    groups = [jobs[g0 : g0 + fly] for g0 in range(0, len(jobs), fly)]

    def load(group: list) -> list[tuple[Any, str]]:
        return [(load_sae(Path(rec.path) / h, str(lm.device)), h) for _, rec, h in group]

    for group, saes, scored in score_groups(cfg, lm, groups, load, test_sets, bs):
        for (t, _, h), (sae, _) in zip(group, saes, strict=True):
            if sae.W_dec.shape == gsaes[h].W_dec.shape:
                moves[(t.strategy, t.tilt, t.lam, t.seed, h)] = decoder_movement(
                    sae.W_dec.to(gsaes[h].W_dec.device), gsaes[h].W_dec, cfg.eval.moved_cosine
                )
        for name, got in scored.items():
            for (t, rec, h), e in zip(group, got, strict=True):
                e.check_finite(f"the SSAE of trial {t.name} ({rec.path})")
                evals[(t.strategy, t.tilt, t.lam, t.seed, h, name)] = e
                bar.update(1)
    bar.close()
    with atomic_dir(Path(out)) as tmp:
        res = write_tables(cfg, lm, evals, test_sets, gsaes, sweep, tmp, moves)
        from ssae_ray.eval.report import write_report

        write_report(cfg, res, tmp / "report.md", sweep)
    final = Path(out)
    return EvalOutputs(final, res["headline"], res["auc"], res["term_vs_erm"])


def score_group(
    lm: Any, saes: list[tuple[Any, str]], test_sets: dict[str, TestSet], bs: int
) -> dict[str, list[SAEEval]]:
    """One group of (SAE, hook) on every test set, one streaming pass per set (per-token
    statistics on the in-domain set only: the feature figures use no others)."""
    return {
        name: evaluate_saes_on(lm, saes, ts, bs, per_token=name == "test", doc_loss=True)
        for name, ts in test_sets.items()
    }


def _score_group_task(cfg: Config, saes: list[tuple[Any, str]], test_sets: dict[str, TestSet],
                      bs: int) -> tuple[int, dict[str, list[SAEEval]]]:  # fmt: skip
    """`score_group` in a Ray task: loads the LM there, moves the SAEs to its device."""
    import os

    from ssae_ray.models import load_lm
    from ssae_ray.runtime import setup_logging

    setup_logging()
    lm = load_lm(cfg.model, cfg.root / "models")
    return os.getpid(), score_group(lm, [(s.to(lm.device), h) for s, h in saes], test_sets, bs)


def eval_slots(cfg: Config) -> tuple[int, dict[str, float]]:
    """(tasks at once, resources of each) for spreading evaluation over the cluster: one free GPU
    each where the cluster has free GPUs, else one CPU each; (0, {}) to evaluate in this process."""
    want = int(getattr(cfg.eval, "workers", 1))
    if want <= 1:
        return 0, {}
    import ray

    if not ray.is_initialized():
        return 0, {}
    free = ray.available_resources()
    if free.get("GPU", 0) >= 1:
        return min(want, int(free["GPU"])), {"num_gpus": 1, "num_cpus": min(1.0, free.get("CPU", 0))}
    n = min(want, int(free.get("CPU", 0)))
    return (n, {"num_cpus": 1}) if n >= 1 else (0, {})


def score_groups(cfg: Config, lm: Any, groups: list[list], load: Any, test_sets: dict[str, TestSet], bs: int):
    """Yield (group, its [(SAE, hook)], {test set: [SAEEval]}) for each group of SSAEs: here one
    group after another, or (`eval.workers` > 1 with Ray running and resources free) in up to that
    many Ray tasks at once, the test sets shared through the object store. Groups come back in
    order; at most `slots` groups' SAEs are held at a time."""
    slots, res = eval_slots(cfg)
    if slots == 0:
        for group in groups:
            saes = load(group)
            yield group, saes, score_group(lm, saes, test_sets, bs)
        return
    import ray

    log.info("evaluation: %d groups of SSAEs over %d Ray tasks (%s each)", len(groups), slots, res)
    task = ray.remote(max_retries=1, **res)(_score_group_task)
    shared = ray.put(test_sets)
    pending: list[tuple[list, list, Any]] = []
    it = iter(groups)
    while True:
        while len(pending) < slots:
            group = next(it, None)
            if group is None:
                break
            saes = [(s.to("cpu"), h) for s, h in load(group)]
            pending.append((group, saes, task.remote(cfg, saes, shared, bs)))
        if not pending:
            return
        group, saes, ref = pending.pop(0)
        _, scored = ray.get(ref)
        yield group, saes, scored


def log_to_mlflow(sweep: Any, outputs: EvalOutputs, extra: dict[str, str | Path] | None = None) -> None:
    """Log the eval folder (report.md, CSVs, PNGs) and `extra` files (e.g. the retrieval manifest,
    as {artifact sub-folder: path}) to the sweep's parent run, with the headline numbers as metrics."""
    from mlflow.tracking import MlflowClient

    from ssae_ray import tracking

    client = MlflowClient(tracking_uri=sweep.tracking_uri)
    client.log_artifacts(sweep.parent_run_id, str(outputs.folder), "eval")
    for sub, p in (extra or {}).items():
        if Path(p).is_file():
            client.log_artifact(sweep.parent_run_id, str(p), sub)
    m = {}
    for r in outputs.headline:
        if "ce" in r:
            m[f"test_ce/{r['test']}/{r['hook']}/{_label(r['strategy'], r['tilt'])}"] = r["ce"]
    for r in outputs.auc:
        m[f"auc_ppl/{r['test']}/{r['hook']}/{_label(r['strategy'], r['tilt'])}"] = r.get(
            "auc_ppl", float("nan")
        )
    tracking.log_metrics(client, sweep.parent_run_id, m)


def _csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    return path


def _label(strategy: str, tilt: float) -> str:
    return strategy if tilt == 0 else f"{strategy}+TERM(t={tilt:g})"


def write_tables(
    cfg: Config, lm: Any, evals: dict[tuple, SAEEval], test_sets: dict[str, TestSet], gsaes: dict[str, Any],
    sweep: Any, out: Path, moves: dict[tuple, Movement] | None = None,
) -> dict[str, Any]:  # fmt: skip
    ec, lo_hi = cfg.eval, cfg.sweep.l0_range
    moves = moves or {}
    match = cfg.sweep.match_l0 if cfg.sweep.match_l0 is not None else (lo_hi[0] + lo_hi[1]) / 2
    rows = [{"strategy": k[0], "tilt": k[1], "lam": k[2], "seed": k[3], **e.row()} for k, e in evals.items()]
    _csv(out / "metrics.csv", rows)
    # Seed-averaged curves per (strategy, tilt, hook, test).
    groups: dict[tuple, list] = defaultdict(list)
    for (s, t, lam, seed, h, name), e in evals.items():
        if s != GSAE:
            groups[(s, t, h, name)].append((lam, seed, e.l0, e.ce_spliced, e.loss))
    curves = {k: C.build_curve(v) for k, v in groups.items()}
    auc_rows, headline, term_rows = [], [], []
    ref = ec.reference if any(k[0] == ec.reference for k in curves) else GSAE
    for name, ts in test_sets.items():
        for h in cfg.sae.hooks:
            g = evals[(GSAE, 0.0, 0.0, 0, h, name)]
            mine = {k: c for k, c in curves.items() if k[2] == h and k[3] == name}
            m_here = _match_for(mine, match)
            auc_range = _auc_range(mine, lo_hi)  # shaded in the plot
            _pareto_plot(mine, g, auc_range, out / f"pareto_{name}_{_safe(h)}.png", f"{name} · {h}", cfg)
            for (s, t, _, _), c in mine.items():
                ppl = [perplexity(p.ce) for p in c.points]
                row = {
                    "test": name,
                    "hook": h,
                    "strategy": s,
                    "tilt": t,
                    "l0_min": c.span()[0],
                    "l0_max": c.span()[1],
                    "auc_lo": auc_range[0],
                    "auc_hi": auc_range[1],
                }
                try:
                    row["auc_ppl"] = pareto_auc(c.l0, ppl, auc_range)
                    row["auc_ppl_rel_gsae"] = pareto_auc(c.l0, [p / g.ppl for p in ppl], auc_range)
                except EvalError as e:
                    row["auc_ppl"] = row["auc_ppl_rel_gsae"] = float("nan")
                    row["note"] = str(e).split(":")[0]
                auc_rows.append(row)
                headline.append(_headline_row(name, h, s, t, c, m_here, ts, curves, ref, g, ec))
                if t > 0:
                    term_rows += _term_rows(name, h, s, t, c, curves.get((s, 0.0, h, name)), ts, ec)
            headline.append({"test": name, "hook": h, "strategy": GSAE, "tilt": 0.0, "l0": g.l0,
                             "ce": g.ce_spliced, "ppl": g.ppl, "ce_clean": g.ce_clean, "ce_zero": g.ce_zero,
                             "note": "GSAE at its own L0"})  # fmt: skip
    _csv(out / "auc.csv", auc_rows)
    _csv(out / "headline.csv", headline)
    _csv(out / "term_vs_erm.csv", term_rows)
    move_rows = [{"strategy": k[0], "tilt": k[1], "lam": k[2], "seed": k[3], "hook": k[4],
                  "l0": evals[(*k, "test")].l0 if (*k, "test") in evals else float("nan"),
                  "median_cos": m.median_cos, "p01_cos": m.p01_cos, "moved": m.moved, "moved_share": m.moved_share,
                  "unmatched": m.unmatched, "n": m.n, "threshold": m.threshold} for k, m in moves.items()]  # fmt: skip
    _csv(out / "movement.csv", move_rows)
    vs_gsae = _vs_gsae_rows(cfg, evals, curves, test_sets)
    _csv(out / "vs_gsae.csv", vs_gsae)
    control = _control_rows(cfg, evals, curves, headline, moves, vs_gsae, ref)
    _csv(out / "control.csv", control)
    feats, tail = _feature_figures(cfg, lm, evals, gsaes, sweep, test_sets["test"], match, out, moves)
    return {"headline": headline, "auc": auc_rows, "term_vs_erm": term_rows, "match_l0": match,
            "reference": ref, "features": feats, "movement": move_rows, "control": control, "tail": tail,
            "vs_gsae": vs_gsae,
            "files": sorted(p.name for p in out.iterdir())}  # fmt: skip


def _vs_gsae_rows(cfg, evals, curves, test_sets) -> list[dict[str, Any]]:
    """Per test set, hook and SSAE curve: CE of the SSAE at the GSAE's own L0 on that test set minus
    the GSAE's CE, with a bootstrap CI over test documents (paired per token). A curve whose L0
    span does not reach the GSAE's L0 gets a note instead."""
    ec, rows = cfg.eval, []
    for name, ts in test_sets.items():
        for h in cfg.sae.hooks:
            g = evals[(GSAE, 0.0, 0.0, 0, h, name)]
            for (s, t, hh, nn), c in sorted(curves.items(), key=lambda kv: (kv[0][0], kv[0][1])):
                if (hh, nn) != (h, name):
                    continue
                row: dict[str, Any] = {"test": name, "hook": h, "strategy": s, "tilt": t, "gsae_l0": g.l0,
                                       "gsae_ce": g.ce_spliced}  # fmt: skip
                try:
                    d = C.diff_vs_loss(c, g.l0, g.loss, doc_counts(ts), None, ec.bootstrap, ec.ci_level)
                    row.update(ce=g.ce_spliced + d.value, d_ce=d.value, d_ce_lo=d.lo, d_ce_hi=d.hi)
                except EvalError as e:
                    row["note"] = str(e).split(";")[0]
                rows.append(row)
    return rows


def _control_rows(cfg, evals, curves, headline, moves, vs_gsae, ref) -> list[dict[str, Any]]:
    """Per hook, `movement.control_check` of the random-corpus SSAE on the in-domain test set: its CE
    at the GSAE's own L0 minus the GSAE's (bootstrap CI over documents; `_vs_gsae_rows`' row), the
    decoder movement of its trial nearest that L0, and dense - random at matched L0 from the
    headline."""
    ec, rows = cfg.eval, []
    for h in cfg.sae.hooks:
        g = evals[(GSAE, 0.0, 0.0, 0, h, "test")]
        row: dict[str, Any] = {"hook": h, "gsae_l0": g.l0, "gsae_ce": g.ce_spliced}
        c = curves.get(("random", 0.0, h, "test"))
        d_ce = move = dense = None
        if c is None:
            rows.append(
                {**row, "note": "no random-corpus finetune in the sweep (add random to sweep.strategies)"}
            )
            continue
        vs = next(
            r
            for r in vs_gsae
            if (r["test"], r["hook"], r["strategy"], r["tilt"]) == ("test", h, "random", 0.0)
        )
        if "d_ce" in vs:
            d_ce = CI(vs["d_ce"], vs["d_ce_lo"], vs["d_ce_hi"], ec.ci_level)
        else:
            row["ce_note"] = vs["note"]
        near = [k for k in moves if k[0] == "random" and k[1] == 0.0 and k[4] == h and (*k, "test") in evals]
        if near:
            k = min(near, key=lambda k: (abs(evals[(*k, "test")].l0 - g.l0), k[3]))
            move, row["random_lam"], row["random_l0"] = moves[k], k[2], evals[(*k, "test")].l0
        for r in headline:
            if (r["test"], r["hook"], r["strategy"], r["tilt"]) == (
                "test",
                h,
                "dense",
                0.0,
            ) and ref == "random":
                if "d_ce_vs_random" in r:
                    dense = CI(r["d_ce_vs_random"], r["ci_lo"], r["ci_hi"], ec.ci_level)
        row.update(control_check(d_ce, move, ec.control_max_ce_change, ec.control_min_cosine, dense))
        if "ce_note" in row:
            row["note"] = f"{row.pop('ce_note')}; {row.get('note', '')}".rstrip("; ")
        rows.append(row)
    return rows


def _shared_span(curves: dict[tuple, Any]) -> tuple[float, float] | None:
    """The L0 interval every curve covers, or None when they share none."""
    spans = [c.span() for c in curves.values()]
    lo, hi = max(s[0] for s in spans), min(s[1] for s in spans)
    return (lo, hi) if lo <= hi else None


def _match_for(curves: dict[tuple, Any], match: float) -> float:
    """The L0 at which one test set's curves are compared: `match` when every curve spans it;
    otherwise the middle of the span all curves share (L0 shifts between test sets: on the
    sympy.physics OOD set every SAE fires about twice as often as in-domain); else `match`."""
    if not curves or all(lo <= match <= hi for lo, hi in (c.span() for c in curves.values())):
        return match
    shared = _shared_span(curves)
    return (shared[0] + shared[1]) / 2 if shared else match


def _auc_range(curves: dict[tuple, Any], lo_hi: tuple[float, float]) -> tuple[float, float]:
    """The L0 range one test set's AUCs are taken over: `sweep.l0_range` when every curve covers it;
    otherwise the span all curves share (as `_match_for`), so the strategies are still compared
    over one range; else `sweep.l0_range` (the AUC is then undefined)."""
    lo, hi = float(lo_hi[0]), float(lo_hi[1])
    if not curves or all(a <= lo and hi <= b for a, b in (c.span() for c in curves.values())):
        return lo, hi
    shared = _shared_span(curves)
    return shared if shared and shared[1] > shared[0] else (lo, hi)


def _safe(h: str) -> str:
    return h.replace(".", "_")


def _headline_row(name, h, s, t, c, match, ts, curves, ref, g, ec) -> dict[str, Any]:
    row: dict[str, Any] = {"test": name, "hook": h, "strategy": s, "tilt": t, "l0": match}
    try:
        a = C.at_l0(c, match)
    except EvalError:
        lo, hi = c.span()
        return {**row, "note": f"L0 {match:g} outside span [{lo:.1f}, {hi:.1f}]"}
    row.update(ce=a.ce, ce_seed_std=a.ce_std, ppl=perplexity(a.ce), ppl_rel_gsae=perplexity(a.ce) / g.ppl,
               ce_clean=g.ce_clean, ce_zero=g.ce_zero, n_seeds=c.points[0].n_seeds)  # fmt: skip
    try:
        if ref == GSAE:
            d = C.diff_vs_loss(c, match, g.loss, doc_counts(ts), None, ec.bootstrap, ec.ci_level)
        else:
            d = C.diff_at_l0(c, curves[(ref, 0.0, h, name)], match, doc_counts(ts), None, ec.bootstrap,
                             ec.ci_level)  # fmt: skip
        row.update({f"d_ce_vs_{ref}": d.value, "ci_lo": d.lo, "ci_hi": d.hi})
    except (EvalError, KeyError) as e:
        row["note"] = f"no difference vs {ref}: {str(e).split(';')[0]}"
    return row


def _term_rows(name, h, s, t, c, erm, ts, ec) -> list[dict[str, Any]]:
    """Every TERM point beside the ERM curve of the same strategy at the same L0."""
    out = []
    for p in c.points:
        row = {"test": name, "hook": h, "strategy": s, "tilt": t, "lam": p.lam, "l0": p.l0, "ce_term": p.ce}
        if erm is None:
            row["note"] = "no ERM (tilt 0) curve for this strategy: add 0 to sweep.tilts"
        else:
            try:
                e = C.at_l0(erm, p.l0)
                d = C.ce_diff_ci(p.loss, e.loss, doc_counts(ts), None, ec.bootstrap, ec.ci_level)
                row.update(ce_erm_matched=e.ce, d_ce=d.value, ci_lo=d.lo, ci_hi=d.hi)
            except EvalError as err:
                row["note"] = str(err).split(";")[0]
        out.append(row)
    return out


def _pareto_plot(mine, g, lo_hi, path, title, cfg) -> None:
    series = {}
    for (s, t, _, _), c in mine.items():
        ppl = np.array([perplexity(p.ce) for p in c.points])
        err = np.array([perplexity(p.ce) * p.ce_std for p in c.points])  # d ppl = ppl * d ce
        series[_label(s, t)] = (c.l0, ppl, err)
    refs = {"GSAE": (g.l0, g.ppl)}
    plots.pareto(series, path, title, l0_range=lo_hi, refs=refs)


def _feature_figures(cfg, lm, evals, gsaes, sweep, ts, match, out, moves=None) -> tuple[list, list]:
    """Logit-lens coverage, activation counts, log2 ratios, decoder movement and TERM diagnostics on
    the in-domain test set, for each strategy / tilt at the λ whose test L0 is nearest `match` (first
    seed) and the GSAE; and the tail-concept test with bootstrap CIs (`eval/tail.py`) on them."""
    import torch

    from ssae_ray.eval.evaluate import token_positions
    from ssae_ray.eval.tail import doc_token_counts, tail_test
    from ssae_ray.saes import load_sae

    moves = moves or {}
    w_u, norm = lm_unembed(lm)
    counts = token_counts(ts.tokens.input_ids[ts.tokens.attention_mask.bool()], w_u.shape[0])
    types, doc_counts = doc_token_counts(ts.tokens.input_ids, ts.tokens.attention_mask, ts.tokens.doc_index)
    pos = token_positions(ts)
    docs = np.unique(ts.tokens.doc_index.numpy())
    tok_doc = torch.from_numpy(
        np.searchsorted(docs, ts.tokens.doc_index[:, None].expand_as(pos)[pos].numpy())
    )
    rows, tail_rows = [], []
    for h in cfg.sae.hooks:
        chosen: dict[str, tuple[Any, SAEEval]] = {"GSAE": (gsaes[h], evals[(GSAE, 0.0, 0.0, 0, h, "test")])}
        keys: dict[str, tuple] = {}
        by: dict[tuple, list] = defaultdict(list)
        for t, rec in sweep.best.items():
            by[(t.strategy, t.tilt)].append((t, rec))
        for (s, tilt), items in by.items():

            def gap(item: tuple, s: str = s, tilt: float = tilt, h: str = h) -> tuple[float, int]:
                t = item[0]
                return abs(evals[(s, tilt, t.lam, t.seed, h, "test")].l0 - match), t.seed

            t, rec = min(items, key=gap)
            keys[_label(s, tilt)] = (s, tilt, t.lam, t.seed, h)
            chosen[_label(s, tilt)] = (
                load_sae(Path(rec.path) / h),
                evals[(s, tilt, t.lam, t.seed, h, "test")],
            )
        cov, cum, rank, ratio, cos, errf, ent, mx, pca = {}, {}, {}, {}, {}, {}, {}, {}, {}
        tops = {}
        fdocs = _doc_feature_counts(lm, {k: v[0] for k, v in chosen.items()}, h, ts, tok_doc, len(docs),
                                    cfg.eval.batch_size)  # fmt: skip
        g_counts = chosen["GSAE"][1].feature_counts
        for label, (sae, e) in chosen.items():
            top = feature_top_tokens(sae.W_dec, w_u, norm, cfg.eval.logit_lens_topk)
            tops[label] = top
            c = tail_coverage(top, counts, cfg.eval.freq_buckets)
            cov[f"{label} (L0 {e.l0:.0f})"] = c.bucket_coverage
            cum[label] = (c.cum_tokens, c.cum_covered)
            rank[label] = (
                np.arange(1, e.feature_counts.numel() + 1),
                F.activation_rank_curve(e.feature_counts) + 1,
            )
            if label != "GSAE" and e.feature_counts.shape == g_counts.shape:
                ratio[label] = F.log2_count_ratio(e.feature_counts, g_counts)
            cos[label] = F.decoder_cosines(sae.W_dec)
            eb = F.error_by_frequency(e.token_ids, e.sse, cfg.eval.freq_buckets)
            errf[label] = (np.arange(len(eb.bucket_mean)), eb.bucket_mean)
            ent[label], mx[label] = e.entropy.numpy(), e.max_act.numpy()
            n90, cumvar = F.pca_components(sae.W_dec)
            pca[label] = (np.arange(1, len(cumvar) + 1), cumvar)
            d = F.diagnostics(sae.W_dec, e.feature_counts, e.sse, e.entropy, e.max_act)
            mv = moves.get(keys.get(label, ()))
            move = {} if mv is None else {"median_cos": mv.median_cos, "p01_cos": mv.p01_cos, "moved": mv.moved,
                                          "moved_share": mv.moved_share, "unmatched": mv.unmatched}  # fmt: skip
            rows.append({"hook": h, "sae": label, "l0": e.l0, "ce": e.ce_spliced, "coverage": c.covered_share,
                         **{f"coverage_b{i}": v for i, v in enumerate(c.bucket_coverage)}, **d._asdict(), **move})  # fmt: skip
        ec = cfg.eval
        # Paired differences against the GSAE and, as the paper's Fig. 2 compares, against the
        # random-corpus finetune (`vr_*`); the same seed gives both calls the same draws.
        vs_random = {}
        if "random" in tops:
            for r in tail_test(
                types, doc_counts, tops, fdocs, "random", ec.tail_fraction, ec.bootstrap, ec.ci_level
            ):
                vs_random[r["sae"]] = {f"vr_{k[2:]}": v for k, v in r.items() if k.startswith("d_")}
        for r in tail_test(
            types, doc_counts, tops, fdocs, "GSAE", ec.tail_fraction, ec.bootstrap, ec.ci_level
        ):
            tail_rows.append({"hook": h, "l0": chosen[r["sae"]][1].l0, **r, **vs_random.get(r["sae"], {})})
        tag = _safe(h)
        plots.coverage_buckets(
            cov, out / f"coverage_{tag}.png", f"logit-lens coverage per frequency bucket · {h}"
        )
        plots.lines(cum, out / f"coverage_cumulative_{tag}.png", f"cumulative covered tokens (Fig. 6) · {h}",
                    "cumulative share of tokens (rarest first)", "cumulative share of covered tokens",
                    diagonal=True)  # fmt: skip
        plots.lines(rank, out / f"activation_rank_{tag}.png", f"activation count vs rank (Fig. 7) · {h}",
                    "feature rank", "activation count + 1", logx=True, logy=True)  # fmt: skip
        if ratio:
            plots.histograms(ratio, out / f"log2_ratio_{tag}.png", f"log2((M+1)/(B+1)) vs GSAE (Fig. 17) · {h}",
                             "log2 activation-count ratio")  # fmt: skip
        plots.density_lines(cos, out / f"decoder_cosine_{tag}.png", f"decoder cosine similarity (Fig. 20) · {h}",
                            "cosine similarity")  # fmt: skip
        plots.lines(pca, out / f"pca_{tag}.png", f"decoder PCA cumulative variance (Fig. 21) · {h}",
                    "components", "explained variance")  # fmt: skip
        plots.lines(errf, out / f"error_vs_freq_{tag}.png", f"reconstruction error vs frequency · {h}",
                    "frequency bucket (0 = most frequent)", "mean squared error")  # fmt: skip
        plots.histograms(
            ent, out / f"entropy_{tag}.png", f"token activation entropy (Fig. 5) · {h}", "entropy (nats)"
        )
        plots.histograms(mx, out / f"max_act_{tag}.png", f"max latent activation per token (Fig. 5) · {h}",
                         "max activation", logy=True)  # fmt: skip
    _csv(out / "features.csv", rows)
    _csv(out / "tail.csv", tail_rows)
    return rows, tail_rows


def _doc_feature_counts(lm: Any, saes: dict[str, Any], hook: str, ts: TestSet, tok_doc: Any, n_docs: int,
                        batch_size: int) -> dict[str, np.ndarray]:  # fmt: skip
    """`tail.doc_feature_counts` of several SAEs at `hook`, streamed over the test set one batch at
    a time (`tok_doc` [M]: the document, 0..n_docs-1, of each scored token in order)."""
    import torch

    out = {k: torch.zeros(n_docs, sae.cfg.d_sae, dtype=torch.float32) for k, sae in saes.items()}
    i = 0
    with torch.no_grad():
        for c in iter_captured(lm, ts, [hook], batch_size):
            x = c.acts[hook][c.pos.to(c.acts[hook].device)]
            d = tok_doc[i : i + x.shape[0]].long()
            i += x.shape[0]
            for k, sae in saes.items():
                dev, dtype = sae.W_dec.device, sae.W_dec.dtype
                for s in range(0, x.shape[0], 4096):
                    f = sae.encode(x[s : s + 4096].to(dev, dtype)).float().cpu()
                    out[k].index_add_(0, d[s : s + 4096], (f != 0).float())
    return {k: v.numpy() for k, v in out.items()}
