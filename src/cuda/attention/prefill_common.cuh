#pragma once

// What the prefill kernels share: their arguments, and the work of one CTA (a tile of query
// positions of one sequence, with up to heads_per_cta query heads of one KV head's group, over a
// split of the keys those positions read).
//
// The schedule is computed in the kernel from host-known sizes, so nothing is synchronised and a
// captured CUDA graph stays correct when query_start_loc, lengths and tables change between
// replays. Sequence b's rows are cut into tiles of `positions` rows; the grid holds
// num_query_rows / positions + batch "virtual" tiles, and sequence b owns virtual tiles
// [first_tile(b), first_tile(b + 1)) with first_tile(b) = query_start_loc[b] / positions + b.
// That run is at least ceil(n_b / positions) long (floor((s + n) / P) - floor(s / P) + 1 >=
// ceil(n / P)), so every row has a tile; the few virtual tiles past a sequence's rows exit at
// once. A CTA finds its sequence by a 32-way search over first_tile, which is non-decreasing.
// In a mixed call (skip_single_rows) the tiles of sequences with exactly one row exit too: the
// decode kernel, launched first, attends those rows.
//
// Values read from the device are never trusted: offsets are clamped to [0, num_query_rows] (the
// first sequence starting at row 0 and the last ending at the last row, as valid offsets do:
// query_row_start / query_row_end in params.cuh, which the decode kernel of a mixed call reads
// them through too) and lengths to the table's capacity, so no row outside the query/output and
// no page outside the table is touched whatever query_start_loc holds (the core checks the
// values where it can read them), and every row is written (by exactly one of a mixed call's
// two kernels when the offsets are valid). A row whose position would be negative (more rows
// than keys) sees no key: output 0, log-sum-exp -inf.

#include <cstdint>

#include "cuda/attention/params.cuh"

namespace tinyserve::kernels::cuda {

struct PrefillArgs {
  DecodeArgs a;  // query, paged caches, outputs (rows = query rows), group, logit transform
  const std::int32_t* query_start_loc;  // [batch + 1]
  int batch;
  int num_query_rows;
  int positions;      // query positions per CTA
  int heads_per_cta;  // query heads of a group per CTA
  // A mixed call: the decode launch before this one took the sequences of exactly one row, so
  // their tiles exit at once.
  bool skip_single_rows;
};

// As in the decode kernel: a row's running max is raised only when a score exceeds it by this
// much (log2 units), so probabilities stay below 2^8 and most tiles skip the rescale.
constexpr float kPrefillRescaleThreshold = 8.0f;

// The work of one CTA.
struct PrefillUnit {
  int b;     // sequence
  int row0;  // its first query row (global row index)
  int rows;  // query positions in this tile, >= 1
  int pos0;  // the position (key index) of row0; may be negative on bad input
  int kv_head, head0, heads;
  int key_begin;   // first key of the tile range, a multiple of the key tile
  int tile_begin;  // this split's key tiles: [tile_begin, tile_end) from key_begin
  int tile_end;
};

// Sequence b's first query row, as the kernels trust it (params.cuh).
__device__ __forceinline__ int sequence_start(const PrefillArgs& p, int b) {
  return query_row_start(p.query_start_loc, p.num_query_rows, b);
}

// The largest b in [0, batch) whose first virtual tile is at most t. Every lane of the warp
// returns the same value.
__device__ __forceinline__ int find_sequence(const PrefillArgs& p, int t) {
  const int lane = threadIdx.x % 32;
  auto first_tile = [&](int b) { return sequence_start(p, b) / p.positions + b; };
  int lo = 0, hi = p.batch;  // the answer is in [lo, hi)
  while (hi - lo > 1) {
    const int step = (hi - lo + 31) / 32;
    const int probe = lo + lane * step;
    const unsigned found = __ballot_sync(0xffffffffu, probe < hi && first_tile(probe) <= t);
    lo += (found ? 31 - __clz(int(found)) : 0) * step;
    hi = min(hi, lo + step);
  }
  return lo;
}

// The CTA's unit from its grid position (virtual tile, KV head x head tile, split), with keys
// cut in tiles of key_tile. Returns false when the virtual tile holds no row.
__device__ __forceinline__ bool prefill_unit(const PrefillArgs& p, int key_tile, PrefillUnit& u) {
  // Later tiles of a sequence read more keys: start them first.
  const int t = int(gridDim.x - 1 - blockIdx.x);
  const int b = find_sequence(p, t);
  const int start = sequence_start(p, b);
  const int n = query_row_end(p.query_start_loc, p.num_query_rows, p.batch, b, start) - start;
  const int j = t - (start / p.positions + b);
  if (j < 0 || j * p.positions >= n || (p.skip_single_rows && n == 1)) return false;
  const DecodeArgs& a = p.a;
  u.b = b;
  u.row0 = start + j * p.positions;
  u.rows = min(p.positions, n - j * p.positions);
  u.kv_head = int(blockIdx.y) / a.head_tiles;
  u.head0 = u.kv_head * a.group + (int(blockIdx.y) % a.head_tiles) * p.heads_per_cta;
  u.heads = min(p.heads_per_cta, u.kv_head * a.group + a.group - u.head0);
  const int len = a.kv.seq_len(b, u.kv_head);
  u.pos0 = len - n + j * p.positions;
  // Keys [lo, hi): the union of the rows' causal (windowed) ranges.
  const int hi = max(0, u.pos0 + u.rows);
  int lo = a.window_left >= 0 ? max(0, u.pos0 - a.window_left) : 0;
  lo = min(lo, hi);
  u.key_begin = lo / key_tile * key_tile;
  const int tiles = (hi - u.key_begin + key_tile - 1) / key_tile;
  const int per_split = (tiles + a.output.num_splits - 1) / a.output.num_splits;
  u.tile_begin = min(tiles, int(blockIdx.z) * per_split);
  u.tile_end = min(tiles, u.tile_begin + per_split);
  return true;
}

}  // namespace tinyserve::kernels::cuda
