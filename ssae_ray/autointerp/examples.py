"""Examples for the Interpreter and the Predictor, from one streaming pass over a test set.

`ssae_ray.collect.scan_many` (re-exported here) runs the LM and the SAEs over the test contexts
once and keeps, per feature, bounded state: the top-K contexts, a uniform sample of activating
contexts, counts, and the sparse set of (context, feature) pairs that activate, to draw
non-activating contexts; the feature dashboard reads the same indexes. `feature_examples` then
recomputes token activations for the few contexts it shows and marks activating tokens
`<<like this>>`. Position 0 of every context is excluded (its norm is an outlier).
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ssae_ray.autointerp.score import FeatureExamples
from ssae_ray.collect import ActivationIndex, encode, feature_acts, scan, scan_many
from ssae_ray.models import LM, TokenBatch, iter_batches

__all__ = [  # the collector's names are re-exported: older code imports them from here
    "ActivationIndex", "diversity_pool", "encode", "escape_delimiters", "feature_acts", "feature_examples",
    "mark", "render", "scan", "scan_many", "select_features",
]  # fmt: skip

log = logging.getLogger("ssae_ray")


def _codes_isin(codes: Tensor, pairs: Tensor) -> Tensor:
    if pairs.numel() == 0:
        return torch.zeros_like(codes, dtype=torch.bool)
    idx = torch.searchsorted(pairs, codes).clamp(max=pairs.numel() - 1)
    return pairs[idx] == codes


def escape_delimiters(text: str) -> str:
    """Text from the corpus with no `<<` or `>>` of its own (`a << b` becomes `a < < b`), so the
    only delimiters a prompt shows are the marks around activating tokens."""
    return re.sub(r">(?=>)", "> ", re.sub(r"<(?=<)", "< ", text))


def mark(pieces: Sequence[str], active: Sequence[bool]) -> str:
    """Join text pieces, wrapping each run of consecutive active pieces in `<<` `>>` (whitespace at
    a run's edges stays outside the delimiters; a run of only whitespace is shown escaped, `<<\\n>>`).
    `<<` / `>>` in the text itself are escaped (`escape_delimiters`), and a `<` / `>` touching a mark
    is kept apart from it by a space, so the marks are never ambiguous."""
    out: list[str] = []
    i = 0
    while i < len(pieces):
        if not active[i]:
            text = escape_delimiters(pieces[i])
            if out and out[-1].endswith(">>") and text.startswith(">"):
                text = " " + text
            out.append(text)
            i += 1
            continue
        j = i
        while j < len(pieces) and active[j]:
            j += 1
        run = "".join(pieces[i:j])
        core = escape_delimiters(run.strip())
        if core:
            lead = run[: len(run) - len(run.lstrip())]
            trail = run[len(run.rstrip()) :]
            if not lead and out and out[-1].endswith("<"):
                lead = " "
            if core[0] in "<>" or core[-1] in "<>":
                core = f" {core} "
            out.append(f"{lead}<<{core}>>{trail}")
        else:  # a whitespace token activates: mark it visibly (escaped, so it survives one-lining)
            out.append(f"<<{run.encode('unicode_escape').decode()}>>")
        i = j
    return "".join(out)


def render(tokenizer: Any, ids: Sequence[int], active: Sequence[bool]) -> str:
    """Decode `ids` run by run (so multi-byte characters inside a run survive) and mark active runs."""
    pieces, flags = [], []
    i = 0
    while i < len(ids):
        j = i
        while j < len(ids) and active[j] == active[i]:
            j += 1
        pieces.append(tokenizer.decode(list(ids[i:j])))
        flags.append(bool(active[i]))
        i = j
    return mark(pieces, flags)


def _window(length: int, center: int, width: int) -> tuple[int, int]:
    start = max(0, center - (width - width // 4))
    end = min(length, start + width)
    return max(0, end - width), end


def feature_examples(
    lm: LM,
    sae: Any,
    hook: str,
    index: ActivationIndex,
    features: Sequence[int],
    n_top: int = 10,
    n_predict: int = 5,
    window: int = 32,
    threshold: float = 0.0,
    seed: int = 0,
    batch_size: int = 16,
    sample_sets: int = 0,
) -> list[FeatureExamples]:
    """Marked top examples and a shuffled, labelled Predictor set for each feature (seeded), plus
    `sample_sets` sets of up to `n_top` marked examples drawn uniformly from the activating contexts
    (for the diversity score of appendix N.6; the index needs `k_sample >= n_predict + sets * n_top`)."""
    d_sae = index.n_active_ctx.numel()
    n_contexts = index.contexts.input_ids.shape[0]
    plans: dict[int, tuple[list[int], list[int], list[int], list[int]]] = {}
    out: dict[int, FeatureExamples] = {}
    for f in features:
        count = int(index.n_active_ctx[f])
        if count < 2:
            status = "dead" if count == 0 else "too_few"
            out[f] = FeatureExamples(
                f, status, count, float(index.top_acts[f, 0].clamp(min=0)), [], [], [], [], [], []
            )
            continue
        rng = np.random.default_rng([seed, f])
        n_pos = min(n_predict, count - 1)
        n_int = min(n_top, count - n_pos)
        top = [int(c) for c in index.top_ctx[f, :n_int]]
        pos = [int(c) for c in index.sample_ctx[f] if c >= 0 and int(c) not in top][:n_pos]
        extra = diversity_pool(index, f, set(pos))[: sample_sets * n_top]
        neg: list[int] = []
        if n_contexts - count > 0:
            cand = rng.permutation(n_contexts)[: max(20 * n_predict, 200)]
            hit = _codes_isin(torch.as_tensor(cand, dtype=torch.long) * d_sae + f, index.pairs)
            neg = [int(c) for c, h in zip(cand, hit.tolist()) if not h][:n_predict]
        plans[f] = (top, pos, neg, extra)
    needed = sorted({c for plan in plans.values() for part in plan for c in part})
    acts = _recompute(lm, sae, hook, index.contexts, needed, sorted(plans), batch_size)
    col = {f: j for j, f in enumerate(sorted(plans))}
    tok = lm.tokenizer
    for f, (top, pos, neg, extra) in plans.items():
        rng = np.random.default_rng([seed, f, 1])

        a_f = {c: acts[c][:, col[f]] for c in (*top, *pos, *neg, *extra)}

        def window_of(
            c: int, marked: bool, center: int | None = None, a_f: dict[int, Tensor] = a_f
        ) -> tuple[str, list[str]]:
            return _window_text(tok, index.contexts, c, a_f[c], marked, window, threshold, center)

        top_texts, counter = [], Counter()
        for c in top:
            text, words = window_of(c, True)
            top_texts.append(text)
            counter.update(w for w in words if w)
        items = [(window_of(c, False)[0], 1) for c in pos]
        for c in neg:
            length = int(index.contexts.attention_mask[c].sum())
            items.append((window_of(c, False, int(rng.integers(0, max(1, length))))[0], 0))
        order = rng.permutation(len(items))
        marked_extra = [window_of(c, True)[0] for c in extra]
        sets = [marked_extra[i : i + n_top] for i in range(0, len(marked_extra), n_top)]
        out[f] = FeatureExamples(
            feature=f,
            status="ok",
            n_active_ctx=int(index.n_active_ctx[f]),
            max_act=float(index.top_acts[f, 0]),
            top_texts=top_texts,
            top_acts=[float(index.top_acts[f, i]) for i in range(len(top))],
            predict_texts=[items[i][0] for i in order],
            predict_labels=[items[i][1] for i in order],
            active_tokens=[w for w, _ in counter.most_common()],
            sample_sets=sets,
        )
    return [out[f] for f in features]


def diversity_pool(index: ActivationIndex, f: int, exclude: set[int] = frozenset()) -> list[int]:
    """Contexts for the diversity explanations of feature `f` (appendix N.6: "sampling uniformly from
    the top 50% examples that activate a feature"): the uniformly sampled activating contexts whose
    max activation is at least the median of the sample (an unbiased estimate of the median over all
    activating contexts), in sample order, minus `exclude`."""
    ctx = index.sample_ctx[f]
    valid = ctx >= 0
    if index.sample_acts is None or not bool(valid.any()):
        return [int(c) for c in ctx[valid] if int(c) not in exclude]
    acts = index.sample_acts[f]
    median = float(torch.quantile(acts[valid].double(), 0.5))
    return [
        int(c)
        for c, a, v in zip(ctx, acts, valid, strict=True)
        if v and float(a) >= median and int(c) not in exclude
    ]


def _window_text(
    tok: Any,
    contexts: TokenBatch,
    c: int,
    acts: Tensor,
    marked: bool,
    window: int,
    threshold: float,
    center: int | None = None,
) -> tuple[str, list[str]]:
    """A window of context `c` around `center` (default: its most activating token), marked or
    not, and the activating tokens in it."""
    length = int(contexts.attention_mask[c].sum())
    a = acts[:length]
    if center is None:
        center = int(a.argmax())
    s, e = _window(length, center, window)
    on = (a[s:e] > threshold).tolist()
    ids = contexts.input_ids[c, s:e].tolist()
    if not marked:
        return escape_delimiters(tok.decode(ids)), []
    return render(tok, ids, on), [tok.decode([t]).strip() for t, o in zip(ids, on) if o]


def _recompute(
    lm: LM, sae: Any, hook: str, contexts: TokenBatch, ctx: list[int], features: list[int], batch_size: int
) -> dict[int, Tensor]:
    """Token activations [T, len(features)] of the given contexts."""
    res: dict[int, Tensor] = {}
    if not ctx or not features:
        return res
    sel = torch.as_tensor(ctx)
    sub = TokenBatch(contexts.input_ids[sel], contexts.attention_mask[sel], contexts.doc_index[sel])
    fi = torch.as_tensor(features)
    i = 0
    for batch in iter_batches(sub, batch_size):
        f = feature_acts(lm, sae, hook, batch)[:, :, fi.to(next(sae.parameters()).device)].cpu()
        for row in f:
            res[ctx[i]] = row
            i += 1
    return res


def select_features(index: ActivationIndex, max_features: int, seed: int = 0) -> list[int]:
    """A seeded random sample of the features that activate in at least two contexts, sorted."""
    alive = (index.n_active_ctx >= 2).nonzero().flatten().numpy()
    if len(alive) <= max_features:
        return [int(f) for f in alive]
    rng = np.random.default_rng(seed)
    return sorted(int(f) for f in rng.choice(alive, size=max_features, replace=False))
