"""`stagewise plan`: what a recipe will train, how many FLOPs it costs and how much memory it needs.

The model is the one training would build: the recipe's `model` section with the tokenizer's vocab,
or, with `init_from` (or `stages[0].init_from`), the source's own architecture, read from its config
without loading its weights. Predicted memory is the training state (stagewise/model/flops.py) plus
the process's fixed overhead (the interpreter with torch and stagewise imported, measured once per
machine), so the total reads like the `peak_mem_bytes` a CPU run logs (docs/metrics.md).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from stagewise.errors import ConfigError, DataError


def _vocab(cfg) -> tuple[int, str]:
    from stagewise.data import Tokenizer

    if cfg.data.prepared:
        manifest = Path(cfg.data.prepared) / "manifest.json"
        if not manifest.is_file():
            raise DataError(f"data.prepared: {cfg.data.prepared} has no manifest.json (run stagewise data prepare)")
        return json.loads(manifest.read_text())["vocab_size"], "prepared dataset"
    if cfg.data.tokenizer.path:
        return Tokenizer.load(cfg.data.tokenizer.path).vocab_size, "tokenizer file"
    return cfg.data.tokenizer.vocab_size, "BPE to be trained (at most)"


def plan_model(cfg):
    """(model config training would build, where its vocabulary comes from, that vocabulary's size,
    the init_from it is read from or None)."""
    from stagewise import rundir
    from stagewise.data import Tokenizer
    from stagewise.train.runner import resolve_model_config

    init = cfg.init_from or (cfg.stages[0].init_from if cfg.stages else None)
    if not init:
        vocab, vocab_from = _vocab(cfg)
        return resolve_model_config(cfg.model, vocab), vocab_from, vocab, None
    mcfg, tok_dir = rundir.load_init_config(init)
    if cfg.data.seq_len > mcfg.max_seq_len:  # the trainer's own check, before anything is loaded
        raise ConfigError(f"data.seq_len: expected <= {mcfg.max_seq_len} (max_seq_len of init_from {init}), "
                          f"got {cfg.data.seq_len}")
    return mcfg, f"the tokenizer of {init}", Tokenizer.load(Path(tok_dir) / rundir.TOKENIZER).vocab_size, init


def _gib(n: float) -> str:
    return f"{n / 2**30:8.3f} GiB" if n >= 2**30 else f"{n / 2**20:8.1f} MiB"


def _on_cuda(cfg) -> bool:
    return cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available())


def _conditions(entry: dict) -> str:
    if "measured_at" not in entry:
        return "measured before stagewise recorded when; re-measure with --measure-peak"
    load = entry.get("loadavg")
    load_s = "/".join(f"{x:.2f}" for x in load) if load else "unknown"
    return f"measured {entry['measured_at']}, load average {load_s} (1/5/15 min) on {entry.get('cpus')} CPUs"


def print_peak(cfg, measure: bool) -> None:
    """The cached GEMM peak MFU divides by, with when and under what load it was measured."""
    import os

    from stagewise.precision import build_precision
    from stagewise.train.metrics import PEAK_ENV, peak_flops_entry

    print("\n# MFU peak (best n x n x n GEMM rate on this machine, docs/metrics.md)")
    if _on_cuda(cfg) and not torch.cuda.is_available():
        print("  device is CUDA, not available here: the peak is measured where training runs")
        return
    from stagewise.train.runner import pick_device

    if cfg.threads:
        torch.set_num_threads(cfg.threads)  # the peak is kept per thread count, as training sets it
    device = pick_device(cfg.device)
    precision = build_precision(cfg.precision, device)
    # The dtype training takes its peak in: the GEMMs' own (fp32 where bf16 is emulated, cpu_bf16.py).
    compute_dtype = precision.gemm_dtype
    entry = peak_flops_entry(device, compute_dtype, "always" if measure else "never")
    if entry is None:
        print(f"  {compute_dtype} on {device.type}, {torch.get_num_threads()} threads: not measured yet (the "
              "first training step measures it, about 1 s; or run plan --measure-peak)")
    else:
        print(f"  {entry['flops']:.3e} FLOP/s {compute_dtype} on {device.type}, {torch.get_num_threads()} threads "
              f"({_conditions(entry)})")
    if os.environ.get(PEAK_ENV):
        print(f"  {PEAK_ENV}={os.environ[PEAK_ENV]} is set: training uses that value instead")


_ROWS = [("weights", "parameters and buffers"), ("gradients", "one per trainable parameter"),
         ("optimizer", None), ("activations", "kept for the backward, with the loss's stored head gradient"),
         ("loss_peak", "the fused loss's working set: stored gradients and chunk buffers"),
         ("reference", "a frozen reference copy, held through training"),
         ("snapshot", "spikes.action rollback: a copy of the trainable weights and optimizer state in host memory")]


def _optimizer_note(cfg, d_model: int = 0) -> str:
    o = cfg.optim
    if cfg.precision.mode == "bf16-pure":
        return "bf16-pure's own AdamW, bf16 moments" + (" + Kahan buffer" if cfg.precision.kahan else "")
    if o.name in ("adamw", "adamw-8bit", "adamw-4bit"):
        return {"adamw": "fp32 moments", "adamw-8bit": "8-bit block-wise moments (fp32 under 4096 values)",
                "adamw-4bit": "4-bit block-wise moments (fp32 under 4096 values)"}[o.name]
    if o.name == "muon":
        return f"momentum on the {', '.join(o.targets)} matrices, AdamW on the rest"
    from stagewise.optim.optimizer import projection_settings

    r = projection_settings(o, d_model)["rank"]
    return (f"rank-{r} moments{' (d_model / 4)' if not o.rank and o.name != 'apollo-mini' else ''} on the "
            f"{', '.join(o.targets)} matrices, AdamW on the rest")


def print_memory(cfg, mem: dict, stage_cfg=None, label: str = "", d_model: int = 0) -> None:
    """A step's memory by component (memory/predict.py), the peak, the fixed overhead, and whether it fits
    memory.limit (what peak_mem_bytes and RUN_DIR/memory.json are compared with)."""
    from stagewise.memory.budget import device_memory, parse_size
    from stagewise.memory.predict import state_total
    from stagewise.train.metrics import process_overhead

    sc = stage_cfg or cfg
    B, T = sc.train.batch_size, sc.data.seq_len
    ac = sc.train.activation_checkpointing
    ac = ac if ac == "none" or sc.train.checkpoint_every == 1 else f"{ac} every {sc.train.checkpoint_every} blocks"
    print(f"\n# predicted memory of a step{label} ({sc.precision.mode}, optim {sc.optim.name}, micro-batch {B} x {T}, "
          f"activation checkpointing {ac}; docs/memory.md)")
    for key, note in _ROWS:
        if key in mem:
            print(f"  {key:<12}{_gib(mem[key])}  ({note or _optimizer_note(sc, d_model)})")
    print(f"  {'state':<12}{_gib(state_total(mem))}  (weights + gradients + optimizer + activations"
          f"{' + reference' if mem.get('reference') else ''})")
    print(f"  {'peak':<12}{_gib(mem['peak'])}  (tracked tensors at the step's high point; RUN_DIR/memory.json "
          "holds the run's measurement)")
    need = mem["peak"] + mem.get("reference", 0)
    on_cuda = _on_cuda(cfg)
    if on_cuda:
        print("  on CUDA, peak_mem_bytes is the allocator's peak: it holds the tensors alone, so the process's "
              "own memory is not added")
    else:
        need += mem.get("snapshot", 0)
        overhead = process_overhead()
        if overhead is None:
            print("  overhead    unknown (needs /proc/self/status, Linux): total is the tensors alone")
        else:
            print(f"  {'overhead':<12}{_gib(overhead['bytes'])}  (python with torch and stagewise imported, peak RSS "
                  f"of a fresh process, {overhead['measured_at']})")
            need += overhead["bytes"]
    print(f"  {'total':<12}{_gib(need)}  (compare with peak_mem_bytes" + ("" if on_cuda else ": the process's VmHWM")
          + ")")
    limit = cfg.memory.limit
    if limit is None:
        return
    if str(limit).lower() == "auto":
        if on_cuda and not torch.cuda.is_available():
            print("  memory.limit auto: the GPU's memory is known where training runs")
            return
        cap, what = device_memory(torch.device("cuda" if on_cuda else "cpu"))
        if cap is None:
            return
    else:
        cap, what = parse_size(limit), "memory.limit"
    verdict = (f"fits, {_gib(cap - need).strip()} to spare" if need <= cap else
               f"exceeds it by {_gib(need - cap).strip()}: the run would stop before its first step")
    print(f"  memory.limit {limit}: {what} {_gib(cap).strip()}; {verdict}")


def print_plan(cfg, measure_peak: bool = False) -> None:
    """Everything `stagewise plan` prints; trains nothing, writes nothing but the machine caches."""
    from stagewise.config.loader import dump_yaml
    from stagewise.memory.predict import emulates_bf16, predict
    from stagewise.precision import MODES
    from stagewise.train import stages as plan

    mcfg, vocab_from, vocab, init = plan_model(cfg)
    device = torch.device("cuda" if _on_cuda(cfg) else "cpu")
    stage_cfgs = [plan.stage_config(cfg, i) for i in range(plan.n_stages(cfg))]
    mems = [predict(sc, mcfg, emulates_bf16(sc.precision.mode, device)) for sc in stage_cfgs]
    mem = mems[0]
    print("# resolved config" + (f" (model: the architecture of init_from {init}; the recipe's model section is "
                                 "ignored)" if init else ""))
    print(dump_yaml(dataclasses.replace(cfg, model=mcfg) if init else cfg).rstrip())
    if init:
        print(f"\n# model (imported from {init}: vocab {mcfg.vocab_size}; {vocab_from} has {vocab} tokens)")
    else:
        print(f"\n# model (vocab {mcfg.vocab_size}: {vocab_from} {vocab}, padded to a multiple of {mcfg.pad_vocab_to})")
    _print_sizes(cfg, mcfg)
    _print_adapter(cfg, mcfg, mem)
    _print_sft(cfg, init)
    _print_dpo(cfg, mcfg, mem, init)
    _print_rl(cfg, mcfg, mem)
    prec = MODES[cfg.precision.mode]
    print(f"\n# bytes per parameter ({cfg.precision.mode})")
    print(f"  weights {prec.param_bytes}, gradients {prec.grad_bytes}, separate master copy {prec.master_bytes}; "
          f"optimizer states: {_optimizer_note(stage_cfgs[0], mcfg.d_model)}")
    if prec.compute_dtype.itemsize != prec.param_bytes:
        print(f"  (the fp32 weights are the master copy; autocast makes a {prec.compute_dtype.itemsize}-byte working "
              "copy of the matmul weights each forward, counted with the activations)")
    for i, (sc, m) in enumerate(zip(stage_cfgs, mems)):
        print_memory(cfg, m, sc, f" in stage {i} ({cfg.stages[i].name})" if cfg.stages else "", mcfg.d_model)
    print_peak(cfg, measure_peak)


def _print_adapter(cfg, mcfg, mem: dict) -> None:
    """An adapter recipe: trainable vs frozen parameters and their bytes (`mem`, the prediction, already
    counts the adapters only: memory/predict.py)."""
    from stagewise.memory.predict import state_total

    acfg = cfg.stages[0].adapter if cfg.stages else cfg.adapter
    if acfg.kind == "none":
        return
    from stagewise.adapters import validate
    from stagewise.adapters.sizes import adapter_flops_per_token, adapter_sizes

    mode = (cfg.stages[0].precision or cfg.precision.mode) if cfg.stages else cfg.precision.mode
    validate(mcfg, acfg, mode)
    a = adapter_sizes(mcfg, acfg, mode)
    where = " (stage 0)" if cfg.stages else ""
    base = f"packed {acfg.base_quant}" if acfg.base_quant != "none" else ("bf16" if mode == "bf16-mixed" else "fp32")
    print(f"\n# adapters{where}: {acfg.kind} r {acfg.r} on {a['layers']} layers, init {acfg.init}")
    print(f"  trainable parameters {a['trainable']:>14,}  ({a['trainable'] / a['frozen']:.3%} of the base)")
    print(f"  frozen parameters    {a['frozen']:>14,}  ({a['adapted_base']:,} in adapted layers, stored {base})")
    print(f"  base weights         {_gib(a['base_bytes'])}")
    print(f"  adapter weights      {_gib(a['adapter_bytes'])}   gradients {_gib(a['grad_bytes'])}   "
          f"optimizer {_gib(a['optimizer_bytes'])}")
    fpt = adapter_flops_per_token(mcfg, acfg, cfg.data.seq_len)
    print(f"  FLOPs per token      {fpt:>14,}  (4*N + 6*N_adapter + attention: no weight gradients "
          "for the base)")
    print(f"  training state       {_gib(state_total(mem))}  (see the memory table below)")


def _print_sft(cfg, init) -> None:
    """Examples and padding waste of each sft stage: the share of a step's tokens that are padding
    (epoch 0's layout), packed and padded, so the cost of `sft.packing: false` is visible."""
    from stagewise import rundir
    from stagewise.data import Tokenizer
    from stagewise.data.packing import PackedSource, PaddedSource
    from stagewise.data.sft_data import load_sft_data
    from stagewise.train import stages as plan

    kinds = [plan.stage_kind(cfg, i) for i in range(plan.n_stages(cfg))]
    if "sft" not in kinds:
        return
    tok_file = cfg.data.tokenizer.path or (str(Path(rundir.load_init_config(init)[1]) / rundir.TOKENIZER) if init
                                           else None)
    print("\n# sft data (padding waste: share of a step's tokens that are padding)")
    if tok_file is None:
        print("  known once the tokenizer exists (it is trained on stage 0's data when the run starts)")
        return
    tok = Tokenizer.load(tok_file)
    B, T = cfg.train.batch_size, cfg.data.seq_len
    for i, kind in enumerate(kinds):
        if kind != "sft":
            continue
        sft = cfg.stages[i].sft if cfg.stages else cfg.sft
        data = load_sft_data(sft, tok, T, f"stages[{i}].sft" if cfg.stages else "sft", log=lambda m: None)
        waste = {name: src(data.train, T, B, cfg.seed, tok.eos_id).padding_fraction()
                 for name, src in (("packed", PackedSource), ("padded", PaddedSource))}
        st = data.stats["train"]
        chosen = "packed" if sft.packing else "padded"
        print(f"  {plan.stage_name(cfg, i)}: {len(data.train)} train / {len(data.val)} val examples "
              f"(truncated {st['truncated']}, dropped {st['dropped']}); padding waste packed "
              f"{waste['packed']:.1%}, padded {waste['padded']:.1%} (this recipe: {chosen})")


def _print_dpo(cfg, mcfg, mem: dict, init) -> None:
    """Each dpo stage's loss and reference (what it costs), and its pairs and padding waste once the
    tokenizer exists. A first-stage copy reference is added to the predicted memory; padded pairs double
    a micro-batch's rows (train.batch_size pairs, two sequences each)."""
    from stagewise import rundir
    from stagewise.data import Tokenizer
    from stagewise.model import param_counts
    from stagewise.objectives.preference import default_beta
    from stagewise.train import stages as plan
    from stagewise.train.dpo_kind import dpo_config, reference_dtype, reference_mode

    kinds = [plan.stage_kind(cfg, i) for i in range(plan.n_stages(cfg))]
    if "dpo" not in kinds:
        return
    print("\n# preference optimisation (docs/dpo.md)")
    tok_file = cfg.data.tokenizer.path or (str(Path(rundir.load_init_config(init)[1]) / rundir.TOKENIZER) if init
                                           else None)
    B, T = cfg.train.batch_size, cfg.data.seq_len
    for i, kind in enumerate(kinds):
        if kind != "dpo":
            continue
        st = plan.stage_config(cfg, i)
        dpo, name = dpo_config(cfg, i), plan.stage_name(cfg, i)
        where = f"stages[{i}].dpo" if cfg.stages else "dpo"
        mode = reference_mode(dpo, st.adapter.kind)
        dtype = reference_dtype(dpo, st.precision.mode, where)
        nbytes = param_counts(mcfg)["total"] * (2 if dtype == torch.bfloat16 else 4)
        dname = "bf16" if dtype == torch.bfloat16 else "fp32"
        what = {"copy": f"a frozen copy of the stage's start, matmul weights and embedding in {dname}: "
                        f"{_gib(nbytes).strip()} held through training, one extra forward per step",
                "adapters-off": "the policy with its adapters switched off: no second copy, one extra forward per "
                                "step",
                "precomputed": f"log-probs of every sequence computed once before step 1 by a temporary {dname} copy "
                               f"({_gib(nbytes).strip()}, freed before training), cached in "
                               f"{cfg.data.cache_dir}/reference_logps/",
                "none": f"none ({dpo.loss} is reference-free)"}[mode]
        beta = dpo.beta if dpo.beta is not None else default_beta(dpo.loss)
        print(f"  {name}: loss {dpo.loss}, beta {beta:g}" + (f", sft_weight {dpo.sft_weight:g}" if dpo.sft_weight
                                                              else ""))
        print(f"    reference: {mode} ({what})")
        if i == 0 and mode == "copy":
            mem["reference"] = nbytes
        if i == 0 and not dpo.packing:  # padded pairs: two sequences per pair, twice the rows
            mem["peak"] += mem["activations"] + mem["loss_peak"]
            mem["activations"] *= 2
            mem["loss_peak"] *= 2
        if tok_file is None:
            print("    pairs: known once the tokenizer exists (it is trained on stage 0's data when the run starts)")
            continue
        from stagewise.data.preference import load_preference_data
        from stagewise.data.preference_batches import PreferenceSource

        tok = Tokenizer.load(tok_file)
        data = load_preference_data(dpo, tok, T, where, log=lambda m: None)
        waste = {p: PreferenceSource(data.train, T, max(B, 2), cfg.seed, tok.eos_id, p).padding_fraction()
                 for p in (True, False)}
        unit = "pairs" if data.paired else "examples"
        print(f"    {unit}: {len(data.train)} train / {len(data.val)} val (dropped {data.stats['train']['dropped']}); "
              f"padding waste packed {waste[True]:.1%}, padded {waste[False]:.1%} (this recipe: "
              f"{'packed' if dpo.packing else 'padded'})")


def _print_rl(cfg, mcfg, mem: dict) -> None:
    """Each rl stage's rollout shape, estimator parts and KL reference (what it costs)."""
    from stagewise.model import param_counts
    from stagewise.train import stages as plan
    from stagewise.train.dpo_kind import reference_dtype
    from stagewise.train.rl_kind import reference_mode, rl_config

    kinds = [plan.stage_kind(cfg, i) for i in range(plan.n_stages(cfg))]
    if "rl" not in kinds:
        return
    print("\n# RL with verifiable rewards (docs/rl.md)")
    for i, kind in enumerate(kinds):
        if kind != "rl":
            continue
        st, rl, name = plan.stage_config(cfg, i), rl_config(cfg, i), plan.stage_name(cfg, i)
        where = f"stages[{i}].rl" if cfg.stages else "rl"
        n_seq = rl.prompts_per_rollout * rl.group_size
        steps = rl.epochs_per_rollout * rl.mini_batches
        print(f"  {name}: task {rl.task}, {rl.algorithm}" + (f" (scale_rewards {rl.scale_rewards})"
                                                           if rl.algorithm == "grpo" else "")
              + f"; {rl.prompts_per_rollout} prompts x {rl.group_size} completions = {n_seq} sequences of <= "
              f"{rl.max_new_tokens} new tokens per rollout, {steps} optimizer step(s) per rollout "
              f"({-(-plan.stage_steps(cfg, i) // steps)} rollouts)")
        clip = f"clip [{1 - rl.clip_eps:g}, {1 + (rl.clip_eps_high or rl.clip_eps):g}]" if rl.mask == "clip" else "none"
        print(f"    estimator: mask {clip}, denominator {rl.denominator}, importance {rl.importance}, "
              f"aggregation {rl.loss_agg}" + (f", dynamic sampling {rl.dynamic_sampling}"
                                              if rl.dynamic_sampling != "off" else "")
              + (f", hybrid hpt (SFT at success <= {rl.hpt_threshold:g})" if rl.hybrid == "hpt" else ""))
        mode = reference_mode(rl, st.adapter.kind)
        if mode == "none":
            print("    reference: none (kl_beta 0: no KL term, nothing loaded)")
            continue
        dtype = reference_dtype(rl, st.precision.mode, where)
        nbytes = param_counts(mcfg)["total"] * (2 if dtype == torch.bfloat16 else 4)
        what = (f"a frozen copy in {'bf16' if dtype == torch.bfloat16 else 'fp32'}: {_gib(nbytes).strip()}"
                if mode == "copy" else "the policy with its adapters switched off: no second copy")
        print(f"    reference: {mode} ({what}); KL {rl.kl_estimator} x {rl.kl_beta:g} in the {rl.kl_in}")
        if i == 0 and mode == "copy":
            mem["reference"] = nbytes


def _print_sizes(cfg, mcfg) -> None:
    from stagewise.model import flops_per_token, param_counts

    B, T, A = cfg.train.batch_size, cfg.data.seq_len, cfg.train.grad_accum
    counts = param_counts(mcfg)
    fpt = flops_per_token(mcfg, T)
    tokens_per_step = B * T * A
    print(f"parameters:          {counts['total']:>14,}")
    print(f"  embedding:         {counts['embedding']:>14,}")
    print(f"  non-embedding:     {counts['non_embedding']:>14,}")
    print(f"  in matmuls (N):    {counts['matmul']:>14,}  (output head counted even when tied)")
    print(f"FLOPs per token:     {fpt:>14,}  (6*N + 12*layers*heads*head_dim*seq_len)")
    print(f"tokens per step:     {tokens_per_step:>14,}  (batch {B} x seq {T} x accum {A})")
    steps = cfg.train.steps
    if cfg.stages:  # budgets per stage; an infinite schedule's cooldown may end a stage earlier
        from stagewise.train.stages import stage_steps

        steps = sum(stage_steps(cfg, i) for i in range(len(cfg.stages)))
    total_tokens = tokens_per_step * steps
    print(f"tokens in run:       {total_tokens:>14,}  ({steps} steps; "
          f"{total_tokens / max(counts['total'], 1):.1f} tokens/param)")
    print(f"FLOPs in run:        {fpt * total_tokens:>14.3e}")
