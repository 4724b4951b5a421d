#include "tinyserve/compactor.h"

#include <algorithm>
#include <atomic>
#include <limits>
#include <tuple>

#include "core/block_manager_impl.h"

namespace tinyserve {

namespace {

using Impl = BlockManager::Impl;
using Sequence = Impl::Sequence;

std::string where(const char* method) {
  return std::string("tinyserve.Compactor.") + method + ": ";
}

[[noreturn]] void bad_argument(const char* method, const std::string& what) {
  throw std::invalid_argument(where(method) + what);
}

[[noreturn]] void out_of_blocks(const char* method, const std::string& what) {
  throw OutOfBlocks(where(method) + what);
}

std::string str(std::int64_t v) { return std::to_string(v); }

const Sequence& find(const Impl& m, std::int64_t seq_id, const char* method) {
  auto it = m.seqs.find(seq_id);
  if (it == m.seqs.end())
    throw UnknownSequence(where(method) + "unknown seq_id, got " + str(seq_id));
  return it->second;
}

// Checks shared by every plan_*: one plan at a time, and no copy-on-write pair in flight (its
// blocks must not move before the engine has run it).
void begin_plan(const Impl& m, const char* method) {
  if (m.plan_pending()) {
    throw std::runtime_error(where(method) +
                             "a plan is still pending; commit or abort it first, got plan " +
                             str(std::int64_t(m.plan.serial)));
  }
  std::int64_t pairs = 0;
  for (const auto& c : m.copies) pairs += c.dst != Impl::kNoPair;
  if (pairs > 0) {
    throw std::runtime_error(where(method) +
                             "copy-on-write pairs are pending; call take_copies() and run the "
                             "copies first, got " +
                             str(pairs) + " pending pairs");
  }
}

// commit and abort take the pending plan only, known by its serial.
void require_pending(const Impl& m, const MovePlan& plan, const char* method) {
  if (!m.plan_pending()) {
    throw std::runtime_error(where(method) + "no plan is pending, got plan " +
                             str(std::int64_t(plan.serial)));
  }
  if (plan.serial != m.plan.serial) {
    bad_argument(method, "plan must be the pending plan " + str(std::int64_t(m.plan.serial)) +
                             ", got plan " + str(std::int64_t(plan.serial)));
  }
}

void check_count(const char* method, const char* name, std::int64_t n) {
  if (n < 0) bad_argument(method, std::string(name) + " must be >= 0, got " + str(n));
}

// The sequences a plan names, each looked up (an unknown id raises) before anything changes.
std::vector<const Sequence*> listed_sequences(const Impl& m, const std::int64_t* seq_ids,
                                              std::int64_t count, const char* method) {
  check_count(method, "count", count);
  if (count > 0 && seq_ids == nullptr) bad_argument(method, "seq_ids must not be null");
  std::vector<const Sequence*> seqs;
  seqs.reserve(std::size_t(count));
  for (std::int64_t i = 0; i < count; ++i) seqs.push_back(&find(m, seq_ids[i], method));
  return seqs;
}

// Serials are unique over the process, not per compactor: commit and abort know a plan by its
// serial, so a plan of another compactor must never match the pending one.
std::uint64_t next_plan_serial() {
  static std::atomic<std::uint64_t> last{0};
  return last.fetch_add(1, std::memory_order_relaxed) + 1;
}

MovePlan hand_out(Impl& m, MovePlan::Kind kind, std::vector<std::int32_t> src,
                  std::vector<std::int32_t> dst) {
  MovePlan plan;
  plan.kind = kind;
  plan.src = std::move(src);
  plan.dst = std::move(dst);
  plan.serial = next_plan_serial();
  m.plan = plan;
  return plan;
}

// Replaces every sequence entry e for which remap(e) returns a different entry; `delta` is
// added to the sequence's offloaded count per replaced entry.
template <class Remap>
void remap_sequences(Impl& m, std::int32_t delta, bool only_offloaded, Remap&& remap) {
  for (auto& [id, s] : m.seqs) {
    if (only_offloaded && s.num_offloaded == 0) continue;
    for (std::int32_t& entry : s.blocks) {
      const std::int32_t moved = remap(entry);
      if (moved != entry) {
        entry = moved;
        s.num_offloaded += delta;
      }
    }
  }
}

// A free device block about to receive content: out of the free list, its stale key dropped.
void claim_free(Impl& m, std::int32_t b, std::int32_t holders) {
  m.leaving_free(b);
  m.pool.take(b, holders);
  if (m.keyed(b)) {
    m.drop_key(b);
    ++m.evictions;
  }
}

void commit_evict(Impl& m, const MovePlan& plan) {
  for (std::int32_t b : plan.src) {
    m.leaving_free(b);
    m.pool.free_queue().remove(b);
    m.drop_key(b);
    ++m.evictions;
    m.put_free(b);
  }
}

void commit_offload(Impl& m, const MovePlan& plan) {
  Impl::HostPool& host = *m.host;
  const std::int32_t unmoved = 0;  // host entries are negative, so 0 never names one
  std::vector<std::int32_t> moved_to(std::size_t(m.num_blocks), unmoved);
  for (std::size_t i = 0; i < plan.src.size(); ++i) {
    const std::int32_t d = plan.src[i], h = plan.dst[i];
    const std::int32_t holders = m.ref(d);
    host.pool.take(h, holders);
    host.fill[std::size_t(h)] = m.fill[std::size_t(d)];
    host.pool.set_history(h, m.pool.last_use(d), m.pool.hits(d));
    if (holders > 1) --m.num_shared;
    m.waste_slots -= m.block_size - m.fill[std::size_t(d)];
    // The key would let a prompt attach content that is no longer on the device.
    if (m.keyed(d)) m.drop_key(d);
    m.pool.clear(d);
    m.pool.set_history(d, 0, 0);
    m.put_free(d);
    moved_to[std::size_t(d)] = Impl::host_entry(h);
  }
  remap_sequences(m, +1, false, [&](std::int32_t e) {
    return Impl::on_host(e) || moved_to[std::size_t(e)] == unmoved ? e : moved_to[std::size_t(e)];
  });
}

void commit_recall(Impl& m, const MovePlan& plan) {
  Impl::HostPool& host = *m.host;
  constexpr std::int32_t unmoved = -1;
  std::vector<std::int32_t> moved_to(std::size_t(host.pool.num_blocks()), unmoved);
  const std::uint64_t now = m.pool.tick();
  for (std::size_t i = 0; i < plan.src.size(); ++i) {
    const std::int32_t h = plan.src[i], d = plan.dst[i];
    const std::int32_t holders = host.pool.ref_count(h);
    claim_free(m, d, holders);
    m.fill[std::size_t(d)] = host.fill[std::size_t(h)];
    m.waste_slots += m.block_size - m.fill[std::size_t(d)];
    if (holders > 1) ++m.num_shared;
    m.pool.set_history(d, now, host.pool.hits(h));
    host.pool.clear(h);
    host.pool.set_history(h, 0, 0);
    host.pool.free_queue().push_back(h);
    moved_to[std::size_t(h)] = d;
  }
  remap_sequences(m, -1, true, [&](std::int32_t e) {
    if (!Impl::on_host(e)) return e;
    const std::int32_t d = moved_to[std::size_t(Impl::host_id(e))];
    return d == unmoved ? e : d;
  });
}

void commit_compact(Impl& m, const MovePlan& plan, std::int64_t target) {
  constexpr std::int32_t unmoved = -1;
  std::vector<std::int32_t> moved_to(std::size_t(m.num_blocks), unmoved);
  for (std::size_t i = 0; i < plan.src.size(); ++i) {
    const std::int32_t s = plan.src[i], d = plan.dst[i];
    claim_free(m, d, m.ref(s));
    m.fill[std::size_t(d)] = m.fill[std::size_t(s)];
    if (m.keyed(s)) {
      m.keys[std::size_t(d)] = m.keys[std::size_t(s)];
      m.has_key[std::size_t(d)] = 1;
      m.has_key[std::size_t(s)] = 0;
      m.cache[m.keys[std::size_t(d)]] = d;
    }
    m.pool.move_history(s, d);
    m.pool.clear(s);
    m.put_free(s);
    moved_to[std::size_t(s)] = d;
  }
  remap_sequences(m, 0, false, [&](std::int32_t e) {
    return Impl::on_host(e) || moved_to[std::size_t(e)] == unmoved ? e : moved_to[std::size_t(e)];
  });
  // The tail: every block is free now; cached ones lose their keys, and all go to the back of
  // the free list in id order, so new blocks come from below the target first.
  detail::FreeBlockQueue& queue = m.pool.free_queue();
  for (std::int32_t b = std::int32_t(target); b < m.num_blocks; ++b) {
    m.leaving_free(b);
    queue.remove(b);
    if (m.keyed(b)) {
      m.drop_key(b);
      ++m.evictions;
    }
  }
  for (std::int32_t b = std::int32_t(target); b < m.num_blocks; ++b) {
    m.entering_free(b);
    queue.push_back(b);
  }
}

// The first n blocks of a free list, in its order.
std::vector<std::int32_t> first_free(const detail::FreeBlockQueue& queue, std::int64_t n) {
  std::vector<std::int32_t> out;
  out.reserve(std::size_t(n));
  for (std::int32_t b = queue.front(); std::int64_t(out.size()) < n; b = queue.next(b)) {
    out.push_back(b);
  }
  return out;
}

}  // namespace

const char* MovePlan::kind_name() const {
  switch (kind) {
    case Kind::Evict:
      return "evict";
    case Kind::Offload:
      return "offload";
    case Kind::Recall:
      return "recall";
    case Kind::Compact:
      return "compact";
  }
  return "unknown";
}

std::int64_t MovePlan::num_bytes(std::int64_t bytes_per_block) const {
  if (bytes_per_block < 0) {
    throw std::invalid_argument("tinyserve.MovePlan.num_bytes: bytes_per_block must be >= 0, got " +
                                str(bytes_per_block));
  }
  const std::int64_t blocks = kind == Kind::Evict ? 0 : std::int64_t(src.size());
  if (blocks > 0 && bytes_per_block > std::numeric_limits<std::int64_t>::max() / blocks) {
    throw std::invalid_argument("tinyserve.MovePlan.num_bytes: " + str(blocks) +
                                " blocks of bytes_per_block bytes overflow int64, got " +
                                str(bytes_per_block));
  }
  return blocks * bytes_per_block;
}

Compactor::Compactor(BlockManager& manager, std::int64_t num_host_blocks)
    : m_(manager.impl_.get()) {
  const char* method = "__init__";
  check_count(method, "num_host_blocks", num_host_blocks);
  if (num_host_blocks > detail::BlockPool::kMaxBlocks) {
    bad_argument(method, "num_host_blocks must be <= " + str(detail::BlockPool::kMaxBlocks) +
                             " (the host bookkeeping takes about " +
                             str(detail::BlockPool::kBytesPerBlock) + " bytes per block), got " +
                             str(num_host_blocks));
  }
  Impl& m = *m_;
  std::lock_guard<std::mutex> lock(m.mutex);
  if (m.has_compactor) {
    bad_argument(method, "the block manager already has a compactor, got a second one");
  }
  // A host pool left by an earlier compactor that still holds offloaded blocks is kept; one
  // whose blocks have all been freed since holds nothing, and goes.
  if (m.host && m.host->pool.num_free() == m.host->pool.num_blocks()) m.host.reset();
  if (m.host && m.host->pool.num_blocks() != num_host_blocks) {
    bad_argument(method, "the block manager's host pool of " + str(m.host->pool.num_blocks()) +
                             " blocks still holds offloaded blocks, so num_host_blocks must be " +
                             str(m.host->pool.num_blocks()) + ", got " + str(num_host_blocks));
  }
  if (!m.host) m.host = std::make_unique<Impl::HostPool>(std::int32_t(num_host_blocks));
  m.has_compactor = true;
}

Compactor::~Compactor() {
  Impl& m = *m_;
  std::lock_guard<std::mutex> lock(m.mutex);
  m.plan = MovePlan{};
  m.has_compactor = false;
  // Offloaded blocks keep their host pool (their sequences may still be freed or recalled by a
  // later compactor); an empty one goes.
  if (m.host->pool.num_free() == m.host->pool.num_blocks()) m.host.reset();
}

void Compactor::touch(const std::int64_t* seq_ids, std::int64_t count) {
  const char* method = "touch";
  Impl& m = *m_;
  std::lock_guard<std::mutex> lock(m.mutex);
  std::vector<const Sequence*> seqs = listed_sequences(m, seq_ids, count, method);
  m.pool.tick();
  for (const Sequence* s : seqs) {
    for (std::int32_t e : s->blocks) {
      if (!Impl::on_host(e)) m.pool.stamp(e);
    }
  }
}

void Compactor::record_hits(const std::int64_t* hits, std::int64_t count) {
  const char* method = "record_hits";
  Impl& m = *m_;
  std::lock_guard<std::mutex> lock(m.mutex);
  if (count != m.num_blocks) {
    bad_argument(
        method, "hits must have num_blocks (" + str(m.num_blocks) + ") entries, got " + str(count));
  }
  if (count > 0 && hits == nullptr) bad_argument(method, "hits must not be null");
  for (std::int64_t b = 0; b < count; ++b) {
    if (hits[b] < 0) {
      bad_argument(method, "hits must be >= 0, got " + str(hits[b]) + " at index " + str(b));
    }
  }
  for (std::int32_t b = 0; b < m.num_blocks; ++b) m.pool.add_hits(b, hits[b]);
}

MovePlan Compactor::plan_evict(std::int64_t num_blocks) {
  const char* method = "plan_evict";
  Impl& m = *m_;
  std::lock_guard<std::mutex> lock(m.mutex);
  check_count(method, "num_blocks", num_blocks);
  begin_plan(m, method);
  if (num_blocks > m.num_evictable) {
    out_of_blocks(method, "need " + str(num_blocks) + " cached unreferenced blocks, got " +
                              str(m.num_evictable));
  }
  // The free list's order is the LRU order: the first keyed blocks from its front go first.
  std::vector<std::int32_t> src;
  src.reserve(std::size_t(num_blocks));
  const detail::FreeBlockQueue& queue = m.pool.free_queue();
  for (std::int32_t b = queue.front(); std::int64_t(src.size()) < num_blocks; b = queue.next(b)) {
    if (m.keyed(b)) src.push_back(b);
  }
  return hand_out(m, MovePlan::Kind::Evict, std::move(src), {});
}

MovePlan Compactor::plan_offload(std::int64_t num_blocks) {
  const char* method = "plan_offload";
  Impl& m = *m_;
  std::lock_guard<std::mutex> lock(m.mutex);
  check_count(method, "num_blocks", num_blocks);
  begin_plan(m, method);
  const std::int64_t used = m.num_blocks - m.num_free();
  if (num_blocks > used) {
    out_of_blocks(method,
                  "need " + str(num_blocks) + " device blocks of live sequences, got " + str(used));
  }
  if (num_blocks > m.host->pool.num_free()) {
    out_of_blocks(method, "need " + str(num_blocks) + " free host blocks, got " +
                              str(m.host->pool.num_free()));
  }
  std::vector<std::int32_t> candidates;
  candidates.reserve(std::size_t(used));
  for (std::int32_t b = 0; b < m.num_blocks; ++b) {
    if (!m.pool.is_free(b)) candidates.push_back(b);
  }
  const auto colder = [&](std::int32_t a, std::int32_t b) {
    return std::make_tuple(m.pool.last_use(a), m.pool.hits(a), a) <
           std::make_tuple(m.pool.last_use(b), m.pool.hits(b), b);
  };
  const auto cut = candidates.begin() + std::ptrdiff_t(num_blocks);
  std::nth_element(candidates.begin(), cut, candidates.end(), colder);
  candidates.resize(std::size_t(num_blocks));
  std::sort(candidates.begin(), candidates.end());
  return hand_out(m, MovePlan::Kind::Offload, std::move(candidates),
                  first_free(m.host->pool.free_queue(), num_blocks));
}

MovePlan Compactor::plan_offload_sequences(const std::int64_t* seq_ids, std::int64_t count) {
  const char* method = "plan_offload_sequences";
  Impl& m = *m_;
  std::lock_guard<std::mutex> lock(m.mutex);
  std::vector<const Sequence*> seqs = listed_sequences(m, seq_ids, count, method);
  begin_plan(m, method);
  // A sequence listed twice holds its blocks once.
  std::sort(seqs.begin(), seqs.end());
  seqs.erase(std::unique(seqs.begin(), seqs.end()), seqs.end());
  // A block goes when every holder is listed: a block shared with an unlisted sequence (a
  // prefix hit, a fork) stays, so that sequence keeps its block table.
  std::vector<std::int32_t> listed_holders(std::size_t(m.num_blocks), 0);
  std::vector<std::int32_t> src;
  for (const Sequence* s : seqs) {
    for (std::int32_t e : s->blocks) {
      if (Impl::on_host(e)) continue;
      if (++listed_holders[std::size_t(e)] == m.ref(e)) src.push_back(e);
    }
  }
  if (std::int64_t(src.size()) > m.host->pool.num_free()) {
    out_of_blocks(method, "need " + str(std::int64_t(src.size())) + " free host blocks, got " +
                              str(m.host->pool.num_free()));
  }
  std::sort(src.begin(), src.end());
  std::vector<std::int32_t> dst = first_free(m.host->pool.free_queue(), std::int64_t(src.size()));
  return hand_out(m, MovePlan::Kind::Offload, std::move(src), std::move(dst));
}

MovePlan Compactor::plan_recall(const std::int64_t* seq_ids, std::int64_t count) {
  const char* method = "plan_recall";
  Impl& m = *m_;
  std::lock_guard<std::mutex> lock(m.mutex);
  std::vector<const Sequence*> seqs = listed_sequences(m, seq_ids, count, method);
  begin_plan(m, method);
  // Distinct host blocks: forked sequences share them, and a sequence may be listed twice.
  std::vector<std::uint8_t> listed(std::size_t(m.host->pool.num_blocks()), 0);
  std::vector<std::int32_t> src;
  for (const Sequence* s : seqs) {
    if (s->num_offloaded == 0) continue;
    for (std::int32_t e : s->blocks) {
      if (!Impl::on_host(e) || listed[std::size_t(Impl::host_id(e))]) continue;
      listed[std::size_t(Impl::host_id(e))] = 1;
      src.push_back(Impl::host_id(e));
    }
  }
  if (std::int64_t(src.size()) > m.num_free()) {
    out_of_blocks(method, "need " + str(std::int64_t(src.size())) + " free device blocks, got " +
                              str(m.num_free()));
  }
  std::vector<std::int32_t> dst = first_free(m.pool.free_queue(), std::int64_t(src.size()));
  return hand_out(m, MovePlan::Kind::Recall, std::move(src), std::move(dst));
}

MovePlan Compactor::plan_compact(std::int64_t num_blocks) {
  const char* method = "plan_compact";
  Impl& m = *m_;
  std::lock_guard<std::mutex> lock(m.mutex);
  const std::int64_t used = m.num_blocks - m.num_free();
  if (num_blocks == -1) num_blocks = used;
  if (num_blocks < 0 || num_blocks > m.num_blocks) {
    bad_argument(method, "num_blocks must be in [0, " + str(m.num_blocks) +
                             "] (default: the number of used blocks), got " + str(num_blocks));
  }
  begin_plan(m, method);
  if (num_blocks < used) {
    out_of_blocks(method,
                  "need num_blocks >= the " + str(used) + " used blocks, got " + str(num_blocks));
  }
  const std::int32_t target = std::int32_t(num_blocks);
  std::vector<std::int32_t> src, dst;
  for (std::int32_t b = target; b < m.num_blocks; ++b) {
    if (!m.pool.is_free(b)) src.push_back(b);
  }
  // Destinations in free-list order (uncached blocks first, then cached ones oldest released
  // first), so a cached block below the target loses its key only when no other free block
  // there is left. There are enough: target >= used blocks.
  dst.reserve(src.size());
  const detail::FreeBlockQueue& queue = m.pool.free_queue();
  for (std::int32_t b = queue.front(); dst.size() < src.size(); b = queue.next(b)) {
    if (b < target) dst.push_back(b);
  }
  m.plan_target = num_blocks;
  return hand_out(m, MovePlan::Kind::Compact, std::move(src), std::move(dst));
}

void Compactor::commit(const MovePlan& plan) {
  Impl& m = *m_;
  std::lock_guard<std::mutex> lock(m.mutex);
  require_pending(m, plan, "commit");
  // The stored copy: the caller's may have been edited since it was handed out.
  const MovePlan& pending = m.plan;
  switch (pending.kind) {
    case MovePlan::Kind::Evict:
      commit_evict(m, pending);
      break;
    case MovePlan::Kind::Offload:
      commit_offload(m, pending);
      break;
    case MovePlan::Kind::Recall:
      commit_recall(m, pending);
      break;
    case MovePlan::Kind::Compact:
      commit_compact(m, pending, m.plan_target);
      break;
  }
  m.plan = MovePlan{};
}

void Compactor::abort(const MovePlan& plan) {
  Impl& m = *m_;
  std::lock_guard<std::mutex> lock(m.mutex);
  require_pending(m, plan, "abort");
  m.plan = MovePlan{};
}

std::int64_t Compactor::num_host_blocks() const {
  std::lock_guard<std::mutex> lock(m_->mutex);
  return m_->host->pool.num_blocks();
}

std::int64_t Compactor::num_free_host_blocks() const {
  std::lock_guard<std::mutex> lock(m_->mutex);
  return m_->host->pool.num_free();
}

std::int64_t Compactor::num_offloaded(std::int64_t seq_id) const {
  std::lock_guard<std::mutex> lock(m_->mutex);
  return find(*m_, seq_id, "num_offloaded").num_offloaded;
}

bool Compactor::has_pending_plan() const {
  std::lock_guard<std::mutex> lock(m_->mutex);
  return m_->plan_pending();
}

}  // namespace tinyserve
