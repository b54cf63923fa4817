"""Errors and warnings users see: each names the problem and the fix."""

from __future__ import annotations

import warnings


class AttnRewriteError(Exception):
    """Base class for every error attnrewrite raises on purpose."""


class OptionError(AttnRewriteError, ValueError):
    """An unknown method or option, or an option value out of range."""


class UnsupportedInputError(AttnRewriteError, ValueError):
    """Inputs (shapes, dtypes, masks) that a method cannot compute exactly what was asked for."""


#: Keys `warn_once` has warned about (tests discard one to see its warning again).
WARNED: set[str] = set()


def warn_once(key: str, message: str) -> None:
    """Warn with `message` the first time `key` is seen in this process: a fallback that runs on
    every call of a model would otherwise repeat its warning on every step."""
    if key in WARNED:
        return
    WARNED.add(key)
    warnings.warn(f"attnrewrite: {message} This warning is shown once.", RuntimeWarning, 3)
