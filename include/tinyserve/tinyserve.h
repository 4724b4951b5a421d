#pragma once

// The umbrella header of tinyserve's C++ API.
#include "tinyserve/block_manager.h"
#include "tinyserve/cache_pool.h"
#include "tinyserve/compactor.h"
#include "tinyserve/errors.h"
#include "tinyserve/export.h"
#include "tinyserve/ops.h"
#include "tinyserve/tensor.h"
#include "tinyserve/version.h"
