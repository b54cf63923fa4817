"""attnrewrite: find softmax attention in any PyTorch model and swap it for a faster operator."""

from .api import RewriteResult, capture, rewrite
from .budget import ErrorBudget
from .errors import AttnRewriteError, OptionError, UnsupportedInputError
from .functional import attention
from .methods import METHODS, get_method, register_method
from .policy import Select
from .report import Report
from .site import AttentionSite

__all__ = [
    "METHODS",
    "AttentionSite",
    "AttnRewriteError",
    "ErrorBudget",
    "OptionError",
    "Report",
    "RewriteResult",
    "Select",
    "UnsupportedInputError",
    "attention",
    "capture",
    "get_method",
    "register_method",
    "rewrite",
]
