"""attnrewrite: find softmax attention in any PyTorch model and swap it for a faster operator."""

# ruff: noqa: E402 (the imports below need __path__ extended first)

from pathlib import Path as _Path

# `passes/` and `kernels/` sit at the repository root and are installed as attnrewrite.passes and
# attnrewrite.kernels. They have no __init__.py on purpose: run from the root, a regular package
# named `kernels` would shadow the installed one (PyPI's `kernels`, which transformers imports),
# while a folder without __init__.py never shadows a regular package. A wheel puts them inside
# attnrewrite/; in an editable install (whose finder cannot resolve namespace subpackages) they
# are found beside this folder.
_source_root = _Path(__file__).resolve().parent.parent
if (
    not (_Path(__file__).parent / "kernels").is_dir()
    and (_source_root / "pyproject.toml").is_file()
):
    __path__.append(str(_source_root))

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


def __getattr__(name: str) -> object:
    """`export_onnx`, imported on first use: onnx and onnxscript load only when it is used, so
    `import attnrewrite` stays light."""
    if name == "export_onnx":
        from .onnx import export_onnx

        return export_onnx
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
    "export_onnx",
    "get_method",
    "nn",
    "register_method",
    "rewrite",
    "zeros_attention",
]
