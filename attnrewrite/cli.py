"""The `attnrewrite` command line (also `python -m attnrewrite`).

    attnrewrite onnx IN.onnx OUT.onnx --method monarch --block-size 16 [--layers 1,3,5]
    attnrewrite report IN.onnx --method monarch
    attnrewrite bench IN.onnx OUT.onnx --seq-lens 128 256 512

Exit codes: 0 success, 1 a check failed (e.g. onnxruntime disagrees), 2 bad usage or input.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import types
import typing
from pathlib import Path
from typing import Any

from .errors import AttnRewriteError, OptionError
from .methods import METHODS
from .onnx.lowerings import METHOD_SPECS

EXIT_OK, EXIT_CHECK_FAILED, EXIT_USAGE = 0, 1, 2


def _int_list(text: str) -> list[int]:
    """Comma-separated integers ("16,4"; "" or "()" for none), for argparse."""
    parts = [part.strip() for part in text.strip().strip("()").split(",") if part.strip()]
    try:
        return [int(part) for part in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers such as 16,4, got {text!r}"
        ) from None


def _int_tuple(text: str) -> tuple[int, ...]:
    return tuple(_int_list(text))


def _option_parser(annotation: Any):
    """A string → value converter for a method option's type (int, str, tuples of ints)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):  # X | None
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    if typing.get_origin(annotation) is tuple:
        return _int_tuple
    return annotation if annotation in (int, float, str) else str


def _add_method_options(parser: argparse.ArgumentParser) -> None:
    """--method among the methods with an ONNX function, and their options."""
    parser.add_argument(
        "--method",
        default="monarch",
        choices=sorted(METHOD_SPECS),
        help="attention method to put in place of softmax attention",
    )
    seen: set[str] = set()
    for method in (METHODS[name] for name in sorted(METHOD_SPECS)):
        hints = typing.get_type_hints(method.options_type)
        for field in dataclasses.fields(method.options_type):
            if field.name in seen:
                continue
            seen.add(field.name)
            parser.add_argument(
                f"--{field.name.replace('_', '-')}",
                dest=f"option_{field.name}",
                metavar=field.name.upper(),
                type=_option_parser(hints[field.name]),
                default=None,
                help=f"{method.name} option {field.name} (default: {field.default})",
            )


def _add_selection(parser: argparse.ArgumentParser) -> None:
    """Select's criteria: which sites to replace (the others are kept and reported)."""
    parser.add_argument(
        "--layers",
        type=_int_list,
        help="replace only these layers (comma-separated; a site's layer is the first integer "
        "of its module path, e.g. encoder.layer.3 → 3)",
    )
    parser.add_argument(
        "--names",
        action="append",
        metavar="GLOB",
        help="replace only sites whose module path matches this glob (repeatable)",
    )
    parser.add_argument(
        "--min-seq-len", type=int, help="replace only sites at least this long (query length)"
    )


def _policy(args: argparse.Namespace) -> Any:
    """The Select the command line asks for, or None for every site."""
    from .policy import Select

    if args.layers is None and args.names is None and args.min_seq_len is None:
        return None
    return Select(layers=args.layers, names=args.names, min_seq_len=args.min_seq_len)


def _method_options(args: argparse.Namespace) -> dict[str, Any]:
    """Only the options given on the command line; the method checks names and values."""
    return {
        key.removeprefix("option_"): value
        for key, value in vars(args).items()
        if key.startswith("option_") and value is not None
    }


def _rewrite(args: argparse.Namespace, destination: Path) -> Any:
    from .onnx import rewrite_onnx

    return rewrite_onnx(
        args.input, destination, method=args.method, policy=_policy(args), **_method_options(args)
    )


def _cmd_onnx(args: argparse.Namespace) -> int:
    """Rewrite; the model and the JSON report appear only once both are written."""
    from .onnx.files import staged

    with staged(args.output) as written:
        report = _rewrite(args, written)
        if args.json:
            with staged(args.json) as report_file:
                report_file.write_text(report.to_json())
    print(report)
    print(f"wrote {args.output}")
    return EXIT_OK


def _cmd_report(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        report = _rewrite(args, Path(tmp) / "rewritten.onnx")
    print(report.to_json() if args.json else report)
    return EXIT_OK


def _cmd_bench(args: argparse.Namespace) -> int:
    from .onnx.bench import compare_latency

    rows = compare_latency(
        args.original,
        args.rewritten,
        args.seq_lens,
        batch=args.batch,
        repeats=args.repeats,
        progress=True,
    )
    print(f"{'seq_len':>8} {'original ms':>12} {'rewritten ms':>13} {'speedup':>8}")
    for row in rows:
        print(
            f"{row['seq_len']:>8} {row['original_ms']:>12.2f} {row['rewritten_ms']:>13.2f} "
            f"{row['speedup']:>7.2f}×"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="attnrewrite",
        description="Find softmax attention in ONNX models and replace it with a faster method "
        "(as ONNX local functions in standard ops: no custom op library needed).",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    onnx_cmd = commands.add_parser("onnx", help="rewrite the attention of an .onnx file")
    onnx_cmd.add_argument("input", type=Path, help="the .onnx model to read")
    onnx_cmd.add_argument("output", type=Path, help="where to write the rewritten model")
    onnx_cmd.add_argument("--json", help="also write the report as JSON to this file")
    _add_method_options(onnx_cmd)
    _add_selection(onnx_cmd)
    onnx_cmd.set_defaults(run=_cmd_onnx)

    report_cmd = commands.add_parser(
        "report", help="list the attention sites of an .onnx file and what a rewrite would do"
    )
    report_cmd.add_argument("input", type=Path, help="the .onnx model to inspect")
    report_cmd.add_argument("--json", action="store_true", help="print the report as JSON")
    _add_method_options(report_cmd)
    _add_selection(report_cmd)
    report_cmd.set_defaults(run=_cmd_report)

    bench_cmd = commands.add_parser(
        "bench", help="onnxruntime latency of an original vs a rewritten model over lengths"
    )
    bench_cmd.add_argument("original", type=Path, help="the original .onnx model")
    bench_cmd.add_argument("rewritten", type=Path, help="the rewritten .onnx model")
    bench_cmd.add_argument(
        "--seq-lens",
        type=int,
        nargs="+",
        default=[128, 256, 512],
        help="sequence lengths (the models need a dynamic length axis)",
    )
    bench_cmd.add_argument("--batch", type=int, default=1, help="batch size")
    bench_cmd.add_argument("--repeats", type=int, default=10, help="timed runs (median)")
    bench_cmd.add_argument("--json", help="also write the table as JSON to this file")
    bench_cmd.set_defaults(run=_cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for path in (getattr(args, name, None) for name in ("input", "original", "rewritten")):
        if path is not None and not path.is_file():
            why = "is a directory" if path.is_dir() else "does not exist"
            print(f"attnrewrite: error: {path} {why}; give an .onnx file", file=sys.stderr)
            return EXIT_USAGE
    for name in ("output", "json"):  # checked before any work, as a file is written last
        path = getattr(args, name, None)
        if isinstance(path, (str, Path)) and Path(path).is_dir():
            print(f"attnrewrite: error: {path} is a directory; give a file path", file=sys.stderr)
            return EXIT_USAGE
    try:
        return args.run(args)
    except (OptionError, ValueError) as error:
        print(f"attnrewrite: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as error:  # e.g. an output path that cannot be written
        print(f"attnrewrite: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except AttnRewriteError as error:
        print(f"attnrewrite: check failed: {error}", file=sys.stderr)
        return EXIT_CHECK_FAILED


if __name__ == "__main__":
    sys.exit(main())
