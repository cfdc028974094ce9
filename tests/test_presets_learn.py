"""The tiny presets learn rule rewards they were not tuned on.

configs/tiny/ppo.yaml (GAE), configs/tiny/grpo.yaml (GRPO) and configs/tiny/dapo.yaml run as shipped (their own steps,
learning rates, batch and sampling settings; only the model folder, the output folder and the reward
change), seeded, each with a rule reward written here; the mean reward of the last three logged steps
must be at least 1.2x that of the first three. The presets were tuned on other rules
(tests/data/rule_reward.py's share of 'e', the share of spaces, a distance to a target length); the
three here are one of each kind a random model can climb, each kept well above 0 so that 1.2x is a
real change and not noise around 0:

- ``vowels`` (GAE): 0.1 + the share of vowels among the reply's characters. A character class: any
  token rich in vowels helps. The random model starts near 0.1 + 0.29.
- ``length_band`` (GRPO): 1 for a reply of 15 to 35 characters, falling by 1/30 per character
  outside (at least 0.1). The random model's 16 tokens make about 50 characters (about 0.5): it has
  to end early or pick shorter tokens.
- ``has_the`` (DAPO): 1 when "the" occurs in the reply (any case, inside a word too), else 0.2. The
  presence of a word, all or nothing per reply: about one reply in five has it at the start.

Three runs share one Ray (module fixture), as the stage would start it.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from rlhf.config import RayConfig, load_config
from rlhf.metrics import read_metrics

PRESETS = Path(__file__).resolve().parents[1] / "configs" / "tiny"

RULES = textwrap.dedent('''
    def vowels(prompts, responses):
        return [0.1 + sum(c in "aeiou" for c in r.lower()) / max(len(r), 1) for r in responses]


    def length_band(prompts, responses):
        return [max(0.1, 1.0 - max(15 - len(r), len(r) - 35, 0) / 30) for r in responses]


    def has_the(prompts, responses):
        return [1.0 if "the" in r.lower() else 0.2 for r in responses]
''')


@pytest.fixture(scope="module")
def ray_runtime():
    import ray

    from cluster.runtime import init_ray

    init_ray(RayConfig())  # what each run would start; run() finds it started and keeps it
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def rules_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("rules") / "rules.py"
    path.write_text(RULES)
    return path


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("preset, rule", [("ppo", "vowels"), ("grpo", "length_band"), ("dapo", "has_the")])
def test_preset_raises_a_rule_reward_it_was_not_tuned_on(ray_runtime, rules_file, tiny_model_dir, tmp_path,
                                                         preset, rule):
    from rlhf.ppo import run

    cfg = load_config("ppo", PRESETS / f"{preset}.yaml", [
        f"model.path={tiny_model_dir}", f"output_dir={tmp_path}", f"reward.function={rules_file}:{rule}",
    ])
    run(cfg)
    # Training steps only: the held-out evaluation at step 0 is a line of its own.
    rewards = [r["reward/mean"] for r in read_metrics(tmp_path / "metrics.jsonl") if "reward/mean" in r]
    assert len(rewards) == cfg.steps
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert last >= 1.2 * first, (first, last, rewards)
    if cfg.ppo.dynamic_sampling:  # an all-or-nothing reward leaves groups whose replies all score the same
        records = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "reward/mean" in r]
        assert sum(r["rollout/groups_dropped"] for r in records) > 0
        assert all(1 <= r["rollout/generation_rounds"] <= 1 + cfg.ppo.dynamic_sampling_max_rounds for r in records)
