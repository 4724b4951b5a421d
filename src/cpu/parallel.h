#pragma once

#include <cstdint>
#include <functional>

namespace tinyserve::cpu {

// Runs fn(begin, end) over [0, n) split into contiguous chunks on the CPU backend's worker
// threads (the calling thread takes a share). Calls from several threads at once are serialised.
// An exception thrown by fn is rethrown in the caller after every chunk has finished.
void parallel_for(std::int64_t n, const std::function<void(std::int64_t, std::int64_t)>& fn);

int worker_count();
void set_worker_count(int n);

}  // namespace tinyserve::cpu
