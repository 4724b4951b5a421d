#pragma once

// The tensor-core decode kernel: float16/bfloat16 queries over caches of the same type or of
// float8 e4m3fn, head_dim 64/128/256, 16-byte aligned rows.
//
// One CTA per (sequence, split, KV head, tile of up to 16 query heads of its GQA group), so all
// query heads of a group share every K/V tile. K and V tiles (64 tokens through 4 warps, or 128
// through 8 for rows of at most 128 bytes: MmaConfig) stream through a cp.async pipeline of
// kStages shared-memory stages (rows past the range are zero-filled, never read); each warp owns
// 16 tokens of every 64 or 128 of a tile. Q.K^T
// and P.V run on tensor cores (m16n8k16, float32 accumulation; the query heads are the M
// dimension). Online softmax in float32, log2 domain. The warps merge their states through
// shared memory at the end; in a split launch of at most kMaxClusterSplits splits on sm_90 the
// splits of a row form a thread-block cluster and merge through distributed shared memory too
// (no merge launch). It also runs the decode launch of a mixed call
// (mixed_work_unit): one-row sequences' rows, read from query_start_loc.
//
// Float8 caches stream through the pipeline as bytes (half the traffic and half the stage
// memory) and are converted in registers, exactly, as the fragments are loaded: ldmatrix reads a
// float8 row as pairs of bytes, so each thread receives 4 neighbouring elements where a 16-bit
// fragment holds 2 and 2 eight apart. The MMAs' sums do not care in which order they add: for
// Q.K^T the query is stored with its head_dim permuted to match (within each 16), and for P.V
// each 16 columns of V split into even and odd columns, two MMAs of 8, whose outputs interleave
// back into place in the epilogue. The scales apply outside the MMAs: K's to the scores, V's to
// the accumulated output. Over float8 caches the MMAs run in float16 whatever the query type
// (float8 converts to float16 in one instruction per pair, to bfloat16 in several): a bfloat16
// query is multiplied by the power of two that brings its CTA's largest element to [2^14, 2^15)
// and rounded to float16 (exact, but for elements below 2^-31 of that largest one, which lose
// low bits), and K's scale divides the power back out of the scores.

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "cuda/attention/decode_common.cuh"
#include "cuda/attention/params.cuh"
#include "cuda/dtypes.cuh"
#include "cuda/ptx.cuh"

namespace tinyserve::kernels::cuda {

constexpr int kMmaHeads = 16;    // query heads per CTA: the M of m16n8k16
constexpr int kWarpTokens = 16;  // tokens of a warp per tile: the N of Q.K^T, the K of P.V

// Whether a split launch runs a configuration of its own rather than the unsplit launch's
// kernel: at head_dim 128 (two stages), and over float8 caches at head_dim 64 (64-token tiles);
// see MmaConfig.
constexpr bool mma_split_config(int head_dim, int kv_bytes, bool split) {
  return split && (head_dim == 128 || (head_dim == 64 && kv_bytes == 1));
}

// The kernel's shape and shared memory (Q, the stages, the row addresses) for head_dim D over
// caches of KvBytes-byte elements; SplitConfig: mma_split_config's split launches.
template <int D, int KvBytes, bool SplitConfig>
struct MmaConfig {
  // Pipeline stages. Split launches at head_dim 128 use two, so that three CTAs share a
  // multiprocessor: with the GPU filled by splits of one or a few sequences, the extra CTAs hide
  // more of each one's start, end and arithmetic (measured on an H200: about one point of the
  // read ceiling on one 128k-token sequence; unsplit batches gained nothing, and lose with the
  // extra partial wave). Everything else uses three.
  static constexpr int kStages = SplitConfig && D == 128 ? 2 : 3;
  // Tokens per stage, and warps. A tile pays fixed costs (a barrier, the waits, its rows'
  // addresses, a softmax step); with rows of at most 128 bytes (head_dim 64 in 16 bits, float8 at
  // head_dim 64 and 128) a 64-token tile is too few bytes to hide them (measured on an H200: 73%
  // of the read ceiling at head_dim 64 and 69% for float8 at head_dim 128, against 90% at
  // head_dim 128 in 16 bits), so such rows stream 128-token tiles through 8 warps, each owning
  // 16 tokens: per byte read these kernels do two (four: float8 at head_dim 64) times the scores
  // and softmax of the 16-bit head_dim-128 one, and wait on that arithmetic, which 16 warps a
  // multiprocessor hide better than 8 (H200, 64 x 4096: float8 at head_dim 64 21% faster than
  // 4 warps over 64-token tiles, 16 bits at head_dim 64 2% faster than 4 warps taking two
  // 64-token steps a tile). Float8 split launches keep 64-token tiles of 4 warps: at head_dim
  // 128 (two stages) a CTA then takes 43 KiB of shared memory and three share a multiprocessor,
  // which hide more of each other's start and end (H200: 8 x 32768 and 1 x 131072 about 3%
  // faster, ragged lengths 4%); at head_dim 64 the 8-warp tiles measured 6% slower on 8 x 32768.
  static constexpr int kTile = !SplitConfig && D * KvBytes <= 128 ? 128 : 64;
  static constexpr int kWarps = kTile == 128 ? 8 : 4;
  static constexpr int kThreads = kWarps * 32;
  // CTAs per multiprocessor the registers must allow with 8 warps (the stages' shared memory
  // allows two); 0: no bound.
  static constexpr int kMinBlocks = kWarps == 8 ? 2 : 0;
  static constexpr int kRow = D + 8;          // 16-bit query row stride (elements): 16-byte pad
  static constexpr bool kFp8 = KvBytes == 1;  // float8 stages
  // Stage rows are padded by 16 bytes, so that ldmatrix reads 8 rows without bank conflicts.
  // 128-token stages, and float8 ones at head_dim 256, interleave each token's K and V rows under
  // one pad: half the padding, which lets two CTAs of three stages share a multiprocessor (16-bit
  // head_dim 64: 112896 bytes each, where separate K and V rows take 119040; float8 at head_dim
  // 256 the same 112896 against 115968).
  static constexpr bool kInterleaved = kTile == 128 || (KvBytes == 1 && D == 256);
  static constexpr int kStageRowBytes = (kInterleaved ? 2 : 1) * D * KvBytes + 16;      // per token
  static constexpr int kVOffset = kInterleaved ? D * KvBytes : kTile * kStageRowBytes;  // V - K
  static constexpr int kChunks = D * KvBytes / 16;  // 16-byte chunks per K or V row
  static constexpr int kQChunks = D / 8;            // 16-byte chunks per query row
  static constexpr int kRowsPerPass = kThreads / kChunks;
  static constexpr int kPasses = kTile / kRowsPerPass;
  // Q's fragments stay in registers up to head_dim 128, but for 8 warps at head_dim 128 (float8),
  // where two CTAs of 256 threads leave 128 registers a thread: they are read from shared memory.
  static constexpr bool kQInRegisters = D <= 64 || (D <= 128 && kWarps == 4);
  static constexpr int kQBytes = kMmaHeads * kRow * 2;
  static constexpr int kStageBytes = (kInterleaved ? 1 : 2) * kTile * kStageRowBytes;
  static constexpr int kRowAddressBytes = kStages * 2 * kTile * 8;  // per stage: K, V row addresses
  static constexpr int kSmemBytes = kQBytes + kStages * kStageBytes + kRowAddressBytes;
  // Reduction rows of float32 outputs: stride D + 8 makes the quads' 8-byte stores conflict-free.
  static constexpr int kRedRow = D + 8;
  static constexpr int kReduceBytes = kWarps * kMmaHeads * (kRedRow + 2) * 4;
  static_assert(kReduceBytes <= kStages * kStageBytes, "reduction must fit the stage buffers");
  static_assert(kThreads % kChunks == 0 && kTile % kRowsPerPass == 0, "loader shape");
  static_assert(kTile <= kThreads, "one thread computes each row's offsets");
  static_assert(kWarps * kWarpTokens == kTile, "each warp owns 16 tokens of a tile");
};

// The running max of a row is raised only when a score exceeds it by this much (log2 units):
// probabilities then stay below 2^8 (exact enough in float32, representable in float16 and
// bfloat16), and most tiles skip rescaling the accumulators.
constexpr float kRescaleThreshold = 8.0f;

// One tile's online-softmax step for a thread's kStates softmax states (the rows or head columns
// it holds scores of): state r's kScores scores score(r, i), already logits (-inf where masked),
// are spread over the lanes that differ in the xor masks kFirstLane, 2 kFirstLane, ... kLastLane.
// Raises a state's running max m[r] only when a score of the warp exceeds it by
// kRescaleThreshold, then rescaling its sum l[r] and its accumulators (rescale(r, correction));
// turns the scores into probabilities and adds them to l[r].
template <int kStates, int kScores, int kFirstLane, int kLastLane, class Score, class Rescale>
__device__ __forceinline__ void online_softmax_step(float (&m)[2], float (&l)[2], Score&& score,
                                                    Rescale&& rescale) {
  static_assert(kScores == 2 || kScores == 4, "scores per state");
  float mx[kStates];
  bool grow = false;
#pragma unroll
  for (int r = 0; r < kStates; ++r) {
    mx[r] = kScores == 4 ? fmaxf(fmaxf(score(r, 0), score(r, 1)), fmaxf(score(r, 2), score(r, 3)))
                         : fmaxf(score(r, 0), score(r, 1));
#pragma unroll
    for (int lanes = kFirstLane; lanes <= kLastLane; lanes *= 2) {
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], lanes));
    }
  }
#pragma unroll
  for (int r = 0; r < kStates; ++r) grow = grow || mx[r] > m[r] + kRescaleThreshold;
  if (__any_sync(0xffffffffu, grow)) {
#pragma unroll
    for (int r = 0; r < kStates; ++r) {
      if (mx[r] > m[r]) {
        const float correction = ptx::exp2_approx(m[r] - mx[r]);  // 0 when m was -inf
        m[r] = mx[r];
        l[r] *= correction;
        rescale(r, correction);
      }
    }
  }
#pragma unroll
  for (int r = 0; r < kStates; ++r) {
    const float base = m[r] == -INFINITY ? 0.0f : m[r];  // nothing seen yet: p = 0
#pragma unroll
    for (int i = 0; i < kScores; ++i) {
      score(r, i) = ptx::exp2_approx(score(r, i) - base);
      l[r] += score(r, i);
    }
  }
}

// The power of two by which a bfloat16 query is multiplied before its float16 MMAs: it brings the
// CTA's largest |element| (max_abs_bits: its bits as a bfloat16) to [2^14, 2^15), within +-126
// so that it and its inverse are normal floats. An all-zero query gets 126; inf and NaN stay
// inf and NaN.
__device__ __forceinline__ int query_shift(std::uint32_t max_abs_bits) {
  const int exponent = max(int(max_abs_bits >> 7), 1) - 127;  // subnormals as 2^-126
  return min(max(14 - exponent, -126), 126);
}

// Two bfloat16 values (a 32-bit word, low half first) times factor, as a float16 pair.
__device__ __forceinline__ std::uint32_t bf16x2_to_half2_scaled(std::uint32_t x, float factor) {
  return pack2<__half>(__uint_as_float(x << 16) * factor,
                       __uint_as_float(x & 0xffff0000u) * factor);
}

// T: the query and output type (16-bit); KV: the caches' (T, or __nv_fp8_e4m3). Cluster: a split
// launch whose splits form a cluster and merge there (cluster_merge_and_store). Swap (float8
// caches, at most 8 query heads a CTA; attention.cu takes it for unsplit launches, and for split
// launches where swap_split_launch says so): the MMAs
// take the warp's 16 tokens as their M rows and the query heads as N (S^T = K Q^T,
// O^T += V^T P^T), so a GQA group of up to 8 fills half or all of N instead of padding M to 16
// rows: half the MMAs, and half the output accumulators.
template <class T, class KV, int D, bool SplitConfig, bool Cluster = false, bool Swap = false>
__global__ void __launch_bounds__(MmaConfig<D, int(sizeof(KV)), SplitConfig>::kThreads,
                                  MmaConfig<D, int(sizeof(KV)), SplitConfig>::kMinBlocks)
    decode_mma_kernel(const __grid_constant__ DecodeArgs a) {
  using C = MmaConfig<D, int(sizeof(KV)), SplitConfig>;
  static_assert(!Swap || C::kFp8, "the swapped MMAs read float8 tiles");
  using M = std::conditional_t<C::kFp8, __half, T>;  // the MMAs' operand type
  constexpr bool kScaledQuery = C::kFp8 && !std::is_same_v<T, __half>;
  constexpr std::uint32_t kRowBytes = C::kRow * 2;
  extern __shared__ __align__(16) unsigned char smem[];
  M* q_smem = reinterpret_cast<M*>(smem);
  const std::uint32_t stages = ptx::smem_addr(smem + C::kQBytes);
  // [stage][K, V][row]: the global address of each row of the tile; bit 0 set = no row (past
  // the range, or a block id outside the cache).
  std::uint64_t* rows =
      reinterpret_cast<std::uint64_t*>(smem + C::kQBytes + C::kStages * C::kStageBytes);

  __shared__ int ranked_sequence;
  static_assert(kLongestFirstMaxBatch * 4 <= C::kStages * C::kStageBytes, "ranking keys");
  // Launched while the previous kernel drains (sm_90): any input may be that kernel's output
  // (select_pages' lengths and tables, the query, a scale), so nothing is read before it is done.
  ptx::wait_for_previous_grid();
  const int seq =
      a.longest_first
          ? sequence_by_length(a, blockIdx.z, reinterpret_cast<std::uint32_t*>(smem + C::kQBytes),
                               &ranked_sequence)
          : int(blockIdx.z);
  WorkUnit u;
  if (!mixed_work_unit(a, kMmaHeads, C::kTile, seq, u)) return;  // before any barrier
  const int b = u.b, split = u.split, kv_head = u.kv_head, head0 = u.head0, heads = u.heads;
  const int begin = u.begin, end = u.end;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int num_tiles = (end - begin + C::kTile - 1) / C::kTile;

  // Row addresses: thread t < kTile owns row t of every tile. It reads the block id of its row
  // two tiles ahead (into a register) and writes the row's K and V addresses one tile ahead of
  // the copies that use them, so neither the table read nor the address arithmetic is on the
  // copies' path.
  const std::int32_t* table = a.kv.table_row(b, kv_head);
  const bool row_owner = threadIdx.x < C::kTile;
  const KV* k_head = a.kv.k_head<KV>(kv_head);
  const KV* v_head = a.kv.v_head<KV>(kv_head);
  auto lookup = [&](int tile) -> int {
    const int token = begin + tile * C::kTile + int(threadIdx.x);
    return tile < num_tiles && token < end ? table[a.kv.page_of(token)] : -1;
  };
  auto store_rows = [&](int tile, std::int64_t block) {
    const int token = begin + tile * C::kTile + int(threadIdx.x);
    std::uint64_t k_row = reinterpret_cast<std::uint64_t>(k_head) | 1u;
    std::uint64_t v_row = reinterpret_cast<std::uint64_t>(v_head) | 1u;
    if (a.kv.in_cache(block)) {
      const int page = a.kv.page_of(token);
      k_row = reinterpret_cast<std::uint64_t>(a.kv.k_row(k_head, block, token, page));
      v_row = reinterpret_cast<std::uint64_t>(a.kv.v_row(v_head, block, token, page));
    }
    std::uint64_t* slot = rows + (tile % C::kStages) * 2 * C::kTile;
    slot[threadIdx.x] = k_row;
    slot[C::kTile + threadIdx.x] = v_row;
  };

  // Copies: thread t moves 16-byte chunk t % kChunks of rows t / kChunks + kRowsPerPass * i.
  const std::uint32_t chunk_bytes = (threadIdx.x % C::kChunks) * 16;
  const int row0 = threadIdx.x / C::kChunks;
  auto load_tile = [&](int tile) {
    const int stage = tile % C::kStages;
    const std::uint32_t ks =
        stages + stage * C::kStageBytes + row0 * C::kStageRowBytes + chunk_bytes;
    const std::uint32_t vs = ks + C::kVOffset;
    const std::uint64_t* k_rows = rows + stage * 2 * C::kTile + row0;
    const std::uint64_t* v_rows = k_rows + C::kTile;
#pragma unroll
    for (int pass = 0; pass < C::kPasses; ++pass) {
      const std::uint64_t kr = k_rows[pass * C::kRowsPerPass];
      const std::uint64_t vr = v_rows[pass * C::kRowsPerPass];
      const std::uint32_t dst = pass * C::kRowsPerPass * C::kStageRowBytes;
      ptx::cp_async_16(
          ks + dst, reinterpret_cast<const char*>(kr & ~std::uint64_t(1)) + chunk_bytes, kr & 1u);
      ptx::cp_async_16(
          vs + dst, reinterpret_cast<const char*>(vr & ~std::uint64_t(1)) + chunk_bytes, vr & 1u);
    }
  };

  // The first block ids are read before Q is copied, so the two reads' latencies overlap.
  int first_blocks[C::kStages];
  int next_block = -1;
  if (row_owner) {
#pragma unroll
    for (int t = 0; t < C::kStages; ++t) first_blocks[t] = lookup(t);
    next_block = lookup(C::kStages);
  }
  // Q: [16 heads][D] in shared memory, rows past the group zero.
  int q_shift = 0;  // the query in shared memory is the input times 2^q_shift
  {
    const T* q = static_cast<const T*>(a.query) + u.row * a.q_stride_batch;
    if constexpr (C::kFp8) {
      // Pairs of elements (32-bit words) of each 16: words 0, 2, 4, 6 make the first 8, words
      // 1, 3, 5, 7 the second (the order in which a float8 fragment pairs K's elements).
      // Half-groups (8 words) of the query, two per 16 elements; threads past them load nothing.
      constexpr int kHalves = kMmaHeads * C::kQChunks;
      constexpr int kPerThread = (kHalves + C::kThreads - 1) / C::kThreads;
      static_assert(kHalves % C::kThreads == 0 || kPerThread == 1, "query chunks");
      uint4 words[kPerThread];
#pragma unroll
      for (int k = 0; k < kPerThread; ++k) {
        const int pair = (int(threadIdx.x) + k * C::kThreads) / 2;  // 16-element group
        const int pr = pair / (D / 16), pc = pair % (D / 16);
        uint4 lo = make_uint4(0, 0, 0, 0), hi = make_uint4(0, 0, 0, 0);
        if (pr < heads) {
          const uint4* src =
              reinterpret_cast<const uint4*>(q + (head0 + pr) * a.q_stride_head + pc * 16);
          lo = src[0];
          hi = src[1];
        }
        words[k] = threadIdx.x % 2 == 0 ? make_uint4(lo.x, lo.z, hi.x, hi.z)
                                        : make_uint4(lo.y, lo.w, hi.y, hi.w);
      }
      if constexpr (kScaledQuery) {
        // The CTA's largest |element|: per warp, then over the warps through the stage memory
        // (not in use before the barrier after Q).
        std::uint32_t max_bits = 0;
#pragma unroll
        for (int k = 0; k < kPerThread; ++k) {
          const std::uint32_t w[4] = {words[k].x, words[k].y, words[k].z, words[k].w};
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            max_bits = max(max_bits, max(w[e] & 0x7fffu, (w[e] >> 16) & 0x7fffu));
          }
        }
        max_bits = __reduce_max_sync(0xffffffffu, max_bits);
        std::uint32_t* warp_max = reinterpret_cast<std::uint32_t*>(smem + C::kQBytes);
        if (lane == 0) warp_max[warp] = max_bits;
        __syncthreads();
#pragma unroll
        for (int w = 0; w < C::kWarps; ++w) max_bits = max(max_bits, warp_max[w]);
        q_shift = query_shift(max_bits);
        const float factor = exp2f(float(q_shift));
#pragma unroll
        for (int k = 0; k < kPerThread; ++k) {
          words[k] = make_uint4(bf16x2_to_half2_scaled(words[k].x, factor),
                                bf16x2_to_half2_scaled(words[k].y, factor),
                                bf16x2_to_half2_scaled(words[k].z, factor),
                                bf16x2_to_half2_scaled(words[k].w, factor));
        }
      }
#pragma unroll
      for (int k = 0; k < kPerThread; ++k) {
        const int i = int(threadIdx.x) + k * C::kThreads;
        if (kHalves % C::kThreads != 0 && i >= kHalves) break;
        const int pr = (i / 2) / (D / 16), pc = (i / 2) % (D / 16);
        *reinterpret_cast<uint4*>(q_smem + pr * C::kRow + pc * 16 + (i % 2) * 8) = words[k];
      }
    } else {
      for (int i = threadIdx.x; i < kMmaHeads * C::kQChunks; i += C::kThreads) {
        const int r = i / C::kQChunks, c = i % C::kQChunks;
        uint4 v = make_uint4(0, 0, 0, 0);
        if (r < heads) {
          v = *reinterpret_cast<const uint4*>(q + (head0 + r) * a.q_stride_head + c * 8);
        }
        *reinterpret_cast<uint4*>(q_smem + r * C::kRow + c * 8) = v;
      }
    }
  }
  if (row_owner) {
#pragma unroll
    for (int t = 0; t < C::kStages; ++t) store_rows(t, first_blocks[t]);
  }
  __syncthreads();
  // Every stage is free at the start: fill them all. From then on each iteration refills the
  // stage its predecessor consumed, kStages - 1 tiles ahead of the one it computes.
#pragma unroll
  for (int t = 0; t < C::kStages; ++t) {
    if (t < num_tiles) load_tile(t);
    ptx::cp_async_commit();
  }

  // Fragment addresses (shared, bytes), in the first 64-token step of stage 0. Q (A operand):
  // matrix l / 8 holds rows (l / 8 % 2) * 8 + l % 8, columns (l / 16) * 8 of each 16-wide step.
  // K (B operand of S): tokens warp * 16 + (l / 16) * 8 + l % 8, columns (l / 8 % 2) * 8. V (B
  // operand of O, transposed): tokens warp * 16 + (l / 8 % 2) * 8 + l % 8, columns (l / 16) * 8.
  const std::uint32_t q_frag =
      ptx::smem_addr(q_smem) + ((lane % 8) + ((lane / 8) % 2) * 8) * kRowBytes + (lane / 16) * 16;
  const std::uint32_t k_frag =
      stages + (warp * 16 + (lane / 16) * 8 + lane % 8) * C::kStageRowBytes + ((lane / 8) % 2) * 16;
  const std::uint32_t v_frag = stages + C::kVOffset +
                               (warp * 16 + ((lane / 8) % 2) * 8 + lane % 8) * C::kStageRowBytes +
                               (lane / 16) * 16;
  // Float8 K and V (B operands, read as byte pairs): matrix l / 8 holds tokens
  // warp * 16 + (l / 8 % 2) * 8 + l % 8 and bytes (l / 16) * 16 of each 32-wide step, so thread
  // l receives bytes 4 * (l % 4) ... + 3 of token l / 4 (K), or with .trans bytes 2 * (l / 4) and
  // + 1 of tokens 2 * (l % 4) and + 1 (V).
  const std::uint32_t fp8_frag =
      stages + (warp * 16 + ((lane / 8) % 2) * 8 + lane % 8) * C::kStageRowBytes + (lane / 16) * 16;
  std::uint32_t q_regs[C::kQInRegisters && !Swap ? D / 16 : 1][4];
  if constexpr (C::kQInRegisters && !Swap) {
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) ptx::ldmatrix_x4(q_regs[kk], q_frag + kk * 32);
  }
  // Swap: Q^T as the B operand of each 16-wide step kk (heads 0-7 the N columns; the same
  // permuted head_dim as above): matrix l / 8 holds heads l % 8, columns ((l / 16) * 16 +
  // (l / 8 % 2) * 8) of each 32-wide step, so one ldmatrix gives steps 2 kp and 2 kp + 1.
  std::uint32_t q_cols[Swap ? D / 16 : 1][2];
  if constexpr (Swap) {
    const std::uint32_t qt_frag = ptx::smem_addr(q_smem) + (lane % 8) * kRowBytes +
                                  ((lane / 16) * 16 + ((lane / 8) % 2) * 8) * 2;
#pragma unroll
    for (int kp = 0; kp < D / 32; ++kp) {
      std::uint32_t r[4];
      ptx::ldmatrix_x4(r, qt_frag + kp * 64);
      q_cols[2 * kp][0] = r[0];
      q_cols[2 * kp][1] = r[1];
      q_cols[2 * kp + 1][0] = r[2];
      q_cols[2 * kp + 1][1] = r[3];
    }
  }

  // Per thread: rows g = lane / 4 and g + 8 of the 16 heads; columns 2 * (lane % 4) + {0, 1}
  // of each 8-wide block. Swap: O^T, its rows head_dim and its columns the heads; o[2 dp] holds
  // columns 2 (lane % 4) + {0, 1} (heads) of rows 32 dp + 2 g and 32 dp + 16 + 2 g (head_dim),
  // o[2 dp + 1] those of rows 32 dp + 2 g + 1 and 32 dp + 17 + 2 g; m and l are then those of
  // heads 2 (lane % 4) + {0, 1}.
  constexpr int kOBlocks = Swap ? D / 16 : D / 8;
  float o[kOBlocks][4];
#pragma unroll
  for (int nb = 0; nb < kOBlocks; ++nb) o[nb][0] = o[nb][1] = o[nb][2] = o[nb][3] = 0.0f;
  float m[2] = {-INFINITY, -INFINITY};
  float l[2] = {0.0f, 0.0f};
  const int quad_col = 2 * (lane % 4);
  // K's scale, and the query's power of two undone.
  const float k_scale = C::kFp8 ? ldexpf(a.k_scale.of(kv_head), -q_shift) : 1.0f;

  for (int tile = 0; tile < num_tiles; ++tile) {
    // Copy group k holds tile k: the prologue committed groups 0..kStages-1, iteration t >= 1
    // commits group t + kStages - 1. Tile `tile` has landed once at most kStages - 1 (first
    // iteration) or kStages - 2 (later) younger groups are pending.
    if (tile == 0) {
      ptx::cp_async_wait<C::kStages - 1>();
    } else {
      ptx::cp_async_wait<C::kStages - 2>();
    }
    __syncthreads();
    const int next = tile + C::kStages - 1;
    if (tile > 0) {  // tile kStages - 1 was loaded by the prologue
      if (next < num_tiles) load_tile(next);
      ptx::cp_async_commit();
    }
    if (row_owner && next + 1 < num_tiles) {  // rows of tile next + 1 into this tile's slot
      store_rows(next + 1, next_block);
      next_block = lookup(next + 2);
    }
    const std::uint32_t tile_offset = (tile % C::kStages) * C::kStageBytes;
    // Each warp computes its 16 tokens of the tile through one softmax state. A
    // thread holds rows g and g + 8 of the 16; with at most 8 query heads (groups up to 8) rows
    // g + 8 are all padding, and their scores, softmax and probabilities are skipped.
    auto compute_tile = [&](auto upper_rows) {
      constexpr bool kUpper = decltype(upper_rows)::value;
      constexpr int kRowHalves = kUpper ? 2 : 1;
      // S = Q K^T for this warp's 16 tokens: two 8-token column blocks, each summed in two
      // independent chains (even and odd steps) to halve the MMA dependency depth.
      float s[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};
      float s_odd[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};
      if constexpr (C::kFp8) {
        // One ldmatrix covers two 16-wide steps: kb[0], kb[1] tokens 0-7 and 8-15 of step 2 * kp,
        // kb[2], kb[3] of step 2 * kp + 1; each register's 4 bytes make both B registers.
#pragma unroll
        for (int kp = 0; kp < D / 32; ++kp) {
          std::uint32_t kb[4], qa_smem[2][4];
          ptx::ldmatrix_x4(kb, fp8_frag + tile_offset + kp * 32);
#pragma unroll
          for (int half = 0; half < 2; ++half) {
            const int kk = 2 * kp + half;
            const std::uint32_t(&qa)[4] =
                C::kQInRegisters ? q_regs[C::kQInRegisters ? kk : 0] : qa_smem[half];
            if constexpr (!C::kQInRegisters) ptx::ldmatrix_x4(qa_smem[half], q_frag + kk * 32);
            float(&acc)[2][4] = half == 0 ? s : s_odd;
            const uint2 first = fp8x4_to_pairs<M>(kb[2 * half]);
            const uint2 second = fp8x4_to_pairs<M>(kb[2 * half + 1]);
            ptx::mma_16816<M>(acc[0], qa, first.x, first.y);
            ptx::mma_16816<M>(acc[1], qa, second.x, second.y);
          }
        }
      } else {
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
          std::uint32_t kb[4], qa_smem[4];
          ptx::ldmatrix_x4(kb, k_frag + tile_offset + kk * 32);
          const std::uint32_t(&qa)[4] =
              C::kQInRegisters ? q_regs[C::kQInRegisters ? kk : 0] : qa_smem;
          if constexpr (!C::kQInRegisters) ptx::ldmatrix_x4(qa_smem, q_frag + kk * 32);
          float(&acc)[2][4] = kk % 2 == 0 ? s : s_odd;
          ptx::mma_16816<T>(acc[0], qa, kb[0], kb[1]);
          ptx::mma_16816<T>(acc[1], qa, kb[2], kb[3]);
        }
      }
#pragma unroll
      for (int j = 0; j < 2; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) s[j][e] += s_odd[j][e];
      }
      const int t0 = begin + tile * C::kTile + warp * 16;
      if (begin + (tile + 1) * C::kTile <= end) {  // a full tile (uniform over the CTA)
#pragma unroll
        for (int j = 0; j < 2; ++j) {
#pragma unroll
          for (int e = 0; e < 2 * kRowHalves; ++e) {
            s[j][e] = a.logit(C::kFp8 ? s[j][e] * k_scale : s[j][e]);
          }
        }
      } else {
#pragma unroll
        for (int j = 0; j < 2; ++j) {
#pragma unroll
          for (int e = 0; e < 2 * kRowHalves; ++e) {
            const int token = t0 + j * 8 + quad_col + (e % 2);
            const float qk = C::kFp8 ? s[j][e] * k_scale : s[j][e];
            s[j][e] = token < end ? a.logit(qk) : -INFINITY;
          }
        }
      }
      // Online softmax; a row's 16 scores are spread over the 4 lanes of a quad.
      online_softmax_step<kRowHalves, 4, 1, 2>(
          m, l, [&](int r, int i) -> float& { return s[i / 2][2 * r + i % 2]; },
          [&](int r, float correction) {
#pragma unroll
            for (int nb = 0; nb < D / 8; ++nb) {
              o[nb][2 * r] *= correction;
              o[nb][2 * r + 1] *= correction;
            }
          });
      // O += P V: P's accumulator layout is the A operand layout of the next MMA.
      const std::uint32_t pa[4] = {
          pack2<M>(s[0][0], s[0][1]), kUpper ? pack2<M>(s[0][2], s[0][3]) : 0u,
          pack2<M>(s[1][0], s[1][1]), kUpper ? pack2<M>(s[1][2], s[1][3]) : 0u};
      if constexpr (C::kFp8) {
        // One ldmatrix.trans covers 32 columns: vb[0], vb[1] tokens 0-7 and 8-15 of columns
        // 32 * dp ... + 15, vb[2], vb[3] of the next 16. A register holds columns 2g and 2g + 1
        // (g = lane / 4) of two tokens; regrouped by column, they are the B registers of the even
        // columns' MMA (o[2w]) and of the odd columns' (o[2w + 1]) of 16-column group w.
#pragma unroll
        for (int dp = 0; dp < D / 32; ++dp) {
          std::uint32_t vb[4];
          ptx::ldmatrix_x4_trans(vb, fp8_frag + C::kVOffset + tile_offset + dp * 32);
#pragma unroll
          for (int half = 0; half < 2; ++half) {
            const int w = 2 * dp + half;
            const uint2 first = fp8x4_to_pairs<M>(__byte_perm(vb[2 * half], 0, 0x3120));
            const uint2 second = fp8x4_to_pairs<M>(__byte_perm(vb[2 * half + 1], 0, 0x3120));
            ptx::mma_16816<M>(o[2 * w], pa, first.x, second.x);
            ptx::mma_16816<M>(o[2 * w + 1], pa, first.y, second.y);
          }
        }
      } else {
#pragma unroll
        for (int dp = 0; dp < D / 16; ++dp) {
          std::uint32_t vb[4];
          ptx::ldmatrix_x4_trans(vb, v_frag + tile_offset + dp * 32);
          ptx::mma_16816<T>(o[2 * dp], pa, vb[0], vb[1]);
          ptx::mma_16816<T>(o[2 * dp + 1], pa, vb[2], vb[3]);
        }
      }
    };
    // Swap: S^T = K Q^T over the warp's 16 tokens (M) and at most 8 heads (N), its softmax down
    // the columns, then O^T += V^T P^T with P^T transposed into a B operand in registers.
    auto compute_tile_swapped = [&](auto) {
      // S^T: s[0], s[1] token g, heads 2 (lane % 4) + {0, 1}; s[2], s[3] token g + 8; summed in
      // two chains (even and odd steps). K's float8 fragments are the A operand as they are
      // loaded (the same pairing of head_dim as Q's storage).
      float s[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      float s_odd[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
      for (int kp = 0; kp < D / 32; ++kp) {
        std::uint32_t kb[4];
        ptx::ldmatrix_x4(kb, fp8_frag + tile_offset + kp * 32);
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const uint2 first = fp8x4_to_pairs<M>(kb[2 * half]);       // tokens 0-7
          const uint2 second = fp8x4_to_pairs<M>(kb[2 * half + 1]);  // tokens 8-15
          const std::uint32_t ka[4] = {first.x, second.x, first.y, second.y};
          float(&acc)[4] = half == 0 ? s : s_odd;
          ptx::mma_16816<M>(acc, ka, q_cols[2 * kp + half][0], q_cols[2 * kp + half][1]);
        }
      }
      const int g = lane / 4;
      const int t0 = begin + tile * C::kTile + warp * 16;
      if (begin + (tile + 1) * C::kTile <= end) {  // a full tile (uniform over the CTA)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[e] = a.logit((s[e] + s_odd[e]) * k_scale);
      } else {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int token = t0 + g + (e / 2) * 8;
          s[e] = token < end ? a.logit((s[e] + s_odd[e]) * k_scale) : -INFINITY;
        }
      }
      // Online softmax per head c: a column's 16 scores are spread over the 8 lanes of equal
      // lane % 4, two each.
      online_softmax_step<2, 2, 4, 16>(
          m, l, [&](int c, int i) -> float& { return s[2 * i + c]; },
          [&](int c, float correction) {
#pragma unroll
            for (int nb = 0; nb < kOBlocks; ++nb) {
              o[nb][c] *= correction;
              o[nb][2 + c] *= correction;
            }
          });
      // P^T (tokens x heads) as the B operand: each 8x8 block of the accumulator transposed.
      const std::uint32_t pb0 = ptx::movmatrix_trans(pack2<M>(s[0], s[1]));  // tokens 0-7
      const std::uint32_t pb1 = ptx::movmatrix_trans(pack2<M>(s[2], s[3]));  // tokens 8-15
      // V^T as the A operand: one ldmatrix.trans covers 32 columns of V (as in the unswapped
      // kernel: vb[0], vb[1] tokens 0-7 and 8-15 of columns 32 dp ... + 15, vb[2], vb[3] of the
      // next 16); regrouped by column, its registers are the A operands of two MMAs, one over
      // rows 32 dp + 2 g and 32 dp + 16 + 2 g of V^T and one over the odd rows beside them.
#pragma unroll
      for (int dp = 0; dp < D / 32; ++dp) {
        std::uint32_t vb[4];
        ptx::ldmatrix_x4_trans(vb, fp8_frag + C::kVOffset + tile_offset + dp * 32);
        uint2 v[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) v[i] = fp8x4_to_pairs<M>(__byte_perm(vb[i], 0, 0x3120));
        const std::uint32_t even[4] = {v[0].x, v[2].x, v[1].x, v[3].x};
        const std::uint32_t odd[4] = {v[0].y, v[2].y, v[1].y, v[3].y};
        ptx::mma_16816<M>(o[2 * dp], even, pb0, pb1);
        ptx::mma_16816<M>(o[2 * dp + 1], odd, pb0, pb1);
      }
    };
    if constexpr (Swap) {
      compute_tile_swapped(0);
    } else if (heads > 8) {
      compute_tile(std::true_type{});
    } else {
      compute_tile(std::false_type{});
    }
  }
  ptx::cp_async_wait<0>();
  ptx::allow_dependent_grids();  // the merge kernel (if any) may start launching
  __syncthreads();               // the stage buffers become the reduction buffers

#pragma unroll
  for (int r = 0; r < 2; ++r) {
    if constexpr (Swap) {  // a head's sums are over the lanes of equal lane % 4
      l[r] += __shfl_xor_sync(0xffffffffu, l[r], 4);
      l[r] += __shfl_xor_sync(0xffffffffu, l[r], 8);
      l[r] += __shfl_xor_sync(0xffffffffu, l[r], 16);
    } else {
      l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
      l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
    }
  }
  if constexpr (C::kFp8) {
    const float v_scale = a.v_scale.of(kv_head);
#pragma unroll
    for (int nb = 0; nb < kOBlocks; ++nb) {
#pragma unroll
      for (int e = 0; e < 4; ++e) o[nb][e] *= v_scale;
    }
  }
  float* red_m = reinterpret_cast<float*>(smem + C::kQBytes);
  float* red_l = red_m + C::kWarps * kMmaHeads;
  float* red_o = red_l + C::kWarps * kMmaHeads;
  const int g = lane / 4;
  if constexpr (Swap) {
    // Heads 2 (lane % 4) + c: their states from lanes 0-3 (rows 8-15 of the reduction are not
    // read: at most 8 heads).
    if (lane < 4) {
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        red_m[warp * kMmaHeads + quad_col + c] = m[c];
        red_l[warp * kMmaHeads + quad_col + c] = l[c];
      }
    }
  } else if (lane % 4 == 0) {
    red_m[warp * kMmaHeads + g] = m[0];
    red_m[warp * kMmaHeads + g + 8] = m[1];
    red_l[warp * kMmaHeads + g] = l[0];
    red_l[warp * kMmaHeads + g + 8] = l[1];
  }
  if constexpr (Swap) {
    // O^T's rows 32 dp + 2 g (+ 1) and 32 dp + 16 + 2 g (+ 1) of heads 2 (lane % 4) + c.
#pragma unroll
    for (int dp = 0; dp < D / 32; ++dp) {
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        float* row = red_o + (warp * kMmaHeads + quad_col + c) * C::kRedRow + dp * 32 + 2 * g;
        *reinterpret_cast<float2*>(row) = make_float2(o[2 * dp][c], o[2 * dp + 1][c]);
        *reinterpret_cast<float2*>(row + 16) = make_float2(o[2 * dp][2 + c], o[2 * dp + 1][2 + c]);
      }
    }
  } else if constexpr (C::kFp8) {
    // Group w's even-column block o[2w] holds columns 16w + 4 * (lane % 4) + {0, 2}, its odd one
    // + {1, 3}: interleaved, 4 consecutive columns.
#pragma unroll
    for (int w = 0; w < D / 16; ++w) {
      float* row_g = red_o + (warp * kMmaHeads + g) * C::kRedRow + w * 16 + 2 * quad_col;
      const float(&even)[4] = o[2 * w];
      const float(&odd)[4] = o[2 * w + 1];
      *reinterpret_cast<float4*>(row_g) = make_float4(even[0], odd[0], even[1], odd[1]);
      *reinterpret_cast<float4*>(row_g + 8 * C::kRedRow) =
          make_float4(even[2], odd[2], even[3], odd[3]);
    }
  } else {
#pragma unroll
    for (int nb = 0; nb < D / 8; ++nb) {
      float* row_g = red_o + (warp * kMmaHeads + g) * C::kRedRow + nb * 8 + quad_col;
      *reinterpret_cast<float2*>(row_g) = make_float2(o[nb][0], o[nb][1]);
      *reinterpret_cast<float2*>(row_g + 8 * C::kRedRow) = make_float2(o[nb][2], o[nb][3]);
    }
  }
  __syncthreads();
  if constexpr (Cluster) {
    cluster_merge_and_store<T, C::kWarps>(a, red_m, red_l, red_o, kMmaHeads, D, C::kRedRow, heads,
                                          head0, u.row);
  } else {
    merge_warps_and_store<T, C::kWarps>(a, red_m, red_l, red_o, kMmaHeads, D, C::kRedRow, heads,
                                        head0, u.row, split);
  }
}

}  // namespace tinyserve::kernels::cuda
