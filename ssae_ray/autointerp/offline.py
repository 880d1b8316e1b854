"""An offline backend for demos and CI, with no API calls: NOT the paper's method.

The explainer names the most frequent `<<marked>>` spans of its examples; the predictor labels
an example 1 when it contains one of those tokens; the diversity score is ten points per distinct
activating token (capped at 100). Every output carries `backend = "offline"` and the report and
plot titles say "offline keyword baseline", so its numbers are never mistaken for Claude's.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

LABEL = "offline keyword baseline (not Claude)"
PREFIX = "[offline keyword baseline]"


class OfflineScorer:
    backend = "offline"
    model = "offline-keywords"

    def __init__(self, n_keywords: int = 3):
        self.n_keywords = n_keywords

    async def explain(self, texts: Sequence[str], usage: object = None) -> str:
        spans = Counter(s.strip() for t in texts for s in re.findall(r"<<(.+?)>>", t))
        words = [w for w, _ in spans.most_common(self.n_keywords) if w]
        return f"{PREFIX} activates on the tokens " + ", ".join(f'"{w}"' for w in words)

    async def aggregate(self, explanations: Sequence[str], usage: object = None) -> str:
        keys = Counter(k for e in explanations for k in re.findall(r'"(.+?)"', e))
        return f"{PREFIX} activates on the tokens " + ", ".join(
            f'"{k}"' for k, _ in keys.most_common(self.n_keywords)
        )

    async def predict(self, explanation: str, texts: Sequence[str], usage: object = None) -> list[int]:
        keys = re.findall(r'"(.+?)"', explanation)
        return [int(any(_contains(t, k) for k in keys)) for t in texts]

    async def diversity(self, explanations: Sequence[str], usage: object = None) -> int:
        n = len({k for e in explanations for k in re.findall(r'"(.+?)"', e)})
        return max(1, min(100, 10 * n))

    async def close(self) -> None:
        pass


def _contains(text: str, key: str) -> bool:
    if key.isalnum():
        return re.search(rf"(?<![A-Za-z0-9]){re.escape(key)}(?![A-Za-z0-9])", text, re.IGNORECASE) is not None
    return key in text
