// CPU paged decode attention: the reference the other backends are checked against, and a
// usable backend. One task per (sequence, KV head, split): all query heads of a GQA group share
// each key and value row while it is in cache. Online softmax in float32 over tiles of tokens;
// splits of one sequence are merged through their log-sum-exp.

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "core/kernels.h"
#include "cpu/dtypes.h"
#include "cpu/parallel.h"
#include "cpu/simd.h"

namespace tinyserve::kernels::cpu {
namespace {

using tinyserve::cpu::bfloat16_t;
using tinyserve::cpu::from_float;
using tinyserve::cpu::half_t;
using tinyserve::cpu::parallel_for;
using tinyserve::cpu::to_float;
namespace simd = tinyserve::cpu::simd;

constexpr int kTile = 32;  // tokens scored before each softmax update
constexpr int kAhead = 8;  // tokens between a key row's prefetch and its use
constexpr int kStep = 4;   // tokens scored per call
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// The token range [begin, end) that split `split` of sequence b reads.
struct Range {
  std::int64_t begin, end;
};

Range split_range(const PagedAttentionParams& p, int b, int split) {
  std::int64_t len = std::max(0, p.seq_lens[b]);
  std::int64_t first = 0;
  if (p.window_left >= 0) first = std::max<std::int64_t>(0, len - 1 - p.window_left);
  std::int64_t n = len - first;
  std::int64_t chunk = (n + p.num_splits - 1) / p.num_splits;
  std::int64_t begin = std::min(len, first + split * chunk);
  std::int64_t end = std::min(len, begin + chunk);
  return {begin, end};
}

template <class T>
const T* row(const CacheDesc& c, const PagedAttentionParams& p, const std::int32_t* table,
             std::int64_t token, int kv_head) {
  std::int64_t block = table[token / p.block_size];
  return static_cast<const T*>(c.data) + block * c.stride_block +
         (token % p.block_size) * c.stride_token + std::int64_t(kv_head) * c.stride_head;
}

// Software prefetch of a whole K or V row into cache. Rows of one KV head sit a token stride
// apart (4 KB and more in NHD caches) on pages in random order, so the hardware prefetchers,
// which follow sequential streams within a 4 KB page, do not fetch them ahead; without this each
// row is a demand miss paid at full memory latency.
inline void prefetch_row(const void* row, std::size_t bytes) {
#if defined(__GNUC__) || defined(__clang__)
  const char* p = static_cast<const char*>(row);
  for (std::size_t off = 0; off < bytes; off += 64) __builtin_prefetch(p + off);
#else
  (void)row;
  (void)bytes;
#endif
}

// Row t of a tile as float32: float32 rows are used in place, 16-bit rows converted into row t
// of `tile` (kTile x n).
template <class T>
const float* as_float(const T* src, int n, std::vector<float>& tile, int t) {
  if constexpr (std::is_same_v<T, float>) {
    (void)n;
    (void)tile;
    (void)t;
    return src;
  } else {
    float* dst = tile.data() + std::size_t(t) * n;
    for (int i = 0; i < n; ++i) dst[i] = to_float(src[i]);
    return dst;
  }
}

// Attention of the `group` query heads of one KV head over tokens [r.begin, r.end). Writes the
// normalised output (float32, group x head_dim) and the log-sum-exp per head.
template <class T>
void attend(const PagedAttentionParams& p, int b, int kv_head, Range r, float* out, float* lse) {
  const int D = p.head_dim;
  const int group = p.num_q_heads / p.num_kv_heads;
  const std::int32_t* table = p.block_table + std::int64_t(b) * p.block_table_stride;
  std::vector<float> q(std::size_t(group) * D);
  std::vector<float> acc(std::size_t(group) * D, 0.0f), scores(std::size_t(group) * kTile);
  std::vector<float> m(group, kNegInf), l(group, 0.0f);
  // The tile's rows as float32: pointers into the cache for float32, else into these copies.
  const float* krows[kTile];
  const float* vrows[kTile];
  std::vector<float> kbuf, vbuf;
  if constexpr (!std::is_same_v<T, float>) {
    kbuf.resize(std::size_t(kTile) * D);
    vbuf.resize(std::size_t(kTile) * D);
  }
  for (int g = 0; g < group; ++g) {
    const T* qrow = static_cast<const T*>(p.query) + std::int64_t(b) * p.q_stride_batch +
                    std::int64_t(kv_head * group + g) * p.q_stride_head;
    for (int d = 0; d < D; ++d) q[std::size_t(g) * D + d] = to_float(qrow[d]);
  }
  const float cap = p.logits_soft_cap;
  const std::size_t row_bytes = std::size_t(D) * sizeof(T);
  for (std::int64_t t = r.begin; t < std::min(r.end, r.begin + kAhead); ++t) {
    prefetch_row(row<T>(p.key_cache, p, table, t, kv_head), row_bytes);
  }
  for (std::int64_t t0 = r.begin; t0 < r.end; t0 += kTile) {
    const int n = int(std::min<std::int64_t>(kTile, r.end - t0));
    // Scores in steps of kStep tokens, so that the prefetches are spread over the computation:
    // issued all at once, they would stall the core until most of them had arrived.
    for (int t1 = 0; t1 < n; t1 += kStep) {
      const int n1 = std::min(kStep, n - t1);
      for (int t = t1; t < t1 + n1; ++t) {
        // The key row kAhead tokens on, and this token's value row, used after the tile's scores.
        if (t0 + t + kAhead < r.end) {
          prefetch_row(row<T>(p.key_cache, p, table, t0 + t + kAhead, kv_head), row_bytes);
        }
        prefetch_row(row<T>(p.value_cache, p, table, t0 + t, kv_head), row_bytes);
        krows[t] = as_float(row<T>(p.key_cache, p, table, t0 + t, kv_head), D, kbuf, t);
      }
      simd::dot_rows(q.data(), group, krows + t1, n1, D, scores.data() + t1, kTile);
    }
    for (int g = 0; g < group; ++g) {
      float* s = scores.data() + std::size_t(g) * kTile;
      for (int t = 0; t < n; ++t) {
        s[t] *= p.scale;
        if (cap > 0.0f) s[t] = cap * std::tanh(s[t] / cap);
      }
      float tile_max = *std::max_element(s, s + n);
      float m_new = std::max(m[g], tile_max);
      float correction = std::exp(m[g] - m_new);  // exp(-inf) = 0 on the first tile
      float sum = 0.0f;
      for (int t = 0; t < n; ++t) {
        s[t] = std::exp(s[t] - m_new);
        sum += s[t];
      }
      l[g] = l[g] * correction + sum;
      m[g] = m_new;
      if (correction != 1.0f) simd::scale(acc.data() + std::size_t(g) * D, correction, D);
    }
    for (int t = 0; t < n; ++t) {
      vrows[t] = as_float(row<T>(p.value_cache, p, table, t0 + t, kv_head), D, vbuf, t);
    }
    simd::axpy_rows(acc.data(), group, scores.data(), kTile, vrows, n, D);
  }
  for (int g = 0; g < group; ++g) {
    float inv = l[g] > 0.0f ? 1.0f / l[g] : 0.0f;
    for (int d = 0; d < D; ++d) out[std::size_t(g) * D + d] = acc[std::size_t(g) * D + d] * inv;
    lse[g] = l[g] > 0.0f ? m[g] + std::log(l[g]) : kNegInf;
  }
}

template <class T>
void store(const PagedAttentionParams& p, int b, int h, const float* o, float lse) {
  T* dst = static_cast<T*>(p.out) + std::int64_t(b) * p.out_stride_batch +
           std::int64_t(h) * p.out_stride_head;
  for (int d = 0; d < p.head_dim; ++d) dst[d] = from_float<T>(o[d]);
  if (p.lse) p.lse[std::int64_t(b) * p.lse_stride_batch + std::int64_t(h) * p.lse_stride_head] = lse;
}

template <class T>
void run(const PagedAttentionParams& p) {
  const int group = p.num_q_heads / p.num_kv_heads;
  const int D = p.head_dim;
  const std::int64_t tasks = std::int64_t(p.batch) * p.num_kv_heads;
  if (p.num_splits == 1) {
    parallel_for(tasks, [&](std::int64_t begin, std::int64_t end) {
      std::vector<float> o(std::size_t(group) * D), lse(group);
      for (std::int64_t task = begin; task < end; ++task) {
        int b = int(task / p.num_kv_heads), kvh = int(task % p.num_kv_heads);
        attend<T>(p, b, kvh, split_range(p, b, 0), o.data(), lse.data());
        for (int g = 0; g < group; ++g) store<T>(p, b, kvh * group + g, &o[std::size_t(g) * D], lse[g]);
      }
    });
    return;
  }
  // Split: partial outputs per (split, sequence, query head), then a merge.
  const std::size_t rows = std::size_t(p.num_splits) * p.batch * p.num_q_heads;
  std::vector<float> part_out(rows * D), part_lse(rows);
  auto part = [&](int split, int b, int h) {
    return (std::size_t(split) * p.batch + b) * p.num_q_heads + h;
  };
  parallel_for(tasks * p.num_splits, [&](std::int64_t begin, std::int64_t end) {
    for (std::int64_t task = begin; task < end; ++task) {
      int split = int(task / tasks);
      int b = int(task % tasks / p.num_kv_heads), kvh = int(task % p.num_kv_heads);
      std::size_t first = part(split, b, kvh * group);
      attend<T>(p, b, kvh, split_range(p, b, split), &part_out[first * D], &part_lse[first]);
    }
  });
  parallel_for(std::int64_t(p.batch) * p.num_q_heads, [&](std::int64_t begin, std::int64_t end) {
    std::vector<float> o(D);
    for (std::int64_t bh = begin; bh < end; ++bh) {
      int b = int(bh / p.num_q_heads), h = int(bh % p.num_q_heads);
      float max_lse = kNegInf;
      for (int s = 0; s < p.num_splits; ++s) max_lse = std::max(max_lse, part_lse[part(s, b, h)]);
      std::fill(o.begin(), o.end(), 0.0f);
      float total = 0.0f;
      if (max_lse != kNegInf) {
        for (int s = 0; s < p.num_splits; ++s) {
          float w = std::exp(part_lse[part(s, b, h)] - max_lse);
          if (w == 0.0f) continue;
          total += w;
          simd::axpy(o.data(), w, &part_out[part(s, b, h) * D], D);
        }
        simd::scale(o.data(), 1.0f / total, D);
      }
      store<T>(p, b, h, o.data(), max_lse == kNegInf ? kNegInf : max_lse + std::log(total));
    }
  });
}

}  // namespace

int plan_attention_splits(int batch, int num_kv_heads, std::int64_t max_kv_len) {
  // Enough tasks to keep every worker busy (4 per worker for balance), chunks of at least 512
  // tokens so a split pays for its merge.
  const std::int64_t want = 4 * std::int64_t(tinyserve::cpu::worker_count());
  const std::int64_t tasks = std::max<std::int64_t>(1, std::int64_t(batch) * num_kv_heads);
  if (tasks >= want) return 1;
  std::int64_t splits = (want + tasks - 1) / tasks;
  splits = std::min<std::int64_t>(splits, std::max<std::int64_t>(1, max_kv_len / 512));
  return int(std::max<std::int64_t>(1, splits));
}

void paged_attention(const PagedAttentionParams& p) {
  switch (p.dtype) {
    case DType::Float32: return run<float>(p);
    case DType::Float16: return run<half_t>(p);
    case DType::BFloat16: return run<bfloat16_t>(p);
    default: break;
  }
}

}  // namespace tinyserve::kernels::cpu
