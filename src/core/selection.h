#pragma once

// Validation shared by the ops that read or write page summaries.

#include "core/kernels.h"
#include "core/validate.h"
#include "tinyserve/ops.h"

namespace tinyserve::detail {

// page_meta must be [num_blocks, num_kv_heads, 2, head_dim] of key_cache ([num_blocks,
// block_size, num_kv_heads, head_dim]), head_dim contiguous, in the keys' dtype `keys` (the
// cache's; for a float8 cache, the keys written, or the summaries' own float32/16 or bfloat16
// where a filled cache is summarised) or float8 e4m3fn; `written` also asks that no two
// elements share an address. Returns the kernels' view of it.
kernels::PageMetaDesc check_page_meta(const OpCheck& c, const TensorView& page_meta,
                                      const TensorView& key_cache, PageSummary summary,
                                      bool written, DType keys);

// The kernels' view of a float8 cache's scale (ops.cpp; see its definition).
kernels::ScaleArg check_scale(const OpCheck& c, const KVScale& s, const char* name,
                              const TensorView& cache);

}  // namespace tinyserve::detail
