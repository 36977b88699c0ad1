"""Shared test set-up: CPU-only by default; `gpu` tests skip themselves without CUDA.

Without a GPU, Triton kernels run in its interpreter, which must be switched on before Triton is
first imported (diffusers may import it while fasterase loads), so it is set here, first.

Under pytest-xdist (`-n N`, the README's test command) each worker gets one torch thread, and so do
the processes the tests start: N workers of two threads each on N cores spin against each other.
"""
import atexit
import os
import shutil
import tempfile

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
# saliency maps and other caches of the run stay out of the user's ~/.cache
os.environ["FASTERASE_CACHE"] = tempfile.mkdtemp(prefix="fasterase-test-cache-")
atexit.register(shutil.rmtree, os.environ["FASTERASE_CACHE"], ignore_errors=True)

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
