"""Training under torchrun with 2 processes on the CPU (gloo): DDP and FSDP2 against one process of
the same global batch, resume across world sizes, rank 0 alone writing, a killed rank, bad settings.

Every run is a real `torchrun --nproc-per-node 2 -m stagewise ...` job, each rank with one thread.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import run_cli, tiny_recipe
from stagewise.config.loader import from_dict, load_recipe
from stagewise.config.schema import ModelConfig
from stagewise.distributed import check_parallel
from stagewise.errors import ConfigError
from stagewise.model import Transformer
from stagewise.rundir import read_metrics

pytestmark = pytest.mark.slow
TOL = 1e-5  # fp32: the two ranks' partial sums are added in another order than one process adds them


def torchrun(*args, env=None, check=True, nproc=2):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "stagewise", *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, **(env or {})), timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"torchrun {' '.join(map(str, args))} exited {proc.returncode}:\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def job(tmp_path_factory, corpus_dir, data_cache):
    """The tiny recipe at 10 steps (checkpoints every 5) and its one-process reference run."""
    root = tmp_path_factory.mktemp("distributed")
    recipe = tiny_recipe(root / "tiny.yaml", corpus_dir, data_cache, root / "runs")
    text = recipe.read_text().replace("threads: 2", "threads: 1").replace("steps: 20", "steps: 10")
    recipe.write_text(text.replace("eval: {every: 10", "eval: {every: 5"))
    run_cli("run", recipe, "--name=single")
    return root, recipe


def losses(run: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run / "metrics.jsonl")]


def records(run: Path) -> list[tuple]:
    return [(r["step"], r["tokens"], r["loss"], r["grad_norm"], r.get("val_loss")) for r in
            read_metrics(run / "metrics.jsonl")]


def assert_close(a: list[float], b: list[float], tol=TOL):
    assert len(a) == len(b) == 10
    assert max(abs(x - y) for x, y in zip(a, b)) < tol, list(zip(a, b))


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_ranks_equal_one_process_and_write_once(job, strategy):
    root, recipe = job
    before = set((root / "runs").iterdir())
    proc = torchrun("run", recipe, f"--name={strategy}", f"--parallel.strategy={strategy}")
    assert set((root / "runs").iterdir()) - before == {root / "runs" / strategy}  # one run directory
    run = root / "runs" / strategy
    assert_close(losses(run), losses(root / "runs" / "single"))
    single = records(root / "runs" / "single")
    assert [r[:2] for r in records(run)] == [r[:2] for r in single]  # the same global token counts
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == list(range(1, 11))  # written once
    out = proc.stdout + proc.stderr  # progress lines go to stderr
    assert out.count("step 10/10") == 1 and out.count("run directory:") == 1
    info = json.loads((run / "run_info.json").read_text())
    assert (info["world_size"], info["strategy"]) == (2, strategy)
    assert sorted(os.listdir(run / "checkpoints" / "step_00000010")) == \
        [".metadata", "__0_0.distcp", "__1_0.distcp", "train_state.json"]
    rng = json.loads((run / "checkpoints" / "step_00000010" / "train_state.json").read_text())["train_state"]["rng"]
    assert len(rng["ranks"]) == 2  # every rank's generators
    assert (run / "final" / "model.safetensors").is_file() and (run / "memory.json").is_file()
    # what rank 0 holds, counted from its tensors: the whole model under DDP, half of it under FSDP2
    held = next(iter(json.loads((run / "memory.json").read_text()).values()))["measured_rank"]
    mcfg = from_dict(ModelConfig, json.loads((run / "model_config.json").read_text()))
    full = sum(p.numel() * 4 for p in Transformer(mcfg).parameters())
    share = full if strategy == "ddp" else full // 2
    assert (held["weights"], held["gradients"], held["optimizer"]) == (share, share, 2 * share)


def test_resume_across_world_sizes(job):
    """An FSDP2 run killed at step 7 (checkpoint 5, written asynchronously) resumes at 2 ranks bitwise and
    at 1 process within the tolerance; a one-process run resumes on 2 ranks (DDP) within it."""
    root, recipe = job
    runs = root / "runs"
    torchrun("run", recipe, "--name=full", "--parallel.strategy=fsdp2", "--checkpoint.async_save=true")
    killed = torchrun("run", recipe, "--name=cut", "--parallel.strategy=fsdp2", "--checkpoint.async_save=true",
                      env={"STAGEWISE_DEBUG_KILL_AT_STEP": "7"}, check=False)
    assert killed.returncode != 0
    assert [p.name for p in (runs / "cut" / "checkpoints").iterdir()] == ["step_00000005"]
    shutil.copytree(runs / "cut", runs / "cut1")
    torchrun("resume", runs / "cut")
    assert records(runs / "cut") == records(runs / "full")  # same world size: bitwise
    run_cli("resume", runs / "cut1")
    assert_close(losses(runs / "cut1"), losses(runs / "full"))
    assert [r[:2] for r in records(runs / "cut1")] == [r[:2] for r in records(runs / "full")]

    run_cli("run", recipe, "--name=grow", env={"STAGEWISE_DEBUG_KILL_AT_STEP": "7"}, check=False)
    torchrun("resume", runs / "grow")  # parallel.strategy auto: ddp on 2 ranks
    assert_close(losses(runs / "grow"), losses(runs / "single"))


def test_adapters_and_galore_under_ddp(job):
    root, recipe = job
    runs = root / "runs"
    text = recipe.read_text().replace("name: tiny", f"name: lora\ninit_from: {runs / 'single' / 'final'}")
    lora = root / "lora.yaml"
    lora.write_text("\n".join(line for line in text.splitlines() if not line.startswith("model:")) +
                    "\nadapter: {kind: lora, r: 4, alpha: 8}\n")
    run_cli("run", lora, "--name=lora1")
    torchrun("run", lora, "--name=lora2", "--parallel.strategy=ddp")
    assert_close(losses(runs / "lora2"), losses(runs / "lora1"))
    assert (runs / "lora2" / "final" / "adapter.safetensors").is_file()
    for name, extra in (("galore1", []), ("galore2", ["--parallel.strategy=ddp"])):
        (torchrun if extra else run_cli)("run", recipe, f"--name={name}", "--optim.name=galore", "--optim.rank=8",
                                         "--optim.update_proj_gap=4", "--train.grad_accum=2", *extra)
    assert_close(losses(runs / "galore2"), losses(runs / "galore1"))


def test_packed_sft_under_ddp_and_fsdp2(job):
    """Packed SFT rows carry positions and document ids: both strategies must pass them to the model."""
    root, recipe = job
    runs = root / "runs"
    sft = root / "sft.yaml"
    sft.write_text(f"""
name: sft
out_dir: {runs}
seed: 3
threads: 1
kind: sft
init_from: {runs / 'single' / 'final'}
data: {{seq_len: 64}}
train: {{steps: 10, batch_size: 4}}
optim: {{lr: 1.0e-3}}
schedule: {{name: cosine, warmup_steps: 2}}
precision: {{mode: fp32}}
eval: {{every: 5, batches: 2}}
checkpoint: {{every: 5}}
log: {{progress: plain, every: 5}}
sft: {{data: [{{kind: arithmetic}}], val_fraction: 0.2, arithmetic: {{train_count: 200, val_count: 20}}, eval_generate: 4}}
sample: {{prompts: ["What is 2 plus 2?"], max_new_tokens: 4}}
""")
    run_cli("run", sft, "--name=sft1")
    for strategy in ("ddp", "fsdp2"):
        torchrun("run", sft, f"--name=sft-{strategy}", f"--parallel.strategy={strategy}")
        assert_close(losses(runs / f"sft-{strategy}"), losses(runs / "sft1"))
        val = [r["val_loss"] for r in read_metrics(runs / f"sft-{strategy}" / "metrics.jsonl") if "val_loss" in r]
        ref = [r["val_loss"] for r in read_metrics(runs / "sft1" / "metrics.jsonl") if "val_loss" in r]
        assert len(val) == 2 and max(abs(a - b) for a, b in zip(val, ref)) < TOL


def test_hsdp_on_four_ranks(job):
    root, recipe = job
    proc = torchrun("run", recipe, "--name=hsdp", "--parallel.strategy=hsdp", "--parallel.replicate=2", nproc=4)
    assert "parallel: hsdp over 4 ranks (mesh 2 x 2)" in proc.stdout
    assert_close(losses(root / "runs" / "hsdp"), losses(root / "runs" / "single"))
    assert len(list((root / "runs" / "hsdp" / "checkpoints" / "step_00000010").glob("*.distcp"))) == 4


def test_a_killed_rank_stops_the_job_and_keeps_the_checkpoint(job):
    root, recipe = job
    proc = torchrun("run", recipe, "--name=lost", "--parallel.strategy=ddp", check=False,
                    env={"STAGEWISE_DEBUG_KILL_AT_STEP": "7", "STAGEWISE_DEBUG_KILL_RANK": "1"})
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "rank 0: lost contact with the other ranks" in lines[0], proc.stderr[-2000:]
    assert "stagewise resume" in lines[0]
    run = root / "runs" / "lost"
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_00000005"]
    run_cli("resume", run)  # the checkpoint is intact: the run completes in one process
    assert_close(losses(run), losses(root / "runs" / "single"))


def test_bad_parallel_settings_are_one_line(job):
    root, recipe = job
    proc = torchrun("run", recipe, "--name=bad", "--parallel.strategy=hsdp", "--parallel.replicate=2", check=False)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode != 0 and len(lines) == 1, proc.stderr[-2000:]
    assert "hsdp with replicate 2 x shard auto needs 4 ranks" in lines[0]
    assert not (root / "runs" / "bad").exists()
    proc = run_cli("run", recipe, "--parallel.strategy=hsdp", "--parallel.replicate=1", check=False)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0
    assert "hsdp needs >= 2 replica groups" in proc.stderr


@pytest.mark.parametrize("overrides,world,message", [
    (["--parallel.strategy=fsdp2", "--precision.mode=bf16-pure"], 2, "cannot be sharded with fsdp2"),
    (["--parallel.strategy=fsdp2", "--optim.name=galore"], 2, "need whole matrices"),
    (["--parallel.strategy=fsdp2", "--optim.name=adamw-8bit"], 2, "per-shard blocks"),
    (["--parallel.strategy=hsdp", "--parallel.replicate=2", "--parallel.shard=2"], 2, "needs 4 ranks"),
    (["--parallel.strategy=hsdp", "--parallel.replicate=2", "--train.batch_size=12"], 6, None),
    (["--parallel.strategy=none"], 2, "torchrun started 2 processes"),
    (["--train.batch_size=6"], 4, "do not split over 4 ranks"),
    (["--precision.mode=fp8"], 2, "per-rank amax"),
    (["--kind=dpo"], 2, "runs in one process"),
    (["--parallel.strategy=fsdp2", "--precision.mode=bf16-mixed"], 2, None),
    (["--parallel.strategy=ddp", "--precision.mode=bf16-pure", "--optim.name=adamw"], 2, None),
    (["--parallel.strategy=fsdp2"], 1, None),  # one process ignores the strategy
])
def test_parallel_settings_checked_against_the_world(job, overrides, world, message):
    _, recipe = job
    cfg = load_recipe(recipe, overrides) if "--kind=dpo" not in overrides else None
    if cfg is None:  # a dpo recipe needs its own section; the check reads only the kinds
        cfg = load_recipe(recipe)
        cfg.kind = "dpo"
    if message is None:
        check_parallel(cfg, world)
        return
    with pytest.raises(ConfigError, match=message):
        check_parallel(cfg, world)


def test_fsdp2_rolls_back_a_spike_as_one_process_does(job):
    """Each rank snapshots its own shards; the spike is judged on the all-reduced loss, so every rank rolls
    back at the same step, and the run matches one process doing the same."""
    root, recipe = job
    spike = ["--spikes.action=rollback", "--spikes.snapshot_every=3", "--spikes.min_history=4"]
    env = {"STAGEWISE_TEST_INJECT_LOSS": "8:1000"}
    run_cli("run", recipe, "--name=single-spike", *spike, env=env)
    torchrun("run", recipe, "--name=fsdp2-spike", "--parallel.strategy=fsdp2", *spike, env=env)
    one, two = (read_metrics(root / "runs" / n / "metrics.jsonl") for n in ("single-spike", "fsdp2-spike"))
    assert_close([r["loss"] for r in two], [r["loss"] for r in one])
    assert [r["rollback"][0]["to_step"] for r in two if "rollback" in r] == [6]
    def events(records):
        return [(r["step"], e["from_step"], e["to_step"], e["skipped_batches"], e["loss"])
                for r in records for e in r.get("rollback", [])]
    (a, b), = zip(events(one), events(two))
    assert a[:4] == b[:4] == (7, 8, 6, 2) and abs(a[4] - b[4]) < 1000 * TOL
