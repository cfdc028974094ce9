"""The policy: a DeepSpeed learner rank holding the causal LM being aligned.

``train`` runs PPO epochs over this rank's share of one experience batch. The loss itself is
``rlhf.algorithms.losses.total_policy_loss``; this actor only feeds it tensors.
"""

from __future__ import annotations

import torch

from actors.group import Learner
from rlhf.algorithms import entropy_from_logits, logprob_diff, mean_stats, ppo_schedule, token_logprobs, total_policy_loss
from rlhf.algorithms.batching import select
from rlhf.config import DeepSpeedConfig, ModelConfig, PPOAlgoConfig


class PolicyLearner(Learner):
    def setup(self, model_cfg: ModelConfig, path: str, algo: PPOAlgoConfig, ds: DeepSpeedConfig,
              temperature: float, seed: int) -> None:
        from rlhf.models import load_causal_lm, load_tokenizer

        torch.manual_seed(seed)
        self.tokenizer = load_tokenizer(path, trust_remote_code=model_cfg.trust_remote_code)
        # Master weights in fp32; DeepSpeed's bf16 mode handles low precision when model.dtype asks.
        model = load_causal_lm(model_cfg.model_copy(update={"dtype": "float32"}), path=path, device=self.device.type)
        self._initialize(model, learning_rate=algo.policy_learning_rate, ds=ds, algo=algo, bf16=model_cfg.dtype == "bfloat16")
        self.algo, self.temperature, self.seed = algo, temperature, seed

    def _forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Logprobs of each next token and the logits they came from: (batch, seq-1), (batch, seq-1, vocab)."""
        mask = batch["attention_mask"]
        position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)
        logits = self.engine(input_ids=batch["input_ids"], attention_mask=mask, position_ids=position_ids).logits[:, :-1]
        return token_logprobs(logits, batch["input_ids"][:, 1:], self.temperature), logits

    def train(self, experience: dict[str, torch.Tensor], kl_coef: float, iteration: int) -> dict[str, float]:
        """PPO epochs over this rank's experience. Keys: input_ids, attention_mask, action_mask,
        logprobs (behaviour policy, from the engine), advantages, and ref_logprobs when KL is in the loss."""
        algo = self.algo
        n = experience["input_ids"].shape[0]
        schedule = ppo_schedule(n, algo.micro_batch_size, epochs=algo.epochs, seed=self.seed + iteration,
                                grad_accum=algo.grad_accum)
        self.engine.train()
        stats, diffs = [], []
        for step_index, optimizer_step in enumerate(schedule):
            for micro in optimizer_step:
                batch = {k: v.to(self.device) for k, v in select(experience, micro.indices).items()}
                logprobs, logits = self._forward(batch)
                mask = batch["action_mask"]
                want_entropy = algo.entropy_coef > 0
                entropy = entropy_from_logits(logits if want_entropy else logits.detach())
                loss, micro_stats = total_policy_loss(
                    logprobs=logprobs, old_logprobs=batch["logprobs"], advantages=batch["advantages"],
                    action_mask=mask, clip_ratio=algo.clip_ratio, dual_clip=algo.dual_clip,
                    kl_in_loss=algo.kl.mode == "loss", ref_logprobs=batch.get("ref_logprobs"),
                    kl_coef=kl_coef, kl_estimator=algo.kl.estimator,
                    entropy=entropy, entropy_coef=algo.entropy_coef,
                )
                self.engine.backward(loss)
                self.engine.step()
                if step_index == 0:
                    # Before the first update the learner's weights are the engine's: any gap is
                    # numerical mismatch that would silently make PPO off-policy.
                    diffs.append(logprob_diff(batch["logprobs"], logprobs.detach(), mask))
                stats.append(micro_stats)
            grad_norm = self.engine.get_global_grad_norm()
            if grad_norm is not None:
                stats[-1]["policy/grad_norm"] = float(grad_norm)
        result = mean_stats(stats)
        result["rollout/logprob_diff"] = sum(diffs) / len(diffs)
        return result

    # Weight sync to the rollout engines --------------------------------------------------------

    def packed_weights(self):
        """Object-store transport: rank 0 returns the full weights packed for ``ray.put`` (the
        engines read them from its return value); other ranks return None. Every rank must call it."""
        from actors.weight_sync import pack_weights

        state = self.full_state_dict()
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
        state = self.full_state_dict()
        return self.broadcaster.broadcast(state) if state is not None else None
