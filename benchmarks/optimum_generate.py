"""Greedy generation with Optimum's ORTModelForCausalLM: run by the Optimum environment's Python.

optimum-onnx 0.1 needs transformers < 4.58, older than faspx's, so it lives in an environment of its
own (``make optimum``: ``.venv-optimum``) and faspx runs this script there:

    python optimum_generate.py ONNX_DIR PROMPTS.json NEW_TOKENS

PROMPTS.json holds a list of token-id lists; the greedy continuations (``NEW_TOKENS`` each, no stop at
end-of-sequence) are printed as one JSON list on stdout. Never imported by faspx.
"""

from __future__ import annotations

import json
import sys


def main() -> None:
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM

    onnx_dir, prompts_file, new_tokens = sys.argv[1], sys.argv[2], int(sys.argv[3])
    model = ORTModelForCausalLM.from_pretrained(onnx_dir, use_cache=True, use_io_binding=False)
    out = []
    for ids in json.load(open(prompts_file)):
        seq = torch.tensor([ids])
        # greedy by hand with Optimum's forward and KV cache, the argmax at every step (generate would
        # mask end-of-sequence to reach the length)
        result = model(input_ids=seq, attention_mask=torch.ones_like(seq), use_cache=True)
        new = [int(result.logits[0, -1].argmax())]
        past = result.past_key_values
        mask = torch.ones(1, seq.shape[1] + 1, dtype=torch.long)
        for _ in range(new_tokens - 1):
            result = model(input_ids=torch.tensor([[new[-1]]]), attention_mask=mask, past_key_values=past,
                           use_cache=True)
            new.append(int(result.logits[0, -1].argmax()))
            past = result.past_key_values
            mask = torch.ones(1, mask.shape[1] + 1, dtype=torch.long)
        out.append(new)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
