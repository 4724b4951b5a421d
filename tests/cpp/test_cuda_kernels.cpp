// The CUDA attention kernels driven through the backend interface (core/kernels.h), for what the
// public API does not expose yet: a block table and sequence lengths per KV head (strides of
// [batch, num_kv_heads, ...] arrays), in decode and in prefill (query_start_loc: a prompt over
// several query and key tiles, a decode row, a short append), and float8 caches with per-head
// K scales in device memory (decode and prefill). Each case is checked against a
// float64 reference computed here, with the outputs poisoned with NaN first. In-tree CUDA builds
// only; exits 77 (skipped) where no device is visible.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "check.h"
#include "core/kernels.h"

namespace {

using tinyserve::DType;
namespace tk = tinyserve::kernels;

#define CUDA_OK(x) CHECK((x) == cudaSuccess)

template <class T>
T* device_copy(const std::vector<T>& host) {
  T* d = nullptr;
  CUDA_OK(cudaMalloc(&d, host.size() * sizeof(T) + 16));
  CUDA_OK(cudaMemcpy(d, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice));
  return d;
}

struct Case {
  DType dtype;  // Float16/BFloat16 (tensor-core kernel at head_dim 64/128) or Float32 (CUDA-core)
  int head_dim;
  int num_splits;
  bool table_per_head;
  bool lens_per_head;
  bool prefill;            // query_start_loc: several rows per sequence, causal
  bool fp8_cache = false;  // float8 e4m3fn K/V: K scale per head (device), V scale per tensor
};

// Rounds a float to the stored type (float16, bfloat16 or float32), as stored in device memory.
float stored(DType dtype, float x) {
  if (dtype == DType::Float16) return __half2float(__float2half(x));
  if (dtype == DType::BFloat16) return __bfloat162float(__float2bfloat16(x));
  return x;
}

void run_case(const Case& c) {
  const int batch = 3, kv_heads = 2, group = 4, q_heads = kv_heads * group;
  const int block_size = 16, max_blocks = 8, num_blocks = 64, dim = c.head_dim;
  const int capacity = max_blocks * block_size;
  std::mt19937 rng(1234 + dim + c.num_splits * 7 + c.table_per_head * 3 + c.lens_per_head);
  std::uniform_real_distribution<float> uniform(-1.0f, 1.0f);

  // Tables: [batch, kv_heads, max_blocks] when per head, else [batch, max_blocks]; every row a
  // random choice of distinct blocks, so different heads read different blocks.
  const int table_rows = c.table_per_head ? batch * kv_heads : batch;
  std::vector<std::int32_t> table(std::size_t(table_rows) * max_blocks);
  for (int r = 0; r < table_rows; ++r) {
    std::vector<std::int32_t> ids(num_blocks);
    for (int i = 0; i < num_blocks; ++i) ids[i] = i;
    std::shuffle(ids.begin(), ids.end(), rng);
    std::copy(ids.begin(), ids.begin() + max_blocks, table.begin() + std::size_t(r) * max_blocks);
  }
  const int len_rows = c.lens_per_head ? batch * kv_heads : batch;
  std::vector<std::int32_t> lens(len_rows);
  for (int r = 0; r < len_rows; ++r) lens[r] = 1 + int(rng() % capacity);
  lens[len_rows - 1] = 0;  // an empty sequence (or head): output 0, log-sum-exp -inf
  auto table_row = [&](int b, int h) {
    return table.data() + (c.table_per_head ? (b * kv_heads + h) : b) * max_blocks;
  };
  auto len_of = [&](int b, int h) { return lens[c.lens_per_head ? b * kv_heads + h : b]; };
  // Query rows per sequence (their last tokens; at most the shortest of its heads' lengths) and
  // their offsets. Decode: one row each, sequence b's row at position len - 1.
  std::vector<int> rows(batch, 1);
  if (c.prefill) {
    const int wanted[3] = {70, 1, 5};
    for (int b = 0; b < batch; ++b) {
      int shortest = capacity;
      for (int h = 0; h < kv_heads; ++h) shortest = std::min(shortest, len_of(b, h));
      rows[b] = std::min(wanted[b], shortest);
    }
  }
  std::vector<std::int32_t> starts(batch + 1, 0);
  for (int b = 0; b < batch; ++b) starts[b + 1] = starts[b] + rows[b];
  const int total_rows = starts[batch];

  // Caches [num_blocks, block_size, kv_heads, dim] and the query [batch, q_heads, dim], as
  // floats rounded to the stored type (the reference reads the same values).
  const std::size_t cache_n = std::size_t(num_blocks) * block_size * kv_heads * dim;
  std::vector<float> kc(cache_n), vc(cache_n), q(std::size_t(total_rows) * q_heads * dim);
  for (float& x : kc) x = stored(c.dtype, uniform(rng));
  for (float& x : vc) x = stored(c.dtype, uniform(rng));
  for (float& x : q) x = stored(c.dtype, uniform(rng));
  const float scale = 1.0f / std::sqrt(float(dim));
  // Float8 caches: the bits of x / scale (round to nearest even, saturated), and the reference
  // reads bits * scale.
  const std::vector<float> k_scales = {0.01f, 0.0035f};
  const float v_scale = 0.006f;
  std::vector<std::uint8_t> kc8, vc8;
  if (c.fp8_cache) {
    auto quantise = [&](std::vector<float>& x, std::vector<std::uint8_t>& bits, bool per_head) {
      bits.resize(x.size());
      for (std::size_t i = 0; i < x.size(); ++i) {
        const float s = per_head ? k_scales[(i / dim) % kv_heads] : v_scale;
        bits[i] = __nv_cvt_float_to_fp8(x[i] / s, __NV_SATFINITE, __NV_E4M3);
        __nv_fp8_e4m3 f;
        f.__x = bits[i];
        x[i] = float(f) * s;
      }
    };
    quantise(kc, kc8, true);
    quantise(vc, vc8, false);
  }

  auto to_device = [&](const std::vector<float>& x) -> void* {
    if (c.dtype == DType::Float32) return device_copy(x);
    if (c.dtype == DType::BFloat16) {
      std::vector<__nv_bfloat16> h(x.size());
      for (std::size_t i = 0; i < x.size(); ++i) h[i] = __float2bfloat16(x[i]);
      return device_copy(h);
    }
    std::vector<__half> h(x.size());
    for (std::size_t i = 0; i < x.size(); ++i) h[i] = __float2half(x[i]);
    return device_copy(h);
  };
  void* d_q = to_device(q);
  void* d_kc = c.fp8_cache ? device_copy(kc8) : to_device(kc);
  void* d_vc = c.fp8_cache ? device_copy(vc8) : to_device(vc);
  float* d_k_scales = device_copy(k_scales);
  std::int32_t* d_table = device_copy(table);
  std::int32_t* d_lens = device_copy(lens);
  std::int32_t* d_starts = device_copy(starts);
  const std::size_t elem = c.dtype == DType::Float32 ? 4 : 2;
  const std::size_t out_n = std::size_t(total_rows) * q_heads * dim;
  void* d_out = nullptr;
  float* d_lse = nullptr;
  void* d_ws = nullptr;
  CUDA_OK(cudaMalloc(&d_out, out_n * elem));
  CUDA_OK(cudaMalloc(&d_lse, std::size_t(total_rows) * q_heads * sizeof(float)));
  CUDA_OK(cudaMemset(d_out, 0xff, out_n * elem));  // NaN in each type
  CUDA_OK(cudaMemset(d_lse, 0xff, std::size_t(total_rows) * q_heads * sizeof(float)));
  const std::size_t ws_bytes =
      tk::attention_workspace_bytes(c.num_splits, total_rows, q_heads, dim);
  if (c.num_splits > 1) CUDA_OK(cudaMalloc(&d_ws, ws_bytes));

  tk::PagedAttentionParams p;
  p.query_dtype = p.kv_dtype = p.out_dtype = c.dtype;
  if (c.fp8_cache) {
    p.kv_dtype = DType::Float8E4M3FN;
    p.k_scale.per_head = d_k_scales;
    p.v_scale.value = v_scale;
  }
  p.query = d_q;
  p.q_stride_batch = std::int64_t(q_heads) * dim;
  p.q_stride_head = dim;
  if (c.prefill) p.query_start_loc = d_starts;
  p.num_query_rows = total_rows;
  const std::int64_t token_stride = std::int64_t(kv_heads) * dim;
  p.key_cache = {d_kc, block_size * token_stride, token_stride, dim};
  p.value_cache = {d_vc, block_size * token_stride, token_stride, dim};
  p.block_table = d_table;
  p.block_table_stride_batch = c.table_per_head ? std::int64_t(kv_heads) * max_blocks : max_blocks;
  p.block_table_stride_head = c.table_per_head ? max_blocks : 0;
  p.max_blocks = max_blocks;
  p.seq_lens = d_lens;
  p.seq_lens_stride_batch = c.lens_per_head ? kv_heads : 1;
  p.seq_lens_stride_head = c.lens_per_head ? 1 : 0;
  p.out = d_out;
  p.out_stride_batch = std::int64_t(q_heads) * dim;
  p.out_stride_head = dim;
  p.lse = d_lse;
  p.lse_stride_batch = q_heads;
  p.lse_stride_head = 1;
  p.batch = batch;
  p.num_q_heads = q_heads;
  p.num_kv_heads = kv_heads;
  p.head_dim = dim;
  p.block_size = block_size;
  p.num_blocks = num_blocks;
  p.scale = scale;
  p.max_seq_len = capacity;
  p.num_splits = c.num_splits;
  p.workspace = d_ws;
  p.workspace_bytes = c.num_splits > 1 ? ws_bytes : 0;
  tk::cuda::paged_attention(p, 0);
  CUDA_OK(cudaDeviceSynchronize());

  std::vector<float> out(out_n), lse(std::size_t(total_rows) * q_heads);
  if (c.dtype == DType::Float32) {
    CUDA_OK(cudaMemcpy(out.data(), d_out, out_n * 4, cudaMemcpyDeviceToHost));
  } else if (c.dtype == DType::BFloat16) {
    std::vector<__nv_bfloat16> h(out_n);
    CUDA_OK(cudaMemcpy(h.data(), d_out, out_n * 2, cudaMemcpyDeviceToHost));
    for (std::size_t i = 0; i < out_n; ++i) out[i] = __bfloat162float(h[i]);
  } else {
    std::vector<__half> h(out_n);
    CUDA_OK(cudaMemcpy(h.data(), d_out, out_n * 2, cudaMemcpyDeviceToHost));
    for (std::size_t i = 0; i < out_n; ++i) out[i] = __half2float(h[i]);
  }
  CUDA_OK(cudaMemcpy(lse.data(), d_lse, lse.size() * 4, cudaMemcpyDeviceToHost));

  const double tol = c.dtype == DType::Float32 ? 1e-4 : 2e-2;
  double worst = 0.0, worst_lse = 0.0;
  int bad_empty = 0;
  for (int r = 0; r < total_rows; ++r) {
    const int b = int(std::upper_bound(starts.begin(), starts.end(), r) - starts.begin()) - 1;
    for (int h = 0; h < q_heads; ++h) {
      const int kvh = h / group;
      // Row r sees keys 0..its position (len - rows + i), none for an empty sequence.
      const int len = len_of(b, kvh) - rows[b] + (r - starts[b]) + 1;
      const std::int32_t* row = table_row(b, kvh);
      const float* qh = q.data() + (std::size_t(r) * q_heads + h) * dim;
      const float* got = out.data() + (std::size_t(r) * q_heads + h) * dim;
      const float got_lse = lse[std::size_t(r) * q_heads + h];
      if (len <= 0) {
        for (int d = 0; d < dim; ++d) bad_empty += got[d] != 0.0f;
        bad_empty += !(std::isinf(got_lse) && got_lse < 0);
        continue;
      }
      std::vector<double> s(len), acc(dim, 0.0);
      double mx = -std::numeric_limits<double>::infinity();
      for (int t = 0; t < len; ++t) {
        const std::size_t base =
            ((std::size_t(row[t / block_size]) * block_size + t % block_size) * kv_heads + kvh) *
            dim;
        double dot = 0.0;
        for (int d = 0; d < dim; ++d) dot += double(qh[d]) * kc[base + d];
        s[t] = dot * scale;
        mx = std::max(mx, s[t]);
      }
      double sum = 0.0;
      for (int t = 0; t < len; ++t) {
        const double w = std::exp(s[t] - mx);
        sum += w;
        const std::size_t base =
            ((std::size_t(row[t / block_size]) * block_size + t % block_size) * kv_heads + kvh) *
            dim;
        for (int d = 0; d < dim; ++d) acc[d] += w * vc[base + d];
      }
      for (int d = 0; d < dim; ++d) worst = std::max(worst, std::fabs(acc[d] / sum - got[d]));
      worst_lse = std::max(worst_lse, std::fabs(mx + std::log(sum) - got_lse));
    }
  }
  std::printf("paged_attention%s %s%s D=%d splits=%d table %s lens %s: max error %.2e, lse %.2e\n",
              c.prefill ? " prefill" : "",
              c.dtype == DType::Float32   ? "float32"
              : c.dtype == DType::Float16 ? "float16"
                                          : "bfloat16",
              c.fp8_cache ? " (float8 cache)" : "", dim, c.num_splits,
              c.table_per_head ? "per head" : "shared", c.lens_per_head ? "per head" : "shared",
              worst, worst_lse);
  CHECK(worst < tol);  // NaN compares false: an unwritten output fails here
  CHECK(worst_lse < tol);
  CHECK(bad_empty == 0);
  for (void* ptr : {d_q, d_kc, d_vc, static_cast<void*>(d_table), static_cast<void*>(d_lens),
                    static_cast<void*>(d_starts), d_out, static_cast<void*>(d_lse), d_ws,
                    static_cast<void*>(d_k_scales)}) {
    if (ptr) CUDA_OK(cudaFree(ptr));
  }
}

}  // namespace

int main() {
  if (tk::cuda::device_count() == 0) {
    std::printf("no CUDA device: skipped\n");
    return 77;
  }
  for (DType dtype : {DType::Float16, DType::Float32}) {
    const int dim = dtype == DType::Float16 ? 128 : 64;
    for (int splits : {1, 3}) {
      for (bool table_per_head : {false, true}) {
        for (bool lens_per_head : {false, true}) {
          for (bool prefill : {false, true}) {
            run_case({dtype, dim, splits, table_per_head, lens_per_head, prefill});
          }
        }
      }
    }
  }
  // Float8 caches: in decode the tensor-core kernel (float16 and bfloat16 queries, head_dim 128
  // and 64) and the CUDA-core kernel (float32 query; float16 at head_dim 96); in prefill the
  // CUDA-core kernel.
  for (int splits : {1, 3}) {
    for (bool table_per_head : {false, true}) {
      for (bool prefill : {false, true}) {
        run_case({DType::Float16, 128, splits, table_per_head, table_per_head, prefill, true});
        run_case({DType::Float16, 64, splits, table_per_head, false, prefill, true});
        run_case({DType::BFloat16, 128, splits, false, table_per_head, prefill, true});
        run_case({DType::BFloat16, 64, splits, table_per_head, table_per_head, prefill, true});
        run_case({DType::Float16, 96, splits, false, table_per_head, prefill, true});
        run_case({DType::Float32, 64, splits, table_per_head, false, prefill, true});
      }
    }
  }
  return test::exit_code();
}
