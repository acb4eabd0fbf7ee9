"""The ``spa-prune`` command run as a user runs it: in a subprocess, reading exit codes and output.

Bad input must give exactly one clear line on stderr, a non-zero exit, no traceback, and leave
every file as it was (the input unchanged, no output and no temporary file left behind).
Good input must give a valid, smaller ONNX model whose numbers match the target.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import spa_compiler
from helpers import EXAMPLE, dynamic_example_file

CLI = [sys.executable, "-m", "spa_compiler.cli"]
FAST_CLI = ("--criterion", "l2", "--allocation", "score", "--refit", "0")  # the fast pipeline (see conftest)


# --------------------------------------------------------------------------- helpers


def run_cli(cwd: Path, *args: object, columns: int = 80, fast: bool = True) -> subprocess.CompletedProcess:
    """The CLI with ``args``; a pruning run uses the fast pipeline unless ``fast=False`` or the
    arguments choose for themselves (see conftest)."""
    env = {**os.environ, "COLUMNS": str(columns), "PYTHONWARNINGS": "default"}
    env.pop("FORCE_COLOR", None)
    words = [str(a) for a in args]
    prunes = any(w in ("--flops", "--params", "--ratio", "--latency") for w in words)
    chooses = any(w in ("--criterion", "--allocation", "--refit") for w in words)
    extra = list(FAST_CLI) if fast and prunes and not chooses else []
    return subprocess.run(
        [*CLI, *words, *extra], capture_output=True, text=True, cwd=cwd, env=env, timeout=300
    )


def snapshot(*roots: Path) -> dict[str, str]:
    """sha256 of every file under ``roots`` (names include hidden temporary files)."""
    files = {}
    for root in roots:
        paths = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for path in paths:
            files[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return files


def assert_one_line_error(result: subprocess.CompletedProcess, *patterns: str) -> str:
    """Non-zero exit, exactly one non-empty stderr line matching every regex in ``patterns``
    (case-insensitive), no traceback anywhere. Returns the line."""
    everything = result.stdout + result.stderr
    assert result.returncode != 0, f"expected a failure, got exit 0:\n{everything}"
    assert "Traceback" not in everything, everything
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one stderr line, got {len(lines)}:\n{result.stderr}"
    for pattern in patterns:
        assert re.search(pattern, lines[0], re.IGNORECASE), f"{pattern!r} not in: {lines[0]}"
    return lines[0]


def make_model(
    nodes, inputs, outputs, initializers=(), opset: int = 17, value_info=(), extra_opsets=()
) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers), value_info=list(value_info))
    opsets = [helper.make_opsetid("", opset), *(helper.make_opsetid(d, v) for d, v in extra_opsets)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8 if opset >= 15 else 7 if opset >= 13 else 5 if opset >= 10 else 3
    return model


def weight(name: str, *shape: int, seed: int = 0) -> onnx.TensorProto:
    rng = np.random.default_rng([zlib.crc32(name.encode()), seed])
    return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)


def tensor(name: str, shape, elem=TensorProto.FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, shape)


def conv_relu_conv(opset: int = 17) -> onnx.ModelProto:
    """x[1,3,8,8] -> Conv(16) -> Relu -> Conv(4) -> y: the 16 middle channels are prunable."""
    nodes = [
        helper.make_node("Conv", ["x", "W1", "B1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "W2"], ["y"], name="conv2", pads=[1, 1, 1, 1]),
    ]
    inits = [weight("W1", 16, 3, 3, 3), weight("B1", 16), weight("W2", 4, 16, 3, 3)]
    return make_model(nodes, [tensor("x", [1, 3, 8, 8])], [tensor("y", [1, 4, 8, 8])], inits, opset)


def save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, str(path))
    return path


@pytest.fixture
def example(tmp_path: Path) -> Path:
    """A private copy of the bundled example model."""
    return Path(shutil.copy(EXAMPLE, tmp_path / "mini_resnet.onnx"))


def signature(values) -> list[tuple[str, int, int]]:
    return [(v.name, v.type.tensor_type.elem_type, len(v.type.tensor_type.shape.dim)) for v in values]


def real_inputs(model: onnx.ModelProto):
    initializers = {t.name for t in model.graph.initializer}
    return [v for v in model.graph.input if v.name not in initializers]


def run_onnx(path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def seeded_input(*shape: int) -> np.ndarray:
    return np.random.default_rng(0).standard_normal(shape).astype(np.float32)


# --------------------------------------------------------------------------- bad input files


def test_missing_file(tmp_path):
    result = run_cli(tmp_path, "nothere.onnx", "--flops", "0.5", "--bench-runs", "0")
    assert_one_line_error(result, r"nothere\.onnx", r"no such file")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["model[v2].onnx", "odd[/]name.onnx", "[bold]x.onnx"])
def test_missing_file_with_brackets_is_named_verbatim(tmp_path, name):
    """Paths are data, not rich markup: the message shows the path exactly and never crashes."""
    result = run_cli(tmp_path, name, "--flops", "0.5", "--bench-runs", "0")
    assert_one_line_error(result, re.escape(name), r"no such file")


def test_no_model_given(tmp_path):
    result = run_cli(tmp_path, "--flops", "0.5")
    assert_one_line_error(result, r"give a model")


def test_directory_as_model(tmp_path):
    (tmp_path / "adir.onnx").mkdir()
    before = snapshot(tmp_path)
    result = run_cli(tmp_path, "adir.onnx", "--flops", "0.5", "--bench-runs", "0")
    assert_one_line_error(result, r"adir\.onnx", r"directory")
    assert snapshot(tmp_path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir.onnx"]


@pytest.mark.parametrize(
    "content",
    [b"this is not a model\n", b"", bytes(range(256)) * 4],
    ids=["text", "empty", "binary-garbage"],
)
def test_not_an_onnx_file(tmp_path, content):
    bad = tmp_path / "x.onnx"
    bad.write_bytes(content)
    before = snapshot(tmp_path)
    result = run_cli(tmp_path, "x.onnx", "--flops", "0.5", "--bench-runs", "0")
    assert_one_line_error(result, r"x\.onnx", r"not an? (readable )?ONNX model")
    assert snapshot(tmp_path) == before


def test_truncated_onnx_file(tmp_path):
    data = EXAMPLE.read_bytes()
    bad = tmp_path / "truncated.onnx"
    bad.write_bytes(data[: len(data) // 2])
    before = snapshot(tmp_path)
    result = run_cli(tmp_path, "truncated.onnx", "--flops", "0.5", "--bench-runs", "0", "-o", "out.onnx")
    assert_one_line_error(result, r"truncated\.onnx", r"not an? (readable )?ONNX model|complete")
    assert snapshot(tmp_path) == before


def test_missing_external_data_file(tmp_path):
    model = onnx.load(str(EXAMPLE))
    path = tmp_path / "ext.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="w.data", size_threshold=0)
    (tmp_path / "w.data").unlink()
    before = snapshot(tmp_path)
    result = run_cli(tmp_path, "ext.onnx", "--flops", "0.5", "--bench-runs", "0", "-o", "out.onnx")
    assert_one_line_error(result, r"ext\.onnx", r"external")
    assert snapshot(tmp_path) == before


# --------------------------------------------------------------------------- bad output paths


def _assert_output_failure(tmp_path, example, output, *patterns):
    before = snapshot(tmp_path)
    result = run_cli(tmp_path, example.name, "--flops", "0.5", "--bench-runs", "0", "-o", output)
    line = assert_one_line_error(result, *patterns)
    assert snapshot(tmp_path) == before, "a file was created, changed or left behind"
    return line


def test_output_in_missing_directory(tmp_path, example):
    _assert_output_failure(tmp_path, example, "nodir/out.onnx", r"nodir", r"does not exist|cannot write")
    assert not (tmp_path / "nodir").exists()


def test_output_parent_is_a_file(tmp_path, example):
    (tmp_path / "afile").write_text("x")
    _assert_output_failure(tmp_path, example, "afile/out.onnx", r"afile", r"does not exist|cannot write|not a directory")


def test_output_is_a_directory(tmp_path, example):
    (tmp_path / "outdir").mkdir()
    _assert_output_failure(tmp_path, example, "outdir", r"outdir", r"directory")
    assert list((tmp_path / "outdir").iterdir()) == []


def test_output_in_read_only_directory(tmp_path, example):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        if os.access(locked, os.W_OK):  # root ignores permission bits: use a directory no one can write
            output = "/proc/spa_prune_test_out.onnx"
        else:
            output = "locked/out.onnx"
        line = _assert_output_failure(tmp_path, example, output, r"not writable|cannot write")
        assert "internal error" not in line
        assert not Path(output).exists() and not (tmp_path / output).exists()
    finally:
        locked.chmod(0o755)


def test_output_same_as_input_is_refused(tmp_path, example):
    """The input is never modified, even when -o names it."""
    before = snapshot(tmp_path)
    result = run_cli(tmp_path, example.name, "--flops", "0.5", "--bench-runs", "0", "-o", example.name)
    assert_one_line_error(result, re.escape(example.name))
    assert snapshot(tmp_path) == before


def test_unwritable_json_report_fails_before_writing_the_model(tmp_path, example):
    before = snapshot(tmp_path)
    result = run_cli(tmp_path, example.name, "--flops", "0.5", "--bench-runs", "0", "-o", "out.onnx",
                     "--json-report", "nodir/r.json")
    assert_one_line_error(result, r"nodir", r"does not exist|cannot write")
    assert snapshot(tmp_path) == before


# --------------------------------------------------------------------------- models spa-prune refuses


def custom_op_model() -> onnx.ModelProto:
    """A chain through an unknown custom op (shape declared in value_info) and a separate
    prunable chain: conv1 -> relu1 -> com.example::Mystery -> conv2 ; conv3 -> relu3 -> conv4."""
    nodes = [
        helper.make_node("Conv", ["x", "W1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Mystery", ["r1"], ["m1"], name="mystery", domain="com.example"),
        helper.make_node("Conv", ["m1", "W2"], ["y"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["x", "W3", "B3"], ["c3"], name="conv3", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c3"], ["r3"], name="relu3"),
        helper.make_node("Conv", ["r3", "W4"], ["z"], name="conv4"),
    ]
    inits = [weight("W1", 8, 3, 3, 3), weight("W2", 8, 8, 3, 3), weight("W3", 16, 3, 3, 3),
             weight("B3", 16), weight("W4", 4, 16, 1, 1)]
    return make_model(
        nodes, [tensor("x", [1, 3, 8, 8])], [tensor("y", [1, 8, 8, 8]), tensor("z", [1, 4, 8, 8])], inits,
        value_info=[tensor("m1", [1, 8, 8, 8])], extra_opsets=[("com.example", 1)],
    )


def test_custom_op_is_a_barrier_in_analysis(tmp_path):
    save(custom_op_model(), tmp_path / "custom.onnx")
    result = run_cli(tmp_path, "custom.onnx", "--analyze", columns=200)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    barriers = [line for line in result.stdout.splitlines() if line.startswith("barrier:")]
    assert any("com.example::Mystery" in line and "mystery" in line for line in barriers), result.stdout


def test_custom_op_pruning_prunes_around_it(tmp_path):
    path = save(custom_op_model(), tmp_path / "custom.onnx")
    before = snapshot(tmp_path)
    result = run_cli(tmp_path, "custom.onnx", "--flops", "0.85", "--bench-runs", "0", "-o", "out.onnx", fast=False)
    assert result.returncode == 0, result.stdout + result.stderr
    pruned = onnx.load(str(tmp_path / "out.onnx"))
    assert [n.op_type for n in pruned.graph.node].count("Mystery") == 1
    kept = {t.name: tuple(t.dims) for t in pruned.graph.initializer}
    assert kept["W1"] == (8, 3, 3, 3) and kept["W2"] == (8, 8, 3, 3), "channels through the custom op changed"
    assert kept["W3"][0] < 16
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before[str(path)]
    assert "onnxruntime cannot run com.example::Mystery" in " ".join(result.stdout.split())


def test_custom_op_beyond_reach_fails_cleanly(tmp_path):
    save(custom_op_model(), tmp_path / "custom.onnx")
    before = snapshot(tmp_path)
    # conv3 at its minimum width (rounded finer than 8 to get there) leaves 0.663 of the MACs
    result = run_cli(tmp_path, "custom.onnx", "--flops", "0.6", "--bench-runs", "0", "-o", "out.onnx")
    assert_one_line_error(result, r"cannot reach --flops 0\.6", r"best reachable is 0\.663", r"Mystery")
    assert snapshot(tmp_path) == before


def test_nothing_prunable(tmp_path):
    nodes = [helper.make_node("Conv", ["x", "W"], ["y"], name="only_conv", pads=[1, 1, 1, 1])]
    save(make_model(nodes, [tensor("x", [1, 3, 8, 8])], [tensor("y", [1, 8, 8, 8])], [weight("W", 8, 3, 3, 3)]),
         tmp_path / "single.onnx")
    before = snapshot(tmp_path)
    result = run_cli(tmp_path, "single.onnx", "--flops", "0.5", "--bench-runs", "0", "-o", "out.onnx")
    assert_one_line_error(result, r"nothing in this model can be pruned; blocked by: .*graph output")
    assert snapshot(tmp_path) == before


def test_model_without_weighted_layers_says_so(tmp_path):
    """A graph of element-wise ops has no channel groups at all: the error says what it lacks."""
    save(make_model([helper.make_node("Add", ["x", "x"], ["y"])], [tensor("x", [1, 4])], [tensor("y", [1, 4])], []),
         tmp_path / "add.onnx")
    before = snapshot(tmp_path)
    result = run_cli(tmp_path, "add.onnx", "--flops", "0.5", "--bench-runs", "0", "-o", "out.onnx")
    assert_one_line_error(result, r"nothing in this model can be pruned; it has no layer with weight channels to remove")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("kind", ["blockwise", "qlinearconv"])
def test_quantized_model_not_understood(tmp_path, kind):
    if kind == "blockwise":
        rng = np.random.default_rng(0)
        nodes = [
            helper.make_node("DequantizeLinear", ["Wq", "Ws"], ["W1"], name="dequant", axis=1, block_size=8),
            helper.make_node("Conv", ["x", "W1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
            helper.make_node("Conv", ["r1", "W2"], ["y"], name="conv2", pads=[1, 1, 1, 1]),
        ]
        inits = [numpy_helper.from_array(rng.integers(-100, 100, (16, 16, 3, 3)).astype(np.int8), "Wq"),
                 numpy_helper.from_array(np.full((16, 2, 3, 3), 0.01, np.float32), "Ws"),
                 weight("W2", 4, 16, 3, 3)]
        model = make_model(nodes, [tensor("x", [1, 16, 8, 8])], [tensor("y", [1, 4, 8, 8])], inits, 21)
    else:
        rng = np.random.default_rng(0)
        nodes = [helper.make_node("QLinearConv", ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz"], ["y"],
                                  name="qconv", pads=[1, 1, 1, 1])]
        inits = [numpy_helper.from_array(np.array(0.1, np.float32), "xs"),
                 numpy_helper.from_array(np.array(0, np.uint8), "xz"),
                 numpy_helper.from_array(rng.integers(0, 255, (8, 3, 3, 3)).astype(np.uint8), "w"),
                 numpy_helper.from_array(np.array(0.1, np.float32), "ws"),
                 numpy_helper.from_array(np.array(0, np.uint8), "wz"),
                 numpy_helper.from_array(np.array(0.1, np.float32), "ys"),
                 numpy_helper.from_array(np.array(0, np.uint8), "yz")]
        model = make_model(nodes, [tensor("x", [1, 3, 8, 8], TensorProto.UINT8)],
                           [tensor("y", [1, 8, 8, 8], TensorProto.UINT8)], inits, 13)
    onnx.checker.check_model(model, full_check=True)
    save(model, tmp_path / "q.onnx")
    before = snapshot(tmp_path)
    result = run_cli(tmp_path, "q.onnx", "--flops", "0.5", "--bench-runs", "0", "-o", "out.onnx")
    assert_one_line_error(result, r"quantized model: its (DequantizeLinear node 'dequant' quantizes block-wise|"
                                  r"QLinearConv node 'qconv' is in the QOperator format)")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("opset", [7, 24])
def test_opset_outside_supported_range(tmp_path, opset):
    model = conv_relu_conv(opset)
    model.ir_version = 11 if opset > 17 else 3
    save(model, tmp_path / "old.onnx")
    before = snapshot(tmp_path)
    result = run_cli(tmp_path, "old.onnx", "--flops", "0.5", "--bench-runs", "0", "-o", "out.onnx")
    assert_one_line_error(result, rf"opset {opset}\b")
    assert snapshot(tmp_path) == before


def test_model_onnxruntime_cannot_load_is_a_clear_user_error(tmp_path):
    """A model with a newer IR version than onnxruntime reads: one line naming the IR version,
    not an 'internal error'."""
    model = conv_relu_conv()
    model.ir_version = onnx.IR_VERSION  # what onnx.helper.make_model writes by default
    try:
        ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        pytest.skip(f"onnxruntime {ort.__version__} reads IR version {onnx.IR_VERSION}")
    except Exception:
        pass
    save(model, tmp_path / "new_ir.onnx")
    before = snapshot(tmp_path)
    result = run_cli(tmp_path, "new_ir.onnx", "--flops", "0.5", "--bench-runs", "0", "-o", "out.onnx")
    line = assert_one_line_error(result, r"IR[ _]version")
    assert "internal error" not in line
    assert snapshot(tmp_path) == before


# --------------------------------------------------------------------------- dynamic input shapes


@pytest.fixture
def dynamic_example(tmp_path: Path) -> Path:
    return dynamic_example_file(tmp_path)


def test_dynamic_spatial_dims_need_input_shape(tmp_path, dynamic_example):
    before = snapshot(tmp_path)
    result = run_cli(tmp_path, "dyn.onnx", "--flops", "0.5", "--bench-runs", "0", "-o", "out.onnx")
    assert_one_line_error(result, r"'input'|\binput\b", r"--input-shape")
    assert snapshot(tmp_path) == before


def test_dynamic_dims_bound_with_input_shape(tmp_path, dynamic_example):
    result = run_cli(tmp_path, "dyn.onnx", "--flops", "0.5", "--bench-runs", "0", "-o", "out.onnx",
                     "--input-shape", "input=1x3x32x32", "--json-report", "r.json")
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert 0.45 <= report["flops_ratio"] <= 0.52
    pruned = onnx.load(str(tmp_path / "out.onnx"))
    onnx.checker.check_model(pruned, full_check=True)
    dims = real_inputs(pruned)[0].type.tensor_type.shape.dim
    assert [d.dim_param for d in dims] == ["N", "", "H", "W"], "the pruned model lost its dynamic dimensions"
    (out,) = run_onnx(tmp_path / "out.onnx", {"input": seeded_input(2, 3, 48, 40)})
    assert out.shape == (2, 10)


@pytest.mark.parametrize(
    "spec, patterns",
    [
        ("input=1x3", [r"input", r"dimensions"]),
        ("foo=1x3x32x32", [r"foo", r"not a graph input"]),
        ("input=1x3xHx32", [r"input=1x3xHx32", r"NAME=1x3x224x224"]),
        ("1x3x32x32", [r"1x3x32x32", r"NAME=1x3x224x224"]),
        ("input=1x4x32x32", [r"input", r"fixed to 3"]),
    ],
    ids=["wrong-rank", "unknown-name", "not-a-number", "no-name", "contradicts-model"],
)
def test_bad_input_shape(tmp_path, dynamic_example, spec, patterns):
    before = snapshot(tmp_path)
    result = run_cli(tmp_path, "dyn.onnx", "--flops", "0.5", "--bench-runs", "0", "-o", "out.onnx",
                     "--input-shape", spec)
    assert_one_line_error(result, *patterns)
    assert snapshot(tmp_path) == before


# --------------------------------------------------------------------------- bad options


@pytest.mark.parametrize(
    "args, patterns",
    [
        (["--flops", "1.5"], [r"--flops", r"1\.5"]),
        (["--flops", "0"], [r"--flops"]),
        (["--flops", "-0.5"], [r"--flops"]),
        (["--params", "1"], [r"--params"]),
        (["--ratio", "0"], [r"--ratio"]),
        ([], [r"exactly one target"]),
        (["--flops", "0.5", "--params", "0.5"], [r"exactly one target"]),
        (["--flops", "0.5", "--criterion", "nope"], [r"nope", r"l2"]),
        (["--flops", "0.5", "--scope", "everywhere"], [r"--scope", r"everywhere"]),
        (["--flops", "0.5", "--round-to", "0"], [r"--round-to"]),
        (["--flops", "0.5", "--min-keep", "1.5"], [r"--min-keep"]),
        (["--flops", "0.5", "--exclude", "no_such_node"], [r"no_such_node", r"not a node"]),
        (["--flops", "0.1", "--min-keep", "0.5"], [r"cannot reach", r"0\.1\b"]),
    ],
    ids=["flops>1", "flops=0", "flops<0", "params=1", "ratio=0", "no-target", "two-targets",
         "unknown-criterion", "bad-scope", "round-to-0", "min-keep>1", "unknown-exclude", "unreachable"],
)
def test_bad_options(tmp_path, example, args, patterns):
    before = snapshot(tmp_path)
    result = run_cli(tmp_path, example.name, *args, "--bench-runs", "0", "-o", "out.onnx")
    assert_one_line_error(result, *patterns)
    assert snapshot(tmp_path) == before


def test_negative_bench_runs_is_rejected(tmp_path, example):
    before = snapshot(tmp_path)
    result = run_cli(tmp_path, example.name, "--flops", "0.5", "--bench-runs", "-1", "-o", "out.onnx")
    assert_one_line_error(result, r"--bench-runs")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("args", [["--flops", "abc"], ["--flop", "0.5"]], ids=["not-a-number", "unknown-option"])
def test_usage_errors_are_one_line(tmp_path, example, args):
    before = snapshot(tmp_path)
    result = run_cli(tmp_path, example.name, *args, "--bench-runs", "0", "-o", "out.onnx")
    assert_one_line_error(result, re.escape(args[0]), r"\(see spa-prune --help\)$")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("command", ["sweep", "distill"])
def test_a_commands_usage_error_points_to_its_own_help(tmp_path, example, command):
    result = run_cli(tmp_path, command, example.name, "--no-such-option")
    assert_one_line_error(result, "--no-such-option", rf"\(see spa-prune {command} --help\)$")


# --------------------------------------------------------------------------- good paths


def test_prune_example(tmp_path, example):
    before = snapshot(example)
    result = run_cli(tmp_path, example.name, "--flops", "0.5", "-o", "out.onnx", "--bench-runs", "0",
                     "--json-report", "r.json")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stderr.strip() == ""
    assert snapshot(example) == before, "the input model was modified"

    report = json.loads((tmp_path / "r.json").read_text())
    assert 0.45 <= report["flops_ratio"] <= 0.52
    assert report["params_ratio"] < 1
    assert report["macs_after"] < report["macs_before"]
    assert report["target_kind"] == "flops" and report["target_value"] == 0.5
    assert report["output"].endswith("out.onnx")
    assert report["versions"] == {"spa-prune": spa_compiler.__version__, "onnx": onnx.__version__,
                                  "onnxruntime": ort.__version__, "numpy": np.__version__,
                                  "python": ".".join(map(str, sys.version_info[:3]))}

    original, pruned = onnx.load(str(example)), onnx.load(str(tmp_path / "out.onnx"))
    onnx.checker.check_model(pruned, full_check=True)
    assert signature(real_inputs(pruned)) == signature(real_inputs(original))
    assert signature(pruned.graph.output) == signature(original.graph.output)
    assert (tmp_path / "out.onnx").stat().st_size < example.stat().st_size
    (out,) = run_onnx(tmp_path / "out.onnx", {"input": seeded_input(1, 3, 32, 32)})
    assert out.shape == (1, 10) and np.isfinite(out).all()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mini_resnet.onnx", "out.onnx", "r.json"]


def test_report_is_printed(tmp_path, example):
    result = run_cli(tmp_path, example.name, "--params", "0.6", "--bench-runs", "0", "-o", "out.onnx", columns=200)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "FLOPs" in result.stdout and "parameters" in result.stdout
    assert "target --params 0.6" in result.stdout
    assert "verified" in result.stdout


def test_default_output_name(tmp_path, example):
    result = run_cli(tmp_path, example.name, "--flops", "0.5", "--bench-runs", "0")
    assert result.returncode == 0, result.stdout + result.stderr
    out = tmp_path / "mini_resnet.pruned.onnx"
    assert out.is_file()
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mini_resnet.onnx", "mini_resnet.pruned.onnx"]


def test_default_output_name_beside_input_in_another_directory(tmp_path, example):
    sub = tmp_path / "models"
    sub.mkdir()
    shutil.move(example, sub / example.name)
    result = run_cli(tmp_path, "models/mini_resnet.onnx", "--flops", "0.5", "--bench-runs", "0")
    assert result.returncode == 0, result.stdout + result.stderr
    assert (sub / "mini_resnet.pruned.onnx").is_file()
    assert not (tmp_path / "mini_resnet.pruned.onnx").exists()


def test_deterministic_output(tmp_path, example):
    for name in ("a.onnx", "b.onnx"):
        result = run_cli(tmp_path, example.name, "--flops", "0.5", "--bench-runs", "0", "-o", name)
        assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()


def test_the_report_title_names_the_files_without_their_folders(tmp_path, example):
    """A model deep in site-packages would wrap the table's title over lines; the title names
    the files (their paths when the names are the same), the JSON report keeps the paths."""
    deep = tmp_path / "lib" / "python3.11" / "site-packages" / "vendor" / "models"
    deep.mkdir(parents=True)
    (deep / "det.onnx").write_bytes(example.read_bytes())
    result = run_cli(tmp_path, deep / "det.onnx", "--flops", "0.5", "--bench-runs", "0", "-o", "small.onnx",
                     "--json-report", "r.json")
    assert result.returncode == 0, result.stdout + result.stderr
    title = result.stdout.split("┏")[0]  # what comes before the table (the hints after it name the path)
    assert "spa-prune: det.onnx -> small.onnx" in title and "site-packages" not in title
    assert json.loads((tmp_path / "r.json").read_text())["input"] == str(deep / "det.onnx")
    result = run_cli(tmp_path, deep / "det.onnx", "--flops", "0.5", "--bench-runs", "0", "-o", "det.onnx")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"spa-prune:{deep / 'det.onnx'}->det.onnx" in "".join(result.stdout.split())  # wrapped over lines


def test_output_file_permissions_follow_umask(tmp_path, example):
    """The pruned model is an ordinary file: readable by whoever could read a file the user
    creates (mode 0o666 & ~umask), not private like a temporary file."""
    result = run_cli(tmp_path, example.name, "--flops", "0.5", "--bench-runs", "0", "-o", "out.onnx")
    assert result.returncode == 0, result.stdout + result.stderr
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "out.onnx").stat().st_mode & 0o777 == 0o666 & ~umask


def test_existing_output_is_replaced(tmp_path, example):
    (tmp_path / "out.onnx").write_bytes(b"old")
    result = run_cli(tmp_path, example.name, "--flops", "0.5", "--bench-runs", "0", "-o", "out.onnx")
    assert result.returncode == 0, result.stdout + result.stderr
    onnx.checker.check_model(onnx.load(str(tmp_path / "out.onnx")), full_check=True)


def test_bench_runs_reports_latency(tmp_path, example):
    result = run_cli(tmp_path, example.name, "--flops", "0.5", "--bench-runs", "2", "-o", "out.onnx",
                     "--json-report", "r.json")
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["latency_before_ms"] > 0 and report["latency_after_ms"] > 0


def test_analyze_prints_groups_and_writes_nothing(tmp_path, example):
    before = snapshot(tmp_path)
    result = run_cli(tmp_path, example.name, "--analyze", columns=200)
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"\b9 groups\b", result.stdout), result.stdout
    assert "Conv" in result.stdout
    assert snapshot(tmp_path) == before


def test_list_ops(tmp_path):
    result = run_cli(tmp_path, "--list-ops", columns=200)
    assert result.returncode == 0, result.stderr
    ops = {line.split("│")[1].strip() for line in result.stdout.splitlines() if line.count("│") >= 3}
    assert {"Conv", "Concat", "Reshape", "Gemm", "BatchNormalization"} <= ops, ops
    assert "barrier" in result.stdout


def test_version_names_spa_prune_and_what_it_runs_on(tmp_path):
    result = run_cli(tmp_path, "--version")
    assert result.returncode == 0 and result.stderr == ""
    installed = importlib.metadata.version("spa-prune")  # the package's version is spa_compiler.__version__
    assert installed == spa_compiler.__version__
    assert re.fullmatch(rf"spa-prune {re.escape(installed)} \(onnx {re.escape(onnx.__version__)}, onnxruntime "
                        rf"{re.escape(ort.__version__)}, numpy {re.escape(np.__version__)}, Python 3\.\d+\.\d+\)",
                        result.stdout.strip())


def test_list_criteria(tmp_path):
    result = run_cli(tmp_path, "--list-criteria", columns=200)
    assert result.returncode == 0, result.stderr
    names = {line.split("│")[1].strip() for line in result.stdout.splitlines() if line.count("│") >= 3}
    assert {"l1", "l2", "random", "bn_scale"} <= names, names


def test_help_shows_examples_and_default_output(tmp_path):
    result = run_cli(tmp_path, "--help", columns=200)
    assert result.returncode == 0, result.stderr
    assert "spa-prune model.onnx --flops 0.5 -o small.onnx" in result.stdout
    assert "--input-shape" in result.stdout and "--list-criteria" in result.stdout
    assert "pruned.onnx" in result.stdout, "--help does not say where the output goes by default"


def test_installed_console_script(tmp_path, example):
    exe = shutil.which("spa-prune")
    if exe is None:
        pytest.skip("spa-prune console script not on PATH")
    result = subprocess.run([exe, example.name, "--flops", "0.5", "--bench-runs", "0", "-o", "out.onnx"],
                            capture_output=True, text=True, cwd=tmp_path, timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "out.onnx").is_file()
    bad = subprocess.run([exe, "nothere.onnx", "--flops", "0.5"], capture_output=True, text=True,
                         cwd=tmp_path, timeout=180)
    assert_one_line_error(bad, r"nothere\.onnx")
