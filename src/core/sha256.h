#pragma once

// SHA-256 (FIPS 180-4), written for the prefix-cache keys of the BlockManager. Internal to the
// library: nothing here is exported.

#include <array>
#include <cstddef>
#include <cstdint>

namespace tinyserve::detail {

using Digest = std::array<std::uint8_t, 32>;

// Incremental hashing: update() any number of times, then finish() once.
class Sha256 {
 public:
  Sha256();
  void update(const void* data, std::size_t size);
  Digest finish();

 private:
  void compress(const std::uint8_t* chunk);

  std::array<std::uint32_t, 8> state_;
  std::array<std::uint8_t, 64> buffer_{};
  std::size_t buffered_ = 0;
  std::uint64_t total_bytes_ = 0;
};

Digest sha256(const void* data, std::size_t size);

// SHA-256 of parent || values, each value as 8 little-endian bytes whatever the host's byte
// order, so keys are the same on every machine.
Digest sha256_chain(const Digest& parent, const std::int64_t* values, std::size_t count);

}  // namespace tinyserve::detail
