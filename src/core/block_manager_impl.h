#pragma once

// BlockManager's state, internal to the core: block_manager.cpp implements the manager over it,
// compactor.cpp the compactor (which remaps the same sequences and shares the block pool).

#include <algorithm>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

#include "core/block_pool.h"
#include "core/sha256.h"
#include "tinyserve/block_manager.h"
#include "tinyserve/compactor.h"
#include "tinyserve/errors.h"

namespace tinyserve {

namespace bm {

using detail::Digest;

constexpr std::int64_t kMaxInt32 = std::numeric_limits<std::int32_t>::max();
constexpr std::int64_t kNoPair = -1;

struct DigestHash {
  // A SHA-256 digest is already uniform: any 8 of its bytes make a good bucket hash.
  std::size_t operator()(const Digest& d) const noexcept {
    std::size_t h;
    std::memcpy(&h, d.data(), sizeof h);
    return h;
  }
};

// The parent of a sequence's first block. A fixed domain string rather than a random seed, so
// keys are reproducible across processes (an engine may persist or compare them).
inline const Digest& root_key() {
  static const Digest root = [] {
    static const char kDomain[] = "tinyserve.prefix.v1";
    return detail::sha256(kDomain, sizeof kDomain - 1);
  }();
  return root;
}

inline std::string where(const char* method) {
  return std::string("tinyserve.BlockManager") + (*method ? "." : "") + method + ": ";
}

[[noreturn]] inline void bad_argument(const char* method, const std::string& what) {
  throw std::invalid_argument(bm::where(method) + what);
}

[[noreturn]] inline void unknown_sequence(const char* method, const char* name, std::int64_t id) {
  throw UnknownSequence(bm::where(method) + "unknown " + name + ", got " + std::to_string(id));
}

}  // namespace bm

// The manager's state, shared with the Compactor (which works on the same sequences and pool).
struct BlockManager::Impl {
  using Digest = bm::Digest;
  using DigestHash = bm::DigestHash;
  static constexpr std::int64_t kNoPair = bm::kNoPair;
  static constexpr std::int64_t kMaxInt32 = bm::kMaxInt32;

  // A sequence's block list holds device block ids (>= 0) and, for blocks the compactor
  // offloaded, host block ids encoded as -(host_id + 1).
  static bool on_host(std::int32_t entry) { return entry < 0; }
  static std::int32_t host_entry(std::int32_t host_id) { return -host_id - 1; }
  static std::int32_t host_id(std::int32_t entry) { return -entry - 1; }

  // The compactor's host pool: the host block slots that offloaded blocks occupy.
  struct HostPool {
    explicit HostPool(std::int32_t n) : pool(n), fill(std::size_t(n), 0) {}
    detail::BlockPool pool;
    std::vector<std::int32_t> fill;  // tokens the offloaded block holds
  };

  struct Sequence {
    std::vector<std::int32_t> blocks;
    // Token ids of the partial last block, kept while the sequence is keyable: they are hashed
    // when the block becomes full.
    std::vector<std::int64_t> pending_tokens;
    Digest chain_key;  // key of the last full block (root_key() before the first)
    std::int64_t len = 0;
    // Every token so far came with its id, so the chain of keys is known.
    bool keyable = true;
    std::uint64_t batch_mark = 0;    // append_batch's duplicate detection
    std::int32_t num_offloaded = 0;  // entries of `blocks` on the host
  };

  // dst is kNoPair once the destination was freed before take_copies(): nobody needs the copy.
  struct CopyPair {
    std::int32_t src;
    std::int32_t dst;
  };

  Impl(std::int64_t n, std::int64_t bs, bool enable_caching)
      : num_blocks(std::int32_t(n)),
        block_size(bs),
        caching(enable_caching),
        pool(std::int32_t(n)),
        fill(std::size_t(n), 0),
        copy_reads(std::size_t(n), 0),
        copy_pair(std::size_t(n), kNoPair),
        cow_drops(std::size_t(n), 0) {
    if (caching) {
      keys.resize(std::size_t(n));
      has_key.resize(std::size_t(n), 0);
    }
  }

  std::int32_t num_blocks;  // usable blocks now: resize() changes it
  const std::int64_t block_size;
  const bool caching;
  mutable std::mutex mutex;

  // Ref counts, the free list (its order is the eviction order), recency and frequency.
  detail::BlockPool pool;
  // Per block (structure of arrays).
  std::vector<std::int32_t> fill;        // tokens written into the block by its holders
  std::vector<std::int32_t> copy_reads;  // pending copies that read the block
  std::vector<std::int64_t> copy_pair;   // index in `copies` of the pending copy writing it
  std::vector<Digest> keys;              // only with prefix caching
  std::vector<std::uint8_t> has_key;

  std::unordered_map<Digest, std::int32_t, DigestHash> cache;
  std::unordered_map<std::int64_t, Sequence> seqs;
  std::vector<CopyPair> copies;

  // The compactor's part: its host pool (null until a Compactor attaches) and the plan it
  // handed out that is neither committed nor aborted, as handed out (serial 0: none).
  std::unique_ptr<HostPool> host;
  bool has_compactor = false;
  MovePlan plan;
  std::int64_t plan_target = 0;  // a pending compact plan's num_blocks
  bool plan_pending() const { return plan.serial != 0; }

  // Kept up to date by the helpers below so stats() is O(1); check() recomputes them.
  std::int64_t num_free_read = 0;  // free blocks that a pending copy reads
  std::int64_t num_evictable = 0;
  std::int64_t num_shared = 0;
  std::int64_t num_tokens = 0;
  std::int64_t waste_slots = 0;
  std::int64_t prefix_hits = 0;
  std::int64_t prefix_queries = 0;
  std::int64_t evictions = 0;

  // Scratch reused by every call, so the per-step path allocates only its results.
  std::vector<Sequence*> batch;
  std::vector<std::int32_t> cow_drops;
  std::uint64_t batch_epoch = 0;
  mutable std::vector<const Sequence*> table_rows;

  // ---- prefix lookup -------------------------------------------------------------------------

  // Validates a prompt's token ids; returns how many of its full blocks a prefix lookup checks.
  // The last prompt token is always left to compute (its logits are needed), so a hit covers at
  // most n - 1 tokens, in whole blocks.
  std::int64_t prefix_lookup_blocks(const char* method, const std::int64_t* token_ids,
                                    std::int64_t n) const {
    if (n < 0) bm::bad_argument(method, "num_token_ids must be >= 0, got " + std::to_string(n));
    if (n > 0 && token_ids == nullptr) {
      bm::bad_argument(
          method, "token_ids must not be null when num_token_ids > 0, got " + std::to_string(n));
    }
    return caching && n > 0 ? (n - 1) / block_size : 0;
  }

  // Walks the prompt's chain of block keys over its first max_blocks blocks, calling
  // on_hit(block, key) for each cached one, and stops at the first miss (later keys hash this
  // block's key). Returns the blocks looked up.
  template <class OnHit>
  std::int64_t walk_prefix(const std::int64_t* token_ids, std::int64_t max_blocks,
                           OnHit&& on_hit) const {
    Digest key = bm::root_key();
    std::int64_t looked_up = 0;
    for (std::int64_t i = 0; i < max_blocks; ++i) {
      key = detail::sha256_chain(key, token_ids + i * block_size, std::size_t(block_size));
      ++looked_up;
      auto it = cache.find(key);
      if (it == cache.end()) break;
      on_hit(it->second, key);
    }
    return looked_up;
  }

  // ---- blocks -------------------------------------------------------------------------------

  bool linked(std::int32_t b) const { return pool.free_queue().contains(b); }
  bool keyed(std::int32_t b) const { return caching && has_key[std::size_t(b)]; }
  std::int32_t ref(std::int32_t b) const { return pool.ref_count(b); }
  std::int64_t num_free() const { return pool.num_free(); }

  // The counters over free blocks, kept as blocks enter and leave the free list.
  void entering_free(std::int32_t b) {
    if (copy_reads[std::size_t(b)] > 0) ++num_free_read;
    if (keyed(b)) ++num_evictable;
  }
  void leaving_free(std::int32_t b) {
    if (copy_reads[std::size_t(b)] > 0) --num_free_read;
    if (keyed(b)) --num_evictable;
  }

  void drop_key(std::int32_t b) {
    cache.erase(keys[std::size_t(b)]);
    has_key[std::size_t(b)] = 0;
  }

  // Takes a free block for a new holder, evicting its key if it has one. A copy-on-write
  // destination skips the blocks that pending copies still read: the engine runs all pending
  // copies in one batch, where a block must not be both read and written.
  std::int32_t take_free(bool for_copy) {
    const detail::FreeBlockQueue& queue = pool.free_queue();
    std::int32_t b = queue.front();
    if (for_copy && num_free_read > 0) {
      while (copy_reads[std::size_t(b)] > 0) b = queue.next(b);
    }
    leaving_free(b);
    pool.take(b, 1);
    if (keyed(b)) {
      drop_key(b);
      ++evictions;
    }
    pool.set_history(b, pool.clock(), 0);
    return b;
  }

  void add_ref(std::int32_t b) {
    if (pool.is_free(b)) {
      leaving_free(b);
      waste_slots += block_size - fill[std::size_t(b)];
    }
    if (pool.acquire(b) == 2) ++num_shared;
  }

  void drop_ref(std::int32_t b) {
    if (pool.release(b) == 1) --num_shared;
  }

  void add_read(std::int32_t b) {
    if (copy_reads[std::size_t(b)]++ == 0 && linked(b)) ++num_free_read;
  }

  void release_read(std::int32_t b) {
    if (--copy_reads[std::size_t(b)] == 0 && linked(b)) --num_free_read;
  }

  // A block whose last holder left: keyed blocks go to the back of the free list (kept longest,
  // still findable), others to the front (reused first).
  void release(std::int32_t b) {
    drop_ref(b);
    if (ref(b) > 0) return;
    waste_slots -= block_size - fill[std::size_t(b)];
    const std::int64_t p = copy_pair[std::size_t(b)];
    if (p != kNoPair) {
      release_read(copies[std::size_t(p)].src);
      copies[std::size_t(p)].dst = kNoPair;
      copy_pair[std::size_t(b)] = kNoPair;
      // The copy that fills the block's first tokens will never run: a key would let a later
      // prompt attach a block whose content is incomplete.
      if (keyed(b)) drop_key(b);
    }
    put_free(b);
  }

  // Links a block that just became free: keyed blocks at the back, others at the front.
  void put_free(std::int32_t b) {
    entering_free(b);
    if (keyed(b)) {
      pool.free_queue().push_back(b);
    } else {
      pool.free_queue().push_front(b);
    }
  }

  // Releases one entry of a sequence's block list, on the device or on the host.
  void release_entry(std::int32_t entry) {
    if (!on_host(entry)) return release(entry);
    const std::int32_t h = host_id(entry);
    if (host->pool.release(h) == 0) host->pool.free_queue().push_back(h);
  }

  void add_ref_entry(std::int32_t entry) {
    if (on_host(entry)) {
      host->pool.acquire(host_id(entry));
    } else {
      add_ref(entry);
    }
  }

  // Manager calls that change sequences would invalidate a plan in flight.
  void require_no_plan(const char* method) const {
    if (plan_pending()) {
      throw std::runtime_error(bm::where(method) +
                               "a compactor plan is pending; commit or abort it first, got plan " +
                               std::to_string(plan.serial));
    }
  }

  // Sequences with offloaded blocks have no device block table until recalled.
  void require_on_device(const Sequence& s, std::int64_t seq_id, const char* method) const {
    if (s.num_offloaded > 0) {
      throw std::runtime_error(bm::where(method) + "sequence " + std::to_string(seq_id) + " has " +
                               std::to_string(s.num_offloaded) +
                               " offloaded block(s); recall it first (Compactor.plan_recall), "
                               "got seq_id " +
                               std::to_string(seq_id));
    }
  }

  // ---- sequences ----------------------------------------------------------------------------

  Sequence& find(std::int64_t seq_id, const char* method, const char* name = "seq_id") {
    auto it = seqs.find(seq_id);
    if (it == seqs.end()) bm::unknown_sequence(method, name, seq_id);
    return it->second;
  }

  const Sequence& find(std::int64_t seq_id, const char* method) const {
    auto it = seqs.find(seq_id);
    if (it == seqs.end()) bm::unknown_sequence(method, "seq_id", seq_id);
    return it->second;
  }

  std::int64_t blocks_for(std::int64_t tokens) const {
    return (tokens + block_size - 1) / block_size;
  }

  // Gives the sequence its own copy of its shared partial last block.
  void copy_on_write(Sequence& s) {
    const std::int32_t src = s.blocks.back();
    // If src is itself still waiting for its content, the copy reads where that comes from:
    // after the batch both blocks hold the same data, and no block is read and written.
    const std::int64_t p = copy_pair[std::size_t(src)];
    const std::int32_t read = p == kNoPair ? src : copies[std::size_t(p)].src;
    const std::int32_t dst = take_free(/*for_copy=*/true);
    fill[std::size_t(dst)] = fill[std::size_t(src)];
    waste_slots += block_size - fill[std::size_t(dst)];
    copy_pair[std::size_t(dst)] = std::int64_t(copies.size());
    copies.push_back({read, dst});
    add_read(read);
    drop_ref(src);
    s.blocks.back() = dst;
  }

  void key_full_block(Sequence& s, std::int32_t b) {
    s.chain_key =
        detail::sha256_chain(s.chain_key, s.pending_tokens.data(), std::size_t(block_size));
    s.pending_tokens.clear();
    // A key maps to one block: a second block with the same content stays unkeyed.
    if (cache.try_emplace(s.chain_key, b).second) {
      keys[std::size_t(b)] = s.chain_key;
      has_key[std::size_t(b)] = 1;
    }
  }

  void write_tokens(Sequence& s, std::int64_t n, const std::int64_t* token_ids,
                    std::int64_t* slots) {
    if (caching && s.keyable && token_ids == nullptr) {
      s.keyable = false;
      s.pending_tokens.clear();
    }
    const bool keying = caching && s.keyable;
    std::int64_t done = 0;
    while (done < n) {
      const std::int64_t offset = s.len % block_size;
      if (offset == 0) {
        const std::int32_t b = take_free(/*for_copy=*/false);
        fill[std::size_t(b)] = 0;
        waste_slots += block_size;
        s.blocks.push_back(b);
      }
      const std::int32_t b = s.blocks.back();
      const std::int64_t take = std::min(block_size - offset, n - done);
      const std::int64_t base = std::int64_t(b) * block_size + offset;
      for (std::int64_t i = 0; i < take; ++i) slots[done + i] = base + i;
      fill[std::size_t(b)] += std::int32_t(take);
      waste_slots -= take;
      pool.stamp(b);
      if (keying) {
        s.pending_tokens.insert(s.pending_tokens.end(), token_ids + done, token_ids + done + take);
        if (offset + take == block_size) key_full_block(s, b);
      }
      s.len += take;
      done += take;
    }
    num_tokens += n;
  }

  // append() and append_batch() in two steps: prepare_append validates everything and counts
  // the blocks, throwing before anything changes (and before the caller sizes the slots);
  // execute_append then cannot fail. Returns the number of slots. token_ids only when
  // count == 1.
  std::int64_t prepare_append(const std::int64_t* seq_ids, const std::int64_t* counts,
                              std::int64_t count, const char* method) {
    require_no_plan(method);
    if (count < 0) bm::bad_argument(method, "count must be >= 0, got " + std::to_string(count));
    if (count > 0 && (seq_ids == nullptr || counts == nullptr)) {
      bm::bad_argument(method, "seq_ids and num_tokens must not be null");
    }
    ++batch_epoch;
    batch.clear();
    std::int64_t total = 0;
    for (std::int64_t i = 0; i < count; ++i) {
      Sequence& s = find(seq_ids[i], method);
      require_on_device(s, seq_ids[i], method);
      const std::int64_t n = counts[i];
      if (n < 0) bm::bad_argument(method, "num_tokens must be >= 0, got " + std::to_string(n));
      if (n > kMaxInt32 - s.len) {
        bm::bad_argument(method, "sequence length must stay <= " + std::to_string(kMaxInt32) +
                                     ", got " + std::to_string(s.len) + " + " + std::to_string(n));
      }
      // Rejected rather than applied twice: an engine appends once per sequence and step, so
      // a repeated id is a scheduling bug.
      if (s.batch_mark == batch_epoch) {
        bm::bad_argument(method,
                         "seq_ids must be unique, got " + std::to_string(seq_ids[i]) + " twice");
      }
      s.batch_mark = batch_epoch;
      batch.push_back(&s);
      total += n;
    }

    // Copy-on-write counts are simulated in batch order: when every holder of a shared
    // block appends, the last one finds it unshared and writes in place.
    std::int64_t new_blocks = 0, copies_needed = 0;
    for (std::int64_t i = 0; i < count; ++i) {
      const Sequence& s = *batch[std::size_t(i)];
      const std::int64_t n = counts[i];
      if (n == 0) continue;
      new_blocks += blocks_for(s.len + n) - std::int64_t(s.blocks.size());
      if (s.len % block_size != 0) {
        const std::size_t last = std::size_t(s.blocks.back());
        if (ref(std::int32_t(last)) - cow_drops[last] > 1) {
          ++copies_needed;
          ++cow_drops[last];
        }
      }
    }
    for (std::int64_t i = 0; i < count; ++i) {
      const Sequence& s = *batch[std::size_t(i)];
      if (counts[i] > 0 && s.len % block_size != 0) cow_drops[std::size_t(s.blocks.back())] = 0;
    }
    if (copies_needed + new_blocks > num_free()) {
      throw OutOfBlocks(bm::where(method) + "need " + std::to_string(copies_needed + new_blocks) +
                        " free blocks, got " + std::to_string(num_free()));
    }
    if (copies_needed > num_free() - num_free_read) {
      throw OutOfBlocks(bm::where(method) + "need " + std::to_string(copies_needed) +
                        " free blocks that no pending copy reads (copy-on-write), got " +
                        std::to_string(num_free() - num_free_read) +
                        "; call take_copies() and run the copies first");
    }
    return total;
  }

  // The batch that prepare_append just checked; slots_out holds its returned count.
  void execute_append(const std::int64_t* counts, std::int64_t count, const std::int64_t* token_ids,
                      std::int64_t* slots_out) {
    // Copies first, so they take only blocks that no pending copy reads; new blocks may then
    // take any free block.
    for (std::int64_t i = 0; i < count; ++i) {
      Sequence& s = *batch[std::size_t(i)];
      if (counts[i] > 0 && s.len % block_size != 0 && ref(s.blocks.back()) > 1) {
        copy_on_write(s);
      }
    }
    std::int64_t offset = 0;
    for (std::int64_t i = 0; i < count; ++i) {
      if (counts[i] == 0) continue;
      write_tokens(*batch[std::size_t(i)], counts[i], token_ids, slots_out + offset);
      offset += counts[i];
    }
  }

  // ---- check() ------------------------------------------------------------------------------

  void check() const;
  template <class Fail>
  void check_plan(Fail&& fail) const;
};

}  // namespace tinyserve
