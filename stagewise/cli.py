"""The `stagewise` command line: a thin layer over the components.

Every user-caused error surfaces as one line `error: ...` on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import textwrap

from stagewise.errors import StagewiseError

OVERRIDES_HELP = ("Override any recipe key with --section.key=value (YAML value syntax), e.g. "
                  "--train.steps=200 --optim.lr=1e-3 --data.sources='[{kind: shakespeare}]'.")


def _config_epilog() -> str:
    from stagewise.config.loader import describe

    lines = ["recipe keys (set in the YAML or as --key=value overrides):"]
    for path, tp, default, help_text in describe():
        lines.append(f"  {path} ({tp}, default {default})")
        lines += textwrap.wrap(help_text, 90, initial_indent="      ", subsequent_indent="      ")
    return "\n".join(lines)


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage mistake reported like every other error: one line, exit 2."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {value}")
        return value
    parse.__name__ = f"integer >= {low}"
    return parse


def _finite_float(low: float, high: float = float("inf"), low_open: bool = False):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        ok = math.isfinite(value) and (value > low if low_open else value >= low) and value <= high
        if not ok:
            bounds = f"{'(' if low_open else '['}{low:g}, {high:g}]" if math.isfinite(high) else f">= {low:g}"
            raise argparse.ArgumentTypeError(f"expected a finite number {'in ' if math.isfinite(high) else ''}"
                                             f"{bounds}, got {text!r}")
        return value
    parse.__name__ = "number"
    return parse


def _text(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("expected non-empty text")
    return text


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    p = _Parser(prog="stagewise", description="Train language models through every stage of "
                "their life, at any precision, resumable bit for bit.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    _add_training_commands(sub, fmt)
    _add_model_commands(sub, fmt)
    _add_data_and_report_commands(sub, fmt)
    return p


def _add_training_commands(sub, fmt) -> None:
    """run, resume, plan."""
    r = sub.add_parser("run", help="train from a recipe (creates a run directory)", formatter_class=fmt,
                       description="Train from a YAML recipe. Creates out_dir/name (or name-2, -3 ... if taken) "
                       "holding the resolved config, metrics.jsonl, checkpoints and the final exported model. "
                       "Ctrl-C or SIGTERM saves a checkpoint before exiting. Several processes: torchrun "
                       "--nproc-per-node=N -m stagewise run RECIPE, with parallel.strategy ddp, fsdp2 or hsdp "
                       "(docs/distributed.md); train.batch_size is then the global micro-batch. " + OVERRIDES_HELP,
                       epilog=_config_epilog())
    r.add_argument("recipe", help="path to a recipe YAML (see recipes/)")
    r.add_argument("--from-stage", metavar="NAME", default=None,
                   help="re-run a staged recipe from stage NAME's start in a new run directory, reusing an earlier "
                   "run's stages before NAME (its metrics, stage exports and the final checkpoint of the stage "
                   "before NAME); those stages must be unchanged, NAME and later ones may change anything. "
                   "Unchanged, the result is bitwise the earlier run's")
    r.add_argument("--reuse", metavar="RUN_DIR", default=None,
                   help="with --from-stage: the earlier run (default: the newest run directory of the recipe's name)")

    s = sub.add_parser("resume", help="continue a stopped or killed run",
                       description="Continue RUN_DIR from its newest complete checkpoint with the config saved "
                       "in it. On the same machine and thread count the result is bitwise identical to a run "
                       "that was never interrupted. A run started under torchrun resumes under torchrun at the "
                       "same or another number of processes, or in one process (the same global batches).")
    s.add_argument("run_dir", help="a run directory created by `stagewise run`")

    pl = sub.add_parser("plan", help="print config, size, FLOPs and predicted memory without training",
                        formatter_class=fmt, epilog=_config_epilog(),
                        description="Resolve a recipe and print: the resolved config, parameter counts, "
                        "FLOPs per token (6*N_matmul + 12*L*H*Dh*T, PaLM appendix B), tokens per step, a "
                        "step's predicted memory per stage by component (weights, gradients, optimizer states "
                        "for optim.name, activations for train.activation_checkpointing, the fused loss's working "
                        "set, a reference copy), the step's tracked peak, the process's fixed overhead (python "
                        "with torch and stagewise imported, measured once per machine) and whether the total "
                        "fits memory.limit (docs/memory.md; each run measures the same components into "
                        "RUN_DIR/memory.json), and the cached peak GEMM rate MFU divides by. With init_from "
                        "the model is the source's own architecture. Nothing is trained; only the per-machine "
                        "caches in ~/.cache/stagewise are written. " + OVERRIDES_HELP)
    pl.add_argument("recipe", help="path to a recipe YAML")
    pl.add_argument("--measure-peak", action="store_true",
                    help="re-measure this machine's peak GEMM rate that MFU divides by (about 1 s of n x n x n "
                    "matmuls in the recipe's compute dtype, device and thread count; run it on an idle machine) "
                    "and cache it in ~/.cache/stagewise/peak_flops.json with when it was measured and the load "
                    "average and CPU count at the time. Without it, plan prints the cached peak and its "
                    "conditions, and training measures it once if it is missing.")


def _add_model_commands(sub, fmt) -> None:
    """sample, eval, export, import-hf, export-hf."""
    sm = sub.add_parser("sample", help="generate text from a checkpoint",
                        description="Generate from a run directory (newest checkpoint), a checkpoint "
                        "directory or an exported model directory, with a KV cache.")
    sm.add_argument("ckpt", help="run directory, checkpoint directory or exported model directory")
    sm.add_argument("--prompt", required=True, type=_text, help="text to continue")
    sm.add_argument("--max-new-tokens", type=_int_at_least(1), default=200, help="tokens to generate (default 200)")
    sm.add_argument("--temperature", type=_finite_float(0.0), default=0.8,
                    help="softmax temperature; 0 gives greedy decoding (default 0.8)")
    sm.add_argument("--greedy", action="store_true", help="greedy decoding (same as --temperature 0)")
    sm.add_argument("--chat", action="store_true", help="send the prompt as a user turn through the model's chat "
                    "template and print only the assistant's reply, stopping at the template's end-of-turn token")
    sm.add_argument("--top-k", type=_int_at_least(0), default=50, help="sample only among the k most likely tokens; 0 = off")
    sm.add_argument("--top-p", type=_finite_float(0.0, 1.0, low_open=True), default=1.0,
                    help="nucleus sampling: smallest token set with this total probability (default 1.0 = off)")
    sm.add_argument("--num-samples", type=_int_at_least(1), default=1, help="independent samples to draw (default 1)")
    sm.add_argument("--seed", type=_int_at_least(0), default=0, help="sampling seed; same seed, same text (default 0)")
    sm.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")

    ev = sub.add_parser("eval", help="loss, perplexity and bits per byte of a checkpoint on a data set",
                        description="Mean next-token cross-entropy (nats/token), perplexity = exp(loss), and bits "
                        "per byte = summed loss / (ln 2 x UTF-8 bytes of the evaluated target tokens), the number "
                        "to compare across models with different tokenizers (docs/metrics.md).")
    ev.add_argument("ckpt", help="run directory, checkpoint directory or exported model directory")
    ev.add_argument("--data", default=None,
                    help="what to evaluate on: a prepared dataset directory (uses --split), a built-in corpus "
                    "(python-stdlib, shakespeare, python-docs), or a text/JSONL/Parquet file or directory, tokenized with the "
                    "model's tokenizer. Default: the run's own validation split.")
    ev.add_argument("--split", choices=["val", "train"], default="val",
                    help="split of a prepared dataset (default val)")
    ev.add_argument("--field", default="text", help="JSONL/Parquet text field (default text)")
    ev.add_argument("--seq-len", type=_int_at_least(1), default=None, help="window length (default: the run's data.seq_len, "
                    "else 512)")
    ev.add_argument("--batch-size", type=_int_at_least(1), default=8, help="windows per batch (default 8)")
    ev.add_argument("--max-tokens", type=_int_at_least(1), default=262144,
                    help="evaluate at most this many target tokens, from evenly spaced windows (default 262144)")
    ev.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")

    ex = sub.add_parser("export", help="write model.safetensors + config.json + tokenizer.json",
                        description="Export a checkpoint's model weights as safetensors with its config and "
                        "tokenizer (no optimizer state).")
    ex.add_argument("ckpt", help="run directory or checkpoint directory")
    ex.add_argument("out", help="output directory (must not exist)")

    ih = sub.add_parser("import-hf", help="convert a Hugging Face model into a stagewise model directory",
                        description="Convert a Hugging Face Llama, Mistral, Qwen2, Qwen3 or Gemma 3 text model "
                        "(config.json, model.safetensors or shards + model.safetensors.index.json, tokenizer.json "
                        "and its side files) into a directory that sample, eval, export-hf and a recipe's "
                        "init_from accept. Every tensor name, shape and dtype is checked against config.json "
                        "and the tokenizer against the embedding before anything is written.")
    ih.add_argument("src", help="a Hugging Face model directory, a .gguf file (dequantized by transformers; "
                    "needs transformers and gguf) or a hub id such as Qwen/Qwen3-0.6B (needs huggingface_hub "
                    "and network access)")
    ih.add_argument("out", help="output directory (must not exist)")
    ih.add_argument("--gguf-file", default=None, help="name of a GGUF file inside SRC to import instead of "
                    "safetensors")

    eh = sub.add_parser("export-hf", help="write a checkpoint as a Hugging Face model directory",
                        description="Write a run, checkpoint or model directory in a Hugging Face architecture's "
                        "own format (config.json, safetensors sharded above --max-shard-size with "
                        "model.safetensors.index.json, tokenizer files) so that transformers' "
                        "AutoModelForCausalLM.from_pretrained and AutoTokenizer.from_pretrained load it. The "
                        "architecture is the one the model was imported from, else the one its options imply.")
    eh.add_argument("ckpt", help="run directory, checkpoint directory or model directory")
    eh.add_argument("out", help="output directory (must not exist)")
    eh.add_argument("--arch", default=None, choices=["llama", "mistral", "qwen2", "qwen3", "gemma3_text"],
                    help="target architecture (model_type); default: the source's")
    eh.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                    help="dtype of the written weights (default float32)")
    eh.add_argument("--max-shard-size", default="5GB",
                    help="largest safetensors file before splitting into shards, e.g. 500MB, 2GB (default 5GB)")
    eh.add_argument("--merge", action="store_true",
                    help="a run with adapters: write its weights with the adapters merged into the base (a packed "
                    "base is dequantized; the command prints which weights and the logit change that caused)")
    _add_peft_commands(sub, fmt)


def _add_peft_commands(sub, fmt) -> None:
    """export-peft, import-peft."""
    ep = sub.add_parser("export-peft", help="write a run's adapters as a Hugging Face PEFT adapter",
                        description="Write the adapters of a run trained with adapter.kind lora or dora as "
                        "adapter_config.json + adapter_model.safetensors, which peft.PeftModel.from_pretrained "
                        "loads onto the base (export-hf the base for transformers). PiSSA, OLoRA and LoRA-GA "
                        "adapters become a plain LoRA of rank 2r against the original base, as peft converts them. "
                        "docs/adapters.md.")
    ep.add_argument("run", help="run directory, or its final/ or stages/<name>/ export")
    ep.add_argument("out", help="output directory (must not exist)")
    ep.add_argument("--base-name", default=None, help="base_model_name_or_path written into adapter_config.json "
                    "(default: the base path the run trained on)")
    ip = sub.add_parser("import-peft", help="apply a Hugging Face PEFT LoRA adapter to a base model",
                        description="Load a PEFT LoRA / DoRA adapter (adapter_config.json + "
                        "adapter_model.safetensors) onto BASE (a stagewise model directory, run, or Hugging Face "
                        "model directory) and write a stagewise model directory with the merged weights and the "
                        "adapter itself, for sample, eval, export-peft and a recipe's init_from.")
    ip.add_argument("adapter", help="PEFT adapter directory")
    ip.add_argument("base", help="the base model the adapter was trained on")
    ip.add_argument("out", help="output directory (must not exist)")


def _add_data_and_report_commands(sub, fmt) -> None:
    """data prepare, report, docs-config."""
    d = sub.add_parser("data", help="data preparation")
    dsub = d.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")
    dp = dsub.add_parser("prepare", help="train a tokenizer and tokenize a corpus into shards",
                         description="Train a byte-level BPE (or load --tokenizer) and tokenize documents into "
                         "memory-mapped train/val token files with a manifest. Use the result as "
                         "data.prepared in a recipe. Either give a recipe (its data section is used) or "
                         "--source options.")
    dp.add_argument("recipe", nargs="?", help="take the data section of this recipe")
    dp.add_argument("--source", action="append", default=[], metavar="KIND[:PATH]",
                    help="a source, repeatable: python-stdlib, shakespeare, python-docs, text:PATH, jsonl:PATH, parquet:PATH")
    dp.add_argument("--field", default="text", help="JSONL/Parquet text field (default text)")
    dp.add_argument("--tokenizer", default=None, help="use this existing tokenizer.json instead of training one")
    dp.add_argument("--vocab-size", type=_int_at_least(1), default=None, help="BPE vocabulary size to train (default 8192)")
    dp.add_argument("--val-fraction", type=float, default=None,
                    help="fraction of documents held out for validation (default 0.02)")
    dp.add_argument("--out", required=True, help="output dataset directory (must not exist)")

    rp = sub.add_parser("report", help="write an offline HTML report of a run (loss, LR, stages, forgetting)",
                        description="Write RUN_DIR/report/index.html with PNG figures beside it: run summary, "
                        "training loss, learning rate, the memory plan against its measurement (memory.json; "
                        "also printed here) and, for multi-stage runs, per-domain validation loss with "
                        "stage boundaries, mixture/replay proportions, the forgetting matrix and the stability "
                        "gap. Needs matplotlib (pip install 'stagewise[experiments]'); the page loads nothing "
                        "from the network. See docs/report.md.")
    rp.add_argument("run_dir", help="a run directory created by `stagewise run` (needs metrics.jsonl)")
    rp.add_argument("--out", default=None, help="output directory (default RUN_DIR/report; files in it are replaced)")

    sub.add_parser("docs-config", help="print the recipe reference (Markdown) generated from the schema")



def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command not in ("run", "plan"):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        from stagewise import commands

        return getattr(commands, "cmd_" + args.command.replace("-", "_"))(args, extra) or 0
    except StagewiseError as e:
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank fails alike: rank 0 says it once
            print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        from stagewise.distributed import lost_peer_message

        message = lost_peer_message(e)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
