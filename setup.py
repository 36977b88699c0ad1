"""fasterase: concept erasure for diffusion models, with fused kernels.

`pip install --no-build-isolation -e .` builds the optional native extension fasterase._C
against the installed torch; without a compiler or torch at build time the package still
installs and falls back to the Triton or reference ops.
"""
import glob
import os
import sys

from setuptools import find_packages, setup


def _native_extension():
    """fasterase._C: the C++ CPU kernels always, the CUDA kernels when torch has CUDA and nvcc exists.

    Returns (ext_modules, cmdclass); empty when torch is absent, so the package still installs and
    the ops fall back to Triton or the reference.  FASTERASE_NO_EXT=1 skips the build.
    """
    if os.environ.get("FASTERASE_NO_EXT") == "1":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print("fasterase: torch not importable at build time; skipping fasterase._C", file=sys.stderr)
        return [], {}
    here = os.path.dirname(os.path.abspath(__file__))
    sources = sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp"))) + [os.path.join("csrc", "binding.cpp")]
    openmp = [] if sys.platform == "darwin" else ["-fopenmp"]
    # no FMA contraction: the kernels then round like the torch reference they are tested against
    cxx = ["-O3", "-std=c++20", "-ffp-contract=off"] + openmp
    kwargs = dict(include_dirs=[os.path.join(here, "csrc")], extra_link_args=openmp)
    use_cuda = torch.cuda.is_available() and CUDA_HOME is not None and os.environ.get("FASTERASE_NO_CUDA") != "1"
    if use_cuda:
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        ext = CUDAExtension("fasterase._C", sources, define_macros=[("WITH_CUDA", None)],
                            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++20", "--fmad=false"]}, **kwargs)
    else:
        ext = CppExtension("fasterase._C", sources, extra_compile_args={"cxx": cxx}, **kwargs)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


EXT_MODULES, CMDCLASS = _native_extension()

setup(
    name="fasterase",
    version="0.1.0",
    description="Fast concept erasure (FADE, ANT, TRACE, UCE, ESD) for Stable Diffusion and FLUX",
    python_requires=">=3.11",
    packages=find_packages(include=["fasterase", "fasterase.*"]) + ["fasterase.kernels"],
    package_dir={"fasterase.kernels": "kernels"},
    package_data={"fasterase.toy": ["weights/*.safetensors"]},
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
        "test": ["pytest", "pytest-benchmark"],
        "scale": ["deepspeed", "bitsandbytes"],
    },
    entry_points={"console_scripts": ["fasterase = fasterase.cli:main"]},
    ext_modules=EXT_MODULES,
    cmdclass=CMDCLASS,
)
