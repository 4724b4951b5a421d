// Internals that the public API does not reach, linked from the tinyserve_internal object library
// (in-tree builds only: -DTINYSERVE_BUILD_TESTS=ON).

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include "check.h"
#include "core/block_pool.h"
#include "core/sha256.h"

namespace {

using I64 = std::vector<std::int64_t>;

std::string hex(const tinyserve::detail::Digest& d) {
  std::string s;
  char buf[3];
  for (std::uint8_t byte : d) {
    std::snprintf(buf, sizeof buf, "%02x", byte);
    s += buf;
  }
  return s;
}

// The prefix cache is only as good as this function.
// Expected digests from Python's hashlib (and, for the first four, FIPS 180-2's examples).
void test_sha256() {
  using tinyserve::detail::sha256;
  CHECK(hex(sha256("abc", 3)) ==
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  CHECK(hex(sha256("", 0)) == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  const std::string two_blocks = "abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq";
  CHECK(hex(sha256(two_blocks.data(), two_blocks.size())) ==
        "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
  // A million 'a' in uneven pieces: exercises every buffering path of update().
  tinyserve::detail::Sha256 h;
  const std::string chunk(1024, 'a');
  std::size_t left = 1000000;
  for (std::size_t piece = 1; left > 0; piece = piece % 1000 + 7) {
    const std::size_t n = std::min(piece, left);
    h.update(chunk.data(), n);
    left -= n;
  }
  CHECK(hex(h.finish()) == "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");

  // sha256_chain: parent bytes, then each value as 8 little-endian bytes.
  const std::string domain = "tinyserve.prefix.v1";
  const auto root = sha256(domain.data(), domain.size());
  CHECK(hex(root) == "fd9578789e72aae578f39506fac203b7da0906b994e743a8861d42a4563a796a");
  const I64 values = {1, -2, (std::int64_t(1) << 62) + 5};
  CHECK(hex(tinyserve::detail::sha256_chain(root, values.data(), values.size())) ==
        "3c3fc396e24b0574062aab10d221180693fc488ce113d337fd1df13c15434bda");
  // 40 values: more than the chunk that sha256_chain encodes at once.
  tinyserve::detail::Digest parent;
  for (int i = 0; i < 32; ++i) parent[std::size_t(i)] = std::uint8_t(i);
  I64 many;
  for (int v = -20; v < 20; ++v) many.push_back(v);
  CHECK(hex(tinyserve::detail::sha256_chain(parent, many.data(), many.size())) ==
        "4a08e636fd58e35b38b94e199af0bc362eb826cae1ffa01389f628632b8605eb");
}

// The block pool shared by BlockManager and Compactor: queue order, O(1) removal from the middle,
// ref counts against the queue, and verify() catching a broken invariant.
void test_block_pool() {
  using tinyserve::detail::BlockPool;
  BlockPool pool(5);
  auto order = [&] {
    std::vector<std::int32_t> out;
    const auto& q = pool.free_queue();
    for (std::int32_t b = q.front(); b != q.end(); b = q.next(b)) out.push_back(b);
    return out;
  };
  CHECK(order() == (std::vector<std::int32_t>{0, 1, 2, 3, 4}) && pool.num_free() == 5);
  CHECK(pool.acquire(2) == 1 && pool.acquire(2) == 2 && pool.acquire(0) == 1);
  CHECK(order() == (std::vector<std::int32_t>{1, 3, 4}) && !pool.free_queue().contains(2));
  std::vector<std::int64_t> holders{1, 0, 2, 0, 0};
  CHECK(pool.verify(holders).empty());
  CHECK(pool.release(2) == 1 && pool.release(0) == 0);
  pool.free_queue().push_front(0);
  pool.take(4, 3);
  CHECK(order() == (std::vector<std::int32_t>{0, 1, 3}) && pool.ref_count(4) == 3);
  holders = {0, 0, 1, 0, 3};
  CHECK(pool.verify(holders).empty());
  holders[4] = 2;
  CHECK(pool.verify(holders).find("block 4 has ref count 3 but 2") != std::string::npos);
  holders[4] = 3;
  pool.clear(4);
  CHECK(pool.verify(holders).find("block 4") != std::string::npos);
  holders[4] = 0;
  CHECK(pool.verify(holders).find("block 4 is unreferenced but not free") != std::string::npos);
  pool.free_queue().push_back(4);
  CHECK(pool.verify(holders).empty() && order() == (std::vector<std::int32_t>{0, 1, 3, 4}));
  // Recency and frequency move with a block's content.
  pool.tick();
  pool.stamp(2);
  pool.add_hits(2, 7);
  pool.move_history(2, 3);
  CHECK(pool.last_use(3) == 1 && pool.hits(3) == 7 && pool.last_use(2) == 0 && pool.hits(2) == 0);
}

// Resizing keeps the queue's order and links (through the moved sentinel), appends new blocks
// at the back, and works from and to an empty queue.
void test_block_pool_resize() {
  using tinyserve::detail::BlockPool;
  BlockPool pool(4);
  auto order = [&] {
    std::vector<std::int32_t> out;
    const auto& q = pool.free_queue();
    for (std::int32_t b = q.front(); b != q.end(); b = q.next(b)) out.push_back(b);
    return out;
  };
  pool.acquire(1);
  pool.free_queue().remove(3);  // about to go: the caller unlinks it first
  pool.free_queue().remove(0);
  pool.free_queue().push_back(0);  // queue 2, 0
  pool.reserve(3);
  pool.resize(3);
  std::vector<std::int64_t> holders{0, 1, 0};
  CHECK(pool.num_blocks() == 3 && pool.free_queue().end() == 3 && pool.verify(holders).empty());
  CHECK(order() == (std::vector<std::int32_t>{2, 0}) && pool.free_queue().back() == 0);
  pool.reserve(6);
  pool.resize(6);
  holders = {0, 1, 0, 0, 0, 0};
  CHECK(pool.verify(holders).empty() && order() == (std::vector<std::int32_t>{2, 0, 3, 4, 5}));
  CHECK(pool.num_free() == 5 && pool.ref_count(5) == 0 && pool.last_use(5) == 0);
  for (std::int32_t b : {2, 0, 3, 4, 5}) pool.free_queue().remove(b);
  pool.release(1);
  pool.free_queue().push_back(1);
  pool.free_queue().remove(1);
  pool.resize(0);
  holders.clear();
  CHECK(pool.num_free() == 0 && pool.free_queue().front() == 0 && pool.verify(holders).empty());
  pool.reserve(2);
  pool.resize(2);
  holders = {0, 0};
  CHECK(order() == (std::vector<std::int32_t>{0, 1}) && pool.verify(holders).empty());
}

}  // namespace

int main() {
  test_sha256();
  test_block_pool();
  test_block_pool_resize();
  return test::exit_code();
}
