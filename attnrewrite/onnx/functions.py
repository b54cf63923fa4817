"""ONNX local functions for the attention methods, built from their PyTorch bodies.

Each rewritten site becomes one node of domain `attnrewrite` (e.g. `MonarchAttention_b16_T2_…`)
whose FunctionProto is the method's PyTorch computation exported by torch.onnx itself, so the ONNX
function and the PyTorch op cannot drift apart. Netron shows one named node per site, onnxruntime
inlines the function, and no custom op library is needed. One function is built per distinct
configuration (hyperparameters, dtypes, static dims) and shared by the sites that use it; dims that
are dynamic in the exported model are dynamic in the function too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import onnx
import onnxscript
import torch
from onnx.defs import OpSchema

DOMAIN = "attnrewrite"
#: The lowest standard opset a function body can be exported at (torch.onnx's exporter writes 18
#: and later); a model must import at least this one, as its functions' imports must agree with it.
MIN_OPSET = 18
_OPSET = onnxscript.values.Opset(DOMAIN, 1)
_TYPES = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)", "tensor(double)", "tensor(bool)"]
#: Inputs with one value per key or per query, (…, N): their last dim is that length.
PER_KEY_INPUTS = ("key_logits", "key_valid")
PER_QUERY_INPUTS = ("gate_first", "gate_residual")
_ONNX_TO_TORCH = {
    onnx.TensorProto.FLOAT: torch.float32,
    onnx.TensorProto.FLOAT16: torch.float16,
    onnx.TensorProto.BFLOAT16: torch.bfloat16,
    onnx.TensorProto.DOUBLE: torch.float64,
    onnx.TensorProto.BOOL: torch.bool,
}
_TORCH_TO_ONNX = {dtype: onnx_type for onnx_type, dtype in _ONNX_TO_TORCH.items()}


@contextlib.contextmanager
def quiet_exporter() -> Iterator[None]:
    """torch.onnx.export without its warnings and log chatter (e.g. onnxscript's constant folder
    logging each value it cannot fold, which is expected and harmless), restored afterwards."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "onnxscript")]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels, strict=True):
                logger.setLevel(level)


@dataclasses.dataclass(frozen=True)
class TensorLayout:
    """What a function body depends on about one input: its dtype and its static dims."""

    dtype: torch.dtype
    shape: tuple[int | None, ...]  # None: dynamic in the exported model

    @classmethod
    def of(cls, value: Any) -> TensorLayout:
        """From a torch.onnx symbolic value or onnx_ir value (`.dtype`, `.shape`) or a tensor."""
        if isinstance(value, TensorLayout):
            return value
        if isinstance(value, torch.Tensor):
            return cls(value.dtype, tuple(value.shape))
        dims = tuple(d if isinstance(d, int) else None for d in value.shape)
        return cls(_ONNX_TO_TORCH[int(value.dtype)], dims)

    def permuted(self, perm: tuple[int, ...]) -> TensorLayout:
        return TensorLayout(self.dtype, tuple(self.shape[i] for i in perm))


@dataclasses.dataclass(frozen=True)
class Choice:
    """A run-time choice between two bodies, which becomes an ONNX `If` over pieces exported one
    by one: `predicate(*inputs)` gives a 0-d bool tensor, `then` and `otherwise` are bodies or
    Choices again. Why not torch.cond: torch.export traces a cond's branches several times, and
    its non-strict mode fails inside them (builtin max of SymInts), so a body with two Monarch
    branches took about twice as long to export as its pieces do one by one."""

    predicate: Callable[..., torch.Tensor]
    then: Callable[..., Any] | Choice
    otherwise: Callable[..., Any] | Choice

    def __call__(self, *inputs: torch.Tensor) -> Any:
        """The branch the predicate picks, run eagerly (what the If does in onnxruntime)."""
        return (self.then if bool(self.predicate(*inputs)) else self.otherwise)(*inputs)


@dataclasses.dataclass(frozen=True)
class FunctionSpec:
    """One ONNX function: a name prefix, hyperparameters, input layouts and the PyTorch body.

    Inputs are named q, k, v, optionally mask, and per-token inputs (PER_KEY_INPUTS,
    PER_QUERY_INPUTS); `cross` says the key length may differ from the query length. outputs:
    (name, type) per output of the body; the type is an ONNX type or "T0", the type of q.
    """

    prefix: str
    options: tuple[tuple[str, Any], ...]
    inputs: tuple[tuple[str, TensorLayout], ...]
    body: Callable[..., Any] | Choice = dataclasses.field(compare=False, hash=False)
    cross: bool = False
    outputs: tuple[tuple[str, str], ...] = (("out", "T0"),)
    # Example sequence length for the export: one where every code path of the body is taken
    # (e.g. Monarch: more than one block and a ragged last block), so nothing specializes.
    example_length: int = 67

    @property
    def name(self) -> str:
        readable = "_".join(f"{k}{v}" for k, v in self.options if k in ("b", "T"))
        digest = hashlib.sha1(repr((self.options, self.inputs)).encode()).hexdigest()[:8]
        return "_".join(part for part in (self.prefix, readable, digest) if part)

    def call(self, *values: Any) -> Any:
        """Emit a node calling this function, from inside a torch.onnx custom translation."""
        params = [OpSchema.FormalParameter(n, f"T{i}") for i, (n, _) in enumerate(self.inputs)]
        schema = OpSchema(
            self.name,
            DOMAIN,
            1,
            inputs=params,
            outputs=[OpSchema.FormalParameter(n, t) for n, t in self.outputs],
            type_constraints=[(f"T{i}", _TYPES, "") for i in range(len(self.inputs))],
        )
        return onnxscript.values.Op(_OPSET, self.name, schema)(*values)

    def build(self, opset: int | None = None) -> list[onnx.FunctionProto]:
        """This function (plus any it calls), its body exported at the standard `opset` (None:
        torch.onnx's default); a `Choice` becomes `If` nodes over pieces exported one by one."""
        if not isinstance(self.body, Choice):
            return self._export(self.body, self.name, opset)
        pieces: list[onnx.FunctionProto] = []
        outputs = [name for name, _ in self.outputs]
        nodes = self._choose(self.body, "", outputs, pieces, opset)
        standard = next(o.version for o in pieces[0].opset_import if o.domain == "")
        imports = [onnx.helper.make_opsetid("", standard), onnx.helper.make_opsetid(DOMAIN, 1)]
        inputs = [name for name, _ in self.inputs]
        main = onnx.helper.make_function(
            DOMAIN, self.name, inputs, outputs, nodes, imports, doc_string=self._doc()
        )
        return [main, *pieces]

    def _choose(
        self,
        choice: Choice,
        path: str,
        outputs: list[str],
        pieces: list[onnx.FunctionProto],
        opset: int | None,
    ) -> list[onnx.NodeProto]:
        """Nodes computing `outputs` by `choice`: its predicate, then an If whose branches call
        their pieces (or choose again). Piece and value names follow the path of branches."""
        inputs = [name for name, _ in self.inputs]
        predicate = f"{self.name}_{path}if"
        pieces.extend(self._export(choice.predicate, predicate, opset))
        condition = f"{path}condition"
        nodes = [onnx.helper.make_node(predicate, inputs, [condition], domain=DOMAIN)]
        branches = {}
        for side, body in (("then", choice.then), ("else", choice.otherwise)):
            branch_path = f"{path}{side}_"
            results = [f"{branch_path}{name}" for name in outputs]
            if isinstance(body, Choice):
                inner = self._choose(body, branch_path, results, pieces, opset)
            else:
                piece = f"{self.name}_{branch_path}".rstrip("_")
                pieces.extend(self._export(body, piece, opset))
                inner = [onnx.helper.make_node(piece, inputs, results, domain=DOMAIN)]
            declared = [onnx.helper.make_tensor_value_info(name, self._element_type(kind), None)
                        for name, (_, kind) in zip(results, self.outputs, strict=True)]  # fmt: skip
            branches[f"{side}_branch"] = onnx.helper.make_graph(inner, branch_path, [], declared)
        nodes.append(onnx.helper.make_node("If", [condition], outputs, **branches))
        return nodes

    def _doc(self) -> str:
        return f"{self.prefix} {dict(self.options)}"

    def _element_type(self, kind: str) -> int:
        """The ONNX element type of an output declared `kind` ("T0": q's, or "tensor(bool)"…)."""
        if kind == "T0":
            return _TORCH_TO_ONNX[self.inputs[0][1].dtype]
        name = kind.removeprefix("tensor(").removesuffix(")").upper()
        return onnx.TensorProto.DataType.Value(name)

    def _export(
        self, body: Callable[..., Any], name: str, opset: int | None
    ) -> list[onnx.FunctionProto]:
        """`body` exported by torch.onnx as the function `name` (plus any it calls)."""
        examples, dynamic_shapes = self._examples()

        class Body(torch.nn.Module):
            def forward(self, *args: torch.Tensor) -> Any:
                return body(*args)

        with quiet_exporter():
            program = torch.onnx.export(
                Body(),
                tuple(examples),
                dynamo=True,
                dynamic_shapes=(tuple(dynamic_shapes),),
                input_names=[name for name, _ in self.inputs],
                opset_version=opset,
                verbose=False,
            )
        model = program.model_proto
        for node in model.graph.node:
            _forget_branch_shapes(node)
        constants = [
            onnx.helper.make_node("Constant", [], [init.name], value=init)
            for init in model.graph.initializer
        ]
        function = onnx.helper.make_function(
            DOMAIN,
            name,
            [i.name for i in model.graph.input],
            [o.name for o in model.graph.output],
            [*constants, *model.graph.node],
            list(model.opset_import),
            doc_string=self._doc(),
        )
        return [function, *model.functions]

    def _symbol(self, name: str, dim_from_right: int) -> str:
        """The size symbol of a dynamic dim, shared by every input dim of the same size.

        Dims align from the right as in broadcasting: -1 is the head dim (the key length for the
        mask), -2 the sequence length, the rest batch dims; a per-token input is aligned as q
        without its head dim.
        """
        key_length = "S" if self.cross else "N"
        if name in PER_KEY_INPUTS or name in PER_QUERY_INPUTS:  # (…, N): q's dims without d
            if dim_from_right == -1:
                return key_length if name in PER_KEY_INPUTS else "N"
            return self._symbol("q", dim_from_right - 1)
        if dim_from_right == -1:
            return {"v": "Dv", "mask": key_length}.get(name, "D")
        if dim_from_right == -2:
            return "N" if name in ("q", "mask") else key_length
        if dim_from_right == -3 and name in ("k", "v"):
            return "KVH"  # equals the query heads unless grouped (then static anyway)
        return f"B{-dim_from_right}"

    def _examples(self) -> tuple[list[torch.Tensor], list[dict[int, Any]]]:
        """Example inputs (static dims as they are, distinct sizes for dynamic ones) and Dims."""
        symbols: dict[str, torch.export.Dim] = {}
        sizes: dict[str, int] = {}
        fresh = iter(range(3, 1000, 2))
        sizes.update(N=self.example_length, S=self.example_length + 2)
        examples, dynamic = [], []
        for name, layout in self.inputs:
            shape, spec = [], {}
            rank = len(layout.shape)
            for dim, size in enumerate(layout.shape):
                if size is not None:
                    shape.append(size)
                    continue
                symbol = self._symbol(name, dim - rank)
                if symbol == "KVH":
                    symbol = self._symbol("q", dim - rank)
                if symbol not in symbols:
                    symbols[symbol] = torch.export.Dim(symbol, min=2)
                    sizes.setdefault(symbol, next(fresh))
                shape.append(sizes[symbol])
                spec[dim] = symbols[symbol]
            make = torch.ones if layout.dtype == torch.bool else torch.randn
            examples.append(make(shape, dtype=layout.dtype))
            dynamic.append(spec)
        return examples, dynamic


def _forget_branch_shapes(node: onnx.NodeProto) -> None:
    """Drop the declared output shapes of If/Loop branches (keeping element types).

    onnxruntime infers them again when it inlines the function; declared shapes that were
    computed before inlining can disagree with its renamed values and fail the session.
    """
    for attribute in node.attribute:
        graphs = [attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else attribute.graphs
        for graph in graphs:
            for output in graph.output:
                output.type.tensor_type.ClearField("shape")
            del graph.value_info[:]
            for inner in graph.node:
                _forget_branch_shapes(inner)
