"""Continual pre-training: a recipe's `stages:` run in order, in one run directory.

Each stage is one call of the trainer's `_fit` loop with the stage's view of the recipe
(schedule, optimizer, precision) and a `StageRun` that supplies its batches (a domain
mixture plus replay), its LR, its evaluations and its end step. Steps are numbered
globally across stages, so metrics.jsonl holds one continuous LR and loss curve.

Every stage after the first starts from the previous stage's final checkpoint, loaded from
disk, also in an uninterrupted run: a run resumed at a stage boundary then does exactly
what the uninterrupted run did, and a resume inside a stage is the foundation's exact
resume with the stage's state (mixture credits, domain positions, cooldown trigger) added
to the checkpoint. See docs/continual.md.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from pathlib import Path

import torch

from stagewise import rundir
from stagewise.checkpoint import export_safetensors, latest_checkpoint
from stagewise.checkpoint.store import read_train_record
from stagewise.config.loader import dump_yaml, read_yaml
from stagewise.config.schema import ModelConfig, RunConfig
from stagewise.data import SequenceSampler, Tokenizer, eval_batches, open_dataset, resolve_dataset
from stagewise.data.mixture import MixtureSampler
from stagewise.errors import CheckpointError, ConfigError
from stagewise.eval import evaluate
from stagewise.eval.forgetting import forgetting_report
from stagewise.objectives import Batch
from stagewise.optim import lr_at
from stagewise.train.metrics import read_metrics
from stagewise.train.trainer import _finish, _fit, load_run, pick_device, resolve_model_config

COOLDOWN_FILE = "COOLDOWN"
FORGETTING = "forgetting.json"
STAGES_DIR = "stages"


def is_staged(run_dir: str | Path) -> bool:
    cfg_file = Path(run_dir) / rundir.CONFIG
    return cfg_file.is_file() and bool(read_yaml(cfg_file).get("stages"))


def domain_sources(cfg: RunConfig) -> dict:
    """name -> SourceConfig of every domain, in order of first appearance."""
    out = {}
    for st in cfg.stages:
        for d in st.mixture:
            out.setdefault(d.name, d.source)
    return out


def mixture_probs(cfg: RunConfig, index: int) -> dict[str, float]:
    """Per-sequence probability of each domain in stage `index`: its weight share of 1 - replay, and
    replay split evenly over the domains earlier stages trained on that this stage does not."""
    st = cfg.stages[index]
    total = sum(d.weight for d in st.mixture)
    probs = {d.name: (1 - st.replay) * d.weight / total for d in st.mixture if d.weight > 0}
    earlier = [n for n in domain_sources(cfg) if n not in {d.name for d in st.mixture}
               and any(d.name == n and d.weight > 0 for s in cfg.stages[:index] for d in s.mixture)]
    for n in earlier:
        probs[n] = st.replay / len(earlier) if st.replay > 0 else 0.0
    return {n: p for n, p in probs.items() if p > 0}


def stage_steps(cfg: RunConfig, index: int) -> int:
    st = cfg.stages[index]
    per_step = cfg.train.batch_size * cfg.train.grad_accum * cfg.data.seq_len
    return st.steps if st.steps is not None else math.ceil(st.tokens / per_step)


def stage_config(cfg: RunConfig, index: int) -> RunConfig:
    """The recipe as the loop sees it during stage `index`."""
    st = cfg.stages[index]
    precision = dataclasses.replace(cfg.precision, mode=st.precision or cfg.precision.mode, schedule=[])
    return dataclasses.replace(cfg, schedule=st.schedule, optim=st.optim, precision=precision,
                               init_from=st.init_from if index == 0 else None)


def _domain_seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "big")) % 2**63


class StageRun:
    """One stage's batches, LR, evaluations, end step and checkpointed state, for `_fit`."""

    def __init__(self, cfg: RunConfig, index: int, start: int, datasets: dict, run_dir: Path):
        st = cfg.stages[index]
        self.cfg, self.index, self.name, self.start, self.run_dir = cfg, index, st.name, start, run_dir
        self.schedule, self.peak_lr = st.schedule, st.optim.lr
        self.budget = stage_steps(cfg, index)
        self.init_from = st.init_from if index > 0 else None
        self.keep_optimizer = st.optimizer_state == "keep" and not self.init_from
        self.cooldown_at = st.schedule.cooldown_at_step if st.schedule.name == "infinite" else None
        B, T = cfg.train.batch_size, cfg.data.seq_len
        self.probs = mixture_probs(cfg, index)
        samplers = {n: SequenceSampler(datasets[n].train, T, 1, _domain_seed(cfg.seed, n)) for n in self.probs}
        self.sampler = MixtureSampler(samplers, self.probs, B, stage=index)
        self.trained = [d.name for d in st.mixture if d.weight > 0]
        self.replayed = [n for n in self.probs if n not in self.trained]
        seen = [n for n in domain_sources(cfg) if any(d.name == n for s in cfg.stages[:index + 1] for d in s.mixture)]
        self.token_bytes = next(iter(datasets.values())).tokenizer.token_bytes  # one tokenizer per run
        self.val = {n: [Batch(x, y) for x, y in eval_batches(datasets[n].val, T, B, cfg.eval.batches)] for n in seen}

    def end(self) -> int:
        """Global step at which the stage ends: its budget, or the end of a triggered cooldown."""
        local = self.budget
        if self.cooldown_at is not None:
            local = min(local, max(self.cooldown_at, self.schedule.warmup_steps) + self.schedule.cooldown_steps)
        return self.start + local

    def lr(self, step: int) -> float:
        local = step - self.start
        if self.schedule.name == "infinite":
            start = None if self.cooldown_at is None else max(self.cooldown_at, self.schedule.warmup_steps)
            return lr_at(local, self.peak_lr, self.budget, self.schedule, cooldown_start=start)
        return lr_at(local, self.peak_lr, self.budget, self.schedule)

    def poll_cooldown(self, step: int) -> bool:
        """True when RUN_DIR/COOLDOWN has just triggered the cooldown of an infinite schedule."""
        if self.schedule.name != "infinite" or self.cooldown_at is not None:
            return False
        if not (self.run_dir / COOLDOWN_FILE).exists():
            return False
        self.cooldown_at = step - self.start
        return True

    def consume_cooldown_file(self) -> None:
        (self.run_dir / COOLDOWN_FILE).unlink(missing_ok=True)

    def metrics(self) -> dict:
        shares = self.sampler.fractions()
        out = {"stage": self.index, **{f"mix/{n}": v for n, v in shares.items()}}
        if self.replayed:
            out["replay"] = sum(shares[n] for n in self.replayed)
        return out

    def evaluate(self, model, precision) -> dict:
        out = {}
        for n, batches in self.val.items():
            res = evaluate(model, batches, precision, token_bytes=self.token_bytes)
            out[f"val_loss/{n}"], out[f"val_bpb/{n}"] = res["loss"], res["bits_per_byte"]
        for key in ("val_loss", "val_bpb"):  # the mean over the domains this stage trains on
            out[key] = sum(out[f"{key}/{n}"] for n in self.trained) / len(self.trained)
        return out

    def state_dict(self, at_step: int) -> dict:
        return {"index": self.index, "name": self.name, "start": self.start, "cooldown_at": self.cooldown_at,
                "complete": at_step == self.end()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("index") != self.index:
            raise CheckpointError(f"checkpoint belongs to stage {state.get('index')}, not stage {self.index}")
        self.cooldown_at = state.get("cooldown_at")

    def begins_at(self, train_state: dict) -> bool:
        """Whether a checkpoint's train_state is the previous stage's final one (this stage's start)."""
        prev = train_state.get("stage") or {}
        return prev.get("index") == self.index - 1 and bool(prev.get("complete"))


def _prepare_domains(cfg: RunConfig, tokenizer_path: str | None, log) -> dict[str, Path]:
    """A prepared dataset per domain, all with one tokenizer: tokenizer_path, data.tokenizer.path, or a BPE
    trained on the first stage's sources (together)."""
    sources = domain_sources(cfg)
    paths: dict[str, Path] = {}
    tok = tokenizer_path or cfg.data.tokenizer.path
    if tok is None:
        first = cfg.stages[0].mixture
        ds = resolve_dataset(dataclasses.replace(cfg.data, sources=[d.source for d in first]), log=log)
        tok = str(ds / "tokenizer.json")
        if len(first) == 1:
            paths[first[0].name] = ds
    for name, src in sources.items():
        if name not in paths:
            data = dataclasses.replace(cfg.data, sources=[src],
                                       tokenizer=dataclasses.replace(cfg.data.tokenizer, path=tok))
            log(f"data: domain {name!r}")
            paths[name] = resolve_dataset(data, log=log)
    return paths


def train_stages(cfg: RunConfig, log=print) -> Path:
    """Start a staged run; returns the run directory."""
    import sys

    device = pick_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    init = rundir.load_init_source(cfg.stages[0].init_from) if cfg.stages[0].init_from else None
    tok_path = str(Path(init[2]) / rundir.TOKENIZER) if init else None
    paths = _prepare_domains(cfg, tok_path, log)
    datasets = {n: open_dataset(p) for n, p in paths.items()}
    tokenizer = next(iter(datasets.values())).tokenizer
    if init and cfg.data.seq_len > init[0].max_seq_len:
        raise ConfigError(f"data.seq_len: expected <= {init[0].max_seq_len} (max_seq_len of stages[0].init_from), "
                          f"got {cfg.data.seq_len}")
    mcfg = init[0] if init else resolve_model_config(cfg.model, tokenizer.vocab_size)
    for i in range(len(cfg.stages)):  # fail on too little data before anything is written
        StageRun(cfg, i, 0, datasets, Path("."))

    run_dir = rundir.new_run_dir(cfg.out_dir, cfg.name)
    run_dir.mkdir(parents=True)
    (run_dir / rundir.CONFIG).write_text(dump_yaml(cfg))
    rundir.write_json(run_dir / rundir.MODEL_CONFIG, dataclasses.asdict(mcfg))
    tokenizer.save(run_dir / rundir.TOKENIZER)
    rundir.write_json(run_dir / rundir.RUN_INFO, {
        "dataset": str(next(iter(paths.values()))), "domains": {n: str(p) for n, p in paths.items()},
        "device": str(device), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "python": sys.version.split()[0]})
    log(f"run directory: {run_dir}")
    _run_from(cfg, mcfg, run_dir, datasets, device, 0, 0, None, log)
    return run_dir


def resume_stages(run_dir: str | Path, log=print) -> Path:
    run_dir = Path(run_dir)
    cfg, mcfg, info, device = load_run(run_dir, log)
    sha = Tokenizer.load(run_dir / rundir.TOKENIZER).sha256
    datasets = {n: open_dataset(Path(p), expect_tokenizer_sha=sha) for n, p in info["domains"].items()}
    ckpt = latest_checkpoint(run_dir / rundir.CHECKPOINTS)
    index, start = 0, 0
    if ckpt is not None:
        record = read_train_record(ckpt)
        st = record["train_state"].get("stage") or {}
        index, start = (st["index"] + 1, record["step"]) if st.get("complete") else (st["index"], st["start"])
    if index >= len(cfg.stages):
        log(f"run already complete at step {record['step']} (all {len(cfg.stages)} stages)")
        return run_dir
    if index > 0 and not (run_dir / STAGES_DIR / cfg.stages[index - 1].name).is_dir():
        # killed right after the previous stage's final checkpoint, before its export
        prev = ckpt if start == record["step"] and st.get("complete") else None
        if prev is not None:
            _export_stage(rundir.load_model(prev, device)[0], mcfg, run_dir, cfg.stages[index - 1].name)
            write_forgetting(cfg, run_dir, index)
    log(f"resuming {run_dir} in stage {index} ({cfg.stages[index].name}) from "
        f"{ckpt.name if ckpt else 'the start (no checkpoint was written)'}")
    _run_from(cfg, mcfg, run_dir, datasets, device, index, start, ckpt, log)
    return run_dir


def _run_from(cfg, mcfg, run_dir: Path, datasets: dict, device, index: int, start: int, ckpt, log) -> None:
    model = None
    for i in range(index, len(cfg.stages)):
        stage = StageRun(cfg, i, start, datasets, run_dir)
        shares = ", ".join(f"{n} {p:.1%}" for n, p in stage.probs.items())
        log(f"stage {i} ({stage.name}): steps {start}..{stage.end()} (budget {stage.budget}), mixture: {shares}")
        model = _fit(stage_config(cfg, i), mcfg, run_dir, None, device, ckpt, log, stage=stage)
        ckpt = latest_checkpoint(run_dir / rundir.CHECKPOINTS)
        start = read_train_record(ckpt)["step"]
        _export_stage(model, mcfg, run_dir, stage.name)
        write_forgetting(cfg, run_dir, i + 1)
    _finish(cfg, mcfg, run_dir, model, Tokenizer.load(run_dir / rundir.TOKENIZER), device, log)


def _export_stage(model, mcfg: ModelConfig, run_dir: Path, name: str) -> None:
    """RUN_DIR/stages/<name>/: the stage's final weights, for eval, sample, init_from and later analysis."""
    export_safetensors(model, {"format": "stagewise", "stagewise_model": dataclasses.asdict(mcfg)},
                       run_dir / STAGES_DIR / name, extra_files=rundir.tokenizer_files(run_dir))


def write_forgetting(cfg: RunConfig, run_dir: Path, completed: int) -> dict:
    report = forgetting_report(read_metrics(run_dir / rundir.METRICS), [s.name for s in cfg.stages[:completed]],
                               list(domain_sources(cfg)))
    rundir.write_json(run_dir / FORGETTING, report)
    return report
