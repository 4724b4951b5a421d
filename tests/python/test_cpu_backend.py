"""The CPU backend's own limits: its thread pool under a limited address space, the memory of
split partials, and the hardware float16 conversion. The address-space limits are set in child
processes (RLIMIT_AS), so a failure cannot take the test session with it."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

import tinyserve as ts

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))

# Run in a child: `limit_address_space(extra)` caps the address space at what the child maps now
# plus `extra` bytes; `check(out, lse, ref)` compares with `reference(case)`, which is computed
# before the limit (the threads may take all the room there is).
CHILD_PRELUDE = textwrap.dedent(
    """
    import resource, sys
    import numpy as np
    sys.path.insert(0, {tests_dir!r})
    import reference as R
    import tinyserve as ts

    def limit_address_space(extra):
        with open("/proc/self/status") as f:
            vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize"))
        resource.setrlimit(resource.RLIMIT_AS, (vm + extra, resource.RLIM_INFINITY))

    def reference(case):
        return R.paged_attention(
            case.query, case.key_cache, case.value_cache, case.block_table, case.seq_lens
        )

    def check(out, lse, ref):
        ref_out, ref_lse = ref
        assert R.rel_error(out, ref_out) < 2e-5, R.rel_error(out, ref_out)
        np.testing.assert_allclose(lse, ref_lse, rtol=1e-4, atol=1e-3)
    """
)


def run_child(body: str, env: dict | None = None, timeout: float = 120) -> str:
    if not sys.platform.startswith("linux"):
        pytest.skip("address-space limits are set through /proc and RLIMIT_AS (Linux)")
    code = CHILD_PRELUDE.format(tests_dir=TESTS_DIR) + textwrap.dedent(body)
    run = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )
    assert run.returncode == 0, f"child failed ({run.returncode}):\n{run.stdout}\n{run.stderr}"
    return run.stdout


POOL_BODY = """
    rng = np.random.default_rng({seed})
    case = R.PagedCase(rng, rng.integers(1, 200, size=64), 8, 2, 64, 16)
    ref = reference(case)
    out = np.full_like(case.query, np.nan)
    lse = np.full(case.query.shape[:2], np.nan, dtype=np.float32)
    limit_address_space(256 << 20)  # room for a few dozen thread stacks, not a thousand
    {set_threads}
    ts.paged_attention(
        case.query, case.key_cache, case.value_cache, case.block_table, case.seq_lens, out,
        lse=lse, num_splits=1,
    )
    check(out, lse, ref)
    print(ts.num_threads())
"""


@pytest.mark.parametrize("how", ["set_num_threads", "environment"])
def test_pool_runs_on_the_threads_that_start(rng, how):
    """Asked for 1000 threads where the address space holds far fewer stacks, the pool runs on
    those that started (and says how many) instead of hanging or aborting."""
    seed = int(rng.integers(2**32))
    if how == "set_num_threads":
        body = POOL_BODY.format(seed=seed, set_threads="ts.set_num_threads(1000)")
        env = None
    else:
        body = POOL_BODY.format(seed=seed, set_threads="")
        env = {"TINYSERVE_NUM_THREADS": "1000"}
    threads = int(run_child(body, env, timeout=120).split()[-1])
    assert 1 <= threads < 1000


def test_thread_count_is_bounded():
    before = ts.num_threads()
    try:
        for bad in (0, -1, 1025, 10**6):
            with pytest.raises(ValueError, match=r"tinyserve.set_num_threads: n must be in"):
                ts.set_num_threads(bad)
        for bad, name in ((None, "NoneType"), ("4", "str"), (2.0, "float")):
            with pytest.raises(
                ts.ArgumentTypeError,
                match=rf"^tinyserve.set_num_threads: n must be an int, got {name}$",
            ):
                ts.set_num_threads(bad)
        assert ts.num_threads() == before
        ts.set_num_threads(3)
        assert ts.num_threads() == 3
    finally:
        ts.set_num_threads(before)


def test_environment_thread_count_is_capped():
    """A TINYSERVE_NUM_THREADS above 1024 is cut to 1024, however large (past int32 and int64
    too): each gives the pool of 1024 requested threads (or as many as the system starts)."""
    code = "import tinyserve; print(tinyserve.num_threads())"

    def threads(value):
        run = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "TINYSERVE_NUM_THREADS": value},
        )
        assert run.returncode == 0, run.stderr
        return int(run.stdout)

    capped = threads("5000")
    assert 1 <= capped <= 1024
    for value in ("2147483648", "4294967299", "99999999999999999999"):
        assert threads(value) == capped, value


def test_split_partials_are_sized_by_the_sequences(rng):
    """A fixed num_splits of 4096 over 32 one-token sequences: the partials of 4096 splits would
    take 2 GiB (32 sequences x 32 heads x 128 floats x 4096); the sequences need one split
    each. Run where the address space has 512 MiB to spare."""
    seed = int(rng.integers(2**32))
    body = f"""
    rng = np.random.default_rng({seed})
    case = R.PagedCase(rng, np.ones(32, dtype=np.int32), 32, 8, 128, 16)
    # Start the pool (thread stacks) before the limit, so that only the call's memory counts.
    ts.paged_attention(case.query, case.key_cache, case.value_cache, case.block_table,
                       case.seq_lens, num_splits=1)
    ref = reference(case)
    out = np.full_like(case.query, np.nan)
    lse = np.full(case.query.shape[:2], np.nan, dtype=np.float32)
    limit_address_space(512 << 20)
    ts.paged_attention(
        case.query, case.key_cache, case.value_cache, case.block_table, case.seq_lens, out,
        lse=lse, num_splits=4096,
    )
    check(out, lse, ref)
    """
    run_child(body)


def cpu_has_f16c() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next(line for line in f if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return False
    return "f16c" in flags and "avx" in flags


def test_float16_conversion_uses_f16c_where_the_cpu_has_it():
    """float16 caches read half the bytes of float32 ones, but a software half-to-float
    conversion made float16 decode about twice as slow as float32; where the CPU has F16C the
    backend must convert in hardware (the speed itself is measured by
    benchmarks/bench_cpu.py --dtype float16, not asserted here). Results are identical either
    way: the float16 attention tests check them against float64."""
    assert ts.cpu_hardware_float16() == cpu_has_f16c()
