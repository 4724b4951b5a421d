"""python -m tinyserve demo: it runs clean, its summary shows every feature at work, and its
check is real (a corrupted cache makes it fail)."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest

import tinyserve
from tinyserve import demo

# Small enough to run in about a second on two cores, tight enough that the pool runs out
# (preemption, prefix-cache eviction) and some requests fork.
SMALL = [
    "--requests",
    "10",
    "--max-new-tokens",
    "24",
    "--blocks",
    "16",
    "--seed",
    "3",
    "--device",
    "cpu",
]


def summary(text: str) -> dict[str, float]:
    """The numbers of the summary the tests rely on."""
    patterns = {
        "finished": r"requests\s+(\d+) finished of (\d+)",
        "forked": r"sequences\s+(\d+) forked",
        "freed": r"sequences\s+\d+ forked, (\d+) freed",
        "prefix_hit_tokens": r"prefix hits\s+(\d+) tokens",
        "prefix_hit_blocks": r"prefix hits\s+\d+ tokens = (\d+) blocks",
        "evicted": r"(\d+) cached blocks evicted",
        "cow_copies": r"copy-on-write\s+(\d+) block copies",
        "preemptions": r"preemptions\s+(\d+)",
        "offloads": r"preemptions\s+\d+: (\d+) by offload",
        "offloaded_blocks": r"by offload \((\d+) blocks to a host pool",
        "recalls": r"host pool of \d+\), (\d+) recalled",
        "recalled_blocks": r"recalled \((\d+) blocks back",
        "recomputations": r"(\d+) freed for recomputation",
        "recomputed_tokens": r"\((\d+) recomputed after preemption\)",
        "max_error": r"attention\s+(\S+) max relative error",
        "tolerance": r"\(tolerance (\S+)\): OK",
        "generated": r"tokens\s+(\d+) generated",
    }
    found = {}
    for key, pattern in patterns.items():
        match = re.search(pattern, text)
        assert match, f"summary lacks {key!r}:\n{text}"
        found[key] = float(match.group(1))
    found["requests"] = float(re.search(patterns["finished"], text).group(2))
    return found


def run_demo(capsys, *extra: str) -> tuple[int, str]:
    code = demo.main([*SMALL, *extra])
    return code, capsys.readouterr().out


def test_demo_runs_and_exercises_every_feature(capsys):
    code, out = run_demo(capsys)
    assert code == 0, out
    s = summary(out)
    assert s["finished"] == s["requests"] == 10
    assert s["prefix_hit_tokens"] > 0 and s["prefix_hit_blocks"] > 0
    assert s["forked"] > 0 and s["cow_copies"] > 0
    assert s["freed"] >= s["requests"] + s["forked"]
    assert s["preemptions"] > 0 and s["evicted"] > 0
    assert 0 < s["max_error"] <= s["tolerance"] == demo.TOLERANCE["float32"]
    for stage in ("setup", "prefill", "decode", "drain", "summary"):
        assert re.search(rf"^{stage}\b", out, re.MULTILINE), f"no {stage} line:\n{out}"


def test_demo_preempts_by_offload_and_recalls_instead_of_recomputing(capsys):
    """SMALL's 16-block pool forces preemption; with a host pool the victims' blocks go there
    and come back (every offloaded sequence is recalled: all requests finish), and the dense
    check of every step's attention still passes."""
    code, out = run_demo(capsys)
    assert code == 0, out
    s = summary(out)
    assert s["offloads"] > 0 and s["recalls"] == s["offloads"]
    assert s["offloaded_blocks"] == s["recalled_blocks"] > 0
    assert s["preemptions"] == s["offloads"] + s["recomputations"]
    offloads = re.findall(
        r"^offload  step +\d+: sequence (\d+) preempted, (\d+) blocks?", out, re.M
    )
    recalls = re.findall(r"^recall   step +\d+: sequence (\d+) resumed, (\d+) blocks?", out, re.M)
    assert len(offloads) == s["offloads"] and sorted(offloads) == sorted(recalls)
    assert 0 < s["max_error"] <= s["tolerance"]

    # Without a host pool every preemption frees and recomputes.
    code, out = run_demo(capsys, "--host-blocks", "0")
    assert code == 0, out
    s = summary(out)
    assert s["offloads"] == s["recalls"] == 0 and "offload  step" not in out
    assert s["preemptions"] == s["recomputations"] > 0 and s["recomputed_tokens"] > 0
    assert 0 < s["max_error"] <= s["tolerance"]


def test_demo_offload_with_a_tiny_host_pool_falls_back_to_recomputation(capsys):
    code, out = run_demo(capsys, "--host-blocks", "2", "--quiet")
    assert code == 0, out
    s = summary(out)
    assert s["recomputations"] > 0 and s["offloaded_blocks"] <= 2 * max(1, s["offloads"])
    assert s["recalls"] == s["offloads"] and s["finished"] == s["requests"]


def test_demo_is_deterministic_and_quiet(capsys):
    code, first = run_demo(capsys, "--quiet", "--check-every", "3")
    assert code == 0, first
    assert first.startswith("summary")  # --quiet: the summary alone
    code, second = run_demo(capsys, "--quiet", "--check-every", "3")
    assert code == 0
    assert re.sub(r"wall time.*", "", first) == re.sub(r"wall time.*", "", second)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_demo_half_precision(capsys, dtype):
    if dtype == "bfloat16":
        pytest.importorskip("torch")
    code, out = run_demo(capsys, "--dtype", dtype, "--requests", "6", "--quiet")
    assert code == 0, out
    s = summary(out)
    assert s["tolerance"] == demo.TOLERANCE[dtype] and s["max_error"] <= s["tolerance"]


def test_demo_steps_cap_and_odd_block_size(capsys):
    code, out = run_demo(capsys, "--steps", "5", "--block-size", "7", "--blocks", "40", "--quiet")
    assert code == 0, out
    assert "cut off by --steps" in out
    assert re.search(r"steps\s+5 decode steps", out)


def test_injected_fault_is_caught(capsys):
    code, out = run_demo(capsys, "--inject-fault", "6")
    assert code == 1
    assert "fault " in out and "FAIL (check)" in out and "summary" not in out
    assert re.search(r"first wrong cached (key|value): token \d+", out)


def test_dropped_cache_write_is_caught(capsys, monkeypatch):
    """The demo calls tinyserve.reshape_and_cache; a wrapper that silently skips one token of
    one decode write (slot -1) leaves a stale or NaN slot, which the check must catch."""
    real = tinyserve.reshape_and_cache
    calls = {"decode_writes": 0}

    def drop_one_token(key, value, key_cache, value_cache, slot_mapping, **kwargs):
        if len(slot_mapping) > 1:  # a decode step's write (prefills of one token are rare)
            calls["decode_writes"] += 1
            if calls["decode_writes"] == 12:
                slot_mapping = np.array(slot_mapping, copy=True)
                slot_mapping[1] = -1
        return real(key, value, key_cache, value_cache, slot_mapping, **kwargs)

    monkeypatch.setattr(tinyserve, "reshape_and_cache", drop_one_token)
    code, out = run_demo(capsys)
    assert calls["decode_writes"] >= 12
    assert code == 1, out
    assert "FAIL (check)" in out and "differs from the float64 reference" in out


def test_check_every_zero_is_honest(capsys):
    code, out = run_demo(capsys, "--check-every", "0", "--quiet")
    assert code == 0
    assert "not checked (--check-every 0)" in out


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--requests", "0"], "--requests must be at least 1, got 0"),
        (["--block-size", "0"], "--block-size must be at least 1, got 0"),
        (["--layers", "0"], "--layers must be at least 1, got 0"),
        (["--max-new-tokens", "0"], "--max-new-tokens must be at least 2, got 0"),
        (["--max-new-tokens", "1"], "--max-new-tokens must be at least 2, got 1"),
        (["--steps", "-1"], "--arrival-interval, --steps and --check-every must not be negative"),
        (["--check-every", "-1"], "--check-every must not be negative"),
        (["--arrival-interval", "-1"], "--check-every must not be negative"),
        (["--progress-every", "0"], "--progress-every must be at least 1, got 0"),
        (["--arrival-interval", "nan"], "--arrival-interval must be finite, got nan"),
        (["--arrival-interval", "inf"], "--arrival-interval must be finite, got inf"),
        (["--seed", "-1"], "--seed must not be negative, got -1"),
    ],
)
def test_each_bad_argument_is_named(capsys, argv, message):
    assert demo.main([*SMALL, *argv]) == 2
    captured = capsys.readouterr()
    assert message in captured.err and captured.out == ""


def test_bad_arguments(capsys):
    assert demo.main(["--blocks", "3"]) == 2
    assert "too small" in capsys.readouterr().err
    assert demo.main(["--requests", "0"]) == 2
    assert demo.main([*SMALL, "--host-blocks", "-1"]) == 2
    assert "--host-blocks must not be negative, got -1" in capsys.readouterr().err
    assert demo.main(["--no-such-flag"]) == 2
    if not tinyserve.cuda_available():
        assert demo.main(["--device", "cuda"]) == 2
        assert "--device cuda is not available" in capsys.readouterr().err


@pytest.mark.parametrize("tolerance", ["-1", "0", "nan", "inf"])
def test_tolerance_must_be_positive(capsys, tolerance):
    assert demo.main([*SMALL, "--tolerance", tolerance]) == 2
    captured = capsys.readouterr()
    assert "--tolerance must be a positive finite number, got " in captured.err
    assert "summary" not in captured.out


@pytest.mark.parametrize(
    "compiled, devices, reason",
    [
        (False, 0, "tinyserve was built without CUDA"),
        (True, 0, "tinyserve was built with CUDA but sees no CUDA device"),
    ],
)
def test_cuda_unavailable_says_why(capsys, monkeypatch, compiled, devices, reason):
    """Built without CUDA and built with CUDA but without a device are told apart, both when
    --device cuda is refused and when --device auto falls back to the CPU."""
    monkeypatch.setattr(tinyserve, "cuda_compiled", lambda: compiled)
    monkeypatch.setattr(tinyserve, "cuda_device_count", lambda: devices)
    assert demo.main(["--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"tinyserve demo: --device cuda is not available: {reason}"
    auto = [*SMALL[: SMALL.index("--device")], "--device", "auto", "--quiet", "--requests", "2"]
    code, out = run_demo(capsys, *auto)
    assert code == 0, out
    assert re.search(r"device\s+cpu \(.*\); CUDA not used: (.*)$", out, re.M).group(1) == reason


def test_help(capsys):
    assert demo.main(["--help"]) == 0
    text = capsys.readouterr().out
    for flag in (
        "--requests",
        "--max-new-tokens",
        "--steps",
        "--blocks",
        "--host-blocks",
        "--block-size",
        "--layers",
        "--seed",
        "--device",
        "--dtype",
        "--check-every",
        "--quiet",
        "--inject-fault",
    ):
        assert flag in text


def test_cli_subprocess():
    run = subprocess.run(
        [sys.executable, "-m", "tinyserve", "demo", *SMALL, "--layers", "1"],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    s = summary(run.stdout)
    assert s["prefix_hit_tokens"] > 0 and s["cow_copies"] > 0 and s["freed"] > 0
    assert s["max_error"] <= s["tolerance"]
    help_run = subprocess.run(
        [sys.executable, "-m", "tinyserve", "demo", "--help"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert help_run.returncode == 0 and "usage: python -m tinyserve demo" in help_run.stdout


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_demo_cuda(capsys, dtype):
    pytest.importorskip("torch")
    code, out = run_demo(capsys, "--device", "cuda", "--dtype", dtype)
    assert code == 0, out
    s = summary(out)
    assert "cuda (torch" in out and s["cow_copies"] > 0 and s["preemptions"] > 0
    assert s["max_error"] <= s["tolerance"]
