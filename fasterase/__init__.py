"""fasterase: concept erasure for text-to-image diffusion models."""
__version__ = "0.1.0"

import contextlib as _contextlib
import logging as _logging


@_contextlib.contextmanager
def _backend_notices_quieted():
    """Silence what the libraries print on import about backends fasterase never uses (bitsandbytes'
    hub 4-bit CPU GEMM, transformers' torchvision image processors); their log levels are restored
    after, so nothing said later is hidden."""
    from transformers.utils import logging as transformers_logging

    bnb = _logging.getLogger("bitsandbytes")
    levels = bnb.level, transformers_logging.get_verbosity()
    bnb.setLevel(_logging.ERROR)
    transformers_logging.set_verbosity_error()
    try:
        yield
    finally:
        bnb.setLevel(levels[0])
        transformers_logging.set_verbosity(levels[1])


with _backend_notices_quieted():
    from .api import EraseResult, erase, load, methods

from .concepts import Concept  # noqa: E402
from .errors import UserError  # noqa: E402

__all__ = ["erase", "load", "methods", "Concept", "EraseResult", "UserError", "__version__"]
