"""Start or resume a run: prepare its data, write the run directory, drive its stages, finish.

`start(cfg)` and `resume(run_dir)` differ only in where the run comes from; both hand the
run to `_drive`, which finds the stage the newest checkpoint is in and runs the stages from
there through the one loop (train/loop.py). A plain recipe is a run of one stage.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import sys
import tempfile
from pathlib import Path

import torch

from stagewise import rundir
from stagewise.checkpoint import export_config, export_safetensors, latest_checkpoint
from stagewise.checkpoint.store import latest_valid_checkpoint, read_train_record
from stagewise.config.loader import dump_yaml, from_dict, read_yaml, to_dict
from stagewise.config.schema import ModelConfig, RunConfig
from stagewise.data import Tokenizer, open_dataset, resolve_dataset
from stagewise.distributed import check_parallel, init_world, launched_world_size
from stagewise.errors import CheckpointError, ConfigError
from stagewise.generate.engine import generate_batch
from stagewise.model import Transformer
from stagewise.train import stages as plan
from stagewise.train.kinds import RunData, build_stage
from stagewise.train.loop import fit


def pick_device(name: str) -> torch.device:
    """auto: CUDA if present, else the CPU. Under torchrun (LOCAL_RANK set) auto and cuda mean this
    process's GPU, cuda:LOCAL_RANK, made the current device so that kernels and allocations without
    an explicit index land there too."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", name):
        raise ConfigError(f"device: expected auto, cpu, cuda or cuda:N, got {name!r}")
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


def _first_init_from(cfg: RunConfig):
    return cfg.stages[0].init_from if cfg.stages else cfg.init_from


def _quiet(msg: str) -> None:
    pass


def join_world(cfg: RunConfig, device, log):
    """The process group torchrun describes, after the recipe's parallel settings are checked against
    its size; (world, the log this rank prints to: rank 0's alone prints)."""
    check_parallel(cfg, launched_world_size())
    world = init_world(cfg.parallel, device)
    if world.on and world.main:
        log(f"parallel: {world.strategy} over {world.size} ranks" +
            (f" (mesh {' x '.join(map(str, world.mesh.shape))})" if world.mesh is not None else ""))
    return world, (log if world.main else _quiet)


def start(cfg: RunConfig, log=print, from_stage: str | None = None, reuse: str | None = None) -> Path:
    """Start a new run; returns the run directory. from_stage: re-run from that stage, reusing the stages
    before it from an earlier run (`reuse`, default the newest of the recipe's name; train/from_stage.py)."""
    device = pick_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    world, log = join_world(cfg, device, log)
    rundir.check_dir_or_absent(cfg.out_dir, "out_dir")
    rundir.check_dir_or_absent(cfg.data.cache_dir, "data.cache_dir")
    where = "stages[0].init_from" if cfg.stages else "init_from"
    init = rundir.load_init_source(_first_init_from(cfg)) if _first_init_from(cfg) else None
    if init and cfg.data.seq_len > init[0].max_seq_len:
        raise ConfigError(f"data.seq_len: expected <= {init[0].max_seq_len} (max_seq_len of {where} "
                          f"{_first_init_from(cfg)}), got {cfg.data.seq_len}")
    tok_path = str(Path(init[2]) / rundir.TOKENIZER) if init else None
    if init:
        log(f"{where} {_first_init_from(cfg)}: its architecture and tokenizer replace the recipe's model section")
    with world.main_first():  # rank 0 prepares (and caches) the data, the others then read it
        paths, tokenizer = _prepare_data(cfg, tok_path, log)
    mcfg = init[0] if init else resolve_model_config(cfg.model, tokenizer.vocab_size)
    run = RunData(cfg, tokenizer, Path("."), {n: open_dataset(p) for n, p in paths.items()}, staged=bool(cfg.stages))
    for i in range(plan.n_stages(cfg)):  # fail on bad or too little data, bad adapters, before anything is written
        stage = build_stage(run, i, 0)
        from stagewise.adapters import validate

        validate(mcfg, stage.cfg.adapter, stage.cfg.precision.mode)
        check_memory(stage, mcfg, device)

    prior = None
    if from_stage is not None:
        from stagewise.train.from_stage import plan_reuse

        prior = plan_reuse(cfg, from_stage, reuse, tokenizer.sha256, dataclasses.asdict(mcfg))
    run.run_dir = run_dir = Path(world.broadcast(str(_write_run_dir(cfg, mcfg, tokenizer, init, paths, device))
                                                 if world.main else None))
    world.barrier()
    world.run_dir = str(run_dir)
    log(f"run directory: {run_dir}")
    lock = rundir.RunLock(run_dir) if world.main else None
    try:
        ckpt = None
        if prior is not None:
            from stagewise.train.from_stage import copy_prior

            ckpt = world.broadcast(str(copy_prior(prior, cfg, run_dir)) if world.main else None)
            world.barrier()
            ckpt = Path(ckpt)
            log(f"--from-stage {from_stage}: stages {', '.join(s.name for s in cfg.stages[:prior.index])} (steps "
                f"1..{prior.step}) reused from {prior.run_dir}")
        _drive(run, mcfg, device, ckpt, log)
    finally:
        if lock is not None:
            lock.release()
    return run_dir


def _write_run_dir(cfg: RunConfig, mcfg: ModelConfig, tokenizer, init, paths, device) -> Path:
    """A new run directory with the recipe, model config, tokenizer and run info (rank 0 only)."""
    from stagewise.distributed import WORLD

    run_dir = rundir.new_run_dir(cfg.out_dir, cfg.name)
    run_dir.mkdir(parents=True)
    (run_dir / rundir.CONFIG).write_text(dump_yaml(cfg))
    rundir.write_json(run_dir / rundir.MODEL_CONFIG, dataclasses.asdict(mcfg))
    tokenizer.save(run_dir / rundir.TOKENIZER)
    if init:  # keep the source's chat template, generation config and HF config for export-hf
        from stagewise.interop.hf_io import SIDE_FILES

        for name in SIDE_FILES:
            if (Path(init[2]) / name).is_file():
                shutil.copyfile(Path(init[2]) / name, run_dir / name)
        if init[3] is not None:
            rundir.write_json(run_dir / "hf_config.json", init[3])
    rundir.write_json(run_dir / rundir.RUN_INFO, {
        "dataset": str(next(iter(paths.values()))) if paths else None, "domains": {n: str(p) for n, p in paths.items()},
        "device": str(device), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "python": sys.version.split()[0], "world_size": WORLD.size, "strategy": WORLD.strategy,
        "config": json.loads(json.dumps(dataclasses.asdict(cfg)))})  # what resume compares config.yaml against
    return run_dir


def _prepare_data(cfg: RunConfig, tok_path: str | None, log) -> tuple[dict[str, Path], Tokenizer]:
    """The prepared token dataset of every pre-training domain ("" for a plain lm recipe), all with one
    tokenizer: init_from's, data.tokenizer.path, or a BPE trained on the first stage's sources."""
    if cfg.stages or cfg.kind != "lm":
        paths = _prepare_domains(cfg, tok_path, log)
        given = tok_path or cfg.data.tokenizer.path
        # A given tokenizer is loaded from its own directory, where its chat template is (prepared
        # datasets keep only tokenizer.json).
        tok = Tokenizer.load(given) if given else open_dataset(next(iter(paths.values()))).tokenizer
        return paths, tok
    if tok_path:
        cfg.data.tokenizer.path = tok_path
    dataset = open_dataset(resolve_dataset(cfg.data, log=log))
    if tok_path:
        want = Tokenizer.load(tok_path)
        if (dataset.tokenizer.sha256, dataset.tokenizer.specials) != (want.sha256, want.specials):
            raise ConfigError(f"data.prepared: {cfg.data.prepared} was tokenized with another tokenizer (or other "
                              f"document separators) than init_from {cfg.init_from}; prepare it with "
                              f"--tokenizer {tok_path}")
    return {"": dataset.path}, (Tokenizer.load(tok_path) if tok_path else dataset.tokenizer)


def _prepare_domains(cfg: RunConfig, tokenizer_path: str | None, log) -> dict[str, Path]:
    sources = plan.domain_sources(cfg)
    paths: dict[str, Path] = {}
    tok = tokenizer_path or cfg.data.tokenizer.path
    if tok is None:
        first = cfg.stages[0].mixture
        if not first:
            raise ConfigError("stages[0]: a run without init_from or data.tokenizer.path needs a first stage "
                              "with a mixture to train its tokenizer on")
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


def load_run(run_dir: Path, log) -> tuple[RunConfig, ModelConfig, dict, torch.device]:
    """(config, model config, run_info, device) of an existing run, with its thread count restored."""
    if not (run_dir / rundir.CONFIG).is_file():
        raise CheckpointError(f"{run_dir}: not a stagewise run directory (no {rundir.CONFIG})")
    cfg = from_dict(RunConfig, read_yaml(run_dir / rundir.CONFIG))
    mcfg = rundir.load_model_config(run_dir)
    try:
        info = json.loads((run_dir / rundir.RUN_INFO).read_text())
    except (OSError, ValueError):
        raise CheckpointError(f"{run_dir}: {rundir.RUN_INFO} is missing or unreadable; it records the data the run "
                              "trains on, so the run cannot be resumed without it") from None
    check_config_edits(cfg, info.get("config"), run_dir, log)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if info.get("threads") != torch.get_num_threads():
        log(f"warning: this run used {info.get('threads')} threads, now {torch.get_num_threads()}; "
            "results stay correct but are not bitwise identical to an uninterrupted run")
    return cfg, mcfg, info, pick_device(cfg.device)


# Recipe fields a resume may take from an edited config.yaml: they change when and what is logged,
# evaluated, saved or sampled, or how long the run goes on, never what a step computes.
SAFE_EDITS = ("train.steps", "eval.", "checkpoint.every", "checkpoint.keep_last", "checkpoint.async_save", "log.",
              "sample.", "memory.", "threads")


def _flat(value, prefix: str = "") -> dict:
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: value}


def check_config_edits(cfg: RunConfig, started: dict | None, run_dir: Path, log) -> None:
    """config.yaml edited since the run started: fields in SAFE_EDITS are taken (and named); any other
    change would make the resumed run differ from the one its checkpoints belong to: one line naming it."""
    if started is None:  # a run directory from before run_info.json kept the config
        return
    now, then = _flat(json.loads(json.dumps(dataclasses.asdict(cfg)))), _flat(started)
    # a field added to the schema since the run started reads as its default there
    default = _flat(json.loads(json.dumps(dataclasses.asdict(RunConfig()))))
    then = {**{k: default[k] for k in now.keys() - then.keys() if k in default}, **then}
    changed = sorted(k for k in now.keys() | then.keys() if now.get(k) != then.get(k))
    unsafe = [k for k in changed if not k.startswith(SAFE_EDITS)]
    if unsafe:
        k = unsafe[0]
        raise ConfigError(f"{run_dir / rundir.CONFIG}: {k} was changed ({then.get(k)!r} -> {now.get(k)!r}) after the "
                          f"run started; a resume must compute what the run computed. Undo it, or start a new run "
                          f"(init_from the checkpoint); fields a resume may change: {', '.join(SAFE_EDITS)}")
    for k in changed:
        log(f"config.yaml: {k} changed since the run started ({then.get(k)!r} -> {now.get(k)!r}); resuming with it")


def check_memory(stage, mcfg: ModelConfig, device) -> None:
    """memory.limit: a one-line error before anything runs when the stage's predicted peak does not fit."""
    from stagewise.memory import check_budget, predict
    from stagewise.memory.predict import emulates_bf16

    def predict_fn(c, m):
        return predict(c, m, emulates_bf16(c.precision.mode, device))
    check_budget(stage.cfg, predict_fn(stage.cfg, mcfg), mcfg, device, predict_fn)


def resume(run_dir: str | Path, log=print) -> Path:
    run_dir = Path(run_dir)
    # Locked before anything is read or rewritten (a resume truncates metrics.jsonl to its checkpoint).
    lock = rundir.RunLock(run_dir) if (run_dir / rundir.CONFIG).is_file() and _rank0() else None
    try:
        return _resume(run_dir, log)
    finally:
        if lock is not None:
            lock.release()


def _resume(run_dir: Path, log) -> Path:
    cfg, mcfg, info, device = load_run(run_dir, log if launched_world_size() == 1 or _rank0() else _quiet)
    world, log = join_world(cfg, device, log)
    world.run_dir = str(run_dir)
    tokenizer = Tokenizer.load(run_dir / rundir.TOKENIZER)
    domains = info["domains"] if "domains" in info else {"": info["dataset"]}
    datasets = {n: open_dataset(Path(p), expect_tokenizer_sha=tokenizer.sha256) for n, p in domains.items()}
    run = RunData(cfg, tokenizer, run_dir, datasets, staged=bool(cfg.stages))
    ckpt = latest_valid_checkpoint(run_dir / rundir.CHECKPOINTS, log)
    index = _position(cfg, ckpt)[0]
    where = f" in stage {index} ({cfg.stages[index].name})" if cfg.stages and index < len(cfg.stages) else ""
    log(f"resuming {run_dir}{where} from {ckpt.name if ckpt else 'the start (no checkpoint was written)'}")
    _drive(run, mcfg, device, ckpt, log)
    return run_dir


def _position(cfg: RunConfig, ckpt) -> tuple[int, int, dict]:
    """(stage index, its start step, the checkpoint's record) of the stage a checkpoint resumes in."""
    if ckpt is None:
        return 0, 0, {}
    record = read_train_record(ckpt)
    st = record["train_state"].get("stage") or {}
    if st.get("complete"):
        return st["index"] + 1, record["step"], record
    return st.get("index", 0), st.get("start", 0), record


def _drive(run: RunData, mcfg: ModelConfig, device, ckpt, log) -> None:
    """Train from `ckpt` to the run's end with its experiment trackers open (rank 0: log.to)."""
    trackers = None
    if _rank0() and any(n != "jsonl" for n in run.cfg.log.to):
        from stagewise.trackers import Trackers

        trackers = Trackers([n for n in run.cfg.log.to if n != "jsonl"], run.run_dir, to_dict(run.cfg),
                            run.cfg.log, run.cfg.name)
    ok = False
    try:
        _drive_stages(run, mcfg, device, ckpt, log, trackers)
        ok = True
    finally:
        if trackers is not None:
            trackers.close(ok)


def _drive_stages(run: RunData, mcfg: ModelConfig, device, ckpt, log, trackers) -> None:
    cfg, run_dir = run.cfg, run.run_dir
    index, start, record = _position(cfg, ckpt)
    if index >= plan.n_stages(cfg):
        owed = _owed(run)
        if not owed:
            log(f"run already complete at step {record['step']} (all {plan.n_stages(cfg)} stage(s))")
            return
        # stopped after its final checkpoint, before what follows it: finish that from the checkpoint
        log(f"training complete at step {record['step']}; writing what the run still owes: {', '.join(owed)}")
        model = rundir.load_model(ckpt, device)[0]
        if run.staged and not (run_dir / plan.STAGES_DIR / cfg.stages[-1].name).is_dir():
            _end_stage(run, mcfg, model, len(cfg.stages) - 1)
        elif run.staged:
            plan.write_forgetting(cfg, run_dir, len(cfg.stages), plan.forgetting_domains(cfg))
        _finish(cfg, mcfg, run_dir, model, run.tokenizer, device, log)
        return
    if run.staged and index > 0 and not (run_dir / plan.STAGES_DIR / cfg.stages[index - 1].name).is_dir():
        # killed right after the previous stage's final checkpoint, before its export
        _end_stage(run, mcfg, rundir.load_model(ckpt, device)[0], index - 1)
    model = None
    for i in range(index, plan.n_stages(cfg)):
        stage = build_stage(run, i, start)
        if ckpt is not None:  # a resume may run on another machine than the start did
            check_memory(stage, mcfg, device)
        if run.staged:
            mix = getattr(stage.source, "probs", None)
            shares = f", mixture: {', '.join(f'{n} {p:.1%}' for n, p in mix.items())}" if mix else ""
            log(f"stage {i} ({stage.name}): steps {start}..{stage.end()} (budget {stage.budget}), kind {stage.kind}"
                f"{shares}")
        model = fit(stage, mcfg, device, ckpt, log, trackers)
        if model is None:
            return
        ckpt = latest_checkpoint(run_dir / rundir.CHECKPOINTS)
        start = read_train_record(ckpt)["step"]
        if run.staged:
            _end_stage(run, mcfg, model, i)
    _finish(cfg, mcfg, run_dir, model, run.tokenizer, device, log)


def _rank0() -> bool:
    return os.environ.get("RANK", "0") == "0"


def unsharded(model, mcfg: ModelConfig):
    """The whole model on rank 0, for export and sampling: the model itself, or under fsdp2/hsdp a plain
    copy built from the gathered full state (a collective); None on the other ranks."""
    from torch.distributed.fsdp import FSDPModule

    from stagewise.distributed import WORLD, full_state_dict

    if not isinstance(model, FSDPModule):
        return model if WORLD.main else None
    state = full_state_dict(model, WORLD)
    if state is None:
        return None
    device = model.rope_cos.device
    plain = Transformer(mcfg)
    plain.load_state_dict(state)
    return plain.to(device)


def _owed(run: RunData) -> list[str]:
    """What a run whose training is complete has not yet written: the last stage's export and its
    forgetting row (staged recipes), the final export."""
    owed = []
    if run.staged and not (run.run_dir / plan.STAGES_DIR / run.cfg.stages[-1].name).is_dir():
        owed.append(f"{plan.STAGES_DIR}/{run.cfg.stages[-1].name}")
    elif run.staged and len(_forgetting_stages(run.run_dir)) < len(run.cfg.stages):
        owed.append(f"{plan.FORGETTING}'s last row")
    if not (run.run_dir / rundir.FINAL / "model.safetensors").is_file():
        owed.append(rundir.FINAL)
    return owed


def _forgetting_stages(run_dir: Path) -> list:
    try:
        return json.loads((run_dir / plan.FORGETTING).read_text()).get("stages", [])
    except (OSError, ValueError, AttributeError):
        return []


def _end_stage(run: RunData, mcfg: ModelConfig, model, index: int) -> None:
    """RUN_DIR/stages/<name>/ (the stage's final weights, for eval, sample, init_from and later analysis)
    and forgetting.json over the stages completed so far (rank 0)."""
    model = unsharded(model, mcfg)
    if model is None:
        return
    name = run.cfg.stages[index].name
    export_model(model, mcfg, run.run_dir, run.run_dir / plan.STAGES_DIR / name)
    plan.write_forgetting(run.cfg, run.run_dir, index + 1, plan.forgetting_domains(run.cfg))


# Test hook: SIGKILL this process inside the export named here (a stage name, or "final") of an adapter
# model, after its adapters are merged into the weights and before anything is written.
KILL_IN_MERGE_ENV = "STAGEWISE_DEBUG_KILL_IN_MERGE"


def export_model(model, mcfg: ModelConfig, run_dir: Path, out: Path) -> None:
    """A stage's or the run's weights for eval, sample and init_from; with adapters, the weights merged
    into the base plus the adapter itself (adapter.safetensors + adapter.json, for export-peft)."""
    from stagewise.adapters import adapters, merged_state_dict, write_adapter_files
    from stagewise.adapters.apply import original_weights

    files = rundir.tokenizer_files(run_dir)
    if not adapters(model):
        export_safetensors(model, export_config(mcfg), out, extra_files=files)
        return
    with tempfile.TemporaryDirectory() as tmp:
        files |= write_adapter_files(model, Path(tmp))
        state = merged_state_dict(model, original_weights(model))
        if os.environ.get(KILL_IN_MERGE_ENV) == out.name:
            os.kill(os.getpid(), signal.SIGKILL)
        export_safetensors(model, export_config(mcfg), out, extra_files=files, state=state)


def _finish(cfg: RunConfig, mcfg: ModelConfig, run_dir: Path, model, tokenizer, device, log) -> None:
    """Export the final weights and print the recipe's samples (as chat turns after an sft stage; rank 0)."""
    model = unsharded(model, mcfg)
    if model is None:
        return
    final = run_dir / rundir.FINAL
    export_model(model, mcfg, run_dir, final)
    model.eval()
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    s = cfg.sample
    chat = s.chat if s.chat is not None else plan.stage_kind(cfg, plan.n_stages(cfg) - 1) in ("sft", "dpo", "rl")
    encoded = [prompt_and_stop(tokenizer, prompt, chat) for prompt in s.prompts]
    stop = encoded[0][1] if encoded else ()
    outs = generate_batch(model, [ids for ids, _ in encoded], s.max_new_tokens, temperature=s.temperature,
                          top_k=s.top_k, top_p=s.top_p, stop_ids=stop, generator=gen).tokens
    summary = _summary(cfg, run_dir)
    if summary:
        log("\n" + "\n".join(summary[0]) + "\n")
    for prompt, out in zip(s.prompts, outs):
        shown = f"user: {prompt}\nassistant: {tokenizer.decode(out)}" if chat else prompt + tokenizer.decode(out)
        log(f"--- {'chat ' if chat else ''}sample (prompt {prompt!r}) ---\n{shown}")
    if summary and summary[1]:
        log("\n" + "\n".join(summary[1]))
    ckpt = latest_checkpoint(run_dir / rundir.CHECKPOINTS)
    log(f"\ncheckpoint: {ckpt}\nexported model: {final}\n"
        f"  stagewise sample {run_dir} {'--chat ' if chat else ''}--prompt 'def '\n"
        f"  stagewise eval {run_dir}   (validation split)\n"
        f"  stagewise resume {run_dir}   (continues a stopped run)")


def _summary(cfg: RunConfig, run_dir: Path):
    """A staged run's end-of-run printout (eval/headline.py): (headline lines, forgetting table lines)."""
    if not cfg.stages:
        return None
    from stagewise.eval.headline import format_headlines, format_table, stage_headlines

    heads = stage_headlines(rundir.read_metrics(run_dir / rundir.METRICS), [(st.name, st.kind) for st in cfg.stages])
    try:
        table = format_table(json.loads((run_dir / plan.FORGETTING).read_text()))
    except (OSError, ValueError):
        table = []
    return format_headlines(heads), table


def prompt_and_stop(tokenizer: Tokenizer, prompt: str, chat: bool) -> tuple[list[int], tuple[int, ...]]:
    """(prompt ids, stop ids): as a document's start, or as a user turn of the tokenizer's chat template
    followed by the assistant header, stopping at the template's end-of-turn tokens."""
    if not chat:
        return tokenizer.encode_prompt(prompt), tokenizer.stop_ids
    from stagewise.data.chat import require_template

    template = require_template(tokenizer, "sample.chat: the tokenizer")
    return template.prompt_ids(tokenizer, [{"role": "user", "content": prompt}]), template.stop_ids(tokenizer)
