"""Evaluate SAEs on a test set: L0, MSE, FVU, CE clean / spliced / zero-ablated, CE loss recovered,
perplexity, and the per-token and per-latent statistics the plots and diagnostics need.

`prepare_test_set` runs the LM once per batch of the test set: that forward gives the clean CE and
the zero-ablated CE of each hook (from the batch's activations, then dropped). `evaluate_saes_on`
streams the test set again, one batch at a time: one forward captures the hooks of every SAE in
flight, then each SAE's statistics are summed and only the layers after its hook run. Memory is one
batch of activations plus each SAE's sums and per-token CE, whatever the size of the test set.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
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
    capture,
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
    hooks: tuple[str, ...]
    """Hooks SAEs can be scored at (with the resid_post streams that mlp_out / attn_out splices
    restart from). Their activations are not kept: `iter_captured` recomputes them one batch at
    a time, so memory follows the batch, not the test set."""
    clean: Tensor
    """[N, T-1] clean per-token CE (0 where `mask` is False)."""
    mask: Tensor
    """[N, T-1] valid targets (padding and the position-0 prediction excluded)."""
    zero: dict[str, Tensor]
    """Hook -> [N, T-1] CE with the hook zero-ablated."""
    n_docs: int


def _needed(hooks: Sequence[str]) -> list[str]:
    return list(dict.fromkeys([*hooks, *(r for h in hooks if (r := resid_hook_for(h)))]))


def prepare_test_set(
    lm: LM,
    name: str,
    texts: Sequence[str],
    hooks: Sequence[str],
    context_len: int,
    max_tokens: int | None = None,
    batch_size: int = 8,
    prepend_bos: bool = False,
) -> TestSet:
    """Tokenise `texts` into contexts (about `max_tokens` tokens in all), then one clean forward per
    batch (clean CE) and one zero-ablated tail per hook. Activations are used batch by batch and
    dropped: the test set holds token ids and per-token CEs only."""
    if len(texts) == 0:
        raise EvalError(f"test set {name!r} has no documents; check the corpus splits (corpus.*_path)")
    # The first documents up to `max_tokens`, then longest context first: the same tokens, a third
    # fewer padded positions through every forward below and every `evaluate_sae` on this set.
    tokens = by_length(
        cap_tokens(
            tokenize_docs(
                lm.tokenizer, list(texts), context_len, prepend_bos=prepend_bos, max_tokens=max_tokens
            ),
            max_tokens,
        )
    )
    if tokens.input_ids.shape[0] == 0:
        raise EvalError(f"test set {name!r}: no document has 2 or more tokens")
    need = _needed(hooks)
    n, t = tokens.input_ids.shape
    clean = torch.zeros(n, t - 1)
    mask = torch.zeros(n, t - 1, dtype=torch.bool)
    zero = {h: torch.zeros(n, t - 1) for h in hooks}
    s = 0
    bar = tqdm(total=n, desc=f"eval {name}: clean + zero-ablated", unit="ctx", leave=False)
    for b in iter_batches(tokens, batch_size):
        k, w = b.input_ids.shape
        grabbed: dict[str, Tensor] = {}

        out = token_losses(lm, b.input_ids, b.attention_mask, splice={h: _recorder(grabbed, h) for h in need})
        clean[s : s + k, : w - 1] = out.loss.cpu()
        mask[s : s + k, : w - 1] = out.mask.cpu()
        for h in hooks:
            r = resid_hook_for(h)
            z = spliced_losses(lm, h, zero_splice(), b.input_ids, b.attention_mask, grabbed[h],
                               grabbed[r] if r else None)  # fmt: skip
            zero[h][s : s + k, : w - 1] = z.loss.cpu()
        del grabbed, out
        s += k
        bar.update(k)
    bar.close()
    return TestSet(name, tokens, tuple(need), clean, mask, zero, int(tokens.doc_index.max()) + 1)


def _recorder(store: dict[str, Tensor], hook: str):
    """A splice that records the activation and leaves it unchanged."""

    def fn(x: Tensor) -> Tensor:
        store[hook] = x.detach().float()
        return x

    return fn


class Captured(NamedTuple):
    start: int
    """First context of the batch in the test set."""
    batch: TokenBatch
    """The batch's contexts, trimmed to their longest."""
    acts: dict[str, Tensor]
    """Hook -> [k, w, d] float32 activations (on the LM's device)."""
    pos: Tensor
    """[k, w] bool: the scored positions (real tokens except position 0)."""


def iter_captured(lm: LM, test: TestSet, hooks: Sequence[str], batch_size: int = 8) -> Iterator[Captured]:
    """The test set's activations at `hooks` one batch at a time (one forward per batch that stops
    after the deepest hook): what `evaluate_saes_on` and per-document statistics stream over."""
    missing = [h for h in hooks if h not in test.hooks]
    if missing:
        raise EvalError(
            f"test set {test.name!r} was not prepared at {missing}; prepared: {sorted(test.hooks)}"
        )
    s = 0
    for b in iter_batches(test.tokens, batch_size):
        acts = capture(lm, b.input_ids, b.attention_mask, list(hooks))
        pos = b.attention_mask.bool().clone()
        pos[:, 0] = False
        yield Captured(s, b, acts, pos)
        s += b.input_ids.shape[0]


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
    """[N, T-1] spliced per-token CE, for CIs against another SAE on the same tokens; or (scored
    with `doc_loss`) its per-document sums [n_docs], float64."""
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


def doc_counts(test: TestSet) -> Tensor:
    """[n_docs] float64: valid target tokens of each document (the weights of `doc_loss` sums)."""
    k, w1 = test.mask.shape
    doc = test.tokens.doc_index[:, None].expand(k, w1)
    out = torch.zeros(test.n_docs, dtype=torch.float64)
    return out.index_add_(0, doc[test.mask], torch.ones(int(test.mask.sum()), dtype=torch.float64))


def token_positions(test: TestSet) -> Tensor:
    """[N, T] bool: real tokens except position 0 (what SAEs are scored on)."""
    m = test.tokens.attention_mask.bool().clone()
    m[:, 0] = False
    return m


class _Acc:
    """Running sums of one SAE's scores over the batches of a test set (float64 where summed)."""

    def __init__(self, sae: Any, hook: str, test: TestSet, per_token: bool, doc_loss: bool = False) -> None:
        self.sae, self.hook, self.per_token, self.doc_loss = sae, hook, per_token, doc_loss
        self.n = 0
        self.l0_sum = 0.0
        self.sse_sum = 0.0
        self.mean = torch.zeros(0, dtype=torch.float64)  # running mean of x (Chan et al.)
        self.m2 = 0.0  # running sum of squared deviations from the mean
        self.counts = torch.zeros(sae.cfg.d_sae, dtype=torch.long)
        # [N, T-1] per-token CE, or (doc_loss) its per-document sums [n_docs] in float64
        self.loss = (
            torch.zeros(test.n_docs, dtype=torch.float64) if doc_loss else torch.zeros_like(test.clean)
        )
        self.tok: list[Tensor] = []
        self.sse: list[Tensor] = []
        self.ent: list[Tensor] = []
        self.mx: list[Tensor] = []
        self.fn = sae_splice(sae)

    def add_recon(self, x: Tensor, ids: Tensor) -> None:
        """x [M, d] float32 activations at the scored positions, ids [M] their token ids."""
        dev, dtype = self.sae.W_dec.device, self.sae.W_dec.dtype
        for s in range(0, x.shape[0], 4096):
            xc = x[s : s + 4096]
            f = self.sae.encode(xc.to(dev, dtype))
            x_hat = self.sae.decode(f).float().to(xc.device)
            f = f.float().cpu()
            xd = xc.double().cpu()
            err = (xd - x_hat.double().cpu()).pow(2).sum(-1)
            self.sse_sum += float(err.sum())
            nz = f != 0
            self.counts += nz.sum(0)
            self.l0_sum += float(nz.sum())
            nb = xc.shape[0]
            mb = xd.mean(0)
            m2b = float((xd - mb).pow(2).sum())
            if self.n == 0:
                self.mean, self.m2 = mb, m2b
            else:
                tot = self.n + nb
                delta = mb - self.mean
                self.m2 += m2b + float(delta.pow(2).sum()) * self.n * nb / tot
                self.mean = self.mean + delta * (nb / tot)
            self.n += nb
            if self.per_token:
                p = f.clamp_min(0) / f.clamp_min(0).sum(-1, keepdim=True).clamp_min(1e-12)
                self.ent.append(-(p * p.clamp_min(1e-30).log()).sum(-1))
                self.mx.append(f.max(-1).values)
                self.sse.append(err.float())
                self.tok.append(ids[s : s + 4096])

    def add_loss(self, test: TestSet, start: int, loss: Tensor, valid: Tensor) -> None:
        """The spliced CE of the contexts from `start` ([k, w-1], zero where not `valid`)."""
        k, w1 = loss.shape
        if not self.doc_loss:
            self.loss[start : start + k, :w1] = loss
            return
        doc = test.tokens.doc_index[start : start + k, None].expand(k, w1)
        self.loss.index_add_(0, doc[valid], loss[valid].double())

    def result(self, lm: LM, test: TestSet) -> SAEEval:
        if self.n == 0:
            raise EvalError(f"test set {test.name!r} has no tokens after position 0")
        ce_clean = metrics.mean_ce(test.clean, test.mask)
        if self.doc_loss:
            ce_spliced = float(self.loss.sum() / max(int(test.mask.sum()), 1))
        else:
            ce_spliced = metrics.mean_ce(self.loss, test.mask)
        ce_zero = metrics.mean_ce(test.zero[self.hook], test.mask)
        empty_f, empty_l = torch.zeros(0), torch.zeros(0, dtype=torch.long)
        return SAEEval(
            test=test.name,
            hook=self.hook,
            l0=self.l0_sum / self.n,
            mse=self.sse_sum / self.n,
            fvu=self.sse_sum / max(self.m2, 1e-30),
            ce_clean=ce_clean,
            ce_spliced=ce_spliced,
            ce_zero=ce_zero,
            ce_recovered=metrics.ce_loss_recovered(ce_clean, ce_spliced, ce_zero),
            ppl_clean=metrics.perplexity(ce_clean),
            ppl=metrics.perplexity(ce_spliced),
            loss=self.loss,
            feature_counts=self.counts,
            token_ids=torch.cat(self.tok) if self.tok else empty_l,
            sse=torch.cat(self.sse) if self.sse else empty_f,
            entropy=torch.cat(self.ent) if self.ent else empty_f,
            max_act=torch.cat(self.mx) if self.mx else empty_f,
        )


@torch.no_grad()
def evaluate_saes_on(
    lm: LM,
    saes: Sequence[tuple[Any, str]],
    test: TestSet,
    batch_size: int = 8,
    per_token: bool = True,
    doc_loss: bool = False,
) -> list[SAEEval]:
    """Score several (SAE, hook) pairs in one pass over the test set: per batch, one forward that
    captures every hook they need, then each SAE's reconstruction statistics and spliced CE from
    that batch's activations. Memory: one batch of activations plus each SAE's running sums and
    [N, T-1] spliced CE (and, with `per_token`, its [M] per-token statistics for the feature
    figures; without, those come back empty). With `doc_loss` the spliced CE comes back as
    per-document sums [n_docs] (`SAEEval.loss`; what the bootstrap CIs need, with `doc_counts`)
    instead of [N, T-1] per token: nothing per SAE then grows with the tokens of the test set
    except the optional per-token statistics."""
    hooks = [h for _, h in saes]
    need = _needed(hooks)
    missing = [h for h in hooks if h not in test.hooks]
    if missing:
        raise EvalError(
            f"test set {test.name!r} was not captured at {missing[0]}; captured: {sorted(test.hooks)}"
        )
    accs = [_Acc(sae, h, test, per_token, doc_loss) for sae, h in saes]
    for c in iter_captured(lm, test, need, batch_size):
        k, w = c.batch.input_ids.shape
        ids = c.batch.input_ids[c.pos]
        for a in accs:
            act = c.acts[a.hook]
            a.add_recon(act[c.pos.to(act.device)], ids)
            r = resid_hook_for(a.hook)
            out = spliced_losses(lm, a.hook, a.fn, c.batch.input_ids, c.batch.attention_mask, act,
                                 c.acts[r] if r else None)  # fmt: skip
            a.add_loss(test, c.start, out.loss.cpu(), out.mask.cpu())
        del c
    return [a.result(lm, test) for a in accs]


def evaluate_sae(
    lm: LM, sae: Any, hook: str, test: TestSet, batch_size: int = 8, per_token: bool = True
) -> SAEEval:
    """Score one SAE at `hook` on a prepared test set."""
    return evaluate_saes_on(lm, [(sae, hook)], test, batch_size, per_token)[0]


def evaluate_saes(lm: LM, saes: dict[str, Any], test: TestSet, batch_size: int = 8) -> dict[str, SAEEval]:
    """Every hook's SAE on `test` in one pass."""
    evs = evaluate_saes_on(lm, [(sae, h) for h, sae in saes.items()], test, batch_size)
    return dict(zip(saes, evs, strict=True))
