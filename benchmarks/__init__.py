"""The benchmark stage: what pruning buys a deployer, dense vs pruned, measured in one run.

Example:
    >>> from benchmarks.run import run_bench
    >>> report = run_bench("dense_dir", "build_out", out="bench_out")  # doctest: +SKIP
"""
