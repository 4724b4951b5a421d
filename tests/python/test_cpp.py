"""The C++ tests, built as a consumer of the *installed* package (find_package(tinyserve) through
`python -m tinyserve --cmake-dir`), then run with ctest."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import tinyserve

CPP_TESTS = Path(__file__).resolve().parents[1] / "cpp"


def test_cmake_dir_points_at_the_package_config():
    out = subprocess.run(
        [sys.executable, "-m", "tinyserve", "--cmake-dir"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    assert out == tinyserve.cmake_dir()
    assert (Path(out) / "tinyserveConfig.cmake").is_file()
    assert (Path(out) / "tinyserveConfigVersion.cmake").is_file()


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
def test_cpp_consumer_builds_and_passes(tmp_path):
    build = tmp_path / "build"
    jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", "2")
    env = dict(os.environ, CMAKE_BUILD_PARALLEL_LEVEL=jobs)
    configure = subprocess.run(
        [
            "cmake",
            "-S",
            str(CPP_TESTS),
            "-B",
            str(build),
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DCMAKE_PREFIX_PATH={tinyserve.cmake_dir()}",
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert configure.returncode == 0, configure.stdout + configure.stderr
    compile_ = subprocess.run(
        ["cmake", "--build", str(build)], capture_output=True, text=True, env=env
    )
    assert compile_.returncode == 0, compile_.stdout + compile_.stderr
    run = subprocess.run(
        ["ctest", "--test-dir", str(build), "--output-on-failure"],
        capture_output=True,
        text=True,
        env=env,
    )
    print(run.stdout)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "tests passed" in run.stdout


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
def test_cpp_internals_build_and_pass(tmp_path):
    """The in-tree C++ tests of internals (test_internals: the prefix hash against known digests),
    built from the top-level project against its tinyserve_internal object library. The CPU
    backend only: test_cuda_kernels runs on CUDA machines (benchmarks/gpu_check.sh)."""
    build = tmp_path / "build"
    jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", "2")
    env = dict(os.environ, CMAKE_BUILD_PARALLEL_LEVEL=jobs)
    root = CPP_TESTS.parents[1]
    configure = subprocess.run(
        [
            "cmake",
            "-S",
            str(root),
            "-B",
            str(build),
            "-DCMAKE_BUILD_TYPE=Release",
            "-DTINYSERVE_CUDA=OFF",
            "-DTINYSERVE_BUILD_PYTHON=OFF",
            "-DTINYSERVE_BUILD_TESTS=ON",
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert configure.returncode == 0, configure.stdout + configure.stderr
    compile_ = subprocess.run(
        ["cmake", "--build", str(build), "--target", "test_internals"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert compile_.returncode == 0, compile_.stdout + compile_.stderr
    run = subprocess.run(
        ["ctest", "--test-dir", str(build), "-R", "^test_internals$", "--output-on-failure"],
        capture_output=True,
        text=True,
        env=env,
    )
    print(run.stdout)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "100% tests passed, 0 tests failed out of 1" in run.stdout
