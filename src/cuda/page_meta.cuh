#pragma once

// The CUDA backend's page summary update, shared by reshape_and_cache (cache_ops.cu) and
// defined with the selection kernels (selection.cu).

#include "core/kernels.h"

namespace tinyserve::kernels::cuda {

// Updates the summaries of the pages that a reshape_and_cache call writes (p.page_meta set),
// enqueued on `stream` after the cache write; the caller has made the device current.
void update_page_meta(const ReshapeAndCacheParams& p, Stream stream);

}  // namespace tinyserve::kernels::cuda
