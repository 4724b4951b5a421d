// Times every prefill kernel configuration of configs.txt on issue 11's cases and checks each:
// against a float64 host reference on small ragged batches (plain causal, window + soft-cap,
// negative scale), and against the shipped configuration's output on the timed cases. Each head
// dim (64, 128, 256) is swept on its own, against its shipped configuration.
// Built and run by run.sh; the table prints last.

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "cuda/attention/params.cuh"
#include "sweep.cuh"

namespace {

namespace k = tinyserve::kernels::cuda;

#define CHECK(x)                                                                             \
  do {                                                                                       \
    cudaError_t e = (x);                                                                     \
    if (e != cudaSuccess) {                                                                  \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e)); \
      std::exit(1);                                                                          \
    }                                                                                        \
  } while (0)

constexpr int kQHeads = 32, kKvHeads = 8, kPage = 16;

struct Seq {
  int rows, prefix;
};

// Random normal-ish values (sum of four uniforms, unit variance) from a hash of the index.
__global__ void fill_random(__half* x, std::int64_t n, std::uint32_t seed) {
  for (std::int64_t i = blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x; i < n;
       i += std::int64_t(gridDim.x) * blockDim.x) {
    std::uint32_t h = std::uint32_t(i) * 2654435761u ^ seed ^ std::uint32_t(i >> 32) * 40503u;
    float sum = 0.0f;
    for (int r = 0; r < 4; ++r) {
      h ^= h >> 16;
      h *= 0x7feb352du;
      h ^= h >> 15;
      h *= 0x846ca68bu;
      h ^= h >> 16;
      sum += float(h >> 8) * (1.0f / 16777216.0f);
    }
    x[i] = __float2half((sum - 2.0f) * 1.7320508f);
  }
}

__global__ void fill_nan(__half* x, std::int64_t n) {
  for (std::int64_t i = blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x; i < n;
       i += std::int64_t(gridDim.x) * blockDim.x)
    x[i] = __ushort_as_half(0x7e00);
}

// max |a - b| into *result (as float bits; NaN anywhere gives +inf).
__global__ void max_abs_diff(const __half* a, const __half* b, std::int64_t n, unsigned* result) {
  float worst = 0.0f;
  for (std::int64_t i = blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x; i < n;
       i += std::int64_t(gridDim.x) * blockDim.x) {
    const float d = fabsf(__half2float(a[i]) - __half2float(b[i]));
    worst = d == d ? fmaxf(worst, d) : INFINITY;
  }
  atomicMax(result, __float_as_uint(worst));
}

// One batch on the device: paged K/V with pages in random physical order.
struct Batch {
  std::vector<Seq> seqs;
  std::vector<int> lens, qsl, table;
  int dim, max_pages = 0, num_blocks = 0, rows = 0;
  __half *q = nullptr, *kc = nullptr, *vc = nullptr;
  int *d_table = nullptr, *d_lens = nullptr, *d_qsl = nullptr;

  Batch(std::vector<Seq> s, int head_dim, std::uint32_t seed) : seqs(std::move(s)), dim(head_dim) {
    std::mt19937 rng(seed);
    qsl.push_back(0);
    for (const Seq& x : seqs) {
      lens.push_back(x.rows + x.prefix);
      max_pages = std::max(max_pages, (lens.back() + kPage - 1) / kPage);
      num_blocks += (lens.back() + kPage - 1) / kPage;
      qsl.push_back(qsl.back() + x.rows);
    }
    rows = qsl.back();
    std::vector<int> ids(num_blocks);
    std::iota(ids.begin(), ids.end(), 0);
    std::shuffle(ids.begin(), ids.end(), rng);
    table.assign(seqs.size() * max_pages, 0);
    int next = 0;
    for (size_t b = 0; b < seqs.size(); ++b)
      for (int pg = 0; pg < (lens[b] + kPage - 1) / kPage; ++pg)
        table[b * max_pages + pg] = ids[next++];
    const std::int64_t nq = std::int64_t(rows) * kQHeads * dim;
    const std::int64_t nkv = std::int64_t(num_blocks) * kPage * kKvHeads * dim;
    CHECK(cudaMalloc(&q, std::max<std::int64_t>(nq, 8) * 2));
    CHECK(cudaMalloc(&kc, nkv * 2));
    CHECK(cudaMalloc(&vc, nkv * 2));
    fill_random<<<1024, 256>>>(q, nq, seed * 3 + 1);
    fill_random<<<1024, 256>>>(kc, nkv, seed * 3 + 2);
    fill_random<<<1024, 256>>>(vc, nkv, seed * 3 + 3);
    CHECK(cudaMalloc(&d_table, table.size() * 4));
    CHECK(cudaMalloc(&d_lens, lens.size() * 4));
    CHECK(cudaMalloc(&d_qsl, qsl.size() * 4));
    CHECK(cudaMemcpy(d_table, table.data(), table.size() * 4, cudaMemcpyHostToDevice));
    CHECK(cudaMemcpy(d_lens, lens.data(), lens.size() * 4, cudaMemcpyHostToDevice));
    CHECK(cudaMemcpy(d_qsl, qsl.data(), qsl.size() * 4, cudaMemcpyHostToDevice));
    CHECK(cudaDeviceSynchronize());
  }
  ~Batch() {
    cudaFree(q), cudaFree(kc), cudaFree(vc), cudaFree(d_table), cudaFree(d_lens), cudaFree(d_qsl);
  }
  std::int64_t out_elems() const { return std::int64_t(rows) * kQHeads * dim; }
  // causal FLOPs as benchmarks/bench_prefill.py counts them
  double flops() const {
    double pairs = 0;
    for (const Seq& x : seqs)
      pairs += double(x.rows) * x.prefix + double(x.rows) * (x.rows + 1) / 2;
    return 4.0 * kQHeads * dim * pairs;
  }
};

struct Options {
  float scale = 0.0f;  // 0: 1 / sqrt(head_dim)
  float soft_cap = 0.0f;
  int window_left = -1;
};

// The launch as attention.cu's prefill_attention does it (one split).
float scale_of(const Options& o, int dim) {
  return o.scale != 0.0f ? o.scale : 1.0f / std::sqrt(float(dim));
}

void launch(const sweep::Config& c, const Batch& b, __half* out, const Options& o, cudaStream_t s) {
  const int dim = b.dim;
  tinyserve::kernels::PagedAttentionParams p;
  p.query_dtype = p.kv_dtype = p.out_dtype = tinyserve::DType::Float16;
  p.query = b.q;
  p.q_stride_batch = kQHeads * dim;
  p.q_stride_head = dim;
  p.query_start_loc = b.d_qsl;
  p.num_query_rows = b.rows;
  p.key_cache = {b.kc, kPage * kKvHeads * dim, kKvHeads * dim, dim};
  p.value_cache = {b.vc, kPage * kKvHeads * dim, kKvHeads * dim, dim};
  p.block_table = b.d_table;
  p.block_table_stride_batch = b.max_pages;
  p.max_blocks = b.max_pages;
  p.seq_lens = b.d_lens;
  p.out = out;
  p.out_stride_batch = kQHeads * dim;
  p.out_stride_head = dim;
  p.batch = int(b.seqs.size());
  p.num_q_heads = kQHeads;
  p.num_kv_heads = kKvHeads;
  p.head_dim = dim;
  p.block_size = kPage;
  p.num_blocks = b.num_blocks;
  p.scale = scale_of(o, dim);
  p.logits_soft_cap = o.soft_cap;
  p.window_left = o.window_left;
  const int group = kQHeads / kKvHeads;
  const int heads_per_cta = std::min(group, c.rows);
  k::PrefillArgs a{};
  a.a = k::make_decode_args(p, heads_per_cta);
  a.query_start_loc = b.d_qsl;
  a.batch = p.batch;
  a.num_query_rows = b.rows;
  a.positions = c.rows / heads_per_cta;
  a.heads_per_cta = heads_per_cta;
  const dim3 grid(unsigned(b.rows / a.positions + p.batch), unsigned(kKvHeads * a.a.head_tiles), 1);
  void* args[] = {&a};
  CHECK(cudaLaunchKernel(c.kernel, grid, dim3(c.threads), args, size_t(c.smem_bytes), s));
}

// float64 reference on the host from the device's fp16 inputs.
std::vector<double> reference(const Batch& b, const Options& o) {
  const int dim = b.dim;
  const float scale = scale_of(o, dim);
  const std::int64_t nkv = std::int64_t(b.num_blocks) * kPage * kKvHeads * dim;
  auto fetch = [](const __half* d, std::int64_t n) {
    std::vector<__half> h(n);
    CHECK(cudaMemcpy(h.data(), d, n * 2, cudaMemcpyDeviceToHost));
    std::vector<float> f(n);
    for (std::int64_t i = 0; i < n; ++i) f[i] = __half2float(h[i]);
    return f;
  };
  const std::vector<float> q = fetch(b.q, b.out_elems()), kc = fetch(b.kc, nkv),
                           vc = fetch(b.vc, nkv);
  std::vector<double> out(q.size(), 0.0);
  for (size_t s = 0; s < b.seqs.size(); ++s) {
    const int n = b.seqs[s].rows, len = b.lens[s];
    for (int j = 0; j < n; ++j) {
      const int row = b.qsl[s] + j, pos = len - n + j;
      for (int h = 0; h < kQHeads; ++h) {
        const int kvh = h / (kQHeads / kKvHeads);
        const int lo = o.window_left >= 0 ? std::max(0, pos - o.window_left) : 0;
        auto kv_row = [&](const std::vector<float>& c, int key) {
          const int blk = b.table[s * b.max_pages + key / kPage];
          return &c[((std::int64_t(blk) * kPage + key % kPage) * kKvHeads + kvh) * dim];
        };
        const float* qr = &q[(std::int64_t(row) * kQHeads + h) * dim];
        std::vector<double> logit(pos + 1 - lo);
        double mx = -INFINITY;
        for (int key = lo; key <= pos; ++key) {
          const float* kr = kv_row(kc, key);
          double dot = 0;
          for (int d = 0; d < dim; ++d) dot += double(qr[d]) * double(kr[d]);
          double x = dot * scale;
          if (o.soft_cap > 0) x = o.soft_cap * std::tanh(x / o.soft_cap);
          logit[key - lo] = x;
          mx = std::max(mx, x);
        }
        double sum = 0;
        for (double& x : logit) sum += (x = std::exp(x - mx));
        double* dst = &out[(std::int64_t(row) * kQHeads + h) * dim];
        for (int key = lo; key <= pos; ++key) {
          const float* vr = kv_row(vc, key);
          const double w = logit[key - lo] / sum;
          for (int d = 0; d < dim; ++d) dst[d] += w * double(vr[d]);
        }
      }
    }
  }
  return out;
}

double max_error(const __half* d_out, const std::vector<double>& ref) {
  std::vector<__half> out(ref.size());
  CHECK(cudaMemcpy(out.data(), d_out, out.size() * 2, cudaMemcpyDeviceToHost));
  double worst = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    const double d = std::fabs(double(__half2float(out[i])) - ref[i]);
    worst = d == d ? std::max(worst, d) : INFINITY;
  }
  return worst;
}

// The cases of issue 11 (and their names).
std::vector<std::pair<const char*, std::vector<Seq>>> timed_cases() {
  std::vector<std::pair<const char*, std::vector<Seq>>> cases = {
      {"8x4096 new", std::vector<Seq>(8, {4096, 0})},
      {"4x1024/16k", std::vector<Seq>(4, {1024, 16384})},
      {"1x2048/64k", {{2048, 65536}}},
      {"mixed", std::vector<Seq>(64, {1, 4096})},
  };
  cases[3].second.push_back({512, 4096});
  cases[3].second.push_back({512, 4096});
  return cases;
}

const double kTolerance = 1e-2;

// Checks and times the configurations of one head dim (the baseline first); appends a table row
// per configuration to `rows`.
void sweep_head_dim(int dim, const std::vector<sweep::Config>& configs, int reps,
                    cudaStream_t stream, std::vector<std::string>& rows) {
  // Correctness against float64 on a small ragged batch (decode rows, appends over prefixes,
  // prompts, rows around the 32/64-position and 32/64/128-key tile boundaries, a sequence with
  // no rows) under four logit options; timing on the issue's cases.
  const std::vector<Seq> small = {{1, 200}, {77, 130}, {64, 0},  {129, 63}, {33, 31}, {0, 10},
                                  {200, 0}, {1, 0},    {65, 64}, {31, 97},  {96, 191}};
  const Options variants[] = {{}, {0.09f, 10.0f, 37}, {-0.2f, 0.0f, -1}, {0.1f, 0.0f, 64}};
  Batch check_batch(small, dim, 7);
  std::vector<std::vector<double>> refs;
  for (const Options& o : variants) refs.push_back(reference(check_batch, o));
  __half* check_out;
  CHECK(cudaMalloc(&check_out, check_batch.out_elems() * 2));

  const auto cases = timed_cases();
  std::vector<Batch*> batches;
  std::vector<__half*> shipped_out(cases.size());
  __half* out;
  std::int64_t max_elems = 0;
  for (size_t ci = 0; ci < cases.size(); ++ci) {
    batches.push_back(new Batch(cases[ci].second, dim, 100 + unsigned(ci)));
    CHECK(cudaMalloc(&shipped_out[ci], batches[ci]->out_elems() * 2));
    max_elems = std::max(max_elems, batches[ci]->out_elems());
  }
  CHECK(cudaMalloc(&out, max_elems * 2));
  unsigned* d_diff;
  CHECK(cudaMalloc(&d_diff, 4));
  cudaEvent_t start, stop;
  CHECK(cudaEventCreate(&start));
  CHECK(cudaEventCreate(&stop));

  for (size_t i = 0; i < configs.size(); ++i) {
    const sweep::Config& c = configs[i];
    std::printf("running: %s\n", c.name.c_str());
    std::fflush(stdout);
    CHECK(
        cudaFuncSetAttribute(c.kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, c.smem_bytes));
    double worst_ref = 0.0, worst_shipped = 0.0;
    for (size_t v = 0; v < refs.size(); ++v) {
      fill_nan<<<256, 256, 0, stream>>>(check_out, check_batch.out_elems());
      launch(c, check_batch, check_out, variants[v], stream);
      CHECK(cudaStreamSynchronize(stream));
      worst_ref = std::max(worst_ref, max_error(check_out, refs[v]));
    }
    std::string row;
    char cell[96];
    std::snprintf(cell, sizeof cell, "%-30s %-40s", c.name.c_str(), c.shape.c_str());
    row += cell;
    for (size_t ci = 0; ci < cases.size(); ++ci) {
      const Batch& b = *batches[ci];
      __half* dst = i == 0 ? shipped_out[ci] : out;
      fill_nan<<<1024, 256, 0, stream>>>(dst, b.out_elems());
      for (int w = 0; w < 3; ++w) launch(c, b, dst, {}, stream);
      std::vector<float> times;
      for (int r = 0; r < reps; ++r) {
        CHECK(cudaEventRecord(start, stream));
        launch(c, b, dst, {}, stream);
        CHECK(cudaEventRecord(stop, stream));
        CHECK(cudaEventSynchronize(stop));
        float t;
        CHECK(cudaEventElapsedTime(&t, start, stop));
        times.push_back(t);
      }
      std::sort(times.begin(), times.end());
      const double ms = times[times.size() / 2];
      std::snprintf(cell, sizeof cell, " %5.0f (%7.3f)", b.flops() / (ms * 1e-3) / 1e12, ms);
      row += cell;
      if (i > 0) {
        CHECK(cudaMemsetAsync(d_diff, 0, 4, stream));
        max_abs_diff<<<1024, 256, 0, stream>>>(out, shipped_out[ci], b.out_elems(), d_diff);
        unsigned bits;
        CHECK(cudaMemcpy(&bits, d_diff, 4, cudaMemcpyDeviceToHost));
        float d;
        std::memcpy(&d, &bits, 4);
        worst_shipped = std::max(worst_shipped, double(d));
      }
      CHECK(cudaGetLastError());
    }
    const bool ok = worst_ref <= kTolerance && worst_shipped <= kTolerance;
    std::snprintf(cell, sizeof cell, " %8.1e %8.1e %4dK%s", worst_ref, worst_shipped,
                  c.smem_bytes / 1024, ok ? "" : "  WRONG");
    row += cell;
    std::printf("%s\n", row.c_str());
    rows.push_back(row);
  }

  for (Batch* b : batches) delete b;
  for (__half* x : shipped_out) cudaFree(x);
  cudaFree(out), cudaFree(check_out), cudaFree(d_diff);
  cudaEventDestroy(start), cudaEventDestroy(stop);
}

}  // namespace

int main(int argc, char** argv) {
  const int reps = argc > 1 ? std::atoi(argv[1]) : 20;
  // SWEEP_SKIP: names of configurations to leave out (run.sh sets it after a crash).
  const std::string skip = std::getenv("SWEEP_SKIP") ? std::getenv("SWEEP_SKIP") : "";
  std::vector<sweep::Config> configs;
  for (const auto& c : sweep::registry())
    if (skip.find(" " + c.name + " ") == std::string::npos) configs.push_back(c);
  cudaDeviceProp prop;
  CHECK(cudaGetDeviceProperties(&prop, 0));
  std::printf("device: %s, %d configurations, median of %d timed runs after 3 warm-up runs\n",
              prop.name, int(configs.size()), reps);
  cudaStream_t stream;
  CHECK(cudaStreamCreate(&stream));

  std::vector<std::string> rows;
  for (const int dim : {64, 128, 256}) {
    std::vector<sweep::Config> of_dim;
    for (const auto& c : configs)
      if (c.head_dim == dim) of_dim.push_back(c);
    if (of_dim.empty()) continue;
    std::stable_sort(of_dim.begin(), of_dim.end(),
                     [](const auto& x, const auto& y) { return x.baseline > y.baseline; });
    if (!of_dim[0].baseline) {
      std::fprintf(stderr, "no shipped configuration for head_dim %d\n", dim);
      return 1;
    }
    rows.push_back("head_dim " + std::to_string(dim) + " (against " + of_dim[0].name + ")");
    sweep_head_dim(dim, of_dim, reps, stream, rows);
  }

  std::printf(
      "\nTFLOP/s of causal attention (median ms); ref: max |err| against float64 on small "
      "ragged batches; shipped: max |diff| from the head dim's shipped configuration's output "
      "on the timed cases (WRONG: either above %.0e)\n",
      kTolerance);
  std::printf("%-30s %-40s", "config", "shape");
  for (const auto& cs : timed_cases()) std::printf(" %15s", cs.first);
  std::printf(" %8s %8s %5s\n", "ref", "shipped", "smem");
  for (const std::string& row : rows) std::printf("%s\n", row.c_str());
  return 0;
}
