"""Benchmark set-up: fixed thread count, and every figure tagged with the bytes it moves (GB/s)."""
import os

import pytest
import torch

THREADS = int(os.environ.get("FASTERASE_BENCH_THREADS", "2"))
torch.set_num_threads(THREADS)


@pytest.fixture
def measure(benchmark):
    """measure(fn, bytes_moved, setup=None, calls=1, **info): benchmark fn (after an untimed setup, if given,
    before every round) and record GB/s at the median time.  calls > 1 (GPU ops): a round runs fn that many
    times back to back and then waits for the GPU once, so the figure is the op's throughput on the GPU,
    not one call's latency including a host round trip; figures are per call (report.py divides)."""

    def run(fn, bytes_moved, rounds=5, setup=None, calls=1, **info):
        benchmark.extra_info.update(info, bytes=bytes_moved, threads=THREADS, calls=calls)

        def one_round():
            for _ in range(calls):
                fn()
            if info.get("device") == "cuda":
                torch.cuda.synchronize()

        result = benchmark.pedantic(one_round, setup=setup, rounds=rounds, warmup_rounds=1, iterations=1)
        benchmark.extra_info["GB/s"] = round(bytes_moved * calls / benchmark.stats.stats.median / 1e9, 2)
        return result

    return run


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
