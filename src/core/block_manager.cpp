#include "tinyserve/block_manager.h"

#include <algorithm>
#include <cstring>
#include <limits>
#include <mutex>
#include <stdexcept>
#include <string>
#include <unordered_map>

#include "core/sha256.h"
#include "tinyserve/errors.h"

namespace tinyserve {

namespace {

using detail::Digest;

constexpr std::int64_t kMaxInt32 = std::numeric_limits<std::int32_t>::max();
constexpr std::int32_t kUnlinked = -1;  // prev/next of a block that is not in the free list
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
const Digest& root_key() {
  static const Digest root = [] {
    static const char kDomain[] = "tinyserve.prefix.v1";
    return detail::sha256(kDomain, sizeof kDomain - 1);
  }();
  return root;
}

std::string where(const char* method) {
  return std::string("tinyserve.BlockManager") + (*method ? "." : "") + method + ": ";
}

[[noreturn]] void bad_argument(const char* method, const std::string& what) {
  throw std::invalid_argument(where(method) + what);
}

[[noreturn]] void unknown_sequence(const char* method, const char* name, std::int64_t id) {
  throw UnknownSequence(where(method) + "unknown " + name + ", got " + std::to_string(id));
}

}  // namespace

struct BlockManager::Impl {
  struct Sequence {
    std::vector<std::int32_t> blocks;
    // Token ids of the partial last block, kept while the sequence is keyable: they are hashed
    // when the block becomes full.
    std::vector<std::int64_t> pending_tokens;
    Digest chain_key;  // key of the last full block (root_key() before the first)
    std::int64_t len = 0;
    // Every token so far came with its id, so the chain of keys is known.
    bool keyable = true;
    std::uint64_t batch_mark = 0;  // append_batch's duplicate detection
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
        ref(std::size_t(n), 0),
        prev(std::size_t(n) + 1),
        next(std::size_t(n) + 1),
        fill(std::size_t(n), 0),
        copy_reads(std::size_t(n), 0),
        copy_pair(std::size_t(n), kNoPair),
        cow_drops(std::size_t(n), 0) {
    if (caching) {
      keys.resize(std::size_t(n));
      has_key.resize(std::size_t(n), 0);
    }
    // Free list 0, 1, ..., n-1 in id order, closed through the sentinel.
    const std::int32_t sentinel = num_blocks;
    for (std::int32_t b = 0; b <= sentinel; ++b) {
      prev[std::size_t(b)] = b == 0 ? sentinel : b - 1;
      next[std::size_t(b)] = b == sentinel ? 0 : b + 1;
    }
    num_free = n;
  }

  const std::int32_t num_blocks;  // also the id of the free list's sentinel node
  const std::int64_t block_size;
  const bool caching;
  mutable std::mutex mutex;

  // Per block (structure of arrays). prev/next have one more entry: the sentinel.
  std::vector<std::int32_t> ref;
  std::vector<std::int32_t> prev;
  std::vector<std::int32_t> next;
  std::vector<std::int32_t> fill;        // tokens written into the block by its holders
  std::vector<std::int32_t> copy_reads;  // pending copies that read the block
  std::vector<std::int64_t> copy_pair;   // index in `copies` of the pending copy writing it
  std::vector<Digest> keys;              // only with prefix caching
  std::vector<std::uint8_t> has_key;

  std::unordered_map<Digest, std::int32_t, DigestHash> cache;
  std::unordered_map<std::int64_t, Sequence> seqs;
  std::vector<CopyPair> copies;

  // Kept up to date by the helpers below so stats() is O(1); check() recomputes them.
  std::int64_t num_free = 0;
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
    if (n < 0) bad_argument(method, "num_token_ids must be >= 0, got " + std::to_string(n));
    if (n > 0 && token_ids == nullptr) {
      bad_argument(method,
                   "token_ids must not be null when num_token_ids > 0, got " + std::to_string(n));
    }
    return caching && n > 0 ? (n - 1) / block_size : 0;
  }

  // Walks the prompt's chain of block keys over its first max_blocks blocks, calling
  // on_hit(block, key) for each cached one, and stops at the first miss (later keys hash this
  // block's key). Returns the blocks looked up.
  template <class OnHit>
  std::int64_t walk_prefix(const std::int64_t* token_ids, std::int64_t max_blocks,
                           OnHit&& on_hit) const {
    Digest key = root_key();
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

  bool linked(std::int32_t b) const { return prev[std::size_t(b)] != kUnlinked; }
  bool keyed(std::int32_t b) const { return caching && has_key[std::size_t(b)]; }

  void link_after(std::int32_t at, std::int32_t b) {
    const std::int32_t after = next[std::size_t(at)];
    prev[std::size_t(b)] = at;
    next[std::size_t(b)] = after;
    next[std::size_t(at)] = b;
    prev[std::size_t(after)] = b;
    ++num_free;
    if (copy_reads[std::size_t(b)] > 0) ++num_free_read;
    if (keyed(b)) ++num_evictable;
  }

  void unlink(std::int32_t b) {
    const std::int32_t before = prev[std::size_t(b)], after = next[std::size_t(b)];
    next[std::size_t(before)] = after;
    prev[std::size_t(after)] = before;
    prev[std::size_t(b)] = next[std::size_t(b)] = kUnlinked;
    --num_free;
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
    std::int32_t b = next[std::size_t(num_blocks)];
    if (for_copy && num_free_read > 0) {
      while (copy_reads[std::size_t(b)] > 0) b = next[std::size_t(b)];
    }
    unlink(b);
    if (keyed(b)) {
      drop_key(b);
      ++evictions;
    }
    ref[std::size_t(b)] = 1;
    return b;
  }

  void add_ref(std::int32_t b) {
    if (ref[std::size_t(b)] == 0) {
      unlink(b);
      waste_slots += block_size - fill[std::size_t(b)];
    }
    if (++ref[std::size_t(b)] == 2) ++num_shared;
  }

  void drop_ref(std::int32_t b) {
    if (ref[std::size_t(b)]-- == 2) --num_shared;
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
    if (ref[std::size_t(b)] > 0) return;
    waste_slots -= block_size - fill[std::size_t(b)];
    const std::int64_t p = copy_pair[std::size_t(b)];
    if (p != kNoPair) {
      release_read(copies[std::size_t(p)].src);
      copies[std::size_t(p)].dst = kNoPair;
      copy_pair[std::size_t(b)] = kNoPair;
    }
    link_after(keyed(b) ? prev[std::size_t(num_blocks)] : num_blocks, b);
  }

  // ---- sequences ----------------------------------------------------------------------------

  Sequence& find(std::int64_t seq_id, const char* method, const char* name = "seq_id") {
    auto it = seqs.find(seq_id);
    if (it == seqs.end()) unknown_sequence(method, name, seq_id);
    return it->second;
  }

  const Sequence& find(std::int64_t seq_id, const char* method) const {
    auto it = seqs.find(seq_id);
    if (it == seqs.end()) unknown_sequence(method, "seq_id", seq_id);
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
      if (keying) {
        s.pending_tokens.insert(s.pending_tokens.end(), token_ids + done, token_ids + done + take);
        if (offset + take == block_size) key_full_block(s, b);
      }
      s.len += take;
      done += take;
    }
    num_tokens += n;
  }

  // append() and append_batch(): validate everything, count the blocks, then execute, so a
  // failed call changes nothing. token_ids only when count == 1.
  void append(const std::int64_t* seq_ids, const std::int64_t* counts, std::int64_t count,
              const std::int64_t* token_ids, std::int64_t* slots_out, const char* method) {
    if (count < 0) bad_argument(method, "count must be >= 0, got " + std::to_string(count));
    if (count > 0 && (seq_ids == nullptr || counts == nullptr)) {
      bad_argument(method, "seq_ids and num_tokens must not be null");
    }
    ++batch_epoch;
    batch.clear();
    std::int64_t total = 0;
    for (std::int64_t i = 0; i < count; ++i) {
      Sequence& s = find(seq_ids[i], method);
      const std::int64_t n = counts[i];
      if (n < 0) bad_argument(method, "num_tokens must be >= 0, got " + std::to_string(n));
      if (n > kMaxInt32 - s.len) {
        bad_argument(method, "sequence length must stay <= " + std::to_string(kMaxInt32) +
                                 ", got " + std::to_string(s.len) + " + " + std::to_string(n));
      }
      // Rejected rather than applied twice: an engine appends once per sequence and step, so
      // a repeated id is a scheduling bug.
      if (s.batch_mark == batch_epoch) {
        bad_argument(method,
                     "seq_ids must be unique, got " + std::to_string(seq_ids[i]) + " twice");
      }
      s.batch_mark = batch_epoch;
      batch.push_back(&s);
      total += n;
    }
    if (total > 0 && slots_out == nullptr) bad_argument(method, "slots_out must not be null");

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
        if (ref[last] - cow_drops[last] > 1) {
          ++copies_needed;
          ++cow_drops[last];
        }
      }
    }
    for (std::int64_t i = 0; i < count; ++i) {
      const Sequence& s = *batch[std::size_t(i)];
      if (counts[i] > 0 && s.len % block_size != 0) cow_drops[std::size_t(s.blocks.back())] = 0;
    }
    if (copies_needed + new_blocks > num_free) {
      throw OutOfBlocks(where(method) + "need " + std::to_string(copies_needed + new_blocks) +
                        " free blocks, got " + std::to_string(num_free));
    }
    if (copies_needed > num_free - num_free_read) {
      throw OutOfBlocks(where(method) + "need " + std::to_string(copies_needed) +
                        " free blocks that no pending copy reads (copy-on-write), got " +
                        std::to_string(num_free - num_free_read) +
                        "; call take_copies() and run the copies first");
    }

    // Copies first, so they take only blocks that no pending copy reads; new blocks may then
    // take any free block.
    for (std::int64_t i = 0; i < count; ++i) {
      Sequence& s = *batch[std::size_t(i)];
      if (counts[i] > 0 && s.len % block_size != 0 && ref[std::size_t(s.blocks.back())] > 1) {
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
};

void BlockManager::Impl::check() const {
  auto fail = [](const std::string& what) {
    throw std::logic_error("tinyserve.BlockManager.check: " + what);
  };
  auto str = [](std::int64_t v) { return std::to_string(v); };
  const std::size_t n = std::size_t(num_blocks);

  std::vector<std::int64_t> holders(n, 0);
  std::vector<std::int64_t> held_by(n, -1);  // the sequence seen last, to catch repeats
  std::int64_t tokens = 0, seq_index = 0;
  for (const auto& [id, s] : seqs) {
    if (s.len < 0 || std::int64_t(s.blocks.size()) != blocks_for(s.len)) {
      fail("sequence " + str(id) + " holds " + str(std::int64_t(s.blocks.size())) + " blocks for " +
           str(s.len) + " tokens");
    }
    for (std::size_t i = 0; i < s.blocks.size(); ++i) {
      const std::int32_t b = s.blocks[i];
      if (b < 0 || b >= num_blocks) fail("sequence " + str(id) + " holds block id " + str(b));
      if (held_by[std::size_t(b)] == seq_index) {
        fail("sequence " + str(id) + " holds block " + str(b) + " twice");
      }
      held_by[std::size_t(b)] = seq_index;
      ++holders[std::size_t(b)];
      const std::int64_t in_block = std::min(block_size, s.len - std::int64_t(i) * block_size);
      if (fill[std::size_t(b)] != in_block) {
        fail("block " + str(b) + " holds " + str(fill[std::size_t(b)]) + " tokens but sequence " +
             str(id) + " has " + str(in_block) + " in it");
      }
    }
    const bool keeps_tokens = caching && s.keyable;
    const std::int64_t pending = keeps_tokens ? s.len % block_size : 0;
    if (std::int64_t(s.pending_tokens.size()) != pending) {
      fail("sequence " + str(id) + " keeps " + str(std::int64_t(s.pending_tokens.size())) +
           " token ids of its partial block, expected " + str(pending));
    }
    tokens += s.len;
    ++seq_index;
  }

  std::int64_t shared = 0, waste = 0;
  for (std::size_t b = 0; b < n; ++b) {
    if (ref[b] != holders[b]) {
      fail("block " + str(std::int64_t(b)) + " has ref count " + str(ref[b]) + " but " +
           str(holders[b]) + " sequence(s) hold it");
    }
    if (ref[b] > 1) ++shared;
    if (ref[b] > 0) waste += block_size - fill[b];
  }

  // The free list: properly linked both ways, exactly the blocks with ref count 0.
  std::vector<std::uint8_t> seen(n, 0);
  std::int64_t listed = 0, evictable = 0, free_read = 0;
  const std::int32_t sentinel = num_blocks;
  std::int32_t before = sentinel;
  for (std::int32_t b = next[n]; b != sentinel; before = b, b = next[std::size_t(b)]) {
    if (b < 0 || b > num_blocks) fail("free list links to block id " + str(b));
    if (prev[std::size_t(b)] != before) {
      fail("free list: block " + str(b) + " links back to " + str(prev[std::size_t(b)]) +
           " instead of " + str(before));
    }
    if (seen[std::size_t(b)]) fail("free list holds block " + str(b) + " twice");
    seen[std::size_t(b)] = 1;
    if (ref[std::size_t(b)] != 0) {
      fail("free list holds block " + str(b) + " with ref count " + str(ref[std::size_t(b)]));
    }
    ++listed;
    if (keyed(b)) ++evictable;
    if (copy_reads[std::size_t(b)] > 0) ++free_read;
  }
  if (prev[n] != before) fail("free list: the sentinel links back to " + str(prev[n]));
  for (std::size_t b = 0; b < n; ++b) {
    if (!seen[b] && ref[b] == 0)
      fail("block " + str(std::int64_t(b)) + " is unreferenced but not free");
    if (!seen[b] && (prev[b] != kUnlinked || next[b] != kUnlinked)) {
      fail("block " + str(std::int64_t(b)) + " is used but still linked");
    }
  }

  // Prefix-cache keys: block.has_key <=> cache[block.key] == block; keyed blocks are full.
  if (caching) {
    std::int64_t keyed_blocks = 0;
    for (std::size_t b = 0; b < n; ++b) {
      if (!has_key[b]) continue;
      ++keyed_blocks;
      auto it = cache.find(keys[b]);
      if (it == cache.end() || it->second != std::int32_t(b)) {
        fail("block " + str(std::int64_t(b)) + " holds a key that maps elsewhere");
      }
      if (fill[b] != block_size) {
        fail("block " + str(std::int64_t(b)) + " holds a key but only " + str(fill[b]) + " tokens");
      }
    }
    if (std::int64_t(cache.size()) != keyed_blocks) {
      fail("the cache maps " + str(std::int64_t(cache.size())) + " keys but " + str(keyed_blocks) +
           " blocks hold one");
    }
  } else if (!cache.empty()) {
    fail("the cache holds keys with prefix caching off");
  }

  // Pending copies: each live destination is used and points back at its pair; no block is
  // both read and written by them.
  std::vector<std::int32_t> reads(n, 0);
  for (std::size_t p = 0; p < copies.size(); ++p) {
    const CopyPair& c = copies[p];
    if (c.dst == kNoPair) continue;
    if (c.src < 0 || c.src >= num_blocks || c.dst < 0 || c.dst >= num_blocks) {
      fail("pending copy " + str(c.src) + " -> " + str(c.dst) + " has an id out of range");
    }
    ++reads[std::size_t(c.src)];
    if (copy_pair[std::size_t(c.dst)] != std::int64_t(p)) {
      fail("pending copy to block " + str(c.dst) + " is not recorded on the block");
    }
    if (ref[std::size_t(c.dst)] == 0) fail("pending copy to free block " + str(c.dst));
    if (copy_pair[std::size_t(c.src)] != kNoPair) {
      fail("block " + str(c.src) + " is both read and written by pending copies");
    }
  }
  for (std::size_t b = 0; b < n; ++b) {
    if (reads[b] != copy_reads[b]) {
      fail("block " + str(std::int64_t(b)) + " counts " + str(copy_reads[b]) +
           " pending copy reads, found " + str(reads[b]));
    }
    const std::int64_t p = copy_pair[b];
    if (p != kNoPair && (p < 0 || p >= std::int64_t(copies.size()) ||
                         copies[std::size_t(p)].dst != std::int32_t(b))) {
      fail("block " + str(std::int64_t(b)) + " points at a pending copy that does not write it");
    }
  }

  auto counter = [&](const char* name, std::int64_t kept, std::int64_t actual) {
    if (kept != actual) {
      fail(std::string(name) + " is " + str(kept) + ", recomputed " + str(actual));
    }
  };
  counter("num_free", num_free, listed);
  counter("num_evictable", num_evictable, evictable);
  counter("free blocks read by pending copies", num_free_read, free_read);
  counter("num_shared", num_shared, shared);
  counter("num_tokens", num_tokens, tokens);
  counter("waste_slots", waste_slots, waste);
}

// ---- public API ---------------------------------------------------------------------------

BlockManager::BlockManager(std::int64_t num_blocks, std::int64_t block_size,
                           bool enable_prefix_caching) {
  if (num_blocks < 1)
    bad_argument("", "num_blocks must be >= 1, got " + std::to_string(num_blocks));
  // Block ids are int32 (block tables), and the sentinel takes id num_blocks.
  if (num_blocks > kMaxInt32) {
    bad_argument("", "num_blocks must be <= " + std::to_string(kMaxInt32) + ", got " +
                         std::to_string(num_blocks));
  }
  if (block_size < 1)
    bad_argument("", "block_size must be >= 1, got " + std::to_string(block_size));
  // Lengths are int32 (block tables), so a block never holds more.
  if (block_size > kMaxInt32) {
    bad_argument("", "block_size must be <= " + std::to_string(kMaxInt32) + ", got " +
                         std::to_string(block_size));
  }
  impl_ = std::make_unique<Impl>(num_blocks, block_size, enable_prefix_caching);
}

BlockManager::~BlockManager() = default;

std::int64_t BlockManager::add_sequence(std::int64_t seq_id, const std::int64_t* token_ids,
                                        std::int64_t num_token_ids) {
  const char* method = "add_sequence";
  Impl& m = *impl_;
  std::lock_guard<std::mutex> lock(m.mutex);
  const std::int64_t max_blocks = m.prefix_lookup_blocks(method, token_ids, num_token_ids);
  if (m.seqs.count(seq_id)) {
    bad_argument(method, "seq_id already exists, got " + std::to_string(seq_id));
  }
  Impl::Sequence fresh;
  fresh.chain_key = root_key();
  // Hits are distinct blocks, so never more than the pool.
  fresh.blocks.reserve(std::size_t(std::min<std::int64_t>(max_blocks, m.num_blocks)));
  Impl::Sequence& s = m.seqs.emplace(seq_id, std::move(fresh)).first->second;
  m.prefix_queries +=
      m.walk_prefix(token_ids, max_blocks, [&](std::int32_t block, const Digest& key) {
        ++m.prefix_hits;
        m.add_ref(block);
        s.blocks.push_back(block);
        s.chain_key = key;
      });
  s.len = std::int64_t(s.blocks.size()) * m.block_size;
  m.num_tokens += s.len;
  return s.len;
}

BlockManager::PrefixMatch BlockManager::match_prefix(const std::int64_t* token_ids,
                                                     std::int64_t num_token_ids) const {
  const char* method = "match_prefix";
  const Impl& m = *impl_;
  std::lock_guard<std::mutex> lock(m.mutex);
  const std::int64_t max_blocks = m.prefix_lookup_blocks(method, token_ids, num_token_ids);
  PrefixMatch match;
  m.walk_prefix(token_ids, max_blocks, [&](std::int32_t block, const Digest&) {
    ++match.blocks;
    if (m.ref[std::size_t(block)] == 0) ++match.free_blocks;
  });
  match.tokens = match.blocks * m.block_size;
  return match;
}

void BlockManager::append(std::int64_t seq_id, std::int64_t num_tokens,
                          const std::int64_t* token_ids, std::int64_t* slots_out) {
  std::lock_guard<std::mutex> lock(impl_->mutex);
  impl_->append(&seq_id, &num_tokens, 1, token_ids, slots_out, "append");
}

std::vector<std::int64_t> BlockManager::append(std::int64_t seq_id, std::int64_t num_tokens,
                                               const std::int64_t* token_ids) {
  // Checked before sizing the result; the full validation happens inside.
  if (num_tokens < 0 || num_tokens > kMaxInt32) {
    std::lock_guard<std::mutex> lock(impl_->mutex);
    impl_->find(seq_id, "append");
    bad_argument("append", num_tokens < 0
                               ? "num_tokens must be >= 0, got " + std::to_string(num_tokens)
                               : "sequence length must stay <= " + std::to_string(kMaxInt32) +
                                     ", got num_tokens " + std::to_string(num_tokens));
  }
  std::vector<std::int64_t> slots(static_cast<std::size_t>(num_tokens));
  append(seq_id, num_tokens, token_ids, slots.data());
  return slots;
}

void BlockManager::append_batch(const std::int64_t* seq_ids, const std::int64_t* num_tokens,
                                std::int64_t count, std::int64_t* slots_out) {
  std::lock_guard<std::mutex> lock(impl_->mutex);
  impl_->append(seq_ids, num_tokens, count, nullptr, slots_out, "append_batch");
}

void BlockManager::fork(std::int64_t parent_id, std::int64_t child_id) {
  Impl& m = *impl_;
  std::lock_guard<std::mutex> lock(m.mutex);
  const Impl::Sequence& parent = m.find(parent_id, "fork", "parent_id");
  if (m.seqs.count(child_id)) {
    bad_argument("fork", "child_id already exists, got " + std::to_string(child_id));
  }
  // Inserting keeps `parent` valid: unordered_map never moves its elements.
  const Impl::Sequence& child = m.seqs.emplace(child_id, parent).first->second;
  for (std::int32_t b : child.blocks) m.add_ref(b);
  m.num_tokens += child.len;
}

void BlockManager::free(std::int64_t seq_id) {
  Impl& m = *impl_;
  std::lock_guard<std::mutex> lock(m.mutex);
  auto it = m.seqs.find(seq_id);
  if (it == m.seqs.end()) unknown_sequence("free", "seq_id", seq_id);
  // Tail first: among the keyed blocks appended to the back, the ones that hash the most tokens
  // (least likely to be shared) come first and are evicted first.
  const std::vector<std::int32_t>& blocks = it->second.blocks;
  for (auto b = blocks.rbegin(); b != blocks.rend(); ++b) m.release(*b);
  m.num_tokens -= it->second.len;
  m.seqs.erase(it);
}

BlockManager::BlockTable BlockManager::block_table(const std::int64_t* seq_ids,
                                                   std::int64_t count) const {
  const char* method = "block_table";
  const Impl& m = *impl_;
  std::lock_guard<std::mutex> lock(m.mutex);
  if (count < 0) bad_argument(method, "count must be >= 0, got " + std::to_string(count));
  if (count > 0 && seq_ids == nullptr) bad_argument(method, "seq_ids must not be null");
  m.table_rows.clear();
  std::size_t width = 0;
  for (std::int64_t i = 0; i < count; ++i) {
    const Impl::Sequence& s = m.find(seq_ids[i], method);
    m.table_rows.push_back(&s);
    width = std::max(width, s.blocks.size());
  }
  BlockTable out;
  out.batch = count;
  out.width = std::int64_t(width);
  // Reserved, then appended row by row: each element is written once.
  out.table.reserve(std::size_t(count) * width);
  out.lens.reserve(std::size_t(count));
  for (const Impl::Sequence* s : m.table_rows) {
    out.table.insert(out.table.end(), s->blocks.begin(), s->blocks.end());
    out.table.insert(out.table.end(), width - s->blocks.size(), 0);
    out.lens.push_back(std::int32_t(s->len));
  }
  return out;
}

std::vector<std::pair<std::int32_t, std::int32_t>> BlockManager::take_copies() {
  Impl& m = *impl_;
  std::lock_guard<std::mutex> lock(m.mutex);
  std::vector<std::pair<std::int32_t, std::int32_t>> out;
  out.reserve(m.copies.size());
  for (const Impl::CopyPair& c : m.copies) {
    if (c.dst == kNoPair) continue;
    out.emplace_back(c.src, c.dst);
    m.copy_pair[std::size_t(c.dst)] = kNoPair;
    m.release_read(c.src);
  }
  m.copies.clear();
  return out;
}

std::int64_t BlockManager::seq_len(std::int64_t seq_id) const {
  std::lock_guard<std::mutex> lock(impl_->mutex);
  return impl_->find(seq_id, "seq_len").len;
}

std::vector<std::int32_t> BlockManager::block_ids(std::int64_t seq_id) const {
  std::lock_guard<std::mutex> lock(impl_->mutex);
  return impl_->find(seq_id, "block_ids").blocks;
}

bool BlockManager::has_sequence(std::int64_t seq_id) const {
  std::lock_guard<std::mutex> lock(impl_->mutex);
  return impl_->seqs.count(seq_id) != 0;
}

std::int64_t BlockManager::num_free_blocks() const {
  std::lock_guard<std::mutex> lock(impl_->mutex);
  return impl_->num_free;
}

// The three below read members fixed at construction: no lock needed.
std::int64_t BlockManager::num_blocks() const { return impl_->num_blocks; }
std::int64_t BlockManager::block_size() const { return impl_->block_size; }
bool BlockManager::prefix_caching() const { return impl_->caching; }

BlockManager::Stats BlockManager::stats() const {
  const Impl& m = *impl_;
  std::lock_guard<std::mutex> lock(m.mutex);
  Stats s;
  s.num_blocks = m.num_blocks;
  s.num_free = m.num_free;
  s.num_used = m.num_blocks - m.num_free;
  s.num_cached = std::int64_t(m.cache.size());
  s.num_evictable = m.num_evictable;
  s.num_shared = m.num_shared;
  s.num_sequences = std::int64_t(m.seqs.size());
  s.num_tokens = m.num_tokens;
  s.waste_slots = m.waste_slots;
  s.prefix_hits = m.prefix_hits;
  s.prefix_queries = m.prefix_queries;
  s.evictions = m.evictions;
  return s;
}

void BlockManager::check() const {
  std::lock_guard<std::mutex> lock(impl_->mutex);
  impl_->check();
}

}  // namespace tinyserve
