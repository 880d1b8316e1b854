"""TERM vs ERM GSAEs (the paper's section 3.2.1, appendices N and Q): two GSAEs of one width
pretrained from scratch on the same cached activations, one with the average loss (ERM, tilt 0),
one with the tilted loss (TERM, the largest of `sweep.tilts`), held at one L0 by the adaptive λ of
appendix E (`train.l0_band` around `sweep.match_l0`), then compared on held-out text:

- reconstruction error per token: mean, p50, p99, max (Figure 22) and by token frequency (Fig. 3);
- detection: the share of tokens on which some latent is above a threshold, for a grid of
  thresholds (Figure 23);
- spliced CE, L0, the logit-lens coverage of the test tokens (the share whose type some latent's
  top-k logit lens names), overall and over the rarer half of the types (the tail), and the
  decoder geometry of appendix N (cosines, PCA components);
- auto-interpretation of both GSAEs' features (`autointerp.enabled`; the diversity score of Box 9).

Every statistic comes with a percentile-bootstrap CI over the test documents, and the paired
TERM - ERM difference with its own CI. `run_term(cfg)` writes `report.md`, `term_vs_erm.csv`,
`metrics.json` and the figures into `<workdir>/term/<key>/`.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from ssae_ray.config import Config
from ssae_ray.stages import run_stage, stage_key, write_json_atomic

log = logging.getLogger("ssae_ray")

THRESHOLDS = (0.0, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
"""Activation thresholds of the detection curve (Figure 23), in the units of the SAE's latents."""


class TermError(ValueError):
    """A TERM-vs-ERM config that cannot run (no tilt, no test split...)."""


def arms(cfg: Config) -> dict[str, float]:
    """{"ERM": 0, "TERM": the largest tilt of `sweep.tilts`}."""
    tilts = [t for t in cfg.sweep.tilts if t > 0]
    if not tilts:
        raise TermError(
            f"sweep.tilts={list(cfg.sweep.tilts)} has no tilt > 0 for the TERM GSAE (the paper: 1e9)"
        )
    return {"ERM": 0.0, "TERM": float(max(tilts))}


# ---------------------------------------------------------------------------------------------
# Training


def train_gsaes(cfg: Config, lm: Any, texts: list[str], progress: bool = True) -> dict[str, Path]:
    """The ERM and TERM GSAEs at `sae.hooks[0]`, trained on one activation cache of at most
    `train.pretrain_tokens` tokens of `texts`: `pretrain_steps` steps of `batch_tokens`, lr
    `pretrain_lr` (linear decay over the last fifth), λ from `pretrain_lam` (adapted into
    `train.l0_band` when set). Each is a cached stage; returns {arm: folder with the sae-lens SAE}."""
    from ssae_ray.saes import make_random_sae, save_sae
    from ssae_ray.training.cache import cache_activations, iter_cache_batches, open_cache
    from ssae_ray.training.loop import make_trainers, run_steps, with_train

    hook = cfg.sae.hooks[0]
    t = cfg.train
    cache = cache_activations(cfg, lm, texts, [hook], max_tokens=t.pretrain_tokens, progress=progress)
    d_in = open_cache(cache).d[hook]
    out = {}
    for arm, tilt in arms(cfg).items():
        tc = with_train(t, lr=t.pretrain_lr, lam=t.pretrain_lam, steps=t.pretrain_steps,
                        decay_steps=max(t.pretrain_steps // 5, 1), tilt=tilt)  # fmt: skip
        key = stage_key("term-gsae-v1", arm, str(cache), tc, cfg.sae.d_sae, hook, cfg.seed)

        def build(tmp: Path, tc: Any = tc, arm: str = arm) -> dict[str, Any]:
            # Both arms start from the same random GSAE: the loss is the only difference.
            sae = make_random_sae(d_in, cfg.sae.d_sae, hook, seed=cfg.seed + 1000 * tc.seed)
            sae.cfg.metadata.model_name = cfg.model.source
            first = next(iter_cache_batches(cache, [hook], tc.batch_tokens, seed=tc.seed))
            trainers = make_trainers(tc, {hook: sae}, first, str(lm.device))
            batches = iter_cache_batches(cache, [hook], tc.batch_tokens, seed=tc.seed)
            history = run_steps(trainers, batches, 0, tc.steps, progress=progress, desc=f"{arm} GSAE")
            save_sae(trainers[hook].export().to("cpu"), tmp / "sae")
            (tmp / "history.json").write_text(json.dumps(history))
            last = history[-1] if history else {}
            return {"arm": arm, "tilt": tc.tilt, "steps": len(history), "activations": str(cache),
                    "final": {k: last.get(f"{hook}/{k}") for k in ("l0", "fvu", "dead", "mse", "lam")}}  # fmt: skip

        out[arm] = run_stage(cfg.root, "term_gsae", key, build) / "sae"
    return out


# ---------------------------------------------------------------------------------------------
# Per-token measurements and bootstrap CIs


class Tokens(NamedTuple):
    """Per evaluated token (position 0 and padding dropped) of one GSAE on the test set."""

    sse: np.ndarray
    l0: np.ndarray
    max_act: np.ndarray
    ce: np.ndarray
    """Spliced CE of predicting the next token from this position (NaN where there is no target)."""
    doc: np.ndarray
    token: np.ndarray


@torch.no_grad()
def measure(lm: Any, sae: Any, hook: str, test: Any, batch_size: int) -> tuple[Tokens, Any]:
    from ssae_ray.eval.evaluate import evaluate_sae, iter_captured, token_positions

    ev = evaluate_sae(lm, sae, hook, test, batch_size)
    pos = token_positions(test)
    l0 = []  # per scored token, in the order of `pos` (test sets stream: activations a batch at a time)
    for c in iter_captured(lm, test, [hook], batch_size):
        x = c.acts[hook][c.pos.to(c.acts[hook].device)]
        for s in range(0, x.shape[0], 4096):
            f = sae.encode(x[s : s + 4096].to(sae.W_dec.device, sae.W_dec.dtype)).float().cpu()
            l0.append((f > 0).sum(-1))
    # The CE of position i is the loss of predicting token i+1 from it: loss[:, i] for i < T-1.
    ce_full = torch.full(pos.shape, float("nan"))
    ce_full[:, :-1] = torch.where(test.mask, ev.loss, torch.tensor(float("nan")))
    doc = test.tokens.doc_index[:, None].expand_as(pos)[pos]
    return Tokens(ev.sse.numpy(), torch.cat(l0).numpy().astype(np.float64), ev.max_act.numpy(),
                  ce_full[pos].numpy(), doc.numpy(), ev.token_ids.numpy()), ev  # fmt: skip


def _groups(doc: np.ndarray) -> list[np.ndarray]:
    order = np.argsort(doc, kind="stable")
    cuts = np.flatnonzero(np.diff(doc[order])) + 1
    return np.split(order, cuts)


def bootstrap(
    stat: Callable[[np.ndarray], float], doc: np.ndarray, n_boot: int, level: float, seed: int
) -> tuple[float, float, float]:
    """`stat(token indices)` on all tokens, and its percentile-bootstrap CI resampling documents."""
    groups = _groups(doc)
    value = float(stat(np.arange(len(doc))))
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(n_boot):
        pick = rng.integers(0, len(groups), len(groups))
        vals.append(stat(np.concatenate([groups[i] for i in pick])))
    a = (1 - level) / 2
    lo, hi = np.nanquantile(np.array(vals, dtype=np.float64), [a, 1 - a])
    return value, float(lo), float(hi)


def _stats(tail_types: np.ndarray, covered: dict[str, np.ndarray]) -> dict[str, Callable]:
    """Statistic name -> fn(tokens of one arm, token indices)."""

    def cov(arm: str, tail: bool) -> Callable:
        # Token-weighted: the share of the (tail) tokens whose type some latent's logit lens names.
        # A mean over tokens, so a document bootstrap brackets it (a share of distinct types would
        # grow in resamples, which hold fewer types).
        def fn(t: Tokens, idx: np.ndarray) -> float:
            tok = t.token[idx]
            if tail:
                tok = tok[np.isin(tok, tail_types)]
            return float(covered[arm][tok].mean()) if len(tok) else float("nan")

        return fn

    return {
        "error_mean": lambda t, i, a: float(t.sse[i].mean()),
        "error_p50": lambda t, i, a: float(np.quantile(t.sse[i], 0.5)),
        "error_p99": lambda t, i, a: float(np.quantile(t.sse[i], 0.99)),
        "error_max": lambda t, i, a: float(t.sse[i].max()),
        "l0": lambda t, i, a: float(t.l0[i].mean()),
        "ce": lambda t, i, a: float(np.nanmean(t.ce[i])),
        "coverage": lambda t, i, a: cov(a, False)(t, i),
        "tail_coverage": lambda t, i, a: cov(a, True)(t, i),
    }


def compare(
    toks: dict[str, Tokens], covered: dict[str, np.ndarray], n_boot: int, level: float, seed: int
) -> list[dict[str, Any]]:
    """One row per statistic: ERM and TERM with CIs, and TERM - ERM with a paired CI (the same
    resampled documents for both arms)."""
    erm, term = toks["ERM"], toks["TERM"]
    counts = np.bincount(erm.token)
    types = np.flatnonzero(counts)
    order = types[np.argsort(-counts[types], kind="stable")]
    tail = order[len(order) // 2 :]  # the rarer half of the test set's token types
    rows = []
    for name, fn in _stats(tail, covered).items():
        row: dict[str, Any] = {"stat": name}
        for arm, t in toks.items():
            v, lo, hi = bootstrap(lambda i, t=t, arm=arm, fn=fn: fn(t, i, arm), t.doc, n_boot, level, seed)
            row |= {arm: v, f"{arm}_lo": lo, f"{arm}_hi": hi}
        v, lo, hi = bootstrap(
            lambda i, fn=fn: fn(term, i, "TERM") - fn(erm, i, "ERM"), erm.doc, n_boot, level, seed
        )
        rows.append(row | {"diff": v, "diff_lo": lo, "diff_hi": hi})
    return rows


def detection(toks: dict[str, Tokens], thresholds: tuple[float, ...] = THRESHOLDS) -> dict[str, list[float]]:
    """Figure 23: share of tokens with some latent above each threshold."""
    return {arm: [float((t.max_act > th).mean()) for th in thresholds] for arm, t in toks.items()}


# ---------------------------------------------------------------------------------------------
# The job


def term_texts(cfg: Config, corpus_dir: Path, split: str) -> tuple[list[str], list[str]]:
    """Training texts (the corpus split, in a seeded order) and the held-out evaluation texts."""
    from ssae_ray.data import load_split

    train = [t for t in load_split(corpus_dir, "corpus").column("text").to_pylist() if t]
    random.Random(cfg.seed).shuffle(train)
    test = [t for t in load_split(corpus_dir, split).column("text").to_pylist() if t]
    if not test:
        raise TermError(f"the corpus has no {split!r} documents to compare the GSAEs on ({corpus_dir})")
    return train, test


def run_term(cfg: Config, eval_split: str | None = None, progress: bool = True) -> Path:
    """Train the ERM and TERM GSAEs, compare them, write the report; returns `report.md`."""
    from ssae_ray.data import build_corpus
    from ssae_ray.eval import plots
    from ssae_ray.eval.evaluate import prepare_test_set
    from ssae_ray.eval.features import decoder_cosines, error_by_frequency, pca_components
    from ssae_ray.eval.logit_lens import feature_top_tokens, lm_unembed
    from ssae_ray.models import load_lm, validate_hooks
    from ssae_ray.saes import load_sae

    arms(cfg)
    hook = cfg.sae.hooks[0]
    split = eval_split or ("general_test" if cfg.corpus.kind == "local" else "test")
    from ssae_ray.data.corpus import preflight

    preflight(cfg)  # the dataset opens before the LM is downloaded
    from ssae_ray.pipeline import offload

    if offload(cfg):  # a CPU head driving a GPU cluster: the whole experiment runs on one GPU worker
        from ssae_ray.resources import on_gpu_worker

        return on_gpu_worker(run_term, cfg, eval_split, progress, name="term")
    lm = load_lm(cfg.model, cfg.root / "models")
    validate_hooks(lm, [hook])
    corpus_dir = build_corpus(cfg, lm.tokenizer)
    train, test_texts = term_texts(cfg, corpus_dir, split)
    folders = train_gsaes(cfg, lm, train, progress)
    saes = {arm: load_sae(f, str(lm.device)) for arm, f in folders.items()}
    histories = {arm: json.loads((f.parent / "history.json").read_text()) for arm, f in folders.items()}
    key = stage_key("term-eval-v2", {a: str(f) for a, f in folders.items()}, str(corpus_dir), split,
                    cfg.eval, cfg.model.context_len, cfg.autointerp if cfg.autointerp.enabled else None)  # fmt: skip

    def build(out: Path) -> dict[str, Any]:
        ec = cfg.eval
        test = prepare_test_set(lm, split, test_texts, [hook], cfg.model.context_len, ec.tokens_for(split),
                                ec.batch_size)  # fmt: skip
        toks, evals = {}, {}
        for arm, sae in saes.items():
            toks[arm], evals[arm] = measure(lm, sae, hook, test, ec.batch_size)
        w_u, norm = lm_unembed(lm)
        covered = {}
        for arm, sae in saes.items():
            top = feature_top_tokens(sae.W_dec, w_u, norm, cfg.eval.logit_lens_topk)
            covered[arm] = np.zeros(w_u.shape[0], dtype=bool)
            covered[arm][top.reshape(-1).numpy()] = True
        rows = compare(toks, covered, ec.bootstrap, ec.ci_level, cfg.seed)
        det = detection(toks)
        geometry = {arm: {"pca_components_90": pca_components(s.W_dec)[0],
                          "decoder_cos_mean": float(_mean_offdiag_cos(s.W_dec))} for arm, s in saes.items()}  # fmt: skip
        plots.histograms({a: t.sse for a, t in toks.items()}, out / "fig22_error_distribution.png",
                         f"reconstruction error per token ({split}, {hook})", "squared error", logy=True)  # fmt: skip
        plots.lines({a: (np.array(THRESHOLDS[1:]), np.array(v[1:])) for a, v in det.items()},
                    out / "fig23_detection.png", "tokens detected vs activation threshold", "threshold",
                    "share of tokens with a latent above it", logx=True)  # fmt: skip
        byf = {a: error_by_frequency(torch.from_numpy(t.token), torch.from_numpy(t.sse), ec.freq_buckets)
               for a, t in toks.items()}  # fmt: skip
        plots.lines({a: (np.arange(len(b.bucket_mean)), b.bucket_mean) for a, b in byf.items()}, out / "fig3_error_by_frequency.png",
                    "reconstruction error by token frequency bucket (0 = most frequent)", "bucket", "mean error")  # fmt: skip
        cos = {a: decoder_cosines(s.W_dec) for a, s in saes.items()}
        plots.density_lines(cos, out / "fig20_decoder_cosines.png", "decoder cosine similarities", "cosine")
        _write_csv(out / "term_vs_erm.csv", rows)
        ai_dir = None
        if cfg.autointerp.enabled:
            from ssae_ray.autointerp import run_autointerp

            ai_dir = run_autointerp(cfg, lm, saes, hook, test_texts, out / "autointerp")
        meta = {"hook": hook, "split": split, "arms": arms(cfg), "d_sae": cfg.sae.d_sae, "n_docs": test.n_docs,
                "n_tokens": int(len(toks["ERM"].sse)), "train_tokens": cfg.train.pretrain_tokens,
                "steps": {a: len(h) for a, h in histories.items()},
                "final_train": {a: {k: (h[-1].get(f"{hook}/{k}") if h else None) for k in ("l0", "lam", "fvu")}
                                for a, h in histories.items()},
                "ce_clean": evals["ERM"].ce_clean, "detection": {"thresholds": list(THRESHOLDS), **det},
                "geometry": geometry, "error_by_frequency": {a: b.bucket_mean.tolist() for a, b in byf.items()},
                "error_p99_by_frequency": {a: b.bucket_p99.tolist() for a, b in byf.items()},
                "rows": rows, "bootstrap": ec.bootstrap, "ci_level": ec.ci_level,
                "autointerp": ai_dir.name if ai_dir else None}  # fmt: skip
        write_json_atomic(out / "metrics.json", meta)
        (out / "report.md").write_text(report_markdown(cfg, meta))
        return {"hook": hook, "split": split, "rows": rows}

    folder = run_stage(cfg.root, "term", key, build)
    print((folder / "report.md").read_text())
    return folder / "report.md"


def _mean_offdiag_cos(w: torch.Tensor) -> float:
    d = torch.nn.functional.normalize(w.detach().float(), dim=-1)
    c = d @ d.T
    n = c.shape[0]
    return float((c.sum() - c.diagonal().sum()) / max(n * (n - 1), 1))


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    import csv

    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def _fmt(v: float) -> str:
    return "nan" if v != v else (f"{v:.4g}" if abs(v) < 1e4 else f"{v:.3e}")


def report_markdown(cfg: Config, m: dict[str, Any]) -> str:
    lvl = int(round(100 * m["ci_level"]))
    lines = [
        f"# TERM vs ERM GSAEs ({cfg.name})",
        "",
        f"{cfg.model.source}, `{m['hook']}`, width {m['d_sae']}; ERM (tilt 0) vs TERM (tilt {m['arms']['TERM']:g}, "
        f"{cfg.train.tilt_mode}), trained on the same {m['train_tokens']} cached tokens, "
        f"{m['steps']['ERM']} / {m['steps']['TERM']} steps. Scored on {m['n_tokens']} tokens of {m['n_docs']} "
        f"`{m['split']}` documents; [{lvl}% CI] by bootstrap over documents ({m['bootstrap']} resamples), "
        "the difference paired.",
        "",
        f"Training end: ERM L0 {_fmt(m['final_train']['ERM']['l0'] or float('nan'))} (λ {_fmt(m['final_train']['ERM']['lam'] or float('nan'))}), "
        f"TERM L0 {_fmt(m['final_train']['TERM']['l0'] or float('nan'))} (λ {_fmt(m['final_train']['TERM']['lam'] or float('nan'))}); "
        f"clean CE {m['ce_clean']:.4f}.",
        "",
        "| statistic | ERM | TERM | TERM - ERM |",
        "| --- | --- | --- | --- |",
    ]
    for r in m["rows"]:
        lines.append(
            f"| {r['stat']} | {_fmt(r['ERM'])} [{_fmt(r['ERM_lo'])}, {_fmt(r['ERM_hi'])}] | "
            f"{_fmt(r['TERM'])} [{_fmt(r['TERM_lo'])}, {_fmt(r['TERM_hi'])}] | "
            f"{_fmt(r['diff'])} [{_fmt(r['diff_lo'])}, {_fmt(r['diff_hi'])}] |"
        )
    det = m["detection"]
    lines += ["", "Detection (Figure 23): share of tokens with a latent above the threshold", "",
              "| threshold | " + " | ".join(f"{t:g}" for t in det["thresholds"]) + " |",
              "| --- |" + " --- |" * len(det["thresholds"])]  # fmt: skip
    for arm in ("ERM", "TERM"):
        lines.append(f"| {arm} | " + " | ".join(f"{v:.3f}" for v in det[arm]) + " |")
    g = m["geometry"]
    lines += ["", f"Decoder geometry (appendix N): PCA components for 90% variance ERM {g['ERM']['pca_components_90']}, "
              f"TERM {g['TERM']['pca_components_90']}; mean decoder cosine ERM {g['ERM']['decoder_cos_mean']:.3f}, "
              f"TERM {g['TERM']['decoder_cos_mean']:.3f}.", "",
              "error_* = squared reconstruction error per token; coverage = share of the test tokens whose type is in "
              "some latent's top-k logit lens; tail_coverage = the same over tokens of the rarer half of the types; "
              "ce = spliced next-token CE.", "",
              "Figures: fig22_error_distribution.png, fig23_detection.png, fig3_error_by_frequency.png, "
              "fig20_decoder_cosines.png." + (f" Auto-interp: {m['autointerp']}/report.md." if m["autointerp"] else "")]  # fmt: skip
    return "\n".join(lines) + "\n"
