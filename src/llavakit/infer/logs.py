"""Library warnings go to a log file, never into what a user reads.

A chat reply is what the model said. transformers and torch warn through two channels, Python's
``warnings`` module and the ``transformers`` logger (whose default handler writes to stderr, which a
terminal shows in the middle of the conversation); `route_library_warnings` sends both to one file
and tells the user once where it is.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

LOG_ENV = "LLAVAKIT_LOG"  # overrides the default log file
LIBRARY_LOGGERS = ("py.warnings", "transformers", "torch", "accelerate", "peft", "huggingface_hub")


def default_log_path(command: str) -> Path:
    base = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(base) / "llavakit" / f"{command}.log"


def route_library_warnings(command: str, path: str | Path | None = None) -> Path:
    """Send Python warnings and the ``transformers`` / ``torch`` / ``accelerate`` loggers to `path`
    (default ``$LLAVAKIT_LOG`` or ``~/.local/state/llavakit/COMMAND.log``); returns the path."""
    path = Path(path or os.environ.get(LOG_ENV) or default_log_path(command))
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    warnings.simplefilter("default")  # each distinct warning once per place, as Python's default
    logging.captureWarnings(True)  # warnings.warn -> the "py.warnings" logger
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_default_handler()  # its stderr handler would print into the chat
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass
    for name in LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        logger.addHandler(handler)
        logger.propagate = False
    return path
