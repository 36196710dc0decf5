"""Full training state on disk: `ckpt_root/step_XXXXXXXX/`, written atomically, keep-last-N.

One checkpoint directory holds two things:

- tensors (model state, optimizer state tensors) in torch.distributed.checkpoint (DCP)
  format: `.metadata` plus `__{rank}_{i}.distcp` files. DCP records each tensor's global
  shape and the chunks each rank wrote, so the same checkpoint loads under FSDP2 with a
  different world size, or in a single process;
- everything else in `train_state.json`: optimizer hyperparameters, non-tensor optimizer
  state, the step, and the caller's `train_state` (scheduler, sampler position, RNG,
  precision state, ...). Keeping non-tensors out of DCP means loading never has to
  unpickle an object (DCP would `torch.load(weights_only=False)` them).

DCP tensor keys are flat: `model.<fqn>` and `optimizer.<fqn>.<state name>`, where the
fqns are those of `torch.distributed.checkpoint.state_dict` (the same with and without
FSDP2 or torch.compile wrappers).

Invariant: one writer per `ckpt_root`. A save removes every `.tmp-*` entry it finds there.
Under torch.distributed, every rank calls save/load (DCP is collective); rank 0 alone
writes the JSON, renames and deletes, between barriers. The directory must be on a
filesystem all ranks share.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from stagewise.checkpoint._atomic import TMP_PREFIX, fsync_tree, publish_dir, remove_stale_tmp, write_text_durable
from stagewise.checkpoint._json import decode, encode, first_unjsonable
from stagewise.checkpoint.integrity import file_checksums, verify_files, write_or_explain
from stagewise.checkpoint.safe_dcp import (
    SafeFileSystemReader,
    TensorOnlyLoadPlanner,
    quiet_single_process,
    read_dcp_metadata,
)
from stagewise.errors import CheckpointError

FORMAT = "stagewise.checkpoint"
FORMAT_VERSION = 1
STATE_FILE = "train_state.json"
DCP_METADATA_FILE = ".metadata"
MODEL_PREFIX = "model."
OPTIM_PREFIX = "optimizer."
# Test hook: when set to a step number, the save of that step SIGKILLs its own process after
# the checkpoint is fully written to the temporary directory and before the rename
# (tests/test_checkpoint.py, tests/test_resume.py).
KILL_DURING_SAVE_ENV = "STAGEWISE_TEST_KILL_DURING_SAVE"
# Test hook: the save of that step sends its own process two SIGINTs (a double Ctrl-C) before publishing.
SIGINT_DURING_SAVE_ENV = "STAGEWISE_TEST_SIGINT_DURING_SAVE"

_STEP_DIR = re.compile(r"^step_(\d+)$")
_JSON_HINT = "store plain numbers, strings, lists and dicts"


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


# ---------------------------------------------------------------------------------------
# distributed helpers: everything degrades to a single process when no group is initialised


def _dist_on() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _dist_on() else 0


def _barrier() -> None:
    if _dist_on():
        dist.barrier()


def _broadcast_str(value: str) -> str:
    if not _dist_on():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ---------------------------------------------------------------------------------------
# state dicts as flat DCP tensors


def _model_tensors(model: nn.Module, trainable_only: bool = False) -> dict[str, torch.Tensor]:
    out = {}
    options = StateDictOptions(ignore_frozen_params=trainable_only)
    # ignore_frozen_params keeps the second name of a tied frozen weight (output.weight): drop every
    # name under which a frozen parameter is reachable.
    frozen = {n for n, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad} \
        if trainable_only else set()
    for fqn, value in get_model_state_dict(model, options=options).items():
        if fqn in frozen:
            continue
        if not isinstance(value, torch.Tensor):
            kind = type(value).__name__
            raise CheckpointError(f"model state entry {fqn!r} is a {kind}; only tensors can be checkpointed")
        out[MODEL_PREFIX + fqn] = value
    return out


def _split_optimizer_state(
    state: dict[str, dict[str, Any]],
) -> tuple[dict[str, torch.Tensor], dict[str, tuple[str, str]], dict[str, dict[str, Any]]]:
    """Optimizer `state` (fqn -> {name: value}) -> flat DCP tensors, their (fqn, name), JSON for the rest."""
    tensors: dict[str, torch.Tensor] = {}
    origin: dict[str, tuple[str, str]] = {}
    extra: dict[str, dict[str, Any]] = {}
    for fqn, per_param in state.items():
        for name, value in per_param.items():
            if isinstance(value, torch.Tensor):
                key = f"{OPTIM_PREFIX}{fqn}.{name}"
                tensors[key] = value
                origin[key] = (fqn, name)
            else:
                extra.setdefault(fqn, {})[name] = encode(value, f"state[{fqn!r}][{name!r}]")
    return tensors, origin, extra


def _optimizer_record(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict[str, torch.Tensor]]:
    groups = []
    for i, group in enumerate(optimizer.param_groups):
        hyper = {k: encode(v, f"param_groups[{i}][{k!r}]") for k, v in group.items() if k != "params"}
        groups.append({"num_params": len(group["params"]), "hyperparameters": hyper})
    tensors: dict[str, torch.Tensor] = {}
    extra: dict[str, dict[str, Any]] = {}
    # get_optimizer_state_dict initialises an empty optimizer by stepping it with zero
    # grads, which would change Adam's step count; an optimizer without state has none to save.
    if optimizer.state:
        tensors, _, extra = _split_optimizer_state(get_optimizer_state_dict(model, optimizer)["state"])
    return {"class": type(optimizer).__name__, "param_groups": groups, "state_extra": extra}, tensors


# ---------------------------------------------------------------------------------------
# save


def save_checkpoint(*args, **kwargs) -> Path:
    """Write `ckpt_root/step_{step:08d}` atomically; keep only the newest `keep_last` checkpoints.
    Arguments as begin_checkpoint's (without background); returns the new directory."""
    return begin_checkpoint(*args, **kwargs, background=False).wait()


def begin_checkpoint(
    ckpt_root: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    train_state: dict[str, Any],
    keep_last: int,
    trainable_only: bool = False,
    *,
    background: bool = True,
    process_group=None,
) -> "PendingCheckpoint":
    """Start writing `ckpt_root/step_{step:08d}`; its PendingCheckpoint's wait() publishes it (atomically)
    and keeps only the newest `keep_last` checkpoints.

    trainable_only: leave frozen parameters out (an adapter run: its base is rebuilt from where it
    came from and checked against the hash its train_state records); buffers are always kept.
    `train_state` must be JSON-serializable (tuples come back as lists); the loader returns
    it with `"step"` set. Re-saving an existing step replaces it.

    background: the tensors are copied now and written by dcp.async_save in a thread (process_group:
    the group its collectives use, not the training's); until wait() the previous checkpoints are the
    complete ones. Every rank calls wait() at the same point of the loop."""
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise CheckpointError(f"checkpoint step must be a non-negative int, got {step!r}")
    if not isinstance(keep_last, int) or isinstance(keep_last, bool) or keep_last < 1:
        raise CheckpointError(f"keep_last must be an int >= 1, got {keep_last!r}")
    if not isinstance(train_state, dict):
        raise CheckpointError(f"train_state must be a dict, got {type(train_state).__name__}")
    ckpt_root = Path(ckpt_root)

    tensors = _model_tensors(model, trainable_only)
    optim_record = None
    if optimizer is not None:
        optim_record, optim_tensors = _optimizer_record(model, optimizer)
        tensors.update(optim_tensors)
    record = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "torch_version": torch.__version__,
        "step": step,
        "world_size": dist.get_world_size() if _dist_on() else 1,
        "trainable_only": trainable_only,
        "tensor_keys": sorted(tensors),
        "optimizer": optim_record,
        "train_state": train_state,
    }
    # Serialise before touching the disk, so a bad train_state leaves nothing behind.
    try:
        json.dumps(record)
    except TypeError:
        where, kind = first_unjsonable(train_state, "train_state") or ("train_state", "value")
        raise CheckpointError(f"{where} is a {kind}, which JSON cannot hold; {_JSON_HINT}") from None
    except ValueError as e:  # a circular reference
        raise CheckpointError(f"train_state is not JSON-serializable ({e}); {_JSON_HINT}") from None

    target = ckpt_root / step_dir_name(step)
    # Every rank must write into the same directory: rank 0 names it.
    tmp = Path(_broadcast_str(str(ckpt_root / f"{TMP_PREFIX}{target.name}-{os.getpid()}")))
    if _rank() == 0:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    _barrier()

    pending = PendingCheckpoint(step, tmp, target, record, keep_last)
    needed = sum(t.numel() * t.element_size() for t in tensors.values())  # global shapes: the whole checkpoint
    with quiet_single_process():
        if not background:
            write_or_explain(tmp, lambda: dcp.save(tensors, storage_writer=dcp.FileSystemWriter(tmp),
                                                   no_dist=not _dist_on()), needed, _rank() == 0)
            pending.finish_write()
        else:
            # async_save stages a CPU copy of every tensor before it returns (FileSystemWriter is its stager),
            # so training may update them at once (tests/test_checkpoint.py checks the file holds this step).
            future = dcp.async_save(tensors, storage_writer=dcp.FileSystemWriter(tmp),
                                    process_group=process_group, no_dist=not _dist_on())
            pending.start_thread(future, needed)
    return pending


class PendingCheckpoint:
    """A checkpoint whose tensors are written (or being written by async_save); wait() publishes it:
    rank 0 adds train_state.json (with every file's size and sha256), fsyncs, renames into place and
    prunes old ones, between barriers."""

    def __init__(self, step: int, tmp: Path, target: Path, record: dict, keep_last: int):
        self.step, self.tmp, self.target, self.record, self.keep_last = step, tmp, target, record, keep_last
        self.done, self._thread, self._error = False, None, None

    def finish_write(self) -> None:
        """After the tensors are on disk: rank 0 records the files' checksums."""
        if _rank() == 0:
            self.record["files"] = file_checksums(self.tmp, skip=STATE_FILE)

    def start_thread(self, future, needed: int) -> None:
        import threading

        def run():
            try:
                write_or_explain(self.tmp, future.result, needed, _rank() == 0)
                self.finish_write()
            except BaseException as e:  # raised again by wait(), on the loop's thread
                self._error = e

        self._thread = threading.Thread(target=run, name="stagewise-checkpoint", daemon=True)
        self._thread.start()

    def written(self) -> bool:
        """Whether this rank's part of the write (and rank 0's checksums) is finished."""
        return self._thread is None or not self._thread.is_alive()

    def wait(self) -> Path:
        if self.done:
            return self.target
        if self._thread is not None:
            self._thread.join()
            if self._error is not None:
                raise self._error
        ckpt_root = self.target.parent
        if _rank() == 0:
            write_or_explain(self.tmp, lambda: write_text_durable(self.tmp / STATE_FILE,
                                                                  json.dumps(self.record, indent=1)), 0, True)
            fsync_tree(self.tmp)
            if os.environ.get(KILL_DURING_SAVE_ENV) == str(self.step):
                os.kill(os.getpid(), signal.SIGKILL)
            if os.environ.get(SIGINT_DURING_SAVE_ENV) == str(self.step):
                os.kill(os.getpid(), signal.SIGINT)
                os.kill(os.getpid(), signal.SIGINT)
            publish_dir(self.tmp, self.target)
            remove_stale_tmp(ckpt_root)
            for old in list_checkpoints(ckpt_root)[:-self.keep_last]:
                if old != self.target and not _ends_a_stage(old):
                    shutil.rmtree(old, ignore_errors=True)
        _barrier()
        self.done = True
        return self.target


# ---------------------------------------------------------------------------------------
# listing


def _ends_a_stage(path: Path) -> bool:
    """A staged run's final checkpoint of a stage: kept past keep_last, as what `stagewise run --from-stage`
    re-runs the next stage from (train/from_stage.py)."""
    try:
        stage = json.loads((path / STATE_FILE).read_text())["train_state"].get("stage") or {}
    except (OSError, ValueError, KeyError, AttributeError):
        return False
    return bool(stage.get("complete")) and "index" in stage


def _is_complete(path: Path) -> bool:
    return (path / DCP_METADATA_FILE).is_file() and (path / STATE_FILE).is_file()


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoints under `ckpt_root`, oldest step first (empty if none or no root)."""
    ckpt_root = Path(ckpt_root)
    if not ckpt_root.is_dir():
        return []
    found = []
    for entry in ckpt_root.iterdir():
        m = _STEP_DIR.match(entry.name)
        if m and entry.is_dir() and _is_complete(entry):
            found.append((int(m.group(1)), entry))
    return [p for _, p in sorted(found)]


def latest_valid_checkpoint(ckpt_root: Path, log=print) -> Path | None:
    """The newest checkpoint that is complete and matches its recorded checksums; each newer one it
    passes over is named with the reason, in one line."""
    ckpt_root = Path(ckpt_root)
    if not ckpt_root.is_dir():
        return None
    steps = sorted(((int(m.group(1)), e) for e in ckpt_root.iterdir()
                    if (m := _STEP_DIR.match(e.name)) and e.is_dir()), reverse=True)
    for _, path in steps:
        try:
            verify_files(path, read_train_record(path).get("files"))
            return path
        except CheckpointError as e:
            log(f"warning: skipping checkpoint {path.name}: {str(e).removeprefix(str(path) + ': ')}")
    return None


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    ckpts = list_checkpoints(ckpt_root)
    return ckpts[-1] if ckpts else None


# ---------------------------------------------------------------------------------------
# load


def read_train_record(path: Path) -> dict[str, Any]:
    """The parsed `train_state.json` of a checkpoint, checked for format and version."""
    path = Path(path)
    for name in (DCP_METADATA_FILE, STATE_FILE):
        if not (path / name).is_file():
            raise CheckpointError(
                f"{path} is not a complete stagewise checkpoint (no {name}); "
                "pass a step_XXXXXXXX directory, e.g. latest_checkpoint(root)"
            )
    state_file = path / STATE_FILE
    try:
        record = json.loads(state_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        kind = type(e).__name__
        raise CheckpointError(f"{state_file} cannot be read as JSON ({kind}); the checkpoint is corrupt") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise CheckpointError(f"{state_file} is not a stagewise checkpoint record (expected format {FORMAT!r})")
    if record.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format version {record.get('format_version')!r}; "
            f"this stagewise reads version {FORMAT_VERSION}"
        )
    expected = {"step": int, "tensor_keys": list, "train_state": dict, "optimizer": (dict, type(None))}
    for key, kind in expected.items():
        if not isinstance(record.get(key), kind):
            raise CheckpointError(f"{state_file} has a missing or malformed {key!r}; the checkpoint is corrupt")
    return record


def _check_against(
    path: Path, expected: dict[str, torch.Tensor], found: dict[str, list[int]], prefix: str, what: str
) -> None:
    """The tensors `what` needs and the checkpoint's tensors under `prefix` must agree on keys and shapes."""
    for key, t in expected.items():
        if key not in found:
            raise CheckpointError(
                f"{path} has no tensor {key!r} that the {what} expects; the checkpoint is for a different {what}"
            )
        shape = list(t.shape)  # a DTensor's .shape is its global shape, as DCP records it
        if found[key] != shape:
            raise CheckpointError(
                f"{path}: tensor {key!r} has shape {found[key]} in the checkpoint but the {what} expects {shape}"
            )
    extra = sorted(k for k in found if k.startswith(prefix) and k not in expected)
    if extra:
        raise CheckpointError(
            f"{path} has tensor {extra[0]!r} that the {what} does not have ({len(extra)} such); "
            f"the checkpoint is for a different {what}"
        )


def _check_optimizer(path: Path, record: dict | None, optimizer: torch.optim.Optimizer) -> None:
    if record is None:
        raise CheckpointError(f"{path} holds no optimizer state; load it with optimizer=None")
    if record["class"] != type(optimizer).__name__:
        raise CheckpointError(f"{path} holds {record['class']} state but the optimizer is {type(optimizer).__name__}")
    saved = [g["num_params"] for g in record["param_groups"]]
    sizes = [len(g["params"]) for g in optimizer.param_groups]
    if saved != sizes:
        raise CheckpointError(f"{path} has optimizer param groups of sizes {saved} but the optimizer has {sizes}")


class LoadTargets:
    """What loading fills in place: the model's tensors and, with optimizer state, freshly allocated
    optimizer state tensors and where each belongs (fqn, state name)."""

    def __init__(self, target, optim_target, origin, fresh_groups):
        self.target, self.optim_target, self.origin, self.fresh_groups = target, optim_target, origin, fresh_groups


def load_targets(model: nn.Module, optimizer, trainable_only: bool, has_optim: bool):
    """(flat tensors to load into, LoadTargets) for `model` and `optimizer` (None: weights only)."""
    target = _model_tensors(model, trainable_only)
    optim_target, origin, fresh_groups = {}, {}, None
    if optimizer is not None and has_optim:
        fresh = get_optimizer_state_dict(model, optimizer)  # allocates the state tensors to load into
        optim_target, origin, _ = _split_optimizer_state(fresh["state"])
        fresh_groups = fresh["param_groups"]
    return {**target, **optim_target}, LoadTargets(target, optim_target, origin, fresh_groups)


def apply_loaded(model: nn.Module, optimizer, loaded: LoadTargets, optim_record: dict | None,
                 trainable_only: bool) -> None:
    """Set the model (and optimizer: state, then the recorded hyperparameters) from filled targets."""
    model_state = {k.removeprefix(MODEL_PREFIX): v for k, v in loaded.target.items() if k.startswith(MODEL_PREFIX)}
    set_model_state_dict(model, model_state, options=StateDictOptions(strict=not trainable_only))
    if optimizer is None:
        return
    if loaded.fresh_groups is None:
        optimizer.state.clear()  # saved before the first step: no state
    else:
        state = {fqn: {k: decode(v) for k, v in d.items()} for fqn, d in optim_record["state_extra"].items()}
        for key, tensor in loaded.optim_target.items():
            fqn, name = loaded.origin[key]
            state.setdefault(fqn, {})[name] = tensor
        set_optimizer_state_dict(model, optimizer, {"state": state, "param_groups": loaded.fresh_groups})
    # Hyperparameters come from the checkpoint, not from how the optimizer was just built.
    for group, saved in zip(optimizer.param_groups, optim_record["param_groups"]):
        for k, v in saved["hyperparameters"].items():
            v = decode(v)
            current = group.get(k)
            if isinstance(current, torch.Tensor) and isinstance(v, torch.Tensor):
                v = v.to(device=current.device, dtype=current.dtype)  # e.g. a capturable lr on the GPU
            group[k] = v


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any]:
    """Restore `model` (and `optimizer`) in place from a checkpoint directory; return its train_state.

    The returned dict is the `train_state` given to `save_checkpoint`, plus `"step"`.
    Everything is validated before anything is loaded.
    """
    path = Path(path)
    record = read_train_record(path)
    found = {key: list(entry.size) for key, entry in read_dcp_metadata(path).state_dict_metadata.items()}
    if sorted(found) != record["tensor_keys"]:
        raise CheckpointError(
            f"{path}: {STATE_FILE} and {DCP_METADATA_FILE} list different tensors; the checkpoint is corrupt"
        )

    trainable_only = bool(record.get("trainable_only"))
    has_optim = any(k.startswith(OPTIM_PREFIX) for k in found)
    if optimizer is not None:
        _check_optimizer(path, record["optimizer"], optimizer)
    target, loaded = load_targets(model, optimizer, trainable_only, has_optim)
    for prefix, what in ((MODEL_PREFIX, "model"), (OPTIM_PREFIX, "optimizer")):
        if what == "model" or optimizer is not None:
            _check_against(path, {k: v for k, v in target.items() if k.startswith(prefix)}, found, prefix, what)

    reader, planner = SafeFileSystemReader(path), TensorOnlyLoadPlanner()
    with quiet_single_process():
        dcp.load(target, storage_reader=reader, planner=planner, no_dist=not _dist_on())
    apply_loaded(model, optimizer, loaded, record["optimizer"], trainable_only)
    return {**record["train_state"], "step": record["step"]}
