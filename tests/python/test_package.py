"""Packaging: version, stubs, CLI, backend queries."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import tinyserve
import tinyserve as ts


def test_version_matches_header():
    header = Path(tinyserve.cmake_dir()).parents[2] / "include" / "tinyserve" / "version.h"
    assert f'#define TINYSERVE_VERSION "{tinyserve.__version__}"' in header.read_text()
    out = subprocess.run(
        [sys.executable, "-m", "tinyserve", "--version"], check=True, capture_output=True, text=True
    ).stdout.strip()
    assert out == tinyserve.__version__


def test_typing_stubs_ship():
    package = Path(tinyserve.__file__).parent
    stub = (package / "_tinyserve.pyi").read_text()
    assert "def paged_attention(" in stub and "class BlockManager" in stub
    assert (package / "py.typed").exists()


def test_backend_queries_are_consistent():
    assert isinstance(tinyserve.cuda_compiled(), bool)
    assert tinyserve.cuda_device_count() >= 0
    assert tinyserve.cuda_available() == (
        tinyserve.cuda_compiled() and tinyserve.cuda_device_count() > 0
    )
    if not tinyserve.cuda_compiled():
        assert tinyserve.cuda_device_count() == 0


def test_num_threads_roundtrip():
    before = tinyserve.num_threads()
    try:
        tinyserve.set_num_threads(3)
        assert tinyserve.num_threads() == 3
    finally:
        tinyserve.set_num_threads(before)


def test_cli_usage():
    run = subprocess.run(
        [sys.executable, "-m", "tinyserve", "bogus"], capture_output=True, text=True
    )
    assert run.returncode == 2 and "demo" in run.stderr


def test_cli_help_goes_to_stdout():
    for flag in ("--help", "-h"):
        run = subprocess.run(
            [sys.executable, "-m", "tinyserve", flag], capture_output=True, text=True
        )
        assert run.returncode == 0 and run.stderr == "", run.stderr
        for command in ("demo", "--cmake-dir", "--version"):
            assert command in run.stdout


@pytest.mark.parametrize(
    "argv", [["--cmake-dir", "extra"], ["--version", "extra"], ["--help", "extra"]]
)
def test_cli_rejects_extra_arguments(capsys, argv):
    from tinyserve.__main__ import main

    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # nothing a $(python -m tinyserve --cmake-dir ...) could take in
    assert f"{argv[0]} takes no arguments, got 'extra'" in captured.err


def test_torch_tensors_cross_as_capsules():
    """A torch tensor reaches the core as the DLPack capsule of torch's C++ exporter; other arrays
    go as they are. The capsule route gives the reference result."""
    torch = pytest.importorskip("torch")
    from tinyserve import _interop

    t = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    assert type(_interop.export(t)).__name__ == "PyCapsule"
    arr = np.zeros(3, np.float32)
    assert _interop.export(arr) is arr
    cache = torch.randn((6, 2, 1, 4))
    via_capsules = cache.clone()
    src, dst = torch.tensor([0, 4], dtype=torch.int32), torch.tensor([5, 1], dtype=torch.int32)
    ts.copy_blocks([via_capsules], src, dst)
    expected = cache.numpy().copy()
    expected[[5, 1]] = expected[[0, 4]]
    np.testing.assert_array_equal(via_capsules.numpy(), expected)


@pytest.mark.parametrize("exporter", ["absent", "refuses"])
def test_torch_tensors_without_the_fast_export(monkeypatch, exporter):
    """Where torch's C++ exporter is missing, or refuses a tensor, the tensor goes as it is
    (through torch's public __dlpack__) and the op still gives the reference result."""
    torch = pytest.importorskip("torch")
    from tinyserve import _interop

    _interop.export(torch.zeros(1))  # finds torch's fast paths

    def refuse(_tensor):
        raise RuntimeError("no")

    monkeypatch.setattr(_interop, "_TORCH_TO_DLPACK", None if exporter == "absent" else refuse)
    cache = torch.randn((6, 2, 1, 4))
    assert _interop.export(cache) is cache
    expected = cache.numpy().copy()
    expected[[5, 1]] = expected[[0, 4]]
    src, dst = torch.tensor([0, 4], dtype=torch.int32), torch.tensor([5, 1], dtype=torch.int32)
    ts.copy_blocks([cache], src, dst)
    np.testing.assert_array_equal(cache.numpy(), expected)


def test_cli_rejects_an_unknown_command(capsys):
    from tinyserve.__main__ import main

    assert main(["serve"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "python -m tinyserve: unknown command 'serve'" in captured.err
    assert "python -m tinyserve generate" in captured.err  # the usage follows


def test_cli_generate_without_the_model_packages(monkeypatch, capsys):
    """Without torch (the library itself does not need it), `generate` says what to install and
    exits 2 instead of raising an import error."""
    from tinyserve.__main__ import main

    for name in [
        m for m in sys.modules if m == "tinyserve.engine" or m.startswith("tinyserve.engine.")
    ]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch raises ModuleNotFoundError
    assert main(["generate", "--help"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "python -m tinyserve generate: needs torch, which is not installed" in captured.err
    assert "tinyserve[model]" in captured.err


def test_cli_other_missing_modules_still_raise(monkeypatch):
    """Only the model extra's packages are reported as missing; any other import error of a
    subcommand (a broken install) propagates as it is."""
    import tinyserve.__main__ as cli

    monkeypatch.setitem(cli.SUBCOMMANDS, "generate", ("tinyserve.no_such_module", "x"))
    with pytest.raises(ModuleNotFoundError, match="tinyserve.no_such_module"):
        cli.main(["generate"])
