"""`rlhf ppo`: PPO with a KL penalty against a reference model, on Ray actors.

Who holds what:

    RolloutGroup  (actors/rollout.py)    vLLM engines (or HF generate) that sample responses
    PolicyLearner (actors/policy.py)     DeepSpeed ranks training the policy (the PPO loss)
    CriticLearner (actors/critic.py)     DeepSpeed ranks training the value model (GAE only)
    ReferenceModel (actors/reference.py) the frozen initial policy, for the KL penalty; with model.lora
                                         (reference_from_policy) none: the policy learner answers with
                                         its adapter disabled
    RewardScorer  (actors/reward.py)     a reward model, a Python function, an HTTP endpoint or the judge

With ppo.ptx_coef > 0 the controller also draws one SFT micro-batch (ptx_data) per policy micro-batch,
in an order fixed by (seed, iteration), and the policy adds its LM loss (InstructGPT's PTX term).

One iteration is ``PPOTrainer.step``: generate -> reference logprobs, values and rewards in parallel
-> KL and advantages (pure torch, rlhf/algorithms) -> train critic and policy -> sync weights to the
engines -> log. The math lives in rlhf/algorithms; this file only moves tensors between actors.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from pathlib import Path

import torch

from rlhf.algorithms import (
    compute_advantages, kl_estimate, make_kl_controller, masked_mean, needs_critic, process_scores, shape_rewards, whiten,
)
from rlhf.config import ConfigError, PPOConfig, save_config
from rlhf.data.formats import last_user_text
from rlhf.data.split import epoch_permutation

log = logging.getLogger("rlhf.ppo")

STATE_FILE = "controller_state.json"
ADAPTER_DIR = "policy_adapter"  # a checkpoint's LoRA adapter, beside the merged policy/ folder


def check_config(cfg: PPOConfig) -> None:
    """What the typed config cannot check alone; fails before any actor starts."""
    algo = cfg.ppo
    samples = algo.rollout_batch_size * cfg.rollout.sampling.n
    for role, world in (("policy", cfg.policy_workers), ("critic", cfg.critic_workers)):
        per_step = algo.micro_batch_size * algo.grad_accum * world
        if samples % per_step:
            raise ConfigError(
                f"ppo.rollout_batch_size x rollout.sampling.n = {samples} samples must be a multiple of "
                f"ppo.micro_batch_size x ppo.grad_accum x {role}_workers = {per_step}"
            )
    if algo.advantage in ("grpo", "rloo") and cfg.rollout.sampling.n < 2:
        raise ConfigError(f"ppo.advantage {algo.advantage} compares samples of one prompt: set rollout.sampling.n >= 2")
    lora = cfg.model.lora is not None
    if cfg.reference_from_policy and not lora:
        raise ConfigError("reference_from_policy: true needs model.lora (the reference is the policy with its "
                          "adapter disabled); without LoRA the reference is a separate actor")
    if cfg.save_adapter_only and not lora:
        raise ConfigError("save_adapter_only: true needs model.lora (there is no adapter to save)")
    if cfg.critic is not None and cfg.critic.lora is not None:
        raise ConfigError("critic.lora: LoRA applies to the policy only; the critic trains all its weights")
    if algo.ptx_coef > 0 and cfg.ptx_data is None:
        raise ConfigError("ppo.ptx_coef > 0 needs ptx_data: SFT records (prompt/response) for the PTX loss")
    if cfg.ptx_data is not None and algo.ptx_coef == 0:
        raise ConfigError("ptx_data is set but ppo.ptx_coef is 0: set ppo.ptx_coef > 0 to use it, or drop ptx_data")


def reference_from_policy(cfg: PPOConfig) -> bool:
    """Whether the LoRA policy with its adapter disabled serves as the reference (no reference actor)."""
    return cfg.model.lora is not None if cfg.reference_from_policy is None else cfg.reference_from_policy


def batch_indices(iteration: int, n_items: int, batch_size: int, seed: int) -> list[int]:
    """The prompts of iteration ``iteration``: consecutive slices of a per-epoch permutation, so the
    order depends only on (seed, iteration) and a resumed run sees the same next batch."""
    per_epoch = max(1, n_items // batch_size)
    epoch, offset = divmod(iteration, per_epoch)
    return epoch_permutation(n_items, seed, epoch)[offset * batch_size:(offset + 1) * batch_size]


def ptx_micro_batches(iteration: int, *, rank: int, world: int, micro_batches: int, n_items: int,
                      batch_size: int, seed: int) -> list[list[int]]:
    """Rows of the PTX data for each of rank ``rank``'s ``micro_batches`` policy micro-batches at
    ``iteration``. Draw ``k`` of every rank is slot ``(iteration * micro_batches + k) * world + rank``
    of the same per-epoch-permutation stream as the prompts (:func:`batch_indices`), so ranks never
    share a draw, every item is seen once per epoch, and a resumed run draws what the full run would."""
    return [batch_indices((iteration * micro_batches + k) * world + rank, n_items, batch_size, seed)
            for k in range(micro_batches)]


def make_experience(batch: dict[str, torch.Tensor], *, ref_logprobs: torch.Tensor, values: torch.Tensor | None,
                    scores: torch.Tensor, ended_with_eos: torch.Tensor, group_ids: torch.Tensor,
                    cfg: PPOConfig, kl_coef: float, reward_stats: tuple) -> tuple[dict[str, torch.Tensor], dict]:
    """Rollout tensors + model outputs -> the experience the learners train on, and its metrics.

    batch: input_ids, attention_mask (B, T); action_mask, logprobs (B, T-1). ref_logprobs and values
    (B, T-1); scores, ended_with_eos, group_ids (B,).
    """
    algo = cfg.ppo
    mask = batch["action_mask"]
    kl = kl_estimate(batch["logprobs"], ref_logprobs, algo.kl.estimator, mask)
    lengths = mask.sum(-1)
    processed = process_scores(scores, cfg.reward, response_lengths=lengths, ended_with_eos=ended_with_eos,
                               mean=reward_stats[0], std=reward_stats[1])
    token_rewards = shape_rewards(processed, kl, mask, kl_coef, kl_in_reward=algo.kl.mode == "reward")
    advantages, returns = compute_advantages(
        algo.advantage, token_rewards=token_rewards, values=values, scores=processed, group_ids=group_ids,
        action_mask=mask, gamma=algo.gamma, lam=algo.lam,
    )
    if algo.whiten_advantages and algo.advantage == "gae":
        advantages = whiten(advantages, mask)
    experience = {**batch, "advantages": advantages, "ref_logprobs": ref_logprobs}
    if values is not None:
        experience.update(values=values, returns=returns)
    metrics = {
        "reward/mean": scores.mean().item(),
        "reward/std": scores.std().item() if len(scores) > 1 else 0.0,
        "reward/processed_mean": processed.mean().item(),
        "kl/mean": (kl * mask).sum(-1).mean().item(),
        "kl/coef": kl_coef,
        "response/length": lengths.float().mean().item(),
        "response/ended_with_eos": ended_with_eos.float().mean().item(),
        "advantages/mean": masked_mean(advantages, mask).item(),
    }
    return experience, metrics


def shard(experience: dict[str, torch.Tensor], world: int) -> list[dict[str, torch.Tensor]]:
    """Split rows evenly across ``world`` ranks."""
    return [{k: v.chunk(world)[rank] for k, v in experience.items()} for rank in range(world)]


class PPOTrainer:
    """Owns the actors of one PPO run and drives its iterations."""

    def __init__(self, cfg: PPOConfig) -> None:
        import ray

        from actors.critic import CriticLearner
        from actors.group import LearnerGroup
        from actors.policy import PolicyLearner
        from actors.reference import ReferenceModel
        from actors.reward import RewardScorer
        from actors.rollout import RolloutGroup
        from cluster.placement import place_actors
        from cluster.runtime import init_ray
        from rlhf.data import load_prompt_data
        from rlhf.models import load_tokenizer, resolve_model_path

        check_config(cfg)
        started = time.perf_counter()
        self.cfg = cfg
        self.output_dir = Path(cfg.output_dir)
        start_from = Path(cfg.resume_from) if cfg.resume_from else None
        if start_from and not (start_from / STATE_FILE).is_file():
            raise ConfigError(f"resume_from {start_from}: not a PPO checkpoint (no {STATE_FILE})")
        base_path = resolve_model_path(cfg.model.path)
        policy_path = str(start_from / "policy") if start_from else base_path
        # With LoRA the learner always loads the base (its adapter disabled is the reference) plus
        # the checkpoint's adapter; the engines load the checkpoint's merged weights.
        self.lora = cfg.model.lora is not None
        learner_path = base_path if self.lora else policy_path
        adapter_path = str(check_resume_adapter(start_from, cfg)) if self.lora and start_from else None
        critic_source = cfg.critic.path if cfg.critic else (cfg.reward.path or cfg.model.path)
        critic_path = str(start_from / "critic") if start_from and (start_from / "critic").is_dir() \
            else resolve_model_path(critic_source)

        self.tokenizer = load_tokenizer(base_path, trust_remote_code=cfg.model.trust_remote_code)
        self.prompts, self.eval_prompts = load_prompt_data(cfg.data, self.tokenizer, seed=cfg.seed, phase=2)
        if len(self.prompts) < cfg.ppo.rollout_batch_size:
            raise ConfigError(f"{len(self.prompts)} prompts cannot fill ppo.rollout_batch_size={cfg.ppo.rollout_batch_size}")
        self.ptx_items = load_ptx_data(cfg, self.tokenizer)
        self.sampling = cfg.rollout.sampling
        self.use_critic = needs_critic(cfg.ppo.advantage)
        self.reference_from_policy = reference_from_policy(cfg)

        init_ray(cfg.ray)
        log.info("ppo: Ray ready in %.1f s", time.perf_counter() - started)
        # One placement group per role, planned against the cluster's nodes first (cfg.placement:
        # per-role bundles and node resources; colocated roles share bundles): a cluster too small
        # fails here, naming the role, before any actor starts.
        self.placement = place_actors(cfg.placement, {
            "policy": cfg.policy_workers, "critic": cfg.critic_workers if self.use_critic else 0,
            "reference": 0 if self.reference_from_policy else 1, "reward": 1, "rollout": cfg.rollout.engines,
        }, timeout_s=cfg.ray.resource_timeout_s)
        rollout_group, _, engine_cpus, engine_gpus = self.placement.group_of("rollout")
        self.engines = RolloutGroup(
            cfg.model.model_copy(update={"path": policy_path}), cfg.rollout, cpus_per_engine=engine_cpus,
            gpus_per_engine=engine_gpus, placement_group=rollout_group, seed=cfg.seed,
        )
        log.info("ppo: %d rollout engine(s) ready in %.1f s", len(self.engines), time.perf_counter() - started)
        group, indices, cpus, gpus = self.placement.group_of("policy")
        self.policy = LearnerGroup(PolicyLearner, cfg.policy_workers, placement_group=group,
                                   bundle_indices=indices, num_cpus=cpus, num_gpus=gpus, name="policy")
        setups = self.policy.call("setup", cfg.model, learner_path, cfg.ppo, cfg.deepspeed,
                                  self.sampling.temperature or 1.0, cfg.seed, adapter_path)
        self.critic = None
        if self.use_critic:
            group, indices, cpus, gpus = self.placement.group_of("critic")
            self.critic = LearnerGroup(CriticLearner, cfg.critic_workers, placement_group=group,
                                       bundle_indices=indices, num_cpus=cpus, num_gpus=gpus, name="critic")
            setups += self.critic.call("setup", cfg.critic or cfg.model, critic_path, cfg.ppo, cfg.deepspeed, cfg.seed)

        self.reference = None  # with reference_from_policy the policy learners answer for it
        if not self.reference_from_policy:
            self.reference = ray.remote(ReferenceModel).options(
                **self.placement.slots["reference"][0].options()).remote(cfg.model, base_path)
        self.reward = ray.remote(RewardScorer).options(**self.placement.slots["reward"][0].options()).remote(
            cfg.reward, cfg.model.dtype)
        ray.get(setups)
        log.info("ppo: learners ready in %.1f s", time.perf_counter() - started)
        if cfg.rollout.weight_sync == "broadcast":
            rank0 = self.policy.actors[0]
            host, port, world = ray.get(rank0.open_weight_broadcast.remote(len(self.engines)))
            ray.get(self.engines.join_weight_group(host, port, world) + [rank0.connect_weight_broadcast.remote()])
        self.reward_stats = ray.get(self.reward.stats.remote())
        log.info("ppo: all actors ready in %.1f s", time.perf_counter() - started)

        self.kl_controller = make_kl_controller(cfg.ppo.kl)
        self.iteration = 0
        if start_from:
            state = json.loads((start_from / STATE_FILE).read_text())
            self.iteration = state["iteration"]
            self.kl_controller.load_state_dict(state["kl_controller"])

    # ----------------------------------------------------------------------------------------------

    def step(self) -> dict[str, float]:
        """One PPO iteration; returns its metrics."""
        import ray

        from actors.rollout import samples_to_batch

        cfg, algo, n = self.cfg, self.cfg.ppo, self.sampling.n
        timings: dict[str, float] = {}
        step_start = time.perf_counter()

        # 1. Generate: rollout_batch_size prompts x n samples, seeded by iteration.
        chosen = batch_indices(self.iteration, len(self.prompts), algo.rollout_batch_size, cfg.seed)
        prompts = [self.prompts[i] for i in chosen]
        sampling = self.sampling.model_copy(update={"seed": cfg.seed * 100_003 + self.iteration * 1_009})
        started = time.perf_counter()
        samples = self.engines.generate([p["prompt_ids"] for p in prompts], sampling)
        timings["timing/generation"] = time.perf_counter() - started

        # 2. Reference logprobs, values and rewards, in parallel.
        started = time.perf_counter()
        batch = samples_to_batch(samples, self.tokenizer.pad_token_id)
        rollout = {k: batch[k] for k in ("input_ids", "attention_mask")}
        temperature = self.sampling.temperature or 1.0
        if self.reference is not None:
            ref_refs = [self.reference.logprobs.remote(rollout, temperature)]
        else:
            ref_refs = self.policy.call_sharded("reference_logprobs", shard(rollout, len(self.policy.actors)),
                                                temperature)
        value_refs = (self.critic.call_sharded("values", shard(rollout, len(self.critic.actors)))
                      if self.critic else [])
        texts = [s.text for s in samples]
        prompt_texts = [last_user_text(p["messages"]) for p in prompts for _ in range(n)]
        score_ref = self.reward.scores.remote(prompt_texts, texts)
        ref_logprobs = torch.cat(ray.get(ref_refs))
        values = torch.cat(ray.get(value_refs)) if value_refs else None
        scores = torch.tensor(ray.get(score_ref), dtype=torch.float32)

        # 3. KL, rewards and advantages: pure torch.
        ended = torch.tensor([s.finish_reason == "stop" for s in samples])
        group_ids = torch.arange(len(prompts)).repeat_interleave(n)
        experience, metrics = make_experience(
            batch, ref_logprobs=ref_logprobs, values=values, scores=scores, ended_with_eos=ended,
            group_ids=group_ids, cfg=cfg, kl_coef=self.kl_controller.value, reward_stats=self.reward_stats,
        )
        timings["timing/make_experience"] = time.perf_counter() - started

        # 4. Train critic and policy (in parallel: different actors).
        started = time.perf_counter()
        policy_keys = ["input_ids", "attention_mask", "action_mask", "logprobs", "advantages", "ref_logprobs"]
        world = len(self.policy.actors)
        policy_shards = shard({k: experience[k] for k in policy_keys}, world)
        ptx = self.ptx_batches(len(samples) // world, world)
        policy_refs = [actor.train.remote(part, self.kl_controller.value, self.iteration, ptx[rank])
                       for rank, (actor, part) in enumerate(zip(self.policy.actors, policy_shards))]
        critic_refs = []
        if self.critic:
            critic_keys = ["input_ids", "attention_mask", "action_mask", "values", "returns"]
            critic_refs = self.critic.call_sharded(
                "train", shard({k: experience[k] for k in critic_keys}, len(self.critic.actors)), self.iteration,
            )
        policy_stats = ray.get(policy_refs)[0]
        critic_stats = ray.get(critic_refs)[0] if critic_refs else {}
        timings["timing/train"] = time.perf_counter() - started

        # 5. Weight sync: the engines sample from the updated policy next iteration.
        started = time.perf_counter()
        self.sync_weights()
        timings["timing/weight_sync"] = time.perf_counter() - started

        # 6. KL controller and metrics.
        self.kl_controller.update(metrics["kl/mean"], len(samples))
        self.iteration += 1
        timings["timing/step"] = time.perf_counter() - step_start
        generated = int(batch["action_mask"].sum())
        return {**metrics, **policy_stats, **critic_stats, **timings,
                "throughput/tokens_per_s": generated / timings["timing/step"]}

    def ptx_batches(self, rows_per_rank: int, world: int) -> list[list[dict[str, torch.Tensor]] | None]:
        """Per rank, one collated PTX micro-batch per policy micro-batch of this iteration (None
        without PTX). The learner's schedule has ``epochs x ceil(rows / micro_batch_size)``
        micro-batches; it checks the count."""
        from rlhf.data.tokenize import collate_sft

        if not self.ptx_items:
            return [None] * world
        algo = self.cfg.ppo
        count = algo.epochs * math.ceil(rows_per_rank / algo.micro_batch_size)
        return [[collate_sft([self.ptx_items[i] for i in rows], self.tokenizer.pad_token_id)
                 for rows in ptx_micro_batches(self.iteration, rank=rank, world=world, micro_batches=count,
                                               n_items=len(self.ptx_items), batch_size=algo.micro_batch_size,
                                               seed=self.cfg.seed)]
                for rank in range(world)]

    def sync_weights(self) -> None:
        """Policy rank 0's full weights to every engine: through the object store (the engines read
        rank 0's return value directly), or streamed over a broadcast group."""
        import ray

        if self.cfg.rollout.weight_sync == "broadcast":
            pending = self.engines.receive_weights()
            ray.get(self.policy.call("broadcast_weights") + pending)
            return
        refs = self.policy.call("packed_weights")  # every rank joins (ZeRO-3 gathers)
        self.engines.update_weights(refs[0])
        ray.get(refs[1:])

    # ----------------------------------------------------------------------------------------------

    def save_checkpoint(self, folder: Path) -> Path:
        """Policy (and critic) Hugging Face folders plus the controller state, written atomically."""
        import ray

        staging = folder.with_name(folder.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        refs = self.policy.call("save_pretrained", str(staging / "policy"),
                                str(staging / ADAPTER_DIR) if self.lora else None)
        if self.critic:
            refs += self.critic.call("save_pretrained", str(staging / "critic"))
        ray.get(refs)
        (staging / STATE_FILE).write_text(json.dumps({
            "iteration": self.iteration, "seed": self.cfg.seed, "kl_controller": self.kl_controller.state_dict(),
        }, indent=2))
        shutil.rmtree(folder, ignore_errors=True)
        staging.rename(folder)
        return folder

    def prune_checkpoints(self) -> None:
        folders = sorted((self.output_dir / "checkpoints").glob("step_*[0-9]"))
        for old in folders[: -self.cfg.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)

    def shutdown(self) -> None:
        import ray

        self.engines.shutdown()
        self.policy.shutdown()
        if self.critic:
            self.critic.shutdown()
        for actor in (self.reference, self.reward):
            if actor is not None:
                ray.kill(actor)
        self.placement.remove()


def copy_folder(source: Path, target: Path) -> Path:
    """Copy a folder under a staging name, then rename: ``target`` is never half written."""
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(source, staging)
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return target


def load_ptx_data(cfg: PPOConfig, tokenizer) -> list[dict]:
    """Tokenised SFT items (input_ids, labels on response tokens) for the PTX loss; [] without it."""
    from rlhf.data import load_sft_data

    if cfg.ptx_data is None:
        return []
    items, _ = load_sft_data(cfg.ptx_data, tokenizer, seed=cfg.seed, phase=0)
    if len(items) < cfg.ppo.micro_batch_size:
        raise ConfigError(f"ptx_data {cfg.ptx_data.train_path}: {len(items)} SFT examples cannot fill one PTX "
                          f"micro-batch of ppo.micro_batch_size={cfg.ppo.micro_batch_size}")
    return items


def check_resume_adapter(checkpoint: Path, cfg: PPOConfig) -> Path:
    """The LoRA adapter of a PPO checkpoint, checked against model.lora (the adapter resumes as saved)."""
    adapter = checkpoint / ADAPTER_DIR
    config_file = adapter / "adapter_config.json"
    if not config_file.is_file():
        raise ConfigError(f"resume_from {checkpoint}: model.lora is set but the checkpoint has no LoRA adapter "
                          f"({config_file} missing): it was saved without LoRA")
    saved = json.loads(config_file.read_text())
    lora = cfg.model.lora
    pairs = {"r": (lora.r, saved.get("r")), "alpha": (lora.alpha, saved.get("lora_alpha")),
             "target_modules": (sorted(lora.target_modules), sorted(saved.get("target_modules") or []))}
    differ = [f"{key}: config {ours}, checkpoint {theirs}" for key, (ours, theirs) in pairs.items() if ours != theirs]
    if differ:
        raise ConfigError(f"resume_from {checkpoint}: model.lora differs from the checkpoint's adapter: {'; '.join(differ)}")
    return adapter


def run(cfg: PPOConfig) -> Path:
    from tqdm import tqdm

    from rlhf.metrics import MetricsLogger

    out = Path(cfg.output_dir)
    save_config(cfg, out)
    trainer = PPOTrainer(cfg)
    logger = MetricsLogger(out, append=trainer.iteration > 0)
    try:
        with tqdm(total=cfg.steps, initial=trainer.iteration, desc="ppo", unit="step") as bar:
            while trainer.iteration < cfg.steps:
                metrics = trainer.step()
                logger.log(trainer.iteration, metrics)
                bar.set_postfix(reward=f"{metrics['reward/mean']:.3f}", kl=f"{metrics['kl/mean']:.3f}")
                bar.update(1)
                if cfg.save_every and trainer.iteration % cfg.save_every == 0 and trainer.iteration < cfg.steps:
                    trainer.save_checkpoint(out / "checkpoints" / f"step_{trainer.iteration:06d}")
                    trainer.prune_checkpoints()
                if cfg.reward_threshold is not None and metrics["reward/mean"] >= cfg.reward_threshold:
                    log.info("ppo: reward/mean %.3f reached reward_threshold %.3f at step %d; stopping",
                             metrics["reward/mean"], cfg.reward_threshold, trainer.iteration)
                    break
        final = trainer.save_checkpoint(out / "checkpoints" / f"step_{trainer.iteration:06d}")
        trainer.prune_checkpoints()
        # final/: merged weights (a plain transformers folder), or the adapter alone with
        # save_adapter_only; with LoRA adapter/ holds the adapter either way (as in rlhf sft).
        if cfg.model.lora is not None:
            copy_folder(final / ADAPTER_DIR, out / "adapter")
        return copy_folder(final / (ADAPTER_DIR if cfg.save_adapter_only else "policy"), out / "final")
    finally:
        logger.close()
        trainer.shutdown()
