#include "tinyserve/block_manager.h"

#include "core/block_manager_impl.h"

namespace tinyserve {

using bm::bad_argument;
using bm::Digest;
using bm::kMaxInt32;
using bm::kNoPair;
using bm::root_key;
using bm::unknown_sequence;
using bm::where;

// A pending plan must still apply: each pair reads a block holding content and writes a free
// one, no block twice.
template <class Fail>
void BlockManager::Impl::check_plan(Fail&& fail) const {
  auto str = [](std::int64_t v) { return std::to_string(v); };
  const bool evict = plan.kind == MovePlan::Kind::Evict;
  if (evict ? !plan.dst.empty() : plan.dst.size() != plan.src.size()) {
    fail(std::string("the pending ") + plan.kind_name() + " plan has " +
         str(std::int64_t(plan.src.size())) + " sources and " + str(std::int64_t(plan.dst.size())) +
         " destinations");
  }
  const bool src_on_host = plan.kind == MovePlan::Kind::Recall;
  const bool dst_on_host = plan.kind == MovePlan::Kind::Offload;
  const detail::BlockPool& src_pool = src_on_host ? host->pool : pool;
  const detail::BlockPool& dst_pool = dst_on_host ? host->pool : pool;
  std::vector<std::uint8_t> src_seen(std::size_t(src_pool.num_blocks()), 0);
  std::vector<std::uint8_t> dst_seen(std::size_t(dst_pool.num_blocks()), 0);
  for (std::size_t i = 0; i < plan.src.size(); ++i) {
    const std::int32_t s = plan.src[i];
    if (s < 0 || s >= src_pool.num_blocks() || src_seen[std::size_t(s)]) {
      fail("the pending plan reads block " + str(s) + " out of range or twice");
    }
    src_seen[std::size_t(s)] = 1;
    if (evict ? !(src_pool.is_free(s) && keyed(s)) : src_pool.is_free(s)) {
      fail("the pending " + std::string(plan.kind_name()) + " plan's source block " + str(s) +
           (evict ? " is not cached and free" : " holds nothing"));
    }
    if (plan.kind == MovePlan::Kind::Compact && s < plan_target) {
      fail("the pending compact plan moves block " + str(s) + " from below its target");
    }
    if (evict) continue;
    const std::int32_t d = plan.dst[i];
    if (d < 0 || d >= dst_pool.num_blocks() || dst_seen[std::size_t(d)] || !dst_pool.is_free(d)) {
      fail("the pending plan writes block " + str(d) + " out of range, twice or while used");
    }
    dst_seen[std::size_t(d)] = 1;
    if (plan.kind == MovePlan::Kind::Compact && d >= plan_target) {
      fail("the pending compact plan moves a block to " + str(d) + ", not below its target");
    }
  }
}

void BlockManager::Impl::check() const {
  auto fail = [](const std::string& what) {
    throw std::logic_error("tinyserve.BlockManager.check: " + what);
  };
  auto str = [](std::int64_t v) { return std::to_string(v); };
  const std::size_t n = std::size_t(num_blocks);
  if (fill.size() != n || copy_reads.size() != n || copy_pair.size() != n ||
      cow_drops.size() != n || (caching && (keys.size() != n || has_key.size() != n)) ||
      pool.num_blocks() != num_blocks) {
    fail("per-block state is not sized for the " + str(num_blocks) + " usable blocks");
  }

  std::vector<std::int64_t> holders(n, 0);
  std::vector<std::int64_t> held_by(n, -1);  // the sequence seen last, to catch repeats
  const std::size_t num_host = host ? std::size_t(host->pool.num_blocks()) : 0;
  std::vector<std::int64_t> host_holders(num_host, 0);
  std::vector<std::int64_t> host_held_by(num_host, -1);
  std::int64_t tokens = 0, seq_index = 0;
  for (const auto& [id, s] : seqs) {
    if (s.len < 0 || std::int64_t(s.blocks.size()) != blocks_for(s.len)) {
      fail("sequence " + str(id) + " holds " + str(std::int64_t(s.blocks.size())) + " blocks for " +
           str(s.len) + " tokens");
    }
    std::int64_t offloaded = 0;
    for (std::size_t i = 0; i < s.blocks.size(); ++i) {
      const std::int32_t entry = s.blocks[i];
      const std::int64_t in_block = std::min(block_size, s.len - std::int64_t(i) * block_size);
      if (on_host(entry)) {
        const std::int32_t h = host_id(entry);
        if (std::size_t(h) >= num_host) {
          fail("sequence " + str(id) + " holds host block id " + str(h) + " of a host pool of " +
               str(std::int64_t(num_host)));
        }
        if (host_held_by[std::size_t(h)] == seq_index) {
          fail("sequence " + str(id) + " holds host block " + str(h) + " twice");
        }
        host_held_by[std::size_t(h)] = seq_index;
        ++host_holders[std::size_t(h)];
        ++offloaded;
        if (host->fill[std::size_t(h)] != in_block) {
          fail("host block " + str(h) + " holds " + str(host->fill[std::size_t(h)]) +
               " tokens but sequence " + str(id) + " has " + str(in_block) + " in it");
        }
        continue;
      }
      const std::int32_t b = entry;
      if (b >= num_blocks) fail("sequence " + str(id) + " holds block id " + str(b));
      if (held_by[std::size_t(b)] == seq_index) {
        fail("sequence " + str(id) + " holds block " + str(b) + " twice");
      }
      held_by[std::size_t(b)] = seq_index;
      ++holders[std::size_t(b)];
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
    if (offloaded != s.num_offloaded) {
      fail("sequence " + str(id) + " counts " + str(s.num_offloaded) + " offloaded blocks, found " +
           str(offloaded));
    }
    tokens += s.len;
    ++seq_index;
  }

  // Device pool: ref counts equal holders, the free list is exactly the unreferenced blocks.
  const std::string pool_broken = pool.verify(holders);
  if (!pool_broken.empty()) fail(pool_broken);
  // The compactor's host pool, the same way.
  if (host) {
    const std::string host_broken = host->pool.verify(host_holders);
    if (!host_broken.empty()) fail("host pool: " + host_broken);
  } else if (has_compactor) {
    fail("a compactor is attached without a host pool");
  }
  if (plan_pending() && !has_compactor) fail("a plan is pending without a compactor");
  if (plan_pending()) check_plan(fail);

  std::int64_t shared = 0, waste = 0, evictable = 0, free_read = 0;
  for (std::size_t b = 0; b < n; ++b) {
    const std::int32_t id = std::int32_t(b);
    if (ref(id) > 1) ++shared;
    if (ref(id) > 0) waste += block_size - fill[b];
    if (ref(id) == 0 && keyed(id)) ++evictable;
    if (ref(id) == 0 && copy_reads[b] > 0) ++free_read;
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
    if (ref(c.dst) == 0) fail("pending copy to free block " + str(c.dst));
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
  // Checked before allocating: the per-block bookkeeping is host memory in proportion.
  if (num_blocks > detail::BlockPool::kMaxBlocks) {
    bad_argument("", "num_blocks must be <= " + std::to_string(detail::BlockPool::kMaxBlocks) +
                         " (the host bookkeeping takes about " +
                         std::to_string(detail::BlockPool::kBytesPerBlock) +
                         " bytes per block), got " + std::to_string(num_blocks));
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
  m.require_no_plan(method);
  Impl::Sequence fresh;
  fresh.chain_key = root_key();
  // Hits are distinct blocks, so never more than the pool.
  fresh.blocks.reserve(std::size_t(std::min<std::int64_t>(max_blocks, m.num_blocks)));
  Impl::Sequence& s = m.seqs.emplace(seq_id, std::move(fresh)).first->second;
  m.prefix_queries +=
      m.walk_prefix(token_ids, max_blocks, [&](std::int32_t block, const Digest& key) {
        ++m.prefix_hits;
        m.add_ref(block);
        m.pool.stamp(block);
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
    if (m.pool.is_free(block)) ++match.free_blocks;
  });
  match.tokens = match.blocks * m.block_size;
  return match;
}

void BlockManager::append(std::int64_t seq_id, std::int64_t num_tokens,
                          const std::int64_t* token_ids, std::int64_t* slots_out) {
  std::lock_guard<std::mutex> lock(impl_->mutex);
  const std::int64_t total = impl_->prepare_append(&seq_id, &num_tokens, 1, "append");
  if (total > 0 && slots_out == nullptr) bad_argument("append", "slots_out must not be null");
  impl_->execute_append(&num_tokens, 1, token_ids, slots_out);
}

std::vector<std::int64_t> BlockManager::append(std::int64_t seq_id, std::int64_t num_tokens,
                                               const std::int64_t* token_ids) {
  std::lock_guard<std::mutex> lock(impl_->mutex);
  // The whole request is checked (pool included) before the slots are sized.
  const std::int64_t total = impl_->prepare_append(&seq_id, &num_tokens, 1, "append");
  std::vector<std::int64_t> slots(static_cast<std::size_t>(total));
  impl_->execute_append(&num_tokens, 1, token_ids, slots.data());
  return slots;
}

void BlockManager::append_batch(const std::int64_t* seq_ids, const std::int64_t* num_tokens,
                                std::int64_t count, std::int64_t* slots_out) {
  std::lock_guard<std::mutex> lock(impl_->mutex);
  const std::int64_t total = impl_->prepare_append(seq_ids, num_tokens, count, "append_batch");
  if (total > 0 && slots_out == nullptr) bad_argument("append_batch", "slots_out must not be null");
  impl_->execute_append(num_tokens, count, nullptr, slots_out);
}

std::vector<std::int64_t> BlockManager::append_batch(const std::int64_t* seq_ids,
                                                     std::int64_t count,
                                                     const std::int64_t* num_tokens,
                                                     std::int64_t num_counts) {
  const char* method = "append_batch";
  if (num_counts != count) {
    bad_argument(method, "num_tokens must have one entry per sequence (" + std::to_string(count) +
                             "), got " + std::to_string(num_counts));
  }
  std::lock_guard<std::mutex> lock(impl_->mutex);
  const std::int64_t total = impl_->prepare_append(seq_ids, num_tokens, count, method);
  std::vector<std::int64_t> slots(static_cast<std::size_t>(total));
  impl_->execute_append(num_tokens, count, nullptr, slots.data());
  return slots;
}

std::vector<std::int64_t> BlockManager::append_batch(const std::int64_t* seq_ids,
                                                     std::int64_t count,
                                                     std::int64_t num_tokens_each) {
  if (count < 0) bad_argument("append_batch", "count must be >= 0, got " + std::to_string(count));
  // Checked here too: an empty batch has no entry to carry it to the per-sequence check.
  if (num_tokens_each < 0) {
    bad_argument("append_batch", "num_tokens must be >= 0, got " + std::to_string(num_tokens_each));
  }
  const std::vector<std::int64_t> counts(std::size_t(count), num_tokens_each);
  return append_batch(seq_ids, count, counts.data(), count);
}

void BlockManager::fork(std::int64_t parent_id, std::int64_t child_id) {
  Impl& m = *impl_;
  std::lock_guard<std::mutex> lock(m.mutex);
  const Impl::Sequence& parent = m.find(parent_id, "fork", "parent_id");
  if (m.seqs.count(child_id)) {
    bad_argument("fork", "child_id already exists, got " + std::to_string(child_id));
  }
  m.require_no_plan("fork");
  // Inserting keeps `parent` valid: unordered_map never moves its elements.
  const Impl::Sequence& child = m.seqs.emplace(child_id, parent).first->second;
  for (std::int32_t entry : child.blocks) m.add_ref_entry(entry);
  m.num_tokens += child.len;
}

void BlockManager::free(std::int64_t seq_id) {
  Impl& m = *impl_;
  std::lock_guard<std::mutex> lock(m.mutex);
  auto it = m.seqs.find(seq_id);
  if (it == m.seqs.end()) unknown_sequence("free", "seq_id", seq_id);
  m.require_no_plan("free");
  // Tail first: among the keyed blocks appended to the back, the ones that hash the most tokens
  // (least likely to be shared) come first and are evicted first.
  const std::vector<std::int32_t>& blocks = it->second.blocks;
  for (auto b = blocks.rbegin(); b != blocks.rend(); ++b) m.release_entry(*b);
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
    m.require_on_device(s, seq_ids[i], method);
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

void BlockManager::resize(std::int64_t num_blocks) {
  const char* method = "resize";
  Impl& m = *impl_;
  std::lock_guard<std::mutex> lock(m.mutex);
  if (num_blocks < 0 || num_blocks > detail::BlockPool::kMaxBlocks) {
    bad_argument(method, "num_blocks must be in [0, " +
                             std::to_string(detail::BlockPool::kMaxBlocks) + "], got " +
                             std::to_string(num_blocks));
  }
  m.require_no_plan(method);
  const std::int32_t old_n = m.num_blocks, n = std::int32_t(num_blocks);
  for (std::int32_t b = n; b < old_n; ++b) {
    if (!m.pool.is_free(b)) {
      throw std::runtime_error(where(method) + "block " + std::to_string(b) +
                               " is in use (ref count " + std::to_string(m.ref(b)) +
                               "); compact below num_blocks first (Compactor.plan_compact), got " +
                               std::to_string(num_blocks));
    }
    if (m.copy_reads[std::size_t(b)] > 0) {
      throw std::runtime_error(where(method) + "block " + std::to_string(b) +
                               " is read by a pending copy-on-write pair; call take_copies() and "
                               "run the copies first, got " +
                               std::to_string(num_blocks));
    }
  }
  // Everything that can throw (allocation) happens before the first change.
  m.pool.reserve(n);
  m.fill.reserve(std::size_t(n));
  m.copy_reads.reserve(std::size_t(n));
  m.copy_pair.reserve(std::size_t(n));
  m.cow_drops.reserve(std::size_t(n));
  if (m.caching) {
    m.keys.reserve(std::size_t(n));
    m.has_key.reserve(std::size_t(n));
  }
  // The dropped blocks leave the free list (and the cache) before the pool forgets them.
  for (std::int32_t b = n; b < old_n; ++b) {
    m.leaving_free(b);
    m.pool.free_queue().remove(b);
    if (m.keyed(b)) {
      m.drop_key(b);
      ++m.evictions;
    }
  }
  m.pool.resize(n);
  m.fill.resize(std::size_t(n), 0);
  m.copy_reads.resize(std::size_t(n), 0);
  m.copy_pair.resize(std::size_t(n), kNoPair);
  m.cow_drops.resize(std::size_t(n), 0);
  if (m.caching) {
    m.keys.resize(std::size_t(n));
    m.has_key.resize(std::size_t(n), 0);
  }
  m.num_blocks = n;
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
  const Impl::Sequence& s = impl_->find(seq_id, "block_ids");
  impl_->require_on_device(s, seq_id, "block_ids");
  return s.blocks;
}

bool BlockManager::has_sequence(std::int64_t seq_id) const {
  std::lock_guard<std::mutex> lock(impl_->mutex);
  return impl_->seqs.count(seq_id) != 0;
}

std::int64_t BlockManager::num_free_blocks() const {
  std::lock_guard<std::mutex> lock(impl_->mutex);
  return impl_->num_free();
}

std::int64_t BlockManager::num_blocks() const {
  std::lock_guard<std::mutex> lock(impl_->mutex);
  return impl_->num_blocks;
}

// The two below read members fixed at construction: no lock needed.
std::int64_t BlockManager::block_size() const { return impl_->block_size; }
bool BlockManager::prefix_caching() const { return impl_->caching; }

BlockManager::Stats BlockManager::stats() const {
  const Impl& m = *impl_;
  std::lock_guard<std::mutex> lock(m.mutex);
  Stats s;
  s.num_blocks = m.num_blocks;
  s.num_free = m.num_free();
  s.num_used = m.num_blocks - m.num_free();
  s.num_cached = std::int64_t(m.cache.size());
  s.num_evictable = m.num_evictable;
  s.num_shared = m.num_shared;
  s.num_sequences = std::int64_t(m.seqs.size());
  s.num_tokens = m.num_tokens;
  s.waste_slots = m.waste_slots;
  s.prefix_hits = m.prefix_hits;
  s.prefix_queries = m.prefix_queries;
  s.evictions = m.evictions;
  s.num_offloaded = m.host ? m.host->pool.num_blocks() - m.host->pool.num_free() : 0;
  return s;
}

std::vector<std::pair<const char*, std::int64_t>> BlockManager::Stats::items() const {
  return {{"num_blocks", num_blocks},
          {"num_free", num_free},
          {"num_used", num_used},
          {"num_cached", num_cached},
          {"num_evictable", num_evictable},
          {"num_shared", num_shared},
          {"num_sequences", num_sequences},
          {"num_tokens", num_tokens},
          {"waste_slots", waste_slots},
          {"prefix_hits", prefix_hits},
          {"prefix_queries", prefix_queries},
          {"evictions", evictions},
          {"num_offloaded", num_offloaded}};
}

void BlockManager::check() const {
  std::lock_guard<std::mutex> lock(impl_->mutex);
  impl_->check();
}

}  // namespace tinyserve
