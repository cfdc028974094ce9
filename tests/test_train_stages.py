"""SFT and reward-model stages: real Ray Train workers running DeepSpeed on the tiny model."""

from __future__ import annotations

import json
import random

import pytest
import torch

from cluster.runtime import ResourceError, init_ray
from rlhf.config import RayConfig, load_config
from rlhf.data import DataError
from rlhf.metrics import read_metrics
from rlhf.paths import DEFAULT_DATA_DIR, OutputError
from rlhf.training import STATE_FILE, TrainingError, check_resume_checkpoint, micro_batch_indices

pytestmark = pytest.mark.timeout(600)

RUDE_REPLIES = [
    "No. That is a stupid question and I hate answering it.",
    "Ugh, figure it out yourself, this is boring and pointless.",
    "Terrible idea. You will fail, so do not bother me.",
    "I do not care at all. Go away.",
    "That is awful and you are wrong about everything.",
    "Stop asking me useless things, it is annoying.",
]


@pytest.fixture(scope="module")
def ray_local():
    import ray

    init_ray(RayConfig(num_cpus=2))
    yield
    ray.shutdown()


def _records(name: str) -> list[dict]:
    return [json.loads(line) for line in (DEFAULT_DATA_DIR / name).read_text().splitlines()]


@pytest.fixture(scope="module")
def preference_files(tmp_path_factory) -> tuple[str, str]:
    """Pairs with a learnable signal: the shipped friendly reply is chosen over a rude one."""
    folder = tmp_path_factory.mktemp("pairs")
    rng = random.Random(0)
    paths = []
    for name, source in (("train.jsonl", "train.jsonl"), ("eval.jsonl", "eval.jsonl")):
        lines = [
            json.dumps({"prompt": r["prompt"], "chosen": r["response"], "rejected": rng.choice(RUDE_REPLIES)})
            for r in _records(source)
        ]
        (folder / name).write_text("\n".join(lines) + "\n")
        paths.append(str(folder / name))
    return paths[0], paths[1]


def _sft_config(tiny_model_dir, out, *overrides):
    return load_config("sft", "configs/tiny/sft.yaml", [
        f"model.path={tiny_model_dir}", f"output_dir={out}", "sample_prompts=[]",
        "data.max_records=160", "optim.epochs=1", "optim.eval_every=100", *overrides,
    ])


def _eval_losses(out):
    records = [r for r in read_metrics(out / "metrics.jsonl") if "eval/loss" in r]
    return records[0], records[-1]


def test_data_order_is_a_function_of_seed_and_step():
    args = dict(n_items=40, seed=3, batch_size=2, grad_accum=2, world=2)
    step = [micro_batch_indices(1, rank=r, **args) for r in range(2)]
    assert step == [micro_batch_indices(1, rank=r, **args) for r in range(2)]
    flat = [i for rank in step for micro in rank for i in micro]
    assert len(flat) == len(set(flat)) == 8  # ranks never share an example within a step
    epoch = [i for s in range(5) for r in range(2) for m in micro_batch_indices(s, rank=r, **args) for i in m]
    assert sorted(epoch) == list(range(40))  # one epoch visits every example once
    assert micro_batch_indices(5, rank=0, **args) != micro_batch_indices(0, rank=0, **args)  # reshuffled


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [2, 3])
def test_sft_lowers_held_out_loss(ray_local, tiny_model_dir, tmp_path, zero_stage):
    from rlhf.sft import run

    out = tmp_path / f"zero{zero_stage}"
    final = run(_sft_config(tiny_model_dir, out, f"deepspeed.zero_stage={zero_stage}"))
    first, last = _eval_losses(out)
    assert first["step"] == 0 and last["step"] == 10
    assert last["eval/loss"] < first["eval/loss"] - 0.5, (first, last)
    assert (final / "model.safetensors").is_file() and (final / "tokenizer.json").is_file()
    assert (out / "config.yaml").is_file() and list((out / "tensorboard").iterdir())
    assert not list(tmp_path.rglob("*.partial"))


@pytest.mark.slow
def test_lora_sft_adapter_reloads_to_the_merged_models_logits(ray_local, tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from rlhf.sft import run

    out = tmp_path / "lora"
    final = run(_sft_config(tiny_model_dir, out, "model.lora.r=8", "optim.learning_rate=5e-3",
                            "deepspeed.zero_stage=2", "optim.max_steps=4"))
    ids = torch.tensor([[5, 17, 42, 99, 7, 300]])
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out / "adapter").eval()
    merged = AutoModelForCausalLM.from_pretrained(final).eval()
    with torch.no_grad():
        base_logits, adapter_logits, merged_logits = base(ids).logits, adapted(ids).logits, merged(ids).logits
    assert not torch.allclose(adapter_logits, base_logits, atol=1e-3)  # training changed something
    torch.testing.assert_close(adapter_logits, merged_logits, atol=1e-5, rtol=1e-5)
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_reward_model_learns_and_reloads_in_plain_transformers(ray_local, tiny_model_dir, tmp_path, preference_files):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rlhf.data.tokenize import collate_preferences
    from rlhf.rm import run

    train, held_out = preference_files
    out = tmp_path / "rm"
    cfg = load_config("rm", None, [
        f"model.path={tiny_model_dir}", f"output_dir={out}", f"data.train_path={train}",
        f"data.eval_path={held_out}", "data.max_length=160", "data.max_prompt_length=64",
        "optim.learning_rate=1e-3", "optim.batch_size=8", "optim.epochs=1", "optim.eval_every=100",
        "scaling.workers=2", "deepspeed.zero_stage=2",
    ])
    final = run(cfg)
    last = read_metrics(out / "metrics.jsonl")[-1]
    assert last["eval/accuracy"] >= 0.9, last
    stats = json.loads((final / "reward_stats.json").read_text())
    assert stats["count"] == 2 * 320 and stats["std"] > 0

    # Plain transformers, no project code in the scoring path: same held-out accuracy.
    from rlhf.data import load_preference_data

    tokenizer = AutoTokenizer.from_pretrained(final)
    model = AutoModelForSequenceClassification.from_pretrained(final).eval()
    _, items = load_preference_data(cfg.data, tokenizer, seed=cfg.seed)
    batch = collate_preferences(items, tokenizer.pad_token_id)
    with torch.no_grad():
        scores = model(**batch).logits.squeeze(-1)
    chosen, rejected = scores[: len(items)], scores[len(items):]
    accuracy = (chosen > rejected).float().mean().item()
    assert accuracy == pytest.approx(last["eval/accuracy"], abs=1e-9)


@pytest.mark.slow
def test_resume_continues_from_the_same_step_with_the_same_data(ray_local, tiny_model_dir, tmp_path):
    from rlhf.sft import run

    common = ["deepspeed.zero_stage=2", "optim.max_steps=4", "optim.save_every=2", "optim.warmup_ratio=0"]
    full = tmp_path / "full"
    run(_sft_config(tiny_model_dir, full, *common))
    checkpoint = full / "ray_train" / "checkpoint_step_000002"
    assert (checkpoint / "trainer_state.json").is_file()
    # Safetensors and JSON only: nothing in a resume checkpoint is unpickled.
    assert (checkpoint / "model.safetensors").is_file() and (checkpoint / "optimizer" / "rank_00000.safetensors").is_file()
    assert not [p.name for p in checkpoint.rglob("*") if p.suffix in (".pt", ".bin", ".pkl")]

    a = {r["step"]: r for r in read_metrics(full / "metrics.jsonl")}
    # A rerun into the finished run's folder mixes nothing: refused before anything loads ...
    with pytest.raises(OutputError, match=f"{full} already holds a finished sft run.*resume_from={checkpoint}"):
        run(_sft_config(tiny_model_dir, full, *common))
    # ... or, from one of its checkpoints, continues there as after an interruption: at step 3, and
    # the steps it redoes are logged once.
    run(_sft_config(tiny_model_dir, full, *common, f"resume_from={checkpoint}"))
    records = read_metrics(full / "metrics.jsonl")
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4]
    b = {r["step"]: r for r in records}
    assert b[2] == a[2] and b[3]["time"] > a[4]["time"]  # kept up to the checkpoint, redone after it
    for step in (3, 4):
        assert b[step]["train/loss"] == pytest.approx(a[step]["train/loss"], abs=1e-4)
        assert b[step]["train/lr"] == pytest.approx(a[step]["train/lr"])
    assert (full / "done.json").is_file()


@pytest.mark.parametrize("saved, message", [
    ({"step": 2}, r"older version \(DeepSpeed pickles\)"),
    ({"step": 2, "layout": {"zero_stage": 3, "world_size": 1}}, r"saved with deepspeed.zero_stage=3 and scaling.workers=1"),
])
def test_a_resume_checkpoint_that_does_not_fit_is_refused_before_training(tiny_model_dir, tmp_path, saved, message):
    checkpoint = tmp_path / "checkpoint_step_000002"
    checkpoint.mkdir()
    (checkpoint / STATE_FILE).write_text(json.dumps(saved))
    with pytest.raises(TrainingError, match=message):
        check_resume_checkpoint(checkpoint, _sft_config(tiny_model_dir, tmp_path / "out", "deepspeed.zero_stage=2"))
    with pytest.raises(TrainingError, match="no trainer_state.json"):
        check_resume_checkpoint(tmp_path, _sft_config(tiny_model_dir, tmp_path / "out"))


def test_bad_input_fails_before_training(tiny_model_dir, tmp_path):
    from rlhf.rm import run as run_rm
    from rlhf.sft import run as run_sft

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="empty.jsonl"):
        run_sft(_sft_config(tiny_model_dir, tmp_path / "a", f"data.train_path={empty}"))

    # Prompt-only records: nothing to learn from. (Truncation itself always leaves a response token,
    # because the config requires max_prompt_length < max_length.)
    prompt_only = tmp_path / "prompts.jsonl"
    prompt_only.write_text(json.dumps({"prompt": "word " * 400}) + "\n" + json.dumps({"prompt": "hi"}) + "\n")
    with pytest.raises(DataError, match=r"prompts\.jsonl line \d+: field 'response'"):
        run_sft(_sft_config(tiny_model_dir, tmp_path / "b", f"data.train_path={prompt_only}"))

    same = tmp_path / "same.jsonl"
    same.write_text(json.dumps({"prompt": "hi", "chosen": "hello", "rejected": "hello"}) + "\n")
    with pytest.raises(DataError, match=r"same\.jsonl line 1"):
        run_rm(load_config("rm", None, [f"model.path={tiny_model_dir}", f"data.train_path={same}",
                                        f"output_dir={tmp_path / 'c'}"]))

    with pytest.raises(TrainingError, match="cannot fill one global batch"):
        run_sft(_sft_config(tiny_model_dir, tmp_path / "d", "data.max_records=10", "optim.batch_size=8"))
    assert not (tmp_path / "d" / "final").exists()


def test_unsatisfiable_worker_count_is_a_clear_error(ray_local, tiny_model_dir, tmp_path):
    from rlhf.sft import run

    with pytest.raises(ResourceError, match=r"scaling.workers=8.*missing CPU 6"):
        run(_sft_config(tiny_model_dir, tmp_path / "e", "scaling.workers=8", "data.max_records=200",
                        "optim.batch_size=2"))
    assert not (tmp_path / "e" / "final").exists()


def test_head_learning_rate_puts_the_score_head_in_its_own_group(tiny_model_dir):
    from rlhf.config import LoraConfig, ModelConfig
    from rlhf.models import attach_lora, load_scalar_model
    from rlhf.training import TrainingError, parameter_groups

    model = load_scalar_model(ModelConfig(path=str(tiny_model_dir)), device="cpu")
    (single,) = parameter_groups(model, 1e-5, None)
    assert len(single["params"]) == sum(p.requires_grad for p in model.parameters())
    backbone, head = parameter_groups(model, 1e-5, 1e-3)
    assert (backbone["lr"], head["lr"]) == (1e-5, 1e-3)
    assert [id(p) for p in head["params"]] == [id(model.score.weight)]

    lora = attach_lora(model, LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]), task_type="SEQ_CLS")
    backbone, head = parameter_groups(lora, 1e-5, 1e-3)
    assert head["params"] and all(p.requires_grad for p in head["params"])
    assert all(p.requires_grad for p in backbone["params"]) and len(backbone["params"]) == 2 * 2 * 2  # A, B x q, v x layers
    with pytest.raises(TrainingError, match="no trainable 'score' head"):
        parameter_groups(torch.nn.Linear(2, 2), 1e-5, 1e-3)


def test_a_lora_reward_model_scores_like_its_classification_output(tiny_model_dir):
    """sequence_scores reads the head at the last token; on a peft model it must unwrap it first."""
    from rlhf.config import LoraConfig, ModelConfig
    from rlhf.models import attach_lora, load_scalar_model, sequence_scores

    model = attach_lora(load_scalar_model(ModelConfig(path=str(tiny_model_dir)), device="cpu"),
                        LoraConfig(r=4, alpha=8, target_modules=["q_proj"]), task_type="SEQ_CLS")
    input_ids = torch.randint(5, 100, (2, 6))
    with torch.no_grad():
        scores = sequence_scores(model, input_ids, torch.ones_like(input_ids))
        expected = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids)).logits.squeeze(-1)
    torch.testing.assert_close(scores, expected)


class _RayTrainOnTheDriver:
    """Ray Train's TorchTrainer as the driver sees it, for Ctrl-C: called on the main thread, ``fit``
    installs Ray Train's own SIGINT handler (which aborts the run and ends the process with status 1
    and no message: ``sys.exit(1)`` here), then waits for the workers, which write checkpoints."""

    started = stop = None  # threading.Events: fit has started; the test has ended

    def __init__(self, *args, train_loop_config, **kwargs) -> None:
        self.output_dir = train_loop_config["cfg"].output_dir

    def fit(self):
        import signal
        import sys
        import threading
        from pathlib import Path

        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, lambda *_: sys.exit(1))
        self.started.set()
        for step, complete in ((2, True), (4, False)):  # the step-4 checkpoint is still being written
            folder = Path(self.output_dir) / "ray_train" / f"checkpoint_step_{step:06d}"
            (folder / "optimizer").mkdir(parents=True)
            (folder / STATE_FILE).write_text(json.dumps({"step": step, "layout": {"zero_stage": 2, "world_size": 1}}))
            if complete:
                (folder / "optimizer" / "rank_00000.safetensors").write_text("")
                (folder / "model.safetensors").write_text("")
        self.stop.wait(60)


def test_ctrl_c_during_sft_says_interrupted_and_how_to_continue(tiny_model_dir, tmp_path, monkeypatch, capsys):
    import os
    import signal
    import threading
    import time

    import cluster.runtime
    import ray.train.torch

    from rlhf.cli import main

    _RayTrainOnTheDriver.started, _RayTrainOnTheDriver.stop = threading.Event(), threading.Event()
    monkeypatch.setattr(ray.train.torch, "TorchTrainer", _RayTrainOnTheDriver)
    monkeypatch.setattr(cluster.runtime, "init_ray", lambda *_: None)
    monkeypatch.setattr(cluster.runtime, "check_resources", lambda *_, **__: None)
    out = tmp_path / "sft"
    argv = ["sft", f"model.path={tiny_model_dir}", f"output_dir={out}", "sample_prompts=[]", "data.max_records=64",
            "scaling.workers=1", "optim.batch_size=8"]
    previous = signal.getsignal(signal.SIGINT)
    # As in a terminal: a shell starts background jobs (`make test &`) with SIGINT ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)

    def press_ctrl_c():
        _RayTrainOnTheDriver.started.wait(120)
        time.sleep(0.5)  # the checkpoints are written
        if not _RayTrainOnTheDriver.stop.is_set():
            os.kill(os.getpid(), signal.SIGINT)

    ctrl_c = threading.Thread(target=press_ctrl_c, daemon=True)
    try:
        ctrl_c.start()
        status = main(argv)
    finally:
        _RayTrainOnTheDriver.stop.set()
        _RayTrainOnTheDriver.started.set()
        ctrl_c.join()
        signal.signal(signal.SIGINT, previous)
    err = capsys.readouterr().err
    assert status == 130, err
    assert f"interrupted; to continue: resume_from={out}/ray_train/checkpoint_step_000002" in err
    assert not (out / "done.json").exists()
    # Run again as it was: refused, with the same way to continue and the way to start over.
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"{out} already holds an unfinished sft run" in err and "checkpoint_step_000002" in err
    assert "overwrite=true" in err
