"""PPO with LoRA: the merge of adapter weights, the shared model-folder writer, and a real run on the
tiny model (reference = the policy with its adapter disabled, merged weights synced to vLLM, resume)."""

from __future__ import annotations

import pytest
import torch
from test_ppo import _cfg, _trained

from rlhf.config import LoraConfig, ModelConfig
from rlhf.metrics import read_metrics

IDS = torch.tensor([[5, 17, 42, 99, 7, 3]])


def _adapted(model_dir, loader, task_type: str):
    """A LoRA model whose adapter (and any trainable head copy) is non-zero, so merging matters."""
    from rlhf.models import attach_lora

    torch.manual_seed(0)
    model = attach_lora(loader(ModelConfig(path=str(model_dir), device="cpu")), LoraConfig(r=4, alpha=8),
                        task_type=task_type).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                param.normal_(std=0.5)
    return model


@pytest.mark.parametrize("task_type", ["CAUSAL_LM", "SEQ_CLS"])
def test_merged_state_dict_matches_peft_merge(tiny_model_dir, task_type):
    from rlhf.models import load_causal_lm, load_scalar_model
    from rlhf.models.lora import lora_scaling, merged_state_dict

    model = _adapted(tiny_model_dir, load_causal_lm if task_type == "CAUSAL_LM" else load_scalar_model, task_type)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    merged = merged_state_dict(state, lora_scaling(model))
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())  # the model is untouched
    expected = model.merge_and_unload().state_dict()  # peft's own (in-place) merge
    assert sorted(merged) == sorted(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(merged[name], tensor, atol=1e-6, rtol=1e-6, msg=name)
    with pytest.raises(ValueError, match="not a peft state dict"):
        merged_state_dict(expected, 2.0)


def test_shared_writer_saves_merged_folder_and_adapter(tiny_model_dir, tiny_tokenizer, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from rlhf.models import load_causal_lm
    from rlhf.models.saving import save_model_folder

    model = _adapted(tiny_model_dir, load_causal_lm, "CAUSAL_LM")
    with torch.no_grad():
        adapted = model(IDS).logits
    final = save_model_folder(model, tiny_tokenizer, tmp_path / "final", adapter_out=tmp_path / "adapter")
    assert not (tmp_path / "final.partial").exists()
    plain = AutoModelForCausalLM.from_pretrained(final).eval()  # plain transformers, no peft
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(plain(IDS).logits, adapted, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(reloaded.eval()(IDS).logits, adapted, atol=1e-5, rtol=1e-5)
    only = save_model_folder(model, tiny_tokenizer, tmp_path / "only", adapter_only=True)
    assert (only / "adapter_config.json").is_file() and not (only / "model.safetensors").exists()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_lora_ppo_reference_from_policy_learns_syncs_merged_weights_and_resumes(tiny_model_dir, tmp_path):
    """One model copy: the policy with its adapter off is the reference, so KL starts at 0 and no
    ReferenceModel actor exists. The engine samples from merged weights after every sync (its
    logprobs match the learner's), the reward rises, final/ loads in plain transformers, and a run
    resumed from a checkpoint restores the adapter (same next step)."""
    import ray
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from rlhf.ppo import run

    # LoRA on attention and the LM head: the tiny random model's output depends mostly on lm_head.
    lora = ["model.lora.r=8", "model.lora.alpha=16", "model.lora.target_modules=[q_proj,v_proj,lm_head]",
            "ppo.advantage=grpo", "ppo.kl.coef=0.001", "ppo.policy_learning_rate=1e-2", "steps=14",
            "save_every=6", "keep_checkpoints=2"]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    try:
        run(_cfg(tiny_model_dir, full, *lora))
        # The public state API needs the dashboard, which init_ray leaves off; GCS's table lists
        # every actor the run created, dead ones included.
        classes = {actor["ActorClassName"] for actor in ray._private.state.actors().values()}
        ray.shutdown()
        run(_cfg(tiny_model_dir, resumed, *lora, f"resume_from={full / 'checkpoints' / 'step_000012'}"))
    finally:
        ray.shutdown()
    assert "PolicyLearner" in classes and "ReferenceModel" not in classes, classes

    records = _trained(full)
    assert len(records) == 14
    assert abs(records[0]["kl/mean"]) < 1e-5  # reference = policy before the first update
    assert records[-1]["kl/mean"] > 0.05  # ... and the policy moved away from it afterwards
    diffs = [r["rollout/logprob_diff"] for r in records]
    assert max(diffs) < 1e-4, diffs  # after each sync the engine holds the merged policy
    rewards = [r["reward/mean"] for r in records]
    # A seeded run here went 0.098 -> 0.17 (means of the first and last three steps).
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.04, rewards

    plain = AutoModelForCausalLM.from_pretrained(full / "final").eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), full / "adapter").eval()
    with torch.no_grad():
        final_logits = plain(IDS).logits
        torch.testing.assert_close(final_logits, adapted(IDS).logits, atol=1e-4, rtol=1e-4)
        assert not torch.allclose(final_logits, base(IDS).logits, atol=1e-3)

    # Resumed from step 12: step 13 samples from the same merged weights with the same seed, and
    # its KL (policy versus the base) is the same only if the adapter came back on the base.
    a = {r["step"]: r for r in records}
    b = {r["step"]: r for r in read_metrics(resumed / "metrics.jsonl")}
    assert sorted(b) == [13, 14]
    assert b[13]["response/length"] == a[13]["response/length"]
    assert b[13]["reward/mean"] == pytest.approx(a[13]["reward/mean"], abs=1e-6)
    assert b[13]["kl/mean"] == pytest.approx(a[13]["kl/mean"], abs=1e-3)
