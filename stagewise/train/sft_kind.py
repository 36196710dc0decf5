"""The `sft` stage kind: chat conversations -> packed (or padded) batches -> the SFT objective.

Its evaluation reports, at every eval step: val_loss / val_bpb on the stage's own validation
conversations (assistant tokens; also as val_loss/<stage name> for forgetting.json), for
verifiable data (arithmetic) exact_match (also exact_match/<stage name>): the share of
sft.eval_generate validation problems whose greedy answer the checker accepts, and everything
earlier stages introduced (pre-training domains, earlier sft data and tasks: train/carried.py),
so forgetting is measured across every boundary.
"""

from __future__ import annotations

import torch

from stagewise import rundir
from stagewise.data.arithmetic import check
from stagewise.data.packing import PackedSource, PaddedSource, eval_rows
from stagewise.eval import evaluate
from stagewise.generate import generate_batch
from stagewise.model import Transformer
from stagewise.objectives import build_objective
from stagewise.train import stages as plan
from stagewise.train.carried import earlier_evaluator, own_scores, sft_data, task_scorer
from stagewise.train.stage import Stage


def sft_config(cfg, index: int):
    return cfg.stages[index].sft if cfg.stages else cfg.sft


def sft_stage(run, index: int, start: int) -> Stage:
    cfg = plan.stage_config(run.cfg, index)
    sft, name = sft_config(run.cfg, index), plan.stage_name(run.cfg, index)
    B, T = cfg.train.batch_size, cfg.data.seq_len
    where = f"stages[{index}].sft" if run.cfg.stages else "sft"
    data = sft_data(run, index, T)
    pad = run.tokenizer.eos_id
    kind = PackedSource if sft.packing else PaddedSource
    source = kind(data.train, T, B, cfg.seed, pad, stage=index, what=f"{where}.data")
    context = {"reference": _reference(run, cfg, index)} if sft.loss == "asft" else {}
    objective = build_objective("sft", sft, context)
    val = eval_rows(data.val, T, B, cfg.eval.batches, pad)
    earlier = earlier_evaluator(run, index, cfg)
    score = task_scorer(run, index, T)

    def evaluate_stage(model, precision) -> dict:
        res = evaluate(model, val, precision, token_bytes=run.tokenizer.token_bytes, objective=objective)
        out = {"val_loss": res["loss"], "val_bpb": res["bits_per_byte"]}
        if run.staged:
            out[f"val_loss/{name}"], out[f"val_bpb/{name}"] = out["val_loss"], out["val_bpb"]
        if earlier is not None:
            out.update(earlier(model, precision))
        if score is not None:
            out.update(own_scores(score(model, precision), name, run.staged))
        return out

    return Stage(**plan.common_fields(run.cfg, index, start, run.run_dir), kind="sft", cfg=cfg, source=source,
                 objective=objective, evaluate=evaluate_stage, run_dir=run.run_dir,
                 flops_seq_len=T)


def _reference(run, cfg, index: int) -> torch.nn.Module:
    """The frozen initial model of an asft stage: init_from's weights, or the previous stage's final ones."""
    source = plan.base_source(run.cfg, run.run_dir, index)
    assert source is not None, "the loader requires init_from for asft without an earlier stage"
    mcfg, state, _, _ = rundir.load_init_source(source)
    ref = Transformer(mcfg)
    rundir.load_weights(ref, state, f"asft reference {source}")
    ref.requires_grad_(False)
    return ref.eval()


@torch.no_grad()
def exact_match(model, precision, tokenizer, template, problems: list, max_new_tokens: int,
                batch_size: int = 64) -> float:
    """Share of problems whose greedy completion the arithmetic checker accepts (batched generation)."""
    was_training = model.training
    model.eval()
    stop = template.stop_ids(tokenizer)
    prompts = [template.prompt_ids(tokenizer, [{"role": "user", "content": p.prompt}]) for p in problems]
    right = 0
    with precision.inference():
        for s in range(0, len(prompts), batch_size):
            outs = generate_batch(model, prompts[s:s + batch_size], max_new_tokens, stop_ids=stop).tokens
            right += sum(check(tokenizer.decode(ids), p) for ids, p in zip(outs, problems[s:s + batch_size]))
    model.train(was_training)
    return right / len(problems)
