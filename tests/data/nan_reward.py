"""Rewards that go non-finite, for the fault tests: the rule reward (share of 'e' characters) except on
some calls. The call count lives in the reward actor's process, so it restarts with the actor."""

import math

calls = 0


def nan_on_even_calls(prompts: list[str], responses: list[str]) -> list[float]:
    """NaN for one response on the 2nd, 4th, ... call: never two batches in a row."""
    global calls
    calls += 1
    scores = [r.count("e") / max(len(r), 1) for r in responses]  # as rule_reward.letter_e
    if calls % 2 == 0:
        scores[0] = math.nan
    return scores


def always_nan(prompts: list[str], responses: list[str]) -> list[float]:
    return [math.nan] * len(responses)
