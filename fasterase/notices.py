"""Library notices that every run would print and that say nothing about it, dropped where they come.

Each is one message of one library logger (or one warning), matched by its text, dropped only inside the
block that provokes it: the library's other notices, and the same logger's other messages, still show.
"""
from __future__ import annotations

import contextlib
import logging
import re
import warnings


@contextlib.contextmanager
def dropped(logger: str, text: str):
    """Within the block, the records of `logger` whose message contains `text` are dropped."""
    def keep(record: logging.LogRecord) -> bool:
        return text not in record.getMessage()

    log = logging.getLogger(logger)
    log.addFilter(keep)
    try:
        yield
    finally:
        log.removeFilter(keep)


@contextlib.contextmanager
def second_adapter():
    """Within the block, peft's warning on every LoRA adapter added beside others ("Already found a
    `peft_config` attribute ... multiple adapters") is dropped: fasterase stacks adapters on purpose."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=re.escape("Already found a `peft_config` attribute"))
        yield
