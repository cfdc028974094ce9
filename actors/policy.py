"""The policy: a DeepSpeed learner rank holding the causal LM being aligned.

``train`` runs PPO epochs over this rank's share of one experience batch. The loss itself is
``rlhf.algorithms.losses.total_policy_loss``; this actor only feeds it tensors (and, with
``ppo.ptx_coef``, the PTX micro-batches the controller drew for it).

With ``model.lora`` the policy is the frozen base plus a trainable peft adapter. The engines then get
merged weights, and the policy can stand in for the reference: ``reference_logprobs`` runs the
base with the adapter disabled, so no second copy of the model is loaded.
"""

from __future__ import annotations

import torch

from actors.group import Learner
from rlhf.algorithms import (
    LOSS_AGGREGATIONS, entropy_from_logits, logprob_diff, mean_stats, ptx_loss, response_logprobs,
    shared_prompt_logits, token_logprobs, total_policy_loss, truncated_importance_weights, windowed_logits,
)
from rlhf.config import DeepSpeedConfig, ModelConfig, PPOAlgoConfig


class PolicyLearner(Learner):
    def setup(self, model_cfg: ModelConfig, path: str, algo: PPOAlgoConfig, ds: DeepSpeedConfig,
              temperature: float, seed: int, adapter_path: str | None = None, plugins: list[str] = ()) -> None:
        """Load the policy from ``path``. With ``model_cfg.lora``: ``path`` is the base model and the
        adapter is new, or the one saved in ``adapter_path`` (a resumed run). ``plugins``: the config's
        files that register algorithm pieces, imported here too (this actor computes the loss)."""
        from rlhf.algorithms import load_plugins
        from rlhf.models import attach_lora, load_causal_lm, load_tokenizer
        from rlhf.models.lora import load_lora

        load_plugins(list(plugins))
        torch.manual_seed(seed)
        self.tokenizer = load_tokenizer(path, trust_remote_code=model_cfg.trust_remote_code)
        # Master weights in fp32; DeepSpeed's bf16 mode handles low precision when model.dtype asks.
        model = load_causal_lm(model_cfg.model_copy(update={"dtype": "float32"}), path=path, device=self.device.type)
        self.lora = model_cfg.lora is not None
        if self.lora:
            model = load_lora(model, adapter_path) if adapter_path else attach_lora(model, model_cfg.lora)
        self._initialize(model, learning_rate=algo.policy_learning_rate, ds=ds, algo=algo, bf16=model_cfg.dtype == "bfloat16")
        self._use_shared_prompts(algo.share_prompts)
        self.algo, self.temperature, self.seed = algo, temperature, seed

    def _forward(self, batch: dict[str, torch.Tensor], window: tuple[int, int],
                 shared=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Logprobs of the tokens in ``window`` and the logits they came from, (batch, window) and
        (batch, window, vocab); ``batch`` is a micro-batch cut to that window (``crop_to_window``),
        ``shared`` the same rows packed by prompt (then each prompt is read once)."""
        if shared is not None:
            logits = shared_prompt_logits(self.engine, shared)
        else:
            logits = windowed_logits(self.engine, batch["input_ids"], batch["attention_mask"], window)
        tokens = batch["input_ids"][:, window[0] + 1:window[1] + 1]
        return token_logprobs(logits, tokens, self.temperature), logits

    @torch.no_grad()
    def reference_logprobs(self, batch: dict[str, torch.Tensor], temperature: float) -> torch.Tensor:
        """(batch, seq - 1) logprobs under the reference, the frozen base: this LoRA policy with its
        adapter disabled. Same numbers as a separate reference actor on the base model, without a
        second copy. Every rank calls it with its share (ZeRO-3 gathers parameters in the forward)."""
        if not self.lora:
            raise RuntimeError("reference_logprobs needs a LoRA policy: without an adapter the policy is not the reference")
        module = self.engine.module
        self.engine.eval()
        with module.disable_adapter():
            return response_logprobs(module, batch, temperature, share_prompts=self.share_prompts)

    @torch.no_grad()
    def _learner_logprobs(self, experience: dict[str, torch.Tensor]) -> torch.Tensor:
        """(batch, seq - 1) this rank's own logprobs of the sampled tokens, before this call's updates,
        in micro-batches (for truncated importance sampling)."""
        self.engine.eval()
        rows, size = experience["input_ids"].shape[0], self.algo.micro_batch_size
        keys = ("input_ids", "attention_mask", "action_mask")
        return torch.cat([
            response_logprobs(self.engine.module, {k: experience[k][start:start + size] for k in keys},
                              self.temperature, share_prompts=self.share_prompts)
            for start in range(0, rows, size)])

    def _ptx_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The LM loss on one PTX micro-batch (input_ids, attention_mask, labels (batch, seq)), at
        temperature 1: the policy should stay a good model of the SFT data itself."""
        batch = {k: v.to(self.device) for k, v in batch.items()}
        logits = self.engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return ptx_loss(logits, batch["labels"])

    def train(self, experience: dict[str, torch.Tensor], kl_coef: float, iteration: int,
              ptx_batches: list[dict[str, torch.Tensor]] | None = None) -> dict[str, float]:
        """PPO epochs over this rank's experience. Keys: input_ids, attention_mask, action_mask,
        logprobs (behaviour policy, from the engine), advantages, and ref_logprobs when KL is in the loss.
        With ``ppo.ptx_coef > 0``, ``ptx_batches`` holds one SFT micro-batch (``collate_sft`` layout)
        per policy micro-batch of this call, in training order. Each optimiser step minimises the
        mean over all its response tokens on all ranks (``Learner._train_steps``), plus the PTX
        loss averaged over its micro-batches."""
        algo = self.algo
        schedule = self._schedule(experience, iteration, unit=LOSS_AGGREGATIONS.info(algo.loss_agg)["unit"])
        micro_count = sum(len(step) for step in schedule)
        if algo.ptx_coef > 0 and (ptx_batches is None or len(ptx_batches) != micro_count):
            raise ValueError(f"ppo.ptx_coef > 0: expected {micro_count} PTX micro-batches (one per policy "
                             f"micro-batch), got {0 if ptx_batches is None else len(ptx_batches)}")
        if algo.rollout_is_cap is not None:
            experience = {**experience, "learner_logprobs": self._learner_logprobs(experience)}
        self.engine.train()
        diffs, importance = [], []

        def micro_loss(batch, window, shared, *, weight, step_index, micro_index):
            logprobs, logits = self._forward(batch, window, shared)  # logits only where responses are
            mask = batch["action_mask"]
            if algo.entropy_coef > 0:
                entropy = entropy_from_logits(logits)
            else:  # a statistic only: no gradient, and on response tokens alone
                with torch.no_grad():
                    entropy = torch.zeros_like(logprobs).masked_scatter(mask, entropy_from_logits(logits[mask]))
            ptx = self._ptx_loss(ptx_batches[micro_index]) if algo.ptx_coef > 0 else None
            if step_index == 0:
                # Before the first update the learner's weights are the engine's: any gap is
                # numerical mismatch that would silently make PPO off-policy.
                diffs.append(logprob_diff(batch["logprobs"], logprobs.detach(), mask))
            old_logprobs, importance_weights = batch["logprobs"], None
            if "learner_logprobs" in batch:  # truncated importance sampling: the ratio is against the learner
                old_logprobs = batch["learner_logprobs"]
                importance_weights, is_stats = truncated_importance_weights(
                    old_logprobs, batch["logprobs"], mask, algo.rollout_is_cap)
                importance.append(is_stats)
            return total_policy_loss(
                logprobs=logprobs, old_logprobs=old_logprobs, advantages=batch["advantages"], action_mask=mask,
                policy_loss_name=algo.policy_loss, clip_ratio=algo.clip_ratio, clip_ratio_low=algo.clip_ratio_low,
                clip_ratio_high=algo.clip_ratio_high, dual_clip=algo.dual_clip, importance_weights=importance_weights,
                loss_agg=algo.loss_agg, loss_agg_length=algo.loss_agg_length,
                kl_in_loss=algo.kl.mode == "loss", ref_logprobs=batch.get("ref_logprobs"), kl_coef=kl_coef,
                kl_estimator=algo.kl.estimator, entropy=entropy, entropy_coef=algo.entropy_coef, ptx=ptx,
                ptx_coef=algo.ptx_coef, token_weight=weight,
            )

        stats, skipped = self._train_steps(experience, schedule, micro_loss, "policy")
        result = mean_stats(stats)
        result["rollout/logprob_diff"] = sum(diffs) / len(diffs)
        result["policy/skipped_steps"] = float(skipped)  # optimiser steps dropped for non-finite gradients
        result.update({f"rollout/{key}": value for key, value in mean_stats(importance).items()})
        result.update(self._token_stats("policy"))
        return result

    # Weight sync to the rollout engines --------------------------------------------------------

    def rollout_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The weights the engines load, on rank 0 (None elsewhere; every rank must call it): the full
        state dict, with a LoRA adapter merged in under the plain model's names."""
        from rlhf.models.lora import lora_scaling, merged_state_dict

        state = self.full_state_dict()
        if state is None or not self.lora:
            return state
        return merged_state_dict(state, lora_scaling(self.engine.module))

    def packed_weights(self):
        """Object-store transport: rank 0 returns the full weights packed for ``ray.put`` (the
        engines read them from its return value); other ranks return None. Every rank must call it."""
        from actors.weight_sync import pack_weights

        state = self.rollout_state_dict()
        return pack_weights(state) if state is not None else None

    def open_weight_broadcast(self, num_receivers: int) -> tuple[str, int, int]:
        """Broadcast transport, rank 0: start a group of its own (not DeepSpeed's) for the engines."""
        import ray

        from actors.weight_sync import WeightBroadcaster

        self.broadcaster = WeightBroadcaster(num_receivers, host=ray.util.get_node_ip_address())
        return self.broadcaster.host, self.broadcaster.port, self.broadcaster.world_size

    def connect_weight_broadcast(self) -> None:
        self.broadcaster.connect()

    def broadcast_weights(self) -> dict | None:
        """Every rank gathers (ZeRO-3); rank 0 streams the weights to the engines in buckets."""
        state = self.rollout_state_dict()
        return self.broadcaster.broadcast(state) if state is not None else None
