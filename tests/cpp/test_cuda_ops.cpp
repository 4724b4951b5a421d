// Every CUDA kernel path driven from C++ (no Python), its results checked against the CPU
// backend on the same inputs. Small on purpose: it is the program compute-sanitizer (memcheck,
// racecheck) runs over. Exits 77 (skipped) where no CUDA device is visible.

#include <cuda_runtime.h>
#include <tinyserve/tinyserve.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "check.h"

using tinyserve::Device;
using tinyserve::DeviceType;
using tinyserve::DType;
using tinyserve::make_tensor;
using tinyserve::TensorView;

namespace {

const Device kCpu{DeviceType::CPU, 0};
const Device kGpu{DeviceType::CUDA, 0};

#define CUDA_OK(call)                                                                      \
  do {                                                                                     \
    cudaError_t err_ = (call);                                                             \
    if (err_ != cudaSuccess) {                                                             \
      std::printf("%s:%d: %s: %s\n", __FILE__, __LINE__, #call, cudaGetErrorString(err_)); \
      std::exit(1);                                                                        \
    }                                                                                      \
  } while (0)

std::uint16_t to_bits(float f, DType dtype) {
  std::uint32_t u;
  std::memcpy(&u, &f, 4);
  if (dtype == DType::BFloat16) return std::uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  // float16, normal range (the test data is N(0, 1)), round to nearest even
  const std::uint32_t sign = (u >> 16) & 0x8000u;
  const std::int32_t exp = std::int32_t((u >> 23) & 0xffu) - 127 + 15;
  if (exp <= 0) return std::uint16_t(sign);
  std::uint32_t mant = u & 0x7fffffu;
  std::uint32_t h = sign | (std::uint32_t(exp) << 10) | (mant >> 13);
  const std::uint32_t rest = mant & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;
  return std::uint16_t(h);
}

float from_bits(std::uint16_t b, DType dtype) {
  std::uint32_t u;
  if (dtype == DType::BFloat16) {
    u = std::uint32_t(b) << 16;
  } else {
    const std::uint32_t sign = std::uint32_t(b & 0x8000u) << 16;
    const std::uint32_t exp = (b >> 10) & 0x1fu, mant = b & 0x3ffu;
    if (exp == 0) {
      float f = std::ldexp(float(mant), -24);
      return sign ? -f : f;
    }
    u = exp == 31 ? (sign | 0x7f800000u | (mant << 13))
                  : (sign | ((exp + 112) << 23) | (mant << 13));
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Host data of one dtype, as bytes, with a device copy.
struct Buffer {
  std::vector<unsigned char> host;
  void* dev = nullptr;
  DType dtype;
  Buffer(std::size_t count, DType t) : host(count * tinyserve::dtype_size(t)), dtype(t) {
    CUDA_OK(cudaMalloc(&dev, host.size()));
  }
  ~Buffer() { cudaFree(dev); }
  std::size_t count() const { return host.size() / tinyserve::dtype_size(dtype); }
  void set(std::size_t i, float x) {
    if (dtype == DType::Float32) {
      std::memcpy(&host[i * 4], &x, 4);
    } else {
      std::uint16_t b = to_bits(x, dtype);
      std::memcpy(&host[i * 2], &b, 2);
    }
  }
  float get(std::size_t i) const {
    if (dtype == DType::Float32) {
      float x;
      std::memcpy(&x, &host[i * 4], 4);
      return x;
    }
    std::uint16_t b;
    std::memcpy(&b, &host[i * 2], 2);
    return from_bits(b, dtype);
  }
  void upload() { CUDA_OK(cudaMemcpy(dev, host.data(), host.size(), cudaMemcpyHostToDevice)); }
  std::vector<float> download() {
    std::vector<unsigned char> bytes(host.size());
    CUDA_OK(cudaMemcpy(bytes.data(), dev, bytes.size(), cudaMemcpyDeviceToHost));
    std::swap(bytes, host);
    std::vector<float> out(count());
    for (std::size_t i = 0; i < out.size(); ++i) out[i] = get(i);
    std::swap(bytes, host);
    return out;
  }
  std::vector<float> values() const {
    std::vector<float> out(count());
    for (std::size_t i = 0; i < out.size(); ++i) out[i] = get(i);
    return out;
  }
};

double rel_error(const std::vector<float>& a, const std::vector<float>& b) {
  double num = 0.0, den = 0.0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    if (std::isnan(a[i]) || std::isnan(b[i])) return INFINITY;
    num += (double(a[i]) - b[i]) * (double(a[i]) - b[i]);
    den += double(b[i]) * b[i];
  }
  return std::sqrt(num / (den > 0 ? den : 1.0));
}

double tolerance(DType t) { return t == DType::Float32 ? 1e-4 : t == DType::Float16 ? 4e-3 : 3e-2; }

struct AttentionCase {
  DType dtype;
  int head_dim, group, block_size;
  bool hnd;
  int num_splits;  // 0 = planned
  int window_left;
  float soft_cap;
  // With query_start_loc: a decode row, 40 rows appended over 660 cached tokens, a whole
  // 129-token prompt (170 query rows).
  bool prefill = false;
};

void run_attention(const AttentionCase& c, std::mt19937& gen) {
  std::normal_distribution<float> normal;
  const int batch = 3, kv_heads = 2, q_heads = kv_heads * c.group, D = c.head_dim;
  std::vector<std::int32_t> lens = {1, 700, 129};
  std::vector<std::int32_t> starts = {0, 1, 41, 170};
  const int rows = c.prefill ? starts.back() : batch;
  const int max_blocks = (700 + c.block_size - 1) / c.block_size + 1;
  const int num_blocks = batch * max_blocks;
  std::vector<std::int32_t> table(batch * max_blocks);
  std::vector<std::int32_t> perm(num_blocks);
  for (int i = 0; i < num_blocks; ++i) perm[i] = i;
  std::shuffle(perm.begin(), perm.end(), gen);
  for (std::size_t i = 0; i < table.size(); ++i) table[i] = perm[i];

  const std::size_t cache_count = std::size_t(num_blocks) * c.block_size * kv_heads * D;
  Buffer k(cache_count, c.dtype), v(cache_count, c.dtype), q(rows * q_heads * D, c.dtype);
  Buffer out(q.count(), c.dtype);
  Buffer lse(rows * q_heads, DType::Float32);
  for (std::size_t i = 0; i < cache_count; ++i) {
    k.set(i, normal(gen));
    v.set(i, normal(gen));
  }
  for (std::size_t i = 0; i < q.count(); ++i) q.set(i, normal(gen));
  k.upload();
  v.upload();
  q.upload();
  CUDA_OK(cudaMemset(out.dev, 0xff, out.host.size()));  // NaN poison
  CUDA_OK(cudaMemset(lse.dev, 0xff, lse.host.size()));
  std::int32_t *table_dev, *lens_dev, *starts_dev;
  CUDA_OK(cudaMalloc(&table_dev, table.size() * 4));
  CUDA_OK(cudaMalloc(&lens_dev, lens.size() * 4));
  CUDA_OK(cudaMalloc(&starts_dev, starts.size() * 4));
  CUDA_OK(cudaMemcpy(starts_dev, starts.data(), starts.size() * 4, cudaMemcpyHostToDevice));
  CUDA_OK(cudaMemcpy(table_dev, table.data(), table.size() * 4, cudaMemcpyHostToDevice));
  CUDA_OK(cudaMemcpy(lens_dev, lens.data(), lens.size() * 4, cudaMemcpyHostToDevice));

  auto cache_view = [&](void* data, Device dev) {
    if (!c.hnd) return make_tensor(data, c.dtype, dev, {num_blocks, c.block_size, kv_heads, D});
    return tinyserve::transpose(
        make_tensor(data, c.dtype, dev, {num_blocks, kv_heads, c.block_size, D}), 1, 2);
  };
  tinyserve::AttentionOptions opts;
  opts.num_splits = c.num_splits;
  opts.window_left = c.window_left;
  opts.logits_soft_cap = c.soft_cap;
  if (c.prefill) opts.query_start_loc = make_tensor(starts_dev, DType::Int32, kGpu, {batch + 1});
  auto qv = make_tensor(q.dev, c.dtype, kGpu, {rows, q_heads, D});
  auto tv = make_tensor(table_dev, DType::Int32, kGpu, {batch, max_blocks});
  tinyserve::AttentionPlan plan =
      tinyserve::plan_paged_attention(qv, cache_view(k.dev, kGpu), tv, opts);
  void* workspace = nullptr;
  if (plan.workspace_bytes > 0) {
    CUDA_OK(cudaMalloc(&workspace, plan.workspace_bytes));
    opts.workspace =
        make_tensor(workspace, DType::UInt8, kGpu, {std::int64_t(plan.workspace_bytes)});
  }
  opts.lse = make_tensor(lse.dev, DType::Float32, kGpu, {rows, q_heads});
  tinyserve::paged_attention(qv, cache_view(k.dev, kGpu), cache_view(v.dev, kGpu), tv,
                             make_tensor(lens_dev, DType::Int32, kGpu, {batch}),
                             make_tensor(out.dev, c.dtype, kGpu, {rows, q_heads, D}), opts);
  CUDA_OK(cudaDeviceSynchronize());
  std::vector<float> gpu_out = out.download(), gpu_lse = lse.download();

  // The CPU backend on the same bytes.
  Buffer cpu_out(out.count(), c.dtype);
  std::vector<float> cpu_lse(lse.count());
  tinyserve::AttentionOptions cpu_opts;
  cpu_opts.window_left = c.window_left;
  cpu_opts.logits_soft_cap = c.soft_cap;
  cpu_opts.lse = make_tensor(cpu_lse.data(), DType::Float32, kCpu, {rows, q_heads});
  if (c.prefill) cpu_opts.query_start_loc = make_tensor(starts.data(), DType::Int32, kCpu, {4});
  tinyserve::paged_attention(make_tensor(q.host.data(), c.dtype, kCpu, {rows, q_heads, D}),
                             cache_view(k.host.data(), kCpu), cache_view(v.host.data(), kCpu),
                             make_tensor(table.data(), DType::Int32, kCpu, {batch, max_blocks}),
                             make_tensor(lens.data(), DType::Int32, kCpu, {batch}),
                             make_tensor(cpu_out.host.data(), c.dtype, kCpu, {rows, q_heads, D}),
                             cpu_opts);
  const double err = rel_error(gpu_out, cpu_out.values());
  const double lse_err = rel_error(gpu_lse, cpu_lse);
  std::printf(
      "attention%s %s D=%d group=%d block=%d %s splits=%d(planned %d) window=%d cap=%g: "
      "rel err %.2e, lse %.2e\n",
      c.prefill ? " (prefill)" : "", tinyserve::dtype_name(c.dtype), D, c.group, c.block_size,
      c.hnd ? "HND" : "NHD", c.num_splits, plan.num_splits, c.window_left, c.soft_cap, err,
      lse_err);
  CHECK(err < tolerance(c.dtype));
  CHECK(lse_err < 1e-4);
  cudaFree(workspace);
  cudaFree(table_dev);
  cudaFree(lens_dev);
  cudaFree(starts_dev);
}

void test_attention(std::mt19937& gen) {
  const AttentionCase cases[] = {
      {DType::Float16, 128, 4, 16, false, 0, -1, 0.0f},
      {DType::Float16, 128, 4, 16, true, 5, -1, 0.0f},
      {DType::BFloat16, 64, 8, 1, false, 3, 100, 0.0f},
      {DType::BFloat16, 256, 1, 32, true, 0, -1, 20.0f},
      {DType::Float16, 128, 20, 16, false, 2, -1, 0.0f},      // two head tiles per KV head
      {DType::Float32, 80, 5, 7, false, 4, 50, 5.0f},         // generic kernel
      {DType::Float16, 96, 3, 16, true, 0, -1, 0.0f},         // generic kernel, 16-bit
      {DType::BFloat16, 512, 2, 16, false, 1, -1, 0.0f},      // generic kernel, widest head
      {DType::Float16, 128, 4, 16, true, 0, -1, 0.0f, true},  // prefill kernel
      {DType::Float32, 80, 5, 7, false, 3, 50, 5.0f, true},   // prefill: window, cap, no split
      {DType::BFloat16, 64, 1, 1, false, 0, 0, 0.0f, true},   // prefill: window 0, MHA, page 1
  };
  for (const AttentionCase& c : cases) run_attention(c, gen);
}

void test_reshape_and_cache(std::mt19937& gen) {
  std::normal_distribution<float> normal;
  const int n = 6, p = 16, h = 4, d = 128, tokens = 40;
  const std::size_t row = std::size_t(h) * d;
  Buffer key(tokens * row, DType::BFloat16), value(tokens * row, DType::BFloat16);
  Buffer key_cache(n * p * row, DType::BFloat16), value_cache(n * p * row, DType::BFloat16);
  for (Buffer* b : {&key, &value, &key_cache, &value_cache}) {
    for (std::size_t i = 0; i < b->count(); ++i) b->set(i, normal(gen));
    b->upload();
  }
  const std::vector<float> key_cache_before = key_cache.values();
  const std::vector<float> value_cache_before = value_cache.values();
  // distinct slots (7 is invertible mod n * p), every fifth token padding
  std::vector<std::int64_t> slots(tokens);
  for (int i = 0; i < tokens; ++i) slots[i] = i % 5 == 0 ? -1 : (i * 7) % (n * p);
  std::int64_t* slots_dev;
  CUDA_OK(cudaMalloc(&slots_dev, tokens * 8));
  CUDA_OK(cudaMemcpy(slots_dev, slots.data(), tokens * 8, cudaMemcpyHostToDevice));
  auto kcv = make_tensor(key_cache.dev, DType::BFloat16, kGpu, {n, p, h, d});
  auto vcv = make_tensor(value_cache.dev, DType::BFloat16, kGpu, {n, p, h, d});
  tinyserve::reshape_and_cache(make_tensor(key.dev, DType::BFloat16, kGpu, {tokens, h, d}),
                               make_tensor(value.dev, DType::BFloat16, kGpu, {tokens, h, d}), kcv,
                               vcv, make_tensor(slots_dev, DType::Int64, kGpu, {tokens}));
  CUDA_OK(cudaDeviceSynchronize());
  const std::vector<float> key_gpu = key_cache.download();
  const std::vector<float> value_gpu = value_cache.download();

  // Independent reference: each token's row lands in its slot of its own cache, the rest of both
  // caches is untouched.
  std::vector<float> key_expected = key_cache_before, value_expected = value_cache_before;
  const std::vector<float> key_in = key.values(), value_in = value.values();
  for (int t = 0; t < tokens; ++t) {
    if (slots[t] < 0) continue;
    std::copy_n(key_in.begin() + t * row, row, key_expected.begin() + slots[t] * row);
    std::copy_n(value_in.begin() + t * row, row, value_expected.begin() + slots[t] * row);
  }
  CHECK(key_gpu == key_expected);
  CHECK(value_gpu == value_expected);

  // The CPU backend on the host copies agrees.
  tinyserve::reshape_and_cache(
      make_tensor(key.host.data(), DType::BFloat16, kCpu, {tokens, h, d}),
      make_tensor(value.host.data(), DType::BFloat16, kCpu, {tokens, h, d}),
      make_tensor(key_cache.host.data(), DType::BFloat16, kCpu, {n, p, h, d}),
      make_tensor(value_cache.host.data(), DType::BFloat16, kCpu, {n, p, h, d}),
      make_tensor(slots.data(), DType::Int64, kCpu, {tokens}));
  CHECK(key_gpu == key_cache.values());
  CHECK(value_gpu == value_cache.values());

  // Out-of-range slots on the device: skipped, nothing written in either cache.
  std::vector<std::int64_t> bad = {n * p, -7, std::int64_t(1) << 40};
  CUDA_OK(cudaMemcpy(slots_dev, bad.data(), bad.size() * 8, cudaMemcpyHostToDevice));
  tinyserve::reshape_and_cache(make_tensor(key.dev, DType::BFloat16, kGpu, {3, h, d}),
                               make_tensor(value.dev, DType::BFloat16, kGpu, {3, h, d}), kcv, vcv,
                               make_tensor(slots_dev, DType::Int64, kGpu, {3}));
  CUDA_OK(cudaDeviceSynchronize());
  CHECK(key_cache.download() == key_gpu);
  CHECK(value_cache.download() == value_gpu);
  cudaFree(slots_dev);
}

void test_copy_and_swap(std::mt19937& gen) {
  std::normal_distribution<float> normal;
  const int n = 12, p = 8, h = 2, d = 64;
  Buffer a(n * p * h * d, DType::Float16), b(n * p * h * d, DType::Float32);
  for (std::size_t i = 0; i < a.count(); ++i) a.set(i, normal(gen));
  for (std::size_t i = 0; i < b.count(); ++i) b.set(i, normal(gen));
  a.upload();
  b.upload();
  std::vector<std::int32_t> src = {0, 5, 7, 11}, dst = {3, 1, 9, 2};
  std::int32_t* ids;
  CUDA_OK(cudaMalloc(&ids, 8 * 4));
  CUDA_OK(cudaMemcpy(ids, src.data(), 16, cudaMemcpyHostToDevice));
  CUDA_OK(cudaMemcpy(ids + 4, dst.data(), 16, cudaMemcpyHostToDevice));
  auto av = make_tensor(a.dev, DType::Float16, kGpu, {n, p, h, d});
  // b as a non-dense view: the first half of head_dim of a [n, p, h, 2 * 32] layout
  auto bv = make_tensor(b.dev, DType::Float32, kGpu, {n, p, h, d / 2}, {p * h * d, h * d, d, 1});
  tinyserve::copy_blocks({av, bv}, make_tensor(ids, DType::Int32, kGpu, {4}),
                         make_tensor(ids + 4, DType::Int32, kGpu, {4}));
  CUDA_OK(cudaDeviceSynchronize());
  std::vector<float> ga = a.download(), gb = b.download();
  tinyserve::copy_blocks({make_tensor(a.host.data(), DType::Float16, kCpu, {n, p, h, d}),
                          make_tensor(b.host.data(), DType::Float32, kCpu, {n, p, h, d / 2},
                                      {p * h * d, h * d, d, 1})},
                         make_tensor(src.data(), DType::Int32, kCpu, {4}),
                         make_tensor(dst.data(), DType::Int32, kCpu, {4}));
  CHECK(ga == a.values());
  CHECK(gb == b.values());

  // Swap out to pinned host memory and back, on a non-default stream.
  void* pinned;
  const std::size_t block_bytes = std::size_t(p) * h * d * 2;
  CUDA_OK(cudaMallocHost(&pinned, 4 * block_bytes));
  std::memset(pinned, 0, 4 * block_bytes);
  cudaStream_t stream;
  CUDA_OK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  std::vector<std::int32_t> out_src = {4, 5, 6, 10}, out_dst = {0, 1, 2, 3};
  auto pv = make_tensor(pinned, DType::Float16, Device{DeviceType::CUDAHost, 0}, {4, p, h, d});
  tinyserve::swap_blocks(av, pv, make_tensor(out_src.data(), DType::Int32, kCpu, {4}),
                         make_tensor(out_dst.data(), DType::Int32, kCpu, {4}),
                         reinterpret_cast<tinyserve::Stream>(stream));
  CUDA_OK(cudaStreamSynchronize(stream));
  for (int i = 0; i < 4; ++i) {
    CHECK(std::memcmp(static_cast<char*>(pinned) + out_dst[i] * block_bytes,
                      a.host.data() + out_src[i] * block_bytes, block_bytes) == 0);
  }
  std::vector<std::int32_t> in_dst = {0, 1, 2, 3};
  tinyserve::swap_blocks(pv, av, make_tensor(out_dst.data(), DType::Int32, kCpu, {4}),
                         make_tensor(in_dst.data(), DType::Int32, kCpu, {4}),
                         reinterpret_cast<tinyserve::Stream>(stream));
  CUDA_OK(cudaStreamSynchronize(stream));
  std::vector<unsigned char> now(a.host.size());
  CUDA_OK(cudaMemcpy(now.data(), a.dev, now.size(), cudaMemcpyDeviceToHost));
  for (int i = 0; i < 4; ++i) {
    CHECK(std::memcmp(now.data() + in_dst[i] * block_bytes,
                      a.host.data() + out_src[i] * block_bytes, block_bytes) == 0);
  }
  CUDA_OK(cudaStreamDestroy(stream));
  CUDA_OK(cudaFreeHost(pinned));
  cudaFree(ids);
}

// Pinned host memory is mapped, so swap_blocks runs the zero-copy kernel: captured in a graph it
// is kernel nodes only (one per launch of up to ~4,000 pairs), and replaying the graph moves
// 105-byte blocks (1-byte words: the host side starts at an odd address) exactly, both ways.
void test_zero_copy_swap(std::mt19937& gen) {
  const std::int64_t n_dev = 6000, n_host = 5000, pairs = 4100, block = 105;
  std::vector<std::uint8_t> dev_host(std::size_t(n_dev * block));
  std::uniform_int_distribution<int> byte(0, 255);
  for (auto& b : dev_host) b = std::uint8_t(byte(gen));
  void* dev;
  CUDA_OK(cudaMalloc(&dev, dev_host.size()));
  CUDA_OK(cudaMemcpy(dev, dev_host.data(), dev_host.size(), cudaMemcpyHostToDevice));
  void* pinned;
  CUDA_OK(cudaMallocHost(&pinned, std::size_t(n_host * block) + 1));
  auto* host = static_cast<std::uint8_t*>(pinned) + 1;
  std::memset(host, 0xAB, std::size_t(n_host * block));
  std::vector<std::int32_t> dev_ids(static_cast<std::size_t>(n_dev));
  std::vector<std::int32_t> host_ids(static_cast<std::size_t>(n_host));
  for (std::int32_t i = 0; i < n_dev; ++i) dev_ids[std::size_t(i)] = i;
  for (std::int32_t i = 0; i < n_host; ++i) host_ids[std::size_t(i)] = i;
  std::shuffle(dev_ids.begin(), dev_ids.end(), gen);
  std::shuffle(host_ids.begin(), host_ids.end(), gen);
  std::vector<std::int32_t> out_src(dev_ids.begin(), dev_ids.begin() + pairs);
  std::vector<std::int32_t> out_dst(host_ids.begin(), host_ids.begin() + pairs);
  std::vector<std::int32_t> back(dev_ids.end() - pairs, dev_ids.end());
  auto dv = make_tensor(dev, DType::UInt8, kGpu, {n_dev, 3, 5, 7});
  auto hv = make_tensor(host, DType::UInt8, Device{DeviceType::CUDAHost, 0}, {n_host, 3, 5, 7});
  auto ids = [](std::vector<std::int32_t>& v) {
    return make_tensor(v.data(), DType::Int32, kCpu, {std::int64_t(v.size())});
  };
  cudaStream_t stream;
  CUDA_OK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  cudaGraph_t graph;
  CUDA_OK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
  tinyserve::swap_blocks(dv, hv, ids(out_src), ids(out_dst),
                         reinterpret_cast<tinyserve::Stream>(stream));
  tinyserve::swap_blocks(hv, dv, ids(out_dst), ids(back),
                         reinterpret_cast<tinyserve::Stream>(stream));
  CUDA_OK(cudaStreamEndCapture(stream, &graph));
  std::size_t num_nodes = 0;
  CUDA_OK(cudaGraphGetNodes(graph, nullptr, &num_nodes));
  std::vector<cudaGraphNode_t> nodes(num_nodes);
  CUDA_OK(cudaGraphGetNodes(graph, nodes.data(), &num_nodes));
  CHECK(num_nodes == 4);  // 4,100 pairs: two launches each way
  for (cudaGraphNode_t node : nodes) {
    cudaGraphNodeType type;
    CUDA_OK(cudaGraphNodeGetType(node, &type));
    CHECK(type == cudaGraphNodeTypeKernel);
  }
  cudaGraphExec_t exec;
  CUDA_OK(cudaGraphInstantiate(&exec, graph, 0));
  CUDA_OK(cudaGraphLaunch(exec, stream));
  CUDA_OK(cudaStreamSynchronize(stream));
  std::vector<std::uint8_t> host_expect(std::size_t(n_host * block), 0xAB);
  std::vector<std::uint8_t> dev_expect = dev_host;
  for (std::int64_t i = 0; i < pairs; ++i) {
    const std::uint8_t* from = dev_host.data() + out_src[std::size_t(i)] * block;
    std::copy(from, from + block, host_expect.begin() + out_dst[std::size_t(i)] * block);
    std::copy(from, from + block, dev_expect.begin() + back[std::size_t(i)] * block);
  }
  CHECK(std::memcmp(host, host_expect.data(), host_expect.size()) == 0);
  std::vector<std::uint8_t> dev_now(dev_host.size());
  CUDA_OK(cudaMemcpy(dev_now.data(), dev, dev_now.size(), cudaMemcpyDeviceToHost));
  CHECK(dev_now == dev_expect);
  CUDA_OK(cudaGraphExecDestroy(exec));
  CUDA_OK(cudaGraphDestroy(graph));
  CUDA_OK(cudaStreamDestroy(stream));
  CUDA_OK(cudaFreeHost(pinned));
  CUDA_OK(cudaFree(dev));
}

// A CachePool on the device (CUDA virtual memory): copy_blocks over all of its tensors against
// the CPU backend, then shrink (the kept blocks intact, the freed bytes back in cudaMemGetInfo)
// and grow again.
void test_cache_pool(std::mt19937& gen) {
  std::normal_distribution<float> normal;
  tinyserve::CachePoolConfig config;
  config.num_layers = 2;
  // 8 KiB blocks: 1024 of them span four 2 MiB granules per tensor, so the shrink below frees
  // whole granules whatever the device's granularity up to 2 MiB.
  config.max_blocks = 1024;
  config.block_size = 16;
  config.num_kv_heads = 2;
  config.head_dim = 64;
  config.dtype = DType::Float32;
  config.device = kGpu;
  config.page_meta = true;
  tinyserve::CachePool pool(config);
  const std::int64_t n = 800;
  pool.grow(n);
  pool.check();
  std::vector<TensorView> dev = pool.tensors();
  std::vector<std::vector<float>> host(dev.size());
  std::vector<TensorView> cpu;
  for (std::size_t t = 0; t < dev.size(); ++t) {
    host[t].resize(std::size_t(dev[t].numel()));
    for (float& x : host[t]) x = normal(gen);
    CUDA_OK(cudaMemcpy(dev[t].data, host[t].data(), host[t].size() * 4, cudaMemcpyHostToDevice));
    TensorView c = dev[t];
    c.data = host[t].data();
    c.device = kCpu;
    cpu.push_back(c);
  }
  std::vector<std::int32_t> src = {199, 150, 3}, dst = {0, 7, 120};
  std::int32_t* ids;
  CUDA_OK(cudaMalloc(&ids, 6 * 4));
  CUDA_OK(cudaMemcpy(ids, src.data(), 12, cudaMemcpyHostToDevice));
  CUDA_OK(cudaMemcpy(ids + 3, dst.data(), 12, cudaMemcpyHostToDevice));
  tinyserve::copy_blocks(dev, make_tensor(ids, DType::Int32, kGpu, {3}),
                         make_tensor(ids + 3, DType::Int32, kGpu, {3}));
  tinyserve::copy_blocks(cpu, make_tensor(src.data(), DType::Int32, kCpu, {3}),
                         make_tensor(dst.data(), DType::Int32, kCpu, {3}));
  CUDA_OK(cudaDeviceSynchronize());
  for (std::size_t t = 0; t < dev.size(); ++t) {
    std::vector<float> got(host[t].size());
    CUDA_OK(cudaMemcpy(got.data(), dev[t].data, got.size() * 4, cudaMemcpyDeviceToHost));
    CHECK(got == host[t]);
  }

  std::size_t free_before = 0, free_after = 0, total = 0;
  const std::size_t mapped_before = pool.mapped_bytes();
  CUDA_OK(cudaMemGetInfo(&free_before, &total));
  pool.shrink(10);
  CUDA_OK(cudaMemGetInfo(&free_after, &total));
  pool.check();
  const std::size_t freed = mapped_before - pool.mapped_bytes();
  CHECK(freed > 0);
  const std::size_t shown = free_after - free_before;
  CHECK((shown > freed ? shown - freed : freed - shown) < pool.granule_bytes());
  pool.grow(256);
  pool.check();
  dev = pool.tensors();
  for (std::size_t t = 0; t < dev.size(); ++t) {
    const std::size_t kept = std::size_t(dev[t].strides[0]) * 10;
    std::vector<float> got(kept);
    CUDA_OK(cudaMemcpy(got.data(), dev[t].data, kept * 4, cudaMemcpyDeviceToHost));
    CHECK(std::equal(got.begin(), got.end(), host[t].begin()));
  }
  cudaFree(ids);
}

}  // namespace

int main() {
  if (tinyserve::cuda_device_count() == 0) {
    std::printf("no CUDA device: skipped\n");
    return 77;
  }
  std::mt19937 gen(20261122);
  test_attention(gen);
  test_reshape_and_cache(gen);
  test_copy_and_swap(gen);
  test_zero_copy_swap(gen);
  test_cache_pool(gen);
  return test::exit_code();
}
