#pragma once

// The tensor-core prefill kernel: float16/bfloat16, head_dim 64/128/256, 16-byte aligned rows.
//
// One CTA of 4 warps per (tile of query positions of one sequence, KV head x tile of its query
// heads, split of the keys); see prefill_common.cuh for the schedule. The CTA's query rows (128,
// or 64 at head_dim 256) are positions x query heads of one GQA group (row r = position
// r / heads_per_cta, head r % heads_per_cta), so the heads of a group share every K/V tile; each
// warp owns 32 (16) rows, M tiles of m16n8k16, and runs its own online softmax over all the
// CTA's keys, so no cross-warp merge is needed. K/V tiles are gathered row by row from their
// pages through the block table with cp.async into padded shared rows (the 16-byte pad puts the
// 8 rows of every ldmatrix in distinct banks), double-buffered: the copy of tile i + 1 runs under
// the MMAs of tile i. Masks are applied only to tiles that cross a row's causal or window boundary;
// tiles outside every row's range are never loaded (the key range is the union of the rows'
// ranges).

#include <cmath>
#include <cstdint>

#include "cuda/attention/prefill_common.cuh"
#include "cuda/dtypes.cuh"
#include "cuda/ptx.cuh"

namespace tinyserve::kernels::cuda {

constexpr int kPrefillThreads = 128;
constexpr int kPrefillWarps = kPrefillThreads / 32;

template <int D>
struct PrefillMmaConfig {
  // m16 row tiles per warp: two up to head_dim 128, so that every K/V fragment read from shared
  // memory feeds two MMAs (with one, the ldmatrix traffic, not the tensor cores, bounds a
  // warp); one at 256, where two would not fit the registers.
  static constexpr int kWarpTiles = D <= 128 ? 2 : 1;
  static constexpr int kRows = kPrefillWarps * 16 * kWarpTiles;  // query rows per CTA
  // Keys per tile: 64 at head_dim 64; 32 above, where the scores of 64 keys would not fit the
  // registers beside two row tiles' accumulators (128) and two CTAs would not share a
  // multiprocessor's shared memory (256).
  static constexpr int kKeys = D == 64 ? 64 : 32;
  static constexpr int kRow = D + 8;     // shared row stride (elements)
  static constexpr int kChunks = D / 8;  // 16-byte chunks per row
  static constexpr int kRowsPerPass = kPrefillThreads / kChunks;
  static constexpr int kQPasses = kRows / kRowsPerPass;
  static constexpr int kKvPasses = kKeys / kRowsPerPass;
  // Q fragments stay in registers where they fit beside the accumulators.
  static constexpr bool kQInRegisters = D * kWarpTiles <= 128;
  static constexpr int kQBytes = kRows * kRow * 2;
  static constexpr int kTileBytes = kKeys * kRow * 2;  // K or V of one tile
  static constexpr int kStageBytes = 2 * kTileBytes;
  static constexpr int kSmemBytes = kQBytes + 2 * kStageBytes;
  static_assert(kPrefillThreads % kChunks == 0 && kKeys % kRowsPerPass == 0 &&
                    kRows % kRowsPerPass == 0,
                "loader shape");
};

// As in the decode kernel: a row's running max is raised only when a score exceeds it by this
// much (log2 units), so probabilities stay below 2^8 and most tiles skip the rescale.
constexpr float kPrefillRescaleThreshold = 8.0f;

template <class T, int D>
__global__ void __launch_bounds__(kPrefillThreads)
    prefill_mma_kernel(const __grid_constant__ PrefillArgs p) {
  using C = PrefillMmaConfig<D>;
  constexpr int kKeys = C::kKeys;
  constexpr int kM = C::kWarpTiles;
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

  // K/V tiles: key rows past the range, or in a block outside the cache, are zero-filled.
  const std::int32_t* table = a.kv.table_row(u.b, u.kv_head);
  const T* k_head = a.kv.k_head<T>(u.kv_head);
  const T* v_head = a.kv.v_head<T>(u.kv_head);
  const int key_end = max(0, u.pos0 + u.rows);  // <= the length: pos0 + rows <= len
  auto load_tile = [&](int tile, int stage) {
    const int k0 = u.key_begin + tile * kKeys;
    const std::uint32_t ks =
        stage_base + stage * C::kStageBytes + row_in_pass * kRowBytes + chunk_bytes;
    const std::uint32_t vs = ks + C::kTileBytes;
#pragma unroll
    for (int i = 0; i < C::kKvPasses; ++i) {
      const int token = k0 + row_in_pass + i * C::kRowsPerPass;
      const T* kr = k_head;
      const T* vr = v_head;
      bool zero = true;
      if (token < key_end) {
        const int page = a.kv.page_of(token);
        const std::int64_t block = table[page];
        if (a.kv.in_cache(block)) {
          kr = a.kv.k_row(k_head, block, token, page);
          vr = a.kv.v_row(v_head, block, token, page);
          zero = false;
        }
      }
      const std::uint32_t dst = i * C::kRowsPerPass * kRowBytes;
      ptx::cp_async_16_shared_data(ks + dst, reinterpret_cast<const char*>(kr) + chunk_bytes, zero);
      ptx::cp_async_16_shared_data(vs + dst, reinterpret_cast<const char*>(vr) + chunk_bytes, zero);
    }
  };

  // The warp owns rows warp * 16 * kM + mt * 16 + [0, 16) for mt < kM; this thread rows g =
  // lane / 4 and g + 8 of each, at positions qpos (-1: not a row of the tile, sees no key).
  const int quad_col = 2 * (lane % 4);
  const int warp_row0 = warp * 16 * kM;
  int qpos[kM][2];
#pragma unroll
  for (int mt = 0; mt < kM; ++mt) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = warp_row0 + mt * 16 + lane / 4 + 8 * r;
      const int pos = row / hc, h = row - pos * hc;
      qpos[mt][r] = pos < u.rows && h < u.heads ? u.pos0 + pos : -1;
    }
  }
  // Rows are filled from 0 on: a warp past the last row only helps copy, and a row tile past it
  // (a decode row's tile fills 1 position x the group) skips its MMAs.
  const bool warp_active = warp_row0 < u.rows * hc;
  auto tile_active = [&](int mt) { return mt == 0 || warp_row0 + mt * 16 < u.rows * hc; };
  const int pos_last = u.pos0 + u.rows - 1;
  // A tile needs masks where a key follows the first row's position (causal) or precedes the
  // last row's window.
  auto needs_mask = [&](int k0) {
    return k0 + kKeys - 1 > u.pos0 || (a.window_left >= 0 && k0 < pos_last - a.window_left);
  };

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
#pragma unroll
  for (int mt = 0; mt < kM; ++mt) {
#pragma unroll
    for (int nb = 0; nb < D / 8; ++nb) {
      o[mt][nb][0] = o[mt][nb][1] = o[mt][nb][2] = o[mt][nb][3] = 0.0f;
    }
    m[mt][0] = m[mt][1] = -INFINITY;
    l[mt][0] = l[mt][1] = 0.0f;
  }
  std::uint32_t q_regs[C::kQInRegisters ? kM : 1][C::kQInRegisters ? D / 16 : 1][4];

  const int num_tiles = u.tile_end - u.tile_begin;
  if (num_tiles > 0) load_tile(u.tile_begin, 0);
  ptx::cp_async_commit();  // group 0: Q and the first tile; group i: tile i
  for (int it = 0; it < num_tiles; ++it) {
    if (it + 1 < num_tiles) load_tile(u.tile_begin + it + 1, (it + 1) % 2);
    ptx::cp_async_commit();
    ptx::cp_async_wait<1>();  // everything but the tile just issued has landed
    __syncthreads();
    if (warp_active) {
      if constexpr (C::kQInRegisters) {
        if (it == 0) {
#pragma unroll
          for (int mt = 0; mt < kM; ++mt) {
#pragma unroll
            for (int kk = 0; kk < D / 16; ++kk) {
              ptx::ldmatrix_x4(q_regs[mt][kk], q_frag + mt * 16 * kRowBytes + kk * 32);
            }
          }
        }
      }
      const std::uint32_t stage_offset = (it % 2) * C::kStageBytes;
      // S = Q K^T: 16 * kM rows x kKeys keys per warp; each K fragment feeds kM MMAs.
      float s[kM][kKeys / 8][4];
#pragma unroll
      for (int mt = 0; mt < kM; ++mt) {
#pragma unroll
        for (int j = 0; j < kKeys / 8; ++j)
          s[mt][j][0] = s[mt][j][1] = s[mt][j][2] = s[mt][j][3] = 0.0f;
      }
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        std::uint32_t qa[kM][4];
#pragma unroll
        for (int mt = 0; mt < kM; ++mt) {
          if constexpr (C::kQInRegisters) {
#pragma unroll
            for (int i = 0; i < 4; ++i)
              qa[mt][i] = q_regs[C::kQInRegisters ? mt : 0][C::kQInRegisters ? kk : 0][i];
          } else {
            ptx::ldmatrix_x4(qa[mt], q_frag + mt * 16 * kRowBytes + kk * 32);
          }
        }
#pragma unroll
        for (int kb = 0; kb < kKeys / 16; ++kb) {
          std::uint32_t kf[4];
          ptx::ldmatrix_x4(kf, k_frag + stage_offset + kb * 16 * kRowBytes + kk * 32);
#pragma unroll
          for (int mt = 0; mt < kM; ++mt) {
            if (!tile_active(mt)) continue;
            ptx::mma_16816<T>(s[mt][2 * kb], qa[mt], kf[0], kf[1]);
            ptx::mma_16816<T>(s[mt][2 * kb + 1], qa[mt], kf[2], kf[3]);
          }
        }
      }
      // Logits; element (j, e) of row tile mt is row qpos[mt][e / 2], key
      // k0 + j * 8 + quad_col + e % 2.
      const int k0 = u.key_begin + (u.tile_begin + it) * kKeys;
      if (needs_mask(k0)) {
#pragma unroll
        for (int mt = 0; mt < kM; ++mt) {
#pragma unroll
          for (int j = 0; j < kKeys / 8; ++j) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const int key = k0 + j * 8 + quad_col + (e % 2);
              const int pos = qpos[mt][e / 2];
              const bool seen = key <= pos && (a.window_left < 0 || key >= pos - a.window_left);
              s[mt][j][e] = seen ? a.logit(s[mt][j][e]) : -INFINITY;
            }
          }
        }
      } else {
#pragma unroll
        for (int mt = 0; mt < kM; ++mt) {
#pragma unroll
          for (int j = 0; j < kKeys / 8; ++j) {
#pragma unroll
            for (int e = 0; e < 4; ++e) s[mt][j][e] = a.logit(s[mt][j][e]);
          }
        }
      }
      // Online softmax; a row's scores are spread over the 4 lanes of a quad.
#pragma unroll
      for (int mt = 0; mt < kM; ++mt) {
        float mx[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          mx[r] = -INFINITY;
#pragma unroll
          for (int j = 0; j < kKeys / 8; ++j) {
            mx[r] = fmaxf(mx[r], fmaxf(s[mt][j][2 * r], s[mt][j][2 * r + 1]));
          }
          mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
          mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
        }
        const bool grow = mx[0] > m[mt][0] + kPrefillRescaleThreshold ||
                          mx[1] > m[mt][1] + kPrefillRescaleThreshold;
        if (__any_sync(0xffffffffu, grow)) {
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            if (mx[r] > m[mt][r]) {
              const float correction = ptx::exp2_approx(m[mt][r] - mx[r]);  // 0 when m was -inf
              m[mt][r] = mx[r];
              l[mt][r] *= correction;
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
          const float base = m[mt][r] == -INFINITY ? 0.0f : m[mt][r];  // nothing seen yet: p = 0
#pragma unroll
          for (int j = 0; j < kKeys / 8; ++j) {
#pragma unroll
            for (int e = 2 * r; e < 2 * r + 2; ++e) {
              s[mt][j][e] = ptx::exp2_approx(s[mt][j][e] - base);
              l[mt][r] += s[mt][j][e];
            }
          }
        }
      }
      // O += P V, 16 keys at a time: P's accumulator layout is the A operand layout; each V
      // fragment feeds kM MMAs.
#pragma unroll
      for (int kc = 0; kc < kKeys / 16; ++kc) {
        std::uint32_t pa[kM][4];
#pragma unroll
        for (int mt = 0; mt < kM; ++mt) {
          pa[mt][0] = pack2<T>(s[mt][2 * kc][0], s[mt][2 * kc][1]);
          pa[mt][1] = pack2<T>(s[mt][2 * kc][2], s[mt][2 * kc][3]);
          pa[mt][2] = pack2<T>(s[mt][2 * kc + 1][0], s[mt][2 * kc + 1][1]);
          pa[mt][3] = pack2<T>(s[mt][2 * kc + 1][2], s[mt][2 * kc + 1][3]);
        }
#pragma unroll
        for (int dp = 0; dp < D / 16; ++dp) {
          std::uint32_t vf[4];
          ptx::ldmatrix_x4_trans(vf, v_frag + stage_offset + kc * 16 * kRowBytes + dp * 32);
#pragma unroll
          for (int mt = 0; mt < kM; ++mt) {
            if (!tile_active(mt)) continue;
            ptx::mma_16816<T>(o[mt][2 * dp], pa[mt], vf[0], vf[1]);
            ptx::mma_16816<T>(o[mt][2 * dp + 1], pa[mt], vf[2], vf[3]);
          }
        }
      }
    }
    __syncthreads();  // the stage is free for the copy two iterations on
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
      sum += __shfl_xor_sync(0xffffffffu, sum, 1);
      sum += __shfl_xor_sync(0xffffffffu, sum, 2);
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
