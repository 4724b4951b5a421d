"""The GPU benchmarks' dry runs: each script builds its cases shrunk on the CPU and checks every
input description (tinyserve's and the one handed to FlashInfer) against a float64 reference,
exiting non-zero on a wrong or failed case, so a broken benchmark shows before the GPU run."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.mark.parametrize(
    "script, extra",
    [
        ("bench_decode.py", ["--cases", "base", "HND", "ragged", "page 1", "group 8", "37 x"]),
        ("bench_decode.py", ["--kv-dtype", "fp8", "--cases", "base", "HND", "bfloat16"]),
        ("bench_prefill.py", []),
        ("calibrate_splits.py", ["--kv-dtypes", "float16,fp8", "--spreads", "equal,0-2"]),
        ("bench_decode_shapes.py", []),
    ],
)
def test_benchmark_dry_run(script, extra, tmp_path):
    result_file = tmp_path / "results.json"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), "--dry-run", "--json", str(result_file), *extra],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert result_file.stat().st_size > 0


@pytest.mark.parametrize("spread", ["2-1", "abc", "0.5"])
def test_calibrate_splits_refuses_a_bad_spread(spread):
    """A malformed length spread stops calibrate_splits.py before any case, naming it."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "calibrate_splits.py"), "--dry-run", "--spreads", spread],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode != 0
    assert f"got {spread}" in done.stderr
    assert "plan" not in done.stdout  # no case ran


@pytest.mark.parametrize("shapes", ["8", "8x", "0x64", "2x100", "1x512,4"])
def test_bench_decode_shapes_refuses_a_bad_shape(shapes):
    """A malformed or partial-page shape stops bench_decode_shapes.py before any case, naming it."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    done = subprocess.run(
        [
            sys.executable,
            str(BENCHMARKS / "bench_decode_shapes.py"),
            "--dry-run",
            "--shapes",
            shapes,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode != 0
    assert f"got {shapes}" in done.stderr
    assert "|" not in done.stdout  # no case ran


def test_bench_decode_shapes_dry_run_catches_a_wrong_case(monkeypatch):
    """The dry run's float64 check fails when the case it checks is not the one attended (here the
    reference reads each sequence's attention over the next sequence's pages)."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import bench_decode_shapes as bench
    import numpy as np

    right = bench.reference
    row = bench.time_shape(3, 96, 1, np.random.default_rng(1), "cpu")
    assert row["max_abs_error"] < 2e-3
    monkeypatch.setattr(
        bench, "reference", lambda q, k, v, t, c: right(q, k, v, t.roll(1, dims=0), c)
    )
    with pytest.raises(SystemExit, match="differs from float64"):
        bench.time_shape(3, 96, 1, np.random.default_rng(1), "cpu")
