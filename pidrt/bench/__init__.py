"""`pidrt bench`: latency, throughput, memory and flops of every backend x identity method x batch
size, against diffusers' eager pipeline on the same weights, plus enrollment costs
(docs/benchmarking.md).

    from pidrt.bench import BenchConfig, run_bench
    result = run_bench(BenchConfig(steps=10, iterations=3))
"""

from pidrt.bench.config import BenchConfig, EnrollBenchConfig


def run_bench(config: BenchConfig, write: bool = True, log=print) -> dict:
    from pidrt.bench.harness import run_bench as _run

    return _run(config, write=write, log=log)


__all__ = ["BenchConfig", "EnrollBenchConfig", "run_bench"]
