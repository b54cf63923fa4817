"""The command line: rewrite, report and bench on a small exported attention model; exit codes
and errors that name the fix."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

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


@pytest.fixture(scope="module")
def small_onnx(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "small.onnx"
    seq = torch.export.Dim("seq", min=2, max=256)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            Attention().eval(),
            (torch.randn(1, 24, 16),),
            path,
            dynamo=True,
            dynamic_shapes=({1: seq},),
            verbose=False,
        )
    return path


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
        (["onnx", str(corrupt), str(tmp_path / "o.onnx")], "not an ONNX model"),
        (["onnx", str(tmp_path), str(tmp_path / "o.onnx")], "is a directory"),
        (["onnx", str(small_onnx), str(tmp_path)], "Is a directory"),
        (["bench", str(corrupt), str(small_onnx)], "not an ONNX model"),
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
