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

Learning curves: with eval_every, ``run`` has the engines answer the held-out prompts before the first
iteration, every eval_every iterations and after the last (``PPOTrainer.evaluate``: the same sampling
seed each time, scored by the judge), and redraws learning_curves.png (rlhf/plots.py) beside metrics.jsonl.

One iteration is ``PPOTrainer.step``: generate -> reference logprobs, values and rewards -> KL and
advantages (pure torch, rlhf/algorithms) -> train critic and policy -> sync weights to the engines ->
log. The math lives in rlhf/algorithms; this file only moves tensors between actors. The actors of a
phase work at the same time, or, on one CPU node, take turns with all its cores each
(``actors_take_turns``; ``in_turns_or_together``).

Faults: an inference actor (rollout engine, reward, reference) that dies is restarted on its own
bundle and the iteration's experience is made again (``PPOTrainer.surviving``); a batch holding NaN or
infinity is skipped (``all_finite``); a dead learner rank stops the run (``LearnerLostError``), and
``resume_from`` the last checkpoint continues it. Checkpoints are written under a staging name and
renamed (``write_checkpoint``), so a kill mid-write leaves the previous one intact.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch

from rlhf.algorithms import (
    ADVANTAGES, compute_advantages, kl_estimate, make_kl_controller, masked_mean, needs_critic, process_scores,
    shape_rewards, uniform_groups, whiten,
)
from rlhf.config import ConfigError, PPOConfig
from rlhf.data.formats import last_user_text
from rlhf.data.split import epoch_permutation
from rlhf.optimizer_state import group_layout
from rlhf.outputs import Interrupted, StageOutput, continue_hint
from rlhf.paths import remove_ours, replace_dir, write_atomic

log = logging.getLogger("rlhf.ppo")

STATE_FILE = "controller_state.json"
ADAPTER_DIR = "policy_adapter"  # a checkpoint's LoRA adapter, beside the merged policy/ folder
OPTIMIZER_SUFFIX = "_optimizer"  # a checkpoint's <role>_optimizer/: each rank's optimiser state (safetensors)
INFERENCE_ROLES = ("rollout", "reference", "reward")  # restarted when they die; learners are not


class PPOStopped(RuntimeError):
    """The run stopped on a fault it does not ride out (an actor that keeps dying, non-finite batches
    in a row); the message says what happened and where to resume from."""


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

    The KL coefficient always counts: with ``kl.mode: reward`` the per-token penalty is in
    ``token_rewards`` (gae, reinforce++) and, summed over the response, in the one score per response
    that the outcome estimators (grpo, rloo, ...) see; with ``kl.mode: loss`` the policy's loss carries it.
    """
    algo = cfg.ppo
    mask = batch["action_mask"]
    kl = kl_estimate(batch["logprobs"], ref_logprobs, algo.kl.estimator, mask)
    lengths = mask.sum(-1)
    processed = process_scores(scores, cfg.reward, response_lengths=lengths, ended_with_eos=ended_with_eos,
                               mean=reward_stats[0], std=reward_stats[1],
                               max_length=cfg.rollout.sampling.max_new_tokens)
    token_rewards = shape_rewards(processed, kl, mask, kl_coef, kl_in_reward=algo.kl.mode == "reward")
    # Outcome estimators see one score per response: the summed token rewards, so that the KL penalty
    # is part of it (as in OpenRLHF's RLOO). Without the penalty in the rewards this is ``processed``.
    advantages, returns = compute_advantages(
        algo.advantage, token_rewards=token_rewards, values=values, scores=token_rewards.sum(-1),
        group_ids=group_ids, action_mask=mask, gamma=algo.gamma, lam=algo.lam,
    )
    if algo.whiten_advantages and ADVANTAGES.info(algo.advantage)["whiten_option"]:
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


def nonfinite_fields(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of the float tensors holding NaN or infinity (an empty list when all are finite)."""
    return [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]


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
        from cluster.runtime import init_ray, wait_for_actors
        from rlhf.data import load_prompt_data
        from rlhf.judge import make_judge
        from rlhf.models import load_tokenizer, resolve_model_path

        cfg.check()  # a config built in code has not been through load_config
        started = time.perf_counter()
        self.cfg = cfg
        self.output_dir = Path(cfg.output_dir)
        start_from = Path(cfg.resume_from) if cfg.resume_from else None
        if start_from and not (start_from / STATE_FILE).is_file():
            raise ConfigError(f"resume_from {start_from}: not a PPO checkpoint (no {STATE_FILE})")
        saved_state = json.loads((start_from / STATE_FILE).read_text()) if start_from else None
        resume_optimizers = bool(saved_state) and check_resume_optimizers(start_from, saved_state, cfg)
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
        self.prompts, held_out = load_prompt_data(cfg.data, self.tokenizer, seed=cfg.seed, phase=2)
        if len(self.prompts) < cfg.ppo.rollout_batch_size:
            raise ConfigError(f"{len(self.prompts)} prompts cannot fill ppo.rollout_batch_size={cfg.ppo.rollout_batch_size}")
        # The held-out evaluation (eval_every): its prompts, and the judge that scores the replies.
        self.eval_prompts = held_out[: cfg.eval_prompts] if cfg.eval_every else []
        if cfg.eval_every and not held_out:
            log.warning("ppo: no held-out prompts (set data.eval_path or data.eval_fraction > 0): "
                        "no held-out evaluation (eval_every)")
        self.judge = make_judge(cfg.judge, dtype=cfg.model.dtype) if self.eval_prompts else None
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
        # On one CPU node the model-running actors take turns, each with all its cores (see train()).
        shared_node = self.placement.shared_cpu_node()
        self.take_turns = shared_node is not None if cfg.actors_take_turns is None else cfg.actors_take_turns
        threads = {"threads": cfg.actor_threads, "take_turns": self.take_turns}
        rollout_group, _, engine_cpus, engine_gpus = self.placement.group_of("rollout")
        rollout_cfg = cfg.rollout
        if self.take_turns and shared_node and rollout_cfg.threads_per_engine is None:
            # Generation has the node to itself too: the engines split its cores, not their small bundles.
            cores = int(shared_node.resources.get("CPU", 1))
            rollout_cfg = rollout_cfg.model_copy(update={"threads_per_engine": max(1, cores // rollout_cfg.engines)})
        self.engines = RolloutGroup(
            cfg.model.model_copy(update={"path": policy_path}), rollout_cfg, cpus_per_engine=engine_cpus,
            gpus_per_engine=engine_gpus, placement_group=rollout_group, seed=cfg.seed,
            start_timeout_s=cfg.ray.actor_start_timeout_s,
            # Prompts are left-truncated to max_prompt_length: no sequence is longer than this, and a
            # context of the model's full length (8192 for SmolLM2) needs a KV cache that size at start.
            max_model_len=cfg.data.max_prompt_length + self.sampling.max_new_tokens,
        )
        log.info("ppo: %d rollout engine(s) ready in %.1f s", len(self.engines), time.perf_counter() - started)
        group, indices, cpus, gpus = self.placement.group_of("policy")
        self.policy = LearnerGroup(PolicyLearner, cfg.policy_workers, placement_group=group,
                                   bundle_indices=indices, num_cpus=cpus, num_gpus=gpus, name="policy",
                                   start_timeout_s=cfg.ray.actor_start_timeout_s, **threads)
        # seq_mean_token_sum_norm divides by a constant: the longest a response can be, unless set.
        algo = cfg.ppo.model_copy(update={"loss_agg_length": cfg.ppo.loss_agg_length or self.sampling.max_new_tokens})
        setups = self.policy.call("setup", cfg.model, learner_path, algo, cfg.deepspeed,
                                  self.sampling.temperature or 1.0, cfg.seed, adapter_path, cfg.plugins)
        self.critic = None
        if self.use_critic:
            group, indices, cpus, gpus = self.placement.group_of("critic")
            self.critic = LearnerGroup(CriticLearner, cfg.critic_workers, placement_group=group,
                                       bundle_indices=indices, num_cpus=cpus, num_gpus=gpus, name="critic",
                                       start_timeout_s=cfg.ray.actor_start_timeout_s, **threads)
            setups += self.critic.call("setup", cfg.critic or cfg.model, critic_path, cfg.ppo, cfg.deepspeed, cfg.seed)

        # The frozen initial model and the reward, each on its own bundle (restart_actor starts them again).
        self._start_reference = lambda: ray.remote(ReferenceModel).options(
            **self.placement.slots["reference"][0].options()).remote(cfg.model, base_path, **threads)
        self._start_reward = lambda: ray.remote(RewardScorer).options(
            **self.placement.slots["reward"][0].options()).remote(cfg.reward, cfg.model.dtype, **threads)
        self.reference = None if self.reference_from_policy else self._start_reference()
        self.reward = self._start_reward()
        timeout_s = cfg.ray.actor_start_timeout_s
        wait_for_actors(setups, role="policy/critic learners", timeout_s=timeout_s)
        log.info("ppo: learners ready in %.1f s", time.perf_counter() - started)
        if cfg.rollout.weight_sync == "broadcast":
            self.connect_weight_broadcast()
        if self.reference is not None:
            wait_for_actors([self.reference.__ray_ready__.remote()], role="reference", timeout_s=timeout_s)
        self.reward_stats = wait_for_actors([self.reward.stats.remote()], role="reward", timeout_s=timeout_s)[0]
        log.info("ppo: all actors ready in %.1f s", time.perf_counter() - started)

        self.kl_controller = make_kl_controller(cfg.ppo.kl)
        self.iteration = 0
        # Fault counters (cumulative over the run, resumed from checkpoints); logged every step.
        self.faults = {"faults/actor_restarts": 0, "faults/nonfinite_skipped": 0}
        self.nonfinite_in_a_row = 0
        if saved_state:
            self.iteration = saved_state["iteration"]
            self.kl_controller.load_state_dict(saved_state["kl_controller"])
            self.faults.update(saved_state.get("faults", {}))
            if resume_optimizers:
                self.load_optimizers(start_from)

    # ----------------------------------------------------------------------------------------------

    def step(self) -> dict[str, float]:
        """One PPO iteration; returns its metrics. An inference actor that dies in it is restarted
        and the experience made again; a batch holding NaN or infinity is skipped, not trained on."""
        step_start = time.perf_counter()
        batch, experience, metrics, timings = self.surviving(self.make_batch)  # 1-3
        bad = nonfinite_fields(experience)
        if bad:
            return self.skip_nonfinite(f"{', '.join(bad)} hold NaN or infinity", {**metrics, **timings})

        started = time.perf_counter()
        stats = self.train(experience)  # 4
        timings["timing/train"] = time.perf_counter() - started
        started = time.perf_counter()
        self.surviving(self.sync_weights)  # 5
        timings["timing/weight_sync"] = time.perf_counter() - started
        skipped_steps = stats.get("policy/skipped_steps", 0) + stats.get("critic/skipped_steps", 0)
        if skipped_steps:  # the learners dropped optimiser steps with non-finite gradients
            return self.skip_nonfinite(f"{skipped_steps:g} optimiser step(s) had non-finite gradients (dropped)",
                                       {**metrics, **stats, **timings})
        self.nonfinite_in_a_row = 0

        # 6. KL controller and metrics.
        self.kl_controller.update(metrics["kl/mean"], batch["input_ids"].shape[0])
        self.iteration += 1
        timings["timing/step"] = time.perf_counter() - step_start
        generated = int(batch["action_mask"].sum())
        return {**metrics, **stats, **timings, **self.faults,
                "throughput/tokens_per_s": generated / timings["timing/step"]}

    def make_batch(self) -> tuple[dict, dict, dict, dict]:
        """Steps 1-3 of an iteration: rollouts, model outputs on them, and the experience made of
        them. Depends only on (seed, iteration) and the current weights, so it can be redone."""
        import ray

        from actors.rollout import samples_to_batch

        cfg, algo, n = self.cfg, self.cfg.ppo, self.sampling.n
        timings: dict[str, float] = {}

        # 1. Generate: rollout_batch_size prompts x n samples, seeded by iteration.
        chosen = batch_indices(self.iteration, len(self.prompts), algo.rollout_batch_size, cfg.seed)
        prompts = [self.prompts[i] for i in chosen]
        started = time.perf_counter()
        samples = self.generate(prompts, draw=0)
        timings["timing/generation"] = time.perf_counter() - started
        temperature = self.sampling.temperature or 1.0
        score_list, dynamic = None, {}
        if algo.dynamic_sampling:  # DAPO: keep only groups whose rewards differ, drawing more prompts
            prompts, samples, score_list, dynamic = self.informative_groups(prompts, samples)
            timings["timing/generation"] = time.perf_counter() - started

        # 2. Reference logprobs, values and rewards: at the same time, or one after another when the
        #    actors take turns on shared cores.
        started = time.perf_counter()
        batch = samples_to_batch(samples, self.tokenizer.pad_token_id)
        # With the action mask the models score the response tokens alone (scored_window).
        rollout = {k: batch[k] for k in ("input_ids", "attention_mask", "action_mask")}

        def reference_logprobs():
            if self.reference is not None:
                return [self.reference.logprobs.remote(rollout, temperature, algo.share_prompts)]
            return self.policy.call_sharded("reference_logprobs", shard(rollout, len(self.policy.actors)), temperature)

        def critic_values():
            return self.critic.call_sharded("values", shard(rollout, len(self.critic.actors))) if self.critic else []

        def scores():
            return [self.score(prompts, samples)] if score_list is None else []

        ref_parts, value_parts, score_parts = self.in_turns_or_together(
            [(reference_logprobs, ray.get), (critic_values, ray.get), (scores, ray.get)])
        ref_logprobs = torch.cat(ref_parts)
        values = torch.cat(value_parts) if value_parts else None
        scores = torch.tensor(score_parts[0] if score_list is None else score_list, dtype=torch.float32)

        # 3. KL, rewards and advantages: pure torch.
        ended = torch.tensor([s.finish_reason == "stop" for s in samples])
        group_ids = torch.arange(len(prompts)).repeat_interleave(n)
        experience, metrics = make_experience(
            batch, ref_logprobs=ref_logprobs, values=values, scores=scores, ended_with_eos=ended,
            group_ids=group_ids, cfg=cfg, kl_coef=self.kl_controller.value, reward_stats=self.reward_stats,
        )
        timings["timing/make_experience"] = time.perf_counter() - started
        return batch, {**experience, "scores": scores}, {**metrics, **dynamic}, timings

    def score(self, prompts: list[dict], samples: list):
        """The reward actor's call on ``samples`` (prompt-major, ``sampling.n`` per prompt): an object ref."""
        prompt_texts = [last_user_text(p["messages"]) for p in prompts for _ in range(self.sampling.n)]
        return self.reward.scores.remote(prompt_texts, [s.text for s in samples])

    def generate(self, prompts: list[dict], draw: int) -> list:
        """``sampling.n`` samples of each prompt, seeded by (seed, iteration, draw)."""
        seed = self.cfg.seed * 100_003 + self.iteration * 1_009 + draw * 7_919
        return self.engines.generate([p["prompt_ids"] for p in prompts], self.sampling.model_copy(update={"seed": seed}))

    def informative_groups(self, prompts: list[dict], samples: list) -> tuple[list, list, list, dict]:
        """DAPO's dynamic sampling (Yu et al., 2025): a group whose samples all got the same reward has
        zero advantage under group baselines and teaches nothing, so it is dropped and more prompts are
        drawn (``ppo.dynamic_sampling_max_rounds`` extra generation rounds at most) until
        ``rollout_batch_size`` groups differ. Short of that, dropped groups fill the batch (they only
        dilute it). Returns the batch's prompts, samples (prompt-major) and raw scores, and metrics:
        ``rollout/groups_dropped`` (uniform groups seen) and ``rollout/generation_rounds``."""
        import ray

        algo, n = self.cfg.ppo, self.sampling.n
        kept, dropped, rounds = [], [], 0
        while True:
            scores = ray.get(self.score(prompts, samples))
            for g, (prompt, uniform) in enumerate(zip(prompts, uniform_groups(scores, n))):
                (dropped if uniform else kept).append((prompt, samples[g * n:(g + 1) * n], scores[g * n:(g + 1) * n]))
            rounds += 1
            if len(kept) >= algo.rollout_batch_size or rounds > algo.dynamic_sampling_max_rounds:
                break
            # The next draw: other prompts, by seed, iteration and round (a resumed run draws the same).
            chosen = batch_indices(self.iteration, len(self.prompts), algo.rollout_batch_size, self.cfg.seed + rounds)
            prompts = [self.prompts[i] for i in chosen]
            samples = self.generate(prompts, draw=rounds)
        groups = (kept + dropped)[:algo.rollout_batch_size]
        metrics = {"rollout/groups_dropped": float(len(dropped)), "rollout/generation_rounds": float(rounds)}
        return ([p for p, _, _ in groups], [s for _, group, _ in groups for s in group],
                [x for _, _, group in groups for x in group], metrics)

    def train(self, experience: dict[str, torch.Tensor]) -> dict[str, float]:
        """Step 4: train critic and policy (at the same time, or the critic first when the actors take
        turns); rank 0's stats. A dead rank is a ``LearnerLostError``."""
        policy_keys = ["input_ids", "attention_mask", "action_mask", "logprobs", "advantages", "ref_logprobs"]
        world = len(self.policy.actors)
        policy_shards = shard({k: experience[k] for k in policy_keys}, world)
        ptx = self.ptx_batches(experience["input_ids"].shape[0] // world, world)

        def train_policy():
            return [actor.train.remote(part, self.kl_controller.value, self.iteration, ptx[rank])
                    for rank, (actor, part) in enumerate(zip(self.policy.actors, policy_shards))]

        def train_critic():
            critic_keys = ["input_ids", "attention_mask", "action_mask", "values", "returns"]
            return self.critic.call_sharded(
                "train", shard({k: experience[k] for k in critic_keys}, len(self.critic.actors)), self.iteration,
            )

        calls = [(train_critic, self.critic.get)] if self.critic else []  # LearnerGroup.get fails fast
        *critic_stats, policy_stats = self.in_turns_or_together(calls + [(train_policy, self.policy.get)])
        return {**policy_stats[0], **(critic_stats[0][0] if critic_stats else {})}

    def in_turns_or_together(self, calls: list[tuple[Callable[[], list], Callable[[list], list]]]) -> list[list]:
        """Run remote calls, each a ``(start, get)`` pair (``start()`` returns object refs), and return
        ``get(refs)`` of each, in order: all started at once, or, when the actors take turns on shared
        cores, each finished before the next starts (so one actor has all the cores at a time)."""
        if self.take_turns:
            return [get(start()) for start, get in calls]
        started = [(start(), get) for start, get in calls]
        return [get(refs) for refs, get in started]

    def eval_due(self, *, last: bool = False) -> bool:
        """Whether the held-out evaluation runs after the current iteration: at step 0, every
        ``eval_every`` iterations, and at the last one (``last``: a run stopping early)."""
        if self.judge is None:
            return False
        return last or self.iteration % self.cfg.eval_every == 0 or self.iteration >= self.cfg.steps

    def evaluate(self) -> dict[str, float]:
        """The held-out evaluation: one reply per held-out prompt from the engines (the current
        policy), sampled with the same seed every time so that successive evaluations compare like
        with like, and the judge's mean score of them. A dead engine is restarted as in a step."""
        started = time.perf_counter()
        prompts = self.eval_prompts
        sampling = self.sampling.model_copy(update={"n": 1, "seed": self.cfg.seed})
        samples = self.surviving(lambda: self.engines.generate([p["prompt_ids"] for p in prompts], sampling))
        scores = self.judge([last_user_text(p["messages"]) for p in prompts], [s.text for s in samples])
        return {
            "eval/judge": sum(scores) / len(scores),
            "eval/response_length": sum(len(s.response_ids) for s in samples) / len(samples),
            "eval/ended_with_eos": sum(s.finish_reason == "stop" for s in samples) / len(samples),
            "timing/eval": time.perf_counter() - started,
        }

    def skip_nonfinite(self, what: str, metrics: dict[str, float]) -> dict[str, float]:
        """Count a batch that held NaN or infinity and move on to the next iteration (its prompts and
        seed differ); ``max_nonfinite_batches`` of them in a row stop the run."""
        self.faults["faults/nonfinite_skipped"] += 1
        self.nonfinite_in_a_row += 1
        self.iteration += 1
        if self.nonfinite_in_a_row >= self.cfg.max_nonfinite_batches:
            raise PPOStopped(
                f"ppo: {self.nonfinite_in_a_row} iterations in a row had non-finite values (last, iteration "
                f"{self.iteration}: {what}); stopping (max_nonfinite_batches). Check the reward function and the "
                "learning rate; no checkpoint holds non-finite weights"
            )
        log.warning("ppo: iteration %d skipped: %s (%d in a row)", self.iteration, what, self.nonfinite_in_a_row)
        return {**metrics, **self.faults}

    # Faults of inference actors ----------------------------------------------------------------------

    def surviving(self, phase: Callable[[], object]):
        """``phase()``; when a rollout engine, the reward or the reference actor dies in it, restart
        that actor and run the phase again, up to ``max_step_retries`` times. A dead learner rank is
        a ``LearnerLostError`` (its DeepSpeed group cannot take a new rank)."""
        import ray

        for attempt in range(self.cfg.max_step_retries + 1):
            try:
                return phase()
            except ray.exceptions.RayActorError as exc:
                role, index = self.dead_actor(exc)
                if attempt == self.cfg.max_step_retries:
                    raise PPOStopped(
                        f"ppo: iteration {self.iteration + 1}: {role} actor {index} died again after "
                        f"{attempt} restart(s) (max_step_retries={self.cfg.max_step_retries}); stopping"
                    ) from None
                log.warning("ppo: iteration %d: %s actor %d died (%s); restarting it and redoing the step",
                            self.iteration + 1, role, index, type(exc).__name__)
                self.restart_actor(role, index)

    def inference_actors(self) -> list[tuple[str, int, object]]:
        """``(role, index, handle)`` of every actor that can be restarted."""
        actors = [("rollout", i, engine) for i, engine in enumerate(self.engines.engines)]
        actors.append(("reward", 0, self.reward))
        if self.reference is not None:
            actors.append(("reference", 0, self.reference))
        return actors

    def dead_actor(self, error) -> tuple[str, int]:
        """Which inference actor ``error`` came from (``(role, index)``), by its actor id or, when the
        error does not carry one, by asking each; a learner's death is a ``LearnerLostError``."""
        import ray

        for role, index, actor in self.inference_actors():
            if actor._actor_id.hex() == error.actor_id:
                return role, index
        for group in (self.policy, self.critic):
            if group is not None:
                group.raise_if_lost(error)
        pings = {actor.__ray_ready__.remote(): (role, index) for role, index, actor in self.inference_actors()}
        ready, _ = ray.wait(list(pings), num_returns=len(pings), timeout=5.0)
        for ping in ready:
            try:
                ray.get(ping)
            except ray.exceptions.RayActorError:
                return pings[ping]
        raise error

    def restart_actor(self, role: str, index: int) -> None:
        """Start a dead inference actor again on its own bundle: a rollout engine gets the current
        policy weights (over the object store, then rejoins a broadcast group); the reference is the
        frozen initial model again, the reward its model or function."""
        import ray

        from cluster.runtime import wait_for_actors

        if role == "rollout":
            refs = self.policy.call("packed_weights")  # every rank joins (ZeRO-3 gathers)
            self.engines.restart_engine(index, refs[0])
            self.policy.get(refs[1:])
            if self.cfg.rollout.weight_sync == "broadcast":
                self.connect_weight_broadcast()
        else:
            old = getattr(self, role)
            ray.kill(old)
            setattr(self, role, self._start_reference() if role == "reference" else self._start_reward())
            wait_for_actors([getattr(self, role).__ray_ready__.remote()], role=f"{role} (restart)",
                            timeout_s=self.cfg.ray.actor_start_timeout_s)
        self.faults["faults/actor_restarts"] += 1

    def connect_weight_broadcast(self) -> None:
        """(Re)build the broadcast group of policy rank 0 and every engine."""
        import ray

        rank0 = self.policy.actors[0]
        host, port, world = ray.get(rank0.open_weight_broadcast.remote(len(self.engines)))
        ray.get(self.engines.join_weight_group(host, port, world) + [rank0.connect_weight_broadcast.remote()])

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
        """Policy (and critic) Hugging Face folders plus the controller state, written atomically.
        The learners refuse to write non-finite weights (``NonFiniteWeightsError``)."""
        def write_models(staging: Path) -> None:
            self.policy.get(self.policy.call("save_pretrained", str(staging / "policy"),
                                             str(staging / ADAPTER_DIR) if self.lora else None))
            if self.critic:
                self.critic.get(self.critic.call("save_pretrained", str(staging / "critic")))
            for role, group in self.learner_groups():
                group.get(group.call("save_optimizer", str(staging / f"{role}{OPTIMIZER_SUFFIX}")))

        return write_checkpoint(folder, write_models, {
            "iteration": self.iteration, "seed": self.cfg.seed, "kl_controller": self.kl_controller.state_dict(),
            "faults": self.faults, "optimizer_layout": optimizer_layout(self.cfg),
        }, overwrite=self.cfg.overwrite)

    def learner_groups(self) -> list[tuple[str, object]]:
        return [("policy", self.policy)] + ([("critic", self.critic)] if self.critic else [])

    def load_optimizers(self, checkpoint: Path) -> None:
        """Every learner continues from the optimiser state in ``checkpoint`` (exact resume)."""
        for role, group in self.learner_groups():
            group.get(group.call("load_optimizer", str(checkpoint / f"{role}{OPTIMIZER_SUFFIX}")))

    def prune_checkpoints(self) -> None:
        prune_checkpoints(self.output_dir / "checkpoints", self.cfg.keep_checkpoints)

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


def write_checkpoint(folder: Path, write_models: Callable[[Path], None], state: dict, *,
                     overwrite: bool = False) -> Path:
    """A checkpoint written atomically: ``write_models(staging)`` fills ``<folder>.partial``, the state
    file goes in last, then one rename makes it ``folder``. A process killed on the way leaves only the
    ``.partial`` folder, which :func:`checkpoints` ignores and the next save replaces."""
    def fill(staging: Path) -> None:
        write_models(staging)
        write_atomic(staging / STATE_FILE, json.dumps(state, indent=2))

    return replace_dir(folder, fill, overwrite=overwrite)


def checkpoints(folder: Path) -> list[Path]:
    """The complete checkpoints under ``folder`` (``step_N`` with a state file), oldest first."""
    return sorted(p for p in Path(folder).glob("step_*[0-9]") if (p / STATE_FILE).is_file())


def prune_checkpoints(folder: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` complete checkpoints, and any half-written ``.partial`` one
    next to them (only those rlhf made)."""
    for old in [*checkpoints(folder)[:-keep], *Path(folder).glob("step_*.partial")]:
        remove_ours(old)


def copy_folder(source: Path, target: Path, *, overwrite: bool = False) -> Path:
    """Copy a folder under a staging name, then rename: ``target`` is never half written."""
    return replace_dir(target, lambda staging: shutil.copytree(source, staging, dirs_exist_ok=True),
                       overwrite=overwrite)


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


def optimizer_layout(cfg: PPOConfig) -> dict[str, dict[str, int]]:
    """Per learner role, how its optimiser state is sharded (ZeRO stage, ranks): a resume needs the same."""
    layout = {"policy": group_layout(cfg.deepspeed.zero_stage, cfg.policy_workers)}
    if needs_critic(cfg.ppo.advantage):
        layout["critic"] = group_layout(cfg.deepspeed.zero_stage, cfg.critic_workers)
    return layout


def check_resume_optimizers(checkpoint: Path, state: dict, cfg: PPOConfig) -> bool:
    """Whether the learners can load the checkpoint's optimiser states: True when they fit the
    config, False for a checkpoint written without them (logged: the optimisers start fresh), a
    ``ConfigError`` when they were sharded differently."""
    saved = state.get("optimizer_layout")
    if saved is None:
        log.warning("ppo: resume_from %s holds no optimiser state (an older checkpoint): the optimisers start "
                    "fresh, so the resumed steps differ slightly from an uninterrupted run", checkpoint)
        return False
    for role, now in optimizer_layout(cfg).items():
        if saved.get(role) != now:
            raise ConfigError(f"resume_from {checkpoint}: the {role} optimiser state was saved with {saved.get(role)} "
                              f"but the config gives {now}; optimiser states are sharded per rank, so resume with "
                              f"the same deepspeed.zero_stage and {role}_workers")
    return True


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


def run(cfg: PPOConfig, on_step: Callable[[PPOTrainer], None] | None = None) -> Path:
    """Train, checkpoint, and write final/. ``on_step(trainer)`` runs after each logged step (the
    fault tests and benchmarks/chaos.py kill actors there). A dead learner rank raises
    ``LearnerLostError`` naming the checkpoint to resume from. The held-out evaluations (eval_every)
    join their step's metrics (step 0's, before training, is a line of its own), and
    learning_curves.png beside metrics.jsonl is redrawn after each of them and at the end."""
    from tqdm import tqdm

    from actors.group import LearnerLostError
    from rlhf.metrics import MetricsLogger, continue_metrics
    from rlhf.plots import plot_learning_curves

    out = Path(cfg.output_dir)
    output = StageOutput(cfg, "ppo", lambda: checkpoints(out / "checkpoints"))  # refuses before anything starts
    curves = out / "learning_curves.png"
    trainer = logger = None
    try:
        trainer = PPOTrainer(cfg)
        output.begin()
        if trainer.iteration > 0:
            continue_metrics(out / "metrics.jsonl", trainer.iteration)
        logger = MetricsLogger(out, append=trainer.iteration > 0)

        plotted_at = None  # the step the PNG was last drawn at

        def log_step(metrics: dict[str, float]) -> None:
            nonlocal plotted_at
            logger.log(trainer.iteration, metrics)
            if "eval/judge" in metrics:
                plot_learning_curves(logger.path, curves)
                plotted_at = trainer.iteration

        if trainer.iteration == 0 and trainer.eval_due():
            log_step(trainer.evaluate())  # step 0: the curve's starting point
        with tqdm(total=cfg.steps, initial=trainer.iteration, desc="ppo", unit="step") as bar:
            while trainer.iteration < cfg.steps:
                try:
                    metrics = trainer.step()
                except LearnerLostError as exc:
                    hint = continue_hint(checkpoints(out / "checkpoints"))
                    raise LearnerLostError(f"{exc}; to continue: {hint}") from None
                reached = cfg.reward_threshold is not None and metrics["reward/mean"] >= cfg.reward_threshold
                if trainer.eval_due(last=reached):
                    metrics.update(trainer.evaluate())
                log_step(metrics)
                if on_step is not None:
                    on_step(trainer)
                bar.set_postfix(reward=f"{metrics['reward/mean']:.3f}", kl=f"{metrics['kl/mean']:.3f}")
                bar.update(1)
                if cfg.save_every and trainer.iteration % cfg.save_every == 0 and trainer.iteration < cfg.steps:
                    trainer.save_checkpoint(out / "checkpoints" / f"step_{trainer.iteration:06d}")
                    trainer.prune_checkpoints()
                if reached:
                    log.info("ppo: reward/mean %.3f reached reward_threshold %.3f at step %d; stopping",
                             metrics["reward/mean"], cfg.reward_threshold, trainer.iteration)
                    break
        final = trainer.save_checkpoint(out / "checkpoints" / f"step_{trainer.iteration:06d}")
        trainer.prune_checkpoints()
        # final/: merged weights (a plain transformers folder), or the adapter alone with
        # save_adapter_only; with LoRA adapter/ holds the adapter either way (as in rlhf sft).
        if cfg.model.lora is not None:
            copy_folder(final / ADAPTER_DIR, out / "adapter", overwrite=cfg.overwrite)
        policy = copy_folder(final / (ADAPTER_DIR if cfg.save_adapter_only else "policy"), out / "final",
                             overwrite=cfg.overwrite)
        if plotted_at != trainer.iteration:  # the last step's evaluation drew it already
            plot_learning_curves(logger.path, curves)
        log.info("ppo: learning curves in %s", curves)
        output.finish()
        return policy
    except KeyboardInterrupt:
        raise Interrupted(checkpoints(out / "checkpoints")) from None
    finally:
        if logger is not None:
            logger.close()
        if trainer is not None:
            trainer.shutdown()
