"""Programmatic judges: score (prompt, response) pairs without a trained reward model.

The default judge scores the shipped dataset's own task, friendly replies that finish in one to three
sentences (rlhf/data/default/README.md):

    score = sentiment                 vaderSentiment compound score, -1..1
          + 0.5 * topic               fraction of the prompt's content words the reply mentions, 0..1
          + 0.5 * finished            the reply ends a sentence (., ! or ?), not cut off mid-way
          + 0.5 * concise             one to three sentences and at least MIN_WORDS words

Sentiment alone is gameable ("Great! Love! Wonderful! piano forty" outscores a natural answer); the
form terms make a complete, short, natural reply the best one.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
from collections.abc import Callable
from pathlib import Path

from rlhf.config import JudgeConfig, ModelConfig, RewardConfig, mask_url

ScoreFn = Callable[[list[str], list[str]], list[float]]

_WORD = re.compile(r"[a-z']+")
_STOPWORDS = frozenset(
    "a an and are as at be but by can could do does for from have how i if in is it its me my of on or "
    "our should so some that the their them there they this to was we what when where which who why "
    "will with would you your about any just please tell give write help".split()
)
TOPIC_WEIGHT = 0.5
FINISHED_WEIGHT = 0.5
CONCISE_WEIGHT = 0.5
MAX_SENTENCES = 3
MIN_WORDS = 8
EMPTY_SCORE = -1.0
_FINISHED = re.compile(r"[.!?][\"')\]]*$")
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+")


def _content_words(text: str) -> set[str]:
    return {w for w in _WORD.findall(text.lower()) if len(w) > 2 and w not in _STOPWORDS}


def topic_overlap(prompt: str, response: str) -> float:
    """Fraction of the prompt's content words that appear in the response (0..1)."""
    wanted = _content_words(prompt)
    if not wanted:
        return 0.0
    return len(wanted & _content_words(response)) / len(wanted)


def finished(response: str) -> bool:
    """Whether the reply ends a sentence (., ! or ?, maybe followed by a closing quote or bracket)."""
    return bool(_FINISHED.search(response.strip()))


def sentence_count(response: str) -> int:
    """Sentences in the reply: pieces holding a letter, split after ., ! or ? and white space (a
    trailing unfinished piece counts as one)."""
    return sum(1 for piece in _SENTENCE_END.split(response.strip()) if re.search(r"[A-Za-z]", piece))


def concise(response: str) -> bool:
    """One to MAX_SENTENCES sentences and at least MIN_WORDS words."""
    return 1 <= sentence_count(response) <= MAX_SENTENCES and len(response.split()) >= MIN_WORDS


class DefaultJudge:
    """Friendly replies that finish in one to three sentences (the module docstring has the formula).
    Callable as ``judge(prompts, responses) -> scores``."""

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
            scores.append(sentiment + TOPIC_WEIGHT * topic_overlap(prompt, response)
                          + FINISHED_WEIGHT * finished(response) + CONCISE_WEIGHT * concise(response))
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


class RewardEndpointError(RuntimeError):
    """The reward endpoint failed or answered something that is not one finite score per response."""


class HTTPJudge:
    """A remote reward endpoint: POST ``{"prompts": [...], "responses": [...]}`` -> ``{"scores": [...]}``.

    Each try has a deadline for the whole request (a server that sends one byte a second cannot hold
    it longer), the reply is capped at ``max_reply_bytes``, and the scores must be a list of finite
    numbers, one per response. A 5xx, 429, timeout or lost connection is retried ``retries`` times with
    back-off (one transient error must not stop a PPO run); a 4xx or a malformed reply is not."""

    RETRY_STATUS = frozenset({429, 500, 502, 503, 504})

    def __init__(self, url: str, *, timeout_s: float = 60.0, retries: int = 3, max_reply_bytes: int = 16 * 2**20,
                 api_key: str | None = None, backoff_s: float = 0.5) -> None:
        self.url, self.shown = url, mask_url(url)  # credentials in the URL stay out of every message
        self.timeout_s, self.retries, self.max_reply_bytes, self.backoff_s = timeout_s, retries, max_reply_bytes, backoff_s
        self.headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {api_key}"} if api_key else {})}

    def __call__(self, prompts: list[str], responses: list[str]) -> list[float]:
        import time

        body = json.dumps({"prompts": prompts, "responses": responses}).encode()
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                return self._scores(self._post(body), len(responses))
            except _Transient as exc:
                failure = exc
        raise RewardEndpointError(f"reward endpoint {self.shown}: {failure} ({self.retries + 1} tries)")

    def _post(self, body: bytes) -> bytes:
        import time

        import httpx

        deadline = time.monotonic() + self.timeout_s
        try:
            with httpx.Client(timeout=self.timeout_s, follow_redirects=False) as client:
                with client.stream("POST", self.url, content=body, headers=self.headers) as reply:
                    chunks, size = [], 0
                    for chunk in reply.iter_bytes():
                        size += len(chunk)
                        if size > self.max_reply_bytes:
                            raise RewardEndpointError(f"reward endpoint {self.shown}: reply longer than "
                                                      f"{self.max_reply_bytes} bytes (url_max_reply_bytes)")
                        if time.monotonic() > deadline:
                            raise httpx.ReadTimeout("deadline")
                        chunks.append(chunk)
                    text = b"".join(chunks)
                    if reply.status_code in self.RETRY_STATUS:
                        raise _Transient(f"HTTP {reply.status_code}")
                    if reply.status_code != 200:
                        raise RewardEndpointError(f"reward endpoint {self.shown}: HTTP {reply.status_code}: "
                                                  f"{text[:200].decode(errors='replace')!r}")
                    return text
        except httpx.TimeoutException:
            raise _Transient(f"no complete reply within {self.timeout_s:g} s (url_timeout_s)") from None
        except httpx.TransportError as exc:
            raise _Transient(f"{type(exc).__name__}: {exc}") from None

    def _scores(self, text: bytes, expected: int) -> list[float]:
        try:
            scores = json.loads(text)["scores"]
        except (ValueError, TypeError, KeyError):
            raise RewardEndpointError(f'reward endpoint {self.shown}: expected JSON {{"scores": [...]}}, got '
                                      f"{text[:200].decode(errors='replace')!r}") from None
        if not isinstance(scores, list) or not all(
                isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s) for s in scores):
            raise RewardEndpointError(f"reward endpoint {self.shown}: 'scores' must be a list of finite numbers, "
                                      f"got {str(scores)[:200]!r}")
        if len(scores) != expected:
            raise RewardEndpointError(f"reward endpoint {self.shown} returned {len(scores)} scores for "
                                      f"{expected} responses")
        return [float(s) for s in scores]


class _Transient(Exception):
    """A failure worth another try."""


def make_judge(cfg: JudgeConfig, *, dtype: str = "float32") -> ScoreFn:
    """The scorer a JudgeConfig names, as ``(prompts, responses) -> scores``."""
    if cfg.kind == "default":
        return DefaultJudge()
    if cfg.kind == "function":
        return load_function(cfg.function)
    return RewardModelJudge(ModelConfig(path=cfg.path, dtype=dtype, device="auto"))


class RewardModelJudge:
    """Scores with a trained reward model (a scalar-head folder): the prompt rendered as in training,
    then the response and EOS. ``mean``/``std`` are the model's stored train-set statistics, if any."""

    def __init__(self, cfg: ModelConfig, batch_size: int = 16) -> None:
        from rlhf.models import load_scalar_model, load_tokenizer

        self.tokenizer = load_tokenizer(cfg.path, trust_remote_code=cfg.trust_remote_code)
        self.model = load_scalar_model(cfg).eval()
        self.batch_size = batch_size
        stats_file = Path(self.model.name_or_path) / "reward_stats.json"
        stats = json.loads(stats_file.read_text()) if stats_file.is_file() else {}
        self.mean, self.std = stats.get("mean"), stats.get("std")

    def __call__(self, prompts: list[str], responses: list[str]) -> list[float]:
        import torch

        from rlhf.data.tokenize import pad_batch, render_prompt
        from rlhf.models import sequence_scores

        device = next(self.model.parameters()).device
        scores: list[float] = []
        for start in range(0, len(prompts), self.batch_size):
            sequences = []
            for prompt, response in zip(prompts[start:start + self.batch_size], responses[start:start + self.batch_size]):
                text = render_prompt(self.tokenizer, [{"role": "user", "content": prompt}])
                ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
                ids += self.tokenizer(response, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]
                sequences.append(ids)
            input_ids, mask = pad_batch(sequences, self.tokenizer.pad_token_id)
            with torch.no_grad():
                scores += sequence_scores(self.model, input_ids.to(device), mask.to(device)).float().tolist()
        return scores




def make_reward_fn(cfg: RewardConfig, *, dtype: str = "float32") -> ScoreFn:
    """PPO's reward: a reward model, a Python function, an HTTP endpoint, or (none given) the default judge."""
    if cfg.path:
        return RewardModelJudge(ModelConfig(path=cfg.path, dtype=dtype, device="auto"))
    if cfg.function:
        return load_function(cfg.function)
    if cfg.url:
        return HTTPJudge(cfg.url, timeout_s=cfg.url_timeout_s, retries=cfg.url_retries,
                         max_reply_bytes=cfg.url_max_reply_bytes, api_key=cfg.url_api_key)
    return DefaultJudge()
