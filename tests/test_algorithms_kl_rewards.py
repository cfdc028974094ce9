"""KL estimators and controllers, and scores -> token rewards, against hand-computed values."""

from __future__ import annotations

import json
import math

import pytest
import torch

from rlhf.algorithms.kl import AdaptiveKLController, FixedKLController, kl_estimate, make_kl_controller
from rlhf.algorithms.rewards import (
    clip_scores, last_token_index, length_and_eos_penalty, normalize_scores, process_scores, shape_rewards,
)
from rlhf.config import KLConfig, RewardConfig

INF = float("inf")


def close(actual: torch.Tensor, expected: list, atol: float = 1e-6) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype), atol=atol, rtol=0)


# log_ratio = logprobs - ref_logprobs = [0.5, -1.0, 0.0]
LOGPROBS = torch.tensor([[-1.0, -2.0, -0.5]])
REF = torch.tensor([[-1.5, -1.0, -0.5]])


def test_k1_is_the_log_ratio():
    close(kl_estimate(LOGPROBS, REF, "k1"), [[0.5, -1.0, 0.0]])


def test_k2_is_half_the_squared_log_ratio():
    # 0.5 * 0.5^2 = 0.125 ; 0.5 * (-1)^2 = 0.5 ; 0
    close(kl_estimate(LOGPROBS, REF, "k2"), [[0.125, 0.5, 0.0]])


def test_k3_is_exp_minus_log_ratio_minus_one_plus_log_ratio():
    # exp(-0.5) - 1 + 0.5 = 0.6065307 - 0.5 = 0.1065307 ; exp(1) - 1 - 1 = 0.7182818 ; 1 - 1 + 0 = 0
    close(kl_estimate(LOGPROBS, REF, "k3"), [[0.1065307, 0.7182818, 0.0]])


def test_kl_estimate_zero_on_padding_even_when_it_holds_inf():
    ref = torch.tensor([[-1.5, -1.0, -INF]])  # padding with -inf reference logprob
    mask = torch.tensor([[1, 1, 0]])
    for estimator, expected in [("k1", [[0.5, -1.0, 0.0]]), ("k2", [[0.125, 0.5, 0.0]]),
                                ("k3", [[0.1065307, 0.7182818, 0.0]])]:
        logprobs = LOGPROBS.clone().requires_grad_()
        kl = kl_estimate(logprobs, ref, estimator, mask)
        close(kl, expected)
        kl.sum().backward()
        assert torch.isfinite(logprobs.grad).all() and logprobs.grad[0, 2] == 0


def test_kl_estimate_rejects_unknown_estimator_and_shape_mismatch():
    with pytest.raises(ValueError, match=r"unknown KL estimator .k4. \(ppo.kl.estimator\); registered: k1, k2, k3"):
        kl_estimate(LOGPROBS, REF, "k4")
    with pytest.raises(ValueError, match="differ in shape"):
        kl_estimate(LOGPROBS, REF[:, :2], "k1")


def test_fixed_controller_never_moves():
    controller = FixedKLController(0.05)
    assert controller.update(100.0, 64) == 0.05 and controller.value == 0.05


def test_adaptive_controller_moves_up_above_target_and_down_below():
    controller = AdaptiveKLController(init_coef=0.1, target=6.0, horizon=10000)
    # KL 9 > 6: error = 9/6 - 1 = 0.5, clipped to 0.2; value = 0.1 * (1 + 0.2 * 1000/10000) = 0.102
    assert controller.update(9.0, 1000) == pytest.approx(0.102)
    # KL 5.4 < 6: error = 5.4/6 - 1 = -0.1; value = 0.102 * (1 - 0.1 * 0.1) = 0.10098
    assert controller.update(5.4, 1000) == pytest.approx(0.10098)
    # KL on target: error 0, unchanged
    assert controller.update(6.0, 1000) == pytest.approx(0.10098)
    # far below: error clipped to -0.2; value = 0.10098 * (1 - 0.2 * 0.1) = 0.0989604
    assert controller.update(0.0, 1000) == pytest.approx(0.0989604)


def test_controller_state_is_json_and_round_trips():
    controller = AdaptiveKLController(0.1, 6.0, 10000)
    controller.update(9.0, 1000)
    state = json.loads(json.dumps(controller.state_dict()))
    restored = AdaptiveKLController(0.1, 6.0, 10000)
    restored.load_state_dict(state)
    assert restored.value == controller.value == pytest.approx(0.102)
    fixed = FixedKLController(0.3)
    fixed.load_state_dict(json.loads(json.dumps({"value": 0.25})))
    assert fixed.value == 0.25


def test_make_kl_controller_follows_the_config():
    adaptive = make_kl_controller(KLConfig(coef=0.2, adaptive=True, target=3.0, horizon=500))
    assert isinstance(adaptive, AdaptiveKLController)
    assert (adaptive.value, adaptive.target, adaptive.horizon) == (0.2, 3.0, 500)
    fixed = make_kl_controller(KLConfig(coef=0.07))
    assert isinstance(fixed, FixedKLController) and fixed.value == 0.07
    with pytest.warns(UserWarning, match="k1"):
        make_kl_controller(KLConfig(mode="loss", estimator="k1"))


def test_shape_rewards_puts_score_on_last_valid_token_minus_kl():
    scores = torch.tensor([1.0, -2.0])
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.5, 0.4, 9.9]])  # 9.9 is padding: ignored
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    # row 0: [-0.5*0.1, -0.5*0.2, -0.5*0.3 + 1] = [-0.05, -0.1, 0.85]
    # row 1: [-0.5*0.5, -0.5*0.4 - 2, 0] = [-0.25, -2.2, 0]
    close(shape_rewards(scores, kl, mask, 0.5), [[-0.05, -0.1, 0.85], [-0.25, -2.2, 0.0]])
    close(shape_rewards(scores, kl, mask, 0.5, kl_in_reward=False), [[0.0, 0.0, 1.0], [0.0, -2.0, 0.0]])


def test_last_token_index_handles_gaps_and_rejects_empty_rows():
    assert last_token_index(torch.tensor([[1, 0, 1, 0], [1, 1, 1, 1], [0, 1, 0, 0]])).tolist() == [2, 3, 1]
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        last_token_index(torch.tensor([[1, 0], [0, 0]]))


def test_normalize_and_clip_scores():
    close(normalize_scores(torch.tensor([3.0, 1.0]), mean=2.0, std=0.5), [2.0, -2.0])  # (3-2)/0.5, (1-2)/0.5
    with pytest.raises(ValueError, match="positive std"):
        normalize_scores(torch.tensor([1.0]), 0.0, 0.0)
    close(clip_scores(torch.tensor([-3.0, 0.5, 2.0]), 1.0), [-1.0, 0.5, 1.0])
    close(clip_scores(torch.tensor([-3.0, 2.0]), None), [-3.0, 2.0])


def test_length_and_eos_penalty_penalises_truncated_responses():
    # row 0: 1 + (-0.01 * 10) = 0.9 (ended with EOS); row 1: 1 + (-0.01 * 4) + (-1) = -0.04 (truncated)
    out = length_and_eos_penalty(torch.tensor([1.0, 1.0]), torch.tensor([10, 4]), torch.tensor([True, False]),
                                 length_penalty=-0.01, eos_penalty=-1.0)
    close(out, [0.9, -0.04])


def test_process_scores_normalises_then_clips_then_penalises():
    config = RewardConfig(normalize=True, clip=1.0, length_penalty=-0.1, eos_penalty=-0.5)
    lengths, eos = torch.tensor([2, 3]), torch.tensor([False, True])
    # (4-2)/1 = 2 -> clip 1 -> 1 - 0.1*2 - 0.5 = 0.3 ; (0-2)/1 = -2 -> clip -1 -> -1 - 0.1*3 = -1.3
    close(process_scores(torch.tensor([4.0, 0.0]), config, response_lengths=lengths, ended_with_eos=eos,
                         mean=2.0, std=1.0), [0.3, -1.3])
    # no stored mean/std (a reward function): 4 -> clip 1 -> 0.3 ; 0 -> 0 - 0.3 = -0.3
    close(process_scores(torch.tensor([4.0, 0.0]), config, response_lengths=lengths, ended_with_eos=eos),
          [0.3, -0.3])
    assert math.isclose(RewardConfig().length_penalty, 0.0)


def test_overlong_penalty_falls_linearly_over_the_buffer_below_the_limit():
    from rlhf.algorithms.rewards import overlong_penalty

    # limit 16, buffer 4: nothing up to 12 tokens, then -0.25 per token of the penalty, -1 at 16 and beyond.
    lengths = torch.tensor([5, 12, 13, 14, 16, 20])
    close(overlong_penalty(lengths, 16, 4, 1.0), [0.0, 0.0, -0.25, -0.5, -1.0, -1.0])
    close(overlong_penalty(lengths, 16, 4, 0.1), [0.0, 0.0, -0.025, -0.05, -0.1, -0.1])
    with pytest.raises(ValueError, match="overlong buffer must be in 1..16"):
        overlong_penalty(lengths, 16, 17, 1.0)


def test_process_scores_adds_the_overlong_penalty_last():
    from rlhf.config import RewardConfig

    cfg = RewardConfig(function="x.py:f", clip=1.0, overlong_buffer=4, overlong_penalty=0.5)
    scores = process_scores(torch.tensor([3.0, 3.0]), cfg, response_lengths=torch.tensor([10, 16]),
                            ended_with_eos=torch.tensor([True, False]), max_length=16)
    close(scores, [1.0, 0.5])  # clipped to 1 first, then the full penalty on the reply cut at the limit
    with pytest.raises(ValueError, match="overlong_buffer needs the responses' length limit"):
        process_scores(torch.tensor([3.0]), cfg, response_lengths=torch.tensor([10]),
                       ended_with_eos=torch.tensor([True]))
