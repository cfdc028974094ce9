"""Typed configs: defaults, YAML, dotted overrides, and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from rlhf.cli import main
from rlhf.config import STAGES, ConfigError, PPOConfig, dump_config, load_config, save_config


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_stage_has_valid_defaults(stage):
    cfg = load_config(stage)
    assert cfg.seed == 42
    assert cfg.output_dir.startswith("runs/")


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "ppo.yaml"
    path.write_text("seed: 7\nppo:\n  kl:\n    coef: 0.1\n    estimator: k3\nmodel:\n  path: tiny\n")
    cfg = load_config("ppo", path, ["ppo.kl.coef=0.05", "output_dir=runs/x", "rollout.sampling.stop=[a, b]"])
    assert isinstance(cfg, PPOConfig)
    assert cfg.seed == 7
    assert cfg.ppo.kl.coef == 0.05 and cfg.ppo.kl.estimator == "k3"
    assert cfg.model.path == "tiny"
    assert cfg.output_dir == "runs/x"
    assert cfg.rollout.sampling.stop == ["a", "b"]


def test_override_creates_optional_section():
    cfg = load_config("sft", None, ["model.lora.r=4"])
    assert cfg.model.lora is not None and cfg.model.lora.r == 4 and cfg.model.lora.alpha == 16


def test_unknown_key_names_it_and_lists_valid_keys(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("ppo:\n  kl:\n    coeff: 0.1\n")
    with pytest.raises(ConfigError) as info:
        load_config("ppo", path)
    message = str(info.value)
    assert "ppo.kl.coeff" in message and str(path) in message
    assert "coef" in message and "estimator" in message and "horizon" in message


def test_unknown_top_level_key():
    with pytest.raises(ConfigError, match=r"unknown key 'learning_rate'.*valid keys here: .*optim"):
        load_config("sft", None, ["learning_rate=0.1"])


def test_wrong_type_names_key_and_value():
    with pytest.raises(ConfigError, match=r"optim\.batch_size: .*integer.*'lots'"):
        load_config("sft", None, ["optim.batch_size=lots"])


def test_out_of_range_and_choice_errors():
    with pytest.raises(ConfigError, match=r"rollout\.sampling\.temperature"):
        load_config("ppo", None, ["rollout.sampling.temperature=-1"])
    with pytest.raises(ConfigError, match=r"ppo\.kl\.estimator"):
        load_config("ppo", None, ["ppo.kl.estimator=k9"])
    with pytest.raises(ConfigError, match=r"deepspeed\.zero_stage"):
        load_config("sft", None, ["deepspeed.zero_stage=4"])


def test_cross_field_checks():
    with pytest.raises(ConfigError, match="max_prompt_length"):
        load_config("sft", None, ["data.max_length=64", "data.max_prompt_length=64"])
    with pytest.raises(ConfigError, match="exactly one of path, function, url"):
        load_config("ppo", None, ["reward.path=rm", "reward.url=http://127.0.0.1:1"])
    with pytest.raises(ConfigError, match="phase_split"):
        load_config("sft", None, ["data.phase_split=2,4"])


def test_invalid_yaml_names_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("seed: 1\nmodel:\n  path: [unclosed\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml: line \d+"):
        load_config("sft", path)


def test_top_level_must_be_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config("sft", path)


def test_missing_file_and_bad_override_syntax(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("sft", tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="KEY.PATH=VALUE"):
        load_config("sft", None, ["seed"])
    with pytest.raises(ConfigError, match="seed is not a section"):
        load_config("sft", None, ["seed=1", "seed.x=1"])
    with pytest.raises(ConfigError, match=r"seed: .*integer.*\(got a mapping\)"):
        load_config("sft", None, ["seed.x=1"])


def test_dump_masks_secrets_and_save_round_trips(tmp_path):
    cfg = load_config("serve", None, ["api_key=sk-very-secret"])
    text = dump_config(cfg)
    assert "sk-very-secret" not in text and "api_key: '***'" in text
    path = save_config(load_config("sft", None, ["seed=3"]), tmp_path / "run")
    assert path == tmp_path / "run" / "config.yaml"
    assert load_config("sft", path).seed == 3
    assert not list((tmp_path / "run").glob("*.tmp"))


def test_cli_config_show(capsys):
    assert main(["config", "show", "ppo", "ppo.kl.coef=0.2"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["ppo"]["kl"]["coef"] == 0.2
    assert shown["rollout"]["backend"] == "vllm"


def test_cli_reports_config_errors_without_traceback(capsys):
    assert main(["config", "show", "sft", "optim.nope=1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "optim.nope" in err and "Traceback" not in err


@pytest.mark.parametrize("name,secret", [
    ("api_key", True), ("HF_TOKEN", True), ("RAY_AUTH_TOKEN", True), ("AWS_SECRET_ACCESS_KEY", True),
    ("WANDB_API_KEY", True), ("db_password", True), ("token", True), ("client_secret_id", True),
    ("max_new_tokens", False), ("min_new_tokens", False), ("stop_token_ids", False), ("default_max_tokens", False),
    ("keep_checkpoints", False), ("monkey", False),
])
def test_secret_looking_names(name, secret):
    from rlhf.config import SECRET_KEY

    assert bool(SECRET_KEY.search(name)) is secret


def test_dump_keeps_token_counts_visible():
    text = dump_config(load_config("serve", None, ["api_key=sk-x", "default_max_tokens=77"]))
    assert "default_max_tokens: 77" in text and "sk-x" not in text
    assert "max_new_tokens: 64" in dump_config(load_config("ppo"))


def test_a_partial_override_keeps_the_sections_preset_values():
    """pairs.rollout samples n=4 and eval.sampling uses temperature 0.7 by default: setting one other
    key of those sections (as `rlhf run --quick` does) must not reset them to the plain class defaults."""
    cfg = load_config("run", None, ["pairs.rollout.sampling.max_new_tokens=24", "eval.sampling.max_new_tokens=24"])
    assert (cfg.pairs.rollout.sampling.n, cfg.pairs.rollout.sampling.max_new_tokens) == (4, 24)
    assert (cfg.eval.sampling.temperature, cfg.eval.sampling.max_new_tokens) == (0.7, 24)
    assert load_config("pairs", None, ["rollout.sampling.n=6"]).rollout.sampling.n == 6  # the user still wins


def test_quick_preset_is_valid_without_a_config_file():
    from rlhf.pipeline import QUICK_OVERRIDES

    cfg = load_config("run", None, QUICK_OVERRIDES)
    assert cfg.model.path == "tiny" and cfg.pairs.rollout.sampling.n >= 2


@pytest.mark.parametrize("avx512_bf16, amx, expected", [(True, False, "bfloat16"), (False, True, "bfloat16"),
                                                        (False, False, "float32")])
def test_dtype_auto_is_bfloat16_only_where_the_cpu_computes_it_natively(monkeypatch, avx512_bf16, amx, expected):
    import torch

    from rlhf.config import ModelConfig

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert ModelConfig(dtype="auto").dtype == expected
    assert ModelConfig(dtype="float32").dtype == "float32"


def test_options_and_overrides_mix_in_any_order():
    from rlhf.cli import parse_args

    args = parse_args(["serve", "runs/demo/ppo/final", "--port", "9000", "api_key=k", "max_replicas=2"])
    assert (args.port, args.overrides) == (9000, ["runs/demo/ppo/final", "api_key=k", "max_replicas=2"])
    args = parse_args(["submit", "run", "-c", "configs/demo.yaml", "--no-wait", "--env", "A=1", "output_dir=x"])
    assert args.no_wait and args.env == ["A=1"] and args.overrides == ["output_dir=x"]


def _readme_commands() -> list[str]:
    """Every `rlhf ...` command line the README shows (placeholders such as ID or [--wait] aside)."""
    import re

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    lines, fenced = [], False
    for line in readme.splitlines():
        fenced ^= line.startswith("```")
        if fenced or line.startswith("    "):  # code: a fenced block or an indented one
            lines.append(line.split("  #")[0].strip())
    return [re.sub(r"\$\([^)]*\)", "0123abcd", line) for line in lines
            if line.startswith("rlhf ") and " ID" not in line and "[" not in line]


@pytest.mark.parametrize("command", _readme_commands())
def test_each_readme_command_line_parses_and_its_config_loads(command, monkeypatch):
    """As written in the README: the command line parses and a stage's config (with its overrides)
    is valid. (Running them is the job of the stage tests.)"""
    import shlex

    from rlhf.cli import _serve_overrides, parse_args

    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    args = parse_args(shlex.split(command)[1:])
    stage = args.stage if args.command in ("submit", "config") else args.command
    if stage in STAGES and hasattr(args, "overrides"):
        overrides = _serve_overrides(args, args.overrides) if args.command == "serve" else args.overrides
        assert load_config(stage, args.config, overrides) is not None


def test_readme_shows_command_lines():
    assert len(_readme_commands()) >= 12


def test_text_fields_keep_override_text_that_yaml_would_retype():
    cfg = load_config("serve", None, ["model_name=12345678", "api_key=yes"])
    assert (cfg.model_name, cfg.api_key) == ("12345678", "yes")
    assert load_config("serve", None, ["port=9000"]).port == 9000  # typed fields still get YAML's types
    assert load_config("serve", None, ["model_name=null"]).model_name is None


def test_an_empty_api_key_variable_is_an_error_not_no_key(monkeypatch):
    from cluster.serving import API_KEY_ENV, resolve_api_key

    cfg = load_config("serve", None, [])
    monkeypatch.setenv(API_KEY_ENV, " ")
    with pytest.raises(ConfigError, match="set but empty"):
        resolve_api_key(cfg)
    monkeypatch.setenv(API_KEY_ENV, "k")
    assert resolve_api_key(cfg) == "k"
    monkeypatch.delenv(API_KEY_ENV)
    assert resolve_api_key(cfg) is None
