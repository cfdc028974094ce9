"""Security defaults: weights only from safetensors (a pickled checkpoint is refused everywhere we
load weights), no model code runs unless the config says so, the serve app binds loopback and checks
the API key in constant time, and configs and job commands mask secret values."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from rlhf.config import STAGES, ModelConfig, load_config


@pytest.fixture(scope="module")
def pickled_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model with its weights as a pickle (pytorch_model.bin) and no safetensors file."""
    out = tmp_path_factory.mktemp("pickled")
    for item in tiny_model_dir.iterdir():
        if item.suffix != ".safetensors":
            shutil.copy(item, out / item.name)
    state = {k: v.clone() for k, v in __import__("safetensors.torch").torch.load_file(
        str(tiny_model_dir / "model.safetensors")).items()}
    torch.save(state, out / "pytorch_model.bin")
    return out


def test_causal_lm_and_scalar_models_refuse_pickled_weights(pickled_model_dir):
    from rlhf.models import load_causal_lm
    from rlhf.models.heads import load_scalar_model
    from rlhf.models.loading import ModelLoadError

    with pytest.raises(ModelLoadError, match=str(pickled_model_dir)):
        load_causal_lm(ModelConfig(path=str(pickled_model_dir)))
    with pytest.raises(ModelLoadError, match=str(pickled_model_dir)):
        load_scalar_model(ModelConfig(path=str(pickled_model_dir)))


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_vllm_engine_refuses_pickled_weights(pickled_model_dir):
    from rlhf.generation import VLLMBackend

    with pytest.raises(Exception, match="safetensors"):
        VLLMBackend(str(pickled_model_dir), max_model_len=256, kv_cache_gib=0.1)


def test_served_adapter_must_be_safetensors(tiny_model_dir, tmp_path):
    from cluster.serving import merge_adapter

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    torch.save({}, adapter / "adapter_model.bin")
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        merge_adapter(ModelConfig(path=str(tiny_model_dir)), str(adapter), str(tmp_path / "merged"))
    assert not (tmp_path / "merged").exists()


def test_model_code_runs_only_when_the_config_says_so(tiny_model_dir, tmp_path):
    """A folder whose config points at custom code: refused by default, and every stage's model
    sections default trust_remote_code to off."""
    from rlhf.models import load_causal_lm

    remote = tmp_path / "remote"
    shutil.copytree(tiny_model_dir, remote)
    config = json.loads((remote / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "evil.EvilModel"}
    (remote / "config.json").write_text(json.dumps(config))
    (remote / "evil.py").write_text("raise SystemExit('custom code ran')\n")
    model = load_causal_lm(ModelConfig(path=str(remote)))  # the built-in class; evil.py never runs
    assert type(model).__name__ == "LlamaForCausalLM"
    with pytest.raises(SystemExit, match="custom code ran"):  # what the switch would allow
        load_causal_lm(ModelConfig(path=str(remote), trust_remote_code=True))

    def model_sections(node, where=""):
        if isinstance(node, ModelConfig):
            yield where, node
        elif hasattr(node, "model_fields"):
            for name in type(node).model_fields:
                yield from model_sections(getattr(node, name), f"{where}.{name}")

    for stage, cls in STAGES.items():
        for where, section in model_sections(cls()):
            assert section.trust_remote_code is False, f"{stage}{where}.trust_remote_code defaults to on"


def test_serve_binds_loopback_by_default_and_warns_without_a_key_elsewhere(caplog, monkeypatch, tmp_path):
    from rlhf import serve

    assert load_config("serve").host == "127.0.0.1"
    monkeypatch.delenv("RLHF_API_KEY", raising=False)
    # Stop right after the checks, before Ray: the port probe is the last step before it.
    monkeypatch.setattr(serve, "_check_port_free", lambda host, port: (_ for _ in ()).throw(KeyboardInterrupt))
    cfg = load_config("serve", None, ["model.path=tiny", "host=0.0.0.0", f"output_dir={tmp_path}"])
    with caplog.at_level("WARNING", logger="rlhf.serve"), pytest.raises(KeyboardInterrupt):
        serve.run(cfg)
    assert "without an API key" in caplog.text


def test_serve_refuses_a_ray_without_authentication_unless_told(monkeypatch, tmp_path):
    """With RAY_AUTH_MODE=disabled Ray's ports run code from anyone who reaches them: serving stops
    before anything starts, naming the variable and the override; with the override it goes on."""
    from rlhf import serve
    from rlhf.config import ConfigError

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.setattr(serve, "_check_port_free", lambda host, port: (_ for _ in ()).throw(KeyboardInterrupt))
    cfg = load_config("serve", None, ["model.path=tiny", f"output_dir={tmp_path / 'out'}"])
    with pytest.raises(ConfigError, match="RAY_AUTH_MODE=disabled.*allow_ray_without_auth=true"):
        serve.run(cfg)
    assert not (tmp_path / "out").exists()
    with pytest.raises(KeyboardInterrupt):  # told: it goes on to the next check
        serve.run(cfg.model_copy(update={"allow_ray_without_auth": True}))


def test_api_key_is_compared_in_constant_time(monkeypatch):
    """The check goes through hmac.compare_digest (its time does not depend on where the first
    difference is), for right and wrong keys alike."""
    import hmac

    from cluster import serving
    from rlhf.openai_api import APIError

    calls = []
    real = hmac.compare_digest
    monkeypatch.setattr(serving.hmac, "compare_digest", lambda a, b: calls.append((a, b)) or real(a, b))

    class FakeRequest:
        def __init__(self, header):
            self.headers = {"authorization": header} if header else {}

    server = object.__new__(serving.OpenAIServer.func_or_class)
    server.api_key = "s3cret-key"
    server._authorize(FakeRequest("Bearer s3cret-key"))
    with pytest.raises(APIError) as wrong:
        server._authorize(FakeRequest("Bearer s3cret-kez"))
    assert wrong.value.status == 401
    assert calls == [(b"s3cret-key", b"s3cret-key"), (b"s3cret-kez", b"s3cret-key")]


def test_secrets_are_masked_in_config_dumps_and_job_commands():
    from cluster.jobs import mask_override
    from rlhf.config import dump_config

    text = dump_config(load_config("serve", None, ["api_key=sk-live-123"]))
    assert "sk-live-123" not in text and "api_key: '***'" in text
    assert mask_override("serve.api_key=sk-live-123") == "serve.api_key=***"
    assert mask_override("job.env_vars.HF_TOKEN=hf_abc") == "job.env_vars.HF_TOKEN=***"
    assert mask_override("rollout.sampling.max_new_tokens=64") == "rollout.sampling.max_new_tokens=64"


def test_credentials_in_urls_and_job_env_values_are_masked(capsys):
    from cluster.jobs import describe_runtime_env, mask_override
    from rlhf.cli import main
    from rlhf.config import dump_config, mask_url

    assert mask_url("https://alice:hunter2@h.example/score?api_key=k1&n=2") == "https://alice:***@h.example/score?api_key=***&n=2"
    assert mask_url("https://tok123@h.example/x?sig=abc&token=t9") == "https://***@h.example/x?sig=***&token=***"
    assert mask_url("runs/demo/rm/final") == "runs/demo/rm/final"
    assert mask_override("reward.url=https://u:pw9@h/x") == "reward.url=https://u:***@h/x"
    url = "http://scorer:pw9@127.0.0.1:9/score?key=qk1secret"
    text = dump_config(load_config("ppo", None, [f"reward.url={url}", "job.env_vars.DATABASE_URL=postgres://db",
                                                 "job.env_vars.GITHUB_PAT=ghp_1", "job.env_vars.AUTH=x1",
                                                 "job.env_vars.RLHF_HOME=/mnt/cache"]))
    for secret in ("pw9", "qk1secret", "postgres://db", "ghp_1", "x1"):
        assert secret not in text, secret
    assert "/mnt/cache" in text  # a known-safe variable stays readable
    env_line = describe_runtime_env({"env_vars": {"DATABASE_URL": "postgres://u:p@db", "OMP_NUM_THREADS": "4"}})[1]
    assert env_line == "env: DATABASE_URL=*** OMP_NUM_THREADS=4"
    # nor in errors: a mistyped secret is not echoed back
    assert main(["config", "show", "serve", "job.env_vars.HF_TOKEN=[sk-live-9]"]) == 2
    assert "sk-live-9" not in capsys.readouterr().err


def _record(out: Path, **state) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "serve.json").write_text(json.dumps({"url": "http://127.0.0.1:8000", **state}))


def test_serve_stop_signals_only_the_server_its_record_names(tmp_path, capsys):
    """A stale serve.json whose pid now belongs to another program must not stop that program."""
    import subprocess

    from rlhf.serve import _process_identity, stop

    cfg = load_config("serve", None, [f"output_dir={tmp_path / 'serve'}"])
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        # The record of a server that died, its pid since reused by `sleep` (another start time).
        _record(tmp_path / "serve", pid=bystander.pid, started=1.0, cmdline=["python", "rlhf", "serve"])
        assert stop(cfg) is False
        assert bystander.poll() is None, "an unrelated process was signalled"
        assert "stale record (nothing was signalled)" in capsys.readouterr().out
        assert not (tmp_path / "serve" / "serve.json").exists()
        # The record of this very process (as a server writes it): that one is stopped.
        _record(tmp_path / "serve", pid=bystander.pid, **_process_identity(bystander.pid))
        assert stop(cfg, timeout_s=10) is True
        assert bystander.wait(10) == -15  # SIGTERM
    finally:
        bystander.kill()


@pytest.mark.parametrize("state", [{"pid": -1}, {"pid": 0}, {"pid": 1}, {"pid": "12"}, {"pid": True}, {}])
def test_serve_stop_refuses_a_record_rlhf_did_not_write(state, tmp_path):
    from rlhf.config import ConfigError
    from rlhf.serve import stop

    _record(tmp_path / "serve", **state)
    cfg = load_config("serve", None, [f"output_dir={tmp_path / 'serve'}"])
    with pytest.raises(ConfigError, match="must be a process id above 1"):
        stop(cfg)
    (tmp_path / "serve" / "serve.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not a server record"):
        stop(cfg)
    assert (tmp_path / "serve" / "serve.json").exists()  # left for the user to look at
