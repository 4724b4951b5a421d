#pragma once

// The tensor-core decode kernel: float16/bfloat16, head_dim 64/128/256, 16-byte aligned rows.
//
// One CTA of 4 warps per (sequence, split, KV head, tile of up to 16 query heads of its GQA
// group), so all query heads of a group share every K/V tile; each warp owns 16 tokens of a
// 64-token tile. K and V tiles stream through a cp.async pipeline of kStages shared-memory stages
// (rows past the range are zero-filled, never read); Q.K^T and P.V run on tensor cores (m16n8k16,
// float32 accumulation; the query heads are the M dimension). Online softmax in float32, log2
// domain. The warps merge their states through shared memory at the end.

#include <cmath>
#include <cstdint>

#include "cuda/attention/decode_common.cuh"
#include "cuda/attention/params.cuh"
#include "cuda/dtypes.cuh"
#include "cuda/ptx.cuh"

namespace tinyserve::kernels::cuda {

constexpr int kTile = 64;      // tokens per pipeline stage
constexpr int kMmaHeads = 16;  // query heads per CTA: the M of m16n8k16

// Pipeline stages. Split launches at head_dim 128 use two, so that three CTAs share a
// multiprocessor: with the GPU filled by splits of one or a few sequences, the extra CTAs hide
// more of each one's start, end and arithmetic (measured on an H200: about one point of the read
// ceiling on one 128k-token sequence; unsplit batches gained nothing, and lose with the extra
// partial wave). Everything else uses three (two CTAs per multiprocessor at head_dim 128).
constexpr int mma_stages(int head_dim, bool split) { return head_dim == 128 && split ? 2 : 3; }

template <int D, int Stages>
struct MmaConfig {
  static constexpr int kRow = D + 8;  // shared row stride (elements): 16-byte pad, no conflicts
  static constexpr int kStages = Stages;
  static constexpr int kChunks = D / 8;  // 16-byte chunks per row
  static constexpr int kRowsPerPass = kDecodeThreads / kChunks;
  static constexpr int kPasses = kTile / kRowsPerPass;
  static constexpr bool kQInRegisters = D <= 128;
  static constexpr int kQBytes = kMmaHeads * kRow * 2;
  static constexpr int kStageBytes = 2 * kTile * kRow * 2;
  static constexpr int kRowAddressBytes = kStages * 2 * kTile * 8;  // per stage: K, V row addresses
  static constexpr int kSmemBytes = kQBytes + kStages * kStageBytes + kRowAddressBytes;
  // Reduction rows of float32 outputs: stride D + 8 makes the quads' 8-byte stores conflict-free.
  static constexpr int kRedRow = D + 8;
  static constexpr int kReduceBytes = kDecodeWarps * kMmaHeads * (kRedRow + 2) * 4;
  static_assert(kReduceBytes <= kStages * kStageBytes, "reduction must fit the stage buffers");
  static_assert(kDecodeThreads % kChunks == 0 && kTile % kRowsPerPass == 0, "loader shape");
  static_assert(kTile <= kDecodeThreads, "one thread computes each row's offsets");
};

// The running max of a row is raised only when a score exceeds it by this much (log2 units):
// probabilities then stay below 2^8 (exact enough in float32, representable in float16 and
// bfloat16), and most tiles skip rescaling the accumulators.
constexpr float kRescaleThreshold = 8.0f;

template <class T, int D, int Stages>
__global__ void __launch_bounds__(kDecodeThreads)
    decode_mma_kernel(const __grid_constant__ DecodeArgs a) {
  using C = MmaConfig<D, Stages>;
  constexpr std::uint32_t kRowBytes = C::kRow * 2;
  extern __shared__ __align__(16) unsigned char smem[];
  T* q_smem = reinterpret_cast<T*>(smem);
  const std::uint32_t stages = ptx::smem_addr(smem + C::kQBytes);
  // [stage][K, V][row]: the global address of each row of the tile; bit 0 set = no row (past
  // the range, or a block id outside the cache).
  std::uint64_t* rows =
      reinterpret_cast<std::uint64_t*>(smem + C::kQBytes + C::kStages * C::kStageBytes);

  const WorkUnit u = work_unit(a, kMmaHeads, kTile);
  const int b = u.b, split = u.split, kv_head = u.kv_head, head0 = u.head0, heads = u.heads;
  const int begin = u.begin, end = u.end;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int num_tiles = (end - begin + kTile - 1) / kTile;

  // Row addresses: thread t < kTile owns row t of every tile. It reads the block id of its row
  // two tiles ahead (into a register) and writes the row's K and V addresses one tile ahead of
  // the copies that use them, so neither the table read nor the address arithmetic is on the
  // copies' path.
  const std::int32_t* table = a.kv.table_row(b, kv_head);
  const bool row_owner = threadIdx.x < kTile;
  const T* k_head = a.kv.k_head<T>(kv_head);
  const T* v_head = a.kv.v_head<T>(kv_head);
  auto lookup = [&](int tile) -> int {
    const int token = begin + tile * kTile + int(threadIdx.x);
    return tile < num_tiles && token < end ? table[a.kv.page_of(token)] : -1;
  };
  auto store_rows = [&](int tile, std::int64_t block) {
    const int token = begin + tile * kTile + int(threadIdx.x);
    std::uint64_t k_row = reinterpret_cast<std::uint64_t>(k_head) | 1u;
    std::uint64_t v_row = reinterpret_cast<std::uint64_t>(v_head) | 1u;
    if (a.kv.in_cache(block)) {
      const int page = a.kv.page_of(token);
      k_row = reinterpret_cast<std::uint64_t>(a.kv.k_row(k_head, block, token, page));
      v_row = reinterpret_cast<std::uint64_t>(a.kv.v_row(v_head, block, token, page));
    }
    std::uint64_t* slot = rows + (tile % C::kStages) * 2 * kTile;
    slot[threadIdx.x] = k_row;
    slot[kTile + threadIdx.x] = v_row;
  };

  // Copies: thread t moves 16-byte chunk t % kChunks of rows t / kChunks + kRowsPerPass * i.
  const std::uint32_t chunk_bytes = (threadIdx.x % C::kChunks) * 16;
  const int row0 = threadIdx.x / C::kChunks;
  auto load_tile = [&](int tile) {
    const int stage = tile % C::kStages;
    const std::uint32_t ks = stages + stage * C::kStageBytes + row0 * kRowBytes + chunk_bytes;
    const std::uint32_t vs = ks + kTile * kRowBytes;
    const std::uint64_t* k_rows = rows + stage * 2 * kTile + row0;
    const std::uint64_t* v_rows = k_rows + kTile;
#pragma unroll
    for (int pass = 0; pass < C::kPasses; ++pass) {
      const std::uint64_t kr = k_rows[pass * C::kRowsPerPass];
      const std::uint64_t vr = v_rows[pass * C::kRowsPerPass];
      const std::uint32_t dst = pass * C::kRowsPerPass * kRowBytes;
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
  {
    const T* q = static_cast<const T*>(a.query) + b * a.q_stride_batch;
    for (int i = threadIdx.x; i < kMmaHeads * C::kChunks; i += kDecodeThreads) {
      const int r = i / C::kChunks, c = i % C::kChunks;
      uint4 v = make_uint4(0, 0, 0, 0);
      if (r < heads) v = *reinterpret_cast<const uint4*>(q + (head0 + r) * a.q_stride_head + c * 8);
      *reinterpret_cast<uint4*>(q_smem + r * C::kRow + c * 8) = v;
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

  // Fragment addresses (shared, bytes). Q (A operand): matrix l / 8 holds rows
  // (l / 8 % 2) * 8 + l % 8, columns (l / 16) * 8 of each 16-wide step. K (B operand of S):
  // tokens warp * 16 + (l / 16) * 8 + l % 8, columns (l / 8 % 2) * 8. V (B operand of O,
  // transposed): tokens warp * 16 + (l / 8 % 2) * 8 + l % 8, columns (l / 16) * 8.
  const std::uint32_t q_frag =
      ptx::smem_addr(q_smem) + ((lane % 8) + ((lane / 8) % 2) * 8) * kRowBytes + (lane / 16) * 16;
  const std::uint32_t k_frag =
      stages + (warp * 16 + (lane / 16) * 8 + lane % 8) * kRowBytes + ((lane / 8) % 2) * 16;
  const std::uint32_t v_frag = stages + kTile * kRowBytes +
                               (warp * 16 + ((lane / 8) % 2) * 8 + lane % 8) * kRowBytes +
                               (lane / 16) * 16;
  std::uint32_t q_regs[C::kQInRegisters ? D / 16 : 1][4];
  if constexpr (C::kQInRegisters) {
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) ptx::ldmatrix_x4(q_regs[kk], q_frag + kk * 32);
  }

  // Per thread: rows g = lane / 4 and g + 8 of the 16 heads; columns 2 * (lane % 4) + {0, 1}
  // of each 8-wide block.
  float o[D / 8][4];
#pragma unroll
  for (int nb = 0; nb < D / 8; ++nb) o[nb][0] = o[nb][1] = o[nb][2] = o[nb][3] = 0.0f;
  float m[2] = {-INFINITY, -INFINITY};
  float l[2] = {0.0f, 0.0f};
  const int quad_col = 2 * (lane % 4);

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
    const std::uint32_t stage_offset = (tile % C::kStages) * C::kStageBytes;

    // S = Q K^T for this warp's 16 tokens: two 8-token column blocks, each summed in two
    // independent chains (even and odd steps) to halve the MMA dependency depth.
    float s[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};
    float s_odd[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      std::uint32_t kb[4], qa_smem[4];
      ptx::ldmatrix_x4(kb, k_frag + stage_offset + kk * 32);
      const std::uint32_t(&qa)[4] = C::kQInRegisters ? q_regs[C::kQInRegisters ? kk : 0] : qa_smem;
      if constexpr (!C::kQInRegisters) ptx::ldmatrix_x4(qa_smem, q_frag + kk * 32);
      float(&acc)[2][4] = kk % 2 == 0 ? s : s_odd;
      ptx::mma_16816<T>(acc[0], qa, kb[0], kb[1]);
      ptx::mma_16816<T>(acc[1], qa, kb[2], kb[3]);
    }
#pragma unroll
    for (int j = 0; j < 2; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) s[j][e] += s_odd[j][e];
    }
    const int t0 = begin + tile * kTile + warp * 16;
    if (begin + (tile + 1) * kTile <= end) {  // a full tile (uniform over the CTA)
#pragma unroll
      for (int j = 0; j < 2; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) s[j][e] = a.logit(s[j][e]);
      }
    } else {
#pragma unroll
      for (int j = 0; j < 2; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int token = t0 + j * 8 + quad_col + (e % 2);
          s[j][e] = token < end ? a.logit(s[j][e]) : -INFINITY;
        }
      }
    }
    // Online softmax; a row's 16 scores are spread over the 4 lanes of a quad.
    float mx[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      mx[r] = fmaxf(fmaxf(s[0][2 * r], s[0][2 * r + 1]), fmaxf(s[1][2 * r], s[1][2 * r + 1]));
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
    }
    const bool grow = mx[0] > m[0] + kRescaleThreshold || mx[1] > m[1] + kRescaleThreshold;
    if (__any_sync(0xffffffffu, grow)) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        if (mx[r] > m[r]) {
          const float correction = ptx::exp2_approx(m[r] - mx[r]);  // 0 when m was -inf
          m[r] = mx[r];
          l[r] *= correction;
#pragma unroll
          for (int nb = 0; nb < D / 8; ++nb) {
            o[nb][2 * r] *= correction;
            o[nb][2 * r + 1] *= correction;
          }
        }
      }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float base = m[r] == -INFINITY ? 0.0f : m[r];  // nothing seen yet: p = 0
#pragma unroll
      for (int j = 0; j < 2; ++j) {
#pragma unroll
        for (int e = 2 * r; e < 2 * r + 2; ++e) {
          s[j][e] = ptx::exp2_approx(s[j][e] - base);
          l[r] += s[j][e];
        }
      }
    }
    // O += P V: P's accumulator layout is the A operand layout of the next MMA.
    const std::uint32_t pa[4] = {pack2<T>(s[0][0], s[0][1]), pack2<T>(s[0][2], s[0][3]),
                                 pack2<T>(s[1][0], s[1][1]), pack2<T>(s[1][2], s[1][3])};
#pragma unroll
    for (int dp = 0; dp < D / 16; ++dp) {
      std::uint32_t vb[4];
      ptx::ldmatrix_x4_trans(vb, v_frag + stage_offset + dp * 32);
      ptx::mma_16816<T>(o[2 * dp], pa, vb[0], vb[1]);
      ptx::mma_16816<T>(o[2 * dp + 1], pa, vb[2], vb[3]);
    }
  }
  ptx::cp_async_wait<0>();
  ptx::allow_dependent_grids();  // the merge kernel (if any) may start launching
  __syncthreads();               // the stage buffers become the reduction buffers

#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
  }
  float* red_m = reinterpret_cast<float*>(smem + C::kQBytes);
  float* red_l = red_m + kDecodeWarps * kMmaHeads;
  float* red_o = red_l + kDecodeWarps * kMmaHeads;
  const int g = lane / 4;
  if (lane % 4 == 0) {
    red_m[warp * kMmaHeads + g] = m[0];
    red_m[warp * kMmaHeads + g + 8] = m[1];
    red_l[warp * kMmaHeads + g] = l[0];
    red_l[warp * kMmaHeads + g + 8] = l[1];
  }
#pragma unroll
  for (int nb = 0; nb < D / 8; ++nb) {
    float* row_g = red_o + (warp * kMmaHeads + g) * C::kRedRow + nb * 8 + quad_col;
    *reinterpret_cast<float2*>(row_g) = make_float2(o[nb][0], o[nb][1]);
    *reinterpret_cast<float2*>(row_g + 8 * C::kRedRow) = make_float2(o[nb][2], o[nb][3]);
  }
  __syncthreads();
  merge_warps_and_store<T>(a, red_m, red_l, red_o, kMmaHeads, D, C::kRedRow, heads, head0, b,
                           split);
}

}  // namespace tinyserve::kernels::cuda
