"""A rule reward for learning tests: the share of response characters that are the letter 'e'.

Dense and easy to climb (any token rich in 'e' helps), so a tiny random model learns it in a few steps.
"""


def letter_e(prompts: list[str], responses: list[str]) -> list[float]:
    return [r.count("e") / max(len(r), 1) for r in responses]
