// Internals that the public API does not reach, linked from the tinyserve_internal object library
// (in-tree builds only: -DTINYSERVE_BUILD_TESTS=ON).

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include "check.h"
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

}  // namespace

int main() {
  test_sha256();
  return test::exit_code();
}
