// CPU page summaries and page selection: the reference for the CUDA kernels.
//
// A summary accumulates in double (min/max exactly, mean/std as sums of x and x^2) and is stored
// in the cache's dtype, rounded once, or in float8 e4m3fn, rounded outward (stored<T>). Over a
// float8 cache it summarises the keys as attention reads them, stored * k_scale in float32 (a
// write quantises x / k_scale as the cache write does), in the summaries' dtype. Scores
// accumulate in float32 over head_dim in order, per query head, then combine over the GQA group.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <type_traits>
#include <vector>

#include "core/kernels.h"
#include "cpu/dtypes.h"
#include "cpu/page_meta.h"
#include "cpu/parallel.h"

namespace tinyserve::kernels::cpu {
namespace {

using tinyserve::cpu::bfloat16_t;
using tinyserve::cpu::float8_e4m3_t;
using tinyserve::cpu::from_float;
using tinyserve::cpu::half_t;
using tinyserve::cpu::parallel_for;
using tinyserve::cpu::to_float;

// d rounded once to T (to nearest, ties to even). A double rounded to float and then to a 16-bit
// type is rounded twice, and lands on the wrong neighbour where the float falls exactly halfway
// between two 16-bit values that the double is not halfway between. Rounded to odd instead
// (truncated toward zero, the last bit set where that lost anything), the float keeps what the
// second rounding needs: it has more than two bits beyond a 16-bit type's.
template <class T>
T from_double(double d) {
  float f = float(d);
  if constexpr (std::is_same_v<T, float>) return f;  // one rounding already
  if (!std::isfinite(d) || double(f) == d) return from_float<T>(f);
  if (std::fabs(double(f)) > std::fabs(d)) f = std::nextafter(f, 0.0f);
  std::uint32_t bits;
  std::memcpy(&bits, &f, 4);
  bits |= 1u;
  std::memcpy(&f, &bits, 4);
  return from_float<T>(f);
}

// Float8 e4m3fn bits one step toward minus infinity (from +-0: the negative smallest subnormal),
// saturating at -448.
std::uint8_t fp8_step_down(std::uint8_t bits) {
  const std::uint8_t magnitude = bits & 0x7fu;
  if (magnitude == 0) return 0x81u;
  if (bits & 0x80u) return magnitude < 0x7eu ? std::uint8_t(bits + 1) : bits;
  return std::uint8_t(bits - 1);
}

// x as stored in a summary of type T. 16-bit and float32 summaries are rounded to nearest (once).
// Float8 ones are rounded toward minus infinity (direction < 0: a minimum), plus infinity
// (direction > 0: a maximum or a standard deviation) or to nearest (0: a mean), saturating at
// +-448, so that a min/max box of float8 summaries still holds every key within that range.
template <class T>
T stored(double x, int direction) {
  if constexpr (std::is_same_v<T, float8_e4m3_t>) {
    float8_e4m3_t r = from_double<float8_e4m3_t>(x);
    if (direction != 0 && !std::isnan(x)) {
      const double v = to_float(r);
      if (direction < 0 && v > x) r.bits = fp8_step_down(r.bits);
      if (direction > 0 && v < x) r.bits = std::uint8_t(fp8_step_down(r.bits ^ 0x80u) ^ 0x80u);
    }
    return r;
  } else {
    return from_double<T>(x);
  }
}

// One (page, head)'s summary while it is being built: a and b are min and max (MinMax) or the
// sums of x and x^2 (MeanStd) over `count` keys.
struct Accumulator {
  PageSummary kind;
  int dim;
  std::int64_t count = 0;
  std::vector<double> a, b;

  Accumulator(PageSummary k, int d) : kind(k), dim(d), a(std::size_t(d)), b(std::size_t(d)) {}

  void reset() {
    count = 0;
    const double inf = std::numeric_limits<double>::infinity();
    std::fill(a.begin(), a.end(), kind == PageSummary::MinMax ? inf : 0.0);
    std::fill(b.begin(), b.end(), kind == PageSummary::MinMax ? -inf : 0.0);
  }

  // Continues from a stored summary of `n` earlier keys.
  template <class T>
  void load(const T* row0, const T* row1, std::int64_t n) {
    count = n;
    for (int d = 0; d < dim; ++d) {
      const double x = to_float(row0[d]), y = to_float(row1[d]);
      if (kind == PageSummary::MinMax) {
        a[d] = x;
        b[d] = y;
      } else {
        a[d] = double(n) * x;
        b[d] = double(n) * (y * y + x * x);
      }
    }
  }

  template <class T>
  void add(const T* key) {
    ++count;
    for (int d = 0; d < dim; ++d) {
      const double x = to_float(key[d]);
      if (kind == PageSummary::MinMax) {
        a[d] = std::min(a[d], x);
        b[d] = std::max(b[d], x);
      } else {
        a[d] += x;
        b[d] += x * x;
      }
    }
  }

  template <class T>
  void store(T* row0, T* row1) const {
    for (int d = 0; d < dim; ++d) {
      if (kind == PageSummary::MinMax) {
        row0[d] = stored<T>(a[d], -1);
        row1[d] = stored<T>(b[d], 1);
      } else {
        const double n = double(std::max<std::int64_t>(count, 1));
        const double mean = a[d] / n;
        const double var = std::max(0.0, b[d] / n - mean * mean);
        row0[d] = stored<T>(mean, 0);
        row1[d] = stored<T>(std::sqrt(var), 1);
      }
    }
  }
};

template <class T>
T* meta_row(const PageMetaDesc& m, std::int64_t block, int head, int row) {
  return static_cast<T*>(m.data) + block * m.stride_block + std::int64_t(head) * m.stride_head +
         row * m.stride_row;
}

// ---------------------------------------------------------------------------------------------
// Summaries written with the cache.

// T: the keys' type; M: the summaries' (T, or float8 e4m3fn). Over a float8 cache each key is
// summarised as the cache holds it: x / scale rounded to e4m3, times the scale (float32).
template <class T, class M>
void update_typed(const ReshapeAndCacheParams& p) {
  const bool quantised = p.cache_dtype == DType::Float8E4M3FN;
  // The call's tokens grouped by page, each group in token order.
  std::vector<std::int64_t> order;
  order.reserve(std::size_t(p.num_tokens));
  for (std::int64_t i = 0; i < p.num_tokens; ++i) {
    if (p.slot_mapping[i] >= 0) order.push_back(i);
  }
  auto block_of = [&](std::int64_t i) { return p.slot_mapping[i] / p.block_size; };
  std::stable_sort(order.begin(), order.end(),
                   [&](std::int64_t x, std::int64_t y) { return block_of(x) < block_of(y); });
  std::vector<std::size_t> starts;
  for (std::size_t i = 0; i < order.size(); ++i) {
    if (i == 0 || block_of(order[i]) != block_of(order[i - 1])) starts.push_back(i);
  }
  starts.push_back(order.size());
  const std::int64_t groups = std::int64_t(starts.size()) - 1;
  parallel_for(groups, [&](std::int64_t begin, std::int64_t end) {
    Accumulator acc(p.summary, p.head_dim);
    std::vector<float> stored_key(quantised ? std::size_t(p.head_dim) : 0);
    for (std::int64_t g = begin; g < end; ++g) {
      const std::size_t first = starts[std::size_t(g)], last = starts[std::size_t(g) + 1];
      const std::int64_t block = block_of(order[first]);
      std::int64_t lowest = p.block_size;
      for (std::size_t i = first; i < last; ++i) {
        lowest = std::min(lowest, p.slot_mapping[order[i]] % p.block_size);
      }
      for (int h = 0; h < p.num_heads; ++h) {
        M* row0 = meta_row<M>(p.page_meta, block, h, 0);
        M* row1 = meta_row<M>(p.page_meta, block, h, 1);
        acc.reset();
        if (lowest > 0) acc.load(row0, row1, lowest);  // extends the keys before `lowest`
        for (std::size_t i = first; i < last; ++i) {
          const T* key = static_cast<const T*>(p.key) + order[i] * p.key_stride_token +
                         std::int64_t(h) * p.key_stride_head;
          if (quantised) {
            const float scale = p.k_scale.of(h);
            for (int d = 0; d < p.head_dim; ++d) {
              stored_key[std::size_t(d)] =
                  to_float(tinyserve::cpu::quantise_e4m3(to_float(key[d]), scale)) * scale;
            }
            acc.add(stored_key.data());
          } else {
            acc.add(key);
          }
        }
        acc.store(row0, row1);
      }
    }
  });
}

// T: the key cache's type (float8 e4m3fn: read as stored * k_scale); M: the summaries'.
template <class T, class M>
void build_typed(const BuildPageMetaParams& p) {
  constexpr bool kQuantised = std::is_same_v<T, float8_e4m3_t>;
  // (block, tokens in it) per page of every sequence; a block that several sequences list is
  // built once, from the longest of its lists.
  struct Page {
    std::int64_t block, sequence, page, tokens;
  };
  std::vector<Page> pages;
  for (int b = 0; b < p.batch; ++b) {
    const std::int64_t len = p.seq_lens[b];
    for (std::int64_t i = 0; i * p.block_size < len; ++i) {
      pages.push_back({p.block_table[b * p.block_table_stride + i], b, i,
                       std::min<std::int64_t>(p.block_size, len - i * p.block_size)});
    }
  }
  std::sort(pages.begin(), pages.end(), [](const Page& x, const Page& y) {
    return x.block != y.block ? x.block < y.block : x.tokens > y.tokens;
  });
  pages.erase(std::unique(pages.begin(), pages.end(),
                          [](const Page& x, const Page& y) { return x.block == y.block; }),
              pages.end());
  parallel_for(std::int64_t(pages.size()), [&](std::int64_t begin, std::int64_t end) {
    Accumulator acc(p.summary, p.head_dim);
    std::vector<float> stored_key(kQuantised ? std::size_t(p.head_dim) : 0);
    for (std::int64_t i = begin; i < end; ++i) {
      const Page& pg = pages[std::size_t(i)];
      for (int h = 0; h < p.num_heads; ++h) {
        acc.reset();
        for (std::int64_t t = 0; t < pg.tokens; ++t) {
          const T* key =
              static_cast<const T*>(p.key_cache.data) + p.key_cache.offset(pg.block, t, h);
          if constexpr (kQuantised) {
            const float scale = p.k_scale.of(h);
            for (int d = 0; d < p.head_dim; ++d) {
              stored_key[std::size_t(d)] = to_float(key[d]) * scale;
            }
            acc.add(stored_key.data());
          } else {
            acc.add(key);
          }
        }
        acc.store(meta_row<M>(p.page_meta, pg.block, h, 0),
                  meta_row<M>(p.page_meta, pg.block, h, 1));
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Selection.

// One element's share of a page's score for one query head (PageSummary says what x and y are).
float page_term(PageSummary kind, float q, float x, float y) {
  switch (kind) {
    case PageSummary::MinMax:
      return std::max(q * x, q * y);
    case PageSummary::MinMaxDamped:
      return 0.75f * std::max(q * x, q * y) + 0.25f * std::min(q * x, q * y);
    default:
      return q * x + std::fabs(q) * y;
  }
}

// T: the query's type; M: the summaries' (T, or float8 e4m3fn).
template <class T, class M>
void select_typed(const SelectPagesParams& p) {
  const int group = p.num_q_heads / p.num_kv_heads;
  const int D = p.head_dim;
  parallel_for(std::int64_t(p.batch) * p.num_kv_heads, [&](std::int64_t begin, std::int64_t end) {
    std::vector<float> q(std::size_t(group) * D), scores;
    std::vector<std::int32_t> candidates;
    for (std::int64_t task = begin; task < end; ++task) {
      const int b = int(task / p.num_kv_heads), kvh = int(task % p.num_kv_heads);
      const std::int64_t len = p.seq_lens[b];
      const std::int64_t num_pages = (len + p.block_size - 1) / p.block_size;
      const std::int32_t* dense = p.block_table + b * p.block_table_stride;
      std::int32_t* out =
          p.out_table + b * p.out_table_stride_batch + kvh * p.out_table_stride_head;
      std::int32_t* out_len =
          p.out_lens + b * p.out_lens_stride_batch + kvh * p.out_lens_stride_head;
      std::fill(out, out + p.budget, -1);
      if (num_pages <= p.budget) {
        std::copy(dense, dense + num_pages, out);
        *out_len = std::int32_t(len);
      } else {
        for (int g = 0; g < group; ++g) {
          const T* row = static_cast<const T*>(p.query) + b * p.q_stride_batch +
                         std::int64_t(kvh * group + g) * p.q_stride_head;
          for (int d = 0; d < D; ++d) q[std::size_t(g) * D + d] = to_float(row[d]);
        }
        // Candidates: every page between the sinks and the last page.
        const std::int64_t first = p.num_sink_pages, last = num_pages - 1;
        scores.assign(std::size_t(last - first), 0.0f);
        for (std::int64_t page = first; page < last; ++page) {
          const M* r0 = meta_row<const M>(p.page_meta, dense[page], kvh, 0);
          const M* r1 = meta_row<const M>(p.page_meta, dense[page], kvh, 1);
          float combined = 0.0f;
          for (int g = 0; g < group; ++g) {
            const float* qg = &q[std::size_t(g) * D];
            float s = 0.0f;
            for (int d = 0; d < D; ++d) {
              const float x = to_float(r0[d]), y = to_float(r1[d]);
              s += page_term(p.summary, qg[d], x, y);
            }
            if (g == 0 || p.group_reduce == GroupReduce::Sum) {
              combined = g == 0 ? s : combined + s;
            } else {
              combined = std::fmax(combined, s);  // a NaN head is left out, as in CUDA's fmaxf
            }
          }
          scores[std::size_t(page - first)] =
              std::isnan(combined) ? -std::numeric_limits<float>::infinity() : combined;
        }
        candidates.resize(std::size_t(last - first));
        std::iota(candidates.begin(), candidates.end(), std::int32_t(first));
        const std::size_t keep = std::size_t(p.budget - p.num_sink_pages - 1);
        auto better = [&](std::int32_t x, std::int32_t y) {
          const float sx = scores[std::size_t(x - first)], sy = scores[std::size_t(y - first)];
          return sx != sy ? sx > sy : x < y;
        };
        std::nth_element(candidates.begin(), candidates.begin() + std::ptrdiff_t(keep),
                         candidates.end(), better);
        std::sort(candidates.begin(), candidates.begin() + std::ptrdiff_t(keep));
        int n = 0;
        for (std::int64_t page = 0; page < first; ++page) out[n++] = dense[page];
        for (std::size_t i = 0; i < keep; ++i) out[n++] = dense[candidates[i]];
        out[n++] = dense[last];
        *out_len =
            std::int32_t(std::int64_t(p.budget - 1) * p.block_size + len - last * p.block_size);
      }
      if (p.hits) {
        const std::int64_t kept = std::min<std::int64_t>(num_pages, p.budget);
        for (std::int64_t i = 0; i < kept; ++i) {
          __atomic_fetch_add(&p.hits[out[i]], 1, __ATOMIC_RELAXED);
        }
      }
    }
  });
}

template <template <class> class F, class P>
void dispatch(DType dtype, const P& p) {
  switch (dtype) {
    case DType::Float32:
      return F<float>::run(p);
    case DType::Float16:
      return F<half_t>::run(p);
    case DType::BFloat16:
      return F<bfloat16_t>::run(p);
    default:
      break;
  }
}

template <class T>
struct Update {
  static void run(const ReshapeAndCacheParams& p) {
    p.page_meta.fp8 ? update_typed<T, float8_e4m3_t>(p) : update_typed<T, T>(p);
  }
};
template <class T>
struct Build {
  static void run(const BuildPageMetaParams& p) {
    p.page_meta.fp8 ? build_typed<T, float8_e4m3_t>(p) : build_typed<T, T>(p);
  }
};
// Over a float8 cache into summaries of type M (dispatched on meta_dtype where not float8).
template <class M>
struct BuildFromFp8 {
  static void run(const BuildPageMetaParams& p) { build_typed<float8_e4m3_t, M>(p); }
};
template <class T>
struct Select {
  static void run(const SelectPagesParams& p) {
    p.page_meta.fp8 ? select_typed<T, float8_e4m3_t>(p) : select_typed<T, T>(p);
  }
};

}  // namespace

void update_page_meta(const ReshapeAndCacheParams& p) { dispatch<Update>(p.dtype, p); }
void build_page_meta(const BuildPageMetaParams& p) {
  if (p.dtype == DType::Float8E4M3FN && p.page_meta.fp8) {
    build_typed<float8_e4m3_t, float8_e4m3_t>(p);
  } else if (p.dtype == DType::Float8E4M3FN) {
    dispatch<BuildFromFp8>(p.meta_dtype, p);
  } else {
    dispatch<Build>(p.dtype, p);
  }
}
void select_pages(const SelectPagesParams& p) { dispatch<Select>(p.dtype, p); }

}  // namespace tinyserve::kernels::cpu
