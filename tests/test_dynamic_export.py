"""The custom ops' registrations, dynamic sequence lengths under torch.compile, and torch.export
save/load of rewritten models.

A compiled or exported graph is traced once with fake tensors of a symbolic length; the methods'
run-time choices (Monarch's block size and padding, HSA's tree) must follow the length of each
call, and the custom ops' fake and backward registrations must describe what the ops return
(Inductor checks the strides) without specializing the graph to one length.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tiny_models import METHOD_OPTIONS, Encoder, encoder_inputs, perturb_adapters

import attnrewrite
import attnrewrite.backend

LENGTHS = (17, 64, 100, 256)


def op_cases() -> list:
    """Every custom op with q, k, v as models pass them (heads permuted out of (batch, N, heads,
    d), so not contiguous), with a key-padding mask and with a mask that differs between queries
    (the run-time exact fallback)."""
    generator = torch.Generator().manual_seed(0)

    def qkv() -> list[torch.Tensor]:
        return [torch.randn(2, 12, 2, 8, generator=generator).transpose(1, 2) for _ in range(3)]

    ops = torch.ops.attnrewrite
    key_mask = torch.zeros(2, 1, 1, 12)
    key_mask[1, ..., 9:] = float("-inf")
    causal = torch.ones(12, 12, dtype=torch.bool).tril()
    grad = torch.randn(2, 2, 12, 8, generator=generator)
    terms = [torch.randn(2, 2, 12, generator=generator), *torch.rand(2, 2, 2, 12).unbind()]
    monarch = [None, 4, 2, "post", False, True, False]
    hsa = [None, [4], False, False, True]
    cases = [  # (id, op, arguments before q, k, v, arguments after)
        ("zeros", ops.zeros_attention, [], [*terms, False, None]),
        ("zeros_backward", ops.zeros_attention_backward, [grad], [*terms, False, None, False]),
    ]
    for kind, mask in (("key_mask", key_mask), ("fallback", causal)):
        site = [*terms, mask, False, None]
        cases += [
            (f"monarch-{kind}", ops.monarch_attention, [], [mask, *monarch]),
            (f"monarch_backward-{kind}", ops.monarch_attention_backward, [grad], [mask, *monarch]),
            (f"hsa-{kind}", ops.hsa_attention, [], [mask, *hsa]),
            (f"hsa_backward-{kind}", ops.hsa_attention_backward, [grad], [mask, *hsa]),
            (f"zeros_site-{kind}", ops.zeros_site_attention, [], site),
            (f"zeros_site_backward-{kind}", ops.zeros_site_attention_backward, [grad], site),
        ]
    return [pytest.param(op, (*pre, *qkv(), *post), id=name) for name, op, pre, post in cases]


@pytest.mark.filterwarnings("ignore:attnrewrite. a .* site received a mask that differs")
@pytest.mark.parametrize(("op", "arguments"), op_cases())
def test_custom_op_registrations_pass_opcheck(op, arguments):
    torch.library.opcheck(op.default, arguments)


def expected_output(
    model: Encoder,
    method: str,
    adapter: torch.nn.Module | None,
    x: torch.Tensor,
    mask: torch.Tensor,
) -> torch.Tensor:
    """The model with its attention computed by the method's functional op (ZeroS: the site's
    adapter, which holds its parameters), eagerly at this length."""
    q, k, v = model.heads(x)
    if adapter is not None:
        return model.merge(adapter(q, k, v, mask))
    options = METHOD_OPTIONS[method]
    return model.merge(attnrewrite.attention(q, k, v, mask, method=method, **options))


@pytest.mark.filterwarnings("ignore:attnrewrite. the zeros rewrite added parameters")
@pytest.mark.parametrize("method", METHOD_OPTIONS)
def test_compiled_model_follows_the_run_time_length_without_recompiling(method):
    # aot_eager traces the custom ops' fake implementations and their backward with a symbolic
    # length, as Inductor does, without Inductor's code generation time.
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model = Encoder()
    options = {"method": method, "inner": "aot_eager", **METHOD_OPTIONS[method]}
    compiled = torch.compile(model, backend="attnrewrite", options=options)
    adapter = None
    for n in LENGTHS:
        x, mask = encoder_inputs(2, n)
        if n == LENGTHS[0]:
            torch._dynamo.mark_dynamic(x, 1)
            torch._dynamo.mark_dynamic(mask, 3)
            compiled(x.requires_grad_(), mask)  # compiles once; grad mode is part of the guards
            site = attnrewrite.backend.reports[-1].sites[0]
            assert site.status == "replaced" and isinstance(site.q_shape[-2], torch.SymInt)
            gm = site.sdpa_node.graph.owning_module
            perturb_adapters(gm)
            adapter = gm.get_submodule(site.options["adapter"]) if method == "zeros" else None
        x_compiled, x_eager = (x.detach().clone().requires_grad_() for _ in range(2))
        got = compiled(x_compiled, mask)
        expected = expected_output(model, method, adapter, x_eager, mask)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
        (grad_compiled,) = torch.autograd.grad(got.square().sum(), x_compiled)
        (grad_eager,) = torch.autograd.grad(expected.square().sum(), x_eager)
        torch.testing.assert_close(grad_compiled, grad_eager, atol=1e-5, rtol=1e-4)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


LOAD_SCRIPT = textwrap.dedent(
    """
    import sys
    import torch

    paths = sys.argv[1:]
    try:
        torch.export.load(paths[0])
    except RuntimeError:
        print("not loadable before import")
    import attnrewrite  # registers the attnrewrite:: ops that the saved graphs call

    for path in paths:
        module = torch.export.load(path).module()
        calls = torch.load(path + ".inputs")
        torch.save([module(*call) for call in calls], path + ".outputs")
    """
)


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, tuple[torch.export.ExportedProgram, list, list]]:
    """Per method: the exported rewritten model, its outputs at several lengths, and the outputs
    of the same program saved and loaded in a fresh process (one process for all methods)."""
    tmp_path = tmp_path_factory.mktemp("export")
    seq = torch.export.Dim("seq", min=2, max=1024)
    dynamic_shapes = ({1: seq}, {3: seq})
    calls = [encoder_inputs(2, n, seed=n) for n in LENGTHS[:3]]
    results, paths = {}, []
    for method, options in METHOD_OPTIONS.items():
        rewritten = attnrewrite.rewrite(
            Encoder(), calls[1], method=method, dynamic_shapes=dynamic_shapes, **options
        ).module
        perturb_adapters(rewritten)
        program = torch.export.export(rewritten, calls[1], dynamic_shapes=dynamic_shapes)
        path = tmp_path / f"{method}.pt2"
        torch.export.save(program, path)
        torch.save(calls, f"{path}.inputs")
        with torch.no_grad():
            results[method] = [program, [rewritten(*call) for call in calls]]
        paths.append(path)
    run = subprocess.run(
        [sys.executable, "-c", LOAD_SCRIPT, *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "not loadable before import" in run.stdout
    for method, path in zip(METHOD_OPTIONS, paths, strict=True):
        results[method].append(torch.load(Path(f"{path}.outputs")))
    return results


@pytest.mark.slow
@pytest.mark.parametrize("method", METHOD_OPTIONS)
def test_exported_rewrite_saves_loads_and_runs_in_a_fresh_process(exported, method):
    program, expected, loaded = exported[method]
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert any(t.startswith("attnrewrite.") for t in targets), targets
    assert len(loaded) == len(expected) == 3  # three lengths through one dynamic program
    for got, want in zip(loaded, expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("method", ["monarch", "hsa"])
def test_query_and_key_lengths_of_their_own_stay_apart(method):
    """Cross-attention whose two lengths are separate dynamic dims, equal on the example: the
    approximate methods keep it (comparing the symbols with `==` would have guarded them equal,
    folding two dims into one), and the rewritten module still serves other lengths."""

    class CrossAttention(torch.nn.Module):
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v)

    q, k, v = (torch.randn(2, 4, 12, 8) for _ in range(3))
    queries, keys = torch.export.Dim("queries", max=64), torch.export.Dim("keys", max=64)
    res = attnrewrite.rewrite(
        CrossAttention(),
        (q, k, v),
        method=method,
        dynamic_shapes=({2: queries}, {2: keys}, {2: keys}),
    )
    (site,) = res.report.sites
    assert site.status == "kept" and "not known equal" in site.reason
    q8 = torch.randn(2, 4, 8, 8)
    torch.testing.assert_close(res.module(q8, k, v), CrossAttention()(q8, k, v))
