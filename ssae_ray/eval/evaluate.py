"""Evaluate SAEs on a test set: L0, MSE, FVU, CE clean / spliced / zero-ablated, CE loss recovered,
perplexity, and the per-token and per-latent statistics the plots and diagnostics need.

`prepare_test_set` runs the LM once per batch of the test set: that forward gives the clean CE and
captures every hook (and the residual stream each splice restarts from); the zero-ablated CE of
each hook is computed once too. `evaluate_sae` then only runs the SAE and the layers after its hook.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ssae_ray.eval import metrics
from ssae_ray.eval.metrics import EvalError
from ssae_ray.eval.splice import resid_hook_for, spliced_losses
from ssae_ray.models import (
    LM,
    TokenBatch,
    by_length,
    cap_tokens,
    iter_batches,
    sae_splice,
    token_losses,
    tokenize_docs,
    zero_splice,
)

log = logging.getLogger("ssae_ray")


class TestSet(NamedTuple):
    name: str
    """`test` (in-domain), `ood`, `general`, `val`..."""
    tokens: TokenBatch
    acts: dict[str, Tensor]
    """Hook -> captured activations [N, T, d] (float32, CPU); also the resid_post streams that
    mlp_out / attn_out splices restart from."""
    clean: Tensor
    """[N, T-1] clean per-token CE (0 where `mask` is False)."""
    mask: Tensor
    """[N, T-1] valid targets (padding and the position-0 prediction excluded)."""
    zero: dict[str, Tensor]
    """Hook -> [N, T-1] CE with the hook zero-ablated."""
    n_docs: int


def prepare_test_set(
    lm: LM,
    name: str,
    texts: Sequence[str],
    hooks: Sequence[str],
    context_len: int,
    max_tokens: int | None = None,
    batch_size: int = 8,
) -> TestSet:
    """Tokenise `texts` into contexts (about `max_tokens` tokens in all), then one clean forward per
    batch capturing every hook, and one zero-ablated tail per hook."""
    if len(texts) == 0:
        raise EvalError(f"test set {name!r} has no documents; check the corpus splits (corpus.*_path)")
    # The first documents up to `max_tokens`, then longest context first: the same tokens, a third
    # fewer padded positions through every forward below and every `evaluate_sae` on this set.
    tokens = by_length(cap_tokens(tokenize_docs(lm.tokenizer, list(texts), context_len), max_tokens))
    if tokens.input_ids.shape[0] == 0:
        raise EvalError(f"test set {name!r}: no document has 2 or more tokens")
    need = list(dict.fromkeys([*hooks, *(r for h in hooks if (r := resid_hook_for(h)))]))
    n, t = tokens.input_ids.shape
    acts = {h: torch.zeros(n, t, lm.d_model) for h in need}
    clean = torch.zeros(n, t - 1)
    mask = torch.zeros(n, t - 1, dtype=torch.bool)
    zero = {h: torch.zeros(n, t - 1) for h in hooks}
    s = 0
    bar = tqdm(total=n, desc=f"eval {name}: clean + capture", unit="ctx", leave=False)
    for b in iter_batches(tokens, batch_size):
        k, w = b.input_ids.shape
        grabbed: dict[str, Tensor] = {}

        out = token_losses(lm, b.input_ids, b.attention_mask, splice={h: _recorder(grabbed, h) for h in need})
        clean[s : s + k, : w - 1] = out.loss.cpu()
        mask[s : s + k, : w - 1] = out.mask.cpu()
        for h in need:
            acts[h][s : s + k, :w] = grabbed[h]
        for h in hooks:
            r = resid_hook_for(h)
            z = spliced_losses(lm, h, zero_splice(), b.input_ids, b.attention_mask, grabbed[h],
                               grabbed[r] if r else None)  # fmt: skip
            zero[h][s : s + k, : w - 1] = z.loss.cpu()
        s += k
        bar.update(k)
    bar.close()
    return TestSet(name, tokens, acts, clean, mask, zero, int(tokens.doc_index.max()) + 1)


def _recorder(store: dict[str, Tensor], hook: str):
    """A splice that records the activation and leaves it unchanged."""

    def fn(x: Tensor) -> Tensor:
        store[hook] = x.detach().float().cpu()
        return x

    return fn


class SAEEval(NamedTuple):
    test: str
    hook: str
    l0: float
    mse: float
    fvu: float
    ce_clean: float
    ce_spliced: float
    ce_zero: float
    ce_recovered: float
    ppl_clean: float
    ppl: float
    """Perplexity with the SAE spliced in: exp(ce_spliced)."""
    loss: Tensor
    """[N, T-1] spliced per-token CE, for CIs against another SAE on the same tokens."""
    feature_counts: Tensor
    """[d_sae] number of evaluated tokens on which each latent is active."""
    token_ids: Tensor
    """[M] the evaluated tokens (position 0 and padding dropped)."""
    sse: Tensor
    """[M] squared reconstruction error of each evaluated token."""
    entropy: Tensor
    """[M] entropy (nats) of the token's latent activations normalised to sum 1 (0 when none fire)."""
    max_act: Tensor
    """[M] the token's largest latent activation."""

    def row(self) -> dict[str, Any]:
        """The scalar fields, for tables and MLflow."""
        return {k: v for k, v in self._asdict().items() if not isinstance(v, Tensor)}

    def nonfinite(self) -> dict[str, float]:
        """The scalar metrics that are NaN or infinite (empty when all are finite)."""
        return {k: v for k, v in self.row().items() if isinstance(v, float) and not math.isfinite(v)}

    def check_finite(self, sae_name: str) -> SAEEval:
        """Raise an `EvalError` naming the SAE, hook and test set when a metric is NaN or infinite."""
        bad = self.nonfinite()
        if bad:
            shown = ", ".join(f"{k}={v}" for k, v in bad.items())
            raise EvalError(
                f"{sae_name} at {self.hook} on test set {self.test!r}: non-finite {shown}; its weights or "
                "the activations hold NaN/inf (retrain it, e.g. with a lower train.lr or train.lam)"
            )
        return self


def token_positions(test: TestSet) -> Tensor:
    """[N, T] bool: real tokens except position 0 (what SAEs are scored on)."""
    m = test.tokens.attention_mask.bool().clone()
    m[:, 0] = False
    return m


@torch.no_grad()
def evaluate_sae(lm: LM, sae: Any, hook: str, test: TestSet, batch_size: int = 8) -> SAEEval:
    """Score one SAE at `hook` on a prepared test set."""
    if hook not in test.acts:
        raise EvalError(f"test set {test.name!r} was not captured at {hook}; captured: {sorted(test.acts)}")
    pos = token_positions(test)
    x = test.acts[hook][pos]
    dev, dtype = sae.W_dec.device, sae.W_dec.dtype
    fs, recon, counts = [], [], torch.zeros(sae.cfg.d_sae, dtype=torch.long)
    ent, mx = [], []
    for s in range(0, x.shape[0], 4096):
        f = sae.encode(x[s : s + 4096].to(dev, dtype))
        recon.append(sae.decode(f).float().cpu())
        f = f.float().cpu()
        counts += (f != 0).sum(0)
        fs.append((f != 0).sum(-1))
        p = f.clamp_min(0) / f.clamp_min(0).sum(-1, keepdim=True).clamp_min(1e-12)
        ent.append(-(p * p.clamp_min(1e-30).log()).sum(-1))
        mx.append(f.max(-1).values)
    x_hat = torch.cat(recon)
    if x.shape[0] == 0:
        raise EvalError(f"test set {test.name!r} has no tokens after position 0")
    rec = metrics.Recon(float(torch.cat(fs).double().mean()), metrics.mse(x, x_hat), metrics.fvu(x, x_hat))
    loss = torch.zeros_like(test.clean)
    r = resid_hook_for(hook)
    fn = sae_splice(sae)
    for s in range(0, test.tokens.input_ids.shape[0], batch_size):
        m = test.tokens.attention_mask[s : s + batch_size]
        w = int(m.sum(1).max())
        ids = test.tokens.input_ids[s : s + batch_size, :w]
        act = test.acts[hook][s : s + batch_size, :w]
        res = test.acts[r][s : s + batch_size, :w] if r else None
        out = spliced_losses(lm, hook, fn, ids, m[:, :w], act, res)
        loss[s : s + batch_size, : w - 1] = out.loss.cpu()
    ce_clean = metrics.mean_ce(test.clean, test.mask)
    ce_spliced = metrics.mean_ce(loss, test.mask)
    ce_zero = metrics.mean_ce(test.zero[hook], test.mask)
    return SAEEval(
        test=test.name,
        hook=hook,
        l0=rec.l0,
        mse=rec.mse,
        fvu=rec.fvu,
        ce_clean=ce_clean,
        ce_spliced=ce_spliced,
        ce_zero=ce_zero,
        ce_recovered=metrics.ce_loss_recovered(ce_clean, ce_spliced, ce_zero),
        ppl_clean=metrics.perplexity(ce_clean),
        ppl=metrics.perplexity(ce_spliced),
        loss=loss,
        feature_counts=counts,
        token_ids=test.tokens.input_ids[pos],
        sse=(x - x_hat).pow(2).sum(-1),
        entropy=torch.cat(ent),
        max_act=torch.cat(mx),
    )


def evaluate_saes(lm: LM, saes: dict[str, Any], test: TestSet, batch_size: int = 8) -> dict[str, SAEEval]:
    return {h: evaluate_sae(lm, sae, h, test, batch_size) for h, sae in saes.items()}
