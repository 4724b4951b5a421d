#pragma once

#include <cstdint>
#include <vector>

#include "tinyserve/block_manager.h"
#include "tinyserve/export.h"

namespace tinyserve {

// Block moves for the engine to run, then commit (or abort). src and dst hold one pair per
// moved block; a pair never reads a block that another pair writes.
//   Evict:   src = cached, unreferenced blocks whose prefix-cache keys are dropped; no data moves
//            (dst is empty).
//   Offload: device block src[i] -> host block dst[i] (swap_blocks, device to host).
//   Recall:  host block src[i] -> device block dst[i] (swap_blocks, host to device).
//   Compact: device block src[i] -> device block dst[i] (copy_blocks).
struct TINYSERVE_API MovePlan {
  enum class Kind { Evict, Offload, Recall, Compact };

  Kind kind = Kind::Evict;
  std::vector<std::int32_t> src;
  std::vector<std::int32_t> dst;
  // The plan's id, unique over the process: commit and abort accept only the pending one (a
  // plan of another compactor never matches).
  std::uint64_t serial = 0;

  // "evict", "offload", "recall" or "compact".
  const char* kind_name() const;
  // Bytes the plan copies given the bytes of one block over every cache tensor (0 for evict);
  // std::invalid_argument when bytes_per_block is negative or the product overflows int64.
  std::int64_t num_bytes(std::int64_t bytes_per_block) const;
};

// The LRU memory compactor over a BlockManager: it shares the manager's block pool and
// sequences, keeps per block recency (the step it was last appended to or attended) and
// frequency (how often page selection picked it), and plans moves that free device memory
// without losing a token. It plans; the engine executes the copies; commit() applies the plan
// to the manager's tables. One plan at a time: planning again before commit or abort throws
// std::runtime_error, and so do the manager's calls that change sequences. Plans are
// all-or-nothing: one that cannot be made whole throws OutOfBlocks and changes nothing.
// Planning also requires that the manager holds no pending copy-on-write pairs (take_copies()
// first). A manager takes one compactor at a time (a later one must have the same
// num_host_blocks while offloaded blocks remain); the manager must outlive it.
// Thread-safe (the manager's lock).
class TINYSERVE_API Compactor {
 public:
  explicit Compactor(BlockManager& manager, std::int64_t num_host_blocks = 0);
  ~Compactor();
  Compactor(const Compactor&) = delete;
  Compactor& operator=(const Compactor&) = delete;

  // Recency: the listed sequences were attended this step (their device blocks become the most
  // recent). Every id is checked before anything changes.
  void touch(const std::int64_t* seq_ids, std::int64_t count);
  // Frequency: adds per-block hit counts (select_pages' `hits`, num_blocks entries, >= 0).
  void record_hits(const std::int64_t* hits, std::int64_t count);

  // Drops the prefix-cache keys of num_blocks cached, unreferenced blocks, least recently
  // used first. No data moves.
  MovePlan plan_evict(std::int64_t num_blocks);
  // num_blocks blocks of live sequences, least recent first, then least often selected, then
  // lowest id, into free host blocks.
  MovePlan plan_offload(std::int64_t num_blocks);
  // Preemption by offload: every device block held only by the listed sequences (ref count
  // equal to the listed holders; blocks shared with other sequences stay on the device), in id
  // order, into free host blocks. Every id is checked first; an id may repeat.
  MovePlan plan_offload_sequences(const std::int64_t* seq_ids, std::int64_t count);
  // Every offloaded block of the listed sequences back into free device blocks.
  MovePlan plan_recall(const std::int64_t* seq_ids, std::int64_t count);
  // Moves the used blocks at or above num_blocks into free blocks below it (in free-list order:
  // uncached ones first, then cached ones in release order, oldest first), so that every used
  // block id is below num_blocks (-1: the number of used blocks), and drops the keys of the
  // cached free blocks at or above it (evicted rather than moved). On commit the free blocks at
  // or above num_blocks go to the back of the free list in id order, so they are taken last.
  MovePlan plan_compact(std::int64_t num_blocks = -1);

  // After the engine ran the plan's copies: remaps every sequence's blocks, frees the sources.
  void commit(const MovePlan& plan);
  // Forgets the plan; nothing changes.
  void abort(const MovePlan& plan);

  std::int64_t num_host_blocks() const;
  std::int64_t num_free_host_blocks() const;
  // Blocks of the sequence now on the host.
  std::int64_t num_offloaded(std::int64_t seq_id) const;
  bool has_pending_plan() const;

 private:
  BlockManager::Impl* m_;
};

}  // namespace tinyserve
