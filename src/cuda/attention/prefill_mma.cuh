#pragma once

// The tensor-core prefill kernel: float16/bfloat16, head_dim 64/128/256, 16-byte aligned rows.
//
// One CTA per (tile of query positions of one sequence, KV head x tile of its query heads, split
// of the keys); see prefill_common.cuh for the schedule. Its shape is a PrefillTile (below);
// PrefillMmaConfig<D> is the one each head dim ships with, and benchmarks/sweep_prefill times the
// others. The CTA's query rows (warps x 16 x row tiles per warp: 128 as shipped, 64 at head_dim
// 256) are positions x query heads of one GQA group (row r = position r / heads_per_cta, head
// r % heads_per_cta), so the heads of a group share every K/V tile; each warp owns its row tiles
// (m16n8k16) and runs its own online softmax over all the CTA's keys, so no cross-warp merge is
// needed. K/V tiles are gathered row by row from their pages through the block table with
// cp.async into padded shared rows (the 16-byte pad puts the 8 rows of every ldmatrix in distinct
// banks), in a ring of Stages tiles: the copies of the next tiles run under the MMAs of this one.
// Masks are applied only to chunks that cross a row's causal or window boundary; tiles outside
// every row's range are never loaded (the key range is the union of the rows' ranges).

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "cuda/attention/prefill_common.cuh"
#include "cuda/dtypes.cuh"
#include "cuda/ptx.cuh"

namespace tinyserve::kernels::cuda {

// How a CTA overlaps its K/V copies with its MMAs (see the kernel's main loop):
//  kTwoBarriers: each tile's K and V land together; the copy of tile i + Stages - 1 is issued
//                before waiting for tile i, and a second barrier frees tile i's stage.
//  kOneBarrier:  as above, but the copy is issued after the one barrier that says tile i has
//                landed, into the stage that every warp finished with in the previous tile.
enum class PrefillPipeline { kTwoBarriers, kOneBarrier };

// The tile configuration of the tensor-core prefill kernel.
//  Warps:        warps per CTA; each owns 16 * WarpTiles query rows.
//  WarpTiles:    m16 row tiles per warp: with two, every K/V fragment read from shared memory
//                feeds two MMAs (with one, ldmatrix traffic, not the tensor cores, bounds a warp).
//  Keys:         keys per copied K/V tile (one pipeline stage).
//  ChunkKeys:    keys whose scores are held in registers at once (a divisor of Keys); a tile
//                wider than its chunk halves the barriers and copy setup per key without the
//                registers of wider scores.
//  Stages:       K/V tiles in flight (shared memory: Q + Stages x (K + V) tiles).
//  PrefetchTable: the block-table entries of the next tile are loaded one tile ahead, so a copy's
//                addresses do not wait on a dependent global load; a power-of-two page size
//                takes a copy of the loader without page_of's run-time branch.
//  QInRegisters: Q fragments are loaded once into registers instead of from shared per k-step.
//  FusedScale:   the softmax scale is folded into the exponent (one FFMA per score with the max
//                subtraction) where there is no soft-cap and the scale is positive, and the
//                logit transform runs under one branch per chunk instead of one per score (and
//                masked chunks recompute their rows' positions instead of holding them).
//  UniformMma:   the row tiles' MMAs run under one warp-uniform branch (a CTA of decode rows
//                takes a one-row-tile copy of the loop) instead of a predicate per MMA, which
//                costs a WARPSYNC per MMA in SASS.
//  MinBlocks:    CTAs per multiprocessor the register allocation must allow (launch bounds).
//  SharedRowAddresses: the global address of every K and V row of a tile is computed once, by
//                one thread, into a shared ring (the end of iteration i computes tile i + 2's,
//                from a block id loaded at its start), instead of by each of the kChunks threads
//                that copy a piece of the row: a copy is then a shared load and an add
//                (kOneBarrier, 2 stages; replaces PrefetchTable).
//  ZeroRowSource: a zero-filled row's slot of the address ring holds a static row of zeros
//                instead of 0, so a copy reads its source as is (no compare and select per copy).
//                SharedRowAddresses only.
//  AddressBatch: copies whose ring addresses are loaded from shared memory together before they
//                are issued: ptxas puts three never-executed shared loads between a shared load
//                and a following cp.async, so loading N addresses first issues those once per N
//                copies instead of once per copy (N address register pairs live instead of one).
//                SharedRowAddresses only.
//  MmaRowSums:   the row sums of P are accumulated by one more MMA per 16 keys and row tile (P
//                times a column of ones) instead of an FADD per score, which also leaves no quad
//                reduction at the end.
//  TreeRowMax:   a row's max over the chunk is reduced as a tree (dependency depth log2 of the
//                scores, not their number), and one vote per chunk decides the rescale of every
//                row tile instead of one per row tile.
//  CopyInScores: the copy of tile i + 1 is issued in address batches between the k-steps of
//                tile i's first score MMAs instead of all at once after the barrier, so its
//                instructions issue while the tensor cores work (SharedRowAddresses).
template <int D, int Warps, int WarpTiles, int Keys, int ChunkKeys, int Stages,
          PrefillPipeline Pipeline, bool PrefetchTable, bool QInRegisters, bool FusedScale,
          bool UniformMma = false, int MinBlocks = 1, bool SharedRowAddresses = false,
          bool ZeroRowSource = false, int AddressBatch = 1, bool MmaRowSums = false,
          bool TreeRowMax = false, bool CopyInScores = false>
struct PrefillTile {
  static constexpr int kHeadDim = D;
  static constexpr int kWarps = Warps;
  static constexpr int kThreads = Warps * 32;
  static constexpr int kWarpTiles = WarpTiles;
  static constexpr int kRows = Warps * 16 * WarpTiles;  // query rows per CTA
  static constexpr int kKeys = Keys;
  static constexpr int kChunkKeys = ChunkKeys;
  static constexpr int kStages = Stages;
  static constexpr PrefillPipeline kPipeline = Pipeline;
  static constexpr bool kPrefetchTable = PrefetchTable;
  static constexpr bool kQInRegisters = QInRegisters;
  static constexpr bool kFusedScale = FusedScale;
  static constexpr bool kUniformMma = UniformMma;
  static constexpr int kMinBlocks = MinBlocks;
  static constexpr bool kSharedRowAddresses = SharedRowAddresses;
  static constexpr bool kZeroRowSource = ZeroRowSource;
  static constexpr int kAddressBatch = AddressBatch;
  static constexpr bool kMmaRowSums = MmaRowSums;
  static constexpr bool kTreeRowMax = TreeRowMax;
  static constexpr bool kCopyInScores = CopyInScores;
  static constexpr int kRow = D + 8;     // shared row stride (elements)
  static constexpr int kChunks = D / 8;  // 16-byte chunks per row
  static constexpr int kRowsPerPass = kThreads / kChunks;
  static constexpr int kQPasses = kRows / kRowsPerPass;
  static constexpr int kKvPasses = Keys / kRowsPerPass;
  static constexpr int kQBytes = kRows * kRow * 2;
  static constexpr int kTileBytes = Keys * kRow * 2;  // K or V of one tile
  static constexpr int kStageBytes = 2 * kTileBytes;
  // The row-address ring (SharedRowAddresses): 2 slots of Keys K then Keys V addresses.
  static constexpr int kAddrSlotBytes = 2 * Keys * 8;
  static constexpr int kAddrBytes = SharedRowAddresses ? 2 * kAddrSlotBytes : 0;
  static constexpr int kSmemBytes = kQBytes + Stages * kStageBytes + kAddrBytes;
  static_assert(!SharedRowAddresses ||
                    (!PrefetchTable && Stages == 2 && Pipeline == PrefillPipeline::kOneBarrier),
                "SharedRowAddresses needs kOneBarrier, 2 stages, no other table prefetch");
  static_assert((!ZeroRowSource && AddressBatch == 1) || SharedRowAddresses,
                "ZeroRowSource and AddressBatch need SharedRowAddresses");
  static_assert(AddressBatch >= 1 && (2 * Keys / (Warps * 32 / (D / 8))) % AddressBatch == 0,
                "AddressBatch must divide the copies per thread and tile");
  static_assert(!CopyInScores || SharedRowAddresses, "CopyInScores needs SharedRowAddresses");
  static_assert(kThreads % kChunks == 0 && Keys % kRowsPerPass == 0 && kRows % kRowsPerPass == 0,
                "loader shape");
  static_assert(Keys % ChunkKeys == 0 && ChunkKeys % 16 == 0 && Stages >= 2, "tile shape");
};

// The configuration each head dim ships with (one line per head dim), each the fastest of
// benchmarks/sweep_prefill on an H200 (float16, 32 query / 8 KV heads, page 16). All three take
// one barrier per tile, fold the scale into the exponent and run the row tiles under one branch.
//  64:  128-key tiles scored 64 keys at a time, Q in registers, the next tile's block ids loaded
//       a tile ahead: 1.9-2.0x the earlier 64-key, two-barrier tile.
//  128: 64-key tiles, each K/V row's address computed once per tile into shared memory and
//       loaded eight at a time, zero-filled rows copied from a zero row (no per-copy select),
//       row sums from one MMA of P with a column of ones, the row max reduced as a tree with one
//       rescale vote per chunk, and the next tile's copies issued between this tile's score MMAs:
//       1.7-1.8x the earlier 32-key, two-barrier tile (ptxas spills 44 bytes to L1 here).
//  256: one row tile per warp (two would not fit the registers), 32-key tiles (two CTAs share a
//       multiprocessor's shared memory), row addresses in shared memory: 1.3-1.45x the earlier
//       two-barrier tile.
template <int D>
using PrefillMmaConfig = std::conditional_t<
    D == 64,
    PrefillTile<64, 4, 2, 128, 64, 2, PrefillPipeline::kOneBarrier, true, true, true, true>,
    std::conditional_t<D == 128,
                       PrefillTile<128, 4, 2, 64, 64, 2, PrefillPipeline::kOneBarrier, false, false,
                                   true, true, 1, true, true, 8, true, true, true>,
                       PrefillTile<256, 4, 1, 32, 32, 2, PrefillPipeline::kOneBarrier, false, false,
                                   true, true, 1, true>>>;

// The shape a kernel of query type T runs: PrefillMmaConfig<D>, except bfloat16 at head_dim 128,
// which keeps the float32 row sums of the 64-key tile with row addresses in shared memory: the
// MMA row sums add P rounded to bfloat16 (8-bit mantissa), which moves the log-sum-exp by about
// 1e-3, where float16's P (11 bits) keeps it within 1e-4.
template <class T, int D>
using PrefillMmaShape =
    std::conditional_t<std::is_same_v<T, __nv_bfloat16> && D == 128,
                       PrefillTile<128, 4, 2, 64, 64, 2, PrefillPipeline::kOneBarrier, false, false,
                                   true, true, 1, true>,
                       PrefillMmaConfig<D>>;

// The source of zero-filled K/V rows with ZeroRowSource: one row of D 16-bit elements
// (instantiated, so emitted, only where a configuration uses it).
template <int D>
__device__ __align__(16) uint4 prefill_zero_row[D * 2 / 16];

template <class T, class C>
__global__ void __launch_bounds__(C::kThreads, C::kMinBlocks)
    prefill_mma_kernel(const __grid_constant__ PrefillArgs p) {
  constexpr int D = C::kHeadDim;
  constexpr int kKeys = C::kKeys;
  constexpr int kChunk = C::kChunkKeys;
  constexpr int kStages = C::kStages;
  constexpr int kM = C::kWarpTiles;
  constexpr PrefillPipeline kPipe = C::kPipeline;
  constexpr std::uint32_t kRowBytes = C::kRow * 2;
  extern __shared__ __align__(16) unsigned char smem[];
  PrefillUnit u;
  if (!prefill_unit(p, kKeys, u)) return;
  const DecodeArgs& a = p.a;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int hc = p.heads_per_cta;
  const std::uint32_t q_base = ptx::smem_addr(smem);
  const std::uint32_t stage_base = q_base + C::kQBytes;

  // Copies: thread t moves 16-byte chunk t % kChunks of rows t / kChunks + kRowsPerPass * i.
  const std::uint32_t chunk_bytes = (threadIdx.x % C::kChunks) * 16;
  const int row_in_pass = threadIdx.x / C::kChunks;

  // Q: rows past the tile's positions or the group's heads are zero-filled.
  {
    const T* q = static_cast<const T*>(a.query);
#pragma unroll
    for (int i = 0; i < C::kQPasses; ++i) {
      const int r = row_in_pass + i * C::kRowsPerPass;
      const int pos = r / hc, h = r - pos * hc;
      const bool valid = pos < u.rows && h < u.heads;
      const T* src = valid ? q + std::int64_t(u.row0 + pos) * a.q_stride_batch +
                                 std::int64_t(u.head0 + h) * a.q_stride_head
                           : q;
      ptx::cp_async_16_shared_data(q_base + r * kRowBytes + chunk_bytes,
                                   reinterpret_cast<const char*>(src) + chunk_bytes, !valid);
    }
  }

  // K/V tiles: key rows past the range, or in a block outside the cache, are zero-filled. The
  // block of each row this thread copies is looked up first (-1: zero-fill), then K and/or V are
  // copied from it.
  const std::int32_t* table = a.kv.table_row(u.b, u.kv_head);
  const T* k_head = a.kv.k_head<T>(u.kv_head);
  const T* v_head = a.kv.v_head<T>(u.kv_head);
  const int key_end = max(0, u.pos0 + u.rows);  // <= the length: pos0 + rows <= len
  const int num_tiles = u.tile_end - u.tile_begin;
  // The page of a token: pow2 (a constant at each call) takes the shift of a power-of-two page
  // size without page_of's run-time branch.
  auto page_of = [&](int token, bool pow2) {
    return pow2 ? token >> a.kv.block_shift : a.kv.page_of(token);
  };
  auto tile_blocks = [&](int tile, std::int32_t(&blocks)[C::kKvPasses], bool pow2) {
    const int k0 = u.key_begin + (u.tile_begin + tile) * kKeys;
#pragma unroll
    for (int i = 0; i < C::kKvPasses; ++i) {
      const int token = k0 + row_in_pass + i * C::kRowsPerPass;
      if constexpr (C::kPrefetchTable) {
        // Loaded unconditionally (a key of the range: key_end >= 1 where a tile exists), so no
        // branch separates the loads of a tile.
        const std::int32_t block = table[page_of(min(token, key_end - 1), pow2)];
        blocks[i] = token < key_end ? block : -1;
      } else {
        blocks[i] = token < key_end ? table[page_of(token, pow2)] : -1;
      }
    }
  };
  auto copy_tile = [&](int tile, int stage, const std::int32_t(&blocks)[C::kKvPasses], bool pow2) {
    const int k0 = u.key_begin + (u.tile_begin + tile) * kKeys;
    const std::uint32_t ks =
        stage_base + stage * C::kStageBytes + row_in_pass * kRowBytes + chunk_bytes;
    const std::uint32_t vs = ks + C::kTileBytes;
#pragma unroll
    for (int i = 0; i < C::kKvPasses; ++i) {
      const int token = k0 + row_in_pass + i * C::kRowsPerPass;
      const int page = page_of(token, pow2);
      const std::int64_t block = blocks[i];
      const bool zero = !a.kv.in_cache(block);
      const std::uint32_t dst = i * C::kRowsPerPass * kRowBytes;
      const T* kr = zero ? k_head : a.kv.k_row(k_head, block, token, page);
      ptx::cp_async_16_shared_data(ks + dst, reinterpret_cast<const char*>(kr) + chunk_bytes, zero);
      const T* vr = zero ? v_head : a.kv.v_row(v_head, block, token, page);
      ptx::cp_async_16_shared_data(vs + dst, reinterpret_cast<const char*>(vr) + chunk_bytes, zero);
    }
  };
  // Issues tile `tile` (if it exists) into its stage as one copy group. With PrefetchTable, `next`
  // holds the tile's blocks on entry and the following tile's on exit, and power-of-two page sizes
  // take a copy of the loader without page_of's branch.
  std::int32_t next[C::kPrefetchTable ? C::kKvPasses : 1];
  // SharedRowAddresses: slot tile % 2 of the ring holds the address of K row r of tile `tile` at
  // [r] and that of V row r at [kKeys + r] (0: zero-fill). This thread addresses rows
  // threadIdx.x + n * kThreads (n < kAddrRows) of the 2 * kKeys; `ahead` holds their block ids
  // (-1: past the keys) from load_row_blocks to store_row_addresses.
  unsigned char* const addr_ring = smem + C::kQBytes + kStages * C::kStageBytes;
  constexpr int kAddrRows = (2 * kKeys + C::kThreads - 1) / C::kThreads;
  std::int32_t ahead[C::kSharedRowAddresses ? kAddrRows : 1];
  auto load_row_blocks = [&](int tile, bool pow2) {
    if (tile >= num_tiles) return;
    const int k0 = u.key_begin + (u.tile_begin + tile) * kKeys;
#pragma unroll
    for (int n = 0; n < kAddrRows; ++n) {
      const int j = threadIdx.x + n * C::kThreads;
      if (j >= 2 * kKeys) break;
      const int token = k0 + j % kKeys;
      // Loaded unconditionally (a key of the range), selected after.
      const std::int32_t block = table[page_of(min(token, key_end - 1), pow2)];
      ahead[n] = token < key_end ? block : -1;
    }
  };
  auto store_row_addresses = [&](int tile, bool pow2) {
    if (tile >= num_tiles) return;
    const int k0 = u.key_begin + (u.tile_begin + tile) * kKeys;
#pragma unroll
    for (int n = 0; n < kAddrRows; ++n) {
      const int j = threadIdx.x + n * C::kThreads;
      if (j >= 2 * kKeys) break;
      const int token = k0 + j % kKeys;
      const std::int64_t block = ahead[n];
      std::uint64_t address = 0;
      if constexpr (C::kZeroRowSource) {
        address = reinterpret_cast<std::uint64_t>(prefill_zero_row<D>);
      }
      if (a.kv.in_cache(block)) {
        const int page = page_of(token, pow2);
        address = j < kKeys
                      ? reinterpret_cast<std::uint64_t>(a.kv.k_row(k_head, block, token, page))
                      : reinterpret_cast<std::uint64_t>(a.kv.v_row(v_head, block, token, page));
      }
      *reinterpret_cast<std::uint64_t*>(addr_ring + (tile % 2) * C::kAddrSlotBytes + j * 8) =
          address;
    }
  };
  // Copies n0 .. n0 + AddressBatch - 1 of tile `tile` (ZeroRowSource, AddressBatch,
  // CopyInScores): copy n moves part n % 2 (K, V) of row row_in_pass + (n / 2) * kRowsPerPass.
  auto copy_batch = [&](int tile, int n0) {
    const std::uint32_t ks =
        stage_base + (tile % kStages) * C::kStageBytes + row_in_pass * kRowBytes + chunk_bytes;
    const std::uint64_t* slot =
        reinterpret_cast<const std::uint64_t*>(addr_ring + (tile % 2) * C::kAddrSlotBytes);
    constexpr int kBatch = C::kAddressBatch;
    std::uint64_t address[kBatch];
#pragma unroll
    for (int b = 0; b < kBatch; ++b) {
      const int n = n0 + b;
      address[b] = slot[(n % 2) * kKeys + row_in_pass + (n / 2) * C::kRowsPerPass];
    }
#pragma unroll
    for (int b = 0; b < kBatch; ++b) {
      const int n = n0 + b;
      const std::uint32_t dst =
          ks + (n % 2) * C::kTileBytes + (n / 2) * C::kRowsPerPass * kRowBytes;
      if constexpr (C::kZeroRowSource) {
        ptx::cp_async_16_shared_data(dst, reinterpret_cast<const char*>(address[b]) + chunk_bytes,
                                     false);
      } else {
        const bool zero = address[b] == 0;
        const char* src = zero ? reinterpret_cast<const char*>(k_head)
                               : reinterpret_cast<const char*>(address[b]);
        ptx::cp_async_16_shared_data(dst, src + chunk_bytes, zero);
      }
    }
  };
  constexpr int kCopyBatches = 2 * C::kKvPasses / C::kAddressBatch;
  auto copy_rows = [&](int tile) {
    const std::uint32_t ks =
        stage_base + (tile % kStages) * C::kStageBytes + row_in_pass * kRowBytes + chunk_bytes;
    const std::uint64_t* slot =
        reinterpret_cast<const std::uint64_t*>(addr_ring + (tile % 2) * C::kAddrSlotBytes);
    if constexpr (C::kZeroRowSource || C::kAddressBatch > 1 || C::kCopyInScores) {
#pragma unroll
      for (int b = 0; b < kCopyBatches; ++b) copy_batch(tile, b * C::kAddressBatch);
    } else {
#pragma unroll
      for (int i = 0; i < C::kKvPasses; ++i) {
        const int r = row_in_pass + i * C::kRowsPerPass;
        const std::uint32_t dst = i * C::kRowsPerPass * kRowBytes;
#pragma unroll
        for (int part = 0; part < 2; ++part) {
          const std::uint64_t address = slot[part * kKeys + r];
          const bool zero = address == 0;
          const char* src =
              zero ? reinterpret_cast<const char*>(k_head) : reinterpret_cast<const char*>(address);
          ptx::cp_async_16_shared_data(ks + part * C::kTileBytes + dst, src + chunk_bytes, zero);
        }
      }
    }
  };
  auto issue = [&](int tile, bool pow2) {
    const bool exists = tile < num_tiles;
    if constexpr (C::kSharedRowAddresses) {
      if (exists) copy_rows(tile);
      ptx::cp_async_commit();
      return;
    }
    std::int32_t blocks[C::kKvPasses];
    if constexpr (C::kPrefetchTable) {
#pragma unroll
      for (int i = 0; i < C::kKvPasses; ++i) blocks[i] = next[i];
      if (tile + 1 < num_tiles) tile_blocks(tile + 1, next, pow2);
    } else {
      if (exists) tile_blocks(tile, blocks, pow2);
    }
    if (exists) copy_tile(tile, tile % kStages, blocks, pow2);
    ptx::cp_async_commit();
  };
  const bool pow2_pages = (C::kPrefetchTable || C::kSharedRowAddresses) && a.kv.block_shift >= 0;
  auto rows_ahead = [&](int tile, bool store) {
    if (pow2_pages) {
      store ? store_row_addresses(tile, true) : load_row_blocks(tile, true);
    } else {
      store ? store_row_addresses(tile, false) : load_row_blocks(tile, false);
    }
  };
  auto issue_tile = [&](int tile) {
    if (pow2_pages) {
      issue(tile, true);
    } else {
      issue(tile, false);
    }
  };

  // The warp owns rows warp * 16 * kM + mt * 16 + [0, 16) for mt < kM; this thread rows g =
  // lane / 4 and g + 8 of each, at positions qpos (-1: not a row of the tile, sees no key).
  const int quad_col = 2 * (lane % 4);
  const int warp_row0 = warp * 16 * kM;
  auto row_position = [&](int mt, int r) {
    const int row = warp_row0 + mt * 16 + lane / 4 + 8 * r;
    const int pos = row / hc, h = row - pos * hc;
    return pos < u.rows && h < u.heads ? u.pos0 + pos : -1;
  };
  int qpos[kM][2];
#pragma unroll
  for (int mt = 0; mt < kM; ++mt) {
#pragma unroll
    for (int r = 0; r < 2; ++r) qpos[mt][r] = row_position(mt, r);
  }
  // Rows are filled from 0 on: a warp past the last row only helps copy, and a row tile past it
  // (a decode row's tile fills 1 position x the group) skips its MMAs.
  const bool warp_active = warp_row0 < u.rows * hc;
  auto tile_active = [&](int mt) { return mt == 0 || warp_row0 + mt * 16 < u.rows * hc; };
  const int pos_last = u.pos0 + u.rows - 1;
  // A chunk needs masks where a key follows the first row's position (causal) or precedes the
  // last row's window.
  auto needs_mask = [&](int k0) {
    return k0 + kChunk - 1 > u.pos0 || (a.window_left >= 0 && k0 < pos_last - a.window_left);
  };
  // Whether the row at position pos sees key k0 + j * 8 + quad_col + e % 2.
  auto seen = [&](int k0, int pos, int j, int e) {
    const int key = k0 + j * 8 + quad_col + (e % 2);
    return key <= pos && (a.window_left < 0 || key >= pos - a.window_left);
  };
  // Scores become logits (log2 units) as logit = s * score_scale; FusedScale leaves the scale to
  // the exponent where that is exact in order (no soft-cap, positive scale).
  const bool scale_in_exp = C::kFusedScale && !a.soft_cap && a.pre > 0.0f;
  const float score_scale = scale_in_exp ? a.pre : 1.0f;

  // Fragment addresses (shared, bytes), as in the decode kernel. Q (A operand) of row tile mt:
  // rows warp_row0 + mt * 16 + (l / 8 % 2) * 8 + l % 8, columns (l / 16) * 8 of each 16-wide
  // step. K (B operand of S), per 16 keys: keys (l / 16) * 8 + l % 8, columns (l / 8 % 2) * 8.
  // V (B operand of O, transposed), per 16 keys: keys (l / 8 % 2) * 8 + l % 8, columns
  // (l / 16) * 8.
  const std::uint32_t q_frag =
      q_base + (warp_row0 + (lane % 8) + ((lane / 8) % 2) * 8) * kRowBytes + (lane / 16) * 16;
  const std::uint32_t k_frag =
      stage_base + ((lane / 16) * 8 + lane % 8) * kRowBytes + ((lane / 8) % 2) * 16;
  const std::uint32_t v_frag =
      stage_base + C::kTileBytes + (((lane / 8) % 2) * 8 + lane % 8) * kRowBytes + (lane / 16) * 16;

  float o[kM][D / 8][4];
  float m[kM][2], l[kM][2];
  // MmaRowSums: the row sums as an MMA accumulator (every column holds its row's sum).
  float l_acc[C::kMmaRowSums ? kM : 1][4];
#pragma unroll
  for (int mt = 0; mt < kM; ++mt) {
#pragma unroll
    for (int nb = 0; nb < D / 8; ++nb) {
      o[mt][nb][0] = o[mt][nb][1] = o[mt][nb][2] = o[mt][nb][3] = 0.0f;
    }
    m[mt][0] = m[mt][1] = -INFINITY;
    l[mt][0] = l[mt][1] = 0.0f;
    if constexpr (C::kMmaRowSums) {
      l_acc[C::kMmaRowSums ? mt : 0][0] = l_acc[C::kMmaRowSums ? mt : 0][1] = 0.0f;
      l_acc[C::kMmaRowSums ? mt : 0][2] = l_acc[C::kMmaRowSums ? mt : 0][3] = 0.0f;
    }
  }
  std::uint32_t q_regs[C::kQInRegisters ? kM : 1][C::kQInRegisters ? D / 16 : 1][4];

  // Copy groups: the first holds Q with tile 0; then one group per tile, committed even when the
  // tile does not exist, so the wait counts below hold.
  if constexpr (C::kPrefetchTable) {
    if (num_tiles > 0) tile_blocks(0, next, pow2_pages);
  }
  if constexpr (C::kSharedRowAddresses) {
    rows_ahead(0, false);
    rows_ahead(0, true);
    __syncthreads();  // tile 0's addresses
  }
#pragma unroll
  for (int t = 0; t < kStages - 1; ++t) issue_tile(t);
  if constexpr (C::kSharedRowAddresses) {
    rows_ahead(1, false);
    rows_ahead(1, true);  // read after the first iteration's barrier
  }
  for (int it = 0; it < num_tiles; ++it) {
    if constexpr (kPipe == PrefillPipeline::kTwoBarriers) {
      issue_tile(it + kStages - 1);
      ptx::cp_async_wait<kStages - 1>();  // everything but the tiles after `it` has landed
      __syncthreads();
    } else if constexpr (kPipe == PrefillPipeline::kOneBarrier) {
      ptx::cp_async_wait<kStages - 2>();
      __syncthreads();  // tile it has landed, and every warp is done with tile it - 1's stage
      if constexpr (!C::kCopyInScores) issue_tile(it + kStages - 1);    // else in qk below
      if constexpr (C::kSharedRowAddresses) rows_ahead(it + 2, false);  // stored below
    }
    if (warp_active && C::kQInRegisters && it == 0) {
#pragma unroll
      for (int mt = 0; mt < kM; ++mt) {
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
          ptx::ldmatrix_x4(q_regs[C::kQInRegisters ? mt : 0][C::kQInRegisters ? kk : 0],
                           q_frag + mt * 16 * kRowBytes + kk * 32);
        }
      }
    }
    const std::uint32_t stage_offset = (it % kStages) * C::kStageBytes;
    // The chunk's work for the first `active` row tiles (a constant at each call): scores
    // (qk), softmax, then P V (accumulate).
    // CopyInScores: tile it + 1's copy batches, spread evenly over the k-steps of chunk 0's
    // scores (copy_in), so they issue while the tensor cores work.
    const bool next_exists = it + 1 < num_tiles;
    auto copy_step = [&](int kk) {
      if constexpr (C::kCopyInScores) {
        if (!next_exists) return;
#pragma unroll
        for (int b = 0; b < kCopyBatches; ++b) {
          if (b * (D / 16) / kCopyBatches == kk) copy_batch(it + 1, b * C::kAddressBatch);
        }
      }
    };
    auto qk = [&](int active, float(&s)[kM][kChunk / 8][4], std::uint32_t chunk_offset,
                  bool copy_in = false) {
    // A row tile's MMAs run when it holds a row: a warp-uniform branch around the row tiles
    // (kUniformMma) or a per-MMA predicate.
    // S = Q K^T: 16 * active rows x kChunk keys per warp; each K fragment feeds `active` MMAs.
#pragma unroll
      for (int mt = 0; mt < active; ++mt) {
#pragma unroll
        for (int j = 0; j < kChunk / 8; ++j)
          s[mt][j][0] = s[mt][j][1] = s[mt][j][2] = s[mt][j][3] = 0.0f;
      }
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        std::uint32_t qa[kM][4];
#pragma unroll
        for (int mt = 0; mt < active; ++mt) {
          if constexpr (C::kQInRegisters) {
#pragma unroll
            for (int i = 0; i < 4; ++i)
              qa[mt][i] = q_regs[C::kQInRegisters ? mt : 0][C::kQInRegisters ? kk : 0][i];
          } else {
            ptx::ldmatrix_x4(qa[mt], q_frag + mt * 16 * kRowBytes + kk * 32);
          }
        }
#pragma unroll
        for (int kb = 0; kb < kChunk / 16; ++kb) {
          std::uint32_t kf[4];
          ptx::ldmatrix_x4(kf, k_frag + chunk_offset + kb * 16 * kRowBytes + kk * 32);
#pragma unroll
          for (int mt = 0; mt < active; ++mt) {
            if (!(C::kUniformMma || tile_active(mt))) continue;
            ptx::mma_16816<T>(s[mt][2 * kb], qa[mt], kf[0], kf[1]);
            ptx::mma_16816<T>(s[mt][2 * kb + 1], qa[mt], kf[2], kf[3]);
          }
        }
        if constexpr (C::kCopyInScores) {
          if (copy_in) copy_step(kk);
        }
      }
    };
    auto softmax = [&](int active, float(&s)[kM][kChunk / 8][4], int k0) {
      // Logits; element (j, e) of row tile mt is row qpos[mt][e / 2], key
      // k0 + j * 8 + quad_col + e % 2.
      if constexpr (C::kFusedScale) {
        // The transform runs under one branch per chunk, not one per score.
        if (!scale_in_exp) {
          if (a.soft_cap) {
#pragma unroll
            for (int mt = 0; mt < active; ++mt)
#pragma unroll
              for (int j = 0; j < kChunk / 8; ++j)
#pragma unroll
                for (int e = 0; e < 4; ++e) s[mt][j][e] = a.post * tanhf(s[mt][j][e] * a.pre);
          } else {
#pragma unroll
            for (int mt = 0; mt < active; ++mt)
#pragma unroll
              for (int j = 0; j < kChunk / 8; ++j)
#pragma unroll
                for (int e = 0; e < 4; ++e) s[mt][j][e] *= a.pre;
          }
        }
        if (needs_mask(k0)) {
          // Positions are recomputed here (masked chunks are few) rather than held in registers.
#pragma unroll
          for (int mt = 0; mt < active; ++mt) {
            const int pos[2] = {row_position(mt, 0), row_position(mt, 1)};
#pragma unroll
            for (int j = 0; j < kChunk / 8; ++j)
#pragma unroll
              for (int e = 0; e < 4; ++e)
                s[mt][j][e] = seen(k0, pos[e / 2], j, e) ? s[mt][j][e] : -INFINITY;
          }
        }
      } else if (needs_mask(k0)) {
#pragma unroll
        for (int mt = 0; mt < active; ++mt) {
#pragma unroll
          for (int j = 0; j < kChunk / 8; ++j) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              s[mt][j][e] = seen(k0, qpos[mt][e / 2], j, e) ? a.logit(s[mt][j][e]) : -INFINITY;
            }
          }
        }
      } else {
#pragma unroll
        for (int mt = 0; mt < active; ++mt) {
#pragma unroll
          for (int j = 0; j < kChunk / 8; ++j) {
#pragma unroll
            for (int e = 0; e < 4; ++e) s[mt][j][e] = a.logit(s[mt][j][e]);
          }
        }
      }
      // Online softmax; a row's scores are spread over the 4 lanes of a quad.
      // TreeRowMax: every row tile's maxima first (tree-reduced), then one vote for all.
      float tile_mx[C::kTreeRowMax ? kM : 1][2];
      bool tile_grow = false;
      if constexpr (C::kTreeRowMax) {
        bool grow = false;
#pragma unroll
        for (int mt = 0; mt < active; ++mt) {
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            float v[kChunk / 8];
#pragma unroll
            for (int j = 0; j < kChunk / 8; ++j) v[j] = fmaxf(s[mt][j][2 * r], s[mt][j][2 * r + 1]);
#pragma unroll
            for (int w = kChunk / 16; w >= 1; w /= 2) {
#pragma unroll
              for (int j = 0; j < w; ++j) v[j] = fmaxf(v[j], v[j + w]);
            }
            float mx = fmaxf(v[0], __shfl_xor_sync(0xffffffffu, v[0], 1));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
            mx *= score_scale;  // -inf stays -inf
            tile_mx[C::kTreeRowMax ? mt : 0][r] = mx;
            grow = grow || mx > m[mt][r] + kPrefillRescaleThreshold;
          }
        }
        tile_grow = __any_sync(0xffffffffu, grow);
      }
#pragma unroll
      for (int mt = 0; mt < active; ++mt) {
        float mx[2];
        if constexpr (C::kTreeRowMax) {
          mx[0] = tile_mx[C::kTreeRowMax ? mt : 0][0];
          mx[1] = tile_mx[C::kTreeRowMax ? mt : 0][1];
        } else {
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            mx[r] = -INFINITY;
#pragma unroll
            for (int j = 0; j < kChunk / 8; ++j) {
              mx[r] = fmaxf(mx[r], fmaxf(s[mt][j][2 * r], s[mt][j][2 * r + 1]));
            }
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
            if constexpr (C::kFusedScale) mx[r] *= score_scale;  // -inf stays -inf
          }
        }
        const bool grow = mx[0] > m[mt][0] + kPrefillRescaleThreshold ||
                          mx[1] > m[mt][1] + kPrefillRescaleThreshold;
        if (C::kTreeRowMax ? tile_grow : __any_sync(0xffffffffu, grow)) {
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            if (mx[r] > m[mt][r]) {
              const float correction = ptx::exp2_approx(m[mt][r] - mx[r]);  // 0 when m was -inf
              m[mt][r] = mx[r];
              l[mt][r] *= correction;
              if constexpr (C::kMmaRowSums) {
                l_acc[C::kMmaRowSums ? mt : 0][2 * r] *= correction;
                l_acc[C::kMmaRowSums ? mt : 0][2 * r + 1] *= correction;
              }
#pragma unroll
              for (int nb = 0; nb < D / 8; ++nb) {
                o[mt][nb][2 * r] *= correction;
                o[mt][nb][2 * r + 1] *= correction;
              }
            }
          }
        }
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const float base = m[mt][r] == -INFINITY ? 0.0f : m[mt][r];  // nothing seen: p = 0
#pragma unroll
          for (int j = 0; j < kChunk / 8; ++j) {
#pragma unroll
            for (int e = 2 * r; e < 2 * r + 2; ++e) {
              if constexpr (C::kFusedScale) {
                s[mt][j][e] = ptx::exp2_approx(fmaf(s[mt][j][e], score_scale, -base));
              } else {
                s[mt][j][e] = ptx::exp2_approx(s[mt][j][e] - base);
              }
              if constexpr (!C::kMmaRowSums) l[mt][r] += s[mt][j][e];
            }
          }
        }
      }
    };
    auto accumulate = [&](int active, float(&s)[kM][kChunk / 8][4], std::uint32_t chunk_offset) {
    // O += P V, 16 keys at a time: P's accumulator layout is the A operand layout; each V
    // fragment feeds `active` MMAs.
#pragma unroll
      for (int kc = 0; kc < kChunk / 16; ++kc) {
        std::uint32_t pa[kM][4];
#pragma unroll
        for (int mt = 0; mt < active; ++mt) {
          pa[mt][0] = pack2<T>(s[mt][2 * kc][0], s[mt][2 * kc][1]);
          pa[mt][1] = pack2<T>(s[mt][2 * kc][2], s[mt][2 * kc][3]);
          pa[mt][2] = pack2<T>(s[mt][2 * kc + 1][0], s[mt][2 * kc + 1][1]);
          pa[mt][3] = pack2<T>(s[mt][2 * kc + 1][2], s[mt][2 * kc + 1][3]);
        }
#pragma unroll
        for (int dp = 0; dp < D / 16; ++dp) {
          std::uint32_t vf[4];
          ptx::ldmatrix_x4_trans(vf, v_frag + chunk_offset + kc * 16 * kRowBytes + dp * 32);
#pragma unroll
          for (int mt = 0; mt < active; ++mt) {
            if (!(C::kUniformMma || tile_active(mt))) continue;
            ptx::mma_16816<T>(o[mt][2 * dp], pa[mt], vf[0], vf[1]);
            ptx::mma_16816<T>(o[mt][2 * dp + 1], pa[mt], vf[2], vf[3]);
          }
        }
        if constexpr (C::kMmaRowSums) {
          const std::uint32_t ones = pack2<T>(1.0f, 1.0f);
#pragma unroll
          for (int mt = 0; mt < active; ++mt) {
            if (!(C::kUniformMma || tile_active(mt))) continue;
            ptx::mma_16816<T>(l_acc[C::kMmaRowSums ? mt : 0], pa[mt], ones, ones);
          }
        }
      }
    };
    // With kUniformMma, a warp whose second row tile holds no row (a decode row's CTA) runs
    // one row tile; rows fill from 0, so otherwise every tile runs (one past the rows is masked).
    const bool one_tile = C::kUniformMma && kM > 1 && !tile_active(1);
    constexpr int kChunksPerTile = kKeys / kChunk;
    float s[kM][kChunk / 8][4];  // the chunk's scores, then its P
#pragma unroll
    for (int c = 0; c < kChunksPerTile; ++c) {
      const int k0 = u.key_begin + (u.tile_begin + it) * kKeys + c * kChunk;
      // A chunk past every row's position (in a tile wider than its chunk) is all masked.
      const bool chunk_live = warp_active && (c == 0 || k0 <= pos_last);
      const std::uint32_t chunk_offset = stage_offset + c * kChunk * kRowBytes;
      if constexpr (C::kCopyInScores) {
        // Tile it + 1's copy goes with chunk 0's scores (all at once in a warp with no rows),
        // committed as the tile's copy group.
        if (chunk_live) {
          if (one_tile) {
            qk(1, s, chunk_offset, c == 0);
          } else {
            qk(kM, s, chunk_offset, c == 0);
          }
        } else if (c == 0 && next_exists) {
#pragma unroll
          for (int b = 0; b < kCopyBatches; ++b) copy_batch(it + 1, b * C::kAddressBatch);
        }
        if (c == 0) ptx::cp_async_commit();
        if (chunk_live) {
          if (one_tile) {
            softmax(1, s, k0);
          } else {
            softmax(kM, s, k0);
          }
        }
      } else if (chunk_live) {
        if (one_tile) {
          qk(1, s, chunk_offset);
          softmax(1, s, k0);
        } else {
          qk(kM, s, chunk_offset);
          softmax(kM, s, k0);
        }
      }
      if (chunk_live) {
        if (one_tile) {
          accumulate(1, s, chunk_offset);
        } else {
          accumulate(kM, s, chunk_offset);
        }
      }
    }
    if constexpr (kPipe == PrefillPipeline::kTwoBarriers) {
      __syncthreads();  // the stage is free for the copy kStages iterations on
    }
    // Tile it + 2's addresses into tile it's slot (read by every thread before this iteration's
    // barrier), read after the next one.
    if constexpr (C::kSharedRowAddresses) rows_ahead(it + 2, true);
  }
  ptx::cp_async_wait<0>();
  ptx::allow_dependent_grids();  // the merge kernel (if any) may start launching
  if (!warp_active) return;

  const AttentionOutput& out = a.output;
#pragma unroll
  for (int mt = 0; mt < kM; ++mt) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float sum = l[mt][r];
      if constexpr (C::kMmaRowSums) {
        sum = l_acc[C::kMmaRowSums ? mt : 0][2 * r];  // already summed over the quad's keys
      } else {
        sum += __shfl_xor_sync(0xffffffffu, sum, 1);
        sum += __shfl_xor_sync(0xffffffffu, sum, 2);
      }
      const int row = warp_row0 + mt * 16 + lane / 4 + 8 * r;
      const int pos = row / hc, h = row - pos * hc;
      if (pos >= u.rows || h >= u.heads) continue;
      const int query_row = u.row0 + pos, head = u.head0 + h;
      const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
      const float lse2 = sum > 0.0f ? m[mt][r] + log2f(sum) : -INFINITY;
      if (out.num_splits == 1) {
        T* dst = static_cast<T*>(out.out) + std::int64_t(query_row) * out.out_stride_batch +
                 std::int64_t(head) * out.out_stride_head + quad_col;
#pragma unroll
        for (int nb = 0; nb < D / 8; ++nb) {
          *reinterpret_cast<std::uint32_t*>(dst + nb * 8) =
              pack2<T>(o[mt][nb][2 * r] * inv, o[mt][nb][2 * r + 1] * inv);
        }
        if (lane % 4 == 0 && out.lse) {
          out.lse[std::int64_t(query_row) * out.lse_stride_batch +
                  std::int64_t(head) * out.lse_stride_head] = natural_lse(lse2);
        }
      } else {
        const std::int64_t part_row =
            (std::int64_t(blockIdx.z) * out.batch + query_row) * out.num_q_heads + head;
        float* dst = out.part_out + part_row * D + quad_col;
#pragma unroll
        for (int nb = 0; nb < D / 8; ++nb) {
          *reinterpret_cast<float2*>(dst + nb * 8) =
              make_float2(o[mt][nb][2 * r] * inv, o[mt][nb][2 * r + 1] * inv);
        }
        if (lane % 4 == 0) out.part_lse[part_row] = lse2;
      }
    }
  }
}

}  // namespace tinyserve::kernels::cuda
