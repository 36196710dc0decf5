"""Pre-training: compose the components, run the one step function, checkpoint, resume.

`train(cfg)` starts a run, `resume(run_dir)` continues one. Both go through `_fit`, which
is the whole loop: draw micro-batches, `train_step`, log, evaluate, checkpoint. Exact
resume rests on three facts: the data sampler's position, every RNG state and the
optimizer/precision state are in the checkpoint; the LR is a pure function of the step;
and metrics lines past the checkpoint are dropped on resume.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch

from stagewise import rundir
from stagewise.checkpoint import (capture_rng, export_safetensors, latest_checkpoint, load_checkpoint, restore_rng,
                                  save_checkpoint)
from stagewise.checkpoint.store import read_train_record
from stagewise.config.loader import dump_yaml, from_dict, read_yaml
from stagewise.config.schema import ModelConfig, PrecisionStageConfig, RunConfig
from stagewise.data import SequenceSampler, Tokenizer, eval_batches, open_dataset, resolve_dataset
from stagewise.errors import CheckpointError, ConfigError
from stagewise.eval import evaluate
from stagewise.generate import generate
from stagewise.model import Transformer, flops_per_token
from stagewise.objectives import OBJECTIVES, Batch, num_targets
from stagewise.optim import build_optimizer, lr_at
from stagewise.precision import build_precision
from stagewise.precision.schedule import stage_due, switch_precision
from stagewise.train.metrics import MetricsLog, mfu, peak_flops, peak_memory_bytes
from stagewise.train.progress import Progress
from stagewise.train.step import to_device, train_step

# Test hook: SIGKILL this process right after the given step has been logged (and
# checkpointed, if due) — how the resume tests crash a run at an exact point.
KILL_AT_STEP_ENV = "STAGEWISE_DEBUG_KILL_AT_STEP"


def pick_device(name: str) -> torch.device:
    """auto: CUDA if present, else the CPU. Under torchrun (LOCAL_RANK set) auto and cuda mean this
    process's GPU, cuda:LOCAL_RANK, made the current device so that kernels and allocations without
    an explicit index land there too."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: {name} requested but CUDA is not available here (valid: auto, cpu)")
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    return device


def resolve_model_config(cfg: ModelConfig, tokenizer_vocab: int) -> ModelConfig:
    if cfg.vocab_size is None:
        pad = cfg.pad_vocab_to
        return dataclasses.replace(cfg, vocab_size=-(-tokenizer_vocab // pad) * pad)
    if cfg.vocab_size < tokenizer_vocab:
        raise ConfigError(f"model.vocab_size: expected >= the tokenizer's {tokenizer_vocab} tokens, "
                          f"got {cfg.vocab_size}")
    return cfg


def _init_source(cfg: RunConfig, log) -> tuple:
    """(model config, tokenizer, tokenizer dir, HF config) of init_from; points data.tokenizer at its
    tokenizer so the data is encoded the way the weights expect."""
    mcfg, _, tok_dir, hf = rundir.load_init_source(cfg.init_from)
    if cfg.data.seq_len > mcfg.max_seq_len:
        raise ConfigError(f"data.seq_len: expected <= {mcfg.max_seq_len} (max_seq_len of init_from "
                          f"{cfg.init_from}), got {cfg.data.seq_len}")
    cfg.data.tokenizer.path = str(Path(tok_dir) / rundir.TOKENIZER)
    log(f"init_from {cfg.init_from}: its architecture and tokenizer replace the recipe's model section")
    return mcfg, Tokenizer.load(cfg.data.tokenizer.path), Path(tok_dir), hf


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class _StopRequest:
    """SIGTERM/SIGINT ask the loop to checkpoint after the current step and exit."""

    def __init__(self):
        self.signum = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:  # a second Ctrl-C means "now"
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def train(cfg: RunConfig, log=print) -> Path:
    """Start a new run; returns the run directory."""
    assert not cfg.stages, "staged recipes run through stagewise.train.stages.train_stages"
    device = pick_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    init = _init_source(cfg, log) if cfg.init_from else None
    dataset = open_dataset(resolve_dataset(cfg.data, log=log))
    if init and (dataset.tokenizer.sha256, dataset.tokenizer.specials) != (init[1].sha256, init[1].specials):
        raise ConfigError(f"data.prepared: {cfg.data.prepared} was tokenized with another tokenizer (or other "
                          f"document separators) than init_from {cfg.init_from}; prepare it with "
                          f"--tokenizer {cfg.data.tokenizer.path}")
    mcfg = init[0] if init else resolve_model_config(cfg.model, dataset.tokenizer.vocab_size)
    # Fails with a precise DataError if the data is too small, before anything is written.
    SequenceSampler(dataset.train, cfg.data.seq_len, cfg.train.batch_size, cfg.seed)

    run_dir = rundir.new_run_dir(cfg.out_dir, cfg.name)
    run_dir.mkdir(parents=True)
    (run_dir / rundir.CONFIG).write_text(dump_yaml(cfg))
    rundir.write_json(run_dir / rundir.MODEL_CONFIG, dataclasses.asdict(mcfg))
    dataset.tokenizer.save(run_dir / rundir.TOKENIZER)
    if init:  # keep the source's chat template, generation config and HF config for export-hf
        from stagewise.interop.hf_io import SIDE_FILES

        for name in SIDE_FILES:
            if (init[2] / name).is_file():
                shutil.copyfile(init[2] / name, run_dir / name)
        if init[3] is not None:
            rundir.write_json(run_dir / "hf_config.json", init[3])
    rundir.write_json(run_dir / rundir.RUN_INFO, {
        "dataset": str(dataset.path), "device": str(device), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "python": sys.version.split()[0]})
    log(f"run directory: {run_dir}")
    model = _fit(cfg, mcfg, run_dir, dataset, device, checkpoint=None, log=log)
    _finish(cfg, mcfg, run_dir, model, dataset.tokenizer, device, log)
    return run_dir


def load_run(run_dir: Path, log) -> tuple[RunConfig, ModelConfig, dict, torch.device]:
    """(config, model config, run_info, device) of an existing run, with its thread count restored."""
    if not (run_dir / rundir.CONFIG).is_file():
        raise CheckpointError(f"{run_dir}: not a stagewise run directory (no {rundir.CONFIG})")
    cfg = from_dict(RunConfig, read_yaml(run_dir / rundir.CONFIG))
    mcfg = from_dict(ModelConfig, json.loads((run_dir / rundir.MODEL_CONFIG).read_text()), "model")
    info = json.loads((run_dir / rundir.RUN_INFO).read_text())
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if info.get("threads") != torch.get_num_threads():
        log(f"warning: this run used {info.get('threads')} threads, now {torch.get_num_threads()}; "
            "results stay correct but are not bitwise identical to an uninterrupted run")
    return cfg, mcfg, info, pick_device(cfg.device)


def resume(run_dir: str | Path, log=print) -> Path:
    run_dir = Path(run_dir)
    cfg, mcfg, info, device = load_run(run_dir, log)
    assert not cfg.stages, "staged runs resume through stagewise.train.stages.resume_stages"
    run_tokenizer = Tokenizer.load(run_dir / rundir.TOKENIZER)
    dataset = open_dataset(Path(info["dataset"]), expect_tokenizer_sha=run_tokenizer.sha256)
    ckpt = latest_checkpoint(run_dir / rundir.CHECKPOINTS)
    log(f"resuming {run_dir} from {ckpt.name if ckpt else 'the start (no checkpoint was written)'}")
    model = _fit(cfg, mcfg, run_dir, dataset, device, checkpoint=ckpt, log=log)
    if model is not None:
        _finish(cfg, mcfg, run_dir, model, dataset.tokenizer, device, log)
    return run_dir


def _finish(cfg: RunConfig, mcfg: ModelConfig, run_dir: Path, model, tokenizer, device, log) -> None:
    """Export the final weights and print the recipe's samples."""
    final = run_dir / rundir.FINAL
    export_safetensors(model, {"format": "stagewise", "stagewise_model": dataclasses.asdict(mcfg)}, final,
                       extra_files=rundir.tokenizer_files(run_dir))
    model.eval()
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    for prompt in cfg.sample.prompts:
        s = cfg.sample
        ids = generate(model, tokenizer.encode_prompt(prompt), s.max_new_tokens, temperature=s.temperature,
                       top_k=s.top_k, top_p=s.top_p, eos_id=tokenizer.stop_ids, generator=gen)
        log(f"--- sample (prompt {prompt!r}) ---\n{prompt}{tokenizer.decode(ids)}")
    ckpt = latest_checkpoint(run_dir / rundir.CHECKPOINTS)
    log(f"\ncheckpoint: {ckpt}\nexported model: {final}\n"
        f"  stagewise sample {run_dir} --prompt 'def '\n  stagewise eval {run_dir}   (validation split)\n"
        f"  stagewise resume {run_dir}   (continues a stopped run)")


def _fit(cfg: RunConfig, mcfg: ModelConfig, run_dir: Path, dataset, device, checkpoint, log, stage=None):
    """The loop. `stage` (a stagewise.train.stages.StageRun, for staged recipes) supplies the batches,
    the LR, the evaluations, the end step and the extra state; cfg is then that stage's view of the recipe."""
    seed_everything(cfg.seed)
    model = Transformer(mcfg).to(device)
    if checkpoint is None and cfg.init_from:
        rundir.load_weights(model, rundir.load_init_source(cfg.init_from)[1], f"init_from {cfg.init_from}")
    # A precision schedule may have switched modes before the checkpoint: build the mode it was saved in.
    record = read_train_record(checkpoint) if checkpoint else None
    boundary = stage is not None and record is not None and stage.begins_at(record["train_state"])
    # A stage in another precision mode loads the previous stage's checkpoint in that stage's mode and then
    # switches, exactly as a precision schedule does (moments kept or reset per optimizer_state).
    saved_mode = record["train_state"]["precision"].get("mode") if boundary else None
    switch_to = cfg.precision.mode if saved_mode and saved_mode != cfg.precision.mode else None
    pcfg = dataclasses.replace(cfg.precision, mode=saved_mode) if switch_to else cfg.precision
    precision = build_precision(pcfg, device, record["step"] if record else 0)
    model = precision.setup(model)
    optimizer = precision.setup_optimizer(build_optimizer(cfg.optim, model, device))
    objective = OBJECTIVES[cfg.train.objective]
    B, T, accum = cfg.train.batch_size, cfg.data.seq_len, cfg.train.grad_accum
    end = stage.end if stage else (lambda: cfg.train.steps)
    if stage:
        sampler, val = stage.sampler, None
    else:
        sampler = SequenceSampler(dataset.train, T, B, cfg.seed)
        val = [Batch(x, y) for x, y in eval_batches(dataset.val, T, B, cfg.eval.batches)]

    step, tokens_seen, skipped = 0, 0, 0
    if checkpoint is not None:
        # A stage begins from the previous stage's final checkpoint: weights, counters, RNG and
        # domain positions always carry over; optimizer state only with optimizer_state: keep.
        own_hyper = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        state = load_checkpoint(checkpoint, model, optimizer if not boundary or stage.keep_optimizer else None)
        step, tokens_seen, skipped = state["step"], state["tokens_seen"], state["skipped_steps"]
        sampler.load_state_dict(state["sampler"])
        if boundary:
            for group, hyper in zip(optimizer.param_groups, own_hyper):
                group.update(hyper)  # the new stage's betas, eps, weight decay, not the checkpoint's
            if stage.init_from:
                rundir.load_weights(model, rundir.load_init_source(stage.init_from)[1], f"init_from {stage.init_from}")
        precision.load_state_dict(state["precision"])
        if switch_to:
            switch = PrecisionStageConfig(at_step=max(1, step), mode=switch_to,
                                          optimizer_state="keep" if stage.keep_optimizer else "reset")
            model, precision, optimizer = switch_precision(cfg.precision, switch, model, precision, optimizer,
                                                           lambda m: build_optimizer(cfg.optim, m, device), device)
        if stage and not boundary:
            stage.load_state_dict(state["stage"])
        restore_rng(state["rng"])
    total = end()
    if step >= total:
        log(f"run already complete at step {step}/{total}")
        return None

    fpt = flops_per_token(mcfg, T)
    peak = peak_flops(device, precision.gemm_dtype)
    model.compile_blocks(precision.compiles(cfg.train.compile, log))  # training and eval forwards; sampling eager
    metrics = MetricsLog(run_dir / rundir.METRICS, resume_step=step if checkpoint else 0)
    progress = Progress(total, step, cfg.log.progress, cfg.log.every)
    kill_at = int(os.environ.get(KILL_AT_STEP_ENV, "-1"))
    ckpt_root = run_dir / rundir.CHECKPOINTS

    # The metrics line of step N is written after step N+1 has been queued: reading a step's loss
    # waits for it, and by then the device already has the next step to work on. Eval, checkpoints,
    # signals, the kill hook and the end write it at once. step_time_s is thus launch to launch.
    pending = None  # (step, tokens, lr, peak memory, stage and precision metrics, StepResult, start time)

    def flush(t_end: float | None = None, evaluate_now: bool = False) -> None:
        """Write the pending step's line; t_end None: the step's end, once .host() has waited for it."""
        nonlocal pending, skipped
        if pending is None:
            return
        at, tokens, lr, mem, extra, result, t0 = pending
        pending = None
        r = result.host()
        skipped += not r.applied
        dt = (t_end or time.perf_counter()) - t0
        tok_s = B * T * accum / dt
        record = {"step": at, "tokens": tokens, "loss": r.loss, "lr": lr, "grad_norm": r.grad_norm,
                  "tokens_per_s": tok_s, "mfu": mfu(fpt, tok_s, peak), "peak_mem_bytes": mem, "step_time_s": dt,
                  **extra}
        if not r.applied:
            record["skipped"] = True
            progress.message(f"step {at}: non-finite gradient (norm {r.grad_norm}); update skipped")
        if evaluate_now:
            if stage:
                record.update(stage.evaluate(model, precision))  # val_loss/<domain> for every domain seen
            else:
                res = evaluate(model, val, precision, token_bytes=dataset.tokenizer.token_bytes)
                record["val_loss"], record["val_bpb"] = res["loss"], res["bits_per_byte"]
        metrics.write(record)
        progress.update(at, r.loss, tok_s, record["mfu"], record.get("val_loss"))

    def save(at_step: int) -> Path:
        flush()  # skipped_steps must count the pending step
        state = {"step": at_step, "tokens_seen": tokens_seen, "skipped_steps": skipped,
                 "sampler": sampler.state_dict(), "precision": precision.state_dict(), "rng": capture_rng(),
                 "schedule": {"name": cfg.schedule.name, "step": at_step}}
        if stage:
            state["stage"] = stage.state_dict(at_step)
        return save_checkpoint(ckpt_root, at_step, model, optimizer, state, cfg.checkpoint.keep_last)

    model.train()
    with _StopRequest() as stop:
        while step < end():
            if stage and stage.poll_cooldown(step):
                save(step)  # the trigger is now in a checkpoint: a resume cools down at the same step
                stage.consume_cooldown_file()
            t0 = time.perf_counter()
            micro, targets = [], 0
            for _ in range(accum):
                batch = Batch(*sampler.next_batch())
                targets += num_targets(batch)  # counted on the CPU batch: the step need not ask the device
                micro.append(to_device(batch, device))
            if (switch := stage_due(cfg.precision, step)) is not None:
                model, precision, optimizer = switch_precision(
                    cfg.precision, switch, model, precision, optimizer,
                    lambda m: build_optimizer(cfg.optim, m, device), device)
                model.compile_blocks(precision.compiles(cfg.train.compile))
                progress.message(f"step {step}: precision {switch.mode} from here on "
                                 f"(optimizer state: {switch.optimizer_state})")
            lr = stage.lr(step) if stage else lr_at(step, cfg.optim.lr, total, cfg.schedule)
            result = train_step(model, optimizer, precision, objective, micro, lr, cfg.train.grad_clip,
                                targets_per_step=targets)
            flush(t0)  # the previous step's line, now that this step is queued
            step += 1
            tokens_seen += B * T * accum
            # stage index, realised mixture shares; loss scale, gradient/update format telemetry
            extra = {**(stage.metrics() if stage else {}), **precision.metrics()}
            pending = (step, tokens_seen, lr, peak_memory_bytes(device), extra, result, t0)
            evaluate_now = step == end() or bool(cfg.eval.every and step % cfg.eval.every == 0)
            checkpoint_now = step == end() or (cfg.checkpoint.every and step % cfg.checkpoint.every == 0)
            if evaluate_now or checkpoint_now or stop.signum or step == kill_at:
                flush(evaluate_now=evaluate_now)
            if checkpoint_now or stop.signum:
                path = save(step)
                if stop.signum:
                    progress.close()
                    metrics.close()
                    log(f"received {signal.Signals(stop.signum).name}: saved {path}; "
                        f"continue with: stagewise resume {run_dir}")
                    raise SystemExit(128 + stop.signum)
            if step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
        flush()
    progress.close()
    metrics.close()
    if skipped:
        log(f"warning: {skipped} step(s) skipped for non-finite gradients")
    return model
