"""PPO losses and the training schedule against hand-computed values; masking and gradients."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf.algorithms.batching import mean_stats, micro_batches, ppo_schedule, select, token_loss_weight
from rlhf.algorithms.losses import (
    entropy_from_logits, kl_loss, masked_mean, policy_loss, ptx_loss, total_policy_loss, value_loss,
)

NAN, INF = float("nan"), float("inf")


def close(actual: torch.Tensor, expected, atol: float = 1e-6) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype), atol=atol, rtol=0)


def test_masked_mean_ignores_padding_whatever_it_holds():
    values = torch.tensor([[1.0, 2.0, INF], [4.0, NAN, 6.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 1]])
    close(masked_mean(values, mask), 3.25)  # (1 + 2 + 4 + 6) / 4
    close(masked_mean(values, mask, dim=-1), [1.5, 5.0])  # (1+2)/2, (4+6)/2
    close(masked_mean(values, mask, dim=0), [2.5, 2.0, 6.0])
    close(masked_mean(values, torch.zeros(2, 3), dim=-1), [0.0, 0.0])


# Four response tokens and one padding token. old_logprobs 0, so ratio = exp(logprobs):
#   ratio 1.5, A  1: max(-1.5, -1.2) = -1.2  clipped (no gradient)
#   ratio 0.5, A  1: max(-0.5, -0.8) = -0.5
#   ratio 1.1, A -1: max( 1.1,  1.1) =  1.1
#   ratio 0.7, A -2: max( 1.4,  1.6) =  1.6  clipped (no gradient)
# loss = (-1.2 - 0.5 + 1.1 + 1.6) / 4 = 0.25 ; clipfrac 2/4 ; ratio_mean 3.8/4 = 0.95
# approx_kl = mean(r - 1 - ln r) = (0.0945349 + 0.1931472 + 0.0046898 + 0.0566749) / 4 = 0.0872617
RATIOS = [1.5, 0.5, 1.1, 0.7]
ADV = torch.tensor([[1.0, 1.0, -1.0, -2.0, NAN]])
OLD = torch.tensor([[0.0, 0.0, 0.0, 0.0, -INF]])
MASK = torch.tensor([[1, 1, 1, 1, 0]])


def _logprobs() -> torch.Tensor:
    return torch.tensor([[*map(math.log, RATIOS), 50.0]], requires_grad=True)


def test_policy_loss_hand_computed():
    loss, stats = policy_loss(_logprobs(), OLD, ADV, MASK, clip_ratio=0.2)
    close(loss, 0.25)
    assert stats["clipfrac"] == pytest.approx(0.5)
    assert stats["ratio_mean"] == pytest.approx(0.95)
    assert stats["approx_kl"] == pytest.approx(0.0872617, abs=1e-6)


def test_policy_loss_gradient_is_zero_for_clipped_and_padding_tokens():
    logprobs = _logprobs()
    loss, _ = policy_loss(logprobs, OLD, ADV, MASK, clip_ratio=0.2)
    loss.backward()
    # unclipped d/dlogp of -A * exp(logp) / 4 = -A * ratio / 4: token 1: -0.5/4, token 2: 1.1/4
    close(logprobs.grad, [[0.0, -0.125, 0.275, 0.0, 0.0]])


@pytest.mark.parametrize("dual_clip", [None, 3.0])
def test_policy_loss_stays_finite_when_the_log_ratio_overflows_exp(dual_clip):
    """A log ratio of 100 (exp overflows float32) used to give NaN gradients, even to a token in the
    clipped branch (0 * inf in exp's backward); clamped to +-LOG_RATIO_LIMIT it stays finite, and the
    other tokens keep their exact gradient."""
    logprobs = torch.tensor([[100.0, 100.0, math.log(0.5), -100.0]], requires_grad=True)
    old, adv, mask = torch.zeros(1, 4), torch.tensor([[1.0, -1.0, 1.0, -1.0]]), torch.ones(1, 4)
    loss, stats = policy_loss(logprobs, old, adv, mask, clip_ratio=0.2, dual_clip=dual_clip)
    loss.backward()
    assert torch.isfinite(loss) and all(math.isfinite(v) for v in stats.values())
    assert torch.isfinite(logprobs.grad).all()
    # token 2 (ratio 0.5, A 1) unclipped: -A * ratio / 4; the others are clipped or beyond the clamp
    close(logprobs.grad, [[0.0, 0.0, -0.125, 0.0]])


def test_dual_clip_bounds_negative_advantage_losses():
    # ratio 3, A -1: max(3, 1.2) = 3 -> dual bound -2 * -1 = 2 -> 2 (no gradient)
    # ratio 3, A  1: max(-3, -1.2) = -1.2 (positive advantage: dual clip does not apply)
    # ratio 1.5, A -1: max(1.5, 1.2) = 1.5 < 2 -> 1.5
    logprobs = torch.tensor([[math.log(3.0), math.log(3.0), math.log(1.5)]], requires_grad=True)
    old, adv, mask = torch.zeros(1, 3), torch.tensor([[-1.0, 1.0, -1.0]]), torch.ones(1, 3)
    plain, _ = policy_loss(logprobs, old, adv, mask, clip_ratio=0.2)
    close(plain, (3.0 - 1.2 + 1.5) / 3)
    dual, stats = policy_loss(logprobs, old, adv, mask, clip_ratio=0.2, dual_clip=2.0)
    close(dual, (2.0 - 1.2 + 1.5) / 3)
    assert stats["dual_clipfrac"] == pytest.approx(1 / 3)
    dual.backward()
    close(logprobs.grad, [[0.0, 0.0, 0.5]])  # token 2: -A * ratio / 3 = 1.5 / 3
    with pytest.raises(ValueError, match="dual_clip must be > 1"):
        policy_loss(logprobs, old, adv, mask, clip_ratio=0.2, dual_clip=1.0)


def test_value_loss_hand_computed_and_clipped_gradient():
    # clip 0.2. token 0: v 1.0, old 0.5 -> clipped 0.7; (1-1.5)^2 = 0.25, (0.7-1.5)^2 = 0.64 -> 0.64 (clipped)
    #           token 1: v 2.0, old 1.0 -> clipped 1.2; (2-1.5)^2 = 0.25, (1.2-1.5)^2 = 0.09 -> 0.25
    #           token 2: v 0.0, old 0.0 -> 0.0;        (0-1)^2 = 1 both                       -> 1
    # loss = 0.5 * (0.64 + 0.25 + 1) / 3 = 0.315 ; token 3 is padding
    values = torch.tensor([[1.0, 2.0, 0.0, NAN]], requires_grad=True)
    old = torch.tensor([[0.5, 1.0, 0.0, INF]])
    returns = torch.tensor([[1.5, 1.5, 1.0, -9.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, stats = value_loss(values, old, returns, mask, value_clip=0.2)
    close(loss, 0.315)
    assert stats["clipfrac"] == pytest.approx(1 / 3) and stats["values_mean"] == pytest.approx(1.0)
    loss.backward()
    # d/dv 0.5 * (v - R)^2 / 3 = (v - R) / 3: token 1: 0.5/3, token 2: -1/3; clipped token 0 and padding: 0
    close(values.grad, [[0.0, 0.5 / 3, -1 / 3, 0.0]])


def test_entropy_from_logits_hand_computed():
    # [0, ln 3]: p = [0.25, 0.75], H = 0.25 ln 4 + 0.75 ln(4/3) = 0.3465736 + 0.2157616 = 0.5623351
    # [0, 0]: H = ln 2 = 0.6931472 ; [100, 0]: H ~ 0
    logits = torch.tensor([[[0.0, math.log(3.0)], [0.0, 0.0], [100.0, 0.0]]], requires_grad=True)
    entropy = entropy_from_logits(logits)
    close(entropy, [[0.5623351, 0.6931472, 0.0]], atol=1e-5)
    entropy.sum().backward()
    assert logits.grad[0, 0].abs().sum() > 0  # the entropy bonus reaches the logits
    assert entropy_from_logits(logits.detach().bfloat16()).dtype == torch.float32


def test_ptx_loss_is_mean_next_token_cross_entropy_ignoring_minus_100():
    # position 0 predicts labels[1] = 1 with logits [0, 0]: -ln 0.5 = 0.6931472
    # position 1 predicts labels[2] = 0 with logits [0, ln 3]: -ln 0.25 = 1.3862944 ; mean 1.0397208
    logits = torch.tensor([[[0.0, 0.0], [0.0, math.log(3.0)], [5.0, -5.0]]])
    close(ptx_loss(logits, torch.tensor([[-100, 1, 0]])), 1.0397208)
    close(ptx_loss(logits, torch.full((1, 3), -100)), 0.0)


def test_kl_loss_masks_padding_and_only_moves_the_policy():
    logprobs = torch.tensor([[-1.0, -2.0, -0.5]], requires_grad=True)
    ref = torch.tensor([[-1.5, -1.0, -INF]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0]])
    # k3: (0.1065307 + 0.7182818) / 2 = 0.4124062 ; k2: (0.125 + 0.5) / 2 = 0.3125
    close(kl_loss(logprobs, ref, mask, "k2"), 0.3125)
    loss = kl_loss(logprobs, ref, mask, "k3")
    close(loss, 0.4124062)
    loss.backward()
    # d k3 / d logp = 1 - exp(-log_ratio), halved by the mean: (1 - e^-0.5)/2, (1 - e^1)/2
    close(logprobs.grad, [[(1 - math.exp(-0.5)) / 2, (1 - math.e) / 2, 0.0]])
    assert ref.grad is None


def test_total_policy_loss_assembles_the_pieces():
    logprobs = _logprobs()
    ref = logprobs.detach() - 1.0  # log_ratio 1 everywhere -> k2 = 0.5
    entropy = torch.tensor([[1.0, 2.0, 3.0, 4.0, 99.0]])  # masked mean 2.5
    loss, stats = total_policy_loss(
        logprobs=logprobs, old_logprobs=OLD, advantages=ADV, action_mask=MASK, clip_ratio=0.2,
        kl_in_loss=True, ref_logprobs=ref, kl_coef=0.1, kl_estimator="k2",
        entropy=entropy, entropy_coef=0.01, ptx=torch.tensor(2.0), ptx_coef=0.5,
    )
    # 0.25 (pg) + 0.1 * 0.5 (kl) - 0.01 * 2.5 (entropy) + 0.5 * 2.0 (ptx) = 1.275
    close(loss, 1.275)
    assert stats["loss/policy"] == pytest.approx(0.25) and stats["loss/kl"] == pytest.approx(0.5)
    assert stats["policy/entropy"] == pytest.approx(2.5) and stats["loss/ptx"] == pytest.approx(2.0)
    assert stats["loss/policy_total"] == pytest.approx(1.275) and stats["policy/clipfrac"] == pytest.approx(0.5)
    weighted, weighted_stats = total_policy_loss(
        logprobs=logprobs, old_logprobs=OLD, advantages=ADV, action_mask=MASK, clip_ratio=0.2,
        kl_in_loss=True, ref_logprobs=ref, kl_coef=0.1, kl_estimator="k2",
        entropy=entropy, entropy_coef=0.01, ptx=torch.tensor(2.0), ptx_coef=0.5, token_weight=3.0,
    )
    # token_weight scales the per-token terms (policy, KL, entropy), not the PTX term; stats are unweighted
    close(weighted, 3.0 * (1.275 - 0.5 * 2.0) + 0.5 * 2.0)
    assert weighted_stats == stats
    plain, plain_stats = total_policy_loss(logprobs=logprobs, old_logprobs=OLD, advantages=ADV,
                                           action_mask=MASK, clip_ratio=0.2)
    close(plain, 0.25)
    assert "loss/kl" not in plain_stats and "loss/ptx" not in plain_stats
    with pytest.raises(ValueError, match="needs entropy"):
        total_policy_loss(logprobs=logprobs, old_logprobs=OLD, advantages=ADV, action_mask=MASK,
                          clip_ratio=0.2, entropy_coef=0.01)
    with pytest.raises(ValueError, match="needs ref_logprobs"):
        total_policy_loss(logprobs=logprobs, old_logprobs=OLD, advantages=ADV, action_mask=MASK,
                          clip_ratio=0.2, kl_in_loss=True)


def test_micro_batches_cover_every_item_once_per_epoch_deterministically():
    batches = micro_batches(5, 2, epochs=2, seed=0)
    assert [len(b) for b in batches] == [2, 2, 1, 2, 2, 1]
    assert sorted(sum(batches[:3], [])) == sorted(sum(batches[3:], [])) == [0, 1, 2, 3, 4]
    assert batches == micro_batches(5, 2, epochs=2, seed=0)
    assert any(micro_batches(8, 8, epochs=1, seed=s) != micro_batches(8, 8, epochs=1, seed=0) for s in (1, 2, 3))


def test_ppo_schedule_groups_micro_batches_into_weighted_steps():
    steps = ppo_schedule(5, 2, epochs=2, seed=0, grad_accum=2)
    # per epoch: micro-batches of 2, 2, 1 -> steps [2, 2] (weights 2/4, 2/4) and [1] (weight 1)
    assert [[len(mb.indices) for mb in step] for step in steps] == [[2, 2], [1], [2, 2], [1]]
    assert [[mb.loss_weight for mb in step] for step in steps] == [[0.5, 0.5], [1.0], [0.5, 0.5], [1.0]]
    assert [mb.epoch for step in steps for mb in step] == [0, 0, 0, 1, 1, 1]
    assert [mb.indices for step in steps for mb in step] == micro_batches(5, 2, epochs=2, seed=0)
    # With tokens per item the weight is the micro-batch's share of the step's tokens.
    tokens = [1, 2, 3, 4, 10]
    weighted = ppo_schedule(5, 2, epochs=2, seed=0, grad_accum=2, tokens=tokens)
    assert [[mb.indices for mb in step] for step in weighted] == [[mb.indices for mb in step] for step in steps]
    for step in weighted:
        step_tokens = sum(tokens[i] for mb in step for i in mb.indices)
        for mb in step:
            assert mb.tokens == sum(tokens[i] for i in mb.indices)
            assert mb.loss_weight == pytest.approx(mb.tokens / step_tokens)
    assert weighted[0][0].loss_weight != 0.5
    with pytest.raises(ValueError, match="tokens has 2 entries for 5 items"):
        ppo_schedule(5, 2, epochs=1, seed=0, tokens=[1, 2])


# The brief's example: 16 responses of 2..30 tokens, micro-batches of 4 grouped by length, 4 per step.
STEP_LENGTHS = [2 + (28 * i) // 15 for i in range(16)]


def _step_token_losses(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token losses (16, 30) and the response mask of STEP_LENGTHS (right-padded)."""
    mask = torch.arange(30) < torch.tensor(STEP_LENGTHS).unsqueeze(-1)
    losses = torch.rand(16, 30, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return torch.where(mask, losses, torch.full_like(losses, NAN)), mask


def test_token_weights_make_a_step_the_mean_over_all_its_tokens():
    losses, mask = _step_token_losses()
    (step,) = ppo_schedule(16, 4, epochs=1, seed=0, grad_accum=4, lengths=STEP_LENGTHS, tokens=STEP_LENGTHS)
    by_length = [STEP_LENGTHS[k:k + 4] for k in (0, 4, 8, 12)]
    assert [sorted(STEP_LENGTHS[i] for i in mb.indices) for mb in step] == by_length
    means = [masked_mean(losses[mb.indices], mask[mb.indices]) for mb in step]
    global_mean = masked_mean(losses, mask)
    weighted = sum(mb.loss_weight * mean for mb, mean in zip(step, means))
    assert torch.allclose(weighted, global_mean)
    # The old scheme, each micro-batch's token mean with its share of the items (1/4 each), is not.
    assert not torch.allclose(sum(mean / len(step) for mean in means), global_mean)
    # Under DeepSpeed: weight = token share x grad_accum x world; backward divides by grad_accum and the
    # ranks' gradients are averaged. Two ranks of 8 responses, micro-batches of 4, 2 per step.
    world, grad_accum = 2, 2
    ranks = [list(range(rank, 16, world)) for rank in range(world)]
    schedules = [ppo_schedule(8, 4, epochs=1, seed=rank, grad_accum=grad_accum,
                              tokens=[STEP_LENGTHS[i] for i in rows]) for rank, rows in enumerate(ranks)]
    all_ranks = sum(mb.tokens for (step,) in schedules for mb in step)
    assert all_ranks == sum(STEP_LENGTHS)
    deepspeed = 0.0
    for rows, (step,) in zip(ranks, schedules):
        for mb in step:
            items = [rows[i] for i in mb.indices]
            weight = token_loss_weight(mb.tokens, all_ranks, grad_accum=grad_accum, world=world)
            deepspeed = deepspeed + weight * masked_mean(losses[items], mask[items]) / grad_accum / world
    assert torch.allclose(deepspeed, global_mean)
    with pytest.raises(ValueError, match="step_tokens > 0"):
        token_loss_weight(0, 0)


def test_token_weighted_micro_batch_gradients_add_up_to_the_step_token_mean_gradient():
    """A tiny logits model: per-token cross-entropy of (16, 30) tokens. Accumulating each micro-batch's
    token-mean loss times its loss_weight gives the gradient of the token mean over the whole step."""
    _, mask = _step_token_losses()
    generator = torch.Generator().manual_seed(1)
    features = torch.randn(16, 30, 5, generator=generator)
    targets = torch.randint(0, 7, (16, 30), generator=generator)
    model = torch.nn.Linear(5, 7)

    def token_mean_loss(rows: list[int]) -> torch.Tensor:
        logits = model(features[rows])
        per_token = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets[rows], reduction="none")
        return masked_mean(per_token, mask[rows])

    def gradient(weighted_losses) -> list[torch.Tensor]:
        model.zero_grad()
        for loss in weighted_losses:
            loss.backward()
        return [p.grad.clone() for p in model.parameters()]

    (step,) = ppo_schedule(16, 4, epochs=1, seed=0, grad_accum=4, lengths=STEP_LENGTHS, tokens=STEP_LENGTHS)
    expected = gradient([token_mean_loss(list(range(16)))])
    accumulated = gradient(mb.loss_weight * token_mean_loss(mb.indices) for mb in step)
    old = gradient(token_mean_loss(mb.indices) / len(step) for mb in step)
    assert all(torch.allclose(a, e, atol=1e-6) for a, e in zip(accumulated, expected))
    assert not all(torch.allclose(a, e, atol=1e-6) for a, e in zip(old, expected))


def test_ppo_schedule_with_lengths_regroups_each_step_by_length_only():
    lengths = [9, 1, 7, 3, 8, 2, 6, 4, 5, 0]
    plain = ppo_schedule(10, 2, epochs=2, seed=3, grad_accum=2)
    grouped = ppo_schedule(10, 2, epochs=2, seed=3, grad_accum=2, lengths=lengths)
    # Same steps, same items in each step, same weights: only the micro-batches within a step change.
    assert [sorted(i for mb in step for i in mb.indices) for step in grouped] == \
        [sorted(i for mb in step for i in mb.indices) for step in plain]
    assert [[mb.loss_weight for mb in step] for step in grouped] == [[mb.loss_weight for mb in step] for step in plain]
    for step in grouped:
        order = [lengths[i] for mb in step for i in mb.indices]
        assert order == sorted(order)  # similar lengths share a micro-batch
    assert grouped != plain
    with pytest.raises(ValueError, match="lengths has 3 entries for 10 items"):
        ppo_schedule(10, 2, epochs=1, seed=0, lengths=[1, 2, 3])


def test_select_and_mean_stats():
    batch = {"x": torch.tensor([[0, 1], [2, 3], [4, 5]]), "name": "rollout"}
    picked = select(batch, [2, 0])
    assert picked["x"].tolist() == [[4, 5], [0, 1]] and picked["name"] == "rollout"
    assert mean_stats([{"a": 1.0, "b": 2.0}, {"a": 3.0}]) == {"a": 2.0, "b": 2.0}


def test_one_ppo_step_end_to_end_on_tiny_tensors():
    """kl -> rewards -> GAE -> whitening -> total loss -> gradient, with padding that never matters."""
    from rlhf.algorithms.advantages import compute_advantages, whiten
    from rlhf.algorithms.kl import kl_estimate
    from rlhf.algorithms.rewards import shape_rewards

    torch.manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    old = torch.randn(2, 4).clamp(max=-0.1)
    ref = old - 0.1
    values = torch.randn(2, 4)
    kl = kl_estimate(old, ref, "k1", mask)
    rewards = shape_rewards(torch.tensor([1.0, -1.0]), kl, mask, kl_coef=0.05)
    advantages, returns = compute_advantages("gae", token_rewards=rewards, values=values, action_mask=mask,
                                             gamma=1.0, lam=0.95)
    advantages = whiten(advantages, mask)
    logprobs = old.clone().requires_grad_()
    loss, stats = total_policy_loss(logprobs=logprobs, old_logprobs=old, advantages=advantages,
                                    action_mask=mask, clip_ratio=0.2)
    loss.backward()
    assert stats["policy/ratio_mean"] == pytest.approx(1.0) and stats["policy/clipfrac"] == 0.0
    assert (logprobs.grad[mask == 0] == 0).all() and (logprobs.grad[mask == 1] != 0).all()
    assert (returns[mask == 0] == 0).all()



# ---- The registries: policy losses and their aggregation ------------------------------------------

def test_the_registered_policy_losses_and_aggregations():
    from rlhf.algorithms import LOSS_AGGREGATIONS, POLICY_LOSSES

    assert POLICY_LOSSES.names() == ["cispo", "gspo", "ppo"]
    assert {name: LOSS_AGGREGATIONS.info(name)["unit"] for name in LOSS_AGGREGATIONS} == {
        "token_mean": "token", "seq_mean_token_mean": "sequence", "seq_mean_token_sum_norm": "sequence"}
    with pytest.raises(ValueError, match=r"unknown policy loss 'ppo2' \(ppo.policy_loss\); registered: cispo, gspo, ppo"):
        POLICY_LOSSES.get("ppo2")


def test_loss_aggregations_hand_computed():
    from rlhf.algorithms import aggregate

    losses = torch.tensor([[1.0, 2.0, 3.0], [4.0, NAN, INF]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    close(aggregate(losses, mask, "token_mean"), 2.5)  # (1 + 2 + 3 + 4) / 4 tokens
    close(aggregate(losses, mask, "seq_mean_token_mean"), 3.0)  # (2 + 4) / 2 responses
    close(aggregate(losses, mask, "seq_mean_token_sum_norm", length=4), 1.25)  # (6/4 + 4/4) / 2
    with pytest.raises(ValueError, match="needs a length > 0"):
        aggregate(losses, mask, "seq_mean_token_sum_norm")


def test_sequence_aggregation_over_micro_batches_weighted_by_their_responses_is_the_whole_batchs():
    from rlhf.algorithms import aggregate

    generator = torch.Generator().manual_seed(0)
    losses = torch.rand(6, 5, generator=generator)
    mask = torch.arange(5) < torch.tensor([1, 5, 2, 4, 3, 5]).unsqueeze(-1)
    whole = aggregate(losses, mask, "seq_mean_token_mean")
    parts = [[0, 1], [2, 3, 4, 5]]  # uneven micro-batches: weights 2/6 and 4/6 (responses, not tokens)
    summed = sum(token_loss_weight(len(rows), 6, grad_accum=1, world=1) * aggregate(losses[rows], mask[rows],
                                                                                     "seq_mean_token_mean")
                 for rows in parts)
    close(summed, float(whole))


def test_ppo_loss_with_asymmetric_clipping_hand_computed():
    # clip range [1 - 0.2, 1 + 0.28] (DAPO's clip-higher): ratio 1.5, A 1 -> max(-1.5, -1.28) = -1.28;
    # ratio 0.5, A 1 -> -0.5; ratio 1.1, A -1 -> 1.1; ratio 0.7, A -2 -> max(1.4, 1.6) = 1.6.
    from rlhf.algorithms import policy_token_losses

    logprobs = _logprobs()
    losses, stats = policy_token_losses("ppo", logprobs=logprobs, old_logprobs=OLD, advantages=ADV,
                                        action_mask=MASK, clip_ratio_low=0.2, clip_ratio_high=0.28)
    close(losses[:, :4], [[-1.28, -0.5, 1.1, 1.6]], atol=1e-5)
    assert stats["clipfrac"] == 0.5
    masked_mean(losses, MASK).backward()
    close(logprobs.grad, [[0.0, -0.125, 0.275, 0.0, 0.0]], atol=1e-6)  # -A * ratio / 4 where unclipped


def test_gspo_clips_whole_responses_by_their_length_normalised_ratio():
    from rlhf.algorithms import aggregate, policy_token_losses

    # Two responses of two tokens, log ratios (0.1, 0.3): the sequence ratio is exp(0.2) = 1.2214 for both.
    # A = +1 with the upper clip at 1.1: clipped, -1.1 on both tokens, no gradient.
    # A = -1: max(1.2214, 1.1) = 1.2214, unclipped; d loss / d logprob_t = s / T per token (T = 2) under
    # seq_mean_token_mean, the sequence-level gradient -A * s * d mean(log ratio) / d logprob_t, halved
    # again by the mean over the two responses.
    old = torch.zeros(2, 3)
    logprobs = torch.tensor([[0.1, 0.3, 9.0], [0.1, 0.3, 9.0]], requires_grad=True)
    advantages = torch.tensor([[1.0, 1.0, 0.0], [-1.0, -1.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    losses, stats = policy_token_losses("gspo", logprobs=logprobs, old_logprobs=old, advantages=advantages,
                                        action_mask=mask, clip_ratio_low=0.1, clip_ratio_high=0.1)
    s = math.exp(0.2)
    close(losses, [[-1.1, -1.1, 0.0], [s, s, 0.0]], atol=1e-5)
    assert stats["clipfrac"] == 0.5 and abs(stats["ratio_mean"] - s) < 1e-5
    aggregate(losses, mask, "seq_mean_token_mean").backward()
    close(logprobs.grad, [[0.0, 0.0, 0.0], [s / 4, s / 4, 0.0]], atol=1e-5)


def test_cispo_keeps_a_clipped_tokens_gradient_with_a_clipped_weight():
    from rlhf.algorithms import policy_token_losses

    # ratio 1.5, A 1: PPO drops this token's gradient; CISPO weighs it by clip(1.5, 0.8, 1.2) = 1.2:
    # loss = -1.2 * 1 * logprob, gradient -1.2. ratio 0.5, A 1: weight 0.8. ratio 1.1, A -1: 1.1.
    # ratio 0.7, A -2: weight 0.8, loss = 1.6 * logprob.
    logprobs = _logprobs()
    losses, stats = policy_token_losses("cispo", logprobs=logprobs, old_logprobs=OLD, advantages=ADV,
                                        action_mask=MASK, clip_ratio_low=0.2, clip_ratio_high=0.2)
    expected_weights = [-1.2, -0.8, 1.1, 1.6]
    close(losses[:, :4], [[w * math.log(r) for w, r in zip(expected_weights, RATIOS)]], atol=1e-5)
    assert stats["clipfrac"] == 0.75  # 1.5 -> 1.2, 0.5 -> 0.8, 0.7 -> 0.8
    losses.sum().backward()
    close(logprobs.grad, [[*expected_weights, 0.0]], atol=1e-6)


def test_truncated_importance_weights_hand_computed():
    from rlhf.algorithms import total_policy_loss, truncated_importance_weights

    # learner minus engine log ratios ln 0.5, 0, ln 3 (capped at 2), and a padding token holding NaN.
    learner = torch.tensor([[math.log(0.5), 0.0, math.log(3.0), NAN]])
    engine = torch.zeros(1, 4)
    mask = torch.tensor([[1, 1, 1, 0]])
    weights, stats = truncated_importance_weights(learner, engine, mask, cap=2.0)
    close(weights, [[0.5, 1.0, 2.0, 0.0]], atol=1e-6)
    assert abs(stats["is_weight_mean"] - 3.5 / 3) < 1e-6 and abs(stats["is_clipped_fraction"] - 1 / 3) < 1e-6
    # The weights multiply the policy's per-token losses: ratio 1 everywhere (logprobs = old), A = 1,
    # so each token's loss is -1 and the token mean is -(0.5 + 1 + 2) / 3.
    logprobs = torch.zeros(1, 4, requires_grad=True)
    loss, _ = total_policy_loss(logprobs=logprobs, old_logprobs=torch.zeros(1, 4), advantages=torch.ones(1, 4),
                                action_mask=mask, clip_ratio=0.2, importance_weights=weights)
    close(loss, -3.5 / 3, atol=1e-6)
