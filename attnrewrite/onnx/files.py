""".onnx files in and out: an input is checked before anything reads it, and an output appears
at its path only once every check of it has passed, so a failure never leaves a file behind."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import onnx

from ..errors import AttnRewriteError, UnsupportedInputError


def check_input(path: str | Path) -> None:
    """Raise UnsupportedInputError unless onnx.checker accepts the model file at `path` (an
    empty or truncated file parses as a model without a graph, which would be "rewritten")."""
    try:
        onnx.checker.check_model(str(path))  # by path: models past 2 GB and external data too
    except onnx.checker.ValidationError as error:
        raise UnsupportedInputError(
            f"{path} is not a valid ONNX model ({str(error).strip()}); give a model file as an "
            "exporter writes it (e.g. torch.onnx.export): a 0-byte or truncated file is a failed "
            "export or download"
        ) from error


def check_output(path: str | Path) -> None:
    """onnx.checker's full check (with shape inference) of a model this package wrote."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as error:
        raise AttnRewriteError(f"the written model fails onnx.checker: {error}") from error


@contextlib.contextmanager
def staged(destination: str | Path) -> Iterator[Path]:
    """A temporary path beside `destination`, moved onto it when the block succeeds and removed
    when it fails: a failed check leaves no file, and an existing `destination` as it was."""
    destination = Path(destination)
    # not mkstemp: its file is private (0600), and the output should get the usual permissions
    temporary = destination.with_name(f".{destination.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        yield temporary
        os.replace(temporary, destination)
    finally:
        temporary.unlink(missing_ok=True)
