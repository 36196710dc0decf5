"""The one typed schema behind recipes, CLI overrides and the docs.

Every recipe key is a field below. `stagewise.config.loader` validates YAML and
`--key.path=value` overrides against these dataclasses, and `docs/config.md` is
generated from the same `help` strings, so the three never drift apart.

Field metadata:
  help     one sentence shown in `stagewise run --help-config` and the docs
  gt/ge/le numeric bounds checked at load time
  choices  allowed values for a string field
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


def opt(default, help: str, **checks):
    """A schema field: default value, help text, optional validation bounds."""
    meta = {"help": help, **checks}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    if isinstance(default, type):  # a nested section
        return field(default_factory=default, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class RopeScalingConfig:
    kind: str = opt("none", "RoPE context extension: none, linear (positions divided by factor) or llama3 "
                    "(Llama 3.1's frequency-dependent interpolation).", choices=["none", "linear", "llama3"])
    factor: float = opt(8.0, "Scaling factor (linear, llama3).", gt=0)
    low_freq_factor: float = opt(1.0, "llama3: wavelengths above original_max_seq_len / low_freq_factor are "
                                 "divided by factor.", gt=0)
    high_freq_factor: float = opt(4.0, "llama3: wavelengths below original_max_seq_len / high_freq_factor are "
                                  "kept; those in between are interpolated.", gt=0)
    original_max_seq_len: int = opt(8192, "llama3: context length of the original pre-training.", gt=0)


@dataclass
class ModelConfig:
    vocab_size: Optional[int] = opt(
        None, "Vocabulary size; null takes the tokenizer's size rounded up to pad_vocab_to.", gt=0)
    pad_vocab_to: int = opt(64, "Round a tokenizer-derived vocab_size up to a multiple of this (GEMM-friendly).", gt=0)
    d_model: int = opt(384, "Hidden (residual stream) width.", gt=0)
    n_layers: int = opt(6, "Number of transformer blocks.", gt=0)
    n_heads: int = opt(6, "Number of query heads.", gt=0)
    n_kv_heads: Optional[int] = opt(
        None, "Number of key/value heads (grouped-query attention); null means n_heads. Must divide n_heads.", gt=0)
    head_dim: Optional[int] = opt(None, "Per-head width; null means d_model // n_heads.", gt=0)
    ffn_dim: Optional[int] = opt(
        None, "SwiGLU hidden width; null means 8/3 * d_model rounded up to a multiple of 64.", gt=0)
    max_seq_len: int = opt(2048, "Longest sequence the RoPE tables cover (training and sampling).", gt=0)
    rope_base: float = opt(10000.0, "RoPE base frequency theta.", gt=0)
    norm_eps: float = opt(1e-5, "RMSNorm epsilon.", gt=0)
    tie_embeddings: bool = opt(True, "Share the token embedding matrix with the output head.")
    qk_norm: bool = opt(False, "RMSNorm on queries and keys per head before RoPE (as in Qwen3/OLMo2).")
    init_std: float = opt(0.02, "Std of the normal init of embeddings and linear weights; "
                          "output projections (attention wo, MLP w2) use init_std / sqrt(2 * n_layers).", gt=0)
    # Options below default to plain Llama; imported Qwen2/Qwen3/Mistral/Gemma 3 checkpoints set them.
    rope_scaling: RopeScalingConfig = opt(RopeScalingConfig, "RoPE frequency scaling for long context "
                                          "(applied to global layers).")
    attention_bias: bool = opt(False, "Biases on the query/key/value projections (as in Qwen2).")
    mlp_activation: str = opt("silu", "Gate activation of the gated MLP: silu (SwiGLU; Llama, Qwen, Mistral) or "
                              "gelu_tanh (GeGLU with tanh-approximate GELU; Gemma).", choices=["silu", "gelu_tanh"])
    norm_unit_offset: bool = opt(False, "RMSNorm scales by (1 + weight), weights initialised to 0 (Gemma).")
    post_norms: bool = opt(False, "Also RMSNorm the attention and MLP outputs before adding them to the residual "
                           "(Gemma 2/3 sandwich norms).")
    scale_embeddings: bool = opt(False, "Multiply token embeddings by sqrt(d_model) (Gemma).")
    query_pre_attn_scalar: Optional[float] = opt(
        None, "Attention scores are scaled by query_pre_attn_scalar^-0.5; null means head_dim (Gemma 3 sets it).",
        gt=0)
    sliding_window: Optional[int] = opt(
        None, "Local layers attend only to the last sliding_window positions (the query's own included); "
        "null makes every layer global.", gt=0)
    global_every: int = opt(
        0, "With sliding_window: layers global_every-1, 2*global_every-1, ... (0-based) are global and the others "
        "local (Gemma 3: 6); 0 makes every layer local (Mistral v0.1).", ge=0)
    rope_local_base: Optional[float] = opt(
        None, "RoPE base of the local (sliding-window) layers; null means rope_base (Gemma 3: 10000 local, "
        "1e6 global).", gt=0)


@dataclass
class SourceConfig:
    kind: str = opt("text", "Source type.", choices=["text", "jsonl", "parquet", "python-stdlib", "shakespeare",
                                                           "python-docs"])
    path: Optional[str] = opt(None, "File or directory (text, jsonl, parquet). Not used by built-in corpora.")
    glob: Optional[str] = opt(None, "Filename pattern inside a directory, e.g. '*.md'; null takes every file of the kind.")
    field: str = opt("text", "JSONL/Parquet field (column) holding the document text.")


@dataclass
class TokenizerConfig:
    path: Optional[str] = opt(None, "An existing Hugging Face tokenizer.json to use; null trains a byte-level BPE.")
    vocab_size: int = opt(8192, "Vocabulary size of a newly trained byte-level BPE (special tokens included).", ge=260)
    train_bytes: int = opt(20_000_000, "At most this many bytes of the training split are used to train the BPE.", gt=0)
    split_digits: bool = opt(False, "A newly trained BPE never merges digits: every digit is its own token (as "
                             "Llama and the arithmetic papers' models tokenize numbers; arithmetic is learned far "
                             "faster, experiments/README.md section 8).")


@dataclass
class DataConfig:
    sources: list[SourceConfig] = opt([], "Where the documents come from (a list of sources, all mixed by size).")
    tokenizer: TokenizerConfig = opt(TokenizerConfig, "Tokenizer to train or load.")
    prepared: Optional[str] = opt(
        None, "A dataset directory written by `stagewise data prepare`; when set, sources/tokenizer are ignored.")
    cache_dir: str = opt("data_cache", "Where prepared datasets are cached, keyed by a hash of sources and tokenizer.")
    val_fraction: float = opt(0.02, "Fraction of documents held out for validation (split by document).", gt=0, le=0.5)
    seq_len: int = opt(512, "Tokens per training sequence (the model predicts seq_len next tokens).", gt=0)


@dataclass
class OptimConfig:
    name: str = opt("adamw", "Optimizer.", choices=["adamw"])
    lr: float = opt(3e-3, "Peak learning rate.", gt=0)
    weight_decay: float = opt(0.1, "Decoupled weight decay; applied to matrices only, never to norms or embeddings.", ge=0)
    beta1: float = opt(0.9, "Adam beta1.", ge=0, lt=1)
    beta2: float = opt(0.95, "Adam beta2.", ge=0, lt=1)
    eps: float = opt(1e-8, "Adam epsilon.", gt=0)
    implementation: str = opt(
        "auto", "AdamW kernel: fused, foreach or for-loop; auto picks fused where the device supports it.",
        choices=["auto", "fused", "foreach", "for-loop"])


@dataclass
class ScheduleConfig:
    name: str = opt("cosine", "LR schedule after warmup; infinite is constant until a cooldown is triggered "
                    "(docs/continual.md).", choices=["cosine", "linear", "wsd", "constant", "infinite"])
    warmup_steps: int = opt(100, "Linear warmup from 0 to the peak LR over this many steps.", ge=0)
    min_lr_ratio: float = opt(0.1, "Final LR as a fraction of the peak (cosine, linear, wsd).", ge=0, le=1)
    decay_fraction: float = opt(0.2, "WSD only: fraction of all steps spent in the final linear decay.", gt=0, le=1)
    cooldown_steps: int = opt(100, "infinite only: steps of the linear cooldown from the peak to min_lr_ratio*peak.",
                              gt=0)
    cooldown_at_step: Optional[int] = opt(
        None, "infinite only: start the cooldown after this many steps (of the stage, in a staged recipe); null: "
        "only when the file RUN_DIR/COOLDOWN appears (staged recipes) or never.", ge=0)


@dataclass
class TrainConfig:
    steps: int = opt(1000, "Optimizer steps to train.", gt=0)
    batch_size: int = opt(16, "Sequences per micro-batch.", gt=0)
    grad_accum: int = opt(1, "Micro-batches accumulated per optimizer step.", gt=0)
    grad_clip: float = opt(1.0, "Clip the global gradient norm to this value; 0 disables clipping.", ge=0)
    objective: str = opt("causal-lm", "Training objective.", choices=["causal-lm"])
    compile: bool = opt(False, "torch.compile each transformer block (inductor, regional compilation): "
                        "1.09-1.17x tokens/s and 12-29% less peak memory on the CPU benchmark models, +2% at "
                        "the quickstart's size (bench/README.md), for a one-off compile of seconds to a minute; "
                        "losses match eager within 5e-3 over 50 steps (tests/test_cli.py).")


@dataclass
class LossScaleConfig:
    init_scale: float = opt(65536.0, "fp16-mixed: initial loss scale (a power of two keeps unscaling exact).", gt=0)
    growth_factor: float = opt(2.0, "fp16-mixed: multiply the scale by this after growth_interval clean steps.", gt=1)
    backoff_factor: float = opt(0.5, "fp16-mixed: multiply the scale by this after a non-finite gradient "
                                "(that step is skipped).", gt=0, lt=1)
    growth_interval: int = opt(2000, "fp16-mixed: consecutive clean steps before the scale grows.", gt=0)
    min_scale: float = opt(1.0, "fp16-mixed: the scale never backs off below this.", gt=0)
    max_scale: float = opt(16777216.0, "fp16-mixed: the scale never grows above this (2^24).", gt=0)


@dataclass
class FP8Config:
    scaling: str = opt("current", "fp8: per-tensor scale from this tensor's amax (current), from the amax history "
                       "of previous steps (delayed), or none (a plain saturating cast).",
                       choices=["current", "delayed", "none"])
    amax_history_len: int = opt(16, "fp8 delayed scaling: steps of amax history the scale is taken from.", gt=0)


@dataclass
class QuantConfig:
    activations: bool = opt(True, "Fake-quant modes: also quantise each swapped linear's input (ternary: int8 per "
                            "token); false quantises weights only.")
    gradients: bool = opt(False, "Fake-quant modes: also quantise the gradient of each swapped linear's output "
                          "in the backward.")
    group_size: Optional[int] = opt(None, "int4 only: elements per scale along a row; null: one scale per row.", gt=0)
    hadamard: bool = opt(False, "Fake-quant modes: rotate both matmul operands by a Hadamard matrix along the "
                         "contraction dimension before quantising (QuaRot).")


PRECISION_MODES = ["fp32", "tf32", "bf16-mixed", "fp16-mixed", "bf16-pure", "fp8", "mxfp4", "nvfp4", "int8", "int4",
                   "ternary"]


@dataclass
class PrecisionStageConfig:
    at_step: int = opt(1, "Switch after this many optimizer steps have completed.", gt=0)
    mode: str = opt("bf16-mixed", "The mode from then on (any precision.mode).", choices=PRECISION_MODES)
    optimizer_state: str = opt("keep", "keep AdamW's moments and step counts across the switch, or reset them.",
                               choices=["keep", "reset"])


@dataclass
class PrecisionConfig:
    mode: str = opt("bf16-mixed", "Numeric precision (docs/precision.md): fp32; tf32 (TF32 matmuls on CUDA, fp32 "
                    "on CPU); bf16-mixed (bf16 autocast compute, fp32 weights and optimizer states); fp16-mixed "
                    "(fp16 compute, fp32 master weights, dynamic loss scaling); bf16-pure (bf16 weights, gradients "
                    "and optimizer states, no fp32 copy); fp8 (linears in fp8, the rest bf16-mixed); mxfp4, nvfp4, "
                    "int8, int4, ternary (linears fake-quantised for QAT, the rest bf16-mixed).",
                    choices=PRECISION_MODES)
    keep_high_precision: list[str] = opt(
        ["tok_embeddings", "*norm*", "output"], "fp8 and fake-quant modes: module name patterns (fnmatch) whose "
        "linears are not swapped and stay bf16-mixed.")
    fp8: FP8Config = opt(FP8Config, "fp8 mode: scaling of the e4m3/e5m2 casts.")
    quant: QuantConfig = opt(QuantConfig, "Fake-quant modes (mxfp4, nvfp4, int8, int4, ternary).")
    schedule: list[PrecisionStageConfig] = opt(
        [], "Mode changes during the run, e.g. [{at_step: 800, mode: int4}]; options above apply to every mode.")
    loss_scale: LossScaleConfig = opt(LossScaleConfig, "Dynamic loss scaling (fp16-mixed only).")
    stochastic_rounding: bool = opt(False, "bf16-pure only: round each new weight to bf16 stochastically "
                                    "(unbiased) instead of to nearest.")
    kahan: bool = opt(False, "bf16-pure only: Kahan-compensated weight updates (a second bf16 buffer per weight "
                      "holds what rounding dropped; +2 bytes/parameter).")
    telemetry_every: int = opt(100, "Every N steps add precision telemetry (gradient underflow/subnormal/overflow "
                               "fractions, lost-update fraction) to metrics.jsonl; 0 disables.", ge=0)


@dataclass
class EvalConfig:
    every: int = opt(100, "Evaluate validation loss every N steps (and at the end); 0 only at the end.", ge=0)
    batches: int = opt(8, "Validation batches per evaluation (a fixed, deterministic subset).", gt=0)


@dataclass
class CheckpointConfig:
    every: int = opt(100, "Save a full training checkpoint every N steps (and at the end); 0 only at the end.", ge=0)
    keep_last: int = opt(3, "Keep only the newest N checkpoints.", gt=0)


@dataclass
class LogConfig:
    progress: str = opt("auto", "Progress display: a live bar on a terminal, plain lines otherwise (auto), "
                        "or force bar / plain / none.", choices=["auto", "bar", "plain", "none"])
    every: int = opt(10, "Print a plain progress line every N steps (when not showing a bar).", gt=0)


@dataclass
class SampleConfig:
    prompts: list[str] = opt([], "Prompts to sample from at the end of training (printed).")
    max_new_tokens: int = opt(120, "Tokens generated per prompt.", gt=0)
    temperature: float = opt(0.8, "Sampling temperature; 0 means greedy.", ge=0)
    top_k: int = opt(50, "Keep only the k most likely tokens; 0 disables.", ge=0)
    top_p: float = opt(1.0, "Nucleus sampling: keep the smallest set with this much probability.", gt=0, le=1)
    chat: Optional[bool] = opt(None, "Render each prompt as a user turn with the tokenizer's chat template and stop "
                               "at its end-of-turn tokens; null: when the last stage is sft or dpo.")


@dataclass
class DomainConfig:
    name: str = opt("", "Domain name: the metrics keys val_loss/<name> and mix/<name>, and forgetting.json.")
    weight: float = opt(1.0, "Mixture weight within the stage (normalised over the stage's domains); 0 makes "
                        "the domain validation-only.", ge=0)
    source: SourceConfig = opt(SourceConfig, "Where the domain's documents come from (one source, prepared "
                               "as its own dataset with the run's one tokenizer).")


STAGE_KINDS = ["lm", "sft", "dpo", "rl"]
CHAT_FORMATS = ["messages", "prompt-completion", "alpaca", "sharegpt"]


@dataclass
class ChatSourceConfig:
    kind: str = opt("jsonl", "Where conversations come from: JSONL or Parquet files, a local Hugging Face datasets "
                    "directory (save_to_disk), or a built-in set: python-docstrings (CPython stdlib functions: "
                    "signature and docstring -> body) or arithmetic (the sft.arithmetic section).",
                    choices=["jsonl", "parquet", "hf-dataset", "python-docstrings", "arithmetic"])
    path: Optional[str] = opt(None, "File or directory (jsonl, parquet, hf-dataset).")
    glob: Optional[str] = opt(None, "Filename pattern inside a directory; null takes every file of the kind.")
    format: Optional[str] = opt(None, "Row format; null detects it from the first row's keys (docs/sft_data.md).",
                                choices=CHAT_FORMATS)
    split: Optional[str] = opt(None, "hf-dataset only: the split of a DatasetDict (default train).")


@dataclass
class ArithmeticConfig:
    ops: list[str] = opt(["add"], "Operations: add, mul.")
    min_digits: int = opt(1, "Fewest digits of an operand.", gt=0)
    max_digits: int = opt(3, "Most digits of an operand.", gt=0)
    format: str = opt("plain", "Answer format (Lee et al. 2023, Teaching Arithmetic to Small Transformers): plain "
                      "digits, reversed digits, or a scratchpad of digit-wise steps ending in 'answer: N'.",
                      choices=["plain", "reversed", "scratchpad"])
    train_count: int = opt(10000, "Training problems.", gt=0)
    val_count: int = opt(200, "Validation problems (disjoint from training: held out by a hash of the operands).",
                         gt=0)
    seed: int = opt(0, "Seed of the generator.", ge=0)


@dataclass
class SFTConfig:
    data: list[ChatSourceConfig] = opt([], "Conversation sources (all used, in order).")
    val_fraction: float = opt(0.05, "File sources: fraction of rows held out for validation (by a hash of the "
                              "row); built-in sets have their own split.", gt=0, lt=1)
    train_on: str = opt("assistant", "Tokens that take a loss: assistant (every assistant turn, with its "
                        "end-of-turn token), last (only the final assistant turn; prompt/completion rows always "
                        "train only the completion), or all (every token of the rendered conversation).",
                        choices=["assistant", "last", "all"])
    loss: str = opt("ce", "ce: cross-entropy; dft: each token's loss weighted by its detached probability "
                    "(Dynamic Fine-Tuning, Wu et al. 2025); asft: dft plus asft_kl_weight * KL(initial model || "
                    "model) per token (Anchored SFT, Zhu et al. 2025; keeps a frozen copy of the initial model).",
                    choices=["ce", "dft", "asft"])
    asft_kl_weight: float = opt(0.1, "asft: weight of the KL anchor.", ge=0)
    packing: bool = opt(True, "Pack examples into data.seq_len rows by best-fit-decreasing, attention kept inside "
                        "each example and positions restarting per example; false: one example per row, padded "
                        "to the longest of a batch of similar lengths.")
    truncation: str = opt("truncate", "An example longer than data.seq_len + 1 tokens: truncate it, drop it, or "
                          "stop with an error naming its row.", choices=["truncate", "drop", "error"])
    arithmetic: ArithmeticConfig = opt(ArithmeticConfig, "The built-in arithmetic set.")
    docstrings_max_body_chars: int = opt(4000, "python-docstrings: skip functions whose body is longer.", gt=0)
    eval_generate: int = opt(64, "Verifiable data (arithmetic): validation problems answered by greedy generation "
                             "at every evaluation, reported as exact_match; 0 disables.", ge=0)
    eval_max_new_tokens: int = opt(64, "Tokens generated per exact-match problem at most.", gt=0)


PREFERENCE_LOSSES = ["sigmoid", "ipo", "hinge", "robust", "simpo", "orpo", "kto"]


@dataclass
class PreferenceSourceConfig:
    kind: str = opt("jsonl", "Where preference rows come from: JSONL or Parquet files, a local Hugging Face datasets "
                    "directory (save_to_disk), or a built-in set: arithmetic (chosen = the right answer, rejected = "
                    "a plausible wrong one; the dpo.arithmetic section) or python-docstrings (chosen = the real body, "
                    "rejected = the body of another function of the same module).",
                    choices=["jsonl", "parquet", "hf-dataset", "arithmetic", "python-docstrings"])
    path: Optional[str] = opt(None, "File or directory (jsonl, parquet, hf-dataset).")
    glob: Optional[str] = opt(None, "Filename pattern inside a directory; null takes every file of the kind.")
    split: Optional[str] = opt(None, "hf-dataset only: the split of a DatasetDict (default train).")


@dataclass
class DPOConfig:
    data: list[PreferenceSourceConfig] = opt([], "Preference sources (all used, in order): rows prompt/chosen/rejected "
                                             "(paired), or prompt/completion/label (unpaired, for kto; paired rows "
                                             "are split into one desirable and one undesirable example).")
    loss: str = opt("sigmoid", "sigmoid (DPO, Rafailov et al. 2023), ipo (Azar et al. 2023, log-ratios averaged per "
                    "token as TRL does), hinge (SLiC), robust (DPO under label noise label_noise, Chowdhury et al. "
                    "2024), simpo (reference-free, length-normalised with margin simpo_gamma, Meng et al. 2024), "
                    "orpo (reference-free odds ratio plus the chosen NLL, Hong et al. 2024), kto (unpaired, Ethayarajh "
                    "et al. 2024). docs/dpo.md gives each formula.", choices=PREFERENCE_LOSSES)
    beta: Optional[float] = opt(None, "beta of the loss (ORPO's lambda); null: 2.0 for simpo, 0.1 otherwise.", gt=0)
    label_noise: float = opt(0.1, "robust: the assumed probability epsilon that a pair's labels are flipped.",
                             ge=0, lt=0.5)
    simpo_gamma: float = opt(1.0, "simpo: the target reward margin gamma (the paper's gamma / beta = 0.5 with beta 2).",
                             ge=0)
    desirable_weight: float = opt(1.0, "kto: weight of the desirable examples' losses.", gt=0)
    undesirable_weight: float = opt(1.0, "kto: weight of the undesirable examples' losses.", gt=0)
    sft_weight: float = opt(0.0, "Add this times the chosen response's per-token NLL (RPO, Pang et al. 2024); pair "
                            "losses except orpo, which has its own.", ge=0)
    reference: str = opt("auto", "The reference policy (stated by `stagewise plan`): copy (a frozen copy of the stage's "
                         "start, stored in reference_dtype), adapters-off (a LoRA policy with its adapters switched "
                         "off: no second copy), precomputed (reference log-probs computed once before step 1 and "
                         "cached in data.cache_dir, keyed by the data and the reference weights' hash), none "
                         "(simpo, orpo). auto: none for simpo/orpo, adapters-off for an adapter stage, else copy.",
                         choices=["auto", "copy", "adapters-off", "precomputed", "none"])
    reference_dtype: str = opt("auto", "Storage of a copy or precomputing reference's matmul weights: bf16 (half the "
                               "memory of fp32; needs a bf16 compute precision) or fp32; auto: the stage's compute "
                               "dtype.", choices=["auto", "bf16", "fp32"])
    reference_cache: Optional[str] = opt(None, "precomputed: use this cache file (written by an earlier run); a file "
                                         "made from other data or other reference weights is refused.")
    packing: bool = opt(True, "Pack whole pairs into data.seq_len rows (attention kept inside each sequence); false: "
                        "one sequence per row, padded to the longest of similar lengths.")
    truncation: str = opt("truncate", "A prompt + response longer than data.seq_len + 1 tokens: cut the response's "
                          "end, drop the pair, or stop with an error naming its row.",
                          choices=["truncate", "drop", "error"])
    val_fraction: float = opt(0.05, "File sources: fraction of rows held out for validation (by a hash of the row).",
                              gt=0, lt=1)
    arithmetic: ArithmeticConfig = opt(ArithmeticConfig, "The built-in arithmetic preferences.")
    docstrings_max_body_chars: int = opt(4000, "python-docstrings: skip functions whose body is longer.", gt=0)
    eval_generate: int = opt(64, "Built-in arithmetic: validation problems answered by greedy generation at every "
                             "evaluation, reported as exact_match; 0 disables.", ge=0)
    eval_max_new_tokens: int = opt(64, "Tokens generated per exact-match problem at most.", gt=0)


@dataclass
class CountdownConfig:
    numbers: int = opt(3, "Numbers given per problem.", gt=1)
    max_number: int = opt(20, "Numbers are drawn from 1 .. max_number.", gt=1)
    use_all: bool = opt(False, "Each number must be used exactly once (else at most once).")


@dataclass
class RLConfig:
    task: str = opt("arithmetic", "Prompts and their verifier: arithmetic (exact match of the final answer; the "
                    "rl.arithmetic section), countdown (reach the target with the given numbers, checked by a safe "
                    "expression parser), reasoning-gym:NAME (a procedural dataset of the reasoning-gym package, if "
                    "installed), or a name given to stagewise.rl.register_task / register_reward from Python.")
    arithmetic: ArithmeticConfig = opt(ArithmeticConfig, "task arithmetic: operations, digits and answer format "
                                       "(train_count / val_count: the problems drawn from).")
    countdown: CountdownConfig = opt(CountdownConfig, "task countdown: the game's size.")
    format_reward: float = opt(0.0, "Reward of a wrong answer that is in the right format (0: exact match only).",
                               ge=0, le=1)
    train_problems: int = opt(10000, "Training prompts drawn from the task (a seeded order per pass).", gt=0)
    eval_problems: int = opt(64, "Validation prompts answered greedily at every evaluation: exact_match and "
                             "val_reward.", ge=0)
    prompts_per_rollout: int = opt(8, "Prompts per rollout.", gt=0)
    group_size: int = opt(8, "Completions sampled per prompt (G).", gt=0)
    max_new_tokens: int = opt(32, "Tokens generated per completion at most (and Dr. GRPO's length normaliser).",
                              gt=0)
    temperature: float = opt(1.0, "Sampling temperature of the rollouts (0: greedy).", ge=0)
    top_p: float = opt(1.0, "Nucleus sampling of the rollouts (1: off).", gt=0, le=1)
    top_k: int = opt(0, "Top-k sampling of the rollouts (0: off).", ge=0)
    epochs_per_rollout: int = opt(1, "Passes over each rollout.", gt=0)
    mini_batches: int = opt(1, "Optimizer steps per pass (each over 1/mini_batches of the rollout, in "
                            "train.grad_accum micro-batches).", gt=0)
    algorithm: str = opt("grpo", "How rewards become advantages: grpo (group-normalised), rloo (leave-one-out "
                         "baseline), remax (the greedy completion's reward as baseline), reinforce (the rollout's mean "
                         "reward as baseline).", choices=["grpo", "rloo", "remax", "reinforce"])
    scale_rewards: str = opt("group", "grpo: divide by the group's reward std (group), the rollout's (batch), or "
                             "not at all (none: Dr. GRPO).", choices=["group", "batch", "none"])
    mask: str = opt("clip", "Stabilization mask of the estimator: clip (PPO's trust region: no gradient where the "
                    "ratio left [1 - clip_eps, 1 + clip_eps_high] in the advantage's direction) or none.",
                    choices=["clip", "none"])
    denominator: str = opt("old", "Reference-policy denominator of the estimator: old (the sampling policy: PPO / "
                           "GRPO's importance ratio), current (the policy itself: REINFORCE, SFT), one (none: DFT).",
                           choices=["old", "current", "one"])
    clip_eps: float = opt(0.2, "Lower clip range epsilon.", gt=0, lt=1)
    clip_eps_high: Optional[float] = opt(None, "Upper clip range (DAPO's clip-higher uses 0.28); null: clip_eps.",
                                         gt=0)
    importance: str = opt("token", "Importance ratio per token, per sequence as exp(mean log-ratio) (GSPO), or per "
                          "sequence as exp(summed log-ratio) (TRL's RLOO).", choices=["token", "sequence", "sequence-sum"])
    loss_agg: str = opt("token-mean", "Loss aggregation: token-mean (every token of a step weighs the same), "
                        "seq-mean-token-mean (GRPO's paper), seq-mean-token-sum-norm (Dr. GRPO: token sums / "
                        "max_new_tokens).", choices=["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
    kl_beta: float = opt(0.0, "Weight of the KL to the reference policy (the stage's start); 0 loads no reference.",
                         ge=0)
    kl_estimator: str = opt("k3", "Per-token KL estimator: k1 (log-ratio) or k3 (exp(d) - d - 1, always >= 0).",
                            choices=["k1", "k3"])
    kl_in: str = opt("loss", "Where the KL goes: a loss term per token (GRPO) or a penalty on each sequence's reward "
                     "(summed over its tokens; PPO-RLHF, RLOO).", choices=["loss", "reward"])
    reference: str = opt("auto", "The reference policy of the KL: copy (a frozen copy, stored in reference_dtype) or "
                         "adapters-off (a LoRA policy with its adapters switched off); auto: adapters-off for an "
                         "adapter stage, else copy.", choices=["auto", "copy", "adapters-off"])
    reference_dtype: str = opt("auto", "A copy reference's matmul weights: bf16 (needs a bf16 compute precision), "
                               "fp32, or auto (the stage's compute dtype).", choices=["auto", "bf16", "fp32"])
    dynamic_sampling: str = opt("off", "Groups whose rewards all agree (advantage 0): keep them (off), drop them, or "
                                "resample further prompts until prompts_per_rollout informative groups are found "
                                "(DAPO).", choices=["off", "drop", "resample"])
    resample_rounds: int = opt(3, "resample: further sampling rounds per rollout at most.", ge=1)
    hybrid: str = opt("off", "hpt: a prompt whose rollouts succeed at most hpt_threshold of the time is trained by SFT "
                      "on the task's reference solution instead (Hybrid Post-Training, Lv et al. 2025).",
                      choices=["off", "hpt"])
    hpt_threshold: float = opt(0.0, "hpt: success rate at or below which a prompt gets SFT.", ge=0, lt=1)
    sync_every: int = opt(8, "Generation: tokens between host checks for finished rows.", gt=0)
    compile_decode: bool = opt(False, "Generation: run each decoding step through torch.compile (static shapes, "
                               "the whole cache attended, masked); pays a compilation once per batch size, so "
                               "it helps long generations of large batches, not tiny models.")


@dataclass
class AdapterConfig:
    kind: str = opt("none", "Parameter-efficient fine-tuning (docs/adapters.md): none trains every weight; lora adds "
                    "B @ A (rank r) to each target linear layer with the base frozen; dora also learns each output "
                    "row's magnitude (Liu et al. 2024).", choices=["none", "lora", "dora"])
    r: int = opt(16, "Rank of each adapter (the budget per layer for init eva).", gt=0)
    alpha: float = opt(32.0, "Scale: the adapter adds alpha / r * B @ A (alpha / sqrt(r) with rslora).", gt=0)
    dropout: float = opt(0.0, "Dropout on the adapter's input (training only).", ge=0, lt=1)
    target_modules: list[str] = opt(["all-linear"], "Layers that get an adapter: all-linear (every linear layer of "
                                    "the blocks, not the output head), Hugging Face Llama names (q_proj, k_proj, "
                                    "v_proj, o_proj, gate_proj, up_proj, down_proj, lm_head), stagewise names (wq, "
                                    "..., w1, w2, w3, output), or re:REGEX matched in full against the Hugging Face "
                                    "module path (re:model\\.layers\\.[0-3]\\..*_proj).")
    rslora: bool = opt(False, "Rank-stabilised scale alpha / sqrt(r) (Kalajdzievski 2023).")
    lora_plus_ratio: float = opt(1.0, "LoRA+ (Hayou et al. 2024): B's learning rate is this many times A's "
                                 "(the paper suggests 16); 1 is plain LoRA.", gt=0)
    init: str = opt("default", "default: A Kaiming-uniform, B = 0 (peft's default); gaussian: A ~ N(0, 1/r), B = 0; "
                    "pissa: the top-r singular vectors of W, residual frozen (Meng et al. 2024); olora: QR of W "
                    "(Buyukakyuz 2024); eva: right singular vectors of the layer inputs over init_batches, rank "
                    "redistributed by explained variance (Paischer et al. 2024); lora-ga: SVD of the gradient over "
                    "init_batches (Wang et al. 2024). Data-driven inits run once before step 1, seeded.",
                    choices=["default", "gaussian", "pissa", "olora", "eva", "lora-ga"])
    init_batches: int = opt(4, "eva / lora-ga: training batches their data pass reads (the training data order is "
                            "unchanged).", gt=0)
    eva_rho: float = opt(2.0, "eva: a layer may receive up to rho * r ranks from the budget (1: no redistribution).",
                         ge=1)
    base_quant: str = opt("none", "Store the frozen base weights of the adapted layers packed and dequantize them "
                          "per matmul (QLoRA): nf4 (4-bit NormalFloat, Dettmers et al. 2023), int8 or int4 (absmax "
                          "per block).", choices=["none", "nf4", "int8", "int4"])
    quant_block: int = opt(64, "base_quant: values per absmax block.", gt=0)
    double_quant: bool = opt(False, "base_quant nf4: quantize the block absmax values too (QLoRA's double "
                             "quantization, ~0.37 bits per parameter less).")


@dataclass
class StageConfig:
    name: str = opt("", "Stage name (forgetting.json, logs, RUN_DIR/stages/<name>/).")
    kind: str = opt("lm", "What the stage trains: lm (next-token prediction on its mixture) or sft (supervised "
                    "fine-tuning on chat data, the stage's sft section; docs/sft.md), dpo (preference optimisation, the "
                    "stage's dpo section; docs/dpo.md) or rl (RL with verifiable rewards, the stage's rl section; "
                    "docs/rl.md).", choices=STAGE_KINDS)
    steps: Optional[int] = opt(None, "Optimizer steps of this stage (set steps or tokens).", gt=0)
    tokens: Optional[int] = opt(None, "Token budget of this stage, rounded up to whole steps (set steps or tokens).",
                                gt=0)
    mixture: list[DomainConfig] = opt([], "The stage's data domains and their weights.")
    replay: float = opt(0.0, "Fraction of every batch drawn from the domains of earlier stages that this stage "
                        "does not train on (split evenly among them).", ge=0, lt=1)
    schedule: ScheduleConfig = opt(ScheduleConfig, "The stage's LR schedule over its own steps (re-warming, "
                                   "re-decaying); keys not given take the recipe's schedule section.")
    optim: OptimConfig = opt(OptimConfig, "The stage's optimizer settings; keys not given take the recipe's optim "
                             "section.")
    precision: Optional[str] = opt(None, "precision.mode of this stage; null keeps precision.mode.",
                                   choices=PRECISION_MODES)
    optimizer_state: str = opt("keep", "At the start of the stage keep AdamW's moments and step counts from the "
                               "previous stage, or reset them (ignored by the first stage and with init_from).",
                               choices=["keep", "reset"])
    init_from: Optional[str] = opt(None, "Start the stage from the weights of this stagewise run, checkpoint or "
                                   "exported model instead of the previous stage's final checkpoint.")
    sft: SFTConfig = opt(SFTConfig, "kind sft: the stage's data and loss; keys not given take the recipe's sft "
                         "section.")
    dpo: DPOConfig = opt(DPOConfig, "kind dpo: the stage's preference data, loss and reference; keys not given take "
                         "the recipe's dpo section.")
    rl: RLConfig = opt(RLConfig, "kind rl: the stage's task, rollouts and estimator; keys not given take the recipe's "
                       "rl section.")
    adapter: AdapterConfig = opt(AdapterConfig, "The stage's adapters (docs/adapters.md); not inherited from the "
                                 "recipe's adapter section: each stage says its own.")


@dataclass
class RunConfig:
    name: str = opt("run", "Run name; the run directory is out_dir/name.")
    out_dir: str = opt("runs", "Parent directory of run directories.")
    seed: int = opt(1337, "Seed for model init, data order and sampling.", ge=0)
    device: str = opt("auto", "auto (cuda if available, else cpu), cpu, cuda or cuda:N; under torchrun, auto and "
                      "cuda mean cuda:LOCAL_RANK.")
    threads: int = opt(0, "torch intra-op threads; 0 keeps torch's default. Bitwise resume needs the same count.", ge=0)
    kind: str = opt("lm", "What the run trains: lm (pre-training on data.sources), sft (supervised fine-tuning "
                    "on chat data, the sft section; docs/sft.md), dpo (preference optimisation, the dpo section; "
                    "docs/dpo.md) or rl (RL with verifiable rewards, the rl section; docs/rl.md). A recipe with stages "
                    "sets it per stage.", choices=STAGE_KINDS)
    init_from: Optional[str] = opt(
        None, "Start from these weights: a stagewise run, checkpoint or model directory, or a Hugging Face model "
        "directory (Llama, Mistral, Qwen2, Qwen3, Gemma 3). The architecture and tokenizer come from it (the "
        "model section and data.tokenizer are ignored); null trains from random initialisation.")
    model: ModelConfig = opt(ModelConfig, "Model architecture.")
    data: DataConfig = opt(DataConfig, "Training and validation data.")
    train: TrainConfig = opt(TrainConfig, "Training loop.")
    optim: OptimConfig = opt(OptimConfig, "Optimizer.")
    schedule: ScheduleConfig = opt(ScheduleConfig, "Learning-rate schedule.")
    precision: PrecisionConfig = opt(PrecisionConfig, "Numeric precision.")
    eval: EvalConfig = opt(EvalConfig, "Validation during training.")
    checkpoint: CheckpointConfig = opt(CheckpointConfig, "Checkpointing.")
    log: LogConfig = opt(LogConfig, "Progress display.")
    sample: SampleConfig = opt(SampleConfig, "Samples printed at the end of training.")
    sft: SFTConfig = opt(SFTConfig, "Supervised fine-tuning (kind sft; docs/sft.md).")
    dpo: DPOConfig = opt(DPOConfig, "Preference optimisation (kind dpo; docs/dpo.md).")
    rl: RLConfig = opt(RLConfig, "RL with verifiable rewards (kind rl; docs/rl.md).")
    adapter: AdapterConfig = opt(AdapterConfig, "Parameter-efficient fine-tuning: LoRA / DoRA adapters on a frozen, "
                                 "optionally quantized base (docs/adapters.md).")
    stages: list[StageConfig] = opt(
        [], "Continual pre-training (docs/continual.md): stages run in order, each from the previous one's final "
        "checkpoint; train.steps, data.sources and schedule/optim then come from the stages.")
