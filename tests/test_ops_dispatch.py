"""Backend choice: automatic order, FASTERASE_BACKEND / use_backend overrides, fallback without fasterase._C,
and the CUDA sources compiling with nvcc where it exists."""
import glob
import importlib
import importlib.util
import os
import shutil
import subprocess
import sys

import pytest
import torch

from fasterase import ops


def test_env_var_forces_a_backend(monkeypatch):
    monkeypatch.setenv("FASTERASE_BACKEND", "reference")
    ops.paired_noise_loss(torch.randn(2, 3), None, torch.randn(2, 3), torch.randn(2, 3), 1.0)
    assert ops.last_backend("paired_noise_loss") == "reference"
    monkeypatch.setenv("FASTERASE_BACKEND", "fastest")
    with pytest.raises(ValueError, match="valid: cuda, triton, cpp, reference"):
        ops.paired_noise_loss(torch.randn(2, 3), None, torch.randn(2, 3), torch.randn(2, 3), 1.0)


def test_forcing_a_backend_the_device_cannot_run_is_an_error():
    with ops.use_backend("cuda"), pytest.raises(RuntimeError, match="available: "):
        ops.rank_one_update([torch.randn(3, 4)], torch.randn(4), torch.randn(4))
    with pytest.raises(ValueError, match="unknown backend"):
        with ops.use_backend("numpy"):
            pass


def test_automatic_choice_prefers_native_on_cpu():
    backends = ops.available_backends("cpu")
    assert backends[-1] == "reference"
    ops.paired_noise_loss(torch.randn(2, 3), None, torch.randn(2, 3), torch.randn(2, 3), 1.0)
    expected = "cpp" if importlib.util.find_spec("fasterase._C") is not None else "reference"
    assert backends[0] == expected and ops.last_backend("paired_noise_loss") == expected


def test_missing_extension_falls_back_with_one_warning():
    """In a fresh interpreter where `import fasterase._C` fails: importing works, ops fall back to the
    reference (never the test-only Triton interpreter), and the warning is one line, given once."""
    script = (
        "import sys, warnings; sys.modules['fasterase._C'] = None\n"
        "warnings.simplefilter('always')\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    import torch, fasterase.ops as ops\n"
        "    for _ in range(2):\n"
        "        ops.masked_adamw(torch.randn(10), torch.randn(10), torch.zeros(10), torch.zeros(10), torch.zeros(1), lr=1e-3)\n"
        "msgs = [str(w.message) for w in caught if 'fasterase._C' in str(w.message)]\n"
        "assert ops.last_backend('masked_adamw') == 'reference', ops.last_backend('masked_adamw')\n"
        "assert len(msgs) == 1 and '\\n' not in msgs[0], msgs\n"
    )
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_cuda_sources_compile_with_nvcc(tmp_path):
    root = os.path.join(os.path.dirname(__file__), "..", "csrc", "cuda")
    for source in sorted(glob.glob(os.path.join(root, "*.cu"))):
        out = tmp_path / (os.path.basename(source) + ".o")
        result = subprocess.run(["nvcc", "-std=c++17", "-O1", "--fmad=false", "-arch=sm_80", "-c", source, "-o", str(out)],
                                capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
