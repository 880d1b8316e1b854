"""SHIFT checked against the planted answer (`shift.dataset=planted`).

- **Cue features**: per SAE feature, its mean-pooled activation (the pooling the probe reads) on the
  balanced dev documents with a broadcast source line, with a press line and with none (the same
  documents each time). A feature *carries the cue* when Cohen's d (pooled SD) of broadcast vs
  press is at least `d_min` in size (either sign: the cue is two-sided, like gender) and its mean
  moves by at least `min_rise`; that set is the ground truth. Features that respond to a source
  line of either kind vs none (d >= `d_min`) are reported too: they read "a source line", not which.
- **Selection**: the features a SHIFT skyline ablates (its top k) against that set: precision (the
  share of the selection that responds), recall (the share of responsive features selected) and
  the share of the selection's total cue response (sum of d) it covers.
- **Cue dependence**: every Table 1 classifier also reads the balanced test bios with the cue
  flipped; the share of predictions that change is its dependence on the cue, and each row's
  dependence removed is 1 - its flip rate / the Original's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ssae_ray.models import LM, TokenBatch
from ssae_ray.shift.probe import forward_to, pool, tokenize_bios
from ssae_ray.shift.shift import Row, ShiftResult, accuracy_draws, bootstrap_draws, quantile_ci

Node = tuple[str, int]


@torch.no_grad()
def pooled_features(lm: LM, batch: TokenBatch, saes: dict[str, nn.Module], layer: int, batch_size: int = 16,
                    skip_first: bool = True) -> dict[str, Tensor]:  # fmt: skip
    """Per hook, [N, d_sae] feature activations mean-pooled over each bio's tokens."""
    return pooled_features_sets(lm, batch, {"": saes}, layer, batch_size, skip_first)[""]


@torch.no_grad()
def pooled_features_sets(lm: LM, batch: TokenBatch, sae_sets: dict[str, dict[str, nn.Module]], layer: int,
                         batch_size: int = 16, skip_first: bool = True) -> dict[str, dict[str, Tensor]]:  # fmt: skip
    """`pooled_features` for several SAE sets from one LM pass (sets share hooks)."""
    hooks = sorted({h for saes in sae_sets.values() for h in saes})
    out: dict[str, dict[str, list[Tensor]]] = {n: {h: [] for h in saes} for n, saes in sae_sets.items()}
    for s in range(0, batch.input_ids.shape[0], batch_size):
        mask = batch.attention_mask[s : s + batch_size]
        width = int(mask.sum(1).max())
        ids, mask = batch.input_ids[s : s + batch_size, :width], mask[:, :width]
        acts: dict[str, Tensor] = {}

        def keep(name: str, act: Tensor, acts: dict[str, Tensor] = acts) -> None:
            acts[name] = act

        forward_to(lm, ids, mask, layer, {h: (lambda x: x) for h in hooks}, on_act=keep)
        for n, saes in sae_sets.items():
            for h, sae in saes.items():
                f = sae.encode(acts[h].to(sae.W_dec.dtype))
                out[n][h].append(pool(f, mask, skip_first).cpu())
    return {n: {h: torch.cat(v) for h, v in d.items()} for n, d in out.items()}


def cue_effects(with_cue: dict[str, Tensor], without: dict[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """Per hook: mean pooled activation with / without the cue, their difference and Cohen's d."""
    out = {}
    for h, a in with_cue.items():
        b = without[h]
        ma, mb = a.mean(0), b.mean(0)
        sd = ((a.var(0, unbiased=True) + b.var(0, unbiased=True)) / 2).sqrt()
        d = (ma - mb) / sd.clamp_min(1e-8)
        d[(sd <= 1e-8) & ((ma - mb).abs() <= 1e-8)] = 0.0
        out[h] = {"with": ma, "without": mb, "rise": ma - mb, "d": d}
    return out


def responsive(
    effects: dict[str, dict[str, Tensor]], d_min: float = 1.0, min_rise: float = 1e-3, two_sided: bool = False
) -> set[Node]:
    """Features whose d is >= d_min and mean rises >= min_rise (`two_sided`: |d|, |rise|)."""
    out: set[Node] = set()
    for h, e in effects.items():
        d, rise = (e["d"].abs(), e["rise"].abs()) if two_sided else (e["d"], e["rise"])
        out |= {(h, int(i)) for i in torch.nonzero((d >= d_min) & (rise >= min_rise)).flatten()}
    return out


def selection_scores(
    selected: Sequence[Node], truth: set[Node], effects: dict[str, dict[str, Tensor]]
) -> dict[str, Any]:
    sel = list(dict.fromkeys(selected))
    hit = [n for n in sel if n in truth]
    d_all = sum(abs(float(effects[h]["d"][i])) for h, i in truth) if truth else 0.0
    d_sel = sum(abs(float(effects[h]["d"][i])) for h, i in hit)
    return {
        "selected": len(sel),
        "responsive": len(truth),
        "hits": len(hit),
        "precision": len(hit) / len(sel) if sel else float("nan"),
        "recall": len(hit) / len(truth) if truth else float("nan"),
        "d_coverage": d_sel / d_all if d_all > 0 else float("nan"),
        "top_selected_d": [
            {"node": f"{h}/{i}", "d": round(float(effects[h]["d"][i]), 3), "rise": round(float(effects[h]["rise"][i]), 5)}
            for h, i in sel[:10]
        ],
    }  # fmt: skip


def cue_dependence(rows: Sequence[Row], flipped_profession: Sequence[int], flipped_gender: Sequence[int],
                   n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> list[dict[str, Any]]:  # fmt: skip
    """Per row: accuracy on the cue-flipped test set, the share of predictions the flip changes (with
    a bootstrap CI over test documents) and the dependence removed relative to the Original."""
    base = next((r for r in rows if r.method == "Original"), None)
    out = []
    n = len(flipped_profession)
    draws = bootstrap_draws(n, n_boot, seed + 1)
    base_rate = None
    if base is not None and base.flip_pred is not None:
        base_rate = float((torch.tensor(base.pred) != torch.tensor(base.flip_pred)).float().mean())
    for r in rows:
        if r.pred is None or r.flip_pred is None:
            continue
        p, q = torch.tensor(r.pred), torch.tensor(r.flip_pred)
        changed = (p != q).float()
        acc = accuracy_draws(r.flip_pred, flipped_profession, flipped_gender, draws)
        rate = float(changed.mean())
        out.append({
            "method": r.method,
            "flip_rate": rate,
            "flip_rate_ci": quantile_ci(changed[draws].mean(1), level),
            "flipped_profession": float((q == torch.tensor(flipped_profession)).float().mean()),
            "flipped_profession_ci": quantile_ci(acc["profession"], level),
            "flipped_worst": float(accuracy_draws(r.flip_pred, flipped_profession, flipped_gender,
                                                  torch.arange(n)[None])["worst"][0]),
            "dependence_removed": (1 - rate / base_rate) if base_rate else float("nan"),
        })  # fmt: skip
    return out


def paired_difference(a: Row, b: Row, profession: Sequence[int], gender: Sequence[int], n_boot: int = 1000,
                      level: float = 0.95, seed: int = 0) -> dict[str, dict[str, float]]:  # fmt: skip
    """b - a for profession / gender / worst accuracy with a paired bootstrap CI (same resamples)."""
    draws = bootstrap_draws(len(profession), n_boot, seed)
    da = accuracy_draws(a.pred, profession, gender, draws)
    db = accuracy_draws(b.pred, profession, gender, draws)
    full = torch.arange(len(profession))[None]
    fa = accuracy_draws(a.pred, profession, gender, full)
    fb = accuracy_draws(b.pred, profession, gender, full)
    out = {}
    for k in ("profession", "gender", "worst"):
        lo, hi = quantile_ci(db[k] - da[k], level)
        out[k] = {"diff": float(fb[k][0] - fa[k][0]), "lo": lo, "hi": hi}
    return out


def ground_truth(cfg: Any, lm: LM, data: Any, sae_sets: dict[str, dict[str, nn.Module]], result: ShiftResult,
                 d_min: float = 1.0) -> dict[str, Any]:  # fmt: skip
    """Everything above for a finished SHIFT run on a planted dataset."""
    if not data.flipped:
        raise ValueError("ground truth needs a planted dataset (shift.dataset=planted or planted_synthetic)")
    sc = cfg.shift
    T = sc.context_len or cfg.model.context_len
    dev, dev_flip, plain = data.balanced["dev"], data.flipped["dev"], data.flipped["dev_plain"]
    pairs = list(zip(dev.text, dev_flip.text, dev.gender, strict=True))
    texts = {"broadcast": [t if g else f for t, f, g in pairs], "press": [f if g else t for t, f, g in pairs],
             "plain": list(plain.text)}  # fmt: skip
    feats = {k: pooled_features_sets(lm, tokenize_bios(lm.tokenizer, v, T, cfg.model.prepend_bos), sae_sets,
                                     result.layer, sc.batch_size, sc.pool_skip_first) for k, v in texts.items()}  # fmt: skip
    out: dict[str, Any] = {"d_min": d_min, "n_dev_docs": len(pairs), "sets": {}}
    for name in sae_sets:
        eff = cue_effects(feats["broadcast"][name], feats["press"][name])
        truth = responsive(eff, d_min, two_sided=True)
        line = responsive(cue_effects(feats["broadcast"][name], feats["plain"][name]), d_min) | responsive(
            cue_effects(feats["press"][name], feats["plain"][name]), d_min
        )
        selected = (result.selected or {}).get(f"{name} SHIFT", [])
        ranked = result.circuits.get(name, {}).get("gender_ranked", [])
        top = max((float(e["d"].abs().max()) for e in eff.values()), default=0.0)
        vs_line = selection_scores(selected, line, eff)
        out["sets"][name] = {
            **selection_scores(selected, truth, eff),
            "max_abs_d": round(top, 3),
            "rank1_carries_cue": bool(ranked) and (ranked[0][0], ranked[0][1]) in truth,
            "source_line_features": len(line),
            "precision_vs_source_line": vs_line["precision"],
            "recall_vs_source_line": vs_line["recall"],
        }
    test, flip = data.balanced["test"], data.flipped["test"]
    out["cue_dependence"] = cue_dependence(result.rows, flip.profession, flip.gender, cfg.eval.bootstrap,
                                           cfg.eval.ci_level, cfg.seed)  # fmt: skip
    by = {r.method: r for r in result.rows}
    for a, b in (("GSAE SHIFT", "SSAE SHIFT"), ("GSAE SHIFT+retrain", "SSAE SHIFT+retrain")):
        if a in by and b in by and by[a].pred is not None and by[b].pred is not None:
            out.setdefault("ssae_minus_gsae", {})[b.replace("SSAE ", "")] = paired_difference(
                by[a], by[b], test.profession, test.gender, cfg.eval.bootstrap, cfg.eval.ci_level, cfg.seed
            )
    return out


def to_markdown(gt: dict[str, Any]) -> str:
    lines = [f"Cue features: |Cohen's d| >= {gt['d_min']}, broadcast vs press source line, on the same "
             f"{gt['n_dev_docs']} dev documents; 'line' features: d >= {gt['d_min']} for a line of either kind vs "
             "none.", "", "| SAE set | selected | cue features | hits | precision | recall | abs d coverage | "
             "rank-1 carries cue | max abs d | line features | precision / recall vs line |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for name, s in gt["sets"].items():
        lines.append(f"| {name} | {s['selected']} | {s['responsive']} | {s['hits']} | {s['precision']:.2f} | "
                     f"{s['recall']:.2f} | {s['d_coverage']:.2f} | {s['rank1_carries_cue']} | {s['max_abs_d']} | "
                     f"{s['source_line_features']} | {s['precision_vs_source_line']:.2f} / "
                     f"{s['recall_vs_source_line']:.2f} |")  # fmt: skip
    lines += ["", "| Method | cue-flip changes (%) | acc. on cue-flipped test (%) | worst, flipped (%) | "
              "dependence removed |", "| --- | --- | --- | --- | --- |"]  # fmt: skip
    for r in gt["cue_dependence"]:
        lo, hi = r["flip_rate_ci"]
        plo, phi = r["flipped_profession_ci"]
        lines.append(f"| {r['method']} | {100 * r['flip_rate']:.1f} [{100 * lo:.1f}, {100 * hi:.1f}] | "
                     f"{100 * r['flipped_profession']:.1f} [{100 * plo:.1f}, {100 * phi:.1f}] | "
                     f"{100 * r['flipped_worst']:.1f} | {r['dependence_removed']:.2f} |")  # fmt: skip
    for k, v in gt.get("ssae_minus_gsae", {}).items():
        lines.append("")
        lines.append(f"SSAE - GSAE ({k}), paired bootstrap: " + ", ".join(
            f"{c} {100 * d['diff']:+.1f} [{100 * d['lo']:+.1f}, {100 * d['hi']:+.1f}] pts" for c, d in v.items()))  # fmt: skip
    return "\n".join(lines) + "\n"
