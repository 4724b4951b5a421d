#include "tinyserve/errors.h"

namespace tinyserve {

// Out-of-line destructors anchor the classes' type information in the library, so a consumer
// catches the same type the library throws.
OutOfBlocks::~OutOfBlocks() = default;
UnknownSequence::~UnknownSequence() = default;

}  // namespace tinyserve
