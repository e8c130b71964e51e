"""The benchmark stage: what pruning buys a deployer, dense vs pruned, measured in one run.

Modules: ``timing`` (one generation's timings, interleaving, medians, ratios), ``memory`` (weights,
KV cache, disk, RSS and CUDA peaks), ``backends`` (torch, onnxruntime, vLLM runners), ``inputs``
(where each variant's checkpoints are; ONNX export of a variant that has none), ``environment``,
``run`` (``run_bench``), ``report`` (report.json, report.md, report.png); ``accuracy`` is the
perplexity sweep over pruning methods.

Example:
    >>> from faspx.benchmarks.run import run_bench
    >>> report = run_bench("dense_dir", "build_out", backends=("torch",), out="bench_out")  # doctest: +SKIP
"""
