"""The child processes of bench/sft.py (see its docstring): the parity check and one training run
of either side, each measuring itself; plus the settings both the parent and the children read."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "bench" / ".cache" / "sft"
RESULTS = ROOT / "bench" / "results" / "sft.jsonl"
TABLE = ROOT / "bench" / "results" / "sft.md"
THREADS = 2
VAL_FRACTION = 0.05
SEED = 1337

# model: d_model, n_layers, n_heads, vocab; data: conversations per built-in set; steps per mode
SIZES = {
    "full": {"d_model": 384, "n_layers": 6, "n_heads": 6, "vocab": 8192, "tok_bytes": 4_000_000,
             "pretrain_steps": 20, "seq": 512, "batch": 8, "per_source": 1500, "lr": 1e-4, "rounds": 2,
             "steps": {"padded": (3, 24), "packed": (2, 8)}},  # (warm-up, timed)
    "quick": {"d_model": 64, "n_layers": 2, "n_heads": 2, "vocab": 1024, "tok_bytes": 1_000_000,
              "pretrain_steps": 3, "seq": 256, "batch": 4, "per_source": 200, "lr": 1e-4, "rounds": 1,
              "steps": {"padded": (1, 3), "packed": (1, 2)}},
}
MODES = ("padded", "packed")


def vm(field: str) -> int:
    """VmHWM / VmRSS of this process in bytes (VmHWM is its own high-water mark; ru_maxrss is not:
    Linux carries it over fork+exec)."""
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024


def mark() -> tuple[float, float, int]:
    """(wall clock, this process's CPU time over all its threads, VmHWM) at a step boundary."""
    return time.perf_counter(), time.process_time(), vm("VmHWM")


def interval(a: tuple, b: tuple) -> dict:
    return {"time": b[0] - a[0], "cpu": b[1] - a[1]}


def paths(size: str) -> dict:
    s = SIZES[size]
    d = CACHE / f"{size}-d{s['d_model']}-l{s['n_layers']}-v{s['vocab']}-s{s['seq']}"
    return {"dir": d, "base": d / "base", "hf": d / "hf", "chat": d / "chat.jsonl", "trl": d / "chat_trl.jsonl",
            "check": d / "check.json", "prep": d / "prepare.json"}



def check_child(size: str) -> None:
    """Parity of the two sides, written to check.json: token ids and trained positions of TRL's prepared
    dataset vs stagewise's encoding, logits of the two models on one conversation, and whether TRL's
    padding-free packed batch keeps attention inside each example under sdpa on this machine."""
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from stagewise import rundir
    from stagewise.data.chat import require_template
    from stagewise.data.conversations import read_conversations
    from stagewise.data.sft_data import encode
    from stagewise.data.tokenizer import Tokenizer

    torch.set_num_threads(THREADS)
    s, p = SIZES[size], paths(size)
    out = {}
    hf_tok = AutoTokenizer.from_pretrained(p["hf"])
    model = AutoModelForCausalLM.from_pretrained(p["hf"], dtype=torch.float32, attn_implementation="sdpa")
    with tempfile.TemporaryDirectory() as tmp:
        args = SFTConfig(output_dir=tmp, max_length=s["seq"], assistant_only_loss=True, packing=False,
                         bf16=False, report_to="none", use_cpu=True, max_steps=1, shuffle_dataset=False)
        trainer = SFTTrainer(model=model, args=args, processing_class=hf_tok,
                             train_dataset=load_dataset("json", data_files=str(p["trl"]), split="train"))
        prepared = trainer.train_dataset
    tok = Tokenizer.load(p["base"] / "tokenizer.json")
    template = require_template(tok, "bench")
    convs = list(read_conversations(p["trl"]))
    n = min(len(convs), 300)
    ids_diff = mask_diff = 0
    for i in range(n):
        ex = encode(tok, template, convs[i], "assistant")
        row = prepared[i]
        ids_diff += row["input_ids"][:-1] != list(ex.inputs)
        mask_diff += row["labels"][1:] != [int(t) for t in ex.targets]  # both use -100 for "no loss"
    out["rows_compared"] = n
    out["rows_with_different_ids"] = ids_diff
    out["rows_with_different_trained_targets"] = mask_diff

    # the same weights: logits of stagewise's model and the export on one conversation
    sw_model = rundir.load_model(p["base"], torch.device("cpu"))[0].eval()
    x = torch.tensor([prepared[0]["input_ids"]])
    model.eval()
    with torch.no_grad():
        hf_logits = model(input_ids=x).logits
        sw_logits = sw_model(x)
    out["logits_max_abs_diff_stagewise_vs_export"] = float((hf_logits - sw_logits).abs().max())

    # TRL packing: its collator's padding-free batch through the model as SFTTrainer calls it
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    ex = [prepared[i] for i in range(3)]
    lens = [len(e["input_ids"]) for e in ex]
    collate = DataCollatorForLanguageModeling(pad_token_id=hf_tok.pad_token_id or 0, padding_free=True)
    batch = collate([{"input_ids": e["input_ids"], "labels": e["labels"], "seq_lengths": [len(e["input_ids"])]}
                     for e in ex])
    out["trl_packed_batch_keys"] = sorted(batch)
    out["trl_packed_batch_shape"] = list(batch["input_ids"].shape)
    with torch.no_grad():
        kw = {k: v for k, v in batch.items() if k not in ("labels", "seq_idx")}
        packed = model(**kw).logits[0]
        alone = torch.cat([model(input_ids=torch.tensor([e["input_ids"]])).logits[0] for e in ex])
        no_pos = model(input_ids=batch["input_ids"]).logits[0]  # one long causal document, for contrast
    out["trl_packed_vs_alone_max_abs_diff"] = float((packed - alone).abs().max())
    out["one_causal_row_vs_alone_max_abs_diff"] = float((no_pos - alone).abs().max())
    out["trl_packed_attention_inside_examples"] = out["trl_packed_vs_alone_max_abs_diff"] < 1e-3
    out["example_lengths"] = lens
    p["check"].write_text(json.dumps(out, indent=1))
    print(json.dumps(out))



def stagewise_child(size: str, mode: str, warmup: int, timed: int) -> dict:
    import numpy as np

    from stagewise import rundir
    from stagewise.config.loader import from_dict
    from stagewise.config.schema import RunConfig
    from stagewise.train import loop, runner, sft_kind

    s, p = SIZES[size], paths(size)
    batches, before, marks = [], {}, []

    def counting(kind):
        class Counting(kind):
            def next(self):
                if not before:
                    before["rss"] = vm("VmRSS")  # model, optimizer and data built; no step yet
                    marks.append(mark())
                return super().next()

            def _batch(self, group):
                b = super()._batch(group)
                rows = group if mode == "packed" else [[i] for i in group]
                fed = sum(self.lengths[i] for row in rows for i in row)  # n - 1 input positions per example
                batches.append({"real": fed + sum(len(r) for r in rows), "positions": fed,
                                "computed": int(b.inputs.numel()), "examples": sum(len(r) for r in rows)})
                return b
        return Counting

    sft_kind.PackedSource = counting(sft_kind.PackedSource)
    sft_kind.PaddedSource = counting(sft_kind.PaddedSource)
    step = loop.train_step

    def train_step(*a, **kw):  # the step end (on the CPU the step is done when it returns)
        result = step(*a, **kw)
        marks.append(mark())
        return result

    loop.train_step = train_step
    out_dir = Path(tempfile.mkdtemp(prefix="sw-", dir=CACHE))
    cfg = from_dict(RunConfig, {
        "name": "sft", "out_dir": str(out_dir), "seed": SEED, "threads": THREADS, "device": "cpu",
        "kind": "sft", "init_from": str(p["base"]),
        "data": {"seq_len": s["seq"]},
        "train": {"steps": warmup + timed, "batch_size": s["batch"], "grad_clip": 1.0, "compile": False},
        "optim": {"lr": s["lr"], "weight_decay": 0.1, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8},
        "schedule": {"name": "constant", "warmup_steps": 0},
        "precision": {"mode": "fp32", "telemetry_every": 0},
        "eval": {"every": 0, "batches": 1}, "checkpoint": {"every": 0, "keep_last": 1},
        "log": {"progress": "none"},
        "sft": {"data": [{"kind": "jsonl", "path": str(p["chat"])}], "packing": mode == "packed",
                "val_fraction": VAL_FRACTION, "train_on": "assistant", "eval_generate": 0}})
    try:
        run_dir = runner.start(cfg, log=lambda m: None)
        records = [r for r in rundir.read_metrics(run_dir / rundir.METRICS) if "step_time_s" in r]
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    n = warmup + timed
    assert len(records) == n and len(marks) == n + 1 and len(batches) >= n, (len(records), len(marks), len(batches))
    steps = [{**interval(marks[k], marks[k + 1]), "metrics_step_time_s": r["step_time_s"], "loss": r["loss"],
              "metrics_tokens_per_s": r["tokens_per_s"], **batches[k]} for k, r in enumerate(records)]
    return {"steps": steps, "peak_rss": marks[-1][2], "rss_before_train": before["rss"],
            "metrics_peak_mem_bytes": records[-1]["peak_mem_bytes"], "peak_rss_at_exit": vm("VmHWM"),
            "nan_losses": int(np.isnan([r["loss"] for r in records]).sum())}


def trl_child(size: str, mode: str, warmup: int, timed: int, grouped: bool = False) -> dict:
    os.environ.setdefault("HF_DATASETS_CACHE", str(CACHE / "hf_datasets"))
    os.environ["HF_HUB_OFFLINE"] = "1"
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    torch.set_num_threads(THREADS)
    datasets.disable_caching()  # every round tokenizes and packs as the first one did
    s, p = SIZES[size], paths(size)
    tok = AutoTokenizer.from_pretrained(p["hf"])
    model = AutoModelForCausalLM.from_pretrained(p["hf"], dtype=torch.float32, attn_implementation="sdpa")
    ds = datasets.load_dataset("json", data_files=str(p["trl"]), split="train")
    out_dir = tempfile.mkdtemp(prefix="trl-", dir=CACHE)
    args = SFTConfig(
        output_dir=out_dir, seed=SEED, max_steps=warmup + timed, per_device_train_batch_size=s["batch"],
        gradient_accumulation_steps=1, learning_rate=s["lr"], lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8, optim="adamw_torch_fused",
        max_grad_norm=1.0, bf16=False, fp16=False, gradient_checkpointing=False, use_cpu=True,
        max_length=s["seq"], packing=mode == "packed", assistant_only_loss=True,
        logging_strategy="no", save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True,
        dataloader_num_workers=0, dataloader_pin_memory=False,
        train_sampling_strategy="group_by_length" if grouped else "random")
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
    batches, marks, losses, before = [], [], [], {}
    collate = trainer.data_collator

    def counting(examples):
        b = collate(examples)
        if "attention_mask" in b:
            real, n = int(b["attention_mask"].sum()), len(examples)
        else:  # padding-free: one row, every position a real token, examples start at position 0
            real, n = int(b["input_ids"].numel()), int((b["position_ids"] == 0).sum())
        batches.append({"real": real, "positions": real, "computed": int(b["input_ids"].numel()), "examples": n})
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

        def on_step_end(self, *a, **kw):
            marks.append(mark())

    trainer.add_callback(Clock())
    try:
        trainer.train()
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    n = warmup + timed
    assert len(marks) == n + 1 and len(batches) >= n, (len(marks), len(batches))
    steps = [{**interval(marks[k], marks[k + 1]), "loss": losses[k], **batches[k]} for k in range(n)]
    return {"steps": steps, "peak_rss": marks[-1][2], "rss_before_train": before["rss"],
            "peak_rss_at_exit": vm("VmHWM"), "nan_losses": sum(x != x for x in losses),
            "padding_free": bool(getattr(trainer, "padding_free", False)),
            "packing_strategy": args.packing_strategy}
