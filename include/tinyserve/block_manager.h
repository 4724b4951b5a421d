#pragma once

#include <cstdint>
#include <memory>
#include <utility>
#include <vector>

#include "tinyserve/export.h"

namespace tinyserve {

class Compactor;

// The engine's allocator of physical KV-cache blocks. It owns no tensor memory: it hands out
// block ids and slot ids (slot = block * block_size + offset) and says which block copies the
// engine must run. All methods are thread-safe.
//
// Invariants (check() verifies them all):
// - a block's ref count equals the number of sequence block lists that hold it;
// - the free list holds exactly the blocks with ref count 0, each once; its order is the
//   eviction order (head first);
// - a block that holds a prefix-cache key is the one the key maps to, and the map holds no
//   other entries;
// - a sequence holds ceil(len / block_size) blocks.
//
// Failed calls change nothing. The free list and the ref counts are a block pool shared with
// the Compactor; while a compactor plan is pending, calls that change sequences (add_sequence,
// append, append_batch, fork, free) throw std::runtime_error.
class TINYSERVE_API BlockManager {
 public:
  struct Stats {
    std::int64_t num_blocks = 0;
    std::int64_t num_free = 0;       // blocks with ref count 0 (cached ones included)
    std::int64_t num_used = 0;       // blocks with ref count > 0
    std::int64_t num_cached = 0;     // blocks that hold a prefix-cache key, used or free
    std::int64_t num_evictable = 0;  // free blocks that still hold a key
    std::int64_t num_shared = 0;     // blocks with ref count > 1
    std::int64_t num_sequences = 0;
    std::int64_t num_tokens = 0;      // tokens held, summed over sequences
    std::int64_t waste_slots = 0;     // slots of used blocks that hold no token of any sequence
    std::int64_t prefix_hits = 0;     // blocks attached from the prefix cache, since creation
    std::int64_t prefix_queries = 0;  // full prompt blocks looked up, since creation
    std::int64_t evictions = 0;       // cached blocks whose key was dropped to reuse them
    std::int64_t num_offloaded = 0;   // host blocks holding offloaded blocks (see Compactor)

    // (name, value) of every field above, in order.
    std::vector<std::pair<const char*, std::int64_t>> items() const;
  };

  // What add_sequence would attach for a prompt, computed without changing anything.
  struct PrefixMatch {
    std::int64_t tokens = 0;       // tokens the cached blocks cover (at most prompt length - 1)
    std::int64_t blocks = 0;       // cached blocks that would be attached
    std::int64_t free_blocks = 0;  // of those, blocks now free: attaching takes them out of the
                                   // free list, so they count against num_free_blocks()
  };

  struct BlockTable {
    std::vector<std::int32_t> table;  // row-major [batch, width], padded with 0
    std::vector<std::int32_t> lens;   // [batch]
    std::int64_t batch = 0;
    std::int64_t width = 0;  // max blocks over the batch
  };

  BlockManager(std::int64_t num_blocks, std::int64_t block_size,
               bool enable_prefix_caching = false);
  ~BlockManager();
  BlockManager(const BlockManager&) = delete;
  BlockManager& operator=(const BlockManager&) = delete;

  // Registers a sequence. With prefix caching and token ids, attaches the longest chain of
  // cached full blocks matching the prompt's prefix and returns the tokens they cover (at most
  // num_token_ids - 1); those tokens count as appended. Otherwise returns 0.
  std::int64_t add_sequence(std::int64_t seq_id, const std::int64_t* token_ids = nullptr,
                            std::int64_t num_token_ids = 0);

  // The prefix-cache lookup of add_sequence, read-only: no sequence is added, no block changes
  // hands or LRU position, no statistic counts it. For admission control before add_sequence.
  PrefixMatch match_prefix(const std::int64_t* token_ids, std::int64_t num_token_ids) const;

  // Reserves the slots of the sequence's next num_tokens tokens, writing them to slots_out
  // (num_tokens entries). A shared partial last block is copied first (copy-on-write). Token ids
  // (num_tokens of them, or null) key each block that becomes full. Throws OutOfBlocks and
  // changes nothing when blocks run out.
  void append(std::int64_t seq_id, std::int64_t num_tokens, const std::int64_t* token_ids,
              std::int64_t* slots_out);
  std::vector<std::int64_t> append(std::int64_t seq_id, std::int64_t num_tokens,
                                   const std::int64_t* token_ids = nullptr);

  // append() for every listed sequence, slots concatenated in order into slots_out (the sum of
  // num_tokens entries); all-or-nothing over the whole batch.
  void append_batch(const std::int64_t* seq_ids, const std::int64_t* num_tokens, std::int64_t count,
                    std::int64_t* slots_out);
  // The same, returning the slots: num_tokens has num_counts entries (which must equal count),
  // or one count for every sequence. The whole batch is checked before the slots are sized.
  std::vector<std::int64_t> append_batch(const std::int64_t* seq_ids, std::int64_t count,
                                         const std::int64_t* num_tokens, std::int64_t num_counts);
  std::vector<std::int64_t> append_batch(const std::int64_t* seq_ids, std::int64_t count,
                                         std::int64_t num_tokens_each);

  // The child shares every block of the parent; no copy until one of them appends into a shared
  // partial block.
  void fork(std::int64_t parent_id, std::int64_t child_id);

  // Releases the sequence's blocks, tail first.
  void free(std::int64_t seq_id);

  // Throws std::runtime_error for a sequence with offloaded blocks (recall it first).
  BlockTable block_table(const std::int64_t* seq_ids, std::int64_t count) const;

  // Changes the number of usable blocks to num_blocks (0 .. 2**26), for a cache pool that was
  // shrunk or grown to match. Growing appends free blocks num_blocks()..num_blocks-1 at the
  // back of the free list. Shrinking drops blocks num_blocks.. (the prefix-cache keys of cached
  // free ones are dropped, counted as evictions) and throws std::runtime_error, changing nothing,
  // if any of them is referenced or read by a pending copy-on-write pair, or while a compactor
  // plan is pending: compact first (Compactor::plan_compact(num_blocks)).
  void resize(std::int64_t num_blocks);

  // The pending copy-on-write (src, dst) pairs, emptied by the call.
  std::vector<std::pair<std::int32_t, std::int32_t>> take_copies();

  std::int64_t seq_len(std::int64_t seq_id) const;
  std::vector<std::int32_t> block_ids(std::int64_t seq_id) const;
  bool has_sequence(std::int64_t seq_id) const;
  std::int64_t num_free_blocks() const;
  std::int64_t num_blocks() const;
  std::int64_t block_size() const;
  bool prefix_caching() const;
  Stats stats() const;

  // Verifies every invariant; throws std::logic_error naming the first violation.
  void check() const;

  // The state, internal to the core (the Compactor works on it too).
  struct Impl;

 private:
  friend class Compactor;
  std::unique_ptr<Impl> impl_;
};

}  // namespace tinyserve
