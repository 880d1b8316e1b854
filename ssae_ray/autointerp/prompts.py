"""The paper's prompts (appendix K, Boxes 4-7; appendix N.6, Boxes 8-9) and strict answer parsers.

Templates live in `prompts/*.txt` beside this file. A `Prompt` is what one Messages API call
sends: a system prompt and alternating user / assistant turns (the paper's worked examples as a
few-shot turn, then the real question). Parsers raise `ParseError` on anything they would have
to guess at; the caller re-asks and finally records the feature as failed.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Sequence
from functools import cache
from importlib import resources
from typing import NamedTuple


class ParseError(ValueError):
    """A model answer that does not have the format the prompt asked for."""


class Prompt(NamedTuple):
    system: str
    messages: tuple[tuple[str, str], ...]
    """(role, text) turns, starting and ending with a user turn."""
    max_tokens: int


@cache
def template(name: str) -> str:
    """The text of `prompts/<name>.txt`, trailing newline stripped."""
    path = resources.files("ssae_ray.autointerp") / "prompts" / f"{name}.txt"
    return path.read_text(encoding="utf-8").rstrip("\n")


def format_examples(texts: Sequence[str], start: int = 1) -> str:
    """`Example 1: ...` lines (the Interpreter counts from 1, the Predictor from 0, as in the paper)."""
    return "\n".join(f"Example {i}: {_one_line(t)}" for i, t in enumerate(texts, start))


def _one_line(text: str) -> str:
    return " ".join(text.split())


def interpreter_prompt(marked_examples: Sequence[str], domain: str, max_tokens: int = 512) -> Prompt:
    """Box 4 (system) with Box 5 as a worked example, then the feature's top examples."""
    user = template("interpreter_user").format(examples=format_examples(marked_examples, 1))
    return Prompt(
        system=template("interpreter_system").format(domain=domain),
        messages=(
            ("user", template("interpreter_example")),
            ("assistant", template("interpreter_example_answer")),
            ("user", user),
        ),
        max_tokens=max_tokens,
    )


def predictor_prompt(explanation: str, texts: Sequence[str], max_tokens: int = 64) -> Prompt:
    """Box 6 (system) with Box 7 as a worked example, then the explanation and unmarked examples."""
    user = template("predictor_user").format(
        explanation=_one_line(explanation), examples=format_examples(texts, 0)
    )
    return Prompt(
        system=template("predictor_system"),
        messages=(
            ("user", template("predictor_example")),
            ("assistant", template("predictor_example_answer")),
            ("user", user),
        ),
        max_tokens=max_tokens,
    )


def _numbered(explanations: Sequence[str]) -> str:
    return "\n".join(f"{i + 1}. {_one_line(e)}" for i, e in enumerate(explanations))


def aggregate_prompt(explanations: Sequence[str], domain: str, max_tokens: int = 512) -> Prompt:
    """Box 8: unify several explanations of one feature."""
    text = template("aggregate").format(domain=domain, explanations=_numbered(explanations))
    return Prompt(system="", messages=(("user", text),), max_tokens=max_tokens)


def diversity_prompt(explanations: Sequence[str], domain: str, max_tokens: int = 512) -> Prompt:
    """Box 9: a unified explanation and a 1-100 diversity score."""
    text = template("diversity").format(domain=domain, explanations=_numbered(explanations))
    return Prompt(system="", messages=(("user", text),), max_tokens=max_tokens)


# ---------------------------------------------------------------------------------------------
# Parsers

_EXPLANATION = re.compile(r"^\s*\**\[EXPLANATION\]\**\s*:\s*(.+?)\s*$", re.IGNORECASE)
_FENCE = re.compile(r"^```[a-zA-Z]*\s*\n?(.*?)\n?```$", re.DOTALL)
_SCORE = re.compile(
    r"^\s*\**Diversity Score\**\s*:\s*\**\s*\[?(\d{1,3})\]?\s*\**\s*$", re.IGNORECASE | re.MULTILINE
)


def parse_explanation(answer: str) -> str:
    """The text after `[EXPLANATION]:` on the answer's last non-empty line."""
    lines = [ln for ln in answer.strip().splitlines() if ln.strip()]
    if not lines:
        raise ParseError("empty Interpreter answer")
    m = _EXPLANATION.match(lines[-1])
    if not m:
        raise ParseError(
            f"the last line of the Interpreter answer is not '[EXPLANATION]: ...': {lines[-1]!r:.200}"
        )
    return m.group(1)


def parse_predictions(answer: str, n: int) -> list[int]:
    """A Python list of exactly `n` labels, each 0 or 1, and nothing else (one code fence allowed)."""
    text = answer.strip()
    fenced = _FENCE.match(text)
    if fenced:
        text = fenced.group(1).strip()
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError) as e:
        raise ParseError(f"the Predictor answer is not a Python list: {answer!r:.200}") from e
    if not isinstance(value, list):
        raise ParseError(f"the Predictor answer is not a Python list: {answer!r:.200}")
    if len(value) != n:
        raise ParseError(f"the Predictor answered {len(value)} labels for {n} examples: {answer!r:.200}")
    if any(type(v) is not int or v not in (0, 1) for v in value):
        raise ParseError(f"the Predictor's labels must each be 0 or 1: {answer!r:.200}")
    return list(value)


def parse_diversity(answer: str) -> int:
    """The integer on the `Diversity Score:` line (exactly one such line, 1-100)."""
    found = _SCORE.findall(answer)
    if len(found) != 1:
        raise ParseError(f"expected one 'Diversity Score: <1-100>' line, found {len(found)}: {answer!r:.200}")
    score = int(found[0])
    if not 1 <= score <= 100:
        raise ParseError(f"diversity score {score} is outside 1-100")
    return score


def parse_aggregate(answer: str) -> str:
    """The unified explanation (Box 8 asks for free text; only an empty answer is malformed)."""
    text = answer.strip()
    if text.lower().startswith("unified explanation:"):
        text = text[len("unified explanation:") :].strip()
    if not text:
        raise ParseError("empty aggregated explanation")
    return text
