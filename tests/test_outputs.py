"""Writing outputs: rlhf never deletes or overwrites a folder it did not make (rlhf.paths), and a rerun
into a stage's output_dir refuses, continues or starts over, never mixes (rlhf.outputs). No Ray here."""

from __future__ import annotations

import json

import pytest

from rlhf.config import load_config
from rlhf.outputs import DONE_FILE, StageOutput, is_current, upstream_records
from rlhf.paths import MARKER, OutputError, claim_dir, is_ours, replace_dir, write_atomic


def _fill(staging):
    (staging / "weights").write_text("new")


def test_replace_dir_refuses_a_folder_rlhf_did_not_make_and_replaces_its_own(tmp_path):
    theirs = tmp_path / "final"
    (theirs / "sub").mkdir(parents=True)
    (theirs / "thesis.txt").write_text("x")
    with pytest.raises(OutputError, match=rf"{theirs} already exists and was not made by rlhf.*overwrite=true"):
        replace_dir(theirs, _fill)
    assert (theirs / "thesis.txt").read_text() == "x" and not (tmp_path / "final.partial").exists()

    ours = replace_dir(tmp_path / "model", _fill)
    assert is_ours(ours) and (ours / "weights").read_text() == "new"
    (ours / "stale").write_text("old run")
    replace_dir(ours, _fill)  # rlhf's own folder: replaced whole
    assert sorted(p.name for p in ours.iterdir()) == [MARKER, "weights"]

    replace_dir(theirs, _fill, overwrite=True)  # only when the user says so
    assert not (theirs / "thesis.txt").exists() and is_ours(theirs)


def test_replace_dir_refuses_a_file_a_link_and_a_staging_folder_it_did_not_make(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="is a file, not a folder"):
        replace_dir(tmp_path / "file", _fill)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(OutputError, match="symbolic link"):
        replace_dir(tmp_path / "link", _fill)
    (tmp_path / "final.partial").mkdir()
    (tmp_path / "final.partial" / "notes").write_text("x")
    with pytest.raises(OutputError, match="final.partial already exists"):
        replace_dir(tmp_path / "final", _fill)
    assert (tmp_path / "final.partial" / "notes").is_file() and not (tmp_path / "final").exists()


def test_a_failed_fill_leaves_the_previous_folder(tmp_path):
    ours = replace_dir(tmp_path / "model", _fill)

    def broken(staging):
        (staging / "weights").write_text("half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        replace_dir(ours, broken)
    assert (ours / "weights").read_text() == "new" and not (tmp_path / "model.partial").exists()


def test_model_writers_keep_a_users_folder(tiny_model_dir, tmp_path):
    """The stages' final/ and adapter/ go through save_model_folder: a user's folder there stays."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf.models.saving import save_model_folder
    from rlhf.ppo import copy_folder

    out = tmp_path / "final"
    out.mkdir()
    (out / "mine.txt").write_text("x")
    model, tokenizer = AutoModelForCausalLM.from_pretrained(tiny_model_dir), AutoTokenizer.from_pretrained(tiny_model_dir)
    with pytest.raises(OutputError, match="final already exists and was not made by rlhf"):
        save_model_folder(model, tokenizer, out)
    with pytest.raises(OutputError, match="final already exists and was not made by rlhf"):
        copy_folder(tiny_model_dir, out)
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    saved = save_model_folder(model, tokenizer, tmp_path / "fresh")
    assert is_ours(saved) and (saved / "model.safetensors").is_file()


def test_claim_dir_accepts_a_new_an_empty_or_its_own_folder(tmp_path):
    assert is_ours(claim_dir(tmp_path / "a" / "b"))
    (tmp_path / "empty").mkdir()
    assert is_ours(claim_dir(tmp_path / "empty"))
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "thesis.txt").write_text("x")
    with pytest.raises(OutputError, match="home already exists and was not made by rlhf"):
        claim_dir(tmp_path / "home")
    assert not is_ours(tmp_path / "home")


def test_write_atomic_into_a_file_is_a_clear_error(tmp_path):
    (tmp_path / "out").write_text("x")
    with pytest.raises(OutputError, match="out is a file, not a folder"):
        write_atomic(tmp_path / "out" / "eval.json", "{}")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def _sft(out, *overrides):
    return load_config("sft", None, [f"output_dir={out}", *overrides])


def _previous_run(out, finished=True):
    """What an sft run leaves: its folder, config, metrics, model, a checkpoint; and a user's file."""
    claim_dir(out)
    (out / "config.yaml").write_text("seed: 1\n")
    (out / "metrics.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in range(5)))
    replace_dir(out / "final", _fill)
    (out / "ray_train" / "checkpoint_step_000002").mkdir(parents=True)
    (out / "notes.txt").write_text("mine")
    if finished:
        (out / DONE_FILE).write_text("{}")


def test_a_rerun_into_a_previous_run_is_refused_naming_how_to_continue_or_start_over(tmp_path):
    out = tmp_path / "sft"
    _previous_run(out)
    with pytest.raises(OutputError) as refused:
        StageOutput(_sft(out), "sft", lambda: [out / "ray_train" / "checkpoint_step_000002"])
    message = str(refused.value)
    assert f"{out} already holds a finished sft run" in message
    assert f"resume_from={out}/ray_train/checkpoint_step_000002" in message and "overwrite=true" in message
    assert (out / "metrics.jsonl").read_text().count("step") == 5  # nothing touched


def test_overwrite_starts_over_deleting_only_the_previous_runs_outputs(tmp_path):
    out = tmp_path / "sft"
    _previous_run(out)
    output = StageOutput(_sft(out, "overwrite=true"), "sft")
    output.begin()
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "config.yaml", "notes.txt"]
    output.finish()
    assert is_current(_sft(out)) and not is_current(_sft(out, "seed=7"))


def test_resuming_from_its_own_checkpoint_continues_and_keeps_the_history(tmp_path):
    out = tmp_path / "sft"
    _previous_run(out)
    output = StageOutput(_sft(out, f"resume_from={out / 'ray_train' / 'checkpoint_step_000002'}"), "sft")
    output.begin()
    assert not (out / DONE_FILE).exists()  # not done until it finishes again
    assert (out / "final" / "weights").is_file() and (out / "metrics.jsonl").read_text().count("step") == 5
    # What the continued run replaces at its end must be rlhf's: refused now, not after training.
    (out / "adapter").mkdir()
    (out / "adapter" / "mine.txt").write_text("x")
    with pytest.raises(OutputError, match="adapter already exists and was not made by rlhf"):
        StageOutput(_sft(out, f"resume_from={out / 'ray_train' / 'checkpoint_step_000002'}"), "sft")
    # A checkpoint of another run is no way to continue this one.
    other = tmp_path / "other" / "checkpoint_step_000002"
    other.mkdir(parents=True)
    with pytest.raises(OutputError, match="already holds an unfinished sft run"):
        StageOutput(_sft(out, f"resume_from={other}"), "sft")


def test_an_interrupted_run_is_not_current(tmp_path):
    out = tmp_path / "sft"
    output = StageOutput(_sft(out), "sft")
    output.begin()
    (out / "final").mkdir()
    assert (out / "config.yaml").is_file() and not is_current(_sft(out))  # config and final/, no record
    output.finish()
    assert is_current(_sft(out, "overwrite=true"))  # keys that do not change the result are not in it


def test_upstream_records_name_every_finished_rlhf_output_a_config_reads(tmp_path):
    from rlhf.pipeline import stage_configs

    configs = stage_configs(load_config("run", None, [f"output_dir={tmp_path}"]))
    for stage in ("sft", "pairs", "rm", "ppo"):
        folder = tmp_path / stage
        folder.mkdir()
        (folder / DONE_FILE).write_text(json.dumps({"stage": stage}))
        (folder / "final").mkdir()
    (tmp_path / "pairs" / "pairs.jsonl").write_text("{}\n")
    (tmp_path / "ppo" / "metrics.jsonl").write_text("{}\n")
    reads = {stage: sorted({p.split("/")[-2] for p in upstream_records(cfg)}) for stage, cfg in configs.items()}
    assert reads == {"sft": [], "pairs": ["sft"], "rm": ["pairs", "sft"], "ppo": ["rm", "sft"],
                     "eval": ["pairs", "ppo", "rm", "sft"]}
