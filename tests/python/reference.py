"""Independent float64 NumPy references for the ops, and helpers that build poisoned paged
caches. Nothing here calls tinyserve."""

from __future__ import annotations

import numpy as np


def logical_kv(cache: np.ndarray, table_row: np.ndarray, length: int) -> np.ndarray:
    """The sequence's keys (or values) in token order, [length, num_kv_heads, head_dim], read
    through its block table row from a [num_blocks, block_size, num_kv_heads, head_dim] cache."""
    block_size = cache.shape[1]
    tokens = np.arange(length)
    blocks = table_row[tokens // block_size]
    return cache[blocks, tokens % block_size]


def paged_attention(
    query: np.ndarray,
    key_cache: np.ndarray,
    value_cache: np.ndarray,
    block_table: np.ndarray,
    seq_lens: np.ndarray,
    scale: float | None = None,
    window_left: int = -1,
    logits_soft_cap: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Decode attention in float64: (out [B, Hq, D], lse [B, Hq]); empty sequences give zeros and
    -inf."""
    # One query row per non-empty sequence, at its last position: the prefill reference.
    q = np.asarray(query, dtype=np.float64)
    nonempty = np.asarray(seq_lens) > 0
    query_start_loc = np.concatenate([[0], np.cumsum(nonempty)])
    out = np.zeros(q.shape)
    lse = np.full(q.shape[:2], -np.inf)
    out[nonempty], lse[nonempty] = paged_prefill(
        q[nonempty],
        key_cache,
        value_cache,
        block_table,
        seq_lens,
        query_start_loc,
        scale,
        window_left,
        logits_soft_cap,
    )
    return out, lse


def paged_prefill(
    query: np.ndarray,
    key_cache: np.ndarray,
    value_cache: np.ndarray,
    block_table: np.ndarray,
    seq_lens: np.ndarray,
    query_start_loc: np.ndarray,
    scale: float | None = None,
    window_left: int = -1,
    logits_soft_cap: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Causal attention of each sequence's last rows in float64: (out [T, Hq, D], lse [T, Hq]).
    Sequence b's rows query_start_loc[b]:query_start_loc[b + 1] sit at the last positions of its
    seq_lens[b] tokens; the row at position p sees keys max(0, p - window_left)..p."""
    q = np.asarray(query, dtype=np.float64)
    k_cache = np.asarray(key_cache, dtype=np.float64)
    v_cache = np.asarray(value_cache, dtype=np.float64)
    total, num_q_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    group = num_q_heads // num_kv_heads
    scale = 1.0 / np.sqrt(head_dim) if scale is None else scale
    out = np.zeros((total, num_q_heads, head_dim))
    lse = np.full((total, num_q_heads), -np.inf)
    for b in range(len(seq_lens)):
        length = int(seq_lens[b])
        first, last = int(query_start_loc[b]), int(query_start_loc[b + 1])
        if last == first:
            continue
        k = logical_kv(k_cache, block_table[b], length)
        v = logical_kv(v_cache, block_table[b], length)
        for row in range(first, last):
            pos = length - (last - first) + (row - first)
            start = 0 if window_left < 0 else max(0, pos - window_left)
            # All heads at once: [kv_head, group, key]
            qh = q[row].reshape(num_kv_heads, group, head_dim)
            logits = np.einsum("nkd,kgd->kgn", k[start : pos + 1], qh) * scale
            if logits_soft_cap > 0:
                logits = logits_soft_cap * np.tanh(logits / logits_soft_cap)
            m = logits.max(-1, keepdims=True)
            p = np.exp(logits - m)
            total_p = p.sum(-1, keepdims=True)
            o = np.einsum("kgn,nkd->kgd", p, v[start : pos + 1]) / total_p
            out[row] = o.reshape(num_q_heads, head_dim)
            lse[row] = (m + np.log(total_p)).reshape(num_q_heads)
    return out, lse


# Summaries that store the elementwise minimum and maximum (they differ only in the score).
MINMAX_SUMMARIES = ("minmax", "minmax_damped")


def page_summary(keys: np.ndarray, summary: str) -> np.ndarray:
    """[n, H, D] keys of one page -> [H, 2, D] summary in float64."""
    k = np.asarray(keys, dtype=np.float64)
    if summary in MINMAX_SUMMARIES:
        return np.stack([k.min(0), k.max(0)], axis=1)
    return np.stack([k.mean(0), k.std(0)], axis=1)


def page_scores(q: np.ndarray, meta: np.ndarray, summary: str, group_reduce: str) -> np.ndarray:
    """q [Hq, D], meta [P, Hkv, 2, D] (the pages of one sequence) -> scores [Hkv, P]."""
    q = np.asarray(q, dtype=np.float64)
    meta = np.asarray(meta, dtype=np.float64)
    num_kv_heads = meta.shape[1]
    group = q.shape[0] // num_kv_heads
    qg = q.reshape(num_kv_heads, group, 1, -1)  # [Hkv, G, 1, D]
    lo = meta[:, :, 0].transpose(1, 0, 2)[:, None]  # [Hkv, 1, P, D]
    hi = meta[:, :, 1].transpose(1, 0, 2)[:, None]
    if summary == "minmax":
        per_head = np.maximum(qg * lo, qg * hi).sum(-1)
    elif summary == "minmax_damped":
        # Halfway between the box centre's score and the bound: centre + |q| * half-width / 2.
        per_head = (qg * (lo + hi) / 2 + np.abs(qg) * (hi - lo) / 4).sum(-1)
    else:
        per_head = (qg * lo + np.abs(qg) * hi).sum(-1)
    per_head = np.where(np.isnan(per_head), -np.inf, per_head)
    return per_head.sum(1) if group_reduce == "sum" else per_head.max(1)


def select_pages(
    query, meta, block_table, seq_lens, budget, block_size, sinks, summary, group_reduce
):
    """(table [B, Hkv, budget] with -1 padding, lens [B, Hkv]) as DESIGN.md §3 specifies."""
    batch, num_kv_heads = query.shape[0], meta.shape[1]
    table = np.full((batch, num_kv_heads, budget), -1, dtype=np.int64)
    lens = np.zeros((batch, num_kv_heads), dtype=np.int64)
    for b in range(batch):
        length = int(seq_lens[b])
        pages = -(-length // block_size)
        row = block_table[b, :pages]
        if pages <= budget:
            table[b, :, :pages] = row
            lens[b] = length
            continue
        scores = page_scores(query[b], meta[row], summary, group_reduce)
        for h in range(num_kv_heads):
            candidates = list(range(sinks, pages - 1))
            # Highest score first, the lower page on ties.
            candidates.sort(key=lambda p: (-scores[h, p], p))
            kept = sorted(list(range(sinks)) + candidates[: budget - sinks - 1]) + [pages - 1]
            table[b, h] = row[kept]
            lens[b, h] = (budget - 1) * block_size + length - (pages - 1) * block_size
    return table, lens


def paged_attention_per_kv_head(query, key_cache, value_cache, table, lens):
    """Decode attention in float64 where KV head h of sequence b reads table[b, h, :] and
    lens[b, h] tokens."""
    q = np.asarray(query, dtype=np.float64)
    batch, num_q_heads, head_dim = q.shape
    num_kv_heads = key_cache.shape[2]
    group = num_q_heads // num_kv_heads
    out = np.zeros_like(q)
    for b in range(batch):
        for h in range(num_kv_heads):
            n = int(lens[b, h])
            if n == 0:
                continue
            k = logical_kv(np.asarray(key_cache, np.float64), table[b, h], n)[:, h]
            v = logical_kv(np.asarray(value_cache, np.float64), table[b, h], n)[:, h]
            for g in range(group):
                logits = k @ q[b, h * group + g] / np.sqrt(head_dim)
                p = np.exp(logits - logits.max())
                out[b, h * group + g] = p @ v / p.sum()
    return out


# ---------------------------------------------------------------------------------------------
# Helpers


def rel_error(actual, expected) -> float:
    """||actual - expected|| / ||expected|| in float64 (NaN if anything is NaN)."""
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    if np.isnan(a).any():
        return float("nan")
    denom = np.linalg.norm(e)
    return float(np.linalg.norm(a - e) / (denom if denom > 0 else 1.0))


class PagedCase:
    """A random batch of sequences in a NaN-poisoned paged cache (logical float32 arrays).

    Decode by default (query [batch, Hq, D]); with `query_rows` (rows per sequence, each at most
    its length), prefill: query [sum(query_rows), Hq, D] and `query_start_loc` int32 [batch + 1].

    Blocks are handed out in random physical order; every slot that holds no token (the tail of
    each last block, unused blocks) is NaN, and block-table padding names a real block of NaNs,
    so a kernel that reads anything it should not produces NaN."""

    def __init__(
        self,
        rng: np.random.Generator,
        seq_lens,
        num_q_heads: int,
        num_kv_heads: int,
        head_dim: int,
        block_size: int,
        spare_blocks: int = 3,
        query_rows=None,
    ):
        self.seq_lens = np.asarray(seq_lens, dtype=np.int32)
        batch = len(self.seq_lens)
        blocks_per_seq = [-(-int(n) // block_size) for n in self.seq_lens]
        max_blocks = max(blocks_per_seq, default=0) + 1  # at least one padding column
        num_blocks = sum(blocks_per_seq) + spare_blocks
        perm = rng.permutation(num_blocks).astype(np.int32)
        spare = perm[sum(blocks_per_seq) :]
        self.block_table = np.empty((batch, max_blocks), dtype=np.int32)
        used = 0
        for b, n in enumerate(blocks_per_seq):
            self.block_table[b, :n] = perm[used : used + n]
            self.block_table[b, n:] = spare[b % len(spare)]
            used += n
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        self.key_cache = np.full(shape, np.nan, dtype=np.float32)
        self.value_cache = np.full(shape, np.nan, dtype=np.float32)
        for b in range(batch):
            length = int(self.seq_lens[b])
            tokens = np.arange(length)
            blocks = self.block_table[b, tokens // block_size]
            size = (length, num_kv_heads, head_dim)
            self.key_cache[blocks, tokens % block_size] = rng.standard_normal(size)
            self.value_cache[blocks, tokens % block_size] = rng.standard_normal(size)
        if query_rows is None:
            self.query = rng.standard_normal((batch, num_q_heads, head_dim)).astype(np.float32)
        else:
            rows = np.asarray(query_rows, dtype=np.int32)
            self.query_start_loc = np.concatenate([[0], np.cumsum(rows)]).astype(np.int32)
            total = int(self.query_start_loc[-1])
            self.query = rng.standard_normal((total, num_q_heads, head_dim)).astype(np.float32)
