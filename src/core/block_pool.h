#pragma once

// The pool of physical blocks shared by BlockManager (which hands blocks to sequences) and
// Compactor (which moves them between ids and between device and host): per-block reference
// counts, the free queue, and the recency and frequency the compactor ranks blocks by.
// Internal to the core; not thread-safe by itself (its owner holds the lock).

#include <cstdint>
#include <limits>
#include <string>
#include <vector>

namespace tinyserve::detail {

// The free blocks as an intrusive doubly linked list over block ids, closed through a sentinel
// node whose id is the pool size. Links live in two arrays indexed by block id, so removing a
// block from the middle (a prefix-cache hit on a free block) is O(1), and the list order is the
// reuse order: the front is taken first.
class FreeBlockQueue {
 public:
  static constexpr std::int32_t kUnlinked = -1;

  // All blocks 0..num_blocks-1 free, in id order.
  explicit FreeBlockQueue(std::int32_t num_blocks);

  std::int32_t end() const { return sentinel_; }  // the id after the last block
  std::int32_t front() const { return next_[std::size_t(sentinel_)]; }
  std::int32_t back() const { return prev_[std::size_t(sentinel_)]; }
  std::int32_t next(std::int32_t b) const { return next_[std::size_t(b)]; }
  bool contains(std::int32_t b) const { return prev_[std::size_t(b)] != kUnlinked; }
  std::int64_t size() const { return size_; }

  void push_front(std::int32_t b) { link_after(sentinel_, b); }
  void push_back(std::int32_t b) { link_after(prev_[std::size_t(sentinel_)], b); }
  void remove(std::int32_t b);

  // Makes the id space 0..num_blocks-1. Shrinking requires every block at or above num_blocks
  // to be unlinked already; growing appends the new blocks at the back in id order. The caller
  // reserves first (reserve() may throw, resize() then does not).
  void reserve(std::int32_t num_blocks);
  void resize(std::int32_t num_blocks);

  // Walks the list from the front and returns an empty string, or the first broken invariant:
  // links that disagree both ways, a block listed twice, a block id out of range. member[b] is
  // set for every listed block.
  std::string verify(std::vector<std::uint8_t>& member) const;

 private:
  void link_after(std::int32_t at, std::int32_t b);

  std::int32_t sentinel_;
  std::int64_t size_ = 0;
  std::vector<std::int32_t> prev_;  // num_blocks + 1 entries: the sentinel is the last
  std::vector<std::int32_t> next_;
};

// Reference counts over a FreeBlockQueue. Invariant: a block is in the free queue iff its ref
// count is 0. Where a released block goes in the queue (front: reused first; back: kept
// longest) is the owner's choice, so acquire/release only count and the owner links.
//
// Recency (last_use: the clock value when the block was last written or attended) and
// frequency (hits: how often page selection picked it) are per block and move with the block's
// content when the compactor moves it.
class BlockPool {
 public:
  // Sized so that the per-block bookkeeping of the largest pool (about kBytesPerBlock each)
  // stays a few GiB of host memory.
  static constexpr std::int64_t kMaxBlocks = std::int64_t(1) << 26;
  static constexpr std::int64_t kBytesPerBlock = 48;

  explicit BlockPool(std::int32_t num_blocks);

  std::int32_t num_blocks() const { return num_blocks_; }
  // Changes the number of blocks. Shrinking requires every block at or above num_blocks to be
  // free and already out of the free queue; new blocks are free, at the back of the queue, with
  // no history. reserve() first: it may throw, resize() then does not.
  void reserve(std::int32_t num_blocks);
  void resize(std::int32_t num_blocks);
  std::int32_t ref_count(std::int32_t b) const { return ref_[std::size_t(b)]; }
  bool is_free(std::int32_t b) const { return ref_[std::size_t(b)] == 0; }

  FreeBlockQueue& free_queue() { return free_; }
  const FreeBlockQueue& free_queue() const { return free_; }
  std::int64_t num_free() const { return free_.size(); }

  // One more holder; a free block leaves the free queue. Returns the new count.
  std::int32_t acquire(std::int32_t b) {
    if (ref_[std::size_t(b)] == 0) free_.remove(b);
    return ++ref_[std::size_t(b)];
  }
  // One holder fewer. Returns the new count; at 0 the caller puts the block in the free queue.
  std::int32_t release(std::int32_t b) { return --ref_[std::size_t(b)]; }
  // Takes a free block for `holders` holders at once (a block moved in with its ref count).
  void take(std::int32_t b, std::int32_t holders) {
    free_.remove(b);
    ref_[std::size_t(b)] = holders;
  }
  // Drops every holder at once (a block whose content moved out); the caller links it.
  void clear(std::int32_t b) { ref_[std::size_t(b)] = 0; }

  // ---- recency and frequency ----
  std::uint64_t clock() const { return clock_; }
  std::uint64_t tick() { return ++clock_; }
  void stamp(std::int32_t b) { last_use_[std::size_t(b)] = clock_; }
  std::uint64_t last_use(std::int32_t b) const { return last_use_[std::size_t(b)]; }
  std::int64_t hits(std::int32_t b) const { return hits_[std::size_t(b)]; }
  void add_hits(std::int32_t b, std::int64_t n) {
    std::int64_t& h = hits_[std::size_t(b)];
    h = n > std::numeric_limits<std::int64_t>::max() - h ? std::numeric_limits<std::int64_t>::max()
                                                         : h + n;
  }
  // The content of `from` now lives in `to`: its recency and frequency go with it.
  void move_history(std::int32_t from, std::int32_t to) {
    last_use_[std::size_t(to)] = last_use_[std::size_t(from)];
    hits_[std::size_t(to)] = hits_[std::size_t(from)];
    last_use_[std::size_t(from)] = 0;
    hits_[std::size_t(from)] = 0;
  }
  void set_history(std::int32_t b, std::uint64_t last_use, std::int64_t hits) {
    last_use_[std::size_t(b)] = last_use;
    hits_[std::size_t(b)] = hits;
  }

  // Verifies the queue and that it holds exactly the blocks with ref count 0, given the holders
  // the owner counted per block. Returns an empty string or the first violation.
  std::string verify(const std::vector<std::int64_t>& holders) const;

 private:
  std::int32_t num_blocks_;
  FreeBlockQueue free_;
  std::vector<std::int32_t> ref_;
  std::uint64_t clock_ = 0;
  std::vector<std::uint64_t> last_use_;
  std::vector<std::int64_t> hits_;
};

}  // namespace tinyserve::detail
