"""The rl stage kind through the CLI: bitwise resume after SIGKILL between the steps of one rollout and
inside a rollout's generation, the metrics it reports, and bad rl settings failing in one line, exit 2,
with nothing written."""

import signal
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import run_cli, tiny_recipe
from stagewise.rundir import read_metrics

TIMING = {"tokens_per_s", "mfu", "step_time_s", "peak_mem_bytes", "rollout/seconds", "rollout/overhead_s",
          "rollout/tokens_per_s", "rollout/gen_share"}


@pytest.fixture(scope="module")
def sft_model(tmp_path_factory, corpus_dir, data_cache) -> Path:
    """A tiny code model fine-tuned for a few steps on arithmetic chat: it answers with digits, right or wrong."""
    d = tmp_path_factory.mktemp("rlbase")
    recipe = tiny_recipe(d / "base.yaml", corpus_dir, data_cache, d / "runs")
    run_cli("run", recipe, "--train.steps=6", "--name=base")
    run_cli("run", recipe, "--name=sft", "--kind=sft", f"--init_from={d / 'runs' / 'base'}", "--train.steps=30",
            "--sft.data=[{kind: arithmetic}]", "--sft.arithmetic.train_count=500", "--sft.arithmetic.val_count=20",
            "--sft.arithmetic.max_digits=2", "--sft.eval_generate=0", "--eval.every=0", "--schedule.warmup_steps=2")
    return d / "runs" / "sft"


def rl_recipe(d: Path, init_from: Path, extra: str = "") -> Path:
    p = d / "rl.yaml"
    p.write_text(f"""
name: rl
out_dir: {d / 'runs'}
seed: 11
threads: 2
kind: rl
init_from: {init_from}
data: {{seq_len: 64, cache_dir: {d / 'cache'}}}
train: {{steps: 8, batch_size: 4, grad_accum: 2}}
optim: {{lr: 1.0e-3}}
schedule: {{name: constant, warmup_steps: 1}}
precision: {{mode: fp32}}
eval: {{every: 4, batches: 1}}
checkpoint: {{every: 1, keep_last: 2}}
log: {{progress: plain, every: 4}}
rl:
  arithmetic: {{max_digits: 2}}
  format_reward: 0.5
  train_problems: 200
  eval_problems: 8
  prompts_per_rollout: 3
  group_size: 4
  max_new_tokens: 5
  epochs_per_rollout: 2
  mini_batches: 2
  kl_beta: 0.05
{extra}
sample: {{prompts: ["12+4="], max_new_tokens: 5}}
""")
    return p


def _strip(rows):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def _weights(run: Path) -> dict:
    return load_file(str(run / "final" / "model.safetensors"))


def test_rl_resume_is_bitwise_mid_rollout_and_after_a_kill_while_generating(tmp_path, sft_model):
    recipe = rl_recipe(tmp_path, sft_model)
    out = run_cli("run", recipe, "--name=full").stdout
    assert "--- chat sample (prompt '12+4=') ---" in out
    full = read_metrics(tmp_path / "runs" / "full" / "metrics.jsonl")
    assert [r["step"] for r in full] == list(range(1, 9))
    # 2 passes x 2 mini-batches: a rollout every 4 steps, its metrics on the step that sampled it
    rollout_steps = [r["step"] for r in full if "reward/mean" in r]
    assert rollout_steps == [1, 5]
    first = full[0]
    for key in ("reward/std", "rl/success_rate", "rl/response_len", "rl/zero_adv_groups", "rl/entropy",
                "rl/clip_frac", "rl/kl", "rl/ratio", "rollout/tokens_per_s"):
        assert key in first, key
    assert abs(first["rl/kl"]) < 1e-6 and first["rl/ratio"] == pytest.approx(1.0, abs=1e-6)  # still the reference
    assert first["reward/std"] > 0, "the fixture must give varied rewards, else nothing is trained"
    assert "rollout/gen_share" in full[4] and 0 < full[4]["rollout/gen_share"] < 1
    assert {"exact_match", "val_reward"} <= set(full[3])
    assert any(r["rl/clip_frac"] > 0 for r in full[1:4]) or any(r["rl/ratio"] != 1.0 for r in full[1:4])

    # killed after step 6: its checkpoint sits between the steps of the second rollout
    proc = run_cli("run", recipe, "--name=mid", env={"STAGEWISE_DEBUG_KILL_AT_STEP": "6"}, check=False)
    assert proc.returncode == -signal.SIGKILL
    run_cli("resume", tmp_path / "runs" / "mid")
    # killed while the second rollout was being generated (after step 4's checkpoint)
    proc = run_cli("run", recipe, "--name=gen", env={"STAGEWISE_DEBUG_KILL_IN_ROLLOUT": "2"}, check=False)
    assert proc.returncode == -signal.SIGKILL
    run_cli("resume", tmp_path / "runs" / "gen")
    want = _weights(tmp_path / "runs" / "full")
    for name in ("mid", "gen"):
        assert _strip(read_metrics(tmp_path / "runs" / name / "metrics.jsonl")) == _strip(full), name
        got = _weights(tmp_path / "runs" / name)
        assert all((got[k] == want[k]).all() for k in want), name


def test_rl_variants_run_and_report(tmp_path, sft_model):
    recipe = rl_recipe(tmp_path, sft_model)
    common = ["--train.steps=2", "--eval.every=0", "--checkpoint.every=0", "--rl.epochs_per_rollout=1",
              "--rl.mini_batches=1"]
    run_cli("run", recipe, "--name=drop", *common, "--rl.dynamic_sampling=resample", "--rl.kl_beta=0",
            "--rl.algorithm=rloo", "--rl.loss_agg=seq-mean-token-sum-norm", "--rl.clip_eps_high=0.28")
    rows = read_metrics(tmp_path / "runs" / "drop" / "metrics.jsonl")
    assert "rl/dropped_groups" in rows[0] and "rl/kl" not in rows[0]
    run_cli("run", recipe, "--name=remax", *common, "--rl.algorithm=remax", "--rl.kl_in=reward",
            "--rl.kl_estimator=k1", "--rl.hybrid=hpt", "--rl.hpt_threshold=0.5", "--rl.importance=sequence")
    rows = read_metrics(tmp_path / "runs" / "remax" / "metrics.jsonl")
    assert 0 <= rows[0]["rl/demo_prompts"] <= 1 and "rl/kl" in rows[0]
    plan = run_cli("plan", recipe).stdout
    assert "grpo" in plan and "reference: copy" in plan, plan[-1500:]


@pytest.mark.parametrize("override, message", [
    ("--rl.group_size=1", "rl.group_size: grpo compares completions of one prompt"),
    ("--rl.importance=sequence --rl.denominator=current", "rl.importance: sequence ratios are against"),
    ("--rl.reference=adapters-off", "rl.reference: adapters-off needs an adapter stage"),
    ("--rl.clip_eps_high=0.1", "rl.clip_eps_high: expected >= clip_eps"),
    ("--rl.mini_batches=7", "rl.mini_batches: a rollout of 3 x 4 sequences cannot fill"),
    ("--rl.task=nope", "rl.task: unknown task 'nope'"),
    ("--rl.algorithm=ppo", "rl.algorithm"),
    ("--init_from=null", "init_from: an rl stage needs a model to start from"),
])
def test_bad_rl_settings_fail_in_one_line(tmp_path, sft_model, override, message):
    recipe = rl_recipe(tmp_path, sft_model)
    proc = run_cli("run", recipe, *override.split(), check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert not (tmp_path / "runs" / "rl").exists()


def test_a_reward_function_registered_from_python_trains_the_policy(tmp_path, sft_model):
    """The Python API's way to a custom reward (a recipe only names it): the function is what scores."""
    from stagewise.config.loader import load_recipe
    from stagewise.rl.tasks import register_reward
    from stagewise.train.runner import start

    seen = []

    def shortness(problem, completion):
        seen.append(completion)
        return 1.0 / (1 + len(completion))

    register_reward("test-shortness", shortness, problems_from="arithmetic", options={"max_digits": 2})
    recipe = rl_recipe(tmp_path, sft_model)
    cfg = load_recipe(recipe, ["rl.task=test-shortness", "train.steps=4", "eval.every=0", "checkpoint.every=0",
                               "rl.kl_beta=0", "name=custom"])
    start(cfg, log=lambda m: None)
    rows = read_metrics(tmp_path / "runs" / "custom" / "metrics.jsonl")
    assert len(seen) == 3 * 4 + 8  # one rollout (2 passes x 2 mini-batches = 4 steps) of 3 x 4, the final eval's 8
    mean = sum(1.0 / (1 + len(c)) for c in seen[:12]) / 12
    assert rows[0]["reward/mean"] == pytest.approx(mean, rel=1e-9)
