"""Checkpointing: bitwise resume, atomic publish, keep-last-N, safe loading, safetensors export.

References are independent of the code under test where one exists: the optimizer's own
`state_dict()` and a second optimizer step for resume, `safetensors.torch.load_model` and
`nn.Module.load_state_dict` for exports, plain `pickle` to show the malicious payload is live.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from safetensors.torch import load_model
from torch import nn

from stagewise.checkpoint import (
    capture_rng,
    export_safetensors,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_model_state,
    restore_rng,
    save_checkpoint,
)
from stagewise.checkpoint.safe_dcp import METADATA_ALLOWLIST
from stagewise.errors import CheckpointError

REPO = Path(__file__).resolve().parents[1]
VOCAB, DIM = 11, 6


class Tiny(nn.Module):
    """Embedding -> MLP -> output head tied to the embedding."""

    def __init__(self, dim: int = DIM) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, dim)
        self.body = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim))
        self.head = nn.Linear(dim, VOCAB, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.emb(ids)))


def make(seed: int = 0, foreach: bool = True, lr: float = 1e-2, dim: int = DIM) -> tuple[Tiny, torch.optim.AdamW]:
    torch.manual_seed(seed)
    model = Tiny(dim)
    opt = torch.optim.AdamW(
        model.parameters(), lr=lr, betas=(0.8, 0.95), weight_decay=0.1, fused=False, foreach=foreach
    )
    return model, opt


def train_step(model: nn.Module, opt: torch.optim.Optimizer, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (4, 5), generator=g)
    targets = torch.randint(0, VOCAB, (4, 5), generator=g)
    opt.zero_grad(set_to_none=True)
    loss = nn.functional.cross_entropy(model(ids).flatten(0, 1), targets.flatten())
    loss.backward()
    opt.step()


def assert_same_model(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


def assert_same_optimizer(a: torch.optim.Optimizer, b: torch.optim.Optimizer) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    assert sa["state"].keys() == sb["state"].keys()
    for i in sa["state"]:
        assert sa["state"][i].keys() == sb["state"][i].keys()
        for k, v in sa["state"][i].items():
            w = sb["state"][i][k]
            if isinstance(v, torch.Tensor):
                assert isinstance(w, torch.Tensor) and v.dtype == w.dtype and torch.equal(v, w), (i, k)
            else:
                assert type(v) is type(w) and v == w, (i, k)


# ---------------------------------------------------------------------------------------- rng


def test_rng_round_trip_is_exact_and_json_able():
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.gauss(0, 1)  # leave a cached gaussian in both the python and numpy states
    np.random.randn()
    state = json.loads(json.dumps(capture_rng()))
    expected = (random.random(), random.gauss(0, 1), np.random.rand(3), np.random.randn(), torch.rand(4))
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    restore_rng(state)
    got = (random.random(), random.gauss(0, 1), np.random.rand(3), np.random.randn(), torch.rand(4))
    assert got[:2] == expected[:2]
    assert np.array_equal(got[2], expected[2]) and got[3] == expected[3]
    assert torch.equal(got[4], expected[4])


def test_restore_rng_rejects_foreign_dict():
    with pytest.raises(CheckpointError, match="capture_rng"):
        restore_rng({"python": 1})


# ---------------------------------------------------------------------------------------- resume


@pytest.mark.parametrize("foreach", [True, False])
def test_resume_is_bitwise_and_next_steps_match(tmp_path, foreach):
    model, opt = make(0, foreach)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    for s in range(3):
        train_step(model, opt, s)
        sched.step()
    train_state = {"scheduler": sched.state_dict(), "sampler": {"epoch": 0, "index": 12}, "rng": capture_rng()}
    path = save_checkpoint(tmp_path, 3, model, opt, train_state, keep_last=2)
    assert path == tmp_path / "step_00000003"
    assert sorted(os.listdir(path)) == [".metadata", "__0_0.distcp", "train_state.json"]

    model2, opt2 = make(1, foreach, lr=0.5)  # different weights and hyperparameters
    sched2 = torch.optim.lr_scheduler.StepLR(opt2, step_size=7, gamma=0.1)
    restored = load_checkpoint(path, model2, opt2)
    sched2.load_state_dict(restored["scheduler"])
    assert restored["step"] == 3 and restored["sampler"] == {"epoch": 0, "index": 12}
    assert model2.head.weight is model2.emb.weight  # the tie survives loading
    assert_same_model(model, model2)
    assert_same_optimizer(opt, opt2)
    assert opt2.param_groups[0]["betas"] == (0.8, 0.95) and isinstance(opt2.param_groups[0]["betas"], tuple)
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]

    for s in range(3, 6):
        train_step(model, opt, s)
        sched.step()
        train_step(model2, opt2, s)
        sched2.step()
    assert_same_model(model, model2)
    assert_same_optimizer(opt, opt2)


def test_save_before_first_step_does_not_touch_optimizer(tmp_path):
    # DCP's get_optimizer_state_dict would initialise Adam by stepping it; a step-0 save must not.
    model, opt = make(0)
    path = save_checkpoint(tmp_path, 0, model, opt, {}, keep_last=1)
    assert not opt.state
    model2, opt2 = make(1)
    train_step(model2, opt2, 99)  # give it state that the load must clear
    load_checkpoint(path, model2, opt2)
    assert not opt2.state
    train_step(model, opt, 0)
    train_step(model2, opt2, 0)
    assert_same_model(model, model2)
    assert_same_optimizer(opt, opt2)


def test_tensor_hyperparameters_and_non_tensor_state_round_trip(tmp_path):
    class CountingSGD(torch.optim.SGD):
        """Keeps a Python int in its per-parameter state, as some custom optimizers do."""

        def step(self, closure=None):
            super().step(closure)
            for group in self.param_groups:
                for p in group["params"]:
                    self.state[p]["count"] = self.state[p].get("count", 0) + 1

    def build(seed: int, lr: float):
        torch.manual_seed(seed)
        model = Tiny()
        return model, CountingSGD(model.parameters(), lr=torch.tensor(lr), momentum=0.9, foreach=False)

    model, opt = build(0, 1e-2)
    for s in range(2):
        train_step(model, opt, s)
    path = save_checkpoint(tmp_path, 2, model, opt, {}, keep_last=1)
    model2, opt2 = build(1, 0.5)
    load_checkpoint(path, model2, opt2)
    lr = opt2.param_groups[0]["lr"]
    assert isinstance(lr, torch.Tensor) and torch.equal(lr, torch.tensor(1e-2))
    assert [opt2.state[p]["count"] for p in model2.parameters()] == [2] * 5
    assert_same_optimizer(opt, opt2)
    train_step(model, opt, 2)
    train_step(model2, opt2, 2)
    assert_same_model(model, model2)


def test_load_model_only_and_optimizer_mismatches(tmp_path):
    model, opt = make(0)
    train_step(model, opt, 0)
    path = save_checkpoint(tmp_path, 1, model, opt, {}, keep_last=1)
    model2, _ = make(1)
    load_checkpoint(path, model2)
    assert_same_model(model, model2)
    with pytest.raises(CheckpointError, match="holds AdamW state but the optimizer is SGD"):
        load_checkpoint(path, model2, torch.optim.SGD(model2.parameters(), lr=0.1))
    bare = save_checkpoint(tmp_path / "bare", 1, model, None, {}, keep_last=1)
    with pytest.raises(CheckpointError, match="no optimizer state; load it with optimizer=None"):
        load_checkpoint(bare, model2, opt)


def test_train_state_must_be_json(tmp_path):
    model, opt = make(0)
    with pytest.raises(CheckpointError, match=r"train_state\['sampler'\]\['gen'\] is a Generator"):
        save_checkpoint(tmp_path, 1, model, opt, {"sampler": {"gen": torch.Generator()}}, keep_last=1)
    assert not tmp_path.exists() or not os.listdir(tmp_path)
    with pytest.raises(CheckpointError, match="keep_last must be an int >= 1"):
        save_checkpoint(tmp_path, 1, model, opt, {}, keep_last=0)


# ---------------------------------------------------------------------------------------- layout


def test_keep_last_and_resave_same_step(tmp_path):
    model, opt = make(0)
    for step in range(1, 6):
        train_step(model, opt, step)
        save_checkpoint(tmp_path, step, model, opt, {"i": step}, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000004", "step_00000005"]
    assert latest_checkpoint(tmp_path) == tmp_path / "step_00000005"
    assert sorted(os.listdir(tmp_path)) == ["step_00000004", "step_00000005"]

    # Re-saving an existing step (after a resume) replaces it in place.
    train_step(model, opt, 42)
    save_checkpoint(tmp_path, 5, model, opt, {"i": "again"}, keep_last=2)
    assert sorted(os.listdir(tmp_path)) == ["step_00000004", "step_00000005"]
    model2, opt2 = make(1)
    assert load_checkpoint(tmp_path / "step_00000005", model2, opt2)["i"] == "again"
    assert_same_model(model, model2)

    # The checkpoint just written is never deleted, even when older than the ones kept.
    save_checkpoint(tmp_path, 2, model, opt, {}, keep_last=1)
    assert sorted(os.listdir(tmp_path)) == ["step_00000002", "step_00000005"]
    assert list_checkpoints(tmp_path / "missing") == [] and latest_checkpoint(tmp_path / "missing") is None


_KILL_SCRIPT = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    from test_checkpoint import make, train_step
    from stagewise.checkpoint import save_checkpoint
    root = Path({root!r})
    model, opt = make(0)
    train_step(model, opt, 0)
    save_checkpoint(root, 1, model, opt, {{"i": 1}}, keep_last=3)
    train_step(model, opt, 1)
    os.environ["STAGEWISE_TEST_KILL_DURING_SAVE"] = "2"  # the step whose save is killed
    save_checkpoint(root, 2, model, opt, {{"i": 2}}, keep_last=3)
    print("not killed")
    """
)


def test_sigkill_during_save_leaves_previous_checkpoint(tmp_path):
    script = _KILL_SCRIPT.format(tests=str(REPO / "tests"), root=str(tmp_path))
    env = {k: v for k, v in os.environ.items() if k != "STAGEWISE_TEST_KILL_DURING_SAVE"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    stale = [n for n in os.listdir(tmp_path) if n.startswith(".tmp-step_00000002-")]
    assert len(stale) == 1 and (tmp_path / stale[0] / "train_state.json").exists()  # fully written, never renamed

    assert latest_checkpoint(tmp_path) == tmp_path / "step_00000001"
    ref, ref_opt = make(0)
    train_step(ref, ref_opt, 0)
    model, opt = make(1)
    assert load_checkpoint(latest_checkpoint(tmp_path), model, opt)["i"] == 1
    assert_same_model(ref, model)
    assert_same_optimizer(ref_opt, opt)

    save_checkpoint(tmp_path, 2, model, opt, {}, keep_last=3)
    assert sorted(os.listdir(tmp_path)) == ["step_00000001", "step_00000002"]


# ---------------------------------------------------------------------------------------- refusals


def test_incomplete_directory_is_refused(tmp_path):
    model, opt = make(0)
    path = save_checkpoint(tmp_path, 1, model, opt, {}, keep_last=1)
    with pytest.raises(CheckpointError, match="is not a complete stagewise checkpoint"):
        load_checkpoint(tmp_path, model, opt)  # the root, not a step directory
    (path / "train_state.json").write_text("{")
    with pytest.raises(CheckpointError, match="cannot be read as JSON"):
        load_checkpoint(path, model, opt)
    (path / ".metadata").unlink()
    assert list_checkpoints(tmp_path) == []
    with pytest.raises(CheckpointError, match=r"is not a complete stagewise checkpoint \(no .metadata\)"):
        load_checkpoint(path, model, opt)


def test_shape_mismatch_names_key_and_shapes(tmp_path):
    model, opt = make(0)
    path = save_checkpoint(tmp_path, 1, model, None, {}, keep_last=1)
    wider, _ = make(0, dim=8)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, wider)
    msg = str(info.value)
    assert "'model.emb.weight'" in msg and "[11, 6]" in msg and "[11, 8]" in msg and "\n" not in msg

    class Extra(Tiny):
        def __init__(self) -> None:
            super().__init__()
            self.norm = nn.LayerNorm(DIM)

    with pytest.raises(CheckpointError, match="has no tensor 'model.norm.weight' that the model expects"):
        load_checkpoint(path, Extra())


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_metadata_is_refused_without_running(tmp_path):
    model, opt = make(0)
    path = save_checkpoint(tmp_path / "ckpt", 1, model, opt, {}, keep_last=1)
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Evil(marker))
    (path / ".metadata").write_bytes(payload)
    for load in (lambda: load_checkpoint(path, model, opt), lambda: load_model_state(path)):
        with pytest.raises(CheckpointError, match=r"references '(posix|nt|os)\.system', which is not allowed"):
            load()
    assert not marker.exists()
    pickle.loads(payload)  # the payload is live: plain pickle (what DCP uses) runs it
    assert marker.exists()


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_pickled_objects_and_escaping_paths_are_refused(tmp_path):
    # A checkpoint holding a non-tensor entry: DCP would torch.load(weights_only=False) it.
    dcp.save({"model.w": torch.zeros(2), "model.obj": {"a": [1, 2]}}, checkpoint_id=tmp_path / "bytes", no_dist=True)
    with pytest.raises(CheckpointError, match="BytesStorageMetadata', which is not allowed"):
        load_model_state(tmp_path / "bytes")

    # A storage record pointing outside the checkpoint directory.
    model, _ = make(0)
    path = save_checkpoint(tmp_path / "ckpt", 1, model, None, {}, keep_last=1)
    md = pickle.loads((path / ".metadata").read_bytes())  # our own file: trusted here
    for info in md.storage_data.values():
        info.relative_path = "../outside.distcp"
    (path / ".metadata").write_bytes(pickle.dumps(md))
    with pytest.raises(CheckpointError, match="only plain file names inside the checkpoint are valid"):
        load_checkpoint(path, model)


def test_allowlist_covers_what_dcp_writes(tmp_path):
    """Record every global a real checkpoint's metadata needs; all must be on the allowlist."""
    model, opt = make(0)
    train_step(model, opt, 0)
    model.body[0].to(torch.bfloat16)
    path = save_checkpoint(tmp_path, 1, model, opt, {}, keep_last=1)
    seen: set[tuple[str, str]] = set()

    class Recorder(pickle.Unpickler):
        def find_class(self, module, name):
            seen.add((module, name))
            return super().find_class(module, name)

    with open(path / ".metadata", "rb") as f:
        Recorder(f).load()
    dtypes = {("torch", "float32"), ("torch", "bfloat16")}
    assert dtypes <= seen
    assert seen - dtypes <= METADATA_ALLOWLIST


# ---------------------------------------------------------------------------------------- export


def test_export_safetensors_round_trip_with_tied_weights(tmp_path):
    model, opt = make(0)
    train_step(model, opt, 0)
    (tmp_path / "tokenizer.json").write_text('{"v": 1}')
    config = {"vocab_size": VOCAB, "dim": DIM, "tie_embeddings": True}
    out = export_safetensors(model, config, tmp_path / "export", {"tokenizer.json": tmp_path / "tokenizer.json"})
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert json.loads((out / "config.json").read_text()) == config
    with safe_open(out / "model.safetensors", framework="pt") as f:
        assert "head.weight" not in f.keys() and "emb.weight" in f.keys()  # stored once
        assert f.metadata()["head.weight"] == "emb.weight"

    fresh = Tiny()
    missing, unexpected = load_model(fresh, out / "model.safetensors")  # safetensors' own loader
    assert not missing and not unexpected
    assert_same_model(model, fresh)

    state = load_model_state(out)
    fresh2 = Tiny()
    fresh2.load_state_dict(state)
    assert_same_model(model, fresh2)

    train_step(model, opt, 1)  # re-export replaces the previous export
    export_safetensors(model, config, out)
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    assert torch.equal(load_model_state(out)["body.0.weight"], model.body[0].weight)
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp-")]

    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="exists and is not a stagewise export"):
        export_safetensors(model, config, tmp_path / "other")


def test_load_model_state_from_checkpoint_matches_export(tmp_path):
    model, opt = make(0)
    train_step(model, opt, 0)
    model.body[2].to(torch.bfloat16)
    ckpt = save_checkpoint(tmp_path / "ckpt", 1, model, opt, {}, keep_last=1)
    export = export_safetensors(model, {}, tmp_path / "export")
    from_ckpt, from_export = load_model_state(ckpt), load_model_state(export)
    expected = model.state_dict()
    assert from_ckpt.keys() == from_export.keys() == expected.keys()
    for k, v in expected.items():
        assert from_ckpt[k].dtype == v.dtype and torch.equal(from_ckpt[k], v), k
        assert from_export[k].dtype == v.dtype and torch.equal(from_export[k], v), k
    with pytest.raises(CheckpointError, match="is neither an exported model"):
        load_model_state(tmp_path)


# ---------------------------------------------------------------------------------------- distributed

_DIST_SCRIPT = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    import torch, torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    sys.path.insert(0, {tests!r})
    from test_checkpoint import make, train_step
    from stagewise.checkpoint import save_checkpoint, export_safetensors, load_checkpoint, load_model_state
    dist.init_process_group("gloo")
    # world size 1 -> 2: a single-process checkpoint loads into a sharded model and optimizer
    single = Path({root!r}) / "single" / "step_00000001"
    sharded, _ = make(5)
    fully_shard(sharded)
    sharded_opt = torch.optim.AdamW(sharded.parameters(), lr=0.5, foreach=True)
    load_checkpoint(single, sharded, sharded_opt)
    for k, v in load_model_state(single).items():
        assert torch.equal(sharded.state_dict()[k].full_tensor(), v), k
    train_step(sharded, sharded_opt, 7)
    model, opt = make(0)
    fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.95), weight_decay=0.1, foreach=True)
    for s in range(2):
        train_step(model, opt, s)
    save_checkpoint(Path({root!r}) / "ckpt", 2, model, opt, {{"rank": dist.get_rank()}}, keep_last=1)
    export_safetensors(model, {{}}, Path({root!r}) / "export")
    dist.barrier()
    dist.destroy_process_group()
    """
)


@pytest.mark.slow
def test_fsdp2_two_ranks_checkpoints_cross_world_sizes(tmp_path):
    """Same code under torchrun+gloo with FSDP2; checkpoints move between world sizes 1 and 2."""
    model, opt = make(0)
    train_step(model, opt, 0)
    save_checkpoint(tmp_path / "single", 1, model, opt, {}, keep_last=1)
    script = tmp_path / "run.py"
    script.write_text(_DIST_SCRIPT.format(tests=str(REPO / "tests"), root=str(tmp_path)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]

    ckpt = tmp_path / "ckpt" / "step_00000002"
    assert sorted(os.listdir(ckpt)) == [".metadata", "__0_0.distcp", "__1_0.distcp", "train_state.json"]
    ref, ref_opt = make(0)
    for s in range(2):
        train_step(ref, ref_opt, s)
    model, opt = make(1)
    assert load_checkpoint(ckpt, model, opt) == {"rank": 0, "step": 2}
    # FSDP2 reduces gradients across ranks in a different order than one process sums
    # them, so compare to a single-process run with a tolerance, and exactly to the export.
    for (k, a), (_, b) in zip(ref.state_dict().items(), model.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=k)
    exported = load_model_state(tmp_path / "export")
    for k, v in model.state_dict().items():
        assert torch.equal(exported[k], v), k
    train_step(model, opt, 2)  # the loaded optimizer state is usable


def test_async_checkpoint_holds_the_state_of_its_step_and_publishes_on_wait(tmp_path):
    """begin_checkpoint(background=True) copies the tensors at the call: training that goes on while the
    thread writes changes nothing in the file, and the directory appears only once wait() publishes it."""
    from stagewise.checkpoint.store import begin_checkpoint

    model, opt = make(0, True)
    train_step(model, opt, 0)
    at_save = {k: v.clone() for k, v in model.state_dict().items()}
    moments = {k: v.clone() for k, v in opt.state[next(iter(model.parameters()))].items()}
    pending = begin_checkpoint(tmp_path, 1, model, opt, {"i": 1}, keep_last=2, background=True)
    for s in range(1, 4):  # the run continues while the checkpoint is written
        train_step(model, opt, s)
    assert latest_checkpoint(tmp_path) is None  # not published before wait()
    path = pending.wait()
    assert path == tmp_path / "step_00000001" and latest_checkpoint(tmp_path) == path
    model2, opt2 = make(1, True)
    assert load_checkpoint(path, model2, opt2)["i"] == 1
    for k, v in model2.state_dict().items():
        assert v.equal(at_save[k]), k
    for k, v in opt2.state[next(iter(model2.parameters()))].items():
        assert torch.as_tensor(v).equal(torch.as_tensor(moments[k])), k
