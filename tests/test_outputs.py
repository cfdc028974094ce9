"""Writing outputs: rlhf never deletes or overwrites a folder it did not make (rlhf.paths). No Ray here."""

from __future__ import annotations

import pytest

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
