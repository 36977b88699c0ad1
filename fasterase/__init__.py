"""fasterase: concept erasure for text-to-image diffusion models."""
__version__ = "0.1.0"

from .api import EraseResult, erase, load, methods  # noqa: E402
from .concepts import Concept  # noqa: E402
from .errors import UserError  # noqa: E402

__all__ = ["erase", "load", "methods", "Concept", "EraseResult", "UserError", "__version__"]
