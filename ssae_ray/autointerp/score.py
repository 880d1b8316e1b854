"""Scoring one feature: Interpreter -> explanation, Predictor -> labels, F1, diversity.

With `sample_sets`, the Interpreter also explains sets of examples drawn uniformly from all the
feature's activating contexts; those explanations are unified (Box 8) and, with the top-example
explanation, scored for diversity (Box 9), as in appendix N.6.

`score_feature(job, scorer)` is plain async code shared by the Ray actors and the local runner.
A scorer is `ClaudeScorer` (prompts through `ClaudeClient`) or `offline.OfflineScorer`. A
malformed answer is re-asked `parse_retries` times (each re-ask is its own cache entry), then the
feature is recorded as `failed` with the last answer; nothing is ever guessed.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, NamedTuple

import anthropic

from ssae_ray.autointerp.client import Answer, ApiUnavailable, ClaudeClient, SpendCapReached
from ssae_ray.autointerp.prompts import (
    ParseError,
    Prompt,
    aggregate_prompt,
    diversity_prompt,
    interpreter_prompt,
    parse_aggregate,
    parse_diversity,
    parse_explanation,
    parse_predictions,
    predictor_prompt,
)

log = logging.getLogger("ssae_ray")


class FeatureExamples(NamedTuple):
    feature: int
    status: str
    """`ok`, `dead` (never activates on the test set) or `too_few` (one activating context)."""
    n_active_ctx: int
    max_act: float
    top_texts: list[str]
    """Top activating windows, activating tokens marked `<<...>>`, for the Interpreter."""
    top_acts: list[float]
    predict_texts: list[str]
    """Held-out activating and non-activating windows, unmarked, shuffled."""
    predict_labels: list[int]
    """1 where the window activates the feature."""
    active_tokens: list[str]
    """Activating tokens of the top windows, most frequent first."""
    sample_sets: list[list[str]] = []
    """Sets of marked windows sampled uniformly from all activating contexts (appendix N.6): each
    gets its own explanation; they are unified (Box 8) and scored for diversity (Box 9)."""


class Scores(NamedTuple):
    f1: float
    precision: float
    recall: float
    accuracy: float


def f1_score(predictions: Sequence[int], labels: Sequence[int]) -> Scores:
    """F1 of binary predictions against binary labels (the positive class is 'activates')."""
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels")
    tp = sum(1 for p, y in zip(predictions, labels) if p and y)
    fp = sum(1 for p, y in zip(predictions, labels) if p and not y)
    fn = sum(1 for p, y in zip(predictions, labels) if not p and y)
    correct = sum(1 for p, y in zip(predictions, labels) if bool(p) == bool(y))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return Scores(f1, precision, recall, correct / len(labels) if labels else 0.0)


class Job(NamedTuple):
    sae: str
    hook: str
    examples: FeatureExamples


class Usage:
    """Calls, cache hits and tokens of one feature."""

    def __init__(self) -> None:
        self.requests = self.cached = self.input_tokens = self.output_tokens = 0

    def add(self, a: Answer) -> None:
        self.requests += a.requests
        self.cached += int(a.cached)
        if not a.cached:
            self.input_tokens += a.input_tokens
            self.output_tokens += a.output_tokens


class Malformed(RuntimeError):
    def __init__(self, step: str, error: str, answer: str):
        super().__init__(f"{step}: {error}")
        self.answer = answer


class ClaudeScorer:
    """The paper's Interpreter / Predictor / diversity prompts through a `ClaudeClient`."""

    backend = "claude"

    def __init__(self, client: ClaudeClient, domain: str, max_tokens: int = 512, parse_retries: int = 2):
        self.client, self.domain, self.max_tokens, self.parse_retries = (
            client,
            domain,
            max_tokens,
            parse_retries,
        )
        self.model = client.model

    async def _ask(self, step: str, prompt: Prompt, parse: Any, usage: Usage) -> Any:
        err, text = "", ""
        for attempt in range(self.parse_retries + 1):
            answer = await self.client.complete(prompt, attempt)
            usage.add(answer)
            try:
                return parse(answer.text)
            except ParseError as e:
                err, text = str(e), answer.text
                log.info(
                    "%s answer malformed (attempt %d/%d): %s", step, attempt + 1, self.parse_retries + 1, e
                )
        raise Malformed(step, err, text)

    async def explain(self, texts: Sequence[str], usage: Usage) -> str:
        prompt = interpreter_prompt(texts, self.domain, self.max_tokens)
        return await self._ask("interpreter", prompt, parse_explanation, usage)

    async def predict(self, explanation: str, texts: Sequence[str], usage: Usage) -> list[int]:
        prompt = predictor_prompt(explanation, texts)
        return await self._ask("predictor", prompt, lambda t: parse_predictions(t, len(texts)), usage)

    async def aggregate(self, explanations: Sequence[str], usage: Usage) -> str:
        prompt = aggregate_prompt(explanations, self.domain, self.max_tokens)
        return await self._ask("aggregate", prompt, parse_aggregate, usage)

    async def diversity(self, explanations: Sequence[str], usage: Usage) -> int:
        prompt = diversity_prompt(explanations, self.domain, self.max_tokens)
        return await self._ask("diversity", prompt, parse_diversity, usage)

    async def close(self) -> None:
        await self.client.close()


def base_row(job: Job, backend: str, model: str) -> dict[str, Any]:
    ex = job.examples
    return {
        "sae": job.sae,
        "hook": job.hook,
        "feature": ex.feature,
        "backend": backend,
        "model": model,
        "status": ex.status,
        "n_active_ctx": ex.n_active_ctx,
        "max_act": ex.max_act,
        "explanation": None,
        "unified_explanation": None,
        "n_explanations": 0,
        "diversity": None,
        "f1": None,
        "precision": None,
        "recall": None,
        "accuracy": None,
        "predictions": None,
        "labels": list(ex.predict_labels),
        "top_examples": list(ex.top_texts),
        "predict_examples": list(ex.predict_texts),
        "error": None,
        "raw_answer": None,
        "requests": 0,
        "cached_calls": 0,
        "input_tokens": 0,
        "output_tokens": 0,
    }


async def score_feature(job: Job, scorer: Any, diversity: bool = True) -> dict[str, Any]:
    """Explain, predict, score one feature; a row for the results table (status `ok`, `failed`,
    `error`, `spend_cap`, `api_down`, or the examples' `dead` / `too_few`)."""
    row = base_row(job, scorer.backend, scorer.model)
    ex = job.examples
    if ex.status != "ok":
        return row
    usage = Usage()
    try:
        explanation = await scorer.explain(ex.top_texts, usage)
        row.update(explanation=explanation, n_explanations=1)
        preds = await scorer.predict(explanation, ex.predict_texts, usage)
        row["predictions"] = preds
        row.update(f1_score(preds, ex.predict_labels)._asdict())
        row["status"] = "ok"
        if diversity:
            try:
                explanations = [explanation]
                for texts in ex.sample_sets:
                    explanations.append(await scorer.explain(texts, usage))
                row["n_explanations"] = len(explanations)
                if len(explanations) > 1:
                    row["unified_explanation"] = await scorer.aggregate(explanations, usage)
                row["diversity"] = await scorer.diversity(explanations, usage)
            except Malformed as e:  # the F1 stands; only the diversity score is missing
                row.update(error=str(e), raw_answer=e.answer)
    except Malformed as e:
        row.update(status="failed", error=str(e), raw_answer=e.answer)
    except SpendCapReached as e:
        row.update(status="spend_cap", error=str(e))
    except ApiUnavailable as e:
        row.update(status="api_down", error=str(e))
    except (anthropic.APIStatusError, anthropic.APIConnectionError) as e:
        row.update(status="error", error=f"{type(e).__name__}: {getattr(e, 'status_code', '')} {e}"[:500])
    row.update(
        requests=usage.requests,
        cached_calls=usage.cached,
        input_tokens=usage.input_tokens,
        output_tokens=usage.output_tokens,
    )
    return row
