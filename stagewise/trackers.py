"""Experiment trackers: TensorBoard, Weights & Biases (offline) and MLflow, beside metrics.jsonl.

Each is an optional extra (`pip install 'stagewise[tensorboard]'`, `[wandb]`, `[mlflow]`), chosen
with `log.to` (docs/trackers.md). They receive exactly the lines metrics.jsonl keeps, under the same
names (every numeric field; the step is the tracker's step), and the resolved recipe as
hyper-parameters. One tracker run spans the run directory, all stages and every resume:
RUN_DIR/trackers.json records the wandb and mlflow run ids and the last step sent, and a resumed run,
which reproduces the steps after its checkpoint exactly, sends only the steps after that one, so no
step reaches a tracker twice. With spikes.action rollback a line is sent once the next snapshot is
taken (a rollback can no longer undo it), so a tracker never shows a step that was rolled back.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import struct
import time
import uuid
from pathlib import Path

from stagewise.errors import ConfigError

# log.to's names and the module each needs (None: always there)
TRACKERS = {"jsonl": None, "tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
STATE_FILE = "trackers.json"
TENSORBOARD_DIR = "tensorboard"
WANDB_DIR = "wandb"


def check_trackers(log) -> None:
    """Each tracker known, named once and installed: found with the recipe, before anything is written."""
    for i, name in enumerate(log.to):
        if name not in TRACKERS:
            raise ConfigError(f"log.to[{i}]: expected one of {', '.join(TRACKERS)}, got {name!r}")
        if log.to.index(name) != i:
            raise ConfigError(f"log.to[{i}]: {name} is listed twice")
        if TRACKERS[name] and importlib.util.find_spec(TRACKERS[name]) is None:
            raise ConfigError(f"log.to[{i}]: {name} is not installed (pip install 'stagewise[{name}]')")
    if not re.fullmatch(r"[\w.\- ]+", log.project):
        raise ConfigError(f"log.project: expected letters, digits, ' ', '.', '_' or '-', got {log.project!r}")


def scalars(record: dict) -> dict[str, float]:
    """The numeric fields of a metrics line, step excluded (bools as 0/1; strings and lists are not metrics)."""
    return {k: float(v) for k, v in record.items() if k != "step" and isinstance(v, (int, float))}


def flat_params(config: dict, prefix: str = "") -> dict[str, str | int | float | bool]:
    """The recipe as dotted keys (`optim.lr`); lists as JSON text (`stages` as stages.0.name, ...)."""
    out = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_params(value, name + "."))
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for i, v in enumerate(value):
                out.update(flat_params(v, f"{name}.{i}."))
        elif isinstance(value, (list, type(None))):
            out[name] = json.dumps(value)
        else:
            out[name] = value
    return out


class Trackers:
    """The trackers of one run directory (rank 0 only). send(record) per metrics line; deferred: lines
    wait for commit(step) (spikes.action rollback); close() sends what waits and ends the tracker runs."""

    def __init__(self, names: list[str], run_dir: Path, config: dict, log_cfg, run_name: str):
        self.run_dir = Path(run_dir)
        self.state = self._read_state()
        self.deferred, self.waiting = False, []
        params = flat_params(config)
        name = log_cfg.run_name or run_name
        self.backends = []
        for n in names:
            if n == "tensorboard":
                self.backends.append(_TensorBoard(self.run_dir, params, config, self.state))
            elif n == "wandb":
                self.backends.append(_Wandb(self.run_dir, config, log_cfg.project, name, self.state))
            elif n == "mlflow":
                uri = log_cfg.mlflow_uri or f"sqlite:///{(self.run_dir / 'mlflow.db').resolve()}"
                self.backends.append(_MLflow(uri, params, log_cfg.project, name, self.state))
        self._write_state()

    def _read_state(self) -> dict:
        path = self.run_dir / STATE_FILE
        if not path.exists():
            return {"sent_through": -1}
        try:
            state = json.loads(path.read_text())
        except ValueError:
            raise ConfigError(f"{path}: not valid JSON; delete it to start new tracker runs") from None
        return state

    def _write_state(self) -> None:
        path = self.run_dir / STATE_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state, indent=1))
        os.replace(tmp, path)

    def send(self, record: dict) -> None:
        if all(record["step"] <= b.sent for b in self.backends):
            return  # a resumed run's replay of a step the trackers already hold (the same numbers)
        self.waiting.append(record)
        if not self.deferred:
            self.commit(record["step"])

    def catch_up(self, records: list[dict], through: int) -> None:
        """A resume's lines up to its checkpoint (final): send those the trackers lack."""
        self.waiting = [r for r in records if any(r["step"] > b.sent for b in self.backends)]
        self.commit(through)

    def drop_after(self, step: int) -> None:
        """Lines past `step` were undone (a rollback, a stop rewound to its snapshot): never sent."""
        self.waiting = [r for r in self.waiting if r["step"] <= step]

    def commit(self, step: int) -> None:
        """Send the waiting lines through `step`; their steps can no longer be undone."""
        ready = [r for r in self.waiting if r["step"] <= step]
        if not ready:
            return
        self.waiting = self.waiting[len(ready):]
        for record in ready:
            values, wall = scalars(record), time.time()
            for b in self.backends:
                if record["step"] > b.sent:
                    b.log(record["step"], values, wall)
        for b in self.backends:
            b.flush()
            b.sent = max(b.sent, ready[-1]["step"])
        self.state["sent_through"] = ready[-1]["step"]
        self._write_state()

    def close(self, ok: bool = True) -> None:
        """End the tracker runs; ok: the process ends normally, and what waits is sent (after an error it may
        still be undone: a resume sends it, from metrics.jsonl, once it is before a checkpoint)."""
        if ok:
            self.commit(math.inf)
        for b in self.backends:
            b.close(ok)
        self.backends = []


class _TensorBoard:
    def __init__(self, run_dir: Path, params: dict, config: dict, state: dict):
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        # purge_step: events a killed run wrote past the last step recorded as sent are hidden by the readers
        self.sent = state["sent_through"]
        resumed = self.sent >= 0
        self.writer = SummaryWriter(str(run_dir / TENSORBOARD_DIR),
                                    purge_step=state["sent_through"] + 1 if resumed else None)
        if not resumed:
            for summary in hparams({k: v for k, v in params.items()}, {}):
                self.writer.file_writer.add_summary(summary)
            import yaml

            self.writer.add_text("config", "```\n" + yaml.safe_dump(config, sort_keys=False) + "```", 0)

    def log(self, step: int, values: dict, wall: float) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step, walltime=wall)

    def flush(self) -> None:
        self.writer.flush()

    def close(self, ok: bool) -> None:
        self.writer.close()


def wandb_history(run_dir: Path, run_id: str) -> list[dict]:
    """Every history row the offline runs of `run_id` under RUN_DIR/wandb hold, in the order written, as
    {key: value}. A .wandb file is a LevelDB-style log (32 KiB blocks of records, each a 7-byte header:
    crc32, length, type full/first/middle/last) of wandb's protobuf Records; a killed run's torn tail is
    left out."""
    from wandb.proto import wandb_internal_pb2 as pb

    rows = []
    for path in sorted(Path(run_dir, WANDB_DIR).glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")):
        for raw in _log_records(path.read_bytes()):
            record = pb.Record()
            try:
                record.ParseFromString(raw)
            except Exception:  # protobuf's DecodeError: the torn end of a killed run's file
                break
            if record.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
    return rows


def _log_records(data: bytes, block: int = 32768, header: int = 7):
    if data[:4] != b":W&B":
        return
    pos, parts = header, b""
    while pos + header <= len(data):
        if block - pos % block < header:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = struct.unpack("<HB", data[pos + 4:pos + header])
        chunk = data[pos + header:pos + header + length]
        if kind == 0 or len(chunk) < length:  # zero padding, or a record cut short
            return
        pos += header + length
        parts = chunk if kind in (1, 2) else parts + chunk
        if kind in (1, 4):
            yield parts


class _Wandb:
    def __init__(self, run_dir: Path, config: dict, project: str, name: str, state: dict):
        import wandb

        run_id = state.setdefault("wandb_id", uuid.uuid4().hex[:8])
        # the wandb service writes as it likes: a killed run's last lines may never have reached the file
        self.sent = max((int(r["_step"]) for r in wandb_history(run_dir, run_id) if "_step" in r), default=-1)
        (run_dir / WANDB_DIR).mkdir(exist_ok=True)
        self.run = wandb.init(mode="offline", dir=str(run_dir), project=project, name=name, id=run_id,
                              resume="allow", config=config,
                              settings=wandb.Settings(silent=True, console="off", x_disable_stats=True))

    def log(self, step: int, values: dict, wall: float) -> None:
        self.run.log(values, step=step)

    def flush(self) -> None:
        pass  # offline: the wandb service writes RUN_DIR/wandb/offline-run-*/run-ID.wandb as it receives

    def close(self, ok: bool) -> None:
        self.run.finish(exit_code=0 if ok else 1)


class _MLflow:
    def __init__(self, uri: str, params: dict, project: str, name: str, state: dict):
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        self.sent = state["sent_through"]  # each log_batch is committed before the state file records it
        run_id = state.get("mlflow_run_id")
        if run_id is None:
            exp = self.client.get_experiment_by_name(project)
            exp_id = exp.experiment_id if exp else self.client.create_experiment(project)
            run_id = self.client.create_run(exp_id, run_name=name).info.run_id
            state["mlflow_run_id"] = run_id
            self._params(run_id, params)
        else:
            self.client.update_run(run_id, status="RUNNING")
        self.run_id = run_id

    def _params(self, run_id: str, params: dict) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # log_batch takes at most 100 params a call
            self.client.log_batch(run_id, params=items[i:i + 100])

    def log(self, step: int, values: dict, wall: float) -> None:
        from mlflow.entities import Metric

        ms = int(wall * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, ms, step) for k, v in values.items()])

    def flush(self) -> None:
        pass  # each log_batch is a committed SQL transaction

    def close(self, ok: bool) -> None:
        self.client.set_terminated(self.run_id, status="FINISHED" if ok else "KILLED")
