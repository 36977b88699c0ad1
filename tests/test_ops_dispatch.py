"""Backend choice: automatic order (verified backends only), FASTERASE_BACKEND / use_backend overrides,
fallback without fasterase._C; setup.py's decision to build the CUDA kernels, and the CUDA sources
compiling with setup.py's nvcc flags where nvcc exists."""
import glob
import importlib
import importlib.util
import os
import shutil
import subprocess
import sys

import pytest
import torch

from fasterase import UserError, ops
from fasterase.ops import _dispatch
from op_testing import GPU_BACKENDS, require_built

ROOT = os.path.join(os.path.dirname(__file__), "..")


def load_setup_py():
    """setup.py as a module (its setup() call runs only as __main__, as pip runs it)."""
    spec = importlib.util.spec_from_file_location("fasterase_setup", os.path.join(ROOT, "setup.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_env_var_forces_a_backend(monkeypatch):
    monkeypatch.setenv("FASTERASE_BACKEND", "reference")
    ops.paired_noise_loss(torch.randn(2, 3), None, torch.randn(2, 3), torch.randn(2, 3), 1.0)
    assert ops.last_backend("paired_noise_loss") == "reference"
    monkeypatch.setenv("FASTERASE_BACKEND", "fastest")
    with pytest.raises(UserError, match="valid: cuda, triton, cpp, reference"):
        ops.paired_noise_loss(torch.randn(2, 3), None, torch.randn(2, 3), torch.randn(2, 3), 1.0)


def test_forcing_a_backend_the_device_cannot_run_is_an_error():
    with ops.use_backend("cuda"), pytest.raises(UserError, match="available: "):
        ops.rank_one_update([torch.randn(3, 4)], torch.randn(4), torch.randn(4))
    with pytest.raises(UserError, match="unknown backend"):
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


def test_unverified_backends_are_not_chosen_on_cuda(monkeypatch):
    """With every backend built for a GPU, the automatic choice there is the fastest one listed as
    verified on "cuda" (the reference when none is); FASTERASE_BACKEND opts in to an unverified one."""
    monkeypatch.setattr(_dispatch, "_runs_on", lambda backend, device: True)
    cuda = torch.device("cuda")
    assert ops.available_backends(cuda) == ["cuda", "triton", "cpp", "reference"]
    assert _dispatch.VERIFIED["cuda"] == ("cuda",)  # passed `pytest -m gpu` on an H200; Triton did not
    assert _dispatch.select("rank_one_update", cuda) == "cuda"
    monkeypatch.setattr(_dispatch, "_runs_on", lambda backend, device: backend != "cuda")  # _C without CUDA
    assert _dispatch.select("rank_one_update", cuda) == "reference"
    monkeypatch.setattr(_dispatch, "_runs_on", lambda backend, device: True)
    monkeypatch.setitem(_dispatch.VERIFIED, "cuda", ())
    assert _dispatch.select("rank_one_update", cuda) == "reference"
    monkeypatch.setenv("FASTERASE_BACKEND", "triton")
    assert _dispatch.select("rank_one_update", cuda) == "triton"
    monkeypatch.delenv("FASTERASE_BACKEND")
    monkeypatch.setitem(_dispatch.VERIFIED, "cuda", ("triton", "cuda"))
    assert _dispatch.select("rank_one_update", cuda) == "cuda"  # the fastest verified one
    assert ops.default_backend("mps") == "reference"  # a device type with nothing verified


def test_cpu_choice_is_the_verified_cpp_backend_never_the_interpreter(monkeypatch):
    monkeypatch.setattr(_dispatch, "_runs_on", lambda backend, device: backend in ("triton", "reference"))
    assert ops.available_backends("cpu") == ["triton", "reference"]
    assert ops.default_backend("cpu") == "reference"
    monkeypatch.setattr(_dispatch, "_runs_on", lambda backend, device: True)
    assert ops.default_backend("cpu") == "cpp"


def test_gpu_tests_fail_when_an_expected_backend_is_not_built(monkeypatch):
    """The GPU op tests run every backend a GPU install builds and fail (not pass empty) on a missing one."""
    assert GPU_BACKENDS == ("cuda", "triton")
    monkeypatch.setattr(_dispatch, "_runs_on", lambda backend, device: backend in ("triton", "reference"))
    require_built("triton")
    with pytest.raises(AssertionError, match="'cuda' is not built for cuda"):
        require_built("cuda")


def test_setup_builds_cuda_kernels_without_a_gpu(monkeypatch, tmp_path):
    """setup.py builds the CUDA kernels when nvcc sits under CUDA_HOME and torch is a CUDA build, whether
    or not a GPU is visible, and otherwise says why not."""
    setup_py = load_setup_py()
    from torch.utils import cpp_extension

    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "nvcc").touch()
    monkeypatch.delenv("FASTERASE_NO_CUDA", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(tmp_path))
    assert setup_py.cuda_skip_reason() is None
    monkeypatch.setenv("FASTERASE_NO_CUDA", "1")
    assert setup_py.cuda_skip_reason() == "FASTERASE_NO_CUDA=1"
    monkeypatch.delenv("FASTERASE_NO_CUDA")
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(tmp_path / "missing"))
    assert "has no bin/nvcc" in setup_py.cuda_skip_reason()
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", None)
    assert "no CUDA toolkit" in setup_py.cuda_skip_reason()
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(tmp_path))
    monkeypatch.setattr(torch.version, "cuda", None)
    assert "not a CUDA build" in setup_py.cuda_skip_reason()


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_cuda_sources_compile_with_nvcc(tmp_path):
    """Every .cu file compiles with the flags and architectures setup.py builds with."""
    setup_py = load_setup_py()
    gencode = []
    for arch in setup_py.DEFAULT_CUDA_ARCHS.split(";"):  # torch's notation: "9.0+PTX" adds the PTX of 9.0
        a = arch.removesuffix("+PTX").replace(".", "")
        gencode.append(f"-gencode=arch=compute_{a},code=sm_{a}")
        if arch.endswith("+PTX"):
            gencode.append(f"-gencode=arch=compute_{a},code=compute_{a}")
    assert any("code=compute_" in g for g in gencode), "no PTX: a GPU newer than the listed ones has no kernel image"
    for source in sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu"))):
        out = tmp_path / (os.path.basename(source) + ".o")
        result = subprocess.run(["nvcc", *setup_py.NVCC_FLAGS, *gencode, "-c", source, "-o", str(out)],
                                capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
