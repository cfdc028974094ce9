"""The data layer: read records, normalise layouts, tokenise, split and cache. Pure Python/torch (no Ray).

Training stages call :func:`load_sft_data`, :func:`load_preference_data` or :func:`load_prompt_data`
with their :class:`rlhf.config.DataConfig`; the pieces below are public for tools and tests.
"""

from rlhf.data.cache import cached, source_fingerprint, tokenizer_fingerprint
from rlhf.data.datasets import eval_source, load_preference_data, load_prompt_data, load_sft_data
from rlhf.data.errors import DataError, SkipReport
from rlhf.data.formats import (
    PreferenceExample,
    PromptExample,
    SFTExample,
    to_preference_examples,
    to_prompt_examples,
    to_sft_examples,
)
from rlhf.data.readers import Record, read_records
from rlhf.data.split import phase_split, train_eval_split
from rlhf.data.tokenize import (
    IGNORE_INDEX,
    collate_preferences,
    collate_sft,
    pad_batch,
    render_prompt,
    tokenize_preferences,
    tokenize_prompts,
    tokenize_sft,
)

__all__ = [
    "IGNORE_INDEX",
    "DataError",
    "PreferenceExample",
    "PromptExample",
    "Record",
    "SFTExample",
    "SkipReport",
    "cached",
    "collate_preferences",
    "collate_sft",
    "eval_source",
    "load_preference_data",
    "load_prompt_data",
    "load_sft_data",
    "pad_batch",
    "phase_split",
    "read_records",
    "render_prompt",
    "source_fingerprint",
    "tokenize_preferences",
    "tokenize_prompts",
    "tokenize_sft",
    "tokenizer_fingerprint",
    "to_preference_examples",
    "to_prompt_examples",
    "to_sft_examples",
    "train_eval_split",
]
