"""The bad-input corpus (tests/bad_inputs/corpus.yaml): data files, YAML configs and command lines,
each through the `rlhf` command. Every case must exit with status 2, print a clear error (the corpus
names what it must contain: the file and line, the key or field), and write nothing. The corpus's
HTTP cases run in tests/test_serve.py against the real serve app."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from rlhf.cli import main

CORPUS = yaml.safe_load((Path(__file__).parent / "bad_inputs" / "corpus.yaml").read_text())


def test_the_corpus_is_large_enough_and_ids_are_unique():
    ids = [case["id"] for section in CORPUS.values() for case in section]
    assert len(ids) >= 30 and len(set(ids)) == len(ids)
    assert set(CORPUS) == {"data", "config", "cli", "http"}


def run_cli(argv: list[str], scratch: Path, capsys, monkeypatch) -> tuple[int, str]:
    """``rlhf ARGV`` with the scratch folder as working directory; (exit status, stderr)."""
    monkeypatch.chdir(scratch)
    try:
        status = main(argv)
    except SystemExit as exc:  # argparse's own errors
        status = exc.code
    return status, capsys.readouterr().err


def assert_clear_failure(status: int, err: str, expect: list[str], scratch: Path, inputs: set[str]) -> None:
    assert status == 2, f"exit status {status}; stderr:\n{err}"
    for text in expect:
        assert text in err, f"{text!r} not in the error:\n{err}"
    assert "Traceback" not in err
    left = {p.name for p in scratch.iterdir()} - inputs
    assert not left, f"a failed command wrote {sorted(left)}"


@pytest.mark.parametrize("case", CORPUS["data"], ids=[c["id"] for c in CORPUS["data"]])
def test_bad_data_file(case, tiny_model_dir, tmp_path, capsys, monkeypatch):
    data = tmp_path / case["file"]
    data.write_text(case["content"])
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    argv = [case["stage"], f"data.train_path={data}", f"model.path={tiny_model_dir}", "output_dir=out"]
    status, err = run_cli(argv, scratch, capsys, monkeypatch)
    assert_clear_failure(status, err, [t.replace("{file}", str(data)) for t in case["expect"]], scratch, set())


@pytest.mark.parametrize("case", CORPUS["config"], ids=[c["id"] for c in CORPUS["config"]])
def test_bad_config_file(case, tmp_path, capsys, monkeypatch):
    config = tmp_path / "config.yaml"
    config.write_text(case["yaml"])
    status, err = run_cli(["config", "show", case["stage"], "-c", str(config)], tmp_path, capsys, monkeypatch)
    assert_clear_failure(status, err, case["expect"], tmp_path, {"config.yaml"})


@pytest.mark.parametrize("case", CORPUS["cli"], ids=[c["id"] for c in CORPUS["cli"]])
def test_bad_command_line(case, tmp_path, capsys, monkeypatch):
    files = case.get("files", {})  # made in the scratch folder first; they must come out untouched
    for name, content in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(content)
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    status, err = run_cli([str(a) for a in case["argv"]], tmp_path, capsys, monkeypatch)
    assert_clear_failure(status, err, case["expect"], tmp_path, {name.split("/")[0] for name in files})
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before
    assert all((tmp_path / name).read_text() == content for name, content in files.items())
