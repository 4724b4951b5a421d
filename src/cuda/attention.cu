// CUDA paged decode attention.
//
// Work: one thread block (CTA) per (sequence, split, KV head, tile of up to 16 query heads of
// its GQA group), so all query heads of a group share every K/V tile. Long sequences are split
// into num_splits chunks (flash-decoding): each CTA writes a float32 partial output and its
// log-sum-exp to the caller's workspace, and a second kernel merges them. The split count comes
// from host-side values only (plan_attention_splits); each CTA derives its token range from the
// sequence length it reads on the device, so a captured CUDA graph stays correct when lengths
// and tables change between replays.
//
// Two kernels:
// - decode_mma_kernel (float16/bfloat16, head_dim 64/128/256, 16-byte aligned rows): 4 warps,
//   each owns 16 tokens of a 64-token tile. K and V tiles stream through a 3-stage cp.async
//   pipeline (rows past the range are zero-filled, never read); Q.K^T and P.V run on tensor
//   cores (m16n8k16, float32 accumulation; the query heads are the M dimension). Online softmax
//   in float32, log2 domain. Warps merge their states through shared memory at the end.
// - decode_generic_kernel (any dtype incl. float32, head_dim <= 512, any alignment): CUDA
//   cores, a warp per token, up to 8 query heads per CTA.
//
// Block ids read from the device are bounds-checked: an id outside the cache reads nothing
// (its rows are zeros), so a bad table can never read outside the cache.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "core/kernels.h"
#include "cuda/common.cuh"
#include "cuda/dtypes.cuh"
#include "cuda/ptx.cuh"

namespace tinyserve::kernels::cuda {
namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kTile = 64;           // tokens per pipeline stage (MMA kernel)
constexpr int kMmaHeads = 16;       // query heads per CTA (MMA kernel: the M of m16n8k16)
constexpr int kGenericHeads = 8;    // query heads per CTA (generic kernel)
constexpr int kGenericMaxDim = 512; // 16 elements per lane
constexpr int kMinSplitTokens = 256;

struct AttnArgs {
  const void* query;
  std::int64_t q_stride_batch, q_stride_head;
  const void* k_cache;
  const void* v_cache;
  std::int64_t k_stride_block, k_stride_token, k_stride_head;
  std::int64_t v_stride_block, v_stride_token, v_stride_head;
  const std::int32_t* block_table;
  std::int64_t block_table_stride;
  const std::int32_t* seq_lens;
  void* out;
  std::int64_t out_stride_batch, out_stride_head;
  float* lse;
  std::int64_t lse_stride_batch, lse_stride_head;
  float* part_out;  // [num_splits, batch, num_q_heads, head_dim], when num_splits > 1
  float* part_lse;  // [num_splits, batch, num_q_heads], log2 domain
  std::int64_t num_blocks;
  int max_blocks;
  int batch, num_q_heads, head_dim, block_size;
  int group;       // query heads per KV head
  int head_tiles;  // CTAs per KV head along the group
  int window_left;
  int num_splits;
  // logit (log2 domain) = post * tanh(q.k * pre) with a soft cap, else q.k * pre
  float pre, post;
  bool soft_cap;
};

// The token range [begin, end) of split `split` of sequence b. Chunks are whole multiples of
// `align` tokens so that only a sequence's last chunk has a partial tile.
__device__ __forceinline__ void split_range(const AttnArgs& a, int b, int split, int align,
                                            int& begin, int& end) {
  const int capacity = a.max_blocks * a.block_size;  // fits int32: checked on the host
  const int len = min(max(a.seq_lens[b], 0), capacity);
  const int first = a.window_left >= 0 ? max(0, len - 1 - a.window_left) : 0;
  const int n = len - first;
  int chunk = (n + a.num_splits - 1) / a.num_splits;
  chunk = (chunk + align - 1) / align * align;
  begin = min(len, first + split * chunk);
  end = min(len, begin + chunk);
}

__device__ __forceinline__ float logit(const AttnArgs& a, float qk) {
  return a.soft_cap ? a.post * tanhf(qk * a.pre) : qk * a.pre;
}

// Writes one output element of query head h; `value` is normalised, `lse2` in log2 domain.
template <class T>
__device__ __forceinline__ void store_output(const AttnArgs& a, int b, int split, int h, int d,
                                             float value, float lse2) {
  if (a.num_splits == 1) {
    T* out = static_cast<T*>(a.out) + b * a.out_stride_batch + h * a.out_stride_head;
    out[d] = from_float<T>(value);
    if (d == 0 && a.lse) {
      a.lse[b * a.lse_stride_batch + h * a.lse_stride_head] =
          lse2 == -INFINITY ? -INFINITY : lse2 * kLn2;
    }
  } else {
    const std::int64_t row = (std::int64_t(split) * a.batch + b) * a.num_q_heads + h;
    a.part_out[row * a.head_dim + d] = value;
    if (d == 0) a.part_lse[row] = lse2;
  }
}

// Final merge of per-warp softmax states kept in shared memory: red_m/red_l [kWarps][rows],
// red_o [kWarps][rows][dim]. Writes rows [0, heads) of query heads head0...
template <class T>
__device__ void merge_warps_and_store(const AttnArgs& a, const float* red_m, const float* red_l,
                                      const float* red_o, int rows, int dim, int heads,
                                      int head0, int b, int split) {
  for (int i = threadIdx.x; i < heads * dim; i += kThreads) {
    const int r = i / dim, d = i - r * dim;
    float m = -INFINITY;
    for (int w = 0; w < kWarps; ++w) m = fmaxf(m, red_m[w * rows + r]);
    float value = 0.0f, lse2 = -INFINITY;
    if (m != -INFINITY) {
      float l = 0.0f, acc = 0.0f;
      for (int w = 0; w < kWarps; ++w) {
        const float scale = ptx::exp2_approx(red_m[w * rows + r] - m);
        l += red_l[w * rows + r] * scale;
        acc += red_o[(w * rows + r) * dim + d] * scale;
      }
      value = acc / l;
      lse2 = m + log2f(l);
    }
    store_output<T>(a, b, split, head0 + r, d, value, lse2);
  }
}

// ---------------------------------------------------------------------------------------------
// Tensor-core kernel

template <int D>
struct MmaConfig {
  static constexpr int kRow = D + 8;  // shared row stride (elements): 16-byte pad, no conflicts
  static constexpr int kStages = 3;
  static constexpr int kChunks = D / 8;  // 16-byte chunks per row
  static constexpr int kRowsPerPass = kThreads / kChunks;
  static constexpr int kPasses = kTile / kRowsPerPass;
  static constexpr int kQBytes = kMmaHeads * kRow * 2;
  static constexpr int kStageBytes = 2 * kTile * kRow * 2;
  static constexpr int kSmemBytes = kQBytes + kStages * kStageBytes;
  static constexpr int kReduceBytes = kWarps * kMmaHeads * (D + 2) * 4;
  static_assert(kReduceBytes <= kStages * kStageBytes, "reduction must fit the stage buffers");
  static_assert(kThreads % kChunks == 0 && kTile % kRowsPerPass == 0, "loader shape");
};

template <class T, int D>
__global__ void __launch_bounds__(kThreads) decode_mma_kernel(const __grid_constant__ AttnArgs a) {
  using C = MmaConfig<D>;
  extern __shared__ __align__(16) unsigned char smem[];
  T* q_smem = reinterpret_cast<T*>(smem);
  T* stages = reinterpret_cast<T*>(smem + C::kQBytes);

  const int b = blockIdx.x, split = blockIdx.y;
  const int kv_head = blockIdx.z / a.head_tiles;
  const int head0 = kv_head * a.group + (blockIdx.z % a.head_tiles) * kMmaHeads;
  const int heads = min(kMmaHeads, kv_head * a.group + a.group - head0);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  int begin, end;
  split_range(a, b, split, kTile, begin, end);

  // Q: [16 heads][D] in shared memory, rows past the group zero.
  {
    const T* q = static_cast<const T*>(a.query) + b * a.q_stride_batch;
    for (int i = threadIdx.x; i < kMmaHeads * C::kChunks; i += kThreads) {
      const int r = i / C::kChunks, c = i % C::kChunks;
      uint4 v = make_uint4(0, 0, 0, 0);
      if (r < heads) v = *reinterpret_cast<const uint4*>(q + (head0 + r) * a.q_stride_head + c * 8);
      *reinterpret_cast<uint4*>(q_smem + r * C::kRow + c * 8) = v;
    }
  }

  const T* k_cache = static_cast<const T*>(a.k_cache) + kv_head * a.k_stride_head;
  const T* v_cache = static_cast<const T*>(a.v_cache) + kv_head * a.v_stride_head;
  const std::int32_t* table = a.block_table + b * a.block_table_stride;
  const int chunk = threadIdx.x % C::kChunks;
  const int row0 = threadIdx.x / C::kChunks;
  auto load_tile = [&](int tile, int stage) {
    T* ks = stages + stage * 2 * kTile * C::kRow;
    T* vs = ks + kTile * C::kRow;
    const int t0 = begin + tile * kTile;
#pragma unroll
    for (int pass = 0; pass < C::kPasses; ++pass) {
      const int r = row0 + pass * C::kRowsPerPass;
      const int token = t0 + r;
      const T* kp = k_cache;
      const T* vp = v_cache;
      bool valid = token < end;
      if (valid) {
        const int page = unsigned(token) / unsigned(a.block_size);
        const std::int64_t block = table[page];
        const std::int64_t offset = token - page * a.block_size;
        valid = block >= 0 && block < a.num_blocks;
        if (valid) {
          kp += block * a.k_stride_block + offset * a.k_stride_token + chunk * 8;
          vp += block * a.v_stride_block + offset * a.v_stride_token + chunk * 8;
        }
      }
      ptx::cp_async_16(ks + r * C::kRow + chunk * 8, kp, valid);
      ptx::cp_async_16(vs + r * C::kRow + chunk * 8, vp, valid);
    }
  };

  const int num_tiles = (end - begin + kTile - 1) / kTile;
#pragma unroll
  for (int s = 0; s < C::kStages - 1; ++s) {
    if (s < num_tiles) load_tile(s, s);
    ptx::cp_async_commit();
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
    ptx::cp_async_wait<C::kStages - 2>();
    __syncthreads();
    {
      const int next = tile + C::kStages - 1;
      if (next < num_tiles) load_tile(next, next % C::kStages);
      ptx::cp_async_commit();
    }
    const T* ks = stages + (tile % C::kStages) * 2 * kTile * C::kRow;
    const T* vs = ks + kTile * C::kRow;
    const int t0 = begin + tile * kTile + warp * 16;

    // S = Q K^T for this warp's 16 tokens: two 8-token column blocks.
    float s[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      std::uint32_t qa[4], kb[4];
      ptx::ldmatrix_x4(qa, q_smem + ((lane % 8) + ((lane / 8) % 2) * 8) * C::kRow + kk * 16 +
                               (lane / 16) * 8);
      ptx::ldmatrix_x4(kb, ks + (warp * 16 + (lane / 16) * 8 + lane % 8) * C::kRow + kk * 16 +
                               ((lane / 8) % 2) * 8);
      ptx::mma_16816<T>(s[0], qa, kb[0], kb[1]);
      ptx::mma_16816<T>(s[1], qa, kb[2], kb[3]);
    }
#pragma unroll
    for (int j = 0; j < 2; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int token = t0 + j * 8 + quad_col + (e % 2);
        s[j][e] = token < end ? logit(a, s[j][e]) : -INFINITY;
      }
    }
    // Online softmax per row; a row's 16 scores are spread over the 4 lanes of a quad.
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = fmaxf(fmaxf(s[0][2 * r], s[0][2 * r + 1]), fmaxf(s[1][2 * r], s[1][2 * r + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float m_new = fmaxf(m[r], mx);
      const float base = m_new == -INFINITY ? 0.0f : m_new;  // nothing seen yet: p = 0
      const float correction = ptx::exp2_approx(m[r] - base);
      float sum = 0.0f;
#pragma unroll
      for (int j = 0; j < 2; ++j) {
#pragma unroll
        for (int e = 2 * r; e < 2 * r + 2; ++e) {
          s[j][e] = ptx::exp2_approx(s[j][e] - base);
          sum += s[j][e];
        }
      }
      l[r] = l[r] * correction + sum;
      m[r] = m_new;
#pragma unroll
      for (int nb = 0; nb < D / 8; ++nb) {
        o[nb][2 * r] *= correction;
        o[nb][2 * r + 1] *= correction;
      }
    }
    // O += P V: P's accumulator layout is the A operand layout of the next MMA.
    const std::uint32_t pa[4] = {pack2<T>(s[0][0], s[0][1]), pack2<T>(s[0][2], s[0][3]),
                                 pack2<T>(s[1][0], s[1][1]), pack2<T>(s[1][2], s[1][3])};
#pragma unroll
    for (int dp = 0; dp < D / 16; ++dp) {
      std::uint32_t vb[4];
      ptx::ldmatrix_x4_trans(vb, vs + (warp * 16 + ((lane / 8) % 2) * 8 + lane % 8) * C::kRow +
                                     dp * 16 + (lane / 16) * 8);
      ptx::mma_16816<T>(o[2 * dp], pa, vb[0], vb[1]);
      ptx::mma_16816<T>(o[2 * dp + 1], pa, vb[2], vb[3]);
    }
  }
  ptx::cp_async_wait<0>();
  __syncthreads();  // the stage buffers become the reduction buffers

#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
  }
  float* red_m = reinterpret_cast<float*>(smem + C::kQBytes);
  float* red_l = red_m + kWarps * kMmaHeads;
  float* red_o = red_l + kWarps * kMmaHeads;
  const int g = lane / 4;
  if (lane % 4 == 0) {
    red_m[warp * kMmaHeads + g] = m[0];
    red_m[warp * kMmaHeads + g + 8] = m[1];
    red_l[warp * kMmaHeads + g] = l[0];
    red_l[warp * kMmaHeads + g + 8] = l[1];
  }
#pragma unroll
  for (int nb = 0; nb < D / 8; ++nb) {
    float* row_g = red_o + (warp * kMmaHeads + g) * D + nb * 8 + quad_col;
    float* row_g8 = row_g + 8 * D;
    row_g[0] = o[nb][0];
    row_g[1] = o[nb][1];
    row_g8[0] = o[nb][2];
    row_g8[1] = o[nb][3];
  }
  __syncthreads();
  merge_warps_and_store<T>(a, red_m, red_l, red_o, kMmaHeads, D, heads, head0, b, split);
}

// ---------------------------------------------------------------------------------------------
// CUDA-core kernel: any dtype, head_dim <= 512, any alignment.

template <class T>
__global__ void __launch_bounds__(kThreads)
    decode_generic_kernel(const __grid_constant__ AttnArgs a) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int D = a.head_dim;
  float* q_smem = reinterpret_cast<float*>(smem);         // [kGenericHeads][D]
  float* acc = q_smem + kGenericHeads * D;                 // [kWarps][kGenericHeads][D]
  float* red_m = acc + kWarps * kGenericHeads * D;         // [kWarps][kGenericHeads]
  float* red_l = red_m + kWarps * kGenericHeads;

  const int b = blockIdx.x, split = blockIdx.y;
  const int kv_head = blockIdx.z / a.head_tiles;
  const int head0 = kv_head * a.group + (blockIdx.z % a.head_tiles) * kGenericHeads;
  const int heads = min(kGenericHeads, kv_head * a.group + a.group - head0);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  int begin, end;
  split_range(a, b, split, 1, begin, end);

  const T* q = static_cast<const T*>(a.query) + b * a.q_stride_batch;
  for (int i = threadIdx.x; i < kGenericHeads * D; i += kThreads) {
    const int r = i / D, d = i - r * D;
    q_smem[i] = r < heads ? to_float(q[(head0 + r) * a.q_stride_head + d]) : 0.0f;
  }
  for (int i = threadIdx.x; i < kWarps * kGenericHeads * D; i += kThreads) acc[i] = 0.0f;
  __syncthreads();

  const T* k_cache = static_cast<const T*>(a.k_cache) + kv_head * a.k_stride_head;
  const T* v_cache = static_cast<const T*>(a.v_cache) + kv_head * a.v_stride_head;
  const std::int32_t* table = a.block_table + b * a.block_table_stride;
  float* my_acc = acc + warp * kGenericHeads * D;
  float m[kGenericHeads], l[kGenericHeads];
#pragma unroll
  for (int g = 0; g < kGenericHeads; ++g) {
    m[g] = -INFINITY;
    l[g] = 0.0f;
  }
  constexpr int kPerLane = kGenericMaxDim / 32;
  for (int token = begin + warp; token < end; token += kWarps) {
    const int page = unsigned(token) / unsigned(a.block_size);
    const std::int64_t block = table[page];
    if (block < 0 || block >= a.num_blocks) continue;  // never read outside the cache
    const std::int64_t offset = token - page * a.block_size;
    const T* k = k_cache + block * a.k_stride_block + offset * a.k_stride_token;
    const T* v = v_cache + block * a.v_stride_block + offset * a.v_stride_token;
    float kr[kPerLane], vr[kPerLane];
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      const int d = lane + 32 * i;
      kr[i] = d < D ? to_float(k[d]) : 0.0f;
      vr[i] = d < D ? to_float(v[d]) : 0.0f;
    }
#pragma unroll
    for (int g = 0; g < kGenericHeads; ++g) {
      if (g >= heads) break;
      float partial = 0.0f;
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) {
        const int d = lane + 32 * i;
        if (d < D) partial += q_smem[g * D + d] * kr[i];
      }
#pragma unroll
      for (int mask = 16; mask > 0; mask /= 2) {
        partial += __shfl_xor_sync(0xffffffffu, partial, mask);
      }
      const float s = logit(a, partial);
      const float m_new = fmaxf(m[g], s);
      const float correction = ptx::exp2_approx(m[g] - m_new);
      const float p = ptx::exp2_approx(s - m_new);
      l[g] = l[g] * correction + p;
      m[g] = m_new;
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) {
        const int d = lane + 32 * i;
        if (d < D) my_acc[g * D + d] = my_acc[g * D + d] * correction + p * vr[i];
      }
    }
  }
  if (lane == 0) {
#pragma unroll
    for (int g = 0; g < kGenericHeads; ++g) {
      red_m[warp * kGenericHeads + g] = m[g];
      red_l[warp * kGenericHeads + g] = l[g];
    }
  }
  __syncthreads();
  merge_warps_and_store<T>(a, red_m, red_l, acc, kGenericHeads, D, heads, head0, b, split);
}

// ---------------------------------------------------------------------------------------------
// Merge of split partials: one CTA per (sequence, query head).

template <class T>
__global__ void __launch_bounds__(kThreads) merge_splits_kernel(const __grid_constant__ AttnArgs a) {
  extern __shared__ float weights[];  // [num_splits]
  const int b = blockIdx.x / a.num_q_heads, h = blockIdx.x % a.num_q_heads;
  const std::int64_t stride = std::int64_t(a.batch) * a.num_q_heads;
  const std::int64_t row = std::int64_t(b) * a.num_q_heads + h;
  float m = -INFINITY;
  for (int s = 0; s < a.num_splits; ++s) m = fmaxf(m, a.part_lse[s * stride + row]);
  float total = 0.0f;
  for (int s = threadIdx.x; s < a.num_splits; s += kThreads) {
    weights[s] = m == -INFINITY ? 0.0f : ptx::exp2_approx(a.part_lse[s * stride + row] - m);
  }
  __syncthreads();
  for (int s = 0; s < a.num_splits; ++s) total += weights[s];
  T* out = static_cast<T*>(a.out) + b * a.out_stride_batch + h * a.out_stride_head;
  for (int d = threadIdx.x; d < a.head_dim; d += kThreads) {
    float acc = 0.0f;
    for (int s = 0; s < a.num_splits; ++s) {
      if (weights[s] != 0.0f) acc += weights[s] * a.part_out[(s * stride + row) * a.head_dim + d];
    }
    out[d] = from_float<T>(total > 0.0f ? acc / total : 0.0f);
  }
  if (threadIdx.x == 0 && a.lse) {
    a.lse[b * a.lse_stride_batch + h * a.lse_stride_head] =
        total > 0.0f ? (m + log2f(total)) * kLn2 : -INFINITY;
  }
}

// ---------------------------------------------------------------------------------------------
// Host side

using KernelFn = void (*)(AttnArgs);

struct Launch {
  KernelFn kernel;
  int smem_bytes;
  int heads_per_cta;
};

template <class T>
Launch mma_launch(int head_dim) {
  switch (head_dim) {
    case 64: return {decode_mma_kernel<T, 64>, MmaConfig<64>::kSmemBytes, kMmaHeads};
    case 128: return {decode_mma_kernel<T, 128>, MmaConfig<128>::kSmemBytes, kMmaHeads};
    case 256: return {decode_mma_kernel<T, 256>, MmaConfig<256>::kSmemBytes, kMmaHeads};
    default: return {nullptr, 0, 0};
  }
}

int generic_smem_bytes(int head_dim) {
  return (kGenericHeads * head_dim * (1 + kWarps) + 2 * kWarps * kGenericHeads) * 4;
}

Launch generic_launch(DType dtype, int head_dim) {
  const int smem = generic_smem_bytes(head_dim);
  switch (dtype) {
    case DType::Float16: return {decode_generic_kernel<__half>, smem, kGenericHeads};
    case DType::BFloat16: return {decode_generic_kernel<__nv_bfloat16>, smem, kGenericHeads};
    default: return {decode_generic_kernel<float>, smem, kGenericHeads};
  }
}

// The tensor-core kernel's path, when the dtype and head_dim have one (alignment aside).
Launch preferred_launch(DType dtype, int head_dim) {
  if (dtype == DType::Float16) {
    Launch l = mma_launch<__half>(head_dim);
    if (l.kernel) return l;
  } else if (dtype == DType::BFloat16) {
    Launch l = mma_launch<__nv_bfloat16>(head_dim);
    if (l.kernel) return l;
  }
  return generic_launch(dtype, head_dim);
}

// Raises the kernel's dynamic shared-memory limit once per (kernel, device); returns how many
// CTAs of it fit on one multiprocessor.
int prepare(const Launch& l, int device, const char* op) {
  struct Entry {
    KernelFn kernel;
    int device, smem, ctas;
  };
  static std::mutex mutex;
  static std::vector<Entry> prepared;
  std::lock_guard<std::mutex> lock(mutex);
  for (const Entry& e : prepared) {
    if (e.kernel == l.kernel && e.device == device && e.smem == l.smem_bytes) return e.ctas;
  }
  check(cudaFuncSetAttribute(l.kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, l.smem_bytes),
        op, "cudaFuncSetAttribute");
  int ctas = 0;
  check(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&ctas, l.kernel, kThreads, l.smem_bytes),
        op, "cudaOccupancyMaxActiveBlocksPerMultiprocessor");
  prepared.push_back({l.kernel, device, l.smem_bytes, std::max(ctas, 1)});
  return std::max(ctas, 1);
}

bool aligned16(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

void check_head_dim(int head_dim) {
  if (head_dim > kGenericMaxDim) {
    throw std::invalid_argument("tinyserve.paged_attention: head_dim must be at most " +
                                std::to_string(kGenericMaxDim) + " on CUDA, got " +
                                std::to_string(head_dim));
  }
}

}  // namespace

int plan_attention_splits(int device_index, DType dtype, int batch, int num_q_heads,
                          int num_kv_heads, int head_dim, std::int64_t max_kv_len) {
  const char* op = "plan_paged_attention";
  check_head_dim(head_dim);
  DeviceGuard guard(device_index, op);
  const Launch l = preferred_launch(dtype, head_dim);
  const int group = num_q_heads / num_kv_heads;
  const std::int64_t units = std::int64_t(batch) * num_kv_heads *
                             ((group + l.heads_per_cta - 1) / l.heads_per_cta);
  const std::int64_t slots = std::int64_t(multiprocessor_count(device_index)) *
                             prepare(l, device_index, op);
  const std::int64_t max_splits =
      std::clamp<std::int64_t>(max_kv_len / kMinSplitTokens, 1, 1024);
  // Wave efficiency of s splits: the share of CTA slots busy over the waves it takes (equal
  // lengths assumed). Take the fewest splits within 5% of the best.
  auto efficiency = [&](std::int64_t s) {
    const double waves = double(units * s) / double(slots);
    return waves / std::ceil(waves);
  };
  double best = 0.0;
  for (std::int64_t s = 1; s <= max_splits; ++s) best = std::max(best, efficiency(s));
  for (std::int64_t s = 1; s <= max_splits; ++s) {
    if (efficiency(s) >= 0.95 * best) return int(s);
  }
  return 1;
}

void paged_attention(const PagedAttentionParams& p, Stream stream) {
  const char* op = "paged_attention";
  check_head_dim(p.head_dim);
  if (std::int64_t(p.max_blocks) * p.block_size > INT32_MAX) {
    throw std::invalid_argument(
        "tinyserve.paged_attention: max_blocks * block_size must fit int32 on CUDA, got " +
        std::to_string(std::int64_t(p.max_blocks) * p.block_size));
  }
  DeviceGuard guard(p.device_index, op);
  AttnArgs a{};
  a.query = p.query;
  a.q_stride_batch = p.q_stride_batch;
  a.q_stride_head = p.q_stride_head;
  a.k_cache = p.key_cache.data;
  a.v_cache = p.value_cache.data;
  a.k_stride_block = p.key_cache.stride_block;
  a.k_stride_token = p.key_cache.stride_token;
  a.k_stride_head = p.key_cache.stride_head;
  a.v_stride_block = p.value_cache.stride_block;
  a.v_stride_token = p.value_cache.stride_token;
  a.v_stride_head = p.value_cache.stride_head;
  a.block_table = p.block_table;
  a.block_table_stride = p.block_table_stride;
  a.seq_lens = p.seq_lens;
  a.out = p.out;
  a.out_stride_batch = p.out_stride_batch;
  a.out_stride_head = p.out_stride_head;
  a.lse = p.lse;
  a.lse_stride_batch = p.lse_stride_batch;
  a.lse_stride_head = p.lse_stride_head;
  a.num_blocks = p.num_blocks;
  a.max_blocks = p.max_blocks;
  a.batch = p.batch;
  a.num_q_heads = p.num_q_heads;
  a.head_dim = p.head_dim;
  a.block_size = p.block_size;
  a.group = p.num_q_heads / p.num_kv_heads;
  a.window_left = p.window_left;
  a.num_splits = p.num_splits;
  a.soft_cap = p.logits_soft_cap > 0.0f;
  a.pre = a.soft_cap ? p.scale / p.logits_soft_cap : p.scale * kLog2e;
  a.post = a.soft_cap ? p.logits_soft_cap * kLog2e : 1.0f;
  if (p.num_splits > 1) {
    const std::size_t rows = std::size_t(p.num_splits) * p.batch * p.num_q_heads;
    const std::size_t out_bytes = (rows * p.head_dim * sizeof(float) + 255) / 256 * 256;
    a.part_out = static_cast<float*>(p.workspace);
    a.part_lse = reinterpret_cast<float*>(static_cast<char*>(p.workspace) + out_bytes);
  }

  Launch l = preferred_launch(p.dtype, p.head_dim);
  if (l.heads_per_cta == kMmaHeads) {
    // The tensor-core kernel moves 16-byte rows: every row start must be 16-byte aligned.
    const bool ok = aligned16(p.query) && aligned16(p.key_cache.data) &&
                    aligned16(p.value_cache.data) && p.q_stride_batch % 8 == 0 &&
                    p.q_stride_head % 8 == 0 && p.key_cache.stride_block % 8 == 0 &&
                    p.key_cache.stride_token % 8 == 0 && p.key_cache.stride_head % 8 == 0 &&
                    p.value_cache.stride_block % 8 == 0 && p.value_cache.stride_token % 8 == 0 &&
                    p.value_cache.stride_head % 8 == 0;
    if (!ok) l = generic_launch(p.dtype, p.head_dim);
  }
  prepare(l, p.device_index, op);
  a.head_tiles = (a.group + l.heads_per_cta - 1) / l.heads_per_cta;
  cudaStream_t s = as_stream(stream);
  const dim3 grid(unsigned(p.batch), unsigned(p.num_splits), unsigned(p.num_kv_heads * a.head_tiles));
  void* args[] = {&a};
  check(cudaLaunchKernel(reinterpret_cast<const void*>(l.kernel), grid, dim3(kThreads), args,
                         std::size_t(l.smem_bytes), s),
        op, "decode kernel launch");
  if (p.num_splits > 1) {
    const std::size_t smem = std::size_t(p.num_splits) * sizeof(float);
    const unsigned blocks = unsigned(p.batch * p.num_q_heads);
    switch (p.dtype) {
      case DType::Float16: merge_splits_kernel<__half><<<blocks, kThreads, smem, s>>>(a); break;
      case DType::BFloat16:
        merge_splits_kernel<__nv_bfloat16><<<blocks, kThreads, smem, s>>>(a);
        break;
      default: merge_splits_kernel<float><<<blocks, kThreads, smem, s>>>(a); break;
    }
    check_launch(op, "merge_splits_kernel");
  }
}

}  // namespace tinyserve::kernels::cuda
