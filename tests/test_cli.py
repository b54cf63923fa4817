"""The command line: rewrite, report and bench on a small exported attention model; exit codes
and errors that name the fix."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import onnx
import pytest
import torch

from attnrewrite.cli import EXIT_OK, EXIT_USAGE, main


class Attention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(16, 48)

    def forward(self, x):
        q, k, v = self.qkv(x).unflatten(-1, (3, 2, 8)).permute(2, 0, 3, 1, 4)
        return torch.softmax(q @ k.transpose(-2, -1) / 8**0.5, dim=-1) @ v


def export(path, dynamic_shapes=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            Attention().eval(),
            (torch.randn(1, 24, 16),),
            path,
            dynamo=True,
            dynamic_shapes=dynamic_shapes,
            verbose=False,
        )
    return path


@pytest.fixture(scope="module")
def small_onnx(tmp_path_factory):
    seq = torch.export.Dim("seq", min=2, max=256)
    return export(tmp_path_factory.mktemp("cli") / "small.onnx", ({1: seq},))


@pytest.fixture(scope="module")
def static_onnx(tmp_path_factory):
    return export(tmp_path_factory.mktemp("cli") / "static.onnx")


@pytest.mark.slow
def test_onnx_report_and_bench_commands(small_onnx, tmp_path, capsys):
    out, report_json = tmp_path / "out.onnx", tmp_path / "report.json"
    argv = ["onnx", str(small_onnx), str(out), "--block-size", "4", "--json", str(report_json)]
    assert main(argv) == EXIT_OK
    assert json.loads(report_json.read_text())["sites"][0]["status"] == "replaced"
    assert main(["report", str(small_onnx), "--block-size", "4", "--num-steps", "1", "--json"]) == 0
    printed = capsys.readouterr().out
    assert '"num_steps": 1' in printed
    bench_json = tmp_path / "bench.json"
    argv = [
        "bench",
        str(small_onnx),
        str(out),
        "--seq-lens",
        "16",
        "40",
        "--repeats",
        "2",
        "--json",
        str(bench_json),
    ]
    assert main(argv) == EXIT_OK
    rows = json.loads(bench_json.read_text())
    assert [r["seq_len"] for r in rows] == [16, 40]
    assert all(r["original_ms"] > 0 and r["rewritten_ms"] > 0 for r in rows)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["onnx", "missing.onnx", "out.onnx"], "missing.onnx does not exist"),
        (["onnx", "{model}", "out.onnx", "--block-size", "0"], "block_size must be a positive"),
        (
            ["onnx", "{model}", "out.onnx", "--block-size", "4", "--min-seq-len", "8"],
            "cannot decide the dynamic sequence length seq",
        ),
    ],
)
def test_errors_name_the_problem_and_exit_2(argv, message, small_onnx, tmp_path, capsys):
    argv = [
        a.replace("{model}", str(small_onnx)).replace("out.onnx", str(tmp_path / "o.onnx"))
        for a in argv
    ]
    assert main(argv) == EXIT_USAGE
    assert message in capsys.readouterr().err


def test_python_dash_m_and_help():
    result = subprocess.run(
        [sys.executable, "-m", "attnrewrite", "onnx", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0
    assert "--block-size" in result.stdout and "--method" in result.stdout


def test_unreadable_inputs_and_outputs_exit_2_with_a_message(small_onnx, tmp_path, capsys):
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"not a model")
    cases = [
        (["onnx", str(corrupt), str(tmp_path / "o.onnx")], "is not a valid ONNX model"),
        (["onnx", str(tmp_path), str(tmp_path / "o.onnx")], "is a directory"),
        (["onnx", str(small_onnx), str(tmp_path)], "is a directory; give a file path"),
        (["bench", str(corrupt), str(small_onnx)], "is not a valid ONNX model"),
    ]
    for argv, message in cases:
        assert main(argv) == EXIT_USAGE, argv
        assert message in capsys.readouterr().err, argv


def test_tuple_options_and_layer_lists_parse(small_onnx, tmp_path, capsys):
    out = tmp_path / "hsa.onnx"
    argv = ["onnx", str(small_onnx), str(out), "--method", "hsa", "--branching", "4,2"]
    assert main(argv) == EXIT_OK
    assert "branching=(4, 2)" in capsys.readouterr().out
    for bad, message in (
        (["--layers", "a,b"], "comma-separated integers"),
        (["--method", "sdpa"], "invalid choice: 'sdpa'"),
    ):
        with pytest.raises(SystemExit) as exit_code:
            main(["onnx", str(small_onnx), str(out), *bad])
        assert exit_code.value.code == EXIT_USAGE
        assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "content",
    [b"", onnx.ModelProto(ir_version=8).SerializeToString(), b"\x3a\x00"],
    ids=["0 bytes", "ir_version only", "empty graph field"],
)
def test_a_file_that_is_no_valid_model_exits_2_and_writes_nothing(content, tmp_path, capsys):
    """An empty or minimal protobuf parses as a model without a graph: it is refused up front
    with the fix, not rewritten into an output file that onnx.checker then rejects."""
    model = tmp_path / "in.onnx"
    model.write_bytes(content)
    for argv in (["onnx", str(model), str(tmp_path / "out.onnx")], ["report", str(model)]):
        assert main(argv) == EXIT_USAGE
        err = capsys.readouterr().err
        assert "is not a valid ONNX model" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == [model]  # no output, no temporary file


@pytest.mark.slow
def test_a_failure_after_the_rewrite_leaves_no_output(small_onnx, tmp_path, capsys):
    out, report_json = tmp_path / "out.onnx", tmp_path / "missing" / "report.json"
    argv = ["onnx", str(small_onnx), str(out), "--block-size", "4", "--json", str(report_json)]
    assert main(argv) == EXIT_USAGE
    assert "No such file or directory" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "bench needs dynamic batch and length axes"),
        (["--batch", "2"], "dim 0 of x is fixed at 1, not batch 2"),
    ],
)
def test_bench_of_a_static_shape_model_exits_2(extra, message, static_onnx, small_onnx, capsys):
    """Every length would otherwise be timed at the one shape the model fixes."""
    argv = ["bench", str(static_onnx), str(small_onnx), "--seq-lens", "16", "32", *extra]
    assert main(argv) == EXIT_USAGE
    err = capsys.readouterr().err
    assert message in err and "dynamic_shapes=" in err


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--repeats", "0"], "repeats must be an int ≥ 1 (the timed runs whose median"),
        (["--batch", "0"], "batch must be an int ≥ 1"),
        (["--seq-lens", "0"], "each sequence length must be an int ≥ 1"),
    ],
)
def test_bench_counts_below_1_exit_2_with_the_reason(option, message, small_onnx, capsys):
    assert main(["bench", str(small_onnx), str(small_onnx), *option]) == EXIT_USAGE
    assert message in capsys.readouterr().err
