"""The torch.compile backend, found by name through the entry point (no import of attnrewrite)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

import attnrewrite
import attnrewrite.backend
from attnrewrite.backend import parse_backend_options

SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    import torch.nn.functional as F

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = torch.nn.Linear(32, 96)

        def forward(self, x, mask):
            b, n, _ = x.shape
            q, k, v = self.qkv(x).view(b, n, 3, 4, 8).permute(2, 0, 3, 1, 4)
            scores = q @ k.transpose(-2, -1) / 8 ** 0.5 + mask
            return torch.softmax(scores, dim=-1) @ v

    torch.manual_seed(0)
    model = Block().eval()
    x, mask = torch.randn(2, 16, 32), torch.zeros(2, 1, 1, 16)
    mask[1, ..., 12:] = torch.finfo(torch.float32).min
    assert "attnrewrite" not in sys.modules
    options = json.loads(sys.argv[1])
    with torch.no_grad():
        expected = model(x, mask)
        got = torch.compile(model, backend="attnrewrite", options=options)(x, mask)
    import attnrewrite.backend as backend  # loaded by Dynamo through the entry point
    report = backend.reports[-1]
    print(json.dumps({
        "max_error": (got - expected)[:, :, :12].abs().max().item(),
        "statuses": [s.status for s in report.sites],
        "ops": [str(n.target) for n in report.sites[0].sdpa_node.graph.nodes
                if "attention" in str(n.target)],
    }))
    """
)


def compile_in_fresh_process(options: dict) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, json.dumps(options)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("inner", ["eager", "inductor"])
def test_backend_found_by_name_rewrites_and_runs(inner):
    # block_size = N makes Monarch exact, so the compiled model must match the original.
    out = compile_in_fresh_process(
        {"method": "monarch", "block_size": 16, "num_steps": 2, "inner": inner}
    )
    assert out["statuses"] == ["replaced"]
    assert out["ops"] == ["attnrewrite.monarch_attention.default"]
    assert out["max_error"] < 1e-5


def test_backend_options_are_checked_and_listed():
    with pytest.raises(attnrewrite.OptionError, match="valid methods: hsa, monarch, sdpa, zeros"):
        parse_backend_options({"method": "flash"})
    with pytest.raises(attnrewrite.OptionError, match="valid options: block_size, num_steps, pad"):
        parse_backend_options({"method": "monarch", "blocksize": 16})
    with pytest.raises(attnrewrite.OptionError, match="inner must be one of"):
        parse_backend_options({"inner": "tvm"})
    method, options, _, inner = parse_backend_options({"method": "monarch", "num_steps": 1})
    assert (method, options, inner) == ("monarch", {"num_steps": 1}, "inductor")


def test_backend_in_process_with_eager_inner_matches_rewrite():
    class Attention(torch.nn.Module):
        def forward(self, q, k, v):
            return torch.softmax(q @ k.transpose(-2, -1) * 0.125, dim=-1) @ v

    q, k, v = (torch.randn(1, 2, 32, 8) for _ in range(3))
    options = {"method": "monarch", "block_size": 8, "num_steps": 1, "inner": "eager"}
    torch._dynamo.reset()
    compiled = torch.compile(Attention(), backend="attnrewrite", options=options, fullgraph=True)
    expected = attnrewrite.attention(
        q, k, v, scale=0.125, method="monarch", block_size=8, num_steps=1
    )
    torch.testing.assert_close(compiled(q, k, v), expected)


def test_backend_accepts_policies():
    class Two(torch.nn.Module):
        def forward(self, q, k, v):
            first = torch.softmax(q @ k.transpose(-2, -1), dim=-1) @ v
            return torch.softmax(first @ k.transpose(-2, -1), dim=-1) @ v

    q, k, v = (torch.randn(1, 2, 32, 8) for _ in range(3))
    for policy, statuses in (
        (attnrewrite.ErrorBudget(float("inf")), ["replaced", "replaced"]),
        (attnrewrite.ErrorBudget(0.0), ["kept", "kept"]),
    ):
        torch._dynamo.reset()
        attnrewrite.backend.reports.clear()
        options = {"method": "monarch", "block_size": 8, "inner": "eager", "policy": policy}
        torch.compile(Two(), backend="attnrewrite", options=options)(q, k, v)
        assert [s.status for s in attnrewrite.backend.reports[-1].sites] == statuses
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed, match="calibration=None"):
        torch._dynamo.reset()
        budget = attnrewrite.ErrorBudget(0.1, calibration=(q, k, v))
        options = {"method": "monarch", "inner": "eager", "policy": budget}
        torch.compile(Two(), backend="attnrewrite", options=options)(q, k, v)


def test_backend_keeps_in_place_writes_whose_results_are_unused():
    """Dynamo's graph spells `h.relu_()`, `torch.relu_(h)` and `self.calls += 1` as nodes whose
    results nothing uses; FX's dead-code elimination would drop them (and the writes)."""

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv, self.mlp = torch.nn.Linear(32, 96), torch.nn.Linear(32, 32)
            self.register_buffer("calls", torch.zeros(()))

        def forward(self, x):
            q, k, v = self.qkv(x).view(2, 16, 3, 4, 8).permute(2, 0, 3, 1, 4).unbind(0)
            a = torch.softmax(q @ k.transpose(-2, -1) * 8**-0.5, -1) @ v
            h = self.mlp(a.transpose(1, 2).reshape(2, 16, 32))
            h.relu_()
            self.calls += 1
            self.calls.add_(1)
            return h

    model, x = Block().eval(), torch.randn(2, 16, 32)
    with torch.no_grad():
        expected = model(x)
        torch._dynamo.reset()
        options = {"method": "sdpa", "inner": "eager"}
        got = torch.compile(model, backend="attnrewrite", options=options)(x)
    assert attnrewrite.backend.reports[-1].sites[0].status == "replaced"
    torch.testing.assert_close(got, expected)
    assert model.calls.item() == 4


def test_min_seq_len_under_compile_guards_a_dynamic_length():
    """Under Dynamo the policy's comparison is a guard: a call on the other side of
    min_seq_len recompiles and is decided for its own length."""

    class Attention(torch.nn.Module):
        def forward(self, q, k, v):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    torch._dynamo.reset()
    policy = attnrewrite.Select(min_seq_len=512)
    options = {"method": "monarch", "inner": "eager", "policy": policy}
    compiled = torch.compile(Attention(), backend="attnrewrite", options=options)
    statuses = []
    for n in (600, 700, 64):
        q, k, v = (torch.randn(1, 2, n, 8) for _ in range(3))
        torch._dynamo.mark_dynamic(q, 2), torch._dynamo.mark_dynamic(k, 2)
        torch._dynamo.mark_dynamic(v, 2)
        compiled(q, k, v)
        statuses.append(attnrewrite.backend.reports[-1].sites[0].status)
    assert statuses == ["replaced", "replaced", "kept"]


def test_a_symbolic_scale_under_dynamic_true_is_kept_with_the_fix():
    class SizeScaled(torch.nn.Module):
        def forward(self, q, k, v):
            scores = q @ k.transpose(-2, -1) / q.size(-1) ** 0.5
            return torch.softmax(scores, dim=-1) @ v

    torch._dynamo.reset()
    options = {"method": "monarch", "inner": "eager"}
    q, k, v = (torch.randn(1, 2, 16, 8) for _ in range(3))
    compiled = torch.compile(SizeScaled(), backend="attnrewrite", options=options, dynamic=True)
    torch.testing.assert_close(compiled(q, k, v), SizeScaled()(q, k, v))
    (site,) = attnrewrite.backend.reports[-1].sites
    assert site.status == "kept" and "leave dynamic unset" in site.reason
