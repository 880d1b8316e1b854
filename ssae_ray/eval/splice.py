"""Spliced cross-entropy without re-running the layers before the hook.

A test set's activations are captured once (in the same forward that gives the clean CE). To
score an SAE at `blocks.L.hook_*`, only the layers after the hook run again, started from the
captured residual stream with the hook's contribution replaced (docs/CALIBRATION.md: running the
layers after the hook by hand on right-padded batches reproduces the full model exactly at real
positions). Where that is not exact (an `attn_out` hook of a sequential-residual model, Gemma-2+),
`tail_start` returns None and the full spliced forward of `models.token_losses` is used instead.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

from ssae_ray.models import LM, TokenLoss, ce_from_logits, parse_hook, token_losses

Splice = Callable[[Tensor], Tensor]


def resid_hook_for(hook: str) -> str | None:
    """The residual-stream hook that the tail restarts from: the hook itself for resid hooks, the
    layer's resid_post for mlp_out / attn_out (whose contribution is swapped by difference)."""
    hp = parse_hook(hook)
    return None if hp.kind in ("resid_pre", "resid_post") else f"blocks.{hp.layer}.hook_resid_post"


def _fast_arch(lm: LM) -> bool:
    return getattr(lm.model.config, "model_type", "") in ("gpt_neox", "llama", "gemma")


def tail_start(lm: LM, hook: str) -> int | None:
    """First layer to run when splicing at `hook`, or None when only a full forward is exact."""
    if not _fast_arch(lm):
        return None
    hp = parse_hook(hook)
    if hp.kind == "resid_pre":
        return hp.layer
    if hp.kind == "attn_out":
        parallel = lm.arch == "gpt_neox" and getattr(lm.model.config, "use_parallel_residual", False)
        if not parallel:  # the MLP reads the attention output: the difference trick is not exact
            return None
    return hp.layer + 1


def _layer_list(lm: LM) -> tuple[nn.Module, str]:
    return (lm.model.gpt_neox, "layers") if lm.arch == "gpt_neox" else (lm.model.model, "layers")


@contextlib.contextmanager
def _only_layers(lm: LM, start: int) -> Iterator[None]:
    owner, attr = _layer_list(lm)
    full = getattr(owner, attr)
    setattr(owner, attr, nn.ModuleList(list(full)[start:]))
    try:
        yield
    finally:
        setattr(owner, attr, full)


@torch.no_grad()
def tail_losses(lm: LM, start: int, resid: Tensor, input_ids: Tensor, attention_mask: Tensor) -> TokenLoss:
    """CE of the model run from residual stream `resid` [B, T, d] entering layer `start`."""
    h = resid.to(lm.device, next(lm.model.parameters()).dtype)
    if lm.arch == "gemma":  # Gemma scales its embeddings by sqrt(d) inside the forward
        h = h / torch.tensor(math.sqrt(lm.d_model), dtype=h.dtype)
    ids, mask = input_ids.to(lm.device), attention_mask.to(lm.device)
    with _only_layers(lm, start):
        logits = lm.model(inputs_embeds=h, attention_mask=mask, use_cache=False).logits
    return ce_from_logits(logits, ids, mask)


def spliced_losses(
    lm: LM,
    hook: str,
    splice: Splice,
    input_ids: Tensor,
    attention_mask: Tensor,
    act: Tensor | None = None,
    resid: Tensor | None = None,
) -> TokenLoss:
    """CE with `hook`'s activation replaced by `splice(act)`. With the captured `act` (and, for
    mlp_out / attn_out, the layer's captured resid_post `resid`) only the layers after the hook
    run; otherwise the full model runs with the splice hooked in."""
    start = tail_start(lm, hook)
    if start is None or act is None or (resid_hook_for(hook) is not None and resid is None):
        return token_losses(lm, input_ids, attention_mask, splice={hook: splice})
    act = act.to(lm.device)
    new = splice(act)
    h = new if resid is None else resid.to(lm.device) - act + new
    return tail_losses(lm, start, h, input_ids, attention_mask)
