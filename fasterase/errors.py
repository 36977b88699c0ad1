"""The one exception type for a mistake in what the user asked for.

Raised for bad input (an unknown option, a concept the tokenizer cannot hold, a folder that may
not be overwritten, a pipeline no adapter handles). The CLI reports it as one line with exit
status 2; every other exception is a bug or a failure and keeps its traceback (exit 1). It is a
ValueError, so callers of the API that catch ValueError keep working.
"""
from __future__ import annotations


class UserError(ValueError):
    """Bad input: the message names the problem and what is valid."""
