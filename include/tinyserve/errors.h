#pragma once

#include <stdexcept>
#include <string>

#include "tinyserve/export.h"

namespace tinyserve {

// Bad arguments throw std::invalid_argument; a missing backend or device, or a failed CUDA call,
// throws std::runtime_error. The two classes below carry meaning callers act on.

// The BlockManager has too few free blocks for a request; nothing was changed.
class TINYSERVE_API OutOfBlocks : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
  ~OutOfBlocks() override;
};

// A sequence id that the BlockManager does not know (never added, or already freed).
class TINYSERVE_API UnknownSequence : public std::out_of_range {
 public:
  using std::out_of_range::out_of_range;
  ~UnknownSequence() override;
};

}  // namespace tinyserve
