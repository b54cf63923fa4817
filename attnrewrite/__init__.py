"""attnrewrite: find softmax attention in any PyTorch model and swap it for a faster operator."""

from . import nn
from .api import RewriteResult, capture, rewrite
from .budget import ErrorBudget
from .distill import DistillLog, distill
from .errors import AttnRewriteError, OptionError, UnsupportedInputError
from .functional import attention
from .methods import METHODS, get_method, register_method
from .methods.zeros import zeros_attention
from .policy import Select
from .report import Report
from .site import AttentionSite

__all__ = [
    "METHODS",
    "AttentionSite",
    "AttnRewriteError",
    "DistillLog",
    "ErrorBudget",
    "OptionError",
    "Report",
    "RewriteResult",
    "Select",
    "UnsupportedInputError",
    "attention",
    "capture",
    "distill",
    "get_method",
    "nn",
    "register_method",
    "rewrite",
    "zeros_attention",
]
