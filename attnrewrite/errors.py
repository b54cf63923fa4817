"""Errors users see: each names the problem and the fix."""


class AttnRewriteError(Exception):
    """Base class for every error attnrewrite raises on purpose."""


class OptionError(AttnRewriteError, ValueError):
    """An unknown method or option, or an option value out of range."""


class UnsupportedInputError(AttnRewriteError, ValueError):
    """Inputs (shapes, dtypes, masks) that a method cannot compute exactly what was asked for."""
