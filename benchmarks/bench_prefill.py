"""GPU benchmark of prefill over paged KV (issue 11): tinyserve beside FlashInfer and dense SDPA.

float16, 32 query / 8 KV heads, head_dim 128, page 16, pages in random physical order, NHD:
  - 8 prompts x 4096 new tokens, no prefix;
  - 4 x 1024 new tokens over a 16k cached prefix;
  - chunked prefill, 1 x 2048 over a 64k prefix;
  - a mixed step: 64 decode rows over 4k contexts and 2 chunks of 512 over 4k prefixes.
Each sequence's new rows are its last tokens, causal (the query at position p sees keys 0..p).

Measured in one run on the same data: tinyserve ``paged_attention(..., query_start_loc=...)``
(n/a where the build lacks it), FlashInfer's ``BatchPrefillWithPagedKVCacheWrapper`` with its fa2
and fa3 backends (planned once; n/a where FlashInfer is missing or a backend refuses), and
torch's scaled_dot_product_attention on contiguous K/V (the unpaged bound) with the flash and
cuDNN backends (the mixed step is two calls: the decode rows, then the chunks). The mixed step
is also timed as two tinyserve calls (decode for the decode rows, then prefill for the chunks):
issue 11 asks that the one mixed launch be no slower. Timing: CUDA
events around a CUDA graph of back-to-back calls, median of the replays (eager for every
implementation of a case if any one cannot be captured: the table says which). Reported: time,
TFLOP/s of causal attention (4 * q_heads * head_dim per (query, visible key) pair), the ratio
of each peer's time to tinyserve's (> 1: tinyserve faster) and each output's relative
difference from FlashInfer fa2's (or the first that ran).

    python benchmarks/bench_prefill.py [--json results.json] [--iters 20] [--dry-run]

--dry-run runs the same cases shrunk on the CPU and checks every input description against a
float64 reference (no timing worth reading).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform

import numpy as np
import torch
from bench_decode import (
    commit,
    first_line,
    is_build_failure,
    load_flashinfer,
    prebuild_concurrently,
    rel_diff,
    timed_pair,
)

import tinyserve as ts

Q_HEADS, KV_HEADS, DIM, PAGE = 32, 8, 128, 16

# FlashInfer backends whose module failed to build, with why (skipped in later cases).
FAILED_BUILDS: dict = {}

# (name, [(new rows, cached prefix) per sequence])
CASES = (
    ("8 x 4096 new, no prefix", [(4096, 0)] * 8),
    ("4 x 1024 over 16k prefix", [(1024, 16384)] * 4),
    ("1 x 2048 over 64k prefix", [(2048, 65536)]),
    ("mixed: 64 decode + 2 x 512 over 4k", [(1, 4096)] * 64 + [(512, 4096)] * 2),
)


def causal_flops(seqs) -> int:
    """4 * q_heads * head_dim per (query row, visible key): row j of n new rows over a prefix P
    sees P + j + 1 keys."""
    pairs = sum(n * prefix + n * (n + 1) // 2 for n, prefix in seqs)
    return 4 * Q_HEADS * DIM * pairs


def prefill_inputs(seqs, rng: np.random.Generator, device: str, dtype=torch.float16) -> dict:
    """Paged K/V (random normal, pages in random physical order), the query rows, tinyserve's
    (block table, seq_lens, query_start_loc), FlashInfer's (qo_indptr, kv_indptr, indices,
    last_page_len), and the same K/V contiguous per sequence for SDPA."""
    new = np.array([n for n, _ in seqs], dtype=np.int32)
    lens = np.array([n + p for n, p in seqs], dtype=np.int32)
    pages = (lens + PAGE - 1) // PAGE
    ids = rng.permutation(int(pages.sum())).astype(np.int32)
    kv_indptr = np.concatenate(([0], np.cumsum(pages))).astype(np.int32)
    table = np.zeros((len(seqs), int(pages.max())), dtype=np.int32)
    for i in range(len(seqs)):
        table[i, : pages[i]] = ids[kv_indptr[i] : kv_indptr[i + 1]]
    qo_indptr = np.concatenate(([0], np.cumsum(new))).astype(np.int32)
    kc = torch.randn((len(ids), PAGE, KV_HEADS, DIM), dtype=dtype, device=device)
    vc = torch.randn_like(kc)

    def to(x):
        return torch.from_numpy(x).to(device)

    return {
        "seqs": seqs,
        "query": torch.randn((int(new.sum()), Q_HEADS, DIM), dtype=dtype, device=device),
        "k_cache": kc,
        "v_cache": vc,
        "table": to(table),
        "seq_lens": to(lens),
        "max_len": int(lens.max()),
        "qo_indptr": to(qo_indptr),
        "kv_indptr": to(kv_indptr),
        "indices": to(ids),
        "last_page_len": to(lens - (pages - 1) * PAGE),
    }


def dense_kv(data: dict, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence i's K and V gathered from the pages, [kv_heads, len, dim], contiguous."""
    ids = data["table"][i, : (int(data["seq_lens"][i]) + PAGE - 1) // PAGE].long()
    n = int(data["seq_lens"][i])
    k = data["k_cache"][ids].reshape(-1, KV_HEADS, DIM)[:n].transpose(0, 1).contiguous()
    v = data["v_cache"][ids].reshape(-1, KV_HEADS, DIM)[:n].transpose(0, 1).contiguous()
    return k, v


def float64_reference(data: dict) -> torch.Tensor:
    """Causal attention in float64 from FlashInfer's page description (indptr, indices,
    last_page_len): checks that description in the dry run."""
    group = Q_HEADS // KV_HEADS
    out = torch.empty(data["query"].shape, dtype=torch.float64)
    for i, (n, prefix) in enumerate(data["seqs"]):
        ids = data["indices"][data["kv_indptr"][i] : data["kv_indptr"][i + 1]].long()
        length = (len(ids) - 1) * PAGE + int(data["last_page_len"][i])
        k = data["k_cache"][ids].double().reshape(-1, KV_HEADS, DIM)[:length]
        v = data["v_cache"][ids].double().reshape(-1, KV_HEADS, DIM)[:length]
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        rows = slice(int(data["qo_indptr"][i]), int(data["qo_indptr"][i + 1]))
        q = data["query"][rows].double()
        scores = torch.einsum("rhd,nhd->hrn", q, k) / DIM**0.5
        visible = torch.arange(length)[None, :] <= prefix + torch.arange(n)[:, None]
        scores = scores.masked_fill(~visible, float("-inf"))
        out[rows] = torch.einsum("hrn,nhd->rhd", torch.softmax(scores, dim=-1), v)
    return out


def sdpa_calls(data: dict, backend, repeat_kv: bool) -> tuple:
    """(run, out) of dense SDPA with one backend over contiguous K/V: one call per group of
    sequences with the same (new rows, prefix), bottom-right causal (the new rows are the last
    tokens) through torch's causal_lower_right bias, or is_causal when there is no prefix.
    repeat_kv: K/V heads repeated per query head, for a backend that refuses enable_gqa.
    Row ranges come from the host (``seqs``): reading ``qo_indptr`` on the device inside ``run``
    would synchronise, which CUDA-graph capture forbids."""
    from torch.nn.attention import sdpa_kernel
    from torch.nn.attention.bias import causal_lower_right

    starts = np.concatenate(([0], np.cumsum([n for n, _ in data["seqs"]]))).tolist()
    rows = [slice(starts[i], starts[i + 1]) for i in range(len(data["seqs"]))]
    groups: dict = {}
    for i, shape in enumerate(data["seqs"]):
        groups.setdefault(shape, []).append(i)
    out = torch.empty_like(data["query"])
    calls = []
    for (n, prefix), members in groups.items():
        kv = [dense_kv(data, i) for i in members]
        k = torch.stack([k for k, _ in kv])
        v = torch.stack([v for _, v in kv])
        if repeat_kv:
            k = k.repeat_interleave(Q_HEADS // KV_HEADS, 1)
            v = v.repeat_interleave(Q_HEADS // KV_HEADS, 1)
        q = torch.stack([data["query"][rows[i]] for i in members]).transpose(1, 2)
        # q: [group, q_heads, n, dim]
        mask = None if prefix == 0 or n == 1 else causal_lower_right(n, n + prefix)
        calls.append((members, q, k, v, mask, prefix == 0 and n > 1))

    def run():
        with sdpa_kernel([backend]):
            for members, q, k, v, mask, is_causal in calls:
                o = torch.nn.functional.scaled_dot_product_attention(
                    q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=not repeat_kv
                )
                o = o.transpose(1, 2)
                for j, i in enumerate(members):
                    out[rows[i]] = o[j]

    return run, out


def flashinfer_prefill(flashinfer, data: dict, workspace, backend: str) -> tuple:
    wrapper = flashinfer.BatchPrefillWithPagedKVCacheWrapper(workspace, "NHD", backend=backend)
    wrapper.plan(
        data["qo_indptr"],
        data["kv_indptr"],
        data["indices"],
        data["last_page_len"],
        Q_HEADS,
        KV_HEADS,
        DIM,
        PAGE,
        causal=True,
        q_data_type=data["query"].dtype,
        kv_data_type=data["k_cache"].dtype,
    )
    out = torch.empty_like(data["query"])

    def run():
        wrapper.run(data["query"], (data["k_cache"], data["v_cache"]), out=out)

    return run, out


def planned_call(data: dict, query, table, seq_lens, out, starts, device: str):
    """One tinyserve paged_attention over `data`'s caches (prefill with `starts` as
    query_start_loc, decode without), its split planned once and its workspace its own."""
    kc, vc, max_len = data["k_cache"], data["v_cache"], data["max_len"]
    splits, nbytes = ts.plan_paged_attention(
        query, kc, table, max_seq_len=max_len, query_start_loc=starts
    )
    workspace = torch.empty((max(nbytes, 16),), dtype=torch.uint8, device=device)

    def call():
        ts.paged_attention(
            query,
            kc,
            vc,
            table,
            seq_lens,
            out,
            max_seq_len=max_len,
            num_splits=splits,
            workspace=workspace,
            query_start_loc=starts,
        )

    return call


def tinyserve_prefill(data: dict, device: str) -> tuple:
    """(run, out) of tinyserve's paged_attention with query_start_loc; raises when the build
    lacks it (an older API raises TypeError, a missing backend RuntimeError)."""
    out = torch.empty_like(data["query"])
    run = planned_call(
        data, data["query"], data["table"], data["seq_lens"], out, data["qo_indptr"], device
    )
    run()  # a refusal shows here, not inside a graph capture
    return run, out


def decode_rows_first(seqs) -> int:
    """How many one-row (decode) sequences lead a mixed step (0 if the step is not one: no
    decode row, no longer sequence, or a decode row after a longer sequence)."""
    lead = next((i for i, (n, _) in enumerate(seqs) if n != 1), len(seqs))
    rest = seqs[lead:]
    return lead if 0 < lead < len(seqs) and all(n != 1 for n, _ in rest) else 0


def tinyserve_two_calls(data: dict, device: str, lead: int) -> tuple:
    """(run, out) of a mixed step as two tinyserve calls, what the mixed launch is measured
    against: decode (no query_start_loc) for the `lead` one-row sequences, then prefill for the
    rest; both write slices of one output (the decode rows come first)."""
    q, table, lens = data["query"], data["table"], data["seq_lens"]
    out = torch.empty_like(q)
    starts = (data["qo_indptr"][lead:] - lead).contiguous()
    calls = [
        planned_call(data, q[:lead], table[:lead], lens[:lead], out[:lead], None, device),
        planned_call(data, q[lead:], table[lead:], lens[lead:], out[lead:], starts, device),
    ]

    def run():
        for call in calls:
            call()

    run()
    return run, out


def prefill_case(name, seqs, args, rng, device, flashinfer, workspace) -> dict:
    data = prefill_inputs(seqs, rng, device)
    fns, outs, notes = {}, {}, {}

    def add(label, make):
        if label in FAILED_BUILDS:  # a failed JIT build or missing API would only fail again
            notes[label] = FAILED_BUILDS[label] + " (an earlier case)"
            return
        try:
            fns[label], outs[label] = make()
        except Exception as exc:  # noqa: BLE001 - a missing peer or refused case is n/a
            notes[label] = first_line(exc)
            if label.startswith("FlashInfer") and is_build_failure(exc):
                FAILED_BUILDS[label] = notes[label]

    add("tinyserve", lambda: tinyserve_prefill(data, device))
    lead = decode_rows_first(seqs)
    if lead:
        add("tinyserve, two calls", lambda: tinyserve_two_calls(data, device, lead))
    if flashinfer is not None:
        for backend in ("fa2", "fa3"):
            add(
                f"FlashInfer {backend}",
                lambda b=backend: flashinfer_prefill(flashinfer, data, workspace, b),
            )
    from torch.nn.attention import SDPBackend

    backends = {"SDPA flash": SDPBackend.FLASH_ATTENTION, "SDPA cuDNN": SDPBackend.CUDNN_ATTENTION}
    if device != "cuda":
        backends = {"SDPA math": SDPBackend.MATH}
    for label, backend in backends.items():

        def make(backend=backend):
            try:
                run, out = sdpa_calls(data, backend, repeat_kv=False)
                run()  # a refused backend shows here
            except RuntimeError:  # perhaps only enable_gqa refused: repeat the K/V heads
                run, out = sdpa_calls(data, backend, repeat_kv=True)
                run()
            return run, out

        add(label, make)
    times, how = timed_pair(fns, args.iters, device) if fns else ({}, "nothing ran")
    for fn in fns.values():  # one more call each, outside any graph, for the comparisons
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    reference_label = next((k for k in ("FlashInfer fa2", *outs) if k in outs), None)
    diffs = {k: rel_diff(o, outs[reference_label]) for k, o in outs.items() if reference_label}
    if device != "cuda":  # dry run: every output against float64 from the page description
        reference = float64_reference(data)
        reference_label = "float64 over FlashInfer's page description"
        diffs = {k: rel_diff(o, reference) for k, o in outs.items()}
    return {
        "name": name,
        "sequences": len(seqs),
        "new_rows": int(data["query"].shape[0]),
        "kv_tokens": int(data["seq_lens"].sum()),
        "flops": causal_flops(seqs),
        "timing": how,
        "ms": times,
        "rel_diff": diffs,
        "rel_diff_against": reference_label,
        "not_run": notes,
    }


COLUMNS = (
    "tinyserve",
    "tinyserve, two calls",
    "FlashInfer fa2",
    "FlashInfer fa3",
    "SDPA flash",
    "SDPA cuDNN",
    "SDPA math",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write all results to this file")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="the cases shrunk on the CPU, checked against float64 (measures nothing)",
    )
    args = parser.parse_args()
    device = "cpu" if args.dry_run or not torch.cuda.is_available() else "cuda"
    flashinfer, why = (None, "dry run on the CPU") if device != "cuda" else load_flashinfer()
    header = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit(),
        "torch": torch.__version__,
        "host": platform.node(),
        "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu (dry run)",
        "flashinfer": flashinfer.__version__ if flashinfer is not None else f"not measured ({why})",
    }
    print(
        f"{header['device']}, {header['date']}, commit {header['commit']}, torch "
        f"{torch.__version__}, FlashInfer {header['flashinfer']}",
        flush=True,
    )
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    workspace = (
        torch.empty(512 << 20, dtype=torch.uint8, device=device) if flashinfer is not None else None
    )
    if flashinfer is not None:  # both backends' modules built side by side, on a tiny case
        tiny = prefill_inputs([(16, 16)], np.random.default_rng(0), device)
        prebuild_concurrently(
            {
                f"{b}": lambda b=b: flashinfer_prefill(flashinfer, tiny, workspace, b)[0]()
                for b in ("fa2", "fa3")
            }
        )
    rows = []
    for name, seqs in CASES:
        if device != "cuda":  # dry run: the same structure, a few rows over short prefixes
            seqs = [(min(n, 5), min(p, 37)) for n, p in seqs]
            seqs = seqs[:4] + seqs[4:][-2:]
        try:
            r = prefill_case(name, seqs, args, rng, device, flashinfer, workspace)
        except Exception as exc:  # noqa: BLE001 - one broken case must not lose the others
            r = {"name": name, "error": first_line(exc)}
        rows.append(r)
        print(json.dumps(r), flush=True)
        if device == "cuda":
            torch.cuda.empty_cache()
        if args.json:  # after every case, so a run stopped at its time limit keeps its rows
            with open(args.json, "w") as f:
                json.dump(dict(header, cases=rows), f, indent=2)
    print("\nnot run:")
    for r in rows:
        for label, why_not in r.get("not_run", {}).items():
            print(f"  {r['name']}: {label}: {why_not}")
    print(
        "\nms / TFLOP/s (causal) / ratio = that time / tinyserve's time (> 1: tinyserve "
        "faster) / rel diff vs the reference named in the JSON"
    )
    present = [
        c for c in COLUMNS if any(c in r.get("ms", {}) or c in r.get("not_run", {}) for r in rows)
    ]
    print("| case | " + " | ".join(present) + " | timing |")
    print("|---|" + "---|" * (len(present) + 1))
    for r in rows:
        if "error" in r:
            print(f"| {r['name']} | error: {r['error']} |")
            continue
        cells = []
        ts_ms = r["ms"].get("tinyserve")
        for c in present:
            ms = r["ms"].get(c)
            if ms is None:
                cells.append("n/a")
                continue
            ratio = "" if ts_ms is None or c == "tinyserve" else f", x{ms / ts_ms:.2f}"
            diff = r["rel_diff"].get(c)
            cells.append(
                f"{ms:.3f} / {r['flops'] / (ms * 1e-3) / 1e12:.0f}{ratio}"
                + ("" if diff is None else f", {diff:.0e}")
            )
        print(f"| {r['name']} | " + " | ".join(cells) + f" | {r['timing']} |")
    if device != "cuda":  # the dry run is a check: a case that failed or disagrees fails it
        bad = [
            r["name"]
            for r in rows
            if "error" in r or not r["rel_diff"] or max(r["rel_diff"].values()) >= 2e-2
        ]
        if bad:
            raise SystemExit(f"dry run: wrong or failed cases: {bad}")


if __name__ == "__main__":
    main()
