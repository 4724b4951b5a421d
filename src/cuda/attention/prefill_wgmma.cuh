#pragma once

// The Hopper prefill kernel (sm_90a warpgroup MMA): float16/bfloat16, head_dim 64/128/256,
// 16-byte aligned rows, caches of the query's type.
//
// The schedule and the work of a CTA are those of the other prefill kernels (prefill_common.cuh):
// 128 query rows (positions x query heads of one GQA group), two warpgroups of 64 rows each.
// Every thread gathers K/V rows from their pages with cp.async into a 128-byte swizzled layout
// (wgmma.cuh), kStages - 2 tiles ahead, each row's address computed once into shared memory.
// Per key tile a warpgroup issues S = Q K^T as asynchronous wgmmas (Q and K in shared memory)
// together with the previous tile's O += P V (P from registers, V read N-major from its stage),
// issues copies while the tensor cores work, and runs the online softmax of S while they do
// P V: the accumulator layout is mma.sync's, so P becomes the A operand in place.

#include <cmath>
#include <cstdint>

#include "cuda/attention/prefill_common.cuh"
#include "cuda/attention/prefill_mma.cuh"
#include "cuda/dtypes.cuh"
#include "cuda/ptx.cuh"
#include "cuda/wgmma.cuh"

namespace tinyserve::kernels::cuda {

template <int D>
struct PrefillWgmmaShape {
  static constexpr int kHeadDim = D;
  static constexpr int kThreads = 256;  // two warpgroups
  static constexpr int kRows = 128;     // query rows per CTA, 64 per warpgroup
  // Keys per tile: the score accumulator is kKeys / 2 registers a thread.
  static constexpr int kKeys = D == 64 ? 128 : D == 128 ? 64 : 32;
  static constexpr int kChunks = D / 8;  // 16-byte chunks of a row
  static constexpr int kRowsPerPass = kThreads / kChunks;
  static constexpr int kQPasses = kRows / kRowsPerPass;
  static constexpr int kKvPasses = kKeys / kRowsPerPass;
  static constexpr int kQBytes = kRows * D * 2;
  static constexpr int kTileBytes = kKeys * D * 2;  // K or V of one tile
  static constexpr int kStageBytes = 2 * kTileBytes;
  // The row-address ring: 2 slots of kKeys K then kKeys V row addresses.
  static constexpr int kAddrBytes = 2 * 2 * kKeys * 8;
  // As many K/V stages as fit beside Q and the ring (227 KB a CTA on Hopper, with 1024 bytes to
  // align the operands to the swizzle's period): 6, 6 and 5 at head_dim 64, 128, 256 (at 128
  // the CTA takes all of the 227 KB). Copies
  // run kStages - 2 tiles ahead (a tile's V is read until the next tile's scores are done).
  static constexpr int kFit = (232448 - 1024 - kAddrBytes - kQBytes) / kStageBytes;
  static constexpr int kStages = kFit < 6 ? kFit : 6;
  static constexpr int kAhead = kStages - 2;
  static constexpr int kSmemBytes = kQBytes + kStages * kStageBytes + kAddrBytes + 1024;
  // A thread's rows of one pass share their swizzle (row % 8), so its copy offsets are fixed.
  static_assert(kRowsPerPass % 8 == 0 && kKeys % kRowsPerPass == 0 && kRows % kRowsPerPass == 0,
                "loader shape");
  static_assert(kStages >= 3, "stages");
};

template <class T, int D>
__global__ void __launch_bounds__(256, 1)
    prefill_wgmma_kernel(const __grid_constant__ PrefillArgs p) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using C = PrefillWgmmaShape<D>;
  constexpr int kKeys = C::kKeys;
  extern __shared__ __align__(16) unsigned char smem[];
  PrefillUnit u;
  if (!prefill_unit(p, kKeys, u)) return;
  const DecodeArgs& a = p.a;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int wg = warp / 4;
  const int hc = p.heads_per_cta;
  const std::uint32_t q_base = (ptx::smem_addr(smem) + 1023u) & ~1023u;
  const std::uint32_t stage_base = q_base + C::kQBytes;

  // Copies: thread t moves 16-byte chunk t % kChunks of rows t / kChunks + kRowsPerPass * i; the
  // chunk lands in 128-byte column block chunk / 8 of an operand of `rows` rows, swizzled.
  const int chunk = threadIdx.x % C::kChunks;
  const int row_in_pass = threadIdx.x / C::kChunks;
  auto copy_offset = [&](int rows) {
    return std::uint32_t((chunk / 8) * rows * 128 + row_in_pass * 128 +
                         (((chunk % 8) ^ (row_in_pass % 8)) * 16));
  };
  constexpr std::uint32_t kPassBytes = C::kRowsPerPass * 128;

  // Q: rows past the tile's positions or the group's heads are zero-filled.
  {
    const T* q = static_cast<const T*>(a.query);
    const std::uint32_t dst = q_base + copy_offset(C::kRows);
#pragma unroll
    for (int i = 0; i < C::kQPasses; ++i) {
      const int r = row_in_pass + i * C::kRowsPerPass;
      const int pos = r / hc, h = r - pos * hc;
      const bool valid = pos < u.rows && h < u.heads;
      const T* src = valid ? q + std::int64_t(u.row0 + pos) * a.q_stride_batch +
                                 std::int64_t(u.head0 + h) * a.q_stride_head
                           : q;
      ptx::cp_async_16_shared_data(dst + i * kPassBytes,
                                   reinterpret_cast<const char*>(src) + chunk * 16, !valid);
    }
  }

  // K/V tiles: key rows past the range, or in a block outside the cache, are copied from a row
  // of zeros (a zero V row keeps P V finite where P is 0). The global address of every K and V
  // row of a tile is computed once, by thread j < 2 kKeys for K (j < kKeys) or V row j % kKeys,
  // into a shared ring of two slots, a tile before its copy; the block id it needs is loaded
  // earlier in the same iteration. A copy is then a shared load and an add.
  const std::int32_t* table = a.kv.table_row(u.b, u.kv_head);
  const T* k_head = a.kv.k_head<T>(u.kv_head);
  const T* v_head = a.kv.v_head<T>(u.kv_head);
  const int key_end = max(0, u.pos0 + u.rows);  // <= the length: pos0 + rows <= len
  const int num_tiles = u.tile_end - u.tile_begin;
  auto tile_key = [&](int tile) { return u.key_begin + (u.tile_begin + tile) * kKeys; };
  std::uint64_t* const ring = reinterpret_cast<std::uint64_t*>(
      smem + (q_base - ptx::smem_addr(smem)) + C::kQBytes + C::kStages * C::kStageBytes);
  const bool address_thread = threadIdx.x < 2 * kKeys;
  std::int32_t row_block = -1;  // the block of this thread's row of the next tile addressed
  auto load_row_block = [&](int tile) {
    if (!address_thread || tile >= num_tiles) return;
    const int token = tile_key(tile) + int(threadIdx.x) % kKeys;
    // Loaded unconditionally (a key of the range: key_end >= 1 where a tile exists).
    const std::int32_t block = table[a.kv.page_of(min(token, key_end - 1))];
    row_block = token < key_end ? block : -1;
  };
  auto store_row_address = [&](int tile) {
    if (!address_thread || tile >= num_tiles) return;
    const int token = tile_key(tile) + int(threadIdx.x) % kKeys;
    const std::int64_t block = row_block;
    std::uint64_t address = reinterpret_cast<std::uint64_t>(prefill_zero_row<D>);
    if (a.kv.in_cache(block)) {
      const int page = a.kv.page_of(token);
      address = int(threadIdx.x) < kKeys
                    ? reinterpret_cast<std::uint64_t>(a.kv.k_row(k_head, block, token, page))
                    : reinterpret_cast<std::uint64_t>(a.kv.v_row(v_head, block, token, page));
    }
    ring[(tile % 2) * 2 * kKeys + threadIdx.x] = address;
  };
  auto copy_tile = [&](int tile) {
    const std::uint64_t* slot = ring + (tile % 2) * 2 * kKeys;
    const std::uint32_t ks = stage_base + (tile % C::kStages) * C::kStageBytes + copy_offset(kKeys);
    const std::uint32_t vs = ks + C::kTileBytes;
    std::uint64_t k_address[C::kKvPasses], v_address[C::kKvPasses];
#pragma unroll
    for (int i = 0; i < C::kKvPasses; ++i) {
      k_address[i] = slot[row_in_pass + i * C::kRowsPerPass];
      v_address[i] = slot[kKeys + row_in_pass + i * C::kRowsPerPass];
    }
#pragma unroll
    for (int i = 0; i < C::kKvPasses; ++i) {
      ptx::cp_async_16_shared_data(ks + i * kPassBytes,
                                   reinterpret_cast<const char*>(k_address[i]) + chunk * 16, false);
      ptx::cp_async_16_shared_data(vs + i * kPassBytes,
                                   reinterpret_cast<const char*>(v_address[i]) + chunk * 16, false);
    }
  };

  // This thread's rows of the accumulators: row_base and row_base + 8 of the CTA's 128, at key
  // columns 8 j + quad_col + 0..1 of every 8 (wgmma.cuh). Rows fill from 0, so a warpgroup past
  // the last row holds none.
  const int quad_col = 2 * (lane % 4);
  const int row_base = wg * 64 + (warp % 4) * 16 + lane / 4;
  const bool wg_active = wg * 64 < u.rows * hc;
  auto row_position = [&](int r) {
    const int row = row_base + 8 * r;
    const int pos = row / hc, h = row - pos * hc;
    return pos < u.rows && h < u.heads ? u.pos0 + pos : -1;  // -1: sees no key
  };
  const int pos_last = u.pos0 + u.rows - 1;
  // A tile needs masks where a key follows the first row's position (causal) or precedes the
  // last row's window.
  auto needs_mask = [&](int k0) {
    return k0 + kKeys - 1 > u.pos0 || (a.window_left >= 0 && k0 < pos_last - a.window_left);
  };
  // Scores become logits (log2 units) as s * score_scale, the scale folded into the exponent
  // where that keeps the order (no soft-cap, positive scale).
  const bool scale_in_exp = !a.soft_cap && a.pre > 0.0f;
  const float score_scale = scale_in_exp ? a.pre : 1.0f;

  float o[D / 2];
  float s[kKeys / 2];
#pragma unroll
  for (int i = 0; i < D / 2; ++i) o[i] = 0.0f;
#pragma unroll
  for (int i = 0; i < kKeys / 2; ++i) s[i] = 0.0f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};

  // Copy groups: Q with tile 0, then one per tile (committed even when empty), kAhead tiles in
  // flight. Each prologue tile's addresses are stored, then read after a barrier; the slot a
  // store overwrites was read before the previous barrier.
#pragma unroll
  for (int t = 0; t < C::kAhead; ++t) {
    load_row_block(t);
    store_row_address(t);
    __syncthreads();
    if (t < num_tiles) copy_tile(t);
    ptx::cp_async_commit();
  }
  load_row_block(C::kAhead);
  store_row_address(C::kAhead);  // read after the loop's first barrier

  // Operand descriptors: Q's rows of this warpgroup; a k-step of 16 moves 32 bytes within a
  // 128-byte column block, and every 4 steps to the next block. V is read N-major: its 128-byte
  // column blocks kKeys rows apart, 16 rows per k-step.
  const std::uint64_t q_desc = wgmma::descriptor(q_base + wg * 64 * 128, 16, 1024);
  auto stage_smem = [&](int tile) { return stage_base + (tile % C::kStages) * C::kStageBytes; };
  auto issue_scores = [&](int tile) {
    const std::uint64_t k_desc = wgmma::descriptor(stage_smem(tile), 16, 1024);
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      const std::uint32_t q_step = ((kk / 4) * C::kRows * 128 + (kk % 4) * 32) >> 4;
      const std::uint32_t k_step = ((kk / 4) * kKeys * 128 + (kk % 4) * 32) >> 4;
      wgmma::wgmma_ss<kKeys, T>(s, q_desc + q_step, k_desc + k_step, kk > 0);
    }
    wgmma::commit();
  };
  std::uint32_t pa[kKeys / 16][4];  // P of the previous tile, the A operand of O += P V
  auto issue_values = [&](int tile) {
    const std::uint64_t v_desc =
        wgmma::descriptor(stage_smem(tile) + C::kTileBytes, kKeys * 128, 1024);
#pragma unroll
    for (int kc = 0; kc < kKeys / 16; ++kc) {
      wgmma::wgmma_rs<D, T>(o, pa[kc], v_desc + ((kc * 16 * 128) >> 4));
    }
    wgmma::commit();
  };
  // The online softmax of tile `tile`'s scores in s: logits, masks, the new row maxima (m) and
  // sums (l); s becomes P. Returns the factor the earlier O rows must take (1: none).
  auto softmax = [&](int tile, float(&correction)[2]) {
    const int k0 = tile_key(tile);
    if (!scale_in_exp) {
      if (a.soft_cap) {
#pragma unroll
        for (int i = 0; i < kKeys / 2; ++i) s[i] = a.post * tanhf(s[i] * a.pre);
      } else {
#pragma unroll
        for (int i = 0; i < kKeys / 2; ++i) s[i] *= a.pre;
      }
    }
    if (needs_mask(k0)) {
      const int pos[2] = {row_position(0), row_position(1)};
#pragma unroll
      for (int j = 0; j < kKeys / 8; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int key = k0 + j * 8 + quad_col + e % 2;
          const int ps = pos[e / 2];
          const bool seen = key <= ps && (a.window_left < 0 || key >= ps - a.window_left);
          s[4 * j + e] = seen ? s[4 * j + e] : -INFINITY;
        }
      }
    }
    // A row's scores are spread over the 4 lanes of a quad; its max is reduced as a tree.
    float mx[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float v[kKeys / 8];
#pragma unroll
      for (int j = 0; j < kKeys / 8; ++j) v[j] = fmaxf(s[4 * j + 2 * r], s[4 * j + 2 * r + 1]);
#pragma unroll
      for (int w = kKeys / 16; w >= 1; w /= 2) {
#pragma unroll
        for (int j = 0; j < kKeys / 16; ++j) {
          if (j < w) v[j] = fmaxf(v[j], v[j + w]);
        }
      }
      float x = fmaxf(v[0], __shfl_xor_sync(0xffffffffu, v[0], 1));
      x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
      mx[r] = x * score_scale;  // -inf stays -inf
    }
    correction[0] = correction[1] = 1.0f;
    const bool grow =
        mx[0] > m[0] + kPrefillRescaleThreshold || mx[1] > m[1] + kPrefillRescaleThreshold;
    if (__any_sync(0xffffffffu, grow)) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        if (mx[r] > m[r]) {
          correction[r] = ptx::exp2_approx(m[r] - mx[r]);  // 0 when m was -inf
          m[r] = mx[r];
          l[r] *= correction[r];
        }
      }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float base = m[r] == -INFINITY ? 0.0f : m[r];  // nothing seen: p = 0
#pragma unroll
      for (int j = 0; j < kKeys / 8; ++j) {
#pragma unroll
        for (int e = 2 * r; e < 2 * r + 2; ++e) {
          s[4 * j + e] = ptx::exp2_approx(fmaf(s[4 * j + e], score_scale, -base));
          l[r] += s[4 * j + e];
        }
      }
    }
  };
  auto rescale_and_take_p = [&](const float(&correction)[2]) {
    if (correction[0] != 1.0f || correction[1] != 1.0f) {
#pragma unroll
      for (int j = 0; j < D / 8; ++j) {
        o[4 * j + 0] *= correction[0];
        o[4 * j + 1] *= correction[0];
        o[4 * j + 2] *= correction[1];
        o[4 * j + 3] *= correction[1];
      }
    }
    // P's accumulator layout is the register A operand's, 16 keys per k-step.
#pragma unroll
    for (int kc = 0; kc < kKeys / 16; ++kc) {
      pa[kc][0] = pack2<T>(s[8 * kc + 0], s[8 * kc + 1]);
      pa[kc][1] = pack2<T>(s[8 * kc + 2], s[8 * kc + 3]);
      pa[kc][2] = pack2<T>(s[8 * kc + 4], s[8 * kc + 5]);
      pa[kc][3] = pack2<T>(s[8 * kc + 6], s[8 * kc + 7]);
    }
  };

  // Tile it: its scores and the previous tile's O += P V are issued together, and the softmax
  // of these scores runs while the tensor cores do P V (tile 0 has no previous tile: it runs
  // alone, so the loop holds no branch around the MMAs). Tile it + kAhead is copied into the
  // stage of tile it - 2, whose P V every warpgroup finished before the barrier.
  auto next_copies = [&](int it) {
    if (it + C::kAhead < num_tiles) copy_tile(it + C::kAhead);
    ptx::cp_async_commit();
    load_row_block(it + C::kAhead + 1);
  };
  float correction[2];
  if (num_tiles > 0) {
    ptx::cp_async_wait<C::kAhead - 1>();
    wgmma::fence_async_shared();
    __syncthreads();  // Q and tile 0 have landed
    wgmma::fence();
    issue_scores(0);
    next_copies(0);
    wgmma::wait<0>();
    wgmma::hold(s);
    softmax(0, correction);
    rescale_and_take_p(correction);
    store_row_address(C::kAhead + 1);  // into the slot read before this barrier
  }
  for (int it = 1; it < num_tiles; ++it) {
    ptx::cp_async_wait<C::kAhead - 1>();
    wgmma::fence_async_shared();
    __syncthreads();  // tile it has landed; tile it - 2's stage is free
    wgmma::fence();
    issue_scores(it);
    issue_values(it - 1);
    next_copies(it);
    wgmma::wait<1>();  // the scores; P V may still run
    wgmma::hold(s);
    softmax(it, correction);
    wgmma::wait<0>();
    wgmma::hold(o);
    wgmma::hold(s);  // P is packed into the registers that P V read only after the wait
    rescale_and_take_p(correction);
    store_row_address(it + C::kAhead + 1);  // into the slot read before this barrier
  }
  if (num_tiles > 0) {
    wgmma::fence();
    issue_values(num_tiles - 1);
    wgmma::wait<0>();
    wgmma::hold(o);
  }
  ptx::cp_async_wait<0>();
  ptx::allow_dependent_grids();  // the merge kernel (if any) may start launching
  if (!wg_active) return;

  const AttentionOutput& out = a.output;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float sum = l[r];
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    sum += __shfl_xor_sync(0xffffffffu, sum, 2);
    const int row = row_base + 8 * r;
    const int pos = row / hc, h = row - pos * hc;
    if (pos >= u.rows || h >= u.heads) continue;
    const int query_row = u.row0 + pos, head = u.head0 + h;
    const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
    const float lse2 = sum > 0.0f ? m[r] + log2f(sum) : -INFINITY;
    if (out.num_splits == 1) {
      T* dst = static_cast<T*>(out.out) + std::int64_t(query_row) * out.out_stride_batch +
               std::int64_t(head) * out.out_stride_head + quad_col;
#pragma unroll
      for (int j = 0; j < D / 8; ++j) {
        *reinterpret_cast<std::uint32_t*>(dst + j * 8) =
            pack2<T>(o[4 * j + 2 * r] * inv, o[4 * j + 2 * r + 1] * inv);
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
      for (int j = 0; j < D / 8; ++j) {
        *reinterpret_cast<float2*>(dst + j * 8) =
            make_float2(o[4 * j + 2 * r] * inv, o[4 * j + 2 * r + 1] * inv);
      }
      if (lane % 4 == 0) out.part_lse[part_row] = lse2;
    }
  }
#elif defined(__CUDA_ARCH__)
  // Only sm_90a images hold this kernel; the host launches it only from builds that have one
  // (TINYSERVE_WGMMA), so reaching this is a build misconfiguration: fail loudly, not silently.
  __trap();
#endif
}

}  // namespace tinyserve::kernels::cuda
