"""RULER's scoring (stdlib only, so peers' adapters can import it in their own environment).

RULER post-processes a prediction by stripping it and turning control characters into newlines, then:

- ``string_match_all`` (every task but QA): the fraction of the reference answers that occur in the
  prediction, case-insensitively; a sample with 4 values of which 3 are named scores 0.75.
- ``string_match_part`` (QA): 1 if any one of the acceptable answers occurs in the prediction, else 0.

Task scores are the mean over samples, times 100.
"""

from __future__ import annotations

import re

METRICS = ("string_match_all", "string_match_part")
_CONTROL = re.compile(r"[\x00-\x1f]")


def postprocess(prediction: str) -> str:
    """RULER's clean-up of a generated answer."""
    return _CONTROL.sub("\n", prediction.strip()).strip()


def string_match_all(prediction: str, answers: list[str]) -> float:
    """Fraction of ``answers`` contained in ``prediction`` (case-insensitive)."""
    if not answers:
        raise ValueError("answers must hold at least one reference string")
    pred = postprocess(prediction).lower()
    return sum(1.0 for a in answers if a.lower() in pred) / len(answers)


def string_match_part(prediction: str, answers: list[str]) -> float:
    """1.0 if any of ``answers`` is contained in ``prediction`` (case-insensitive), else 0.0."""
    if not answers:
        raise ValueError("answers must hold at least one reference string")
    pred = postprocess(prediction).lower()
    return max(1.0 if a.lower() in pred else 0.0 for a in answers)


def score(prediction: str, answers: list[str], metric: str) -> float:
    """Score one prediction with the named RULER metric (in [0, 1])."""
    if metric == "string_match_all":
        return string_match_all(prediction, answers)
    if metric == "string_match_part":
        return string_match_part(prediction, answers)
    raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
