// CPU paged attention: the reference the other backends are checked against, and a usable
// backend. Work is cut into tasks: a task is a tile of query rows of one sequence (decode: its one
// row; prefill: up to kRowTile consecutive rows) with every query head, reading the keys that any
// of its rows sees, in the cache's memory order. All query heads of a GQA group, and all rows of
// the tile, share each key and value row while it is in registers. Online softmax in float32 over
// tiles of tokens; splits of a task's key range are merged through their log-sum-exp.

#include <algorithm>
#include <array>
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
using tinyserve::cpu::float8_e4m3_t;
using tinyserve::cpu::from_float;
using tinyserve::cpu::half_t;
using tinyserve::cpu::parallel_for;
using tinyserve::cpu::to_float;
namespace simd = tinyserve::cpu::simd;

// Tokens scored before each softmax update, by cache layout (measured best of 4/8/16/32, batch 8
// x 4096 tokens, 8 KV heads of 128, page 16). Token-major (NHD) caches want short tiles: the
// value pass reads the tile one KV head at a time, so each token's run of heads is read in 8
// pieces, and the shorter the tile the sooner they follow each other. Head-major (HND) caches
// want a page of one head (16 tokens) read as one run.
constexpr int kTileTokenMajor = 8;
constexpr int kTileHeadMajor = 16;
constexpr int kMaxTile = 16;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Query rows per prefill task. Eight rows of 32 query heads of 128 keep the tile's queries and
// accumulators (128 KB each) in L2 while each key and value row is read once for all of them.
constexpr int kRowTile = 8;
// At most this many bytes of split partials at a time; more tasks are run in waves.
constexpr std::size_t kMaxPartialBytes = std::size_t(64) << 20;

// Query rows [row, row + rows) of sequence `seq`, at key positions pos .. pos + rows - 1, reading
// keys [key_begin, key_end): the union of the rows' causal (and windowed) ranges. The keys are
// cut into `splits` non-empty pieces of `chunk` keys (the last may be shorter).
struct Task {
  int seq = 0;
  int rows = 1;
  std::int64_t row = 0, pos = 0, key_begin = 0, key_end = 0, chunk = 0;
  int splits = 1;
  std::size_t part = 0;  // first partial row (one query head, head_dim floats) of split 0
};

// The tasks of the batch. Decode: one per sequence, its one row at position len - 1. Prefill:
// sequence b's n rows are its last n tokens, in tiles of kRowTile rows.
std::vector<Task> make_tasks(const PagedAttentionParams& p) {
  std::vector<Task> tasks;
  tasks.reserve(p.query_start_loc ? std::size_t(p.batch) + p.num_query_rows / kRowTile
                                  : std::size_t(p.batch));
  auto add = [&](int b, std::int64_t row, int rows, std::int64_t pos) {
    Task t;
    t.seq = b;
    t.row = row;
    t.rows = rows;
    t.pos = pos;
    t.key_end = std::max<std::int64_t>(0, pos + rows);
    t.key_begin = p.window_left >= 0 ? std::max<std::int64_t>(0, pos - p.window_left) : 0;
    t.key_begin = std::min(t.key_begin, t.key_end);
    const std::int64_t keys = t.key_end - t.key_begin;
    t.chunk = std::max<std::int64_t>(1, (keys + p.num_splits - 1) / p.num_splits);
    t.splits = int((keys + t.chunk - 1) / t.chunk);
    tasks.push_back(t);
  };
  for (int b = 0; b < p.batch; ++b) {
    const std::int64_t len = std::max(0, p.seq_lens[b * p.seq_lens_stride_batch]);
    if (p.query_start_loc == nullptr) {
      add(b, b, 1, len - 1);
      continue;
    }
    const std::int64_t first = p.query_start_loc[b], n = p.query_start_loc[b + 1] - first;
    for (std::int64_t j = 0; j < n; j += kRowTile) {
      add(b, first + j, int(std::min<std::int64_t>(kRowTile, n - j)), len - n + j);
    }
  }
  return tasks;
}

template <class T>
const T* row(const CacheDesc& c, const PagedAttentionParams& p, const std::int32_t* table,
             std::int64_t token, int kv_head) {
  std::int64_t block = table[token / p.block_size];
  return static_cast<const T*>(c.data) + c.offset(block, token % p.block_size, kv_head);
}

// A row as float32: float32 rows are used in place, 16-bit rows converted into row t of `tile`,
// float8 rows dequantised (stored * scale) into it; `scale` is a float8 cache's scale.
template <class T>
const float* as_float(const T* src, int n, std::vector<float>& tile, int t, float scale) {
  (void)scale;
  if constexpr (std::is_same_v<T, float>) {
    (void)n;
    (void)tile;
    (void)t;
    return src;
  } else if constexpr (std::is_same_v<T, float8_e4m3_t>) {
    // float8 e4m3fn values by bit pattern.
    static const std::array<float, 256> values = [] {
      std::array<float, 256> v{};
      for (int i = 0; i < 256; ++i) v[i] = to_float(float8_e4m3_t{std::uint8_t(i)});
      return v;
    }();
    float* dst = tile.data() + std::size_t(t) * n;
    for (int d = 0; d < n; ++d) dst[d] = values[src[d].bits] * scale;
    return dst;
  } else {
    float* dst = tile.data() + std::size_t(t) * n;
    simd::to_float(src, dst, n);
    return dst;
  }
}

// One worker's buffers, reused from task to task.
struct Scratch {
  std::vector<float> q, acc, m, l, scores, buf, k_scale, v_scale;
};

// Attention of the task's rows, all query heads, over keys [begin, end) of its range. Writes the
// normalised outputs (float32, [rows][num_q_heads][head_dim]) and log-sum-exps ([rows][heads]).
//
// Inside, the task's query vectors are "virtual heads" v = (kv_head * rows + r) * group + g: the
// rows * group of them that share KV head kv_head are contiguous, so the vector loops treat a tile
// of rows like a larger GQA group. Each row masks the keys outside its causal (windowed) range.
//
// Decode reads every KV head a tile of tokens at a time, in the order of the cache's memory:
// token by token when one token's heads are contiguous (NHD), head by head when one head's
// tokens are (HND). The hardware prefetchers then see runs of several KB. One KV head at a time
// over the whole sequence would read 512-byte rows a token stride apart in an NHD cache, which
// they do not follow: measured on the reads alone, 14.5 GB/s against 25 GB/s (2 threads, EPYC).
// A tile of prefill rows goes head by head whatever the layout: a head's queries (rows * group
// of them) then stay in L1 through the tile, and the tile's keys are in cache after the first
// head.
//
// T is the query's and output's type, KV the caches' (T, or float8 read as stored * scale).
template <class T, class KV>
void attend(const PagedAttentionParams& p, const Task& task, std::int64_t begin, std::int64_t end,
            Scratch& sc, float* out, float* lse) {
  const int D = p.head_dim;
  const int H = p.num_q_heads;
  const int kv_heads = p.num_kv_heads;
  const int group = H / kv_heads;
  const int rows = task.rows;
  const int vgroup = rows * group;  // virtual heads per KV head
  const int V = rows * H;
  const std::int64_t k_head = p.key_cache.stride_head, v_head = p.value_cache.stride_head;
  const bool head_major = rows > 1 || k_head > p.key_cache.stride_token;
  const int tile = head_major ? kTileHeadMajor : kTileTokenMajor;
  const std::int32_t* table = p.block_table + std::int64_t(task.seq) * p.block_table_stride_batch;
  sc.q.resize(std::size_t(V) * D);
  sc.acc.assign(std::size_t(V) * D, 0.0f);
  sc.m.assign(V, kNegInf);
  sc.l.assign(V, 0.0f);
  sc.scores.resize(std::size_t(V) * kMaxTile);
  if constexpr (!std::is_same_v<KV, float>) {
    sc.buf.resize(std::size_t(std::max(kMaxTile, kv_heads)) * D);
  }
  sc.k_scale.resize(kv_heads);
  sc.v_scale.resize(kv_heads);
  for (int kvh = 0; kvh < kv_heads; ++kvh) {
    sc.k_scale[kvh] = p.k_scale.of(kvh);
    sc.v_scale[kvh] = p.v_scale.of(kvh);
  }
  const float* k_scale = sc.k_scale.data();
  const float* v_scale = sc.v_scale.data();
  float* q = sc.q.data();
  float* acc = sc.acc.data();
  float* m = sc.m.data();
  float* l = sc.l.data();
  float* scores = sc.scores.data();
  const KV* krow0[kMaxTile];
  const KV* vrow0[kMaxTile];
  const float* krows[kMaxTile];
  const float* vrows[kMaxTile];
  for (int kvh = 0; kvh < kv_heads; ++kvh) {
    for (int r = 0; r < rows; ++r) {
      for (int g = 0; g < group; ++g) {
        const int h = kvh * group + g;
        const T* src = static_cast<const T*>(p.query) + (task.row + r) * p.q_stride_batch +
                       std::int64_t(h) * p.q_stride_head;
        float* dst = q + (std::size_t(kvh * rows + r) * group + g) * D;
        for (int d = 0; d < D; ++d) dst[d] = to_float(src[d]);
      }
    }
  }
  // Row r sees keys [pos + r - window_left, pos + r]. A token tile inside [lo_last, pos] is
  // seen by every row and needs no mask.
  const std::int64_t last_row_lo =
      p.window_left >= 0 ? task.pos + rows - 1 - p.window_left : std::int64_t(0);
  const float cap = p.logits_soft_cap;
  for (std::int64_t t0 = begin; t0 < end; t0 += tile) {
    const int n = int(std::min<std::int64_t>(tile, end - t0));
    for (int t = 0; t < n; ++t) {
      krow0[t] = row<KV>(p.key_cache, p, table, t0 + t, 0);
      vrow0[t] = row<KV>(p.value_cache, p, table, t0 + t, 0);
    }
    if (rows > 1) {
      for (int kvh = 0; kvh < kv_heads; ++kvh) {
        const std::size_t first = std::size_t(kvh) * vgroup;
        for (int t = 0; t < n; ++t) {
          krows[t] = as_float(krow0[t] + kvh * k_head, D, sc.buf, t, k_scale[kvh]);
        }
        simd::dot_tile(&q[first * D], vgroup, krows, n, D, &scores[first * kMaxTile], kMaxTile);
      }
    } else if (head_major) {
      for (int kvh = 0; kvh < kv_heads; ++kvh) {
        const std::size_t first = std::size_t(kvh) * vgroup;
        for (int t = 0; t < n; ++t) {
          const float* k = as_float(krow0[t] + kvh * k_head, D, sc.buf, 0, k_scale[kvh]);
          simd::dot_token(&q[first * D], 1, vgroup, k, 0, D, &scores[first * kMaxTile + t],
                          kMaxTile);
        }
      }
    } else if constexpr (std::is_same_v<KV, float>) {
      for (int t = 0; t < n; ++t) {
        simd::dot_token(q, kv_heads, vgroup, krow0[t], k_head, D, &scores[t], kMaxTile);
      }
    } else {
      for (int t = 0; t < n; ++t) {
        for (int kvh = 0; kvh < kv_heads; ++kvh) {
          as_float(krow0[t] + kvh * k_head, D, sc.buf, kvh, k_scale[kvh]);
        }
        simd::dot_token(q, kv_heads, vgroup, sc.buf.data(), D, D, &scores[t], kMaxTile);
      }
    }
    const bool masked = t0 < last_row_lo || t0 + n - 1 > task.pos;
    for (int v = 0; v < V; ++v) {
      float* s = scores + std::size_t(v) * kMaxTile;
      for (int t = 0; t < n; ++t) {
        s[t] *= p.scale;
        if (cap > 0.0f) s[t] = cap * std::tanh(s[t] / cap);
      }
      if (masked) {
        const std::int64_t hi = task.pos + (v / group) % rows;
        const std::int64_t lo = p.window_left >= 0 ? hi - p.window_left : 0;
        for (int t = 0; t < n; ++t) {
          if (t0 + t > hi || t0 + t < lo) s[t] = kNegInf;
        }
      }
      const float tile_max = *std::max_element(s, s + n);
      const float m_new = std::max(m[v], tile_max);
      if (m_new == kNegInf) {  // no key of this row yet: nothing to add
        std::fill(s, s + n, 0.0f);
        continue;
      }
      const float correction = std::exp(m[v] - m_new);  // exp(-inf) = 0 on the first tile
      const float sum = simd::exp_shifted_sum(s, n, m_new);
      l[v] = l[v] * correction + sum;
      m[v] = m_new;
      if (correction != 1.0f) simd::scale(acc + std::size_t(v) * D, correction, D);
    }
    // Values one KV head at a time, so that its virtual heads' accumulators stay in registers
    // through the tile.
    for (int kvh = 0; kvh < kv_heads; ++kvh) {
      for (int t = 0; t < n; ++t) {
        vrows[t] = as_float(vrow0[t] + kvh * v_head, D, sc.buf, t, v_scale[kvh]);
      }
      const std::size_t first = std::size_t(kvh) * vgroup;
      simd::axpy_rows(&acc[first * D], vgroup, &scores[first * kMaxTile], kMaxTile, vrows, n, D);
    }
  }
  for (int kvh = 0; kvh < kv_heads; ++kvh) {
    for (int r = 0; r < rows; ++r) {
      for (int g = 0; g < group; ++g) {
        const std::size_t v = std::size_t(kvh * rows + r) * group + g;
        const std::size_t o = std::size_t(r) * H + kvh * group + g;
        const float inv = l[v] > 0.0f ? 1.0f / l[v] : 0.0f;
        for (int d = 0; d < D; ++d) out[o * D + d] = acc[v * D + d] * inv;
        lse[o] = l[v] > 0.0f ? m[v] + std::log(l[v]) : kNegInf;
      }
    }
  }
}

template <class T>
void store(const PagedAttentionParams& p, std::int64_t query_row, int h, const float* o,
           float lse) {
  T* dst =
      static_cast<T*>(p.out) + query_row * p.out_stride_batch + std::int64_t(h) * p.out_stride_head;
  for (int d = 0; d < p.head_dim; ++d) dst[d] = from_float<T>(o[d]);
  if (p.lse) p.lse[query_row * p.lse_stride_batch + std::int64_t(h) * p.lse_stride_head] = lse;
}

// Runs tasks[begin, end) split: every non-empty piece of every task into its partials, then a
// merge per (row, query head).
template <class T, class KV>
void run_split(const PagedAttentionParams& p, std::vector<Task>& tasks, std::size_t begin,
               std::size_t end) {
  const int H = p.num_q_heads;
  const int D = p.head_dim;
  struct Piece {
    std::size_t task;
    int split;
  };
  std::vector<Piece> pieces;
  std::size_t part_rows = 0;
  for (std::size_t i = begin; i < end; ++i) {
    tasks[i].part = part_rows;
    part_rows += std::size_t(tasks[i].splits) * tasks[i].rows * H;
    for (int split = 0; split < tasks[i].splits; ++split) pieces.push_back({i, split});
  }
  std::vector<float> part_out(part_rows * D), part_lse(part_rows);
  parallel_for(std::int64_t(pieces.size()), [&](std::int64_t first, std::int64_t last) {
    Scratch sc;
    for (std::int64_t i = first; i < last; ++i) {
      const Task& t = tasks[pieces[i].task];
      const int split = pieces[i].split;
      const std::int64_t from = t.key_begin + split * t.chunk;
      const std::int64_t to = std::min(t.key_end, from + t.chunk);
      const std::size_t at = t.part + std::size_t(split) * t.rows * H;
      attend<T, KV>(p, t, from, to, sc, &part_out[at * D], &part_lse[at]);
    }
  });
  parallel_for(std::int64_t(end - begin), [&](std::int64_t first, std::int64_t last) {
    std::vector<float> o(D);
    for (std::int64_t i = first; i < last; ++i) {
      const Task& t = tasks[begin + std::size_t(i)];
      const std::size_t stride = std::size_t(t.rows) * H;  // partial rows per split
      for (int r = 0; r < t.rows; ++r) {
        for (int h = 0; h < H; ++h) {
          const std::size_t at = t.part + std::size_t(r) * H + h;
          float max_lse = kNegInf;
          for (int s = 0; s < t.splits; ++s) max_lse = std::max(max_lse, part_lse[at + s * stride]);
          std::fill(o.begin(), o.end(), 0.0f);
          float total = 0.0f;
          if (max_lse != kNegInf) {
            for (int s = 0; s < t.splits; ++s) {
              const float w = std::exp(part_lse[at + s * stride] - max_lse);
              if (w == 0.0f) continue;
              total += w;
              simd::axpy(o.data(), w, &part_out[(at + s * stride) * D], D);
            }
            simd::scale(o.data(), 1.0f / total, D);
          }
          store<T>(p, t.row + r, h, o.data(),
                   max_lse == kNegInf ? kNegInf : max_lse + std::log(total));
        }
      }
    }
  });
}

template <class T, class KV>
void run(const PagedAttentionParams& p) {
  const int H = p.num_q_heads;
  const int D = p.head_dim;
  std::vector<Task> tasks = make_tasks(p);
  // Longest first: the pool hands out chunks in order, so the short tasks at the end even out
  // the threads' loads (a causal prompt's last rows read many more keys than its first).
  std::stable_sort(tasks.begin(), tasks.end(), [](const Task& a, const Task& b) {
    return (a.key_end - a.key_begin) * a.rows > (b.key_end - b.key_begin) * b.rows;
  });
  if (p.num_splits == 1) {
    parallel_for(std::int64_t(tasks.size()), [&](std::int64_t begin, std::int64_t end) {
      Scratch sc;
      std::vector<float> o, lse;
      for (std::int64_t i = begin; i < end; ++i) {
        const Task& t = tasks[i];
        o.resize(std::size_t(t.rows) * H * D);
        lse.resize(std::size_t(t.rows) * H);
        attend<T, KV>(p, t, t.key_begin, t.key_end, sc, o.data(), lse.data());
        for (int r = 0; r < t.rows; ++r) {
          for (int h = 0; h < H; ++h) {
            const std::size_t at = std::size_t(r) * H + h;
            store<T>(p, t.row + r, h, &o[at * D], lse[at]);
          }
        }
      }
    });
    return;
  }
  // Split: partials sized by the pieces the tasks have (a short sequence has fewer pieces than
  // num_splits), in waves of at most kMaxPartialBytes.
  std::size_t begin = 0;
  while (begin < tasks.size()) {
    std::size_t end = begin, bytes = 0;
    do {
      const Task& t = tasks[end];
      bytes += std::size_t(t.splits) * t.rows * H * (std::size_t(D) + 1) * sizeof(float);
      ++end;
    } while (end < tasks.size() && bytes < kMaxPartialBytes);
    run_split<T, KV>(p, tasks, begin, end);
    begin = end;
  }
}

}  // namespace

int plan_attention_splits(std::int64_t num_query_rows, bool prefill, int num_kv_heads,
                          std::int64_t max_kv_len) {
  // Enough tasks to keep every worker busy (4 per worker for balance), chunks of at least 512
  // tokens so a split pays for its merge. A task is a row (or a tile of prefill rows) with all
  // its KV heads, so the number of heads does not count. Prefill rows of several sequences make
  // at least rows / kRowTile tasks.
  (void)num_kv_heads;
  const std::int64_t want = 4 * std::int64_t(tinyserve::cpu::worker_count());
  const std::int64_t tasks = std::max<std::int64_t>(
      1, prefill ? (num_query_rows + kRowTile - 1) / kRowTile : num_query_rows);
  if (tasks >= want) return 1;
  std::int64_t splits = (want + tasks - 1) / tasks;
  splits = std::min<std::int64_t>(splits, std::max<std::int64_t>(1, max_kv_len / 512));
  return int(std::max<std::int64_t>(1, splits));
}

namespace {

// Per-KV-head tables: each KV head is a one-head problem over its own table row and length,
// with its group's query heads and its own scales.
template <class T, class KV>
void run_per_head(const PagedAttentionParams& p) {
  const std::int64_t elem = std::int64_t(sizeof(T)), kv_elem = std::int64_t(sizeof(KV));
  const int group = p.num_q_heads / p.num_kv_heads;
  for (int kvh = 0; kvh < p.num_kv_heads; ++kvh) {
    PagedAttentionParams h = p;
    const std::int64_t first_q = std::int64_t(kvh) * group;
    h.query = static_cast<const char*>(p.query) + first_q * p.q_stride_head * elem;
    h.out = static_cast<char*>(p.out) + first_q * p.out_stride_head * elem;
    if (p.lse) h.lse = p.lse + first_q * p.lse_stride_head;
    h.key_cache.data =
        static_cast<char*>(p.key_cache.data) + kvh * p.key_cache.stride_head * kv_elem;
    h.value_cache.data =
        static_cast<char*>(p.value_cache.data) + kvh * p.value_cache.stride_head * kv_elem;
    h.k_scale = ScaleArg{p.k_scale.of(kvh), nullptr};
    h.v_scale = ScaleArg{p.v_scale.of(kvh), nullptr};
    h.block_table = p.block_table + kvh * p.block_table_stride_head;
    h.seq_lens = p.seq_lens + kvh * p.seq_lens_stride_head;
    h.block_table_stride_head = 0;
    h.seq_lens_stride_head = 0;
    h.num_q_heads = group;
    h.num_kv_heads = 1;
    run<T, KV>(h);
  }
}

template <class T, class KV>
void dispatch_tables(const PagedAttentionParams& p) {
  if (p.block_table_stride_head != 0 || p.seq_lens_stride_head != 0) {
    run_per_head<T, KV>(p);
  } else {
    run<T, KV>(p);
  }
}

// The query and output share a type; the caches have it too, or are float8.
template <class T>
void run_query_type(const PagedAttentionParams& p) {
  if (p.kv_dtype == DType::Float8E4M3FN) return dispatch_tables<T, float8_e4m3_t>(p);
  return dispatch_tables<T, T>(p);
}

}  // namespace

void paged_attention(const PagedAttentionParams& p) {
  switch (p.query_dtype) {
    case DType::Float32:
      return run_query_type<float>(p);
    case DType::Float16:
      return run_query_type<half_t>(p);
    case DType::BFloat16:
      return run_query_type<bfloat16_t>(p);
    default:
      break;
  }
}

}  // namespace tinyserve::kernels::cpu
