"""The Bias-in-Bios classifier (appendix G.1): a logistic-regression probe on the mean-pooled
residual stream of one layer, trained with AdamW; its metrics on the balanced set.

`pooled_reps` runs the LM up to the probe layer only, with any hooks spliced (SAEs with error terms,
ablations), so every classifier in Table 1 is `probe(pooled_reps(lm, bios, layer, splice))`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssae_ray.models import LM, TokenBatch, hooked, pad_rows, parse_hook

Splice = dict[str, Callable[[Tensor], Tensor]]


class Accuracies(NamedTuple):
    """Balanced-set accuracies of Table 1 (fractions, not percent)."""

    profession: float
    """Share of bios whose predicted class is their profession (higher is better)."""
    gender: float
    """Share whose predicted class is the one gender predicts on the ambiguous set (lower is better)."""
    worst: float
    """Lowest profession accuracy over the four (profession, gender) groups (higher is better)."""
    groups: dict[str, float]
    """Profession accuracy per group, `prof<p>/<m|f>`."""


def probe_layer(lm: LM, layer: int) -> int:
    """A layer index from `ShiftConfig.layer` (negative counts from the end, -2 = penultimate)."""
    idx = layer if layer >= 0 else lm.n_layers + layer
    if not 0 <= idx < lm.n_layers:
        raise ValueError(f"shift.layer={layer} is outside the model's {lm.n_layers} layers")
    return idx


def probe_hook(layer: int) -> str:
    return f"blocks.{layer}.hook_resid_post"


def tokenize_bios(
    tokenizer: Any, texts: Sequence[str], context_len: int, prepend_bos: bool = False
) -> TokenBatch:
    """One right-padded context per bio: its first `context_len` tokens (no special tokens), or
    with `prepend_bos` (`model.prepend_bos`, the convention the GSAEs were trained with) the
    tokenizer's BOS then the first `context_len - 1` text tokens. Pooling skips position 0
    (`shift.pool_skip_first`), so the BOS never enters a probe."""
    bos = None
    if prepend_bos:
        bos = tokenizer.bos_token_id
        if bos is None:
            raise ValueError(
                "model.prepend_bos is true but the tokenizer has no BOS token; set model.prepend_bos=false"
            )
    n = context_len - 1 if prepend_bos else context_len
    enc = tokenizer(list(texts), add_special_tokens=False, truncation=True, max_length=n)
    rows = [([bos] if prepend_bos else []) + ids for ids in enc["input_ids"]]
    rows = [ids if len(ids) >= 2 else ids + [tokenizer.pad_token_id or 0] * (2 - len(ids)) for ids in rows]
    ids, mask = pad_rows(rows, tokenizer.pad_token_id)
    return TokenBatch(ids, mask, torch.arange(len(rows)))


class _Stop(Exception):
    pass


class Prefix(NamedTuple):
    """The residual stream entering layer `start` for a whole set of bios, so that forwards whose
    hooks all sit at or after `start` skip the layers before it (computed once per set)."""

    start: int
    resid: Tensor
    """[N, T, d] on the LM's device, aligned with the set's TokenBatch."""


@torch.no_grad()
def make_prefix(lm: LM, batch: TokenBatch, start: int, batch_size: int = 16) -> Prefix | None:
    """Prefix of `batch` at layer `start` (None when start is 0: nothing to skip)."""
    if start <= 0:
        return None
    from ssae_ray.models import capture

    hook = f"blocks.{start}.hook_resid_pre"
    parts = []
    for s in range(0, batch.input_ids.shape[0], batch_size):
        ids, mask = batch.input_ids[s : s + batch_size], batch.attention_mask[s : s + batch_size]
        parts.append(capture(lm, ids, mask, [hook])[hook])
    return Prefix(start, torch.cat(parts))


@contextlib.contextmanager
def _from_layer(lm: LM, start: int) -> Iterator[None]:
    """Temporarily drop the layers before `start` (hooks stay on the layer modules themselves)."""
    owner = lm.model.gpt_neox if lm.arch == "gpt_neox" else lm.model.model
    full = owner.layers
    owner.layers = nn.ModuleList(list(full)[start:])
    try:
        yield
    finally:
        owner.layers = full


def forward_to(
    lm: LM,
    input_ids: Tensor,
    attention_mask: Tensor,
    layer: int,
    splice: Splice | None = None,
    on_act: Callable[[str, Tensor], Tensor | None] | None = None,
    prefix: tuple[int, Tensor] | None = None,
) -> Tensor:
    """Run the LM up to `blocks.<layer>.hook_resid_post` with hooks spliced; return that
    activation [B, T, d]. `on_act(hook, act)` sees (and may replace) every spliced hook's output
    after splicing; gradients flow when enabled by the caller. `prefix=(start, resid)` starts
    from the residual stream entering layer `start` (this batch's rows of a `Prefix`)."""
    splice = {h: fn for h, fn in (splice or {}).items() if parse_hook(h).layer <= layer}
    target = probe_hook(layer)
    out: dict[str, Tensor] = {}
    start = prefix[0] if prefix is not None else 0
    early = [h for h in splice if parse_hook(h).layer < start]
    if early or start > layer:
        raise ValueError(f"a prefix starting at layer {start} cannot splice {early} or read layer {layer}")

    def fn(name: str, act: Tensor) -> Tensor | None:
        new = splice[name](act).to(act.dtype) if name in splice else None
        if on_act is not None and name in splice:
            seen = on_act(name, act if new is None else new)
            new = seen if seen is not None else new
        if name == target:
            out[name] = act if new is None else new
            raise _Stop
        return new

    hooks = list(dict.fromkeys([*splice, target]))
    mask = attention_mask.to(lm.device)
    with hooked(lm, hooks, fn), lm.amp():
        try:
            if prefix is None:
                lm.model(input_ids=input_ids.to(lm.device), attention_mask=mask, use_cache=False)
            else:
                h = prefix[1].to(lm.device, next(lm.model.parameters()).dtype)
                if lm.arch == "gemma":  # Gemma multiplies its input embeddings by sqrt(d)
                    h = h / torch.tensor(math.sqrt(lm.d_model), dtype=h.dtype)
                with _from_layer(lm, start):
                    lm.model(inputs_embeds=h, attention_mask=mask, use_cache=False)
        except _Stop:
            pass
    return out[target]


def prefix_rows(prefix: Prefix | None, s: int, n: int, width: int) -> tuple[int, Tensor] | None:
    """Rows s..s+n (trimmed to `width` tokens) of a set's prefix, as `forward_to` takes them."""
    return None if prefix is None else (prefix.start, prefix.resid[s : s + n, :width])


def pool(act: Tensor, attention_mask: Tensor, skip_first: bool = True) -> Tensor:
    """Mean over non-padding tokens (from position 1 when `skip_first`): [B, T, d] -> [B, d]."""
    m = attention_mask.to(act.device).float()
    if skip_first and m.shape[1] > 1:
        m = m.clone()
        m[:, 0] = 0
    m = m.unsqueeze(-1)
    return (act.float() * m).sum(1) / m.sum(1).clamp_min(1)


@torch.no_grad()
def pooled_reps(
    lm: LM,
    batch: TokenBatch,
    layer: int,
    splice: Splice | None = None,
    batch_size: int = 16,
    skip_first: bool = True,
    prefix: Prefix | None = None,
) -> Tensor:
    """[N, d] mean-pooled residual stream after `layer`, with `splice` applied, on the CPU."""
    out = []
    for s in range(0, batch.input_ids.shape[0], batch_size):
        mask = batch.attention_mask[s : s + batch_size]
        width = int(mask.sum(1).max())
        ids, mask = batch.input_ids[s : s + batch_size, :width], mask[:, :width]
        act = forward_to(lm, ids, mask, layer, splice, prefix=prefix_rows(prefix, s, ids.shape[0], width))
        out.append(pool(act, mask, skip_first).cpu())
    return torch.cat(out) if out else torch.zeros(0, lm.d_model)


def train_probe(
    x: Tensor,
    y: Tensor | Sequence[int],
    lr: float = 0.01,
    epochs: int = 1,
    batch_size: int = 16,
    seed: int = 0,
    init: nn.Linear | None = None,
) -> nn.Linear:
    """Logistic regression `Linear(d, 1)` on [N, d] features, AdamW, shuffled minibatches (G.1).
    `init` continues from an existing probe (retraining after SHIFT)."""
    y = torch.as_tensor(y, dtype=torch.float32)
    if x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ValueError(
            f"probe training needs as many labels as examples (>0): {x.shape[0]} vs {y.shape[0]}"
        )
    g = torch.Generator().manual_seed(seed)
    probe = nn.Linear(x.shape[1], 1)
    if init is not None:
        probe.load_state_dict(init.state_dict())
    else:
        with torch.no_grad():
            probe.weight.zero_()
            probe.bias.zero_()
    opt = torch.optim.AdamW(probe.parameters(), lr=lr)
    x = x.float()
    with torch.enable_grad():
        for _ in range(epochs):
            for idx in torch.randperm(x.shape[0], generator=g).split(batch_size):
                loss = F.binary_cross_entropy_with_logits(probe(x[idx]).squeeze(-1), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
    return probe.requires_grad_(False)


@torch.no_grad()
def predict(probe: nn.Linear, x: Tensor) -> Tensor:
    """[N] predicted class (0 / 1)."""
    return (probe(x.float()).squeeze(-1) > 0).long()


def group_accuracies(
    pred: Sequence[int] | Tensor, profession: Sequence[int], gender: Sequence[int]
) -> Accuracies:
    """Profession, gender and worst-group accuracy of class predictions (Table 1's columns).
    Gender accuracy counts a prediction as `gender` when it equals the gender (class 1 = the
    female-majority profession), as gender predicts the label on the ambiguous set."""
    pred = torch.as_tensor(pred).long().cpu()
    prof = torch.as_tensor(profession).long()
    gen = torch.as_tensor(gender).long()
    if not (pred.shape == prof.shape == gen.shape) or pred.numel() == 0:
        raise ValueError(
            f"need equal, non-empty predictions and labels: {pred.shape}, {prof.shape}, {gen.shape}"
        )
    groups: dict[str, float] = {}
    for p in (0, 1):
        for g in (0, 1):
            sel = (prof == p) & (gen == g)
            if sel.any():
                groups[f"prof{p}/{'mf'[g]}"] = float((pred[sel] == p).float().mean())
    return Accuracies(
        profession=float((pred == prof).float().mean()),
        gender=float((pred == gen).float().mean()),
        worst=min(groups.values()),
        groups=groups,
    )
