// Compactor through its public C++ API: each plan kind with its commit, the rules (one plan at
// a time, all-or-nothing, offloaded sequences have no table), and check() after every step.

#include <tinyserve/tinyserve.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "check.h"

namespace {

using tinyserve::BlockManager;
using tinyserve::Compactor;
using tinyserve::MovePlan;
using I32 = std::vector<std::int32_t>;
using I64 = std::vector<std::int64_t>;

void add(BlockManager& bm, std::int64_t seq, const I64& tokens) {
  const std::int64_t cached = bm.add_sequence(seq, tokens.data(), std::int64_t(tokens.size()));
  bm.append(seq, std::int64_t(tokens.size()) - cached, tokens.data() + cached);
}

I32 table_of(const BlockManager& bm, std::int64_t seq) {
  const BlockManager::BlockTable t = bm.block_table(&seq, 1);
  return t.table;
}

void test_offload_and_recall() {
  BlockManager bm(8, 2, true);
  Compactor comp(bm, 4);
  add(bm, 1, {1, 2, 3});  // blocks 0, 1
  add(bm, 2, {4, 5});     // block 2
  const std::int64_t recent = 2;
  comp.touch(&recent, 1);
  MovePlan plan = comp.plan_offload(2);
  CHECK(plan.kind == MovePlan::Kind::Offload && std::string(plan.kind_name()) == "offload");
  CHECK(plan.src == (I32{0, 1}) && plan.dst == (I32{0, 1}));
  CHECK(plan.num_bytes(100) == 200);
  bm.check();
  comp.commit(plan);
  bm.check();
  CHECK(comp.num_offloaded(1) == 2 && comp.num_free_host_blocks() == 2);
  CHECK(bm.stats().num_offloaded == 2 && bm.num_free_blocks() == 7);
  EXPECT_THROWS(table_of(bm, 1), std::runtime_error);
  EXPECT_THROWS(bm.append(1, 1), std::runtime_error);
  CHECK(table_of(bm, 2) == (I32{2}));

  const std::int64_t seq = 1;
  plan = comp.plan_recall(&seq, 1);
  CHECK(plan.kind == MovePlan::Kind::Recall && plan.src == (I32{0, 1}));
  CHECK(plan.dst.size() == 2 && plan.dst[0] != 2 && plan.dst[1] != 2);
  comp.commit(plan);
  bm.check();
  CHECK(table_of(bm, 1) == plan.dst && bm.seq_len(1) == 3);
  CHECK(comp.num_free_host_blocks() == 4 && bm.stats().num_offloaded == 0);
}

void test_compact_and_evict() {
  BlockManager bm(10, 2, true);
  Compactor comp(bm);
  for (std::int64_t s = 0; s < 5; ++s) add(bm, s, {10 * s + 1, 10 * s + 2, 10 * s + 3});
  bm.free(0);
  bm.free(2);  // cached blocks 0 and 4 stay findable, at the back of the free list
  const std::int64_t used = bm.stats().num_used;
  CHECK(used == 6 && bm.stats().num_evictable == 2);
  MovePlan plan = comp.plan_compact();
  CHECK(plan.kind == MovePlan::Kind::Compact && plan.src.size() == plan.dst.size());
  for (std::size_t i = 0; i < plan.src.size(); ++i) {
    CHECK(plan.src[i] >= used && plan.dst[i] < used);
  }
  comp.commit(plan);
  bm.check();
  for (std::int64_t s : {1, 3, 4}) {
    const I32 t = table_of(bm, s);
    CHECK(*std::max_element(t.begin(), t.end()) < used);
  }
  // The block of 1's first key moved or was kept below the target: its prefix still hits.
  const I64 prompt{11, 12, 99};
  CHECK(bm.match_prefix(prompt.data(), 3).blocks == 1);

  bm.free(1);
  const std::int64_t evictable = bm.stats().num_evictable;
  CHECK(evictable >= 1);
  plan = comp.plan_evict(evictable);
  CHECK(plan.kind == MovePlan::Kind::Evict && plan.dst.empty() && plan.num_bytes(64) == 0);
  comp.commit(plan);
  bm.check();
  CHECK(bm.stats().num_evictable == 0 && bm.match_prefix(prompt.data(), 3).blocks == 0);
}

void test_rules() {
  BlockManager bm(6, 2, false);
  Compactor comp(bm, 1);
  EXPECT_THROWS(Compactor(bm, 1), std::invalid_argument);
  const std::int64_t one_id[] = {1};
  EXPECT_THROWS_WITH(comp.touch(nullptr, 1), std::invalid_argument,
                     "Compactor.touch: seq_ids must not be null");
  EXPECT_THROWS_WITH(comp.touch(one_id, -1), std::invalid_argument,
                     "Compactor.touch: count must be >= 0, got -1");
  EXPECT_THROWS_WITH(comp.record_hits(nullptr, 6), std::invalid_argument,
                     "Compactor.record_hits: hits must not be null");
  bm.add_sequence(1);
  bm.append(1, 5);
  const BlockManager::Stats before = bm.stats();
  // All or nothing: too many blocks for the host pool, a target below the used count.
  EXPECT_THROWS(comp.plan_offload(2), tinyserve::OutOfBlocks);
  EXPECT_THROWS(comp.plan_compact(2), tinyserve::OutOfBlocks);
  EXPECT_THROWS(comp.plan_evict(1), tinyserve::OutOfBlocks);
  EXPECT_THROWS(comp.plan_compact(7), std::invalid_argument);
  CHECK(!comp.has_pending_plan() && bm.stats().num_free == before.num_free);
  bm.check();
  // One plan at a time; the manager waits for it.
  MovePlan plan = comp.plan_offload(1);
  EXPECT_THROWS(comp.plan_compact(), std::runtime_error);
  EXPECT_THROWS(bm.append(1, 1), std::runtime_error);
  EXPECT_THROWS(bm.free(1), std::runtime_error);
  MovePlan stale = plan;
  stale.serial += 7;
  EXPECT_THROWS(comp.commit(stale), std::invalid_argument);
  bm.check();
  comp.abort(plan);
  EXPECT_THROWS(comp.abort(plan), std::runtime_error);
  CHECK(bm.stats().num_free == before.num_free && comp.num_free_host_blocks() == 1);
  bm.check();
  // Pending copy-on-write pairs must run first.
  bm.fork(1, 2);
  bm.append(2, 1);
  EXPECT_THROWS(comp.plan_compact(), std::runtime_error);
  CHECK(bm.take_copies().size() == 1);
  comp.commit(comp.plan_compact());
  bm.check();
}

// Compact, then resize down: the tail is gone, refused while in use, and grows back free.
void test_resize() {
  BlockManager bm(8, 2, true);
  Compactor comp(bm, 4);
  add(bm, 1, {1, 2, 3, 4});  // blocks 0, 1 (keyed)
  add(bm, 2, {5, 6, 7});     // blocks 2, 3
  add(bm, 3, {8, 9});        // block 4
  bm.free(1);                // 0, 1 cached free
  const BlockManager::Stats before = bm.stats();
  try {
    bm.resize(4);  // block 4 is in use
    CHECK(false);
  } catch (const std::runtime_error& e) {
    CHECK(std::string(e.what()).find("resize: block 4 is in use") != std::string::npos);
  }
  EXPECT_THROWS(bm.resize(-1), std::invalid_argument);
  CHECK(bm.num_blocks() == 8 && bm.stats().num_free == before.num_free);
  bm.check();
  MovePlan plan = comp.plan_compact();
  EXPECT_THROWS(bm.resize(3), std::runtime_error);  // a plan is pending
  comp.commit(plan);
  bm.resize(3);
  bm.check();
  CHECK(bm.num_blocks() == 3 && bm.stats().num_blocks == 3 && bm.num_free_blocks() == 0);
  // Blocks 0, 1 (cached, free) took the moved live blocks; the live keyed blocks kept their keys.
  CHECK(bm.stats().num_cached == 2 && bm.seq_len(2) == 3 && bm.seq_len(3) == 2);
  for (std::int64_t s : {2, 3}) {
    for (std::int32_t b : bm.block_ids(s)) CHECK(b < 3);
  }
  EXPECT_THROWS(bm.append(3, 1), tinyserve::OutOfBlocks);
  // The victim's own blocks go to the host; recall needs room on the device.
  const std::int64_t victim = 2;
  plan = comp.plan_offload_sequences(&victim, 1);
  CHECK(plan.src.size() == 2);
  comp.commit(plan);
  bm.check();
  bm.resize(5);
  bm.check();
  CHECK(bm.num_free_blocks() == 4);
  plan = comp.plan_recall(&victim, 1);
  comp.commit(plan);
  bm.check();
  CHECK(bm.seq_len(2) == 3 && comp.num_offloaded(2) == 0 && bm.num_free_blocks() == 2);
}

}  // namespace

int main() {
  test_resize();
  test_offload_and_recall();
  test_compact_and_evict();
  test_rules();
  return test::exit_code();
}
