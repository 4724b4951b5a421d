// BlockManager through its public C++ API (the internal SHA-256: test_internals.cpp).
// Expected block ids follow from the documented free-list order (docs/block_manager.md).

#include <tinyserve/tinyserve.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdio>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "check.h"

namespace {

using tinyserve::BlockManager;
using I32 = std::vector<std::int32_t>;
using I64 = std::vector<std::int64_t>;
using Pairs = std::vector<std::pair<std::int32_t, std::int32_t>>;

void test_constructor_and_introspection() {
  EXPECT_THROWS(BlockManager(0, 16), std::invalid_argument);
  EXPECT_THROWS(BlockManager(4, 0), std::invalid_argument);
  EXPECT_THROWS(BlockManager(std::int64_t(1) << 31, 16), std::invalid_argument);
  try {
    BlockManager bad(0, 16);
  } catch (const std::invalid_argument& e) {
    CHECK(std::string(e.what()) == "tinyserve.BlockManager: num_blocks must be >= 1, got 0");
  }
  BlockManager bm(5, 4, true);
  CHECK(bm.num_blocks() == 5 && bm.block_size() == 4 && bm.prefix_caching());
  CHECK(bm.num_free_blocks() == 5);
  const BlockManager::Stats s = bm.stats();
  CHECK(s.num_blocks == 5 && s.num_free == 5 && s.num_used == 0 && s.num_sequences == 0);
  CHECK(!bm.has_sequence(1));
  bm.check();
}

void test_slots_free_order_and_table() {
  BlockManager bm(6, 2);
  CHECK(bm.add_sequence(1) == 0);
  CHECK(bm.append(1, 6) == (I64{0, 1, 2, 3, 4, 5}));  // blocks 0, 1, 2
  bm.add_sequence(2);
  CHECK(bm.append(2, 1) == (I64{6}));  // block 3
  const std::int64_t ids[] = {2, 1};
  BlockManager::BlockTable t = bm.block_table(ids, 2);
  CHECK(t.batch == 2 && t.width == 3);
  CHECK(t.table == (I32{3, 0, 0, 0, 1, 2}));
  CHECK(t.lens == (I32{1, 6}));
  // Tail first, unkeyed to the front: the free list becomes [0, 1, 2, 4, 5].
  bm.free(1);
  bm.add_sequence(3);
  bm.append(3, 10);
  CHECK(bm.block_ids(3) == (I32{0, 1, 2, 4, 5}));
  bm.check();
}

void test_prefix_cache_and_eviction() {
  BlockManager bm(6, 2, true);
  const I64 prompt = {1, 2, 3, 4, 5, 6};
  bm.add_sequence(1);
  bm.append(1, 6, prompt.data());  // blocks 0, 1, 2 keyed
  bm.add_sequence(2);
  bm.append(2, 2);  // block 3
  bm.free(1);       // keyed to the back, tail first: [4, 5, 2, 1, 0]
  CHECK(bm.stats().num_evictable == 3);
  bm.add_sequence(3);
  bm.append(3, 5);  // 4, 5, then evicts 2
  CHECK(bm.block_ids(3) == (I32{4, 5, 2}));
  CHECK(bm.stats().evictions == 1 && bm.stats().num_cached == 2);
  const I64 probe = {1, 2, 3, 4, 5};
  CHECK(bm.add_sequence(4, probe.data(), 5) == 4);  // at most len - 1 tokens
  CHECK(bm.block_ids(4) == (I32{0, 1}));
  CHECK(bm.seq_len(4) == 4);
  const BlockManager::Stats s = bm.stats();
  CHECK(s.prefix_hits == 2 && s.prefix_queries == 2 && s.num_free == 0);
  bm.check();
}

void test_copy_on_write_and_out_of_blocks() {
  BlockManager bm(4, 4);
  bm.add_sequence(1);
  bm.append(1, 6);  // blocks 0, 1
  bm.fork(1, 2);
  CHECK(bm.stats().num_shared == 2);
  // 1 copy + 2 new blocks for 10 more tokens, with 2 free.
  bool caught = false;
  try {
    bm.append(2, 10);
  } catch (const tinyserve::OutOfBlocks& e) {
    caught = true;
    CHECK(std::string(e.what()) == "tinyserve.BlockManager.append: need 3 free blocks, got 2");
  }
  CHECK(caught);
  CHECK(bm.seq_len(2) == 6 && bm.num_free_blocks() == 2 && bm.block_ids(2) == (I32{0, 1}));
  CHECK(bm.take_copies().empty());

  CHECK(bm.append(2, 1) == (I64{2 * 4 + 2}));  // block 1 copied to block 2
  CHECK(bm.take_copies() == (Pairs{{1, 2}}));
  CHECK(bm.take_copies().empty());
  CHECK(bm.append(1, 1) == (I64{1 * 4 + 2}));  // block 1 is the parent's alone now
  CHECK(bm.take_copies().empty());
  bm.check();
}

void test_batch_is_all_or_nothing() {
  BlockManager bm(5, 4);
  bm.add_sequence(1);
  bm.append(1, 2);  // block 0
  bm.fork(1, 2);
  bm.fork(1, 3);
  bm.add_sequence(9);
  bm.append(9, 9);  // blocks 1, 2, 3
  const std::int64_t ids[] = {1, 2, 3};
  const std::int64_t ones[] = {1, 1, 1};
  std::int64_t slots[3] = {-1, -1, -1};
  // Two holders copy, the last writes in place: 2 blocks needed, 1 free.
  EXPECT_THROWS(bm.append_batch(ids, ones, 3, slots), tinyserve::OutOfBlocks);
  CHECK(slots[0] == -1 && bm.seq_len(1) == 2 && bm.num_free_blocks() == 1);
  const std::int64_t dup[] = {1, 2, 1};
  EXPECT_THROWS(bm.append_batch(dup, ones, 3, slots), std::invalid_argument);
  const std::int64_t negative[] = {1, -1, 1};
  EXPECT_THROWS(bm.append_batch(ids, negative, 3, slots), std::invalid_argument);
  bm.free(9);  // [1, 2, 3, 4]
  bm.append_batch(ids, ones, 3, slots);
  CHECK(slots[0] == 1 * 4 + 2 && slots[1] == 2 * 4 + 2 && slots[2] == 0 * 4 + 2);
  CHECK(bm.take_copies() == (Pairs{{0, 1}, {0, 2}}));
  bm.check();
}

void test_errors() {
  BlockManager bm(4, 2);
  bm.add_sequence(1);
  EXPECT_THROWS(bm.add_sequence(1), std::invalid_argument);
  EXPECT_THROWS(bm.append(1, -1), std::invalid_argument);
  EXPECT_THROWS(bm.fork(1, 1), std::invalid_argument);
  EXPECT_THROWS(bm.fork(7, 8), tinyserve::UnknownSequence);
  EXPECT_THROWS(bm.append(7, 1), tinyserve::UnknownSequence);
  EXPECT_THROWS(bm.seq_len(7), tinyserve::UnknownSequence);
  EXPECT_THROWS(bm.block_ids(7), tinyserve::UnknownSequence);
  const std::int64_t unknown[] = {1, 7};
  EXPECT_THROWS(bm.block_table(unknown, 2), tinyserve::UnknownSequence);
  EXPECT_THROWS_WITH(bm.append(1, 1, nullptr, nullptr), std::invalid_argument,
                     "append: slots_out must not be null");
  // Null and negative counts of the pointer API, each refused before anything changes.
  const std::int64_t one_id[] = {1}, one_count[] = {1}, tokens[] = {5, 6, 7};
  std::int64_t slot = -1;
  EXPECT_THROWS_WITH(bm.append_batch(one_id, one_count, 1, nullptr), std::invalid_argument,
                     "append_batch: slots_out must not be null");
  EXPECT_THROWS_WITH(bm.append_batch(one_id, one_count, -1, &slot), std::invalid_argument,
                     "append_batch: count must be >= 0, got -1");
  EXPECT_THROWS_WITH(bm.append_batch(one_id, -1, 1), std::invalid_argument,
                     "append_batch: count must be >= 0, got -1");
  EXPECT_THROWS_WITH(bm.append_batch(nullptr, one_count, 1, &slot), std::invalid_argument,
                     "append_batch: seq_ids and num_tokens must not be null");
  EXPECT_THROWS_WITH(bm.append_batch(one_id, nullptr, 1, &slot), std::invalid_argument,
                     "append_batch: seq_ids and num_tokens must not be null");
  EXPECT_THROWS_WITH(bm.add_sequence(2, tokens, -1), std::invalid_argument,
                     "add_sequence: num_token_ids must be >= 0, got -1");
  EXPECT_THROWS_WITH(bm.add_sequence(2, nullptr, 3), std::invalid_argument,
                     "add_sequence: token_ids must not be null when num_token_ids > 0, got 3");
  EXPECT_THROWS_WITH(bm.match_prefix(nullptr, 3), std::invalid_argument,
                     "match_prefix: token_ids must not be null when num_token_ids > 0, got 3");
  CHECK(slot == -1 && bm.seq_len(1) == 0 && bm.num_free_blocks() == 4);
  EXPECT_THROWS(bm.seq_len(2), tinyserve::UnknownSequence);
  bm.check();
  bm.free(1);
  EXPECT_THROWS(bm.free(1), tinyserve::UnknownSequence);
  // Python maps it to KeyError; C++ callers may catch it as std::out_of_range.
  EXPECT_THROWS(bm.free(1), std::out_of_range);
  CHECK(bm.num_free_blocks() == 4);
  bm.check();
}

// Threads work on their own sequences of one shared manager; the mutex must keep the shared
// free list, cache and counters consistent.
void test_threads() {
  constexpr int kThreads = 4, kIterations = 300;
  BlockManager bm(1 << 14, 4, true);
  std::atomic<int> failures{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      try {
        for (int i = 0; i < kIterations; ++i) {
          const std::int64_t seq = std::int64_t(t) * 100000 + 2 * i;
          const I64 prompt = {t, i % 5, 7, 8, 9, 10, 11};
          const std::int64_t covered = bm.add_sequence(seq, prompt.data(), 7);
          bm.append(seq, 7 - covered, prompt.data() + covered);
          bm.fork(seq, seq + 1);
          const std::int64_t ids[] = {seq, seq + 1};
          const std::int64_t counts[] = {1 + i % 3, 2};
          std::int64_t slots[5];
          bm.append_batch(ids, counts, 2, slots);
          bm.take_copies();
          if (i % 4 != 0) {
            bm.free(seq + 1);
            bm.free(seq);
          }
        }
      } catch (const std::exception& e) {
        std::printf("thread %d: %s\n", t, e.what());
        ++failures;
      }
    });
  }
  for (std::thread& th : threads) th.join();
  CHECK(failures == 0);
  CHECK(bm.stats().num_sequences == kThreads * (kIterations / 4) * 2);
  bm.check();
}

}  // namespace

int main() {
  test_constructor_and_introspection();
  test_slots_free_order_and_table();
  test_prefix_cache_and_eviction();
  test_copy_on_write_and_out_of_blocks();
  test_batch_is_all_or_nothing();
  test_errors();
  test_threads();
  return test::exit_code();
}
