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

void FreeBlockQueue::reserve(std::int32_t num_blocks) {
  prev_.reserve(std::size_t(num_blocks) + 1);
  next_.reserve(std::size_t(num_blocks) + 1);
}

void FreeBlockQueue::resize(std::int32_t num_blocks) {
  const std::int32_t old_sentinel = sentinel_, first = front(), last = back();
  const bool empty = size_ == 0;
  prev_.resize(std::size_t(num_blocks) + 1, kUnlinked);
  next_.resize(std::size_t(num_blocks) + 1, kUnlinked);
  // Growing: the old sentinel's slot is an ordinary (unlinked) block now.
  if (num_blocks > old_sentinel) {
    prev_[std::size_t(old_sentinel)] = next_[std::size_t(old_sentinel)] = kUnlinked;
  }
  sentinel_ = num_blocks;
  const std::size_t s = std::size_t(sentinel_);
  if (empty) {
    prev_[s] = next_[s] = sentinel_;
  } else {
    next_[s] = first;
    prev_[std::size_t(first)] = sentinel_;
    prev_[s] = last;
    next_[std::size_t(last)] = sentinel_;
  }
  for (std::int32_t b = old_sentinel; b < num_blocks; ++b) push_back(b);
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

void BlockPool::reserve(std::int32_t num_blocks) {
  free_.reserve(num_blocks);
  ref_.reserve(std::size_t(num_blocks));
  last_use_.reserve(std::size_t(num_blocks));
  hits_.reserve(std::size_t(num_blocks));
}

void BlockPool::resize(std::int32_t num_blocks) {
  free_.resize(num_blocks);
  ref_.resize(std::size_t(num_blocks), 0);
  last_use_.resize(std::size_t(num_blocks), 0);
  hits_.resize(std::size_t(num_blocks), 0);
  num_blocks_ = num_blocks;
}

std::string BlockPool::verify(const std::vector<std::int64_t>& holders) const {
  if (free_.end() != num_blocks_ || ref_.size() != std::size_t(num_blocks_) ||
      last_use_.size() != std::size_t(num_blocks_) || hits_.size() != std::size_t(num_blocks_) ||
      holders.size() != std::size_t(num_blocks_)) {
    return "the pool of " + str(num_blocks_) + " blocks keeps per-block state of another size";
  }
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
