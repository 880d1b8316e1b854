"""Indirect effects of SAE features, SAE errors and neurons on m = -log C(y|x) (appendix H).

The SAEs are spliced in with their error terms, so the hook output is x = decode(f) + eps and the
model's output is unchanged. With g = dm/dx at a hook (the total effect of the hook output through
everything downstream), attribution patching (AtP) estimates the effect of patching a node to `patch`:

    IE(f_i) ~ sum_t (patch - f_i[t]) * (W_dec[i] . g[t]),   IE(eps) ~ sum_t (patch - eps[t]) . g[t]

summed over a bio's positions (non-templatic data), then averaged over bios. Zero-ablation
(patch = 0) for features and errors, mean-ablation for neurons (the hook's own dimensions).
Hooks in early layers use integrated gradients instead: g is averaged over the path that scales
the whole hook output from x to 0 (Marks et al.'s `_pe_ig` with a zero patch; midpoint rule).
Position 0 is never patched (it is never spliced; docs/CALIBRATION.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssae_ray.models import LM, TokenBatch, iter_batches, parse_hook
from ssae_ray.shift.probe import Prefix, forward_to, pool, prefix_rows

KIND_ORDER = {"resid_pre": 0, "attn_out": 1, "mlp_out": 2, "resid_post": 3}


class Attribution(NamedTuple):
    features: dict[str, Tensor]
    """Per hook, [d_sae] mean IE of zero-ablating each SAE feature."""
    errors: dict[str, float]
    """Per hook, mean IE of zero-ablating the SAE error term."""
    neurons: dict[str, Tensor]
    """Per hook, [d_model] mean IE of mean-ablating each dimension (only when `means` were given)."""
    n: int
    """Bios averaged over."""


class Circuit(NamedTuple):
    features: list[tuple[str, int, float]]
    """(hook, feature, IE) with |IE| > T_N, largest |IE| first."""
    errors: list[tuple[str, float]]
    """(hook, IE) of error nodes with |IE| > T_N."""
    edges: list[tuple[str, str, float]]
    """(upstream node, downstream node, IE) with |IE| > T_E; nodes named `hook/feature` or `hook/err`."""


def metric(logit: Tensor, y: Tensor) -> Tensor:
    """m = -log C(y|x) per bio for a binary probe's logit."""
    return F.binary_cross_entropy_with_logits(logit, y.float(), reduction="none")


def hook_order(hook: str) -> tuple[int, int]:
    hp = parse_hook(hook)
    return hp.layer, KIND_ORDER[hp.kind]


def position_mask(attention_mask: Tensor) -> Tensor:
    """[B, T, 1] float: real tokens from position 1 on (the positions a patch may touch)."""
    m = attention_mask.float().clone()
    m[:, 0] = 0
    return m.unsqueeze(-1)


def _scaled(alpha: float):
    def fn(x: Tensor) -> Tensor:
        out = x * alpha
        out[:, 0] = x[:, 0]
        return out

    return fn


def hook_grads(
    lm: LM,
    ids: Tensor,
    mask: Tensor,
    probe: nn.Linear,
    y: Tensor,
    layer: int,
    hooks: Sequence[str],
    skip_first: bool = True,
    scale: tuple[str, float] | None = None,
    prefix: tuple[int, Tensor] | None = None,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Hook outputs and dm/d(hook output) (summed m over the batch) for `hooks`, [B, T, d] each.
    `scale=(hook, alpha)` multiplies that hook's output by alpha first (an IG path point)."""
    acts: dict[str, Tensor] = {}
    splice = {h: (lambda x: x) for h in hooks}
    if scale is not None:
        splice[scale[0]] = _scaled(scale[1])

    def on_act(name: str, act: Tensor) -> Tensor:
        act = act + 0.0 if act.requires_grad else act.detach().requires_grad_(True)
        acts[name] = act
        return act

    with torch.enable_grad():
        out = forward_to(lm, ids, mask, layer, splice, on_act=on_act, prefix=prefix)
        m = metric(probe.to(out.device)(pool(out, mask, skip_first)).squeeze(-1), y.to(out.device)).sum()
        names = [h for h in hooks if h in acts]
        grads = torch.autograd.grad(m, [acts[h] for h in names], allow_unused=True)
    return (
        {h: acts[h].detach() for h in names},
        {
            h: (g if g is not None else torch.zeros_like(acts[h])).detach()
            for h, g in zip(names, grads, strict=True)
        },
    )


def attribute(
    lm: LM,
    batch: TokenBatch,
    probe: nn.Linear,
    labels: Sequence[int] | Tensor,
    layer: int,
    saes: dict[str, nn.Module] | None = None,
    means: dict[str, Tensor] | None = None,
    ig_hooks: Sequence[str] = (),
    ig_steps: int = 10,
    batch_size: int = 16,
    skip_first: bool = True,
    prefix: Prefix | None = None,
) -> Attribution:
    """Mean IEs of SAE features / errors (zero-ablation) and neurons (mean-ablation, when `means`
    are given) at every hook at or before `layer`, on m = -log C(labels|x)."""
    saes = {h: s for h, s in (saes or {}).items() if parse_hook(h).layer <= layer}
    means = {h: mu for h, mu in (means or {}).items() if parse_hook(h).layer <= layer}
    hooks = sorted(set(saes) | set(means), key=hook_order)
    if not hooks:
        raise ValueError(f"no SAE or neuron hooks at or before the probe layer {layer}")
    y_all = torch.as_tensor(labels)
    feats = {h: torch.zeros(s.cfg.d_sae) for h, s in saes.items()}
    errs = dict.fromkeys(saes, 0.0)
    neur = {h: torch.zeros(mu.shape[-1]) for h, mu in means.items()}
    start = 0
    for b in iter_batches(batch, batch_size):
        y = y_all[start : start + b.input_ids.shape[0]]
        pre = prefix_rows(prefix, start, b.input_ids.shape[0], b.input_ids.shape[1])
        start += b.input_ids.shape[0]
        ids, am = b.input_ids.to(lm.device), b.attention_mask.to(lm.device)
        acts, grads = hook_grads(lm, ids, am, probe, y, layer, hooks, skip_first, prefix=pre)
        for h in ig_hooks:
            if h not in acts:
                continue
            path = [hook_grads(lm, ids, am, probe, y, layer, hooks, skip_first, (h, 1 - (k + 0.5) / ig_steps), pre)[1][h]
                    for k in range(ig_steps)]  # fmt: skip
            grads[h] = torch.stack(path).mean(0)
        pm = position_mask(am)
        for h in hooks:
            _accumulate(h, acts[h], grads[h] * pm, saes.get(h), means.get(h), feats, errs, neur)
    n = max(start, 1)
    return Attribution(
        {h: v / n for h, v in feats.items()}, {h: v / n for h, v in errs.items()},
        {h: v / n for h, v in neur.items()}, start,
    )  # fmt: skip


@torch.no_grad()
def _accumulate(
    h: str,
    x: Tensor,
    g: Tensor,
    sae: nn.Module | None,
    mu: Tensor | None,
    feats: dict[str, Tensor],
    errs: dict[str, float],
    neur: dict[str, Tensor],
) -> None:
    """Add one batch's summed IEs at hook h (g already masked to patchable positions)."""
    if sae is not None:
        xs = x.to(sae.W_dec.dtype)
        f = sae.encode(xs)
        feats[h] += (-(f * (g @ sae.W_dec.T))).sum((0, 1)).cpu()
        errs[h] += float(-((xs - sae.decode(f)) * g).sum())
    if mu is not None:
        neur[h] += ((mu.to(x.device) - x) * g).sum((0, 1)).cpu()


def ig_hooks_for(hooks: Sequence[str], ig_layers: int) -> list[str]:
    """Residual-stream and MLP hooks in layers below `ig_layers` (appendix H's IG nodes)."""
    return [h for h in hooks if parse_hook(h).layer < ig_layers and parse_hook(h).kind != "attn_out"]


@torch.no_grad()
def hook_means(lm: LM, batch: TokenBatch, hooks: Sequence[str], batch_size: int = 16) -> dict[str, Tensor]:
    """Mean activation of each hook over real tokens from position 1 on (the neuron-ablation value)."""
    from ssae_ray.models import capture

    sums: dict[str, Tensor] = {}
    count = 0.0
    for b in iter_batches(batch, batch_size):
        acts = capture(lm, b.input_ids, b.attention_mask, hooks)
        pm = position_mask(b.attention_mask.to(lm.device))
        for h, a in acts.items():
            sums[h] = sums.get(h, 0) + (a * pm).sum((0, 1)).cpu()
        count += float(pm.sum())
    return {h: s / max(count, 1.0) for h, s in sums.items()}


def select_nodes(
    attr: Attribution, node_threshold: float
) -> tuple[list[tuple[str, int, float]], list[tuple[str, float]]]:
    """Feature and error nodes with |IE| > T_N, largest first."""
    feats = [
        (h, int(i), float(v[i]))
        for h, v in attr.features.items()
        for i in torch.nonzero(v.abs() > node_threshold).flatten()
    ]
    feats.sort(key=lambda t: -abs(t[2]))
    errs = sorted(
        [(h, e) for h, e in attr.errors.items() if abs(e) > node_threshold], key=lambda t: -abs(t[1])
    )
    return feats, errs


def edge_effects(
    lm: LM,
    batch: TokenBatch,
    probe: nn.Linear,
    labels: Sequence[int] | Tensor,
    layer: int,
    saes: dict[str, nn.Module],
    down: Sequence[tuple[str, int]],
    up_hooks: Sequence[str] | None = None,
    skip_first: bool = True,
    batch_size: int = 16,
    prefix: Prefix | None = None,
) -> dict[tuple[str, str], float]:
    """Mean AtP effects of edges from every upstream feature / error into each downstream feature:
    IE(u -> d) ~ sum_{t,t'} (dm/dd_t) (dd_t/du_t') (0 - u_t'), through all paths between them
    (the linear approximation of appendix H), summed over positions and averaged over bios.
    Returns {(upstream node, downstream node): IE}; nodes named `hook/feature` or `hook/err`."""
    saes = {h: s for h, s in saes.items() if parse_hook(h).layer <= layer}
    hooks = sorted(saes, key=hook_order)
    up_hooks = list(up_hooks) if up_hooks is not None else hooks
    y_all = torch.as_tensor(labels)
    out: dict[tuple[str, str], float] = {}
    start = 0
    for b in iter_batches(batch, batch_size):
        y = y_all[start : start + b.input_ids.shape[0]]
        pre = prefix_rows(prefix, start, b.input_ids.shape[0], b.input_ids.shape[1])
        start += b.input_ids.shape[0]
        ids, am = b.input_ids.to(lm.device), b.attention_mask.to(lm.device)
        pm = position_mask(am)
        acts: dict[str, Tensor] = {}

        def on_act(name: str, act: Tensor, acts: dict[str, Tensor] = acts) -> Tensor:
            act = act + 0.0 if act.requires_grad else act.detach().requires_grad_(True)
            acts[name] = act
            return act

        with torch.enable_grad():
            res = forward_to(lm, ids, am, layer, {h: (lambda x: x) for h in hooks}, on_act=on_act, prefix=pre)
            m = metric(probe.to(res.device)(pool(res, am, skip_first)).squeeze(-1), y.to(res.device)).sum()
            g_all = dict(
                zip(hooks, torch.autograd.grad(m, [acts[h] for h in hooks], retain_graph=True), strict=True)
            )
            for h2, i in down:
                sae2 = saes[h2]
                ups = [h for h in up_hooks if hook_order(h) < hook_order(h2)]
                if not ups:
                    continue
                w = (g_all[h2] @ sae2.W_dec[i]).detach() * pm.squeeze(-1)  # dm/df_i[t]
                d = sae2.encode(acts[h2].to(sae2.W_dec.dtype))[..., i]
                gs = torch.autograd.grad(
                    (w * d).sum(), [acts[h] for h in ups], retain_graph=True, allow_unused=True
                )
                for h1, g in zip(ups, gs, strict=True):
                    if g is None:
                        continue
                    with torch.no_grad():
                        sae1 = saes[h1]
                        g = g * pm
                        x1 = acts[h1].detach().to(sae1.W_dec.dtype)
                        f1 = sae1.encode(x1)
                        ie_f = (-(f1 * (g @ sae1.W_dec.T))).sum((0, 1)).cpu()
                        ie_e = float(-((x1 - sae1.decode(f1)) * g).sum())
                    dname = f"{h2}/{i}"
                    for j in torch.nonzero(ie_f).flatten().tolist():
                        out[(f"{h1}/{j}", dname)] = out.get((f"{h1}/{j}", dname), 0.0) + float(ie_f[j])
                    out[(f"{h1}/err", dname)] = out.get((f"{h1}/err", dname), 0.0) + ie_e
    n = max(start, 1)
    return {k: v / n for k, v in out.items()}


def find_circuit(
    lm: LM,
    batch: TokenBatch,
    probe: nn.Linear,
    labels: Sequence[int] | Tensor,
    layer: int,
    saes: dict[str, nn.Module],
    node_threshold: float,
    edge_threshold: float,
    ig_layers: int = 1,
    ig_steps: int = 10,
    max_edge_nodes: int = 32,
    edge_examples: int | None = None,
    batch_size: int = 16,
    skip_first: bool = True,
    prefix: Prefix | None = None,
) -> tuple[Circuit, Attribution]:
    """Nodes with |IE| > T_N (AtP, IG in early layers), then edges into the `max_edge_nodes`
    strongest downstream feature nodes with |IE| > T_E, computed on `edge_examples` bios."""
    attr = attribute(
        lm, batch, probe, labels, layer, saes, ig_hooks=ig_hooks_for(list(saes), ig_layers), ig_steps=ig_steps,
        batch_size=batch_size, skip_first=skip_first, prefix=prefix,
    )  # fmt: skip
    feats, errs = select_nodes(attr, node_threshold)
    edges: list[tuple[str, str, float]] = []
    if feats and max_edge_nodes > 0:
        keep = {f"{h}/{i}" for h, i, _ in feats} | {f"{h}/err" for h, _ in errs}
        down = [(h, i) for h, i, _ in feats[:max_edge_nodes]]
        sub = batch if edge_examples is None else TokenBatch(*(t[:edge_examples] for t in batch))
        lab = torch.as_tensor(labels)[: sub.input_ids.shape[0]]
        raw = edge_effects(
            lm,
            sub,
            probe,
            lab,
            layer,
            saes,
            down,
            skip_first=skip_first,
            batch_size=batch_size,
            prefix=prefix,
        )
        edges = sorted(
            [(u, d, v) for (u, d), v in raw.items() if u in keep and abs(v) > edge_threshold],
            key=lambda t: -abs(t[2]),
        )
    return Circuit(feats, errs, edges), attr
