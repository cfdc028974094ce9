"""Advantage estimators and whitening against hand-worked tiny examples."""

from __future__ import annotations

import pytest
import torch

from rlhf.algorithms.advantages import (
    ADVANTAGES, compute_advantages, dr_grpo, gae, grpo, needs_critic, reinforce_plus_plus,
    reinforce_plus_plus_baseline, rloo, whiten,
)


def close(actual: torch.Tensor, expected: list, atol: float = 1e-5) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype), atol=atol, rtol=0)


def test_registry_lists_the_estimators_and_what_each_needs():
    assert ADVANTAGES.names() == ["dr_grpo", "gae", "grpo", "reinforce++", "reinforce++_baseline", "rloo"]
    assert needs_critic("gae") and not needs_critic("grpo") and not needs_critic("reinforce++")
    grouped = {name for name in ADVANTAGES if ADVANTAGES.info(name)["needs_groups"]}
    assert grouped == {"grpo", "dr_grpo", "rloo", "reinforce++_baseline"}
    assert [name for name in ADVANTAGES if ADVANTAGES.info(name)["whiten_option"]] == ["gae"]


def test_unknown_estimator_is_a_clear_error_listing_valid_names():
    with pytest.raises(ValueError, match=r"unknown advantage estimator 'ppo' \(ppo.advantage\); registered: "
                                         r"dr_grpo, gae, grpo, reinforce\+\+, reinforce\+\+_baseline, rloo"):
        compute_advantages("ppo", scores=torch.zeros(2))


def test_gae_hand_computed():
    # gamma 0.9, lam 0.8 (gamma*lam = 0.72), rewards [0, 0, 1], values [0.5, 0.6, 0.7]
    # delta2 = 1 + 0.9*0 - 0.7 = 0.3 ; delta1 = 0 + 0.9*0.7 - 0.6 = 0.03 ; delta0 = 0.9*0.6 - 0.5 = 0.04
    # A2 = 0.3 ; A1 = 0.03 + 0.72*0.3 = 0.246 ; A0 = 0.04 + 0.72*0.246 = 0.21712
    # returns = A + V = [0.71712, 0.846, 1.0]
    # row 1 is right-padded (reward 5 and value 99 on padding are ignored):
    # delta1 = 1 - 0.6 = 0.4 ; delta0 = 0.9*0.6 - 0.5 = 0.04 ; A0 = 0.04 + 0.72*0.4 = 0.328
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 5.0]])
    values = torch.tensor([[0.5, 0.6, 0.7], [0.5, 0.6, 99.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    close(advantages, [[0.21712, 0.246, 0.3], [0.328, 0.4, 0.0]])
    close(returns, [[0.71712, 0.846, 1.0], [0.828, 1.0, 0.0]])


def test_gae_skips_padding_in_the_middle():
    # mask [1, 0, 1] must behave like the two-token row: rewards [0, 1], values [0.5, 0.7]
    # delta1 = 1 - 0.7 = 0.3 ; delta0 = 0.9*0.7 - 0.5 = 0.13 ; A0 = 0.13 + 0.72*0.3 = 0.346
    rewards = torch.tensor([[0.0, 42.0, 1.0]])
    values = torch.tensor([[0.5, -42.0, 0.7]])
    advantages, returns = gae(rewards, values, torch.tensor([[1, 0, 1]]), gamma=0.9, lam=0.8)
    close(advantages, [[0.346, 0.0, 0.3]])
    close(returns, [[0.846, 0.0, 1.0]])


def test_grpo_hand_worked_groups():
    # group 7: scores [1, 2, 6], mean 3, sample var ((-2)^2 + (-1)^2 + 3^2) / 2 = 7, std 2.6457513
    #          -> [-2, -1, 3] / 2.6457513 = [-0.7559289, -0.3779645, 1.1338934]
    # group 2: scores [4, 0], mean 2, sample var (2^2 + 2^2) / 1 = 8, std 2.8284271 -> [0.7071068, -0.7071068]
    scores = torch.tensor([1.0, 4.0, 2.0, 0.0, 6.0])
    group_ids = torch.tensor([7, 2, 7, 2, 7])
    mask = torch.tensor([[1, 1], [1, 0], [1, 1], [1, 1], [0, 1]])
    advantages, returns = grpo(scores, group_ids, mask)
    close(advantages, [[-0.7559289, -0.7559289], [0.7071068, 0.0], [-0.3779645, -0.3779645],
                       [-0.7071068, -0.7071068], [0.0, 1.1338934]])
    close(returns, [[1.0, 1.0], [4.0, 0.0], [2.0, 2.0], [0.0, 0.0], [0.0, 6.0]])


def test_grpo_equal_scores_give_zero_advantage_and_singletons_are_an_error():
    advantages, _ = grpo(torch.tensor([3.0, 3.0]), torch.tensor([0, 0]), torch.ones(2, 2))
    close(advantages, [[0.0, 0.0], [0.0, 0.0]])
    with pytest.raises(ValueError, match="grpo needs at least 2 samples per group"):
        grpo(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0, 0, 1]), torch.ones(3, 2))


@pytest.mark.parametrize("scores", [
    # float64: 1e8^2 sums to ~4e16, where float64 spacing is 8, swamping the deviations' 5.
    1e8 + torch.tensor([0.0, 1.0, 2.0, 3.0], dtype=torch.float64),
    # float32, a large group: 1024 squares near 2^48 each round in the float64 sum.
    (2.0 ** 24 + 2 * (torch.arange(1024, dtype=torch.float64) % 4)).float(),
], ids=["float64", "float32"])
def test_grpo_std_keeps_the_spread_of_large_scores(scores):
    """The group std is computed in two passes (mean, then squared deviations): the one-pass
    sum(x^2) - n * mean^2 loses the spread of scores far from 0."""
    group_ids = torch.arange(len(scores)) % 2  # two interleaved groups
    advantages, _ = grpo(scores, group_ids, torch.ones(len(scores), 1))
    expected = torch.empty(len(scores), dtype=torch.float64)
    for group in (0, 1):
        members = scores[group_ids == group].double()
        expected[group_ids == group] = (members - members.mean()) / (torch.std(members) + 1e-6)
    assert expected.abs().max() > 0.5  # the groups do spread
    torch.testing.assert_close(advantages[:, 0].double(), expected, atol=1e-4, rtol=0)


def test_rloo_hand_worked_groups():
    # group 7 [1, 2, 6]: 1 - (2+6)/2 = -3 ; 2 - (1+6)/2 = -1.5 ; 6 - (1+2)/2 = 4.5
    # group 2 [4, 0]:    4 - 0 = 4 ; 0 - 4 = -4
    scores = torch.tensor([1.0, 4.0, 2.0, 0.0, 6.0])
    group_ids = torch.tensor([7, 2, 7, 2, 7])
    mask = torch.tensor([[1, 1], [1, 0], [1, 1], [1, 1], [0, 1]])
    advantages, returns = rloo(scores, group_ids, mask)
    close(advantages, [[-3.0, -3.0], [4.0, 0.0], [-1.5, -1.5], [-4.0, -4.0], [0.0, 4.5]])
    close(returns, [[1.0, 1.0], [4.0, 0.0], [2.0, 2.0], [0.0, 0.0], [0.0, 6.0]])


def test_rloo_groups_of_one_are_a_clear_error():
    with pytest.raises(ValueError, match=r"rloo needs at least 2 samples per group.*sampling.n >= 2"):
        rloo(torch.tensor([1.0, 2.0]), torch.tensor([0, 1]), torch.ones(2, 3))


def test_reinforce_plus_plus_return_to_go_then_whitened():
    # gamma 0.5. row 0 rewards [0, 0, 1] -> G = [0.25, 0.5, 1] ; row 1 [0, 2, pad 9] -> G = [1, 2, 0]
    # valid G: 0.25, 0.5, 1, 1, 2 ; mean 4.75/5 = 0.95
    # deviations -0.7, -0.45, 0.05, 0.05, 1.05 ; squares sum 0.49+0.2025+0.0025+0.0025+1.1025 = 1.8
    # sample var 1.8/4 = 0.45, std 0.6708204 -> deviations / std
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    advantages, returns = reinforce_plus_plus(rewards, mask, gamma=0.5)
    close(returns, [[0.25, 0.5, 1.0], [1.0, 2.0, 0.0]])
    close(advantages, [[-1.0434984, -0.6708204, 0.0745356], [0.0745356, 1.5652476, 0.0]])


def test_whiten_uses_only_valid_positions():
    values = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    # mean (1+2+3)/3 = 2, sample var (1 + 0 + 1)/2 = 1 -> [-1, 0, 1], padding 0
    close(whiten(values, mask), [[-1.0, 0.0, 1.0, 0.0]])
    close(whiten(values, mask, shift_mean=False), [[1.0, 2.0, 3.0, 0.0]])
    close(whiten(torch.tensor([[5.0, 7.0]]), torch.tensor([[1, 0]])), [[0.0, 0.0]])  # one valid value
    with pytest.raises(ValueError, match="no valid position"):
        whiten(values, torch.zeros(1, 4))


def test_compute_advantages_takes_the_inputs_each_estimator_needs():
    inputs = dict(
        token_rewards=torch.tensor([[0.0, 0.0, 1.0]] * 2), values=torch.tensor([[0.5, 0.6, 0.7]] * 2),
        scores=torch.tensor([1.0, 3.0]), group_ids=torch.tensor([0, 0]),
        action_mask=torch.ones(2, 3), gamma=0.9, lam=0.8,
    )
    advantages, _ = compute_advantages("gae", **inputs)
    close(advantages[0], [0.21712, 0.246, 0.3])
    advantages, _ = compute_advantages("rloo", **inputs)
    close(advantages[:, 0], [-2.0, 2.0])  # 1 - 3, 3 - 1
    for name in ADVANTAGES:
        compute_advantages(name, **inputs)
    with pytest.raises(TypeError, match=r"unknown advantage inputs \['gama'\]"):
        compute_advantages("gae", **inputs, gama=0.9)
    with pytest.raises(TypeError, match="'gae' needs values"):
        compute_advantages("gae", token_rewards=inputs["token_rewards"], action_mask=inputs["action_mask"],
                           gamma=1.0, lam=1.0)


def test_dr_grpo_hand_worked_groups_keep_the_spread():
    # group 0: scores 1, 3 -> mean 2 -> advantages -1, +1 ; group 1: 10, 10, 13 -> mean 11 -> -1, -1, +2.
    # GRPO would divide group 1 by its std (sqrt(3)) and group 0 by sqrt(2): Dr. GRPO does not.
    scores = torch.tensor([1.0, 3.0, 10.0, 10.0, 13.0])
    groups = torch.tensor([0, 0, 1, 1, 1])
    mask = torch.tensor([[1, 1], [1, 0], [1, 1], [1, 1], [0, 0]])
    advantages, returns = dr_grpo(scores, groups, mask)
    close(advantages, [[-1.0, -1.0], [1.0, 0.0], [-1.0, -1.0], [-1.0, -1.0], [0.0, 0.0]])
    close(returns, [[1.0, 1.0], [3.0, 0.0], [10.0, 10.0], [10.0, 10.0], [0.0, 0.0]])
    with pytest.raises(ValueError, match="dr_grpo needs at least 2 samples per group"):
        dr_grpo(scores, torch.tensor([0, 0, 1, 1, 2]), mask)


def test_reinforce_plus_plus_baseline_subtracts_the_group_mean_then_whitens_the_batch():
    # groups (0: 1, 3) and (1: 4, 8): centred -1, +1, -2, +2, each on 2 tokens (row 3 on 1 token).
    # valid tokens: -1, -1, 1, 1, -2, -2, 2 -> mean -2/7; sample variance over 7 tokens (n - 1 = 6).
    scores = torch.tensor([1.0, 3.0, 4.0, 8.0])
    groups = torch.tensor([0, 0, 1, 1])
    mask = torch.tensor([[1, 1], [1, 1], [1, 1], [1, 0]])
    advantages, returns = reinforce_plus_plus_baseline(scores, groups, mask)
    tokens = torch.tensor([-1.0, -1.0, 1.0, 1.0, -2.0, -2.0, 2.0])
    mean = tokens.mean()
    std = ((tokens - mean).square().sum() / 6 + 1e-8).sqrt()
    expected = ((torch.tensor([[-1.0, -1.0], [1.0, 1.0], [-2.0, -2.0], [2.0, 0.0]]) - mean) / std)
    expected[3, 1] = 0.0
    close(advantages, expected.tolist())
    close(returns, [[1.0, 1.0], [3.0, 3.0], [4.0, 4.0], [8.0, 0.0]])


def test_a_registry_refuses_a_second_entry_of_the_same_name_and_unknown_facts():
    from rlhf.algorithms import Registry

    registry = Registry("thing", "ppo.thing", defaults={"needs_critic": False})

    @registry.register("a", needs_critic=True)
    def first():
        return 1

    registry.register("a", needs_critic=True)(first)  # the same function again (a module imported twice)
    with pytest.raises(ValueError, match="thing 'a' is already registered"):
        registry.register("a")(lambda: 2)
    with pytest.raises(TypeError, match=r"thing 'b': unknown facts \['critic'\]; known: needs_critic"):
        registry.register("b", critic=True)
    assert registry.info("a") == {"needs_critic": True} and registry.names() == ["a"]
    with pytest.raises(ValueError, match=r"unknown thing 'c' \(ppo.thing\); registered: a"):
        registry.get("c")


def test_uniform_groups_are_those_whose_samples_all_scored_the_same():
    from rlhf.algorithms import uniform_groups

    # groups of 3: (1, 1, 1) uniform, (0.2, 1, 0.2) not, (0.5, 0.5, 0.5 + 1e-12) uniform within 1e-9
    assert uniform_groups([1, 1, 1, 0.2, 1, 0.2, 0.5, 0.5, 0.5 + 1e-12], 3) == [True, False, True]
    with pytest.raises(ValueError, match="4 scores do not make groups of 3"):
        uniform_groups([1, 2, 3, 4], 3)
