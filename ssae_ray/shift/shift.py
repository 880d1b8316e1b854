"""SHIFT (Marks et al., 2024) as run in the paper's Table 1, and its baselines.

Given the Original classifier (probe on the ambiguous set) and SAEs for the LM's hooks:
1. circuit: nodes with |IE| > T_N on m = -log C(y|x) over the ambiguous training bios;
2. feature skyline: rank the circuit's features by their IE on the classifier's *gender* accuracy
   on the balanced training bios, zero-ablate the top k (k in `skyline_grid` <= max_features) and
   keep the k with the best profession accuracy on the balanced dev set;
3. optionally retrain the probe alone on the ablated ambiguous training bios.
Baselines: the neuron skyline (the same with mean-ablated hook dimensions), concept-bottleneck
probing (appendix G.2), and the Oracle probe trained on the balanced set.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from ssae_ray.config import Config
from ssae_ray.models import LM, TokenBatch, parse_hook
from ssae_ray.shift.attribution import attribute, find_circuit, hook_means, position_mask
from ssae_ray.shift.data import Bios, BiosData
from ssae_ray.shift.probe import (
    Accuracies,
    Prefix,
    Splice,
    forward_to,
    group_accuracies,
    make_prefix,
    pool,
    pooled_reps,
    predict,
    probe_layer,
    tokenize_bios,
    train_probe,
)  # fmt: skip

log = logging.getLogger("ssae_ray")

Node = tuple[str, int]
"""(hook, index) of an SAE feature or a neuron."""


class Row(NamedTuple):
    """One line of Table 1 (balanced test set)."""

    method: str
    acc: Accuracies
    n_ablated: int | None
    """Features / neurons ablated (the skyline's choice on dev), None for probes."""
    pred: tuple[int, ...] | None = None
    """Predicted class of every balanced test bio (for bootstrap CIs over test documents)."""
    ci: dict[str, tuple[float, float]] | None = None
    """Bootstrap CI (`eval.ci_level`) of profession / gender / worst over test documents."""
    flip_pred: tuple[int, ...] | None = None
    """Planted datasets: the predictions on the same test bios with the cue flipped."""


class Skyline(NamedTuple):
    k: int
    """Chosen number of nodes to ablate."""
    ranked: list[Node]
    curve: list[dict[str, float]]
    """Per k tried: balanced-dev profession / gender / worst accuracy."""


class ShiftResult(NamedTuple):
    rows: list[Row]
    curves: dict[str, list[dict[str, float]]]
    circuits: dict[str, dict[str, Any]]
    seconds: dict[str, float]
    """Wall time per stage."""
    layer: int
    selected: dict[str, list[Node]] | None = None
    """Per skyline (`Neuron skyline`, `<set> SHIFT`): the nodes it ablates (the top k)."""


# ---------------------------------------------------------------------------------------------
# Ablations as splices (pure tensor functions; position 0 is never touched)


def ablate_features(x: Tensor, sae: nn.Module, idx: Sequence[int]) -> Tensor:
    """Zero-ablate SAE features with the error term kept: decode(f with idx zeroed) + eps,
    i.e. x - sum_i f_i(x) W_dec[i]."""
    if not idx:
        return x
    i = torch.as_tensor(list(idx), device=x.device)
    xs = x.to(sae.W_dec.dtype)
    f = sae.encode(xs)[..., i]
    return (xs - f @ sae.W_dec[i]).to(x.dtype)


def feature_ablation(saes: dict[str, nn.Module], nodes: Sequence[Node]) -> Splice:
    """A splice that zero-ablates `nodes` (SAE features) at positions >= 1."""
    by_hook: dict[str, list[int]] = {}
    for h, i in nodes:
        by_hook.setdefault(h, []).append(i)

    def make(h: str, idx: list[int]) -> Callable[[Tensor], Tensor]:
        def fn(x: Tensor) -> Tensor:
            out = ablate_features(x, saes[h], idx)
            out[:, 0] = x[:, 0]
            return out

        return fn

    return {h: make(h, idx) for h, idx in by_hook.items()}


def neuron_ablation(means: dict[str, Tensor], nodes: Sequence[Node]) -> Splice:
    """A splice that sets hook dimensions `nodes` to their mean activation at positions >= 1."""
    by_hook: dict[str, list[int]] = {}
    for h, i in nodes:
        by_hook.setdefault(h, []).append(i)

    def make(h: str, idx: list[int]) -> Callable[[Tensor], Tensor]:
        def fn(x: Tensor) -> Tensor:
            out = x.clone()
            i = torch.as_tensor(idx, device=x.device)
            out[:, 1:, i] = means[h].to(x.device, x.dtype)[i]
            return out

        return fn

    return {h: make(h, idx) for h, idx in by_hook.items()}


def rank_nodes(scores: dict[str, Tensor], allowed: set[Node] | None = None) -> list[Node]:
    """Nodes sorted by IE, largest first (the most positive effect on the gender metric: ablating
    them hurts gender prediction most), restricted to `allowed` when given."""
    flat = [(h, i, float(v)) for h, s in scores.items() for i, v in enumerate(s.tolist())]
    if allowed is not None:
        flat = [t for t in flat if (t[0], t[1]) in allowed]
    flat.sort(key=lambda t: -t[2])
    return [(h, i) for h, i, _ in flat]


def choose_k(
    ranked: Sequence[Node], grid: Sequence[int], max_k: int, evaluate: Callable[[Sequence[Node]], Accuracies]
) -> Skyline:
    """Try k in `grid` (<= max_k, <= len(ranked)); keep the best dev profession accuracy (ties: smaller k)."""
    ks = sorted({min(k, max_k, len(ranked)) for k in grid if k > 0} - {0})
    if not ks:
        raise ValueError("the skyline has nothing to ablate: no ranked nodes or an empty grid")
    curve, best = [], (-1.0, 0)
    for k in ks:
        acc = evaluate(ranked[:k])
        curve.append({"k": k, "profession": acc.profession, "gender": acc.gender, "worst": acc.worst})
        if acc.profession > best[0]:
            best = (acc.profession, k)
    return Skyline(best[1], list(ranked), curve)


# ---------------------------------------------------------------------------------------------
# Concept-bottleneck probing (appendix G.2)


@torch.no_grad()
def concept_vectors(lm: LM, keywords: Sequence[str], layer: int, prefix: str = "Keyword:") -> Tensor:
    """[N, d] layer representations at the final token of each keyword, minus their mean. The
    keyword follows a short prefix so that it is not at position 0 (whose norm is an outlier)."""
    vecs = []
    for kw in keywords:
        b = tokenize_bios(lm.tokenizer, [f"{prefix} {kw}"], 64)
        act = forward_to(lm, b.input_ids, b.attention_mask, layer)
        vecs.append(act[0, int(b.attention_mask[0].sum()) - 1].float().cpu())
    c = torch.stack(vecs)
    return c - c.mean(0, keepdim=True)


def concept_scores(x: Tensor, concepts: Tensor) -> Tensor:
    """[N, n_concepts] cosine similarity of pooled representations with each concept vector."""
    return torch.nn.functional.cosine_similarity(x[:, None, :], concepts[None], dim=-1)


# ---------------------------------------------------------------------------------------------
# Bootstrap CIs over test documents


def bootstrap_draws(n: int, n_boot: int, seed: int = 0) -> Tensor:
    """[n_boot, n] indices of test documents drawn with replacement (shared by every row, so that
    differences between rows are paired)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, n, (n_boot, n), generator=g)


def accuracy_draws(pred: Sequence[int], profession: Sequence[int], gender: Sequence[int],
                   draws: Tensor) -> dict[str, Tensor]:  # fmt: skip
    """Profession, gender and worst-group accuracy on each bootstrap resample, [n_boot] each (a
    resample that misses a group takes the worst over the groups it has)."""
    p, y, g = (torch.as_tensor(v).long()[draws] for v in (pred, profession, gender))
    right = (p == y).float()
    groups = []
    for a in (0, 1):
        for b in (0, 1):
            sel = ((y == a) & (g == b)).float()
            n = sel.sum(1)
            groups.append(torch.where(n > 0, (right * sel).sum(1) / n.clamp_min(1), torch.ones_like(n)))
    return {"profession": right.mean(1), "gender": (p == g).float().mean(1),
            "worst": torch.stack(groups).min(0).values}  # fmt: skip


def quantile_ci(values: Tensor, level: float) -> tuple[float, float]:
    a = (1 - level) / 2
    lo, hi = torch.quantile(values.double(), torch.tensor([a, 1 - a], dtype=torch.float64)).tolist()
    return float(lo), float(hi)


def with_cis(rows: list[Row], bios: Bios, n_boot: int, level: float, seed: int = 0) -> list[Row]:
    """Rows with bootstrap CIs over the test documents (the same resamples for every row)."""
    draws = bootstrap_draws(len(bios.profession), n_boot, seed)
    out = []
    for r in rows:
        if r.pred is None:
            out.append(r)
            continue
        d = accuracy_draws(r.pred, bios.profession, bios.gender, draws)
        out.append(r._replace(ci={k: quantile_ci(v, level) for k, v in d.items()}))
    return out


# ---------------------------------------------------------------------------------------------
# The whole experiment


Set = tuple[TokenBatch, Bios, Prefix | None]


class _Sets(NamedTuple):
    amb_train: Set
    bal_train: Set
    bal_dev: Set
    bal_test: Set


def run_shift(
    cfg: Config,
    lm: LM,
    data: BiosData,
    sae_sets: dict[str, dict[str, nn.Module]],
    progress: Callable[[str], None] | None = None,
) -> ShiftResult:
    """Table 1: Original, CBP, Neuron skyline (+retrain), `<name> SHIFT` (+retrain) for every SAE
    set given (e.g. GSAE, SSAE, Comp. GSAE, Comp. SSAE), Oracle, on the balanced test set, each
    with bootstrap CIs over the test documents; on a planted dataset (`data.flipped`) every row's
    classifier also reads the test set with the cue flipped (`Row.flip_pred`)."""
    sc = cfg.shift
    layer = probe_layer(lm, sc.layer)
    say = progress or (lambda msg: log.info("shift: %s", msg))
    seconds: dict[str, float] = {}
    clock = [time.perf_counter()]

    def lap(name: str) -> None:
        now = time.perf_counter()
        seconds[name] = round(seconds.get(name, 0.0) + now - clock[0], 2)
        clock[0] = now

    T = sc.context_len or cfg.model.context_len
    hooks = sorted({h for saes in sae_sets.values() for h in saes})
    # every forward below splices only at these hooks: run the layers before them once per set
    start = min((parse_hook(h).layer for h in hooks), default=0)
    start = start if start <= layer and not any(parse_hook(h).layer < sc.ig_layers for h in hooks) else 0

    def make_set(bios: Bios) -> Set:
        batch = tokenize_bios(lm.tokenizer, bios.text, T, cfg.model.prepend_bos)
        return batch, bios, make_prefix(lm, batch, start, sc.batch_size)

    say(f"tokenizing and running layers 0..{start - 1} once" if start else "tokenizing")
    sets = _Sets(*(make_set(b) for b in (
        data.ambiguous["train"], data.balanced["train"], data.balanced["dev"], data.balanced["test"])))  # fmt: skip
    flip = make_set(data.flipped["test"]) if data.flipped else None

    def reps(which: Set, splice: Splice | None = None) -> Tensor:
        return pooled_reps(lm, which[0], layer, splice, sc.batch_size, sc.pool_skip_first, which[2])

    def fit(x: Tensor, y: Sequence[int], init: nn.Linear | None = None) -> nn.Linear:
        return train_probe(x, y, sc.probe_lr, sc.probe_epochs, sc.probe_batch_size, cfg.seed, init)

    def acc(probe: nn.Linear, x: Tensor, bios: Bios) -> Accuracies:
        return group_accuracies(predict(probe, x), bios.profession, bios.gender)

    def row(name: str, probe: nn.Linear, x: Tensor, x_flip: Tensor | None, n: int | None = None) -> Row:
        pred = predict(probe, x)
        bios = sets.bal_test[1]
        flip_pred = None if x_flip is None else tuple(predict(probe, x_flip).tolist())
        return Row(name, group_accuracies(pred, bios.profession, bios.gender), n, tuple(pred.tolist()),
                   None, flip_pred)  # fmt: skip

    say(f"clean representations (layer {layer})")
    x_amb, x_bal, x_dev, x_test = (reps(s) for s in sets)
    x_flip = reps(flip) if flip is not None else None
    lap("representations")
    original = fit(x_amb, sets.amb_train[1].profession)
    oracle = fit(x_bal, sets.bal_train[1].profession)
    rows = [row("Original", original, x_test, x_flip)]
    lap("probes")

    say("concept-bottleneck probing")
    concepts = concept_vectors(lm, data.keywords, layer)
    cbp = fit(concept_scores(x_amb, concepts), sets.amb_train[1].profession)
    rows.append(row("CBP", cbp, concept_scores(x_test, concepts),
                    None if x_flip is None else concept_scores(x_flip, concepts)))  # fmt: skip
    lap("cbp")

    def skyline_rows(name: str, ranked: list[Node], make: Callable[[Sequence[Node]], Splice]) -> list[Row]:
        sky = choose_k(ranked, sc.skyline_grid, sc.max_features,
                       lambda nodes: acc(original, reps(sets.bal_dev, make(nodes)), sets.bal_dev[1]))  # fmt: skip
        curves[name] = sky.curve
        selected[name] = list(ranked[: sky.k])
        splice = make(ranked[: sky.k])
        x_test_abl = reps(sets.bal_test, splice)
        x_flip_abl = reps(flip, splice) if flip is not None else None
        retrained = fit(reps(sets.amb_train, splice), sets.amb_train[1].profession, init=original)
        return [
            row(name, original, x_test_abl, x_flip_abl, sky.k),
            row(f"{name}+retrain", retrained, x_test_abl, x_flip_abl, sky.k),
        ]

    curves: dict[str, list[dict[str, float]]] = {}
    selected: dict[str, list[Node]] = {}
    say("neuron skyline")
    means = hook_means(lm, sets.amb_train[0], hooks, sc.batch_size)
    gender_attr = attribute(lm, sets.bal_train[0], original, sets.bal_train[1].gender, layer, means=means,
                            batch_size=sc.batch_size, skip_first=sc.pool_skip_first, prefix=sets.bal_train[2])  # fmt: skip
    rows += skyline_rows(
        "Neuron skyline", rank_nodes(gender_attr.neurons), lambda n: neuron_ablation(means, n)
    )
    lap("neuron_skyline")

    circuits: dict[str, dict[str, Any]] = {}
    shift_rows: dict[str, list[Row]] = {}
    for name, saes in sae_sets.items():
        say(f"{name}: circuit")
        circuit, attr = find_circuit(
            lm, sets.amb_train[0], original, sets.amb_train[1].profession, layer, saes, sc.node_threshold,
            sc.edge_threshold, sc.ig_layers, sc.ig_steps, sc.max_edge_nodes, edge_examples=sc.batch_size,
            batch_size=sc.batch_size, skip_first=sc.pool_skip_first, prefix=sets.amb_train[2],
        )  # fmt: skip
        lap(f"{name}_circuit")
        say(f"{name}: gender attribution and feature skyline")
        g_attr = attribute(lm, sets.bal_train[0], original, sets.bal_train[1].gender, layer, saes,
                           ig_hooks=[], batch_size=sc.batch_size, skip_first=sc.pool_skip_first,
                           prefix=sets.bal_train[2])  # fmt: skip
        allowed = {(h, i) for h, i, _ in circuit.features}
        if not allowed:
            log.warning("shift: the %s circuit has no feature with |IE| > %s; ranking all features", name,
                        sc.node_threshold)  # fmt: skip
        ranked = rank_nodes(g_attr.features, allowed or None)
        shift_rows[name] = skyline_rows(f"{name} SHIFT", ranked, lambda n, s=saes: feature_ablation(s, n))
        circuits[name] = _circuit_summary(circuit, attr, g_attr, ranked, layer)
        lap(f"{name}_skyline")
    for name in sae_sets:
        rows.append(shift_rows[name][0])
    for name in sae_sets:
        rows.append(shift_rows[name][1])
    rows.append(row("Oracle", oracle, x_test, x_flip))
    rows = with_cis(_table1_order(rows), sets.bal_test[1], cfg.eval.bootstrap, cfg.eval.ci_level, cfg.seed)
    return ShiftResult(rows, curves, circuits, seconds, layer, selected)


def _table1_order(rows: list[Row]) -> list[Row]:
    """Table 1's order: Original, CBP, Neuron skyline, (full-width SHIFT, then +retrain), Comp.
    variants likewise, Oracle."""

    def key(r: Row) -> tuple[int, int]:
        m = r.method
        if m == "Original":
            return 0, 0
        if m == "CBP":
            return 1, 0
        if m.startswith("Neuron"):
            return 2, int(m.endswith("retrain"))
        if m == "Oracle":
            return 9, 0
        return (5 if m.startswith("Comp.") else 3), int(m.endswith("retrain"))

    return sorted(rows, key=key)


def _circuit_summary(circuit: Any, attr: Any, g_attr: Any, ranked: list[Node], layer: int) -> dict[str, Any]:
    errs = dict(attr.errors)
    total = {h: float(v.sum()) for h, v in attr.features.items()}
    return {
        "probe_layer": layer,
        "n_features": len(circuit.features),
        "n_errors": len(circuit.errors),
        "n_edges": len(circuit.edges),
        "features": circuit.features[:50],
        "errors": circuit.errors,
        "edges": circuit.edges[:100],
        "error_ie": errs,
        "feature_ie_sum": total,
        "gender_ranked": [(h, i, float(g_attr.features[h][i])) for h, i in ranked[:50]],
    }


@torch.no_grad()
def active_features(lm: LM, batch: TokenBatch, saes: dict[str, nn.Module], layer: int, threshold: float = 0.01,
                    batch_size: int = 16) -> dict[str, int]:  # fmt: skip
    """Features active (> threshold) on at least one real token, per hook (the paper's 908 vs 602)."""
    seen = {h: torch.zeros(s.cfg.d_sae, dtype=torch.bool) for h, s in saes.items()}
    for s in range(0, batch.input_ids.shape[0], batch_size):
        ids, am = batch.input_ids[s : s + batch_size], batch.attention_mask[s : s + batch_size]
        acts: dict[str, Tensor] = {}

        def keep(name: str, act: Tensor, acts: dict[str, Tensor] = acts) -> None:
            acts[name] = act

        forward_to(lm, ids, am, layer, {h: (lambda x: x) for h in saes}, on_act=keep)
        pm = position_mask(am.to(lm.device))
        for h, a in acts.items():
            f = saes[h].encode(a.to(saes[h].W_dec.dtype)) * pm
            seen[h] |= (f > threshold).flatten(0, 1).any(0).cpu()
    return {h: int(v.sum()) for h, v in seen.items()}


__all__ = ["Row", "ShiftResult", "Skyline", "ablate_features", "accuracy_draws", "active_features",
           "bootstrap_draws", "choose_k", "concept_scores", "with_cis",
           "concept_vectors", "feature_ablation", "neuron_ablation", "rank_nodes", "run_shift", "pool"]  # fmt: skip
