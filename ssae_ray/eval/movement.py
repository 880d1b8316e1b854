"""How far finetuning moved an SSAE from its GSAE, and whether the random-corpus control "changes
the GSAE little".

An SSAE is a finetuned GSAE, so latent j of one is latent j of the other. `decoder_movement`
compares each decoder row with the same GSAE row (cosine; the median, the 1st percentile, the
rows below a threshold) and also counts the rows that have no GSAE row at all above the threshold
(a row that moved to another GSAE latent's direction is not new).

`control_check` states the criterion of a finetune that specialises rather than retrains: the
random-corpus finetune (the same distribution the GSAE was pretrained on) must leave the in-domain
CE at the GSAE's L0 within `max_ce_change` nats of the GSAE's and its median decoder-row cosine to
the GSAE at least `min_cosine`; and the dense SSAE should still beat it in-domain, with a CI that
excludes 0.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor


class Movement(NamedTuple):
    median_cos: float
    """Median over latents of cos(SSAE row j, GSAE row j)."""
    p01_cos: float
    """Its 1st percentile."""
    moved: int
    """Rows whose cosine to the same GSAE row is below the threshold."""
    unmatched: int
    """Rows with no GSAE row at all within the threshold."""
    n: int
    threshold: float

    @property
    def moved_share(self) -> float:
        return self.moved / max(self.n, 1)


@torch.no_grad()
def decoder_movement(w_ssae: Tensor, w_gsae: Tensor, threshold: float = 0.9, chunk: int = 1024) -> Movement:
    """Compare decoder rows [d_sae, d_in] of a finetuned SSAE with its GSAE's (see the module doc)."""
    if w_ssae.shape != w_gsae.shape:
        raise ValueError(
            f"decoder shapes differ ({tuple(w_ssae.shape)} vs {tuple(w_gsae.shape)}): decoder movement needs an "
            "SSAE finetuned from this GSAE (same width and d_in)"
        )
    a = torch.nn.functional.normalize(w_ssae.detach().double().cpu(), dim=1)
    b = torch.nn.functional.normalize(w_gsae.detach().double().cpu(), dim=1)
    same = (a * b).sum(1)
    best = torch.cat([(a[s : s + chunk] @ b.T).amax(1) for s in range(0, a.shape[0], chunk)])
    c = same.numpy()
    return Movement(
        median_cos=float(np.median(c)),
        p01_cos=float(np.quantile(c, 0.01)),
        moved=int((same < threshold).sum()),
        unmatched=int((best < threshold).sum()),
        n=int(a.shape[0]),
        threshold=float(threshold),
    )


def control_check(
    d_ce: Any | None,
    movement: Movement | None,
    max_ce_change: float,
    min_cosine: float,
    dense_vs_random: Any | None = None,
) -> dict[str, Any]:
    """The criterion for the random-corpus control (module doc). `d_ce`: CE(random at the GSAE's L0)
    - CE(GSAE) with a CI (`metrics.CI`); `dense_vs_random`: CE(dense) - CE(random) at matched L0
    with a CI. Missing inputs leave their part undecided (None) and are named in `note`."""
    out: dict[str, Any] = {"max_ce_change": max_ce_change, "min_cosine": min_cosine}
    notes = []
    if d_ce is not None and math.isfinite(d_ce.value):
        out.update(d_ce=d_ce.value, d_ce_lo=d_ce.lo, d_ce_hi=d_ce.hi, ce_ok=abs(d_ce.value) <= max_ce_change,
                   ce_equivalent=-max_ce_change <= d_ce.lo and d_ce.hi <= max_ce_change)  # fmt: skip
    else:
        out["ce_ok"] = None
        notes.append("no CE change at the GSAE's L0")
    if movement is not None:
        out.update(median_cos=movement.median_cos, moved_share=movement.moved_share,
                   cos_ok=movement.median_cos >= min_cosine)  # fmt: skip
    else:
        out["cos_ok"] = None
        notes.append("no decoder movement (no random-corpus SSAE of the GSAE's width)")
    if dense_vs_random is not None and math.isfinite(dense_vs_random.value):
        out.update(dense_minus_random=dense_vs_random.value, dense_lo=dense_vs_random.lo,
                   dense_hi=dense_vs_random.hi, dense_beats=dense_vs_random.hi < 0)  # fmt: skip
    else:
        out["dense_beats"] = None
        notes.append("no dense - random difference")
    parts = [out["ce_ok"], out["cos_ok"]]
    out["met"] = None if any(p is None for p in parts) else all(parts)
    if notes:
        out["note"] = "; ".join(notes)
    return out
