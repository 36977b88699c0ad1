"""Triton kernels of fasterase (installed as fasterase.kernels); the specifications are in fasterase/ops.

Each wrapper takes the same arguments as the op's reference.  On the CPU they run only under
TRITON_INTERPRET=1, which must be set before this package is imported.
"""
import importlib.machinery
import importlib.util
import os
import sys

# Imported by the bare name "kernels", with the repository's root on sys.path (`python -m pytest` or Python
# started there), this folder shadows the PyPI package of that name, which transformers >= 5.25 imports:
# where that package is installed, it is loaded in this one's place.
_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_pypi = importlib.machinery.PathFinder.find_spec(
    __name__, [p for p in sys.path if os.path.abspath(p or os.curdir) != _root]) if __name__ == "kernels" else None
if _pypi is not None:
    sys.modules[__name__] = importlib.util.module_from_spec(_pypi)
    _pypi.loader.exec_module(sys.modules[__name__])
else:
    from .masked_adamw import masked_adamw
    from .paired_noise_loss import paired_noise_loss
    from .rank_update import lowrank_update, shared_matmul

    __all__ = ["masked_adamw", "lowrank_update", "shared_matmul", "paired_noise_loss"]
