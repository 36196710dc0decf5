"""The one typed schema behind recipes, CLI overrides and the docs (the post-training sections are
in post_training.py).

Every recipe key is a field below. `stagewise.config.loader` validates YAML and
`--key.path=value` overrides against these dataclasses, and `docs/config.md` is
generated from the same `help` strings, so the three never drift apart.

Field metadata:
  help     one sentence shown in `stagewise run --help-config` and the docs
  gt/ge/le numeric bounds checked at load time
  choices  allowed values for a string field
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from stagewise.config._fields import opt
# The post-training sections (SFT and its chat sources, preferences, RL, the arithmetic set) are in
# post_training.py.
from stagewise.config.post_training import DPOConfig, RLConfig, SFTConfig




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


OPTIMIZERS = ["adamw", "adamw-8bit", "adamw-4bit", "galore", "galore-8bit", "fira", "apollo", "apollo-mini", "muon"]


@dataclass
class OptimConfig:
    name: str = opt("adamw", "Optimizer (docs/memory.md): adamw; adamw-8bit / adamw-4bit (block-wise quantized "
                    "moments); galore / galore-8bit (Adam in an SVD subspace of each covered matrix's gradient); fira "
                    "(GaLore plus the scaled residual); apollo / apollo-mini (random projection, channel- or tensor-wise "
                    "gradient scaling); muon (Newton-Schulz orthogonalised momentum). The low-rank kinds and muon apply "
                    "to the matrices named by optim.targets; every other parameter takes AdamW.",
                    choices=OPTIMIZERS)
    lr: float = opt(3e-3, "Peak learning rate.", gt=0)
    weight_decay: float = opt(0.1, "Decoupled weight decay; applied to matrices only, never to norms or embeddings.", ge=0)
    beta1: float = opt(0.9, "Adam beta1.", ge=0, lt=1)
    beta2: float = opt(0.95, "Adam beta2.", ge=0, lt=1)
    eps: float = opt(1e-8, "Adam epsilon.", gt=0)
    implementation: str = opt(
        "auto", "AdamW kernel: fused, foreach or for-loop; auto picks fused where the device supports it.",
        choices=["auto", "fused", "foreach", "for-loop"])
    targets: list[str] = opt(["attention", "feed_forward"], "galore, galore-8bit, fira, apollo, apollo-mini, muon: "
                             "the 2-D weights whose parameter names contain one of these strings (default: every "
                             "attention and MLP matrix); embeddings, the output head, norms and other parameters "
                             "take AdamW.")
    rank: Optional[int] = opt(None, "galore, galore-8bit, fira, apollo: rank of the gradient projection (capped at "
                              "each matrix's shorter side); null: model.d_model / 4 (GaLore's setting). apollo-mini "
                              "is rank 1.", gt=0)
    update_proj_gap: int = opt(200, "galore, galore-8bit, fira, apollo, apollo-mini: steps between projection "
                               "refreshes (an SVD of the gradient, or a new random matrix).", gt=0)
    proj_scale: Optional[float] = opt(None, "Scale of the projected update: galore/galore-8bit/fira multiply by it "
                                      "(null: 0.25), apollo/apollo-mini by its square root (null: 1 and 128).", gt=0)
    proj_side: str = opt("auto", "Which side of an m x n gradient is projected: auto (the shorter one: right when "
                         "m >= n, as GaLore does), left or right.", choices=["auto", "left", "right"])
    scale_type: Optional[str] = opt(None, "apollo, apollo-mini: gradient scaling per channel or per tensor; null: "
                                    "channel for apollo, tensor for apollo-mini.", choices=["channel", "tensor"])
    limiter: bool = opt(True, "fira, apollo, apollo-mini: the norm-growth limiter (the scaled update's norm grows "
                        "at most 1.01x per step).")
    muon_momentum: float = opt(0.95, "muon: momentum of the Muon half.", ge=0, lt=1)
    muon_nesterov: bool = opt(True, "muon: Nesterov momentum.")
    muon_ns_steps: int = opt(5, "muon: Newton-Schulz iterations.", gt=0)
    muon_lr_adjust: str = opt("match-rms-adamw", "muon: per-matrix lr adjustment; match-rms-adamw scales Muon's "
                              "step to AdamW's update RMS (0.2 sqrt(max(m, n))), so optim.lr serves both halves; "
                              "original: sqrt(max(1, m / n)) (Keller Jordan's).",
                              choices=["match-rms-adamw", "original"])


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
    batch_size: int = opt(16, "Sequences per micro-batch; under torchrun the global micro-batch, of which each "
                          "rank takes batch_size / world size rows.", gt=0)
    grad_accum: int = opt(1, "Micro-batches accumulated per optimizer step.", gt=0)
    grad_clip: float = opt(1.0, "Clip the global gradient norm to this value; 0 disables clipping.", ge=0)
    objective: str = opt("causal-lm", "Training objective.", choices=["causal-lm"])
    compile: bool = opt(False, "torch.compile each transformer block (inductor, regional compilation): "
                        "1.09-1.17x tokens/s and 12-29% less peak memory on the CPU benchmark models, +2% at "
                        "the quickstart's size (bench/README.md), for a one-off compile of seconds to a minute; "
                        "losses match eager within 5e-3 over 50 steps (tests/test_cli.py).")
    activation_checkpointing: str = opt(
        "none", "Recompute block activations in the backward instead of keeping them (docs/memory.md): full (a "
        "block keeps only its input; about one more forward per step), selective (keeps its matmul and attention "
        "outputs, recomputes norms, RoPE and activations: no GEMM replayed) or none. Gradients are bitwise "
        "unchanged.", choices=["none", "full", "selective"])
    checkpoint_every: int = opt(1, "activation_checkpointing: checkpoint every k-th block (blocks 0, k, 2k, ...).",
                                gt=0)


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
class MemoryConfig:
    probe: bool = opt(True, "Measure the memory of one step by component (weights, gradients, optimizer states, "
                      "activations, the loss's working set, the tracked peak) beside the plan's prediction, in "
                      "RUN_DIR/memory.json (docs/memory.md); that step runs slower. Skipped with train.compile.")
    limit: Optional[str] = opt(
        "auto", "Before the first step, stop when the predicted peak exceeds this: auto (the device's memory: CUDA "
        "total memory, on CPU MemAvailable when the run starts), a size such as 8GiB or 512MiB, or null (never "
        "check). The error names settings that would fit.")


@dataclass
class CheckpointConfig:
    every: int = opt(100, "Save a full training checkpoint every N steps (and at the end); 0 only at the end.", ge=0)
    keep_last: int = opt(3, "Keep only the newest N checkpoints.", gt=0)
    async_save: bool = opt(False, "Write checkpoints in a background thread (torch.distributed.checkpoint.async_save) "
                           "from a copy of the state taken at the step: training continues while the files are "
                           "written; each is published once complete (the run's last one is written at once).")


@dataclass
class SpikeConfig:
    action: str = opt("none", "Loss-spike guard (docs/guide.md, Loss spikes): rollback keeps an in-memory copy of the "
                      "train state (CPU memory: weights + optimizer state again) and, when a step's loss spikes or "
                      "steps are non-finite several times in a row, restores it and skips the batches drawn since, "
                      "recorded in metrics.jsonl and the train state so a resume replays it; none disables.",
                      choices=["none", "rollback"])
    snapshot_every: int = opt(50, "Take the snapshot every N steps (also at every checkpoint, at the stage's start or "
                              "resume, and after a precision switch); a rollback returns to the newest.", gt=0)
    window: int = opt(50, "Steps of recent training loss the spike threshold is computed over.", ge=5)
    threshold: float = opt(6.0, "A spike is a loss above median + threshold x 1.4826 x MAD of the window (a robust "
                           "z-score over the window's median absolute deviation) that also exceeds min_rise.", gt=0)
    min_rise: float = opt(0.1, "A spike must also be at least this fraction above the window's median (so that a "
                          "flat curve's tiny MAD does not flag noise).", ge=0)
    min_history: int = opt(10, "Steps of loss the window needs before spikes are judged (after a start, resume or "
                           "rollback the window is what it was at the snapshot).", ge=2)
    nonfinite_steps: int = opt(3, "Roll back after this many consecutive steps with a non-finite loss or (without "
                               "loss scaling) a non-finite gradient; each such step's update is skipped anyway.",
                               gt=0)
    max_rollbacks: int = opt(5, "Stop the run (one line, exit non-zero, checkpoints intact) after this many rollbacks "
                             "in one stage: the data or the settings, not one batch, are the problem.", gt=0)


@dataclass
class ParallelConfig:
    strategy: str = opt("auto", "How several processes started by torchrun train (docs/distributed.md): ddp (each "
                        "rank holds the model, gradients averaged), fsdp2 (parameters, gradients and AdamW states "
                        "sharded over all ranks), hsdp (sharded within parallel.shard ranks, replicated across "
                        "parallel.replicate groups), auto (ddp under torchrun with more than one process) or none. "
                        "A single process ignores it, so a run resumes at any world size.",
                        choices=["auto", "none", "ddp", "fsdp2", "hsdp"])
    replicate: int = opt(0, "hsdp: replica groups (>= 2); replicate x shard must equal the number of ranks.", ge=0)
    shard: int = opt(0, "hsdp: ranks each group shards over (>= 2); 0: world size / replicate.", ge=0)
    reshard_after_forward: bool = opt(True, "fsdp2/hsdp: free each block's gathered weights after its forward "
                                      "(gathered again for the backward): less memory, one more all-gather per block.")
    backend: str = opt("auto", "torch.distributed backend: auto (nccl on CUDA, gloo on CPU), gloo or nccl.",
                       choices=["auto", "gloo", "nccl"])
    timeout_s: int = opt(600, "Seconds a collective waits for the other ranks before the job fails.", gt=0)


@dataclass
class LogConfig:
    progress: str = opt("auto", "Progress display: a live bar on a terminal, plain lines otherwise (auto), "
                        "or force bar / plain / none.", choices=["auto", "bar", "plain", "none"])
    every: int = opt(10, "Print a plain progress line every N steps (when not showing a bar).", gt=0)
    to: list[str] = opt(["jsonl"], "Where metrics go: jsonl (RUN_DIR/metrics.jsonl, always written), tensorboard "
                        "(RUN_DIR/tensorboard), wandb (offline: RUN_DIR/wandb), mlflow (log.mlflow_uri); each "
                        "tracker is an extra: pip install 'stagewise[NAME]' (docs/trackers.md). `log: [..]` is "
                        "short for `log: {to: [..]}`.")
    project: str = opt("stagewise", "The wandb project and the mlflow experiment the run is logged under.")
    run_name: Optional[str] = opt(None, "The tracker run's name; null: the recipe's name.")
    mlflow_uri: Optional[str] = opt(None, "MLflow tracking store (a sqlite:/// URI or a local directory); null: "
                                    "sqlite:///RUN_DIR/mlflow.db.")


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
    seed: int = opt(1337, "Seed for model init, data order and sampling.", ge=0, le=2**32 - 1)
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
    spikes: SpikeConfig = opt(SpikeConfig, "Loss-spike and non-finite-step rollback from an in-memory snapshot.")
    memory: MemoryConfig = opt(MemoryConfig, "Memory plan checks and measurement (docs/memory.md).")
    parallel: ParallelConfig = opt(ParallelConfig, "Training on several processes under torchrun "
                                   "(docs/distributed.md).")
    log: LogConfig = opt(LogConfig, "Progress display and experiment trackers.")
    sample: SampleConfig = opt(SampleConfig, "Samples printed at the end of training.")
    sft: SFTConfig = opt(SFTConfig, "Supervised fine-tuning (kind sft; docs/sft.md).")
    dpo: DPOConfig = opt(DPOConfig, "Preference optimisation (kind dpo; docs/dpo.md).")
    rl: RLConfig = opt(RLConfig, "RL with verifiable rewards (kind rl; docs/rl.md).")
    adapter: AdapterConfig = opt(AdapterConfig, "Parameter-efficient fine-tuning: LoRA / DoRA adapters on a frozen, "
                                 "optionally quantized base (docs/adapters.md).")
    stages: list[StageConfig] = opt(
        [], "Continual pre-training (docs/continual.md): stages run in order, each from the previous one's final "
        "checkpoint; train.steps, data.sources and schedule/optim then come from the stages.")
