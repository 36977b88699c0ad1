"""fasterase: concept erasure for diffusion models, with fused kernels.

`pip install --no-build-isolation -e .` builds the optional native extension fasterase._C
against the installed torch; without a compiler or torch at build time the package still
installs and falls back to the Triton or reference ops.
"""
import glob
import os
import sys

from setuptools import find_packages, setup


# nvcc flags of the CUDA kernels, shared with the compile test (tests/test_ops_dispatch.py). No FMA
# contraction: the kernels then round like the torch reference they are tested against.
NVCC_FLAGS = ["-O3", "-std=c++20", "--fmad=false"]
# Built when no GPU is visible and TORCH_CUDA_ARCH_LIST is unset (a build machine): A100 and H100/H200
# machine code, and sm_90 PTX, which the driver compiles for a newer GPU (without it, one has no kernel image).
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"


def cuda_skip_reason() -> str | None:
    """Why the CUDA kernels cannot be built here, or None when they can: nvcc under CUDA_HOME and a CUDA
    build of torch to link against (torch's own CPU build cannot host a CUDA extension). No GPU need be
    visible."""
    import torch
    from torch.utils import cpp_extension

    if os.environ.get("FASTERASE_NO_CUDA") == "1":
        return "FASTERASE_NO_CUDA=1"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is not a CUDA build (torch.version.cuda is None)"
    if cpp_extension.CUDA_HOME is None:
        return "no CUDA toolkit found (set CUDA_HOME, or put nvcc on PATH)"
    nvcc = os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc")
    if not os.path.exists(nvcc):
        return f"CUDA_HOME={cpp_extension.CUDA_HOME} has no bin/nvcc"
    return None


def _native_extension():
    """fasterase._C: the C++ CPU kernels always, the CUDA kernels when :func:`cuda_skip_reason` allows.

    Returns (ext_modules, cmdclass); empty when torch is absent, so the package still installs and
    the ops fall back to Triton or the reference.  FASTERASE_NO_EXT=1 skips the build.
    """
    if os.environ.get("FASTERASE_NO_EXT") == "1":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print("fasterase: torch not importable at build time; skipping fasterase._C", file=sys.stderr)
        return [], {}
    here = os.path.dirname(os.path.abspath(__file__))
    sources = sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp"))) + [os.path.join("csrc", "binding.cpp")]
    openmp = [] if sys.platform == "darwin" else ["-fopenmp"]
    # no FMA contraction, as in NVCC_FLAGS
    cxx = ["-O3", "-std=c++20", "-ffp-contract=off"] + openmp
    kwargs = dict(include_dirs=[os.path.join(here, "csrc")], extra_link_args=openmp)
    skip = cuda_skip_reason()
    if skip is None:
        if not torch.cuda.is_available() and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS
        print(f"fasterase: building the CUDA kernels for TORCH_CUDA_ARCH_LIST="
              f"{os.environ.get('TORCH_CUDA_ARCH_LIST', 'the visible GPUs')}", file=sys.stderr)
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        ext = CUDAExtension("fasterase._C", sources, define_macros=[("WITH_CUDA", None)],
                            extra_compile_args={"cxx": cxx, "nvcc": NVCC_FLAGS}, **kwargs)
    else:
        print(f"fasterase: building fasterase._C without the CUDA kernels: {skip}", file=sys.stderr)
        ext = CppExtension("fasterase._C", sources, extra_compile_args={"cxx": cxx}, **kwargs)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


if __name__ == "__main__":  # as pip and setuptools run it; the tests import it for the functions above
    ext_modules, cmdclass = _native_extension()
    setup(
        name="fasterase",
        version="0.1.0",
        description="Fast concept erasure (FADE, ANT, TRACE, UCE, ESD) for Stable Diffusion and FLUX",
        python_requires=">=3.11",
        packages=find_packages(include=["fasterase", "fasterase.*"]) + ["fasterase.kernels"],
        package_dir={"fasterase.kernels": "kernels"},
        package_data={"fasterase.toy": ["weights/*.safetensors"],
                      "fasterase.models": ["configs/*/*.json", "configs/*/*/*.json"]},
        install_requires=[
            "torch>=2.4",
            "diffusers>=0.32",
            "transformers>=4.45",
            "tokenizers",
            "safetensors",
            "peft>=0.13",
            "numpy",
            "tqdm",
            "pillow",
            "triton; platform_system == 'Linux' and platform_machine == 'x86_64'",
        ],
        extras_require={
            "test": ["pytest", "pytest-benchmark", "pytest-xdist"],
            "scale": ["deepspeed", "bitsandbytes"],
        },
        entry_points={"console_scripts": ["fasterase = fasterase.cli:main"]},
        ext_modules=ext_modules,
        cmdclass=cmdclass,
    )
