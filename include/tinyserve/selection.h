#pragma once

// Query-aware page selection for decode: per-page key summaries written with the cache, and
// select_pages, which picks each (sequence, KV head)'s most promising pages into a per-KV-head
// page table that paged_attention reads (block_table [batch, num_kv_heads, max_blocks], seq_lens
// [batch, num_kv_heads]).
//
// Page summaries (page_meta) have the logical shape [num_blocks, num_kv_heads, 2, head_dim] in
// the key cache's dtype or in float8_e4m3fn (MinMax rows only: half the bytes of 16-bit
// summaries, minimums rounded toward minus infinity and maximums toward plus infinity,
// saturating at +-448), head_dim contiguous, and are indexed by block like the caches, so
// copy_blocks and swap_blocks move them with their blocks.

#include <cstddef>
#include <cstdint>
#include <optional>

#include "tinyserve/export.h"
#include "tinyserve/ops.h"
#include "tinyserve/tensor.h"

namespace tinyserve {

// What a page summary holds, and how select_pages scores a page against a query q.
enum class PageSummary : std::int8_t {
  // Row 0 the elementwise minimum m of the page's keys, row 1 the maximum M. Score: Quest's
  // bound sum_d max(q_d * m_d, q_d * M_d), never below q.k for any key k of the page.
  MinMax,
  // Row 0 the elementwise mean mu of the page's keys, row 1 their standard deviation sigma
  // (population). Score: the estimate sum_d (q_d * mu_d + |q_d| * sigma_d). One outlier key
  // widens a min/max box for every query; it moves a mean and deviation by 1/page of itself.
  MeanStd,
  // The rows of MinMax (written identically), scored halfway between the box's centre and
  // Quest's bound: sum_d (q_d * (m_d + M_d) / 2 + |q_d| * (M_d - m_d) / 4), that is
  // sum_d (3/4 * max(q_d * m_d, q_d * M_d) + 1/4 * min(q_d * m_d, q_d * M_d)). An estimate, not a
  // bound: an outlier key still widens the box, but counts half as much as in the bound.
  MinMaxDamped,
};

// The summary whose rows `summary` stores (MinMaxDamped stores MinMax's rows).
inline constexpr PageSummary page_summary_rows(PageSummary summary) {
  return summary == PageSummary::MinMaxDamped ? PageSummary::MinMax : summary;
}

// How the query heads of one GQA group combine their page scores into the KV head's score.
enum class GroupReduce : std::int8_t { Sum, Max };

// The default summary: Quest's bound, the contract's scoring (DESIGN.md). Of min/max and mean/std
// it kept more attention mass on the real-model benchmark; MinMaxDamped kept more still and is
// an option (docs/selection.md).
inline constexpr PageSummary kDefaultPageSummary = PageSummary::MinMax;

// reshape_and_cache that also updates the summaries of the pages it writes (page_meta as above,
// the key cache's dtype or float8_e4m3fn). A write at offset 0 of a page restarts the page's
// summary from every key the call writes to that page, whatever their order in slot_mapping; a page
// the call writes only at later offsets has its summary extended. Pages fill in order of offset
// (append-only): MeanStd counts the page's earlier keys as the lowest offset that the call writes
// to it.
TINYSERVE_API void reshape_and_cache(const TensorView& key, const TensorView& value,
                                     const TensorView& key_cache, const TensorView& value_cache,
                                     const TensorView& slot_mapping, const TensorView& page_meta,
                                     PageSummary summary = kDefaultPageSummary, Stream stream = 0);

// The same with the caches' scales: into float8_e4m3fn caches the summaries (in the dtype of
// `key`, or float8_e4m3fn) are of the keys as the cache holds them, each x / k_scale rounded to
// e4m3 times k_scale, so that they bound what attention reads.
TINYSERVE_API void reshape_and_cache(const TensorView& key, const TensorView& value,
                                     const TensorView& key_cache, const TensorView& value_cache,
                                     const TensorView& slot_mapping,
                                     const CacheWriteOptions& options, const TensorView& page_meta,
                                     PageSummary summary = kDefaultPageSummary, Stream stream = 0);

// Builds the summaries of the pages already in the cache: for every sequence b, each page
// block_table[b, i] holding tokens of its first seq_lens[b] tokens is summarised from those
// tokens' keys (loading a cache, or one written without summaries). block_table int32
// [batch, max_blocks], seq_lens int32 [batch]. Pages shared by several sequences must hold the
// same tokens in each.
TINYSERVE_API void build_page_meta(const TensorView& key_cache, const TensorView& block_table,
                                   const TensorView& seq_lens, const TensorView& page_meta,
                                   PageSummary summary = kDefaultPageSummary, Stream stream = 0);

// The same over a float8_e4m3fn key cache of scale k_scale: the keys are summarised as attention
// reads them, stored * k_scale, into page_meta of float32, float16, bfloat16 (the queries'
// precision) or float8_e4m3fn.
TINYSERVE_API void build_page_meta(const TensorView& key_cache, const TensorView& block_table,
                                   const TensorView& seq_lens, const TensorView& page_meta,
                                   const KVScale& k_scale,
                                   PageSummary summary = kDefaultPageSummary, Stream stream = 0);

struct SelectPagesOptions {
  PageSummary summary = kDefaultPageSummary;
  GroupReduce group_reduce = GroupReduce::Sum;
  // The first num_sink_pages pages of a sequence are always kept (attention sinks).
  int num_sink_pages = 0;
  // Optional int32 [num_blocks]: every (sequence, KV head) adds one to each block it keeps.
  std::optional<TensorView> hits;
  // CUDA scratch of at least select_pages_workspace_bytes(...) bytes on the tensors' device,
  // contiguous and 16-byte aligned.
  std::optional<TensorView> workspace;
};

// Query-aware page selection for decode. query [batch, num_q_heads, head_dim]; page_meta as
// above (the query's dtype or float8_e4m3fn); block_table int32 [batch, max_blocks] and seq_lens
// int32 [batch] (the dense table); budget: pages kept per (sequence, KV head), at least
// num_sink_pages + 1; block_size: tokens per page (the caches' block_size). Writes table int32
// [batch, num_kv_heads, budget] (physical block ids, -1 past the kept pages) and lens int32
// [batch, num_kv_heads] (tokens in the kept pages).
//
// A sequence with at most `budget` pages keeps all of them (lens = seq_lens[b]), and
// paged_attention over the result equals dense attention. Otherwise it keeps its sink pages,
// its last page, and the budget's remaining pages of highest score (ties: the lower logical
// page wins; a NaN score counts as minus infinity, and GroupReduce::Max leaves out a query head
// scoring NaN), all in logical order with the last page last.
TINYSERVE_API void select_pages(const TensorView& query, const TensorView& page_meta,
                                const TensorView& block_table, const TensorView& seq_lens,
                                int budget, int block_size, const TensorView& table,
                                const TensorView& lens, const SelectPagesOptions& options = {},
                                Stream stream = 0);

// Bytes of CUDA scratch select_pages needs for these shapes (0 for host tensors).
TINYSERVE_API std::size_t select_pages_workspace_bytes(const TensorView& query,
                                                       const TensorView& page_meta,
                                                       const TensorView& block_table);

}  // namespace tinyserve
