"""`attnrewrite.export_onnx`: at the top level without loading onnx on `import attnrewrite`, and a
report that shows the options the exported functions are fixed at."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
import torch

import attnrewrite


class Attention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(16, 48)

    def forward(self, x):
        q, k, v = self.qkv(x).unflatten(-1, (3, 2, 8)).permute(2, 0, 3, 1, 4)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)


def test_export_onnx_is_at_the_top_level_and_loads_onnx_on_first_use():
    code = (
        "import sys, attnrewrite\n"
        "heavy = {'onnx', 'onnxscript', 'onnxruntime'} & set(sys.modules)\n"
        "assert not heavy, f'import attnrewrite loaded {heavy}'\n"
        "assert 'export_onnx' in attnrewrite.__all__\n"
        "from attnrewrite import export_onnx\n"
        "from attnrewrite.onnx import export_onnx as in_subpackage\n"
        "assert export_onnx is in_subpackage\n"
    )
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("given", ["model", "RewriteResult"])
def test_export_report_shows_the_block_size_the_function_is_fixed_at(given, tmp_path):
    """With a dynamic length and no block_size, the rewrite leaves the block size to the run-time
    length, but the function is fixed at the one the example length gives: the report says so
    (and a RewriteResult's own report stays as it was)."""
    x, path = torch.randn(1, 40, 16), tmp_path / "monarch.onnx"
    dynamic = ({1: torch.export.Dim("seq", min=2, max=256)},)
    if given == "model":
        out = attnrewrite.export_onnx(
            Attention(), (x,), path, method="monarch", dynamic_shapes=dynamic
        )
    else:
        rewritten = attnrewrite.rewrite(Attention(), (x,), method="monarch", dynamic_shapes=dynamic)
        out = attnrewrite.export_onnx(rewritten, (x,), path, dynamic_shapes=dynamic)
        assert rewritten.report.sites[0].options["block_size"] is None
    (name,) = out.functions
    (function,) = [f for f in onnx.load(str(path)).functions if f.name == name]
    fixed = ast.literal_eval(function.doc_string.removeprefix("MonarchAttention "))["b"]
    (site,) = out.report.sites
    assert site.options["block_size"] == fixed
    assert f"block_size={fixed}" in str(out.report)
