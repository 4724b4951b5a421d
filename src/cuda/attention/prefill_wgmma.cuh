#pragma once

// The Hopper prefill kernel (sm_90a warpgroup MMA): float16/bfloat16, head_dim 64/128/256,
// 16-byte aligned rows, caches of the query's type.
//
// The schedule and the work of a CTA are those of the other prefill kernels (prefill_common.cuh):
// 128 query rows (positions x query heads of one GQA group). The CTA's warps are specialised:
// a producer warpgroup gathers K/V rows from their pages with cp.async into a 128-byte swizzled
// layout (wgmma.cuh), up to kStages - 2 tiles ahead, and hands each stage over through shared
// memory barriers; two consumer warpgroups of 64 query rows each run the MMAs and the softmax
// without waiting for each other. Per key tile a consumer issues S = Q K^T as asynchronous
// wgmmas (Q and K in shared memory) together with the previous tile's O += P V (P from
// registers, V read N-major from its stage), and runs the online softmax of S while the tensor
// cores do P V: the accumulator layout is mma.sync's, so P becomes the A operand in place.

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
  static constexpr int kThreads = 384;  // a producer warpgroup and two consumer warpgroups
  static constexpr int kRows = 128;     // query rows per CTA, 64 per consumer warpgroup
  // Keys per tile: the score accumulator is kKeys / 2 registers a thread. At head_dim 128, 96-key
  // tiles (four stages) ran up to 3% faster than 64-key tiles (six stages) on an H200.
  static constexpr int kKeys = D == 64 ? 128 : D == 128 ? 96 : 32;
  static constexpr int kChunks = D / 8;  // 16-byte chunks of a row
  static constexpr int kQBytes = kRows * D * 2;
  static constexpr int kTileBytes = kKeys * D * 2;  // K or V of one tile
  static constexpr int kStageBytes = 2 * kTileBytes;
  static constexpr int kMaxStages = 8;
  static constexpr int kBarrierBytes = 2 * 8 * kMaxStages;  // a full and an empty barrier a stage
  // As many K/V stages as fit beside Q and the barriers (227 KB a CTA on Hopper, with 1024 bytes
  // to align the operands to the swizzle's period): 6, 4 and 5 at head_dim 64, 128, 256.
  static constexpr int kFit = (232448 - 1024 - kBarrierBytes - kQBytes) / kStageBytes;
  static constexpr int kStages = kFit < kMaxStages ? kFit : kMaxStages;
  // A tile's stage turns full when its copies land (the producer does not wait for them); the
  // consumers hold two stages (a tile's K, the tile before's V), so the producer runs up to
  // kStages - 2 tiles ahead.
  static constexpr int kSmemBytes = kQBytes + kStages * kStageBytes + kBarrierBytes + 1024;
  // The producer's four warps copy a tile's 2 kKeys rows (K, then V), kKeys / 2 rows a warp;
  // lane l computes the addresses of the warp's rows l + 32 j and the warp's lanes copy 32
  // chunks of its rows at a time.
  static constexpr int kRowsPerWarp = kKeys / 2;
  static constexpr int kAddressSlots = (kRowsPerWarp + 31) / 32;
  static constexpr int kCopiesPerLane = kRowsPerWarp * kChunks / 32;
  // Registers a thread: the launch gives each thread 64K / kThreads in steps of 8 (168;
  // __launch_bounds__(384, 1)), and setmaxnreg moves them between the warpgroups within that total.
  // The producer needs few, 96 where a lane copies more than 16 chunks a tile (head_dim 128: with
  // 88, one spilled value per tile made the kernel 3-4% slower on an H200); the consumers'
  // accumulators take the rest (setmaxnreg counts in steps of 8).
  static constexpr int kLaunchRegisters = 65536 / kThreads / 8 * 8;
  static constexpr int kProducerRegisters = kCopiesPerLane > 16 ? 96 : 72;
  static constexpr int kConsumerRegisters =
      (kLaunchRegisters * kThreads - kProducerRegisters * 128) / 256 / 8 * 8;
  static_assert(kProducerRegisters * 128 + kConsumerRegisters * 256 <= kLaunchRegisters * kThreads,
                "registers");
  static_assert(32 % kChunks == 0 && kRowsPerWarp % (32 / kChunks) == 0, "copy plan");
  static_assert(kStages >= 3, "stages");
};

// v[0] = the maximum of v[0 .. N - 1], as a tree: the upper half (rounded down) folds onto the
// lower until one value is left.
template <int N>
__device__ __forceinline__ void halve_max(float* v) {
  if constexpr (N > 1) {
#pragma unroll
    for (int j = 0; j < N / 2; ++j) v[j] = fmaxf(v[j], v[j + (N + 1) / 2]);
    halve_max<(N + 1) / 2>(v);
  }
}

template <class T, int D>
__global__ void __launch_bounds__(384, 1)
    prefill_wgmma_kernel(const __grid_constant__ PrefillArgs p) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using C = PrefillWgmmaShape<D>;
  constexpr int kKeys = C::kKeys;
  constexpr int kStages = C::kStages;
  extern __shared__ __align__(16) unsigned char smem[];
  PrefillUnit u;
  if (!prefill_unit(p, kKeys, u)) return;
  const DecodeArgs& a = p.a;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int wg = warp / 4;
  const int hc = p.heads_per_cta;
  const std::uint32_t q_base = (ptx::smem_addr(smem) + 1023u) & ~1023u;
  const std::uint32_t stage_base = q_base + C::kQBytes;
  const std::uint32_t full_bar = stage_base + kStages * C::kStageBytes;
  const std::uint32_t empty_bar = full_bar + 8 * C::kMaxStages;
  auto full = [&](int tile) { return full_bar + 8 * (tile % kStages); };
  auto empty = [&](int tile) { return empty_bar + 8 * (tile % kStages); };
  auto stage_smem = [&](int tile) { return stage_base + (tile % kStages) * C::kStageBytes; };
  const int num_tiles = u.tile_end - u.tile_begin;
  auto tile_key = [&](int tile) { return u.key_begin + (u.tile_begin + tile) * kKeys; };
  // Byte offset of 16-byte chunk `chunk` of row `row` in an operand of `rows` rows: 128-byte
  // column blocks of `rows` rows each, swizzled (wgmma.cuh).
  auto operand_offset = [](int rows, int row, int chunk) {
    return std::uint32_t((chunk / 8) * rows * 128 + row * 128 + (((chunk % 8) ^ (row % 8)) * 16));
  };

  // A stage is full when every producer thread's copies of its tile have landed, empty when
  // every consumer warp's MMAs have read it.
  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) {
      wgmma::barrier_init(full_bar + 8 * s, 128);
      wgmma::barrier_init(empty_bar + 8 * s, 8);
    }
  }
  __syncthreads();

  if (wg == 0) {
    // The producer: gathers each tile's K/V rows from their pages into its stage. Key rows past
    // the range, or in a block outside the cache, are copied from a row of zeros (a zero V row
    // keeps P V finite where P is 0).
    wgmma::release_registers<C::kProducerRegisters>();
    const std::int32_t* table = a.kv.table_row(u.b, u.kv_head);
    const T* k_head = a.kv.k_head<T>(u.kv_head);
    const T* v_head = a.kv.v_head<T>(u.kv_head);
    const int key_end = max(0, u.pos0 + u.rows);   // <= the length: pos0 + rows <= len
    const int warp_row0 = warp * C::kRowsPerWarp;  // K rows below kKeys, V rows from kKeys
    const bool values = warp_row0 >= kKeys;
    auto owns = [&](int j) { return lane + 32 * j < C::kRowsPerWarp; };
    auto row_token = [&](int tile, int j) {
      return tile_key(tile) + (warp_row0 + lane + 32 * j) % kKeys;
    };
    std::int32_t blocks[C::kAddressSlots];
    auto load_blocks = [&](int tile) {
#pragma unroll
      for (int j = 0; j < C::kAddressSlots; ++j) {
        // Loaded unconditionally (a key of the range: key_end >= 1 where a tile exists).
        const int token = row_token(tile, j);
        if (owns(j) && tile < num_tiles) blocks[j] = table[a.kv.page_of(min(token, key_end - 1))];
      }
    };
    load_blocks(0);
    for (int t = 0; t < num_tiles; ++t) {
      std::uint64_t address[C::kAddressSlots];
#pragma unroll
      for (int j = 0; j < C::kAddressSlots; ++j) {
        const int token = row_token(t, j);
        const std::int64_t block = blocks[j];
        address[j] = reinterpret_cast<std::uint64_t>(prefill_zero_row<D>);
        if (owns(j) && token < key_end && a.kv.in_cache(block)) {
          const int page = a.kv.page_of(token);
          address[j] =
              values ? reinterpret_cast<std::uint64_t>(a.kv.v_row(v_head, block, token, page))
                     : reinterpret_cast<std::uint64_t>(a.kv.k_row(k_head, block, token, page));
        }
      }
      load_blocks(t + 1);
      // The stage's previous tile (t - kStages) released; a fresh barrier passes parity 1.
      wgmma::barrier_wait(empty(t), ((t / kStages) & 1) ^ 1);
      const std::uint32_t dst = stage_smem(t) + (values ? C::kTileBytes : 0);
#pragma unroll
      for (int i = 0; i < C::kCopiesPerLane; ++i) {
        const int x = (i * 32 + lane) / C::kChunks;  // the warp's row; x / 32 == i / kChunks
        const int chunk = lane % C::kChunks;
        const std::uint64_t src = __shfl_sync(0xffffffffu, address[i / C::kChunks], x % 32);
        const int row = (warp_row0 + x) % kKeys;
        ptx::cp_async_16_shared_data(dst + operand_offset(kKeys, row, chunk),
                                     reinterpret_cast<const char*>(src) + chunk * 16, false);
      }
      wgmma::barrier_arrive_on_copies(full(t));
    }
    ptx::cp_async_commit();
    ptx::cp_async_wait<0>();
    return;
  }

  // The consumers: warpgroup cw takes query rows 64 cw .. 64 cw + 63 of the CTA's 128.
  wgmma::claim_registers<C::kConsumerRegisters>();
  const int cw = wg - 1;
  {
    // Q: rows past the tile's positions or the group's heads are zero-filled.
    const T* q = static_cast<const T*>(a.query);
    constexpr int kRowsPerPass = 128 / C::kChunks;
    const int t = threadIdx.x - 128 * wg;
    const int chunk = t % C::kChunks;
#pragma unroll
    for (int i = 0; i < 64 / kRowsPerPass; ++i) {
      const int r = cw * 64 + t / C::kChunks + i * kRowsPerPass;
      const int pos = r / hc, h = r - pos * hc;
      const bool valid = pos < u.rows && h < u.heads;
      const T* src = valid ? q + std::int64_t(u.row0 + pos) * a.q_stride_batch +
                                 std::int64_t(u.head0 + h) * a.q_stride_head
                           : q;
      ptx::cp_async_16_shared_data(q_base + operand_offset(C::kRows, r, chunk),
                                   reinterpret_cast<const char*>(src) + chunk * 16, !valid);
    }
    ptx::cp_async_commit();
    ptx::cp_async_wait<0>();
    wgmma::fence_async_shared();
    // The warpgroup's Q rows have landed (named barriers 1 and 2: 0 is __syncthreads').
    if (cw == 0) {
      wgmma::named_barrier_sync<1, 128>();
    } else {
      wgmma::named_barrier_sync<2, 128>();
    }
  }

  // This thread's rows of the accumulators: row_base and row_base + 8 of the CTA's 128, at key
  // columns 8 j + quad_col + 0..1 of every 8 (wgmma.cuh). Rows fill from 0, so a warpgroup past
  // the last row holds none.
  const int quad_col = 2 * (lane % 4);
  const int row_base = cw * 64 + (warp % 4) * 16 + lane / 4;
  const bool wg_active = cw * 64 < u.rows * hc;
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

  // Operand descriptors: Q's rows of this warpgroup; a k-step of 16 moves 32 bytes within a
  // 128-byte column block, and every 4 steps to the next block. V is read N-major: its 128-byte
  // column blocks kKeys rows apart, 16 rows per k-step.
  const std::uint64_t q_desc = wgmma::descriptor(q_base + cw * 64 * 128, 16, 1024);
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
      halve_max<kKeys / 8>(v);
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

  // A warp's MMAs on a tile are done: the producer may refill its stage.
  auto release = [&](int tile) {
    if (lane == 0) wgmma::barrier_arrive(empty(tile));
  };
  // The stage's copies have landed (the producer's threads' arrivals); the proxy fence makes
  // them visible to the wgmmas that read the stage.
  auto wait_full = [&](int tile) {
    wgmma::barrier_wait(full(tile), (tile / kStages) & 1);
    wgmma::fence_async_shared();
  };
  if (!wg_active) {
    // No row of this CTA falls in this warpgroup: it only keeps the stages' accounting.
    for (int it = 0; it < num_tiles; ++it) {
      wait_full(it);
      release(it);
    }
    return;
  }

  // Tile it: its scores and the previous tile's O += P V are issued together, and the softmax
  // of these scores runs while the tensor cores do P V (tile 0 has no previous tile: it runs
  // alone, so the loop holds no branch around the MMAs). Tile it - 1's stage is released once
  // its P V is done.
  float correction[2];
  if (num_tiles > 0) {
    wait_full(0);
    wgmma::fence();
    issue_scores(0);
    wgmma::wait<0>();
    wgmma::hold(s);
    softmax(0, correction);
    rescale_and_take_p(correction);
  }
  for (int it = 1; it < num_tiles; ++it) {
    wait_full(it);
    wgmma::fence();
    issue_scores(it);
    issue_values(it - 1);
    wgmma::wait<1>();  // the scores; P V may still run
    wgmma::hold(s);
    softmax(it, correction);
    wgmma::wait<0>();
    wgmma::hold(o);
    wgmma::hold(s);  // P is packed into the registers that P V read only after the wait
    release(it - 1);
    rescale_and_take_p(correction);
  }
  if (num_tiles > 0) {
    wgmma::fence();
    issue_values(num_tiles - 1);
    wgmma::wait<0>();
    wgmma::hold(o);
  }
  ptx::allow_dependent_grids();  // the merge kernel (if any) may start launching

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
