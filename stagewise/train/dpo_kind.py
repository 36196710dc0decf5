"""The `dpo` stage kind: preference pairs -> the preference objective, with its reference model.

The reference is the policy the stage starts from (its base: init_from, or the previous stage's
export), obtained in one of four ways (dpo.reference; `stagewise plan` states which and its cost):

  copy          a frozen second model, its matmul weights and embedding stored in reference_dtype
                (bf16: half an fp32 copy) and run under the stage's precision
  adapters-off  a LoRA/DoRA policy with its adapters switched off (adapters.adapters_disabled):
                no second copy at all; base-moving inits add back what they took out of W
  precomputed   the reference's log-probs of every train and val sequence, computed once before
                step 1 with a temporary copy and cached in data.cache_dir/reference_logps/, keyed by
                the encoded data's hash, the reference weights' sha256, reference_dtype and the
                precision mode; a run finding the cache skips the pass (a pass killed midway
                leaves no cache: writes are atomic, and the resumed run computes it again)
  none          simpo and orpo need none

Evaluation (every eval step): val_loss (the preference loss on the validation pairs, also as
val_loss/<stage name> for forgetting.json), val_rewards/accuracies and /margins, the validation
losses of every pre-training domain and earlier sft stage (forgetting across lm -> sft -> dpo),
and exact_match on built-in arithmetic problems (greedy generation), as the sft kind does.
"""

from __future__ import annotations

import gc
import json
import os
import signal
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from stagewise import rundir
from stagewise.data.preference_batches import PreferenceSource, eval_batches, padded_batch
from stagewise.errors import ConfigError, DataError
from stagewise.model import Transformer
from stagewise.objectives.base import token_model
from stagewise.objectives.preference import REFERENCE_FREE, build_preference_objective, sequence_logps
from stagewise.train import stages as plan
from stagewise.train.carried import earlier_evaluator, own_scores, preference_data, task_scorer
from stagewise.train.stage import Stage

CACHE_SUBDIR = "reference_logps"
# Test hook: SIGKILL the process after this many batches of the reference precompute.
KILL_IN_PRECOMPUTE_ENV = "STAGEWISE_DEBUG_KILL_IN_PRECOMPUTE"


def dpo_config(cfg, index: int):
    return cfg.stages[index].dpo if cfg.stages else cfg.dpo


def reference_mode(dpo, adapter_kind: str) -> str:
    """What dpo.reference: auto resolves to."""
    if dpo.reference != "auto":
        return dpo.reference
    if dpo.loss in REFERENCE_FREE:
        return "none"
    return "adapters-off" if adapter_kind != "none" else "copy"


def reference_dtype(dpo, precision_mode: str, where: str = "dpo") -> torch.dtype:
    from stagewise.precision import MODES

    compute = MODES[precision_mode].compute_dtype
    if dpo.reference_dtype == "auto":
        return torch.bfloat16 if compute == torch.bfloat16 else torch.float32
    if dpo.reference_dtype == "bf16" and compute != torch.bfloat16:
        raise ConfigError(f"{where}.reference_dtype: bf16 needs a bf16 compute precision (bf16-mixed, fp8, the "
                          f"fake-quant modes), got precision {precision_mode}; use fp32 or auto")
    return torch.bfloat16 if dpo.reference_dtype == "bf16" else torch.float32


# ---------------------------------------------------------------------------------- references

class CopyReference:
    """A frozen model (set by the stage's prepare, before step 1)."""

    def __init__(self):
        self.model = None

    def logps(self, policy, batch):
        with torch.no_grad():
            return sequence_logps(self.model, batch)[0]


class AdaptersOffReference:
    def logps(self, policy, batch):
        from stagewise.adapters.apply import adapters_disabled

        with torch.no_grad(), adapters_disabled(token_model(policy)):
            return sequence_logps(policy, batch)[0]


class PrecomputedReference:
    def logps(self, policy, batch):
        if batch.ref_logprobs is None:
            raise AssertionError("a precomputed reference needs batches carrying ref_logprobs")
        return batch.ref_logprobs


def _as_float32(module, args, output):
    return output.float()


def load_reference(source, dtype: torch.dtype, device) -> tuple[Transformer, str]:
    """(frozen reference model, sha256 of its weights as loaded) from a stage's base: the matmul
    weights and the embedding stored in `dtype`, norms in fp32; embedding rows are read back as fp32,
    so the residual stream stays fp32 as in the policy."""
    from stagewise.adapters.apply import state_hash

    mcfg, state, _, _ = rundir.load_init_source(source)
    ref = Transformer(mcfg)
    rundir.load_weights(ref, state, f"dpo reference {source}")
    del state
    digest = state_hash(ref)
    ref.requires_grad_(False)
    if dtype != torch.float32:
        cast = {}
        for module in ref.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                w = module.weight
                if id(w) not in cast:
                    cast[id(w)] = nn.Parameter(w.detach().to(dtype), requires_grad=False)
                module.weight = cast[id(w)]
        ref.tok_embeddings.register_forward_hook(_as_float32)
    return ref.to(device).eval(), digest


# ------------------------------------------------------------------------------- precomputation

def cache_key(data_fp: str, weights: str, dtype: torch.dtype, precision_mode: str) -> dict:
    return {"data": data_fp, "weights": weights, "dtype": str(dtype).removeprefix("torch."),
            "precision": precision_mode, "format": "stagewise-reference-logps-v1"}


def cache_path(cache_dir, key: dict) -> Path:
    import hashlib

    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    return Path(cache_dir) / CACHE_SUBDIR / f"{digest}.safetensors"


def read_cache(path: Path, key: dict, n_units: int, given: bool, where: str) -> np.ndarray | None:
    """The cached table [n_units, 2], None when absent; DataError (one line) for a cache of other data or
    weights (an explicitly given file) or one that is not a reference cache."""
    from safetensors import safe_open

    if not path.is_file():
        if given:
            raise DataError(f"{where}.reference_cache: {path} does not exist")
        return None
    try:
        with safe_open(str(path), "np") as f:
            meta = f.metadata() or {}
            table = f.get_tensor("ref_logps")
    except Exception as e:  # safetensors raises its own error types for a damaged header
        raise DataError(f"{where}: {path} is not a readable stagewise reference cache ({type(e).__name__})") from None
    for name, what in (("format", "format"), ("data", "preference data"), ("weights", "reference weights"),
                       ("dtype", "reference dtype"), ("precision", "precision mode")):
        if meta.get(name) != key[name]:
            have, want = str(meta.get(name))[:16], str(key[name])[:16]
            raise DataError(f"{where}.reference_cache: {path} was computed for other {what} ({have}, this stage "
                            f"has {want}); delete it or point at the cache of this data and reference")
    if table.shape != (n_units, 2):
        raise DataError(f"{where}.reference_cache: {path} holds {table.shape[0]} units, this stage has {n_units}")
    return table


def write_cache(path: Path, key: dict, table: np.ndarray) -> None:
    from safetensors.numpy import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({"ref_logps": np.ascontiguousarray(table, dtype=np.float32)}, str(tmp), metadata=key)
    os.replace(tmp, path)


@torch.no_grad()
def precompute_logps(ref: Transformer, units: list, precision, device, batch_size: int, seq_len: int,
                     pad_id: int) -> np.ndarray:
    """[len(units), 2] summed log-probs of both sequences of every unit, in batches of similar length."""
    order = sorted(range(len(units)), key=lambda i: -max(units[i].lengths()))
    out = np.zeros((len(units), 2), dtype=np.float32)
    kill_after = int(os.environ.get(KILL_IN_PRECOMPUTE_ENV, "-1"))
    for k, start in enumerate(range(0, len(order), batch_size)):
        index = order[start:start + batch_size]
        batch = padded_batch([units[i] for i in index], seq_len, pad_id).to(device)
        with precision.inference():
            logps = sequence_logps(ref, batch)[0].float().cpu().numpy()
        out[index] = logps.reshape(-1, 2)
        if k + 1 == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
    return out


# ---------------------------------------------------------------------------------- the stage

def dpo_stage(run, index: int, start: int) -> Stage:
    cfg = plan.stage_config(run.cfg, index)
    dpo, name = dpo_config(run.cfg, index), plan.stage_name(run.cfg, index)
    B, T = cfg.train.batch_size, cfg.data.seq_len
    where = f"stages[{index}].dpo" if run.cfg.stages else "dpo"
    data = preference_data(run, index, T)
    pad = run.tokenizer.eos_id
    source = PreferenceSource(data.train, T, B, cfg.seed, pad, dpo.packing, stage=index, what=f"{where}.data")
    mode = reference_mode(dpo, cfg.adapter.kind)
    dtype = reference_dtype(dpo, cfg.precision.mode, where)
    reference = {"copy": CopyReference, "adapters-off": AdaptersOffReference, "precomputed": PrecomputedReference,
                 "none": lambda: None}[mode]()
    objective = build_preference_objective(dpo, reference)
    base = plan.base_source(run.cfg, run.run_dir, index)
    val = {"batches": eval_batches(data.val, T, B, cfg.eval.batches, pad)}
    if mode == "precomputed" and dpo.reference_cache and base is not None and Path(base).exists():
        _check_given_cache(dpo, data, base, dtype, cfg.precision.mode, where)

    def prepare(device, precision, log) -> None:
        """Before step 1 (and on every resume): the reference copy, or the precomputed table."""
        if mode == "copy":
            reference.model = load_reference(base, dtype, device)[0]
        elif mode == "precomputed":
            table = _reference_table(run, cfg, dpo, data, base, dtype, precision, device, where, log)
            source.ref = table[:len(data.train)]
            val["batches"] = eval_batches(data.val, T, B, cfg.eval.batches, pad, table, len(data.train))

    earlier = earlier_evaluator(run, index, cfg)
    score = task_scorer(run, index, T)

    def evaluate_stage(model, precision) -> dict:
        out = preference_eval(model, objective, val["batches"], precision)
        if run.staged:
            out[f"val_loss/{name}"] = out["val_loss"]
        if earlier is not None:
            out.update(earlier(model, precision))
        if score is not None:
            out.update(own_scores(score(model, precision), name, run.staged))
        return out

    return Stage(**plan.common_fields(run.cfg, index, start, run.run_dir), kind="dpo", cfg=cfg, source=source,
                 objective=objective, evaluate=evaluate_stage, run_dir=run.run_dir, flops_seq_len=T,
                 prepare=prepare, reference_forward=mode in ("copy", "adapters-off"))


@torch.no_grad()
def preference_eval(model, objective, batches, precision) -> dict:
    """val_loss and the reward metrics over fixed validation batches (pairs weighted equally)."""
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    loss, n, sums, counts = 0.0, 0, {}, {}
    for batch in batches:
        with precision.inference():
            res = objective(model, batch.to(device))
        loss += float(res.loss_sum)
        n += int(res.normaliser)
        for k, v in res.metrics.items():
            sums[k] = sums.get(k, 0.0) + float(v)
        for k, v in res.counts.items():
            counts[k] = counts.get(k, 0.0) + float(v)
    model.train(was)
    out = {"val_loss": loss / max(n, 1)}
    for k, v in sums.items():
        if k.startswith("rewards/") or k == "kto/kl":
            out[f"val_{k}"] = v / max(counts.get(k, n), 1)
    return out


def _reference_table(run, cfg, dpo, data, base, dtype, precision, device, where, log) -> np.ndarray:
    ref, weights = load_reference(base, dtype, device)
    key = cache_key(data.fingerprint(), weights, dtype, cfg.precision.mode)
    units = data.train + data.val
    given = dpo.reference_cache is not None
    path = Path(dpo.reference_cache) if given else cache_path(cfg.data.cache_dir, key)
    table = read_cache(path, key, len(units), given, where)
    if table is not None:
        log(f"{where}: reference log-probs from {path}")
    else:
        log(f"{where}: computing the reference log-probs of {2 * len(units)} sequences once -> {path}")
        table = precompute_logps(ref, units, precision, device, cfg.train.batch_size, cfg.data.seq_len,
                                 run.tokenizer.eos_id)
        write_cache(path, key, table)
    del ref
    gc.collect()
    return table


def _check_given_cache(dpo, data, base, dtype, mode, where) -> None:
    """A given reference_cache is checked before the run directory is written, when the base exists."""
    ref, weights = load_reference(base, dtype, "cpu")
    del ref
    key = cache_key(data.fingerprint(), weights, dtype, mode)
    read_cache(Path(dpo.reference_cache), key, len(data.train) + len(data.val), True, where)
