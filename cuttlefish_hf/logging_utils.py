"""Logging that follows transformers' verbosity, so ``transformers.logging.set_verbosity_error()`` and
``TrainingArguments(log_level=...)`` quiet Cuttlefish as they quiet transformers.

Cuttlefish's loggers live under ``cuttlefish_hf`` and propagate to the root logger as usual, so
``logging.basicConfig`` formats them and pytest's ``caplog`` sees them. Where a plain logger would fall back to
the root logger's level, they take transformers' verbosity, unless a level is set on ``cuttlefish_hf`` (with
``set_verbosity``, ``logging.getLogger("cuttlefish_hf").setLevel`` or ``CUTTLEFISH_VERBOSITY=info``).

Example:
    >>> from cuttlefish_hf import logging_utils
    >>> logging_utils.set_verbosity_info()  # Cuttlefish only; transformers.logging.set_verbosity_info() sets both
    >>> logging_utils.set_verbosity(logging_utils.NOTSET)  # follow transformers again
"""

from __future__ import annotations

import logging
import os
import sys
from logging import DEBUG, ERROR, INFO, NOTSET, WARNING

__all__ = ["DEBUG", "ERROR", "INFO", "NOTSET", "WARNING", "get_logger", "get_verbosity", "set_verbosity",
           "set_verbosity_debug", "set_verbosity_error", "set_verbosity_info", "set_verbosity_warning"]

LIBRARY = "cuttlefish_hf"
LOG_LEVELS = {"debug": DEBUG, "info": INFO, "warning": WARNING, "error": ERROR, "critical": logging.CRITICAL}


def _transformers_verbosity() -> int:
    # transformers.utils.logging.get_verbosity() without importing transformers: the level of its root logger,
    # which set_verbosity, TRANSFORMERS_VERBOSITY and Trainer's log_level set (WARNING until then).
    level = logging.getLogger("transformers").level
    return level or LOG_LEVELS.get(os.environ.get("TRANSFORMERS_VERBOSITY", ""), WARNING)


class _Logger(logging.Logger):
    """A logger that, with no level set on it or its parents, takes transformers' verbosity, not the root's."""

    def getEffectiveLevel(self) -> int:
        logger = self
        while logger is not None and logger is not logging.root:
            if logger.level:
                return logger.level
            logger = logger.parent
        return _transformers_verbosity()


class _LastResort(logging.Handler):
    """Python's last resort without its WARNING floor: when the application configured no handler, print our
    records to stderr at the level they passed, as transformers' own handler does under set_verbosity_info()."""

    def handle(self, record: logging.LogRecord) -> bool:
        logger = logging.getLogger(record.name)
        while logger is not None:
            if any(handler is not self for handler in logger.handlers):
                return False  # someone configured logging: their handler prints it, once
            logger = logger.parent if logger.propagate else None
        return super().handle(record)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")  # looked up now: pytest and notebooks swap it
        except Exception:  # noqa: BLE001  (a log line must not raise: handleError reports it, as logging's own do)
            self.handleError(record)


def get_logger(name: str | None = None) -> logging.Logger:
    """The logger ``name`` (``cuttlefish_hf`` by default), whose level follows transformers' verbosity."""
    logger = logging.getLogger(name or LIBRARY)
    if type(logger) is logging.Logger:  # a logger class set by the application is left as it is
        logger.__class__ = _Logger
    return logger


def get_verbosity() -> int:
    """Cuttlefish's level: the one set on ``cuttlefish_hf``, else transformers' verbosity."""
    return get_logger().getEffectiveLevel()


def set_verbosity(verbosity: int) -> None:
    """Set Cuttlefish's level apart from transformers'; ``NOTSET`` follows transformers' verbosity again."""
    get_logger().setLevel(verbosity)


def set_verbosity_debug() -> None:
    set_verbosity(DEBUG)


def set_verbosity_info() -> None:
    set_verbosity(INFO)


def set_verbosity_warning() -> None:
    set_verbosity(WARNING)


def set_verbosity_error() -> None:
    set_verbosity(ERROR)


def _configure_library_logger() -> None:
    library = get_logger()
    if not any(type(handler).__name__ == "_LastResort" for handler in library.handlers):  # once, even on reload
        library.addHandler(_LastResort())
    value = os.environ.get("CUTTLEFISH_VERBOSITY")
    if value in LOG_LEVELS:
        library.setLevel(LOG_LEVELS[value])
    elif value:
        library.warning("Unknown CUTTLEFISH_VERBOSITY=%s: use one of %s.", value, ", ".join(LOG_LEVELS))


_configure_library_logger()
