"""Load and validate recipes against the schema.

A recipe is YAML read with `yaml.safe_load` (no tags, no Python objects, nothing
executed), layered with `--key.path=value` overrides, then checked field by field
against the dataclasses in `schema.py`. Any problem raises ConfigError with one line:
the dotted field path, what is valid, and what was given.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Union, get_args, get_origin

import yaml

from stagewise.config.schema import RunConfig
from stagewise.errors import ConfigError
from stagewise.trackers import check_trackers


def load_recipe(path: str | Path, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML recipe, apply CLI overrides, validate, and return a RunConfig."""
    data = read_yaml(path)
    for item in overrides:
        key, value = parse_override(item)
        _set_path(data, key, value)
    return from_dict(RunConfig, data)


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe {path}: file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"recipe {path}{where}: invalid YAML ({problem})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"recipe {path}: not UTF-8 text") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path}: expected a mapping of sections at the top level, got {_kind(data)}")
    return data


def parse_override(item: str) -> tuple[str, Any]:
    """`--train.lr=3e-4` or `train.lr=3e-4` -> ("train.lr", 3e-4). Values are YAML scalars/flow."""
    text = item[2:] if item.startswith("--") else item
    key, sep, raw = text.partition("=")
    if not sep or not re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*|\[\d+\])*", key):
        raise ConfigError(f"override {item!r}: expected --section.key=value, e.g. --train.lr=3e-4")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw  # a plain string that happens not to be YAML; the field check decides
    return key, value


def _set_path(data: dict, key: str, value: Any) -> None:
    parts = re.findall(r"[A-Za-z_]\w*|\[\d+\]", key)
    node = data
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        where = _join(parts[: i + 1])
        if part.startswith("["):
            idx = int(part[1:-1])
            if not isinstance(node, list) or idx >= len(node):
                raise ConfigError(f"{where}: no such list element to override")
            if last:
                node[idx] = value
            else:
                node = node[idx]
            continue
        if not isinstance(node, dict):
            raise ConfigError(f"{where}: cannot set a key inside a {_kind(node)}")
        if last:
            node[part] = value
        else:
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {} if not parts[i + 1].startswith("[") else []
            node = nxt


def _join(parts: list[str]) -> str:
    out = ""
    for p in parts:
        out += p if p.startswith("[") or not out else "." + p
    return out


def from_dict(cls, data: Any, path: str = ""):
    """Build dataclass `cls` from plain data, validating every field."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'recipe'}: expected a mapping, got {_kind(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if cls is RunConfig:
        data = _inherit_stage_sections(data)
        if isinstance(data.get("log"), list):  # `log: [jsonl, tensorboard]` is short for `log: {to: [...]}`
            data = {**data, "log": {"to": data["log"]}}
    for key in data:
        if key not in fields:
            where = f"{path}.{key}" if path else str(key)
            raise ConfigError(f"{where}: unknown key; valid keys here: {', '.join(fields)}")
    kwargs = {}
    for name, f in fields.items():
        where = f"{path}.{name}" if path else name
        if name in data:
            kwargs[name] = _convert(hints[name], data[name], where, f.metadata)
    obj = cls(**kwargs)
    if cls is RunConfig:
        check_consistency(obj)
    return obj


def _inherit_stage_sections(data: dict) -> dict:
    """A stage's schedule/optim start from the recipe's sections, key by key (idempotent, so a
    dumped config.yaml, whose stages are complete, reads back the same)."""
    stages = data.get("stages")
    if not isinstance(stages, list):
        return data
    merged = []
    for stage in stages:
        if isinstance(stage, dict):
            stage = dict(stage)
            for key in ("schedule", "optim", "sft", "dpo", "rl"):
                top, own = data.get(key) or {}, stage.get(key) or {}
                if isinstance(top, dict) and isinstance(own, dict):
                    stage[key] = {**top, **own}
        merged.append(stage)
    return {**data, "stages": merged}


def _convert(tp, value, where: str, meta) -> Any:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _convert(args[0], value, where, meta)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if origin is list:
        (item_tp,) = get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {_show(value)}")
        return [_convert(item_tp, v, f"{where}[{i}]", {}) for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {_show(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
                value = int(value)  # 1e6 written in YAML arrives as a float
            else:
                raise ConfigError(f"{where}: expected {_expect('an integer', meta)}, got {_show(value)}")
        _check_bounds(value, where, meta, "an integer")
        return value
    if tp is float:
        v = value
        if isinstance(v, str):  # PyYAML reads 3e-4 (no dot) as a string
            try:
                v = float(v)
            except ValueError:
                v = None
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ConfigError(f"{where}: expected {_expect('a float', meta)}, got {_show(value)}")
        _check_bounds(float(v), where, meta, "a float")
        return float(v)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {_show(value)}")
        choices = meta.get("choices")
        if choices and value not in choices:
            raise ConfigError(f"{where}: expected one of {', '.join(choices)}, got {_show(value)}")
        return value
    raise AssertionError(f"schema type {tp!r} at {where} is not supported by the loader")


_BOUNDS = (("gt", ">", lambda v, b: v > b), ("ge", ">=", lambda v, b: v >= b),
           ("lt", "<", lambda v, b: v < b), ("le", "<=", lambda v, b: v <= b))


def _expect(noun: str, meta) -> str:
    conds = [f"{sym} {meta[k]:g}" for k, sym, _ in _BOUNDS if k in meta]
    return f"{noun} {' and '.join(conds)}" if conds else noun


def _check_bounds(v, where, meta, noun):
    for key, _sym, ok in _BOUNDS:
        if key in meta and not ok(v, meta[key]):
            raise ConfigError(f"{where}: expected {_expect(noun, meta)}, got {_show(v)}")


def _kind(v) -> str:
    return {dict: "mapping", list: "list", str: "string"}.get(type(v), type(v).__name__)


def _show(v) -> str:
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (dict, list)):
        return f"a {_kind(v)}"
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    return repr(v)


def check_consistency(cfg: RunConfig) -> None:
    """Cross-field rules that no single field can state."""
    for i, prompt in enumerate(cfg.sample.prompts):
        if not prompt.strip():
            raise ConfigError(f"sample.prompts[{i}]: expected non-empty text, got {prompt!r}")
    m = cfg.model
    if m.n_kv_heads is not None and m.n_heads % m.n_kv_heads:
        raise ConfigError(f"model.n_kv_heads: expected a divisor of n_heads={m.n_heads}, got {m.n_kv_heads}")
    if m.head_dim is None and m.d_model % m.n_heads:
        raise ConfigError(f"model.n_heads: expected a divisor of d_model={m.d_model} (or set model.head_dim), "
                          f"got {m.n_heads}")
    if cfg.spikes.min_history > cfg.spikes.window:
        raise ConfigError(f"spikes.min_history: expected <= spikes.window={cfg.spikes.window}, "
                          f"got {cfg.spikes.min_history}")
    head_dim = m.head_dim or m.d_model // m.n_heads
    if head_dim % 2:
        raise ConfigError(f"model.head_dim: expected an even number (RoPE rotates pairs), got {head_dim}")
    if cfg.data.seq_len > m.max_seq_len and not cfg.init_from:  # init_from's own limit is checked by the trainer
        raise ConfigError(f"data.seq_len: expected <= model.max_seq_len={m.max_seq_len}, got {cfg.data.seq_len}")
    if cfg.stages:
        _check_stages(cfg)
    elif cfg.kind == "sft":
        _check_sft(cfg.sft, "sft", cfg.init_from or cfg.data.tokenizer.path, "init_from")
    elif cfg.kind == "dpo":
        _check_dpo(cfg.dpo, "dpo", cfg.init_from, "init_from", cfg.adapter.kind != "none")
    elif cfg.kind == "rl":
        _check_rl(cfg.rl, "rl", cfg.init_from, "init_from", cfg.adapter.kind != "none", cfg.train.grad_accum)
    elif not cfg.data.sources and not cfg.data.prepared:
        raise ConfigError("data.sources: expected at least one source (or set data.prepared to a prepared dataset)")
    for i, src in enumerate(cfg.data.sources):
        if src.kind in ("text", "jsonl", "parquet") and not src.path:
            raise ConfigError(f"data.sources[{i}].path: required for kind {src.kind}")
    if not cfg.stages and cfg.schedule.warmup_steps > cfg.train.steps:
        raise ConfigError(f"schedule.warmup_steps: expected <= train.steps={cfg.train.steps}, "
                          f"got {cfg.schedule.warmup_steps}")
    if cfg.model.vocab_size is not None and cfg.data.tokenizer.path is None and not cfg.data.prepared \
            and cfg.model.vocab_size < cfg.data.tokenizer.vocab_size:
        raise ConfigError(f"model.vocab_size: expected >= data.tokenizer.vocab_size="
                          f"{cfg.data.tokenizer.vocab_size} (or null), got {cfg.model.vocab_size}")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", cfg.device):
        raise ConfigError(f"device: expected auto, cpu, cuda or cuda:N, got {_show(cfg.device)}")
    if not re.fullmatch(r"[\w.\-]+", cfg.name):
        raise ConfigError(f"name: expected letters, digits, '.', '_' or '-', got {_show(cfg.name)}")
    _check_precision(cfg)
    _check_optim(cfg)
    check_trackers(cfg.log)


def _check_optim(cfg: RunConfig) -> None:
    """Optimizer/precision/adapter combinations (optim/optimizer.py check_optimizer), and a stage that keeps
    the previous stage's optimizer state must use the same optimizer (its state has another layout)."""
    from stagewise.optim.optimizer import check_optimizer

    if not cfg.stages:
        modes = [cfg.precision.mode] + [s.mode for s in cfg.precision.schedule]
        check_optimizer(cfg.optim, "optim", modes, cfg.adapter.kind)
        return
    for i, st in enumerate(cfg.stages):
        check_optimizer(st.optim, f"stages[{i}].optim", [st.precision or cfg.precision.mode], st.adapter.kind)
        prev = cfg.stages[i - 1].optim.name if i else None
        if prev is not None and st.optimizer_state == "keep" and prev != st.optim.name:
            raise ConfigError(f"stages[{i}].optimizer_state: keep carries {cfg.stages[i - 1].name}'s {prev} state, "
                              f"which {st.optim.name} cannot use; set optimizer_state: reset (or the same optim.name)")


def _check_sft(sft, where: str, has_tokenizer, init_key: str) -> None:
    if not sft.data:
        raise ConfigError(f"{where}.data: expected at least one conversation source")
    if not has_tokenizer:
        raise ConfigError(f"{init_key}: an sft run needs a model to start from (or data.tokenizer.path for its "
                          "tokenizer and chat template)")
    for j, src in enumerate(sft.data):
        if src.kind in ("jsonl", "parquet", "hf-dataset") and not src.path:
            raise ConfigError(f"{where}.data[{j}].path: required for kind {src.kind}")
    _check_arithmetic(sft.arithmetic, f"{where}.arithmetic")


def _check_arithmetic(a, where: str) -> None:
    if any(op not in ("add", "mul") for op in a.ops) or not a.ops:
        raise ConfigError(f"{where}.ops: expected a non-empty list of add, mul; got {a.ops}")
    if a.min_digits > a.max_digits:
        raise ConfigError(f"{where}.min_digits: expected <= max_digits={a.max_digits}, got {a.min_digits}")


def _check_rl(rl, where: str, has_model, init_key: str, adapter: bool, grad_accum: int) -> None:
    if not has_model:
        raise ConfigError(f"{init_key}: an rl stage needs a model to start from (init_from, or an earlier stage)")
    if rl.algorithm in ("grpo", "rloo") and rl.group_size < 2:
        raise ConfigError(f"{where}.group_size: {rl.algorithm} compares completions of one prompt; expected >= 2, "
                          f"got {rl.group_size}")
    need = rl.mini_batches * grad_accum
    if rl.prompts_per_rollout * rl.group_size < need:
        raise ConfigError(f"{where}.mini_batches: a rollout of {rl.prompts_per_rollout} x {rl.group_size} sequences "
                          f"cannot fill {rl.mini_batches} mini-batches x train.grad_accum={grad_accum} micro-batches")
    if rl.importance != "token" and rl.denominator != "old":
        raise ConfigError(f"{where}.importance: {rl.importance} ratios are against the sampling policy; expected "
                          f"denominator old, got {rl.denominator}")
    if rl.reference == "adapters-off" and not adapter:
        raise ConfigError(f"{where}.reference: adapters-off needs an adapter stage (adapter.kind lora or dora)")
    if rl.clip_eps_high is not None and rl.clip_eps_high < rl.clip_eps:
        raise ConfigError(f"{where}.clip_eps_high: expected >= clip_eps={rl.clip_eps} (clip-higher widens the upper "
                          f"range), got {rl.clip_eps_high}")
    if rl.task == "arithmetic":
        _check_arithmetic(rl.arithmetic, f"{where}.arithmetic")


def _check_dpo(dpo, where: str, has_model, init_key: str, adapter: bool) -> None:
    if not dpo.data:
        raise ConfigError(f"{where}.data: expected at least one preference source")
    if not has_model:
        raise ConfigError(f"{init_key}: a dpo stage needs a model to start from (init_from, or an earlier stage)")
    for j, src in enumerate(dpo.data):
        if src.kind in ("jsonl", "parquet", "hf-dataset") and not src.path:
            raise ConfigError(f"{where}.data[{j}].path: required for kind {src.kind}")
    free = dpo.loss in ("simpo", "orpo")
    if free and dpo.reference not in ("auto", "none"):
        raise ConfigError(f"{where}.reference: {dpo.loss} is reference-free; expected auto or none, got {dpo.reference}")
    if not free and dpo.reference == "none":
        raise ConfigError(f"{where}.reference: loss {dpo.loss} needs a reference (copy, adapters-off or precomputed); "
                          "none is only for simpo and orpo")
    if dpo.reference == "adapters-off" and not adapter:
        raise ConfigError(f"{where}.reference: adapters-off needs an adapter stage (adapter.kind lora or dora); "
                          "use copy or precomputed for full fine-tuning")
    if dpo.reference_cache is not None and dpo.reference != "precomputed":
        raise ConfigError(f"{where}.reference_cache: only used with reference: precomputed, got {dpo.reference}")
    if dpo.sft_weight > 0 and dpo.loss in ("orpo", "kto"):
        raise ConfigError(f"{where}.sft_weight: applies to the pair losses sigmoid, ipo, hinge, robust and simpo "
                          f"(orpo has its own NLL term), got loss {dpo.loss}")
    _check_arithmetic(dpo.arithmetic, f"{where}.arithmetic")


def _check_mixture(cfg: RunConfig, i: int, st, where: str, domains: dict) -> None:
    if not st.mixture or not any(d.weight > 0 for d in st.mixture):
        raise ConfigError(f"{where}.mixture: expected at least one domain with weight > 0")
    if i == 0 and st.replay > 0:
        raise ConfigError(f"{where}.replay: expected 0 (the first stage has no earlier data), got {st.replay:g}")
    for j, d in enumerate(st.mixture):
        dw = f"{where}.mixture[{j}]"
        if not re.fullmatch(r"[\w.\-]+", d.name):
            raise ConfigError(f"{dw}.name: expected letters, digits, '.', '_' or '-', got {_show(d.name)}")
        if d.source.kind in ("text", "jsonl", "parquet") and not d.source.path:
            raise ConfigError(f"{dw}.source.path: required for kind {d.source.kind}")
        if domains.setdefault(d.name, d.source) != d.source:
            raise ConfigError(f"{dw}.source: domain {d.name!r} already has another source in an earlier "
                              "stage (one name, one source)")
    if len({d.name for d in st.mixture}) != len(st.mixture):
        raise ConfigError(f"{where}.mixture: domain names must be unique within a stage")
    trained_before = {d.name for s in cfg.stages[:i] for d in s.mixture if d.weight > 0}
    if st.replay > 0 and not trained_before - {d.name for d in st.mixture}:
        raise ConfigError(f"{where}.replay: no earlier domain outside this stage's mixture to replay; "
                          f"expected 0, got {st.replay:g}")


def _check_stages(cfg: RunConfig) -> None:
    if cfg.data.sources or cfg.data.prepared:
        raise ConfigError("data.sources: expected none with stages (each stage lists its mixture), "
                          f"got {len(cfg.data.sources) or 'data.prepared'}")
    if cfg.precision.schedule:
        raise ConfigError("precision.schedule: not supported with stages (give each stage its precision)")
    if cfg.init_from:
        raise ConfigError("init_from: with stages, set stages[0].init_from instead")
    names, domains = set(), {}
    for i, st in enumerate(cfg.stages):
        where = f"stages[{i}]"
        if not re.fullmatch(r"[\w.\-]+", st.name) or st.name in names:
            raise ConfigError(f"{where}.name: expected a unique name of letters, digits, '.', '_' or '-', "
                              f"got {_show(st.name)}")
        names.add(st.name)
        if (st.steps is None) == (st.tokens is None):
            raise ConfigError(f"{where}: expected exactly one of steps or tokens")
        if st.kind == "sft":
            if st.mixture:
                raise ConfigError(f"{where}.mixture: an sft stage trains on its sft.data, not a mixture")
            _check_sft(st.sft, f"{where}.sft", i > 0 or st.init_from or cfg.data.tokenizer.path,
                       f"{where}.init_from")
        elif st.kind == "dpo":
            if st.mixture:
                raise ConfigError(f"{where}.mixture: a dpo stage trains on its dpo.data, not a mixture")
            _check_dpo(st.dpo, f"{where}.dpo", i > 0 or st.init_from, f"{where}.init_from", st.adapter.kind != "none")
        elif st.kind == "rl":
            if st.mixture:
                raise ConfigError(f"{where}.mixture: an rl stage trains on its rl.task's rollouts, not a mixture")
            _check_rl(st.rl, f"{where}.rl", i > 0 or st.init_from, f"{where}.init_from", st.adapter.kind != "none",
                      cfg.train.grad_accum)
        else:
            _check_mixture(cfg, i, st, where, domains)
        sch = st.schedule
        steps = st.steps or -(-st.tokens // (cfg.train.batch_size * cfg.train.grad_accum * cfg.data.seq_len))
        if sch.warmup_steps > steps:
            raise ConfigError(f"{where}.schedule.warmup_steps: expected <= the stage's {steps} steps, "
                              f"got {sch.warmup_steps}")
        if sch.cooldown_at_step is not None and sch.name != "infinite":
            raise ConfigError(f"{where}.schedule.cooldown_at_step: only applies to schedule.name=infinite, "
                              f"got {sch.name}")


def _check_precision(cfg: RunConfig) -> None:
    p = cfg.precision
    modes = [p.mode] + [s.mode for s in p.schedule] + [s.precision for s in cfg.stages if s.precision]
    shown = "mode " + ", ".join(dict.fromkeys(modes))
    for flag in ("stochastic_rounding", "kahan"):
        if getattr(p, flag) and "bf16-pure" not in modes:
            raise ConfigError(f"precision.{flag}: only applies to precision.mode=bf16-pure, got {shown}")
    if p.quant.group_size is not None and "int4" not in modes:
        raise ConfigError(f"precision.quant.group_size: only applies to precision.mode=int4, got {shown}")
    if p.quant.hadamard and not set(modes) & {"mxfp4", "nvfp4", "int8", "int4", "ternary"}:
        raise ConfigError(f"precision.quant.hadamard: only applies to the fake-quant modes (mxfp4, nvfp4, int8, "
                          f"int4, ternary), got {shown}")
    last = 0
    for i, s in enumerate(p.schedule):
        if s.at_step <= last or s.at_step >= cfg.train.steps:
            raise ConfigError(f"precision.schedule[{i}].at_step: expected increasing steps in ({last}, "
                              f"train.steps={cfg.train.steps}), got {s.at_step}")
        last = s.at_step
    if p.loss_scale.min_scale > p.loss_scale.max_scale:
        raise ConfigError(f"precision.loss_scale.min_scale: expected <= max_scale={p.loss_scale.max_scale}, "
                          f"got {p.loss_scale.min_scale}")


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False)


def describe(cls=RunConfig, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(path, type, default, help) for every leaf field: the source of `--help-config` and docs/config.md."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        path = f"{prefix}.{f.name}" if prefix else f.name
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows += describe(tp, path)
            continue
        item = _list_item(tp)
        if item is not None and dataclasses.is_dataclass(item):
            rows.append((path, "list", "[]", f.metadata.get("help", "")))
            rows += describe(item, f"{path}[]")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = f.metadata.get("help", "")
        if f.metadata.get("choices"):
            help_text += f" One of: {', '.join(f.metadata['choices'])}."
        bounds = _expect("", f.metadata).strip()
        if bounds:
            help_text += f" Must be {bounds}."
        rows.append((path, _type_name(tp), json.dumps(default), help_text))
    return rows


def _list_item(tp):
    if get_origin(tp) in (Union, types.UnionType):
        tp = [a for a in get_args(tp) if a is not type(None)][0]
    return get_args(tp)[0] if get_origin(tp) is list else None


def _type_name(tp) -> str:
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        return _type_name(args[0]) + "|null"
    if get_origin(tp) is list:
        return f"list[{_type_name(get_args(tp)[0])}]"
    return getattr(tp, "__name__", str(tp))


def config_reference_markdown() -> str:
    lines = ["# Recipe reference", "",
             "Generated from `stagewise/config/schema.py` by `stagewise docs-config`; "
             "every key can also be set on the command line as `--key.path=value`.", "",
             "| key | type | default | meaning |", "|---|---|---|---|"]
    for path, tp, default, help_text in describe():
        lines.append(f"| `{path}` | {tp} | `{default}` | {help_text} |")
    return "\n".join(lines) + "\n"
