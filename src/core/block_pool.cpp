#include "core/block_pool.h"

namespace tinyserve::detail {

namespace {
std::string str(std::int64_t v) { return std::to_string(v); }
}  // namespace

FreeBlockQueue::FreeBlockQueue(std::int32_t num_blocks)
    : sentinel_(num_blocks),
      size_(num_blocks),
      prev_(std::size_t(num_blocks) + 1),
      next_(std::size_t(num_blocks) + 1) {
  for (std::int32_t b = 0; b <= sentinel_; ++b) {
    prev_[std::size_t(b)] = b == 0 ? sentinel_ : b - 1;
    next_[std::size_t(b)] = b == sentinel_ ? 0 : b + 1;
  }
}

void FreeBlockQueue::link_after(std::int32_t at, std::int32_t b) {
  const std::int32_t after = next_[std::size_t(at)];
  prev_[std::size_t(b)] = at;
  next_[std::size_t(b)] = after;
  next_[std::size_t(at)] = b;
  prev_[std::size_t(after)] = b;
  ++size_;
}

void FreeBlockQueue::remove(std::int32_t b) {
  const std::int32_t before = prev_[std::size_t(b)], after = next_[std::size_t(b)];
  next_[std::size_t(before)] = after;
  prev_[std::size_t(after)] = before;
  prev_[std::size_t(b)] = next_[std::size_t(b)] = kUnlinked;
  --size_;
}

std::string FreeBlockQueue::verify(std::vector<std::uint8_t>& member) const {
  member.assign(std::size_t(sentinel_), 0);
  std::int64_t listed = 0;
  std::int32_t before = sentinel_;
  for (std::int32_t b = front(); b != sentinel_; before = b, b = next_[std::size_t(b)]) {
    if (b < 0 || b > sentinel_) return "free list links to block id " + str(b);
    if (prev_[std::size_t(b)] != before) {
      return "free list: block " + str(b) + " links back to " + str(prev_[std::size_t(b)]) +
             " instead of " + str(before);
    }
    if (member[std::size_t(b)]) return "free list holds block " + str(b) + " twice";
    member[std::size_t(b)] = 1;
    ++listed;
  }
  if (prev_[std::size_t(sentinel_)] != before) {
    return "free list: the sentinel links back to " + str(prev_[std::size_t(sentinel_)]);
  }
  for (std::int32_t b = 0; b < sentinel_; ++b) {
    if (!member[std::size_t(b)] &&
        (prev_[std::size_t(b)] != kUnlinked || next_[std::size_t(b)] != kUnlinked)) {
      return "block " + str(b) + " is not in the free list but still linked";
    }
  }
  if (listed != size_) return "free list holds " + str(listed) + " blocks but counts " + str(size_);
  return {};
}

BlockPool::BlockPool(std::int32_t num_blocks)
    : num_blocks_(num_blocks),
      free_(num_blocks),
      ref_(std::size_t(num_blocks), 0),
      last_use_(std::size_t(num_blocks), 0),
      hits_(std::size_t(num_blocks), 0) {}

std::string BlockPool::verify(const std::vector<std::int64_t>& holders) const {
  std::vector<std::uint8_t> member;
  std::string broken = free_.verify(member);
  if (!broken.empty()) return broken;
  for (std::int32_t b = 0; b < num_blocks_; ++b) {
    const std::size_t i = std::size_t(b);
    if (ref_[i] != holders[i]) {
      return "block " + str(b) + " has ref count " + str(ref_[i]) + " but " + str(holders[i]) +
             " sequence(s) hold it";
    }
    if (member[i] && ref_[i] != 0) {
      return "free list holds block " + str(b) + " with ref count " + str(ref_[i]);
    }
    if (!member[i] && ref_[i] == 0) return "block " + str(b) + " is unreferenced but not free";
  }
  return {};
}

}  // namespace tinyserve::detail
