#pragma once

// Validation shared by the ops that read or write page summaries.

#include "core/kernels.h"
#include "core/validate.h"

namespace tinyserve::detail {

// page_meta must be [num_blocks, num_kv_heads, 2, head_dim] of key_cache ([num_blocks,
// block_size, num_kv_heads, head_dim]) in its dtype, head_dim contiguous; `written` also asks
// that no two elements share an address. Returns the kernels' view of it.
kernels::PageMetaDesc check_page_meta(const OpCheck& c, const TensorView& page_meta,
                                      const TensorView& key_cache, PageSummary summary,
                                      bool written);

}  // namespace tinyserve::detail
