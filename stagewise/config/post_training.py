"""Post-training sections of the schema: SFT, preference optimisation and RL (and their data).

Split from schema.py only for size; schema.py imports every name here, so `stagewise.config.schema`
remains the one place recipes are typed against.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from stagewise.config._fields import opt

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
