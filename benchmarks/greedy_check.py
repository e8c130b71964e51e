"""Greedy tokens of one model in every runtime faspx serves it with, against transformers' (float32).

    python -m faspx.benchmarks.greedy_check --build OUT [--new-tokens 32] [--json FILE]

``OUT`` is a faspx build output (``hf/``, optionally ``onnx/``). transformers runs ``hf/``; vLLM (its
own environment, ``make vllm``) runs ``hf/`` too; onnxruntime, onnxruntime-genai and Optimum's
ORTModelForCausalLM (its own environment, ``make optimum``) run ``onnx/``. Each runtime's
tokens for the same prompts are compared with transformers' token for token; a runtime that is not
available here is listed with the reason. The prompts are fixed so that runs compare.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from faspx.exporters.genai import genai_generate

PROMPTS = ("The capital of France is", "In a hole in the ground there lived",
           "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n")


def transformers_tokens(hf_dir: Path, prompt_ids: list[list[int]], new_tokens: int) -> list[list[int]]:
    """Greedy continuations in transformers (float32, one prompt at a time, the argmax at every step:
    no stop at end-of-sequence, as the other runtimes are asked)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for ids in prompt_ids:
            seq = list(ids)
            for _ in range(new_tokens):
                seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
            out.append(seq[len(ids):])
    return out


def check(build: Path, new_tokens: int = 32) -> dict:
    """Every available runtime's greedy tokens for PROMPTS, and whether they equal transformers'."""
    from transformers import AutoTokenizer

    from faspx.benchmarks.vllm_client import VllmEngine, unavailable_reason

    hf = build / "hf" if (build / "hf").is_dir() else build
    tokenizer = AutoTokenizer.from_pretrained(hf)
    prompt_ids = [tokenizer(p).input_ids for p in PROMPTS]
    reference = transformers_tokens(hf, prompt_ids, new_tokens)
    result = {"build": str(build), "new_tokens": new_tokens, "prompts": list(PROMPTS),
              "transformers": reference, "runtimes": {}}
    reason = unavailable_reason()
    if reason is None:
        with VllmEngine(hf, max_len=max(len(p) for p in prompt_ids) + new_tokens + 8) as engine:
            tokens, _ = engine.generate(prompt_ids, new_tokens, ignore_eos=True)
            result["runtimes"]["vllm"] = {"version": engine.info.get("vllm"), "tokens": tokens}
    else:
        result["runtimes"]["vllm"] = {"unavailable": reason}
    if (build / "onnx" / "model.onnx").exists():
        from faspx.exporters.ort_runtime import OnnxDecoder

        decoder = OnnxDecoder(build / "onnx", device="cpu")
        tokens = [decoder.generate([ids], max_new_tokens=new_tokens, eos_token_id=[])[0, len(ids):].tolist()
                  for ids in prompt_ids]
        result["runtimes"]["onnxruntime"] = {"tokens": tokens}
    else:
        result["runtimes"]["onnxruntime"] = {"unavailable": f"{build} has no onnx/model.onnx"}
    result["runtimes"]["onnxruntime-genai"] = genai_tokens(build / "onnx", prompt_ids, new_tokens)
    from faspx.benchmarks.optimum_client import optimum_greedy, optimum_python

    if optimum_python() is not None and (build / "onnx" / "model.onnx").exists():
        result["runtimes"]["optimum"] = {"tokens": optimum_greedy(build / "onnx", prompt_ids, new_tokens)}
    else:
        result["runtimes"]["optimum"] = {"unavailable": "no Optimum environment (make optimum) or no onnx/"}
    for entry in result["runtimes"].values():
        if "tokens" in entry:
            entry["equal_to_transformers"] = entry["tokens"] == reference
            entry["first_difference"] = [next((i for i, (a, b) in enumerate(zip(t, r, strict=True)) if a != b), None)
                                         for t, r in zip(entry["tokens"], reference, strict=True)]
    return result


def genai_tokens(onnx_dir: Path, prompt_ids: list[list[int]], new_tokens: int) -> dict:
    """Greedy continuations in onnxruntime-genai (the export's genai_config.json), or why it cannot run."""
    try:
        import onnxruntime_genai as og
    except ImportError:
        return {"unavailable": "onnxruntime-genai is not installed (pip install faspx[genai])"}
    if not (onnx_dir / "genai_config.json").exists():
        return {"unavailable": f"{onnx_dir} has no genai_config.json (an OPT export, or an older one)"}
    return {"version": og.__version__, "tokens": genai_generate(onnx_dir, prompt_ids, new_tokens)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build", type=Path, required=True)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    result = check(args.build, args.new_tokens)
    for name, entry in result["runtimes"].items():
        print(f"{name}: {entry.get('equal_to_transformers', entry.get('unavailable'))}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
