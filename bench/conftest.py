"""Benchmark set-up: fixed thread count, and every figure tagged with the bytes it moves (GB/s)."""
import os

import pytest
import torch

THREADS = int(os.environ.get("FASTERASE_BENCH_THREADS", "2"))
torch.set_num_threads(THREADS)


@pytest.fixture
def measure(benchmark):
    """measure(fn, bytes_moved, setup=None, **info): benchmark fn (after an untimed setup, if given, before
    every round) and record GB/s at the median time."""

    def run(fn, bytes_moved, rounds=5, setup=None, **info):
        benchmark.extra_info.update(info, bytes=bytes_moved, threads=THREADS)
        result = benchmark.pedantic(fn, setup=setup, rounds=rounds, warmup_rounds=1, iterations=1)
        benchmark.extra_info["GB/s"] = round(bytes_moved / benchmark.stats.stats.median / 1e9, 2)
        return result

    return run


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
