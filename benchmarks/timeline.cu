// Where the decode kernel's time goes: every CTA of the tensor-core decode kernel and of the split
// merge records globaltimer stamps (start, first tile landed, loop done, end; merge start, wait
// done, end), and this tool prints their distribution for the benchmark's shapes (float16, 32
// query heads, 8 KV heads, head_dim 128, page size 16, pages in random order), next to the
// call's time (CUDA events: one by one, and replayed from a graph of 10 calls) and a read
// ceiling measured here. A diagnostic, not a benchmark of record: it compiles the decode kernel
// with the timeline switch on.
//
//   nvcc -std=c++17 -O3 -arch=sm_90 --expt-relaxed-constexpr -DTS_DIAG_TIMELINE=1 -Iinclude \
//     -Isrc benchmarks/timeline.cu src/cuda/runtime.cu -o /tmp/timeline && /tmp/timeline
//
// Extra -D flags (TS_SPLIT_STAGES_D128, ...) select kernel variants as in the library build.

#include <algorithm>
#include <cstdio>
#include <numeric>
#include <random>
#include <vector>

#include "cuda/attention.cu"

namespace {

using tinyserve::DType;
namespace tk = tinyserve::kernels;

#define CK(x)                                                                                 \
  do {                                                                                        \
    cudaError_t e_ = (x);                                                                     \
    if (e_ != cudaSuccess) {                                                                  \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_)); \
      std::exit(1);                                                                           \
    }                                                                                         \
  } while (0)

__global__ void fill_half(__half* x, std::size_t n, unsigned seed) {
  for (std::size_t i = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x; i < n;
       i += std::size_t(gridDim.x) * blockDim.x) {
    unsigned h = unsigned(i) * 2654435761u ^ seed;
    h ^= h >> 15;
    h *= 2246822519u;
    h ^= h >> 13;
    x[i] = __float2half(float(h & 0xffff) / 32768.0f - 1.0f);
  }
}

__global__ void read_all(const uint4* __restrict__ x, std::size_t n, unsigned* out) {
  unsigned acc = 0;
  const std::size_t stride = std::size_t(gridDim.x) * blockDim.x;
  std::size_t i = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x;
  for (; i + 3 * stride < n; i += 4 * stride) {
    const uint4 a = __ldcs(x + i), b = __ldcs(x + i + stride), c = __ldcs(x + i + 2 * stride),
                d = __ldcs(x + i + 3 * stride);
    acc ^= a.x ^ a.w ^ b.y ^ b.z ^ c.x ^ c.w ^ d.y ^ d.z;
  }
  for (; i < n; i += stride) acc ^= __ldcs(x + i).x;
  if (acc == 0x9e3779b9u) atomicAdd(out, 1u);
}

// Median over `iters` samples of the time between two events around f() on `stream`.
template <class F>
float median_ms(F&& f, int iters, cudaStream_t stream = nullptr) {
  cudaEvent_t a, b;
  CK(cudaEventCreate(&a));
  CK(cudaEventCreate(&b));
  std::vector<float> t;
  for (int i = 0; i < iters; ++i) {
    CK(cudaEventRecord(a, stream));
    f();
    CK(cudaEventRecord(b, stream));
    CK(cudaEventSynchronize(b));
    float ms = 0;
    CK(cudaEventElapsedTime(&ms, a, b));
    t.push_back(ms);
  }
  CK(cudaEventDestroy(a));
  CK(cudaEventDestroy(b));
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

double pct(std::vector<double> v, double q) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[std::min(v.size() - 1, std::size_t(q * (v.size() - 1) + 0.5))];
}

}  // namespace

int main() {
  int sms = 0;
  CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  cudaDeviceProp prop{};
  CK(cudaGetDeviceProperties(&prop, 0));
  std::printf("device: %s, %d SMs\n", prop.name, sms);

  // Read ceiling: 4 GiB of 16-byte streaming loads, the best of three launch shapes.
  double ceiling = 0;
  {
    const std::size_t bytes = std::size_t(4) << 30;
    uint4* x;
    unsigned* out;
    CK(cudaMalloc(&x, bytes));
    CK(cudaMalloc(&out, 4));
    CK(cudaMemset(x, 1, bytes));
    for (int per_sm : {2, 4, 8}) {
      auto f = [&] { read_all<<<sms * per_sm, 512>>>(x, bytes / 16, out); };
      for (int i = 0; i < 3; ++i) f();
      ceiling = std::max(ceiling, bytes / (median_ms(f, 15) * 1e-3));
    }
    CK(cudaFree(x));
    CK(cudaFree(out));
  }
  std::printf("read ceiling %.2f TB/s\n\n", ceiling / 1e12);

  const int hq = 32, hk = 8, dim = 128, bs = 16;
  const int shapes[][2] = {{64, 4096}, {8, 32768}, {1, 131072}, {256, 1024}};
  std::mt19937 rng(7);
  std::printf("%-12s %6s %5s | %8s %8s %6s | %s\n", "shape", "splits", "CTAs", "eager", "graph",
              "%ceil", "timeline (us from the first CTA start: median / p90 / max unless noted)");
  for (const auto& shape : shapes) {
    const int batch = shape[0], ctx = shape[1];
    const int blocks_per_seq = ctx / bs;
    const std::int64_t num_blocks = std::int64_t(batch) * blocks_per_seq;
    const std::size_t cache_elems = std::size_t(num_blocks) * bs * hk * dim;
    __half *k, *v, *q, *o;
    std::int32_t *table, *lens;
    CK(cudaMalloc(&k, cache_elems * 2));
    CK(cudaMalloc(&v, cache_elems * 2));
    CK(cudaMalloc(&q, std::size_t(batch) * hq * dim * 2));
    CK(cudaMalloc(&o, std::size_t(batch) * hq * dim * 2));
    fill_half<<<1024, 256>>>(k, cache_elems, 1);
    fill_half<<<1024, 256>>>(v, cache_elems, 2);
    fill_half<<<64, 256>>>(q, std::size_t(batch) * hq * dim, 3);
    std::vector<std::int32_t> ids(num_blocks);
    std::iota(ids.begin(), ids.end(), 0);
    std::shuffle(ids.begin(), ids.end(), rng);
    std::vector<std::int32_t> hlens(batch, ctx);
    CK(cudaMalloc(&table, ids.size() * 4));
    CK(cudaMalloc(&lens, batch * 4));
    CK(cudaMemcpy(table, ids.data(), ids.size() * 4, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(lens, hlens.data(), batch * 4, cudaMemcpyHostToDevice));

    tk::PagedAttentionParams p;
    p.dtype = DType::Float16;
    p.query = q;
    p.q_stride_batch = hq * dim;
    p.q_stride_head = dim;
    for (auto* c : {&p.key_cache, &p.value_cache}) {
      c->stride_block = std::int64_t(bs) * hk * dim;
      c->stride_token = hk * dim;
      c->stride_head = dim;
    }
    p.key_cache.data = k;
    p.value_cache.data = v;
    p.block_table = table;
    p.block_table_stride = blocks_per_seq;
    p.max_blocks = blocks_per_seq;
    p.seq_lens = lens;
    p.out = o;
    p.out_stride_batch = hq * dim;
    p.out_stride_head = dim;
    p.batch = batch;
    p.num_q_heads = hq;
    p.num_kv_heads = hk;
    p.head_dim = dim;
    p.block_size = bs;
    p.num_blocks = num_blocks;
    p.scale = 1.0f / std::sqrt(float(dim));
    p.max_seq_len = ctx;
    p.num_splits = tk::cuda::plan_attention_splits(0, DType::Float16, batch, hq, hk, dim, ctx);
    p.workspace_bytes = tk::attention_workspace_bytes(p.num_splits, batch, hq, dim);
    void* ws = nullptr;
    if (p.num_splits > 1) CK(cudaMalloc(&ws, p.workspace_bytes));
    p.workspace = ws;

    cudaStream_t stream;
    CK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    auto call = [&] { tk::cuda::paged_attention(p, reinterpret_cast<tinyserve::Stream>(stream)); };
    for (int i = 0; i < 10; ++i) call();
    CK(cudaStreamSynchronize(stream));
    // Eager: one call per event pair; graph: a graph of 10 calls, replayed.
    const float eager_ms = median_ms(call, 50, stream);
    cudaGraph_t graph;
    cudaGraphExec_t exec;
    CK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
    for (int i = 0; i < 10; ++i) call();
    CK(cudaStreamEndCapture(stream, &graph));
    CK(cudaGraphInstantiate(&exec, graph, 0));
    CK(cudaGraphLaunch(exec, stream));
    const float graph_ms = median_ms([&] { CK(cudaGraphLaunch(exec, stream)); }, 20, stream) / 10;

    // Timeline of the last of three back-to-back calls.
    static unsigned long long host[kDiagMaxCtas][5], merge_host[kDiagMaxCtas][5];
    std::vector<unsigned long long> zeros(std::size_t(kDiagMaxCtas) * 5, 0);  // fits both
    CK(cudaMemcpyToSymbol(ts_diag_timeline, zeros.data(), sizeof(host)));
    CK(cudaMemcpyToSymbol(ts_diag_merge_timeline, zeros.data(), sizeof(merge_host)));
    for (int i = 0; i < 3; ++i) call();
    CK(cudaStreamSynchronize(stream));
    CK(cudaMemcpyFromSymbol(host, ts_diag_timeline, sizeof(host)));
    CK(cudaMemcpyFromSymbol(merge_host, ts_diag_merge_timeline, sizeof(merge_host)));
    const int ctas = hk * p.num_splits * batch;  // 16 query heads per CTA: one tile per KV head
    unsigned long long t0 = ~0ull;
    for (int c = 0; c < ctas; ++c) t0 = std::min(t0, host[c][0]);
    std::vector<double> start, first, loop, epi, end;
    std::vector<int> per_sm(sms, 0);
    for (int c = 0; c < ctas; ++c) {
      start.push_back((host[c][0] - t0) * 1e-3);
      first.push_back((host[c][1] - host[c][0]) * 1e-3);
      loop.push_back((host[c][2] - host[c][1]) * 1e-3);
      epi.push_back((host[c][3] - host[c][2]) * 1e-3);
      end.push_back((host[c][3] - t0) * 1e-3);
      if (host[c][4] < unsigned(sms)) per_sm[host[c][4]]++;
    }
    const double bytes = 2.0 * batch * ctx * hk * dim * 2;
    const double dec_end = pct(end, 1.0);
    std::printf(
        "(%d,%d) %6d %5d | %6.1fus %6.1fus %5.1f%% | span %.1f us (%.1f%% of the ceiling "
        "within the span)\n",
        batch, ctx, p.num_splits, ctas, eager_ms * 1e3, graph_ms * 1e3,
        100 * bytes / (graph_ms * 1e-3) / ceiling, dec_end,
        100 * bytes / (dec_end * 1e-6) / ceiling);
    std::printf(
        "    start %.2f/%.2f/%.2f  first tile %.2f/%.2f/%.2f  loop min %.1f med %.1f max "
        "%.1f  epilogue %.2f/%.2f/%.2f  end min %.1f med %.1f p90 %.1f max %.1f\n",
        pct(start, .5), pct(start, .9), pct(start, 1), pct(first, .5), pct(first, .9),
        pct(first, 1), pct(loop, 0), pct(loop, .5), pct(loop, 1), pct(epi, .5), pct(epi, .9),
        pct(epi, 1), pct(end, 0), pct(end, .5), pct(end, .9), dec_end);
    const int lo = *std::min_element(per_sm.begin(), per_sm.end());
    const int hi = *std::max_element(per_sm.begin(), per_sm.end());
    std::printf("    CTAs per SM %d..%d", lo, hi);
    if (p.num_splits > 1) {
      const int mctas = batch * hq;
      std::vector<double> ms, mw, me, ml, mg;
      for (int c = 0; c < mctas; ++c) {
        ms.push_back((double(merge_host[c][0]) - double(t0)) * 1e-3);
        mw.push_back((double(merge_host[c][1]) - double(t0)) * 1e-3);
        me.push_back((double(merge_host[c][2]) - double(t0)) * 1e-3);
        ml.push_back((double(merge_host[c][3]) - double(t0)) * 1e-3);
        mg.push_back((double(merge_host[c][4]) - double(t0)) * 1e-3);
      }
      std::printf(
          "  merge: start min %.1f max %.1f, wait done min %.1f max %.1f, thread 0 "
          "loaded max %.1f, groups met max %.1f, end max %.1f (%.1f us after the last "
          "decode CTA)",
          pct(ms, 0), pct(ms, 1), pct(mw, 0), pct(mw, 1), pct(ml, 1), pct(mg, 1), pct(me, 1),
          pct(me, 1) - dec_end);
    }
    std::printf("\n");
    CK(cudaGraphExecDestroy(exec));
    CK(cudaGraphDestroy(graph));
    CK(cudaStreamDestroy(stream));
    for (void* ptr : {(void*)k, (void*)v, (void*)q, (void*)o, (void*)table, (void*)lens, ws}) {
      if (ptr) CK(cudaFree(ptr));
    }
  }
  return 0;
}
