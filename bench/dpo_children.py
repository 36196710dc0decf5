"""The child processes of bench/dpo.py (see its docstring): one DPO training run of either side, stagewise
or TRL, each measuring itself (time, CPU time, VmHWM) and checking its batches or tokenization; plus the settings
and paths both the parent and the children read."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from finetune_gemma import ROOT  # noqa: E402

CACHE = ROOT / "bench" / ".cache" / "dpo"
RESULTS = ROOT / "bench" / "results" / "dpo.jsonl"
THREADS = 2
SEED = 1337
VAL_FRACTION = 0.1
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SPEED_TARGET, MEMORY_TARGET = 1.5, 0.7
METRICS = ("logps/chosen", "logps/rejected", "rewards/margins", "rewards/accuracies")  # the same names on both sides

# (stagewise dpo.reference, TRL reference); the packed row is stagewise only.
CONFIGS = {
    "llama": {"batch": 4, "seq": 256, "warmup": 2, "timed": 6, "lr": 2e-5, "adapter": False,
              "data": "python-docstrings", "pairs": [("copy", "ref-model"), ("precomputed", "precompute")],
              "extra": ["packed"]},
    "gemma": {"batch": 4, "seq": 256, "warmup": 2, "timed": 3, "lr": 5e-5, "adapter": True,
              "data": "arithmetic", "pairs": [("adapters-off", "peft")], "extra": []},
}
LLAMA = {"d_model": 256, "n_layers": 4, "n_heads": 4, "vocab": 8192, "tok_bytes": 2_000_000, "pretrain_steps": 20,
         "max_seq_len": 512}
# Both templates end the conversation at the last turn's end-of-turn token (no newline after it), with
# generation markers around exactly what is trained.
TEMPLATES = {
    "llama": ("{%- for message in messages %}{%- if not loop.first %}{{- '\\n' }}{%- endif %}"
              "{{- '<|im_start|>' + message['role'] + '\\n' }}"
              "{%- if message['role'] == 'assistant' %}{%- generation %}{{- message['content'] + '<|im_end|>' }}"
              "{%- endgeneration %}{%- else %}{{- message['content'] + '<|im_end|>' }}{%- endif %}{%- endfor %}"
              "{%- if add_generation_prompt %}{{- '\\n<|im_start|>assistant\\n' }}{%- endif %}"),
    "gemma": ("{{- bos_token }}{%- for message in messages %}{%- if not loop.first %}{{- '\\n' }}{%- endif %}"
              "{%- if message['role'] == 'assistant' %}{{- '<start_of_turn>model\\n' }}{%- generation %}"
              "{{- message['content'] + '<end_of_turn>' }}{%- endgeneration %}"
              "{%- else %}{{- '<start_of_turn>' + message['role'] + '\\n' + message['content'] + '<end_of_turn>' }}"
              "{%- endif %}{%- endfor %}"
              "{%- if add_generation_prompt %}{{- '\\n<start_of_turn>model\\n' }}{%- endif %}"),
}


def vm(field: str) -> int:
    """VmHWM / VmRSS of this process in bytes (ru_maxrss is not per process: Linux carries it over fork+exec)."""
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024


def mark() -> tuple[float, float, int]:
    return time.perf_counter(), time.process_time(), vm("VmHWM")


def bf16_compute():
    """stagewise's bf16-mixed numeric context on this CPU for the TRL side: torch.autocast(bf16), plus
    stagewise's GEMM emulation where the CPU has no bf16 GEMM, with `out=` honoured. stagewise's
    BF16GemmEmulation returns a fresh tensor for an op given `out=` and leaves `out` as it was, and
    TRL's chunked log-prob head computes every logits tile with torch.mm(..., out=tile): under
    stagewise's context as is, TRL's log-probs come out of uninitialised memory."""
    import contextlib

    import torch

    from stagewise.precision.cpu_bf16 import BF16GemmEmulation, emulates

    class OutHonoured(BF16GemmEmulation):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = dict(kwargs or {})
            out = kwargs.pop("out", None) if func in self.OPS else None
            result = super().__torch_function__(func, types, args, kwargs)
            return result if out is None else out.copy_(result)

    stack = contextlib.ExitStack()
    stack.enter_context(torch.autocast("cpu", dtype=torch.bfloat16))
    if emulates(torch.device("cpu")):
        stack.enter_context(OutHonoured())
    return stack


def sh(cmd: list, **kw) -> str:
    out = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=ROOT, **kw)
    if out.returncode:
        raise SystemExit(f"{' '.join(map(str, cmd[:6]))} failed ({out.returncode}):\n{out.stdout[-2000:]}\n"
                         f"{out.stderr[-5000:]}")
    return out.stdout


def paths(config: str) -> dict:
    d = CACHE / config
    return {"dir": d, "model": d / "model", "pairs": d / "pairs.jsonl", "trl": d / "pairs_trl.jsonl",
            "expected": d / "expected.json", "prep": d / "prepare.json"}


# ----------------------------------------------------------------------------- preparation (cached)

def stagewise_child(config: str, variant: str) -> dict:
    import torch

    from stagewise import rundir
    from stagewise.config.loader import from_dict
    from stagewise.config.schema import RunConfig
    from stagewise.train import dpo_kind, loop, runner

    c, p = CONFIGS[config], paths(config)
    packed = variant == "packed"
    expected = json.loads(p["expected"].read_text())
    n = c["warmup"] + c["timed"]
    batches, marks, before = [], [], {}

    class Counting(dpo_kind.PreferenceSource):
        def next(self):
            if not before:
                before["rss"] = vm("VmRSS")  # model, reference, optimizer and data built; no step yet
                marks.append(mark())
            b = super().next()
            index = self._layout[self.cursor - 1]  # the entry just made (its epoch's layout)
            index = index[0] if packed else index
            pairs, real = len(index), sum(sum(self.lengths[i]) for i in index)
            k = len(batches)
            same = None
            if not packed and k < len(expected) // self.batch_size:
                want = [s["ids"][:-1] for pair in expected[k * self.batch_size:(k + 1) * self.batch_size] for s in pair]
                same = all(b.inputs[r, :len(w)].tolist() == w for r, w in enumerate(want))
            batches.append({"pairs": pairs, "real_positions": real, "computed": int(b.inputs.numel()),
                            "width": int(b.inputs.shape[1]), "expected_batch": same})
            return b

    dpo_kind.PreferenceSource = Counting
    step = loop.train_step

    def train_step(*a, **kw):
        result = step(*a, **kw)
        marks.append(mark())
        return result

    loop.train_step = train_step
    out_dir = Path(tempfile.mkdtemp(prefix="sw-", dir=CACHE))
    cfg = {"name": f"dpo-{config}-{variant}", "out_dir": str(out_dir), "seed": SEED, "threads": THREADS,
           "device": "cpu", "kind": "dpo", "init_from": str(p["model"]),
           # a fresh cache per child: a precomputed reference is computed in every run, as TRL's is
           "data": {"seq_len": c["seq"], "cache_dir": str(out_dir / "cache")},
           "train": {"steps": n, "batch_size": c["batch"], "grad_clip": 1.0, "compile": False},
           "optim": {"lr": c["lr"], "weight_decay": 0.0, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8,
                     "implementation": "fused"},
           "schedule": {"name": "constant", "warmup_steps": 0},
           "precision": {"mode": "bf16-mixed", "telemetry_every": 0},
           "eval": {"every": 0, "batches": 1}, "checkpoint": {"every": 0, "keep_last": 1},
           "log": {"progress": "none"},
           "dpo": {"data": [{"kind": "jsonl", "path": str(p["pairs"])}], "loss": "sigmoid", "beta": 0.1,
                   "reference": "copy" if packed else variant, "packing": packed, "val_fraction": VAL_FRACTION,
                   "truncation": "error", "eval_generate": 0}}
    if c["adapter"]:
        cfg["adapter"] = {"kind": "lora", "r": 16, "alpha": 32, "dropout": 0.0, "target_modules": TARGETS}
    torch.set_num_threads(THREADS)
    try:
        run_dir = runner.start(from_dict(RunConfig, cfg), log=lambda m: None)
        records = [r for r in rundir.read_metrics(run_dir / rundir.METRICS) if "step_time_s" in r]
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    assert len(records) == n and len(marks) == n + 1 and len(batches) >= n, (len(records), len(marks), len(batches))
    steps = [{"time": marks[k + 1][0] - marks[k][0], "cpu": marks[k + 1][1] - marks[k][1],
              "metrics_step_time_s": r["step_time_s"], "loss": r["loss"], "grad_norm": r["grad_norm"],
              **{m: r.get(m) for m in METRICS},
              **batches[k]} for k, r in enumerate(records)]
    return {"steps": steps, "peak_rss": marks[-1][2], "rss_before_train": before["rss"],
            "peak_rss_at_exit": vm("VmHWM")}


def trl_child(config: str, variant: str) -> dict:
    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="trl-", dir=CACHE))
    os.environ["HF_DATASETS_CACHE"] = str(tmp / "datasets")  # nothing cached across children (TRL's precompute)
    os.environ["HF_HUB_OFFLINE"] = "1"
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    c, p = CONFIGS[config], paths(config)
    prep = json.loads(p["prep"].read_text())
    torch.set_num_threads(THREADS)
    n = c["warmup"] + c["timed"]
    tok = AutoTokenizer.from_pretrained(p["model"])
    model = AutoModelForCausalLM.from_pretrained(prep["model"]["hf_weights"], dtype=torch.float32,
                                                 attn_implementation="sdpa")
    peft_config = None
    if c["adapter"]:
        from peft import LoraConfig

        peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
    ds = datasets.load_dataset("json", data_files=str(p["trl"]), split="train")
    args = DPOConfig(
        output_dir=str(tmp / "out"), seed=SEED, max_steps=n, per_device_train_batch_size=c["batch"],
        gradient_accumulation_steps=1, learning_rate=c["lr"], lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, optim="adamw_torch_fused",
        max_grad_norm=1.0, bf16=False, fp16=False, gradient_checkpointing=False, use_cpu=True,
        beta=0.1, loss_type=["sigmoid"], max_length=c["seq"] + 1, pad_to_multiple_of=32,
        precompute_ref_log_probs=variant == "precompute", train_sampling_strategy="sequential",
        logging_strategy="no", save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True,
        dataloader_num_workers=0, dataloader_pin_memory=False)
    with bf16_compute():  # TRL's reference precompute runs in the constructor
        trainer = DPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, peft_config=peft_config)
    trainer.compute_loss_context_manager = bf16_compute
    parity = _parity(trainer.train_dataset, json.loads(p["expected"].read_text()))
    batches, marks, losses, logged, before = [], [], [], [], {}
    collate = trainer.data_collator

    def counting(examples):
        b = collate(examples)
        batches.append({"pairs": len(examples), "real_positions": int(b["attention_mask"].sum()) - 2 * len(examples),
                        "computed": int(b["input_ids"].numel()), "width": int(b["input_ids"].shape[1])})
        return b

    trainer.data_collator = counting
    step = trainer.training_step

    def training_step(*a, **kw):
        loss = step(*a, **kw)
        losses.append(float(loss))
        return loss

    trainer.training_step = training_step

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **kw):
            before["rss"] = vm("VmRSS")
            marks.append(mark())
            print(f"trl: train begins {time.perf_counter() - t0:.1f} s after start", file=sys.stderr, flush=True)

        def on_step_end(self, *a, **kw):
            marks.append(mark())
            m = trainer._metrics["train"]  # logging_strategy "no": they are only cleared by the final log
            logged.append({key: m[key][-1] for key in METRICS})
            print(f"trl: step {len(marks) - 1} {marks[-1][0] - marks[-2][0]:.2f} s", file=sys.stderr, flush=True)

    trainer.add_callback(Clock())
    try:
        trainer.train()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    assert len(marks) == n + 1 and len(batches) >= n, (len(marks), len(batches))
    steps = [{"time": marks[k + 1][0] - marks[k][0], "cpu": marks[k + 1][1] - marks[k][1], "loss": losses[k],
              **logged[k], **batches[k]} for k in range(n)]
    return {"steps": steps, "peak_rss": marks[-1][2], "rss_before_train": before["rss"],
            "peak_rss_at_exit": vm("VmHWM"), "parity": parity, "ref_model_kept": trainer.ref_model is not None}


def _parity(prepared, expected: list) -> dict:
    """TRL's tokenization against stagewise's: the sequence ids and the trained (completion) positions."""
    ids_diff = mask_diff = 0
    for k, pair in enumerate(expected):
        row = prepared[k]
        for key, want in zip(("chosen_ids", "rejected_ids"), pair):
            ids = row["prompt_ids"] + row[key]
            mask = [0] * len(row["prompt_ids"]) + [1] * len(row[key])
            ids_diff += ids != want["ids"]
            mask_diff += mask != want["mask"]
    return {"sequences": 2 * len(expected), "different_ids": ids_diff, "different_trained_positions": mask_diff}
