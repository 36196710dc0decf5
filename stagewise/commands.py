"""What each `stagewise` subcommand does (argument parsing lives in cli.py)."""

from __future__ import annotations

import dataclasses
import math
import re
import sys
from pathlib import Path

from stagewise.errors import ConfigError, DataError
from stagewise.rundir import check_new_dir


def _overrides(extra: list[str]) -> list[str]:
    for item in extra:
        if not re.match(r"--[A-Za-z_][\w.\[\]]*=", item):
            raise ConfigError(f"argument {item!r}: expected a recipe override --section.key=value")
    return extra


def _log(msg: str) -> None:
    print(msg, flush=True)


def cmd_run(args, extra) -> int:
    from stagewise.config.loader import load_recipe

    cfg = load_recipe(args.recipe, _overrides(extra))
    from stagewise.train.runner import start  # after validation: a bad recipe fails fast

    from stagewise.distributed import WORLD

    if args.reuse and not args.from_stage:
        raise ConfigError("--reuse: only with --from-stage NAME (the stage to re-run from)")
    start(cfg, log=_log, from_stage=args.from_stage, reuse=args.reuse)
    WORLD.close()  # not after an error: a collective with a lost rank could wait for it
    return 0


def cmd_resume(args, extra) -> int:
    from stagewise.distributed import WORLD
    from stagewise.train.runner import resume

    resume(args.run_dir, log=_log)
    WORLD.close()
    return 0


def cmd_plan(args, extra) -> int:
    from stagewise.config.loader import load_recipe
    from stagewise.plan import print_plan

    print_plan(load_recipe(args.recipe, _overrides(extra)), measure_peak=args.measure_peak)
    return 0


def _device(name: str):
    from stagewise.train.runner import pick_device

    return pick_device(name)


def cmd_sample(args, extra) -> int:
    import torch

    from stagewise.rundir import load_model

    device = _device(args.device)  # the numbers are checked by the parser (cli.py)
    model, tok, _ = load_model(args.ckpt, device)
    temperature = 0.0 if args.greedy else args.temperature
    gen = torch.Generator(device=device).manual_seed(args.seed)
    from stagewise.train.runner import prompt_and_stop

    # --chat: the prompt is a user turn of the model's chat template; otherwise a document's start
    # (with BOS where the model's tokenizer adds one, as Gemma's does)
    prompt_ids, stop = prompt_and_stop(tok, args.prompt, args.chat)
    from stagewise.generate.engine import generate_batch

    # All samples in one batch of the generation engine (one KV cache, one forward per token).
    samples = generate_batch(model, [prompt_ids] * args.num_samples, args.max_new_tokens, temperature=temperature,
                             top_k=args.top_k, top_p=args.top_p, stop_ids=stop, generator=gen).tokens
    for i, ids in enumerate(samples):
        if args.num_samples > 1:
            print(f"--- sample {i + 1} ---")
        print(tok.decode(ids) if args.chat else args.prompt + tok.decode(ids), flush=True)
    return 0


def _eval_tokens(args, tok, run_meta_dir: Path):
    """The token stream to evaluate on, per --data."""
    import numpy as np

    from stagewise.config.schema import SourceConfig
    from stagewise.data import iter_documents, open_dataset

    spec = args.data
    if spec is None:
        info = run_meta_dir / "run_info.json"
        if not info.is_file():
            raise ConfigError("--data: required for an exported model (no run directory to take validation data from)")
        import json

        spec = json.loads(info.read_text())["dataset"]
        if spec is None:
            raise ConfigError("--data: required for this run: it trained on chat or preference data only (kind sft "
                              "or dpo), so it has no token validation split; give a prepared dataset, a built-in "
                              "corpus or a file")
    p = Path(spec)
    if (p / "manifest.json").is_file():
        ds = open_dataset(p, expect_tokenizer_sha=tok.sha256)
        if ds.tokenizer.specials != tok.specials:
            raise DataError(f"--data: {p} separates documents differently (eos/bos) than the model's tokenizer; "
                            "prepare it with the model's tokenizer.json")
        return (ds.val if args.split == "val" else ds.train), f"{p} ({args.split} split)"
    if spec in ("python-stdlib", "shakespeare", "python-docs"):
        src = SourceConfig(kind=spec)
    elif not p.exists():
        raise DataError(f"--data: {spec} is not a prepared dataset, a built-in corpus (python-stdlib, "
                        "shakespeare, python-docs) or an existing file/directory")
    else:
        kind = "jsonl" if p.suffix == ".jsonl" else "parquet" if p.suffix == ".parquet" else "text"
        if p.is_dir() and any(p.rglob("*.jsonl")):
            kind = "jsonl"
        elif p.is_dir() and any(p.rglob("*.parquet")):
            kind = "parquet"
        src = SourceConfig(kind=kind, path=str(p), field=args.field)
    ids: list[int] = []
    for doc in iter_documents(src, "--data"):  # documents as prepared data holds them
        ids.extend(tok.doc_prefix + tok.encode(doc.text))
        ids.append(tok.eos_id)
        if len(ids) > 4 * args.max_tokens:  # enough to pick evenly spaced windows from
            break
    return np.asarray(ids, dtype=np.int64), spec


def cmd_eval(args, extra) -> int:
    import yaml

    from stagewise.data import eval_batches
    from stagewise.eval import evaluate
    from stagewise.objectives import Batch
    from stagewise.rundir import CONFIG, load_model, resolve_model_source

    device = _device(args.device)
    _, _, meta_dir = resolve_model_source(args.ckpt)
    model, tok, mcfg = load_model(args.ckpt, device)
    seq_len = args.seq_len
    if seq_len is None:
        cfg_file = meta_dir / CONFIG
        seq_len = yaml.safe_load(cfg_file.read_text())["data"]["seq_len"] if cfg_file.is_file() else 512
    seq_len = min(seq_len, mcfg.max_seq_len)
    tokens, what = _eval_tokens(args, tok, meta_dir)
    n_batches = max(1, math.ceil(min(args.max_tokens, len(tokens)) / (args.batch_size * seq_len)))
    batches = [Batch(x, y) for x, y in eval_batches(tokens, seq_len, args.batch_size, n_batches)]
    res = evaluate(model, batches, device=device, token_bytes=tok.token_bytes)
    print(f"data: {what}\ntokens: {res['tokens']:,} ({res['bytes']:,} bytes of text)\n"
          f"loss: {res['loss']:.4f} nats/token\nperplexity: {res['perplexity']:.3f}\n"
          f"bits per byte: {res['bits_per_byte']:.4f}")
    return 0


def cmd_export(args, extra) -> int:
    from stagewise.checkpoint import export_config, export_safetensors
    from stagewise.rundir import load_model, resolve_model_source, tokenizer_files

    import torch

    out = check_new_dir(args.out)
    _, _, meta_dir = resolve_model_source(args.ckpt)
    model, _, mcfg = load_model(args.ckpt, torch.device("cpu"))
    export_safetensors(model, export_config(mcfg), out, extra_files=tokenizer_files(meta_dir))
    print(f"exported {out}")
    return 0


def _size_bytes(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B)\s*", text.upper())
    if not m or float(m.group(1)) <= 0:
        raise ConfigError(f"--max-shard-size: expected a size such as 500MB or 2GB, got {text!r}")
    return int(float(m.group(1)) * {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9}[m.group(2)])


def cmd_import_hf(args, extra) -> int:
    from stagewise.interop.hf_io import import_hf

    import_hf(args.src, args.out, gguf_file=args.gguf_file, log=_log)
    return 0


def cmd_export_hf(args, extra) -> int:
    from stagewise.interop.hf_io import export_hf

    export_hf(args.ckpt, args.out, family=args.arch, max_shard_bytes=_size_bytes(args.max_shard_size), merge=args.merge,
              dtype=args.dtype, log=_log)
    return 0


def _adapter_export_dir(path: Path) -> Path:
    from stagewise import rundir

    if (path / rundir.FINAL).is_dir():
        return path / rundir.FINAL
    return path


def cmd_export_peft(args, extra) -> int:
    from stagewise.adapters.peft_format import export_peft

    export_peft(_adapter_export_dir(Path(args.run)), Path(args.out), base_name=args.base_name, log=_log)
    return 0


def cmd_import_peft(args, extra) -> int:
    from stagewise.adapters.peft_format import import_peft

    import_peft(Path(args.adapter), args.base, Path(args.out), log=_log)
    return 0


def _parse_source(text: str, field: str):
    from stagewise.config.schema import SourceConfig

    kind, _, path = text.partition(":")
    valid = ("python-stdlib", "shakespeare", "python-docs", "text", "jsonl", "parquet")
    if kind not in valid:
        raise ConfigError(f"--source {text!r}: expected one of python-stdlib, shakespeare, python-docs, text:PATH, "
                          "jsonl:PATH, parquet:PATH")
    if kind in ("text", "jsonl", "parquet") and not path:
        raise ConfigError(f"--source {text!r}: {kind} needs a path, e.g. {kind}:/data/corpus")
    return SourceConfig(kind=kind, path=path or None, field=field)


def cmd_data(args, extra) -> int:
    from stagewise.config.loader import check_consistency, load_recipe
    from stagewise.config.schema import DataConfig, RunConfig
    from stagewise.data import prepare_dataset

    if args.recipe and args.source:
        raise ConfigError("data prepare: give either a recipe or --source options, not both")
    if args.recipe:
        data = load_recipe(args.recipe).data
    elif args.source:
        data = DataConfig(sources=[_parse_source(s, args.field) for s in args.source])
    else:
        raise ConfigError("data prepare: expected a recipe or at least one --source (e.g. --source python-stdlib)")
    if args.tokenizer:
        data.tokenizer.path = args.tokenizer
    if args.vocab_size is not None:
        data.tokenizer.vocab_size = args.vocab_size
    if args.val_fraction is not None:
        data.val_fraction = args.val_fraction
    from stagewise.config.loader import from_dict

    data = from_dict(DataConfig, dataclasses.asdict(data), "data")  # re-validate the edited values
    check_consistency(RunConfig(data=data))
    out = check_new_dir(args.out)
    prepare_dataset(data, out, log=_log)
    print(f"prepared {out}  (use it with --data.prepared={out})")
    return 0


def cmd_report(args, extra) -> int:
    from stagewise.report import write_report

    print(f"report: {write_report(args.run_dir, args.out)}")
    from stagewise.report.page import memory_rows
    from stagewise.report.rundata import MEMORY, read_memory

    path = Path(args.run_dir) / MEMORY
    for stage, rec in (read_memory(path) if path.is_file() else {}).items():
        print(f"memory ({stage}): predicted vs measured")
        for label, pred, meas, ratio in memory_rows(rec):
            print(f"  {label:<42}{pred:>14}{meas:>14}{ratio:>8}")
    return 0


def cmd_docs_config(args, extra) -> int:
    from stagewise.config.loader import config_reference_markdown

    sys.stdout.write(config_reference_markdown())
    return 0
