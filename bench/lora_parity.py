"""Does peft load a stagewise adapter with stagewise's numbers? (`make lora` runs this after the recipe.)

    python bench/lora_parity.py HF_BASE PEFT_ADAPTER STAGEWISE_MODEL [TOLERANCE]

HF_BASE: `stagewise export-hf` of the base; PEFT_ADAPTER: `stagewise export-peft` of the run;
STAGEWISE_MODEL: the run's final/ (merged weights) or its run directory (the newest checkpoint, base +
adapters as trained). Prints the largest |logit difference| of peft.PeftModel.from_pretrained against
stagewise on 2 x 64 fixed random tokens in fp32, and the largest change the adapter makes (so a zero
adapter cannot pass unnoticed); exits 1 above TOLERANCE (default 1e-4: the run as trained; merged
weights reorder the fp32 arithmetic, W x + s B (A x) against (W + s B A) x, which on gemma-3-270m's
logits of magnitude ~70 measured 1.75e-4, so `make lora` checks final/ at 1e-3).
"""

from __future__ import annotations

import sys

import torch


def main() -> int:
    import peft
    import transformers

    from stagewise import rundir

    hf_base, adapter, ours_path = sys.argv[1:4]
    tolerance = float(sys.argv[4]) if len(sys.argv) > 4 else 1e-4
    base = transformers.AutoModelForCausalLM.from_pretrained(hf_base, dtype=torch.float32).eval()
    tokens = torch.randint(0, base.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = base(input_ids=tokens).logits
        theirs = peft.PeftModel.from_pretrained(base, adapter).eval()(input_ids=tokens).logits
        ours = rundir.load_model(ours_path, torch.device("cpu"))[0](tokens)
    diff = (theirs - ours).abs().max().item()
    effect = (theirs - plain).abs().max().item()
    print(f"peft vs stagewise: max |logit diff| {diff:.3g} over {tokens.numel()} tokens (fp32); "
          f"the adapter itself moves logits by up to {effect:.3g}")
    return 0 if diff <= tolerance and effect > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
