#pragma once

#include "core/kernels.h"

namespace tinyserve::kernels::cpu {

// Updates the summaries of the pages that a reshape_and_cache call writes (p.page_meta set).
void update_page_meta(const ReshapeAndCacheParams& p);

}  // namespace tinyserve::kernels::cpu
