"""Programmatic judges: score (prompt, response) pairs without a trained reward model.

The default judge rewards friendly, positive, on-topic replies: the vaderSentiment compound score
(-1..1) plus half the fraction of the prompt's content words that the reply mentions.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Callable
from pathlib import Path

ScoreFn = Callable[[list[str], list[str]], list[float]]

_WORD = re.compile(r"[a-z']+")
_STOPWORDS = frozenset(
    "a an and are as at be but by can could do does for from have how i if in is it its me my of on or "
    "our should so some that the their them there they this to was we what when where which who why "
    "will with would you your about any just please tell give write help".split()
)
TOPIC_WEIGHT = 0.5
EMPTY_SCORE = -1.0


def _content_words(text: str) -> set[str]:
    return {w for w in _WORD.findall(text.lower()) if len(w) > 2 and w not in _STOPWORDS}


def topic_overlap(prompt: str, response: str) -> float:
    """Fraction of the prompt's content words that appear in the response (0..1)."""
    wanted = _content_words(prompt)
    if not wanted:
        return 0.0
    return len(wanted & _content_words(response)) / len(wanted)


class DefaultJudge:
    """Friendly, positive, on-topic. Callable as ``judge(prompts, responses) -> scores``."""

    def __init__(self) -> None:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self._vader = SentimentIntensityAnalyzer()

    def __call__(self, prompts: list[str], responses: list[str]) -> list[float]:
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        scores = []
        for prompt, response in zip(prompts, responses):
            if not response.strip():
                scores.append(EMPTY_SCORE)
                continue
            sentiment = self._vader.polarity_scores(response)["compound"]
            scores.append(sentiment + TOPIC_WEIGHT * topic_overlap(prompt, response))
        return scores


def load_function(spec: str) -> ScoreFn:
    """Load ``FILE.py:NAME``: a function ``(prompts: list[str], responses: list[str]) -> list[float]``."""
    file, sep, name = spec.rpartition(":")
    if not sep or not file or not name:
        raise ValueError(f"reward function {spec!r}: expected FILE.py:NAME")
    path = Path(file)
    if not path.is_file():
        raise FileNotFoundError(f"reward function file {path} does not exist")
    module_spec = importlib.util.spec_from_file_location(f"rlhf_user_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    function = getattr(module, name, None)
    if not callable(function):
        raise ValueError(f"{path} has no function named {name!r}")
    return function
