#include "tinyserve/block_manager.h"

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace nb = nanobind;
using namespace nb::literals;

namespace tinyserve::bindings {

namespace {

std::string where(const char* method) {
  return std::string("tinyserve.BlockManager.") + method + ": ";
}

// A 1-D int64 view of an argument: a sequence of Python ints, or any 1-D integer array on the
// CPU (NumPy, any DLPack or buffer-protocol producer). A C-contiguous int64 array is borrowed;
// anything else is converted into an owned vector.
class Int64Arg {
 public:
  Int64Arg(nb::handle h, const char* method, const char* name) {
    nb::ndarray<nb::ro> array;
    if (nb::try_cast(h, array, /*convert=*/false)) {
      from_array(array, method, name);
    } else if (nb::isinstance<nb::sequence>(h) && !nb::isinstance<nb::str>(h) &&
               nb::try_cast(h, owned_, /*convert=*/true)) {
      data_ = owned_.data();
      size_ = owned_.size();
    } else {
      throw nb::type_error((where(method) + name + " must be a list of ints or a 1-D integer " +
                            "array, got " + nb::inst_name(h).c_str())
                               .c_str());
    }
  }

  const std::int64_t* data() const { return data_; }
  std::int64_t size() const { return std::int64_t(size_); }

 private:
  void from_array(const nb::ndarray<nb::ro>& a, const char* method, const char* name) {
    auto bad = [&](const std::string& what) {
      return std::invalid_argument(where(method) + name + " " + what);
    };
    if (a.device_type() != nb::device::cpu::value) throw bad("must be on the CPU");
    if (a.ndim() != 1) throw bad("must be 1-D, got " + std::to_string(a.ndim()) + " dimensions");
    const nb::dlpack::dtype dt = a.dtype();
    const auto code = static_cast<nb::dlpack::dtype_code>(dt.code);
    const bool is_signed = code == nb::dlpack::dtype_code::Int;
    if ((!is_signed && code != nb::dlpack::dtype_code::UInt) || dt.lanes != 1 ||
        (dt.bits != 8 && dt.bits != 16 && dt.bits != 32 && dt.bits != 64)) {
      throw nb::type_error((where(method) + name + " must hold integers, got dtype code " +
                            std::to_string(int(dt.code)) + " with " + std::to_string(dt.bits) +
                            " bits")
                               .c_str());
    }
    size_ = a.shape(0);
    const std::int64_t stride = a.stride(0);
    const auto* bytes = static_cast<const std::uint8_t*>(a.data());
    if (is_signed && dt.bits == 64 && (stride == 1 || size_ <= 1)) {
      array_ = a;  // keeps the memory alive
      data_ = static_cast<const std::int64_t*>(a.data());
      return;
    }
    owned_.resize(size_);
    const std::int64_t step = stride * (dt.bits / 8);
    for (std::size_t i = 0; i < size_; ++i) {
      const std::uint8_t* p = bytes + std::int64_t(i) * step;
      owned_[i] = is_signed
                      ? load<std::int8_t, std::int16_t, std::int32_t, std::int64_t>(p, dt.bits)
                      : load_unsigned(p, dt.bits, method, name);
    }
    data_ = owned_.data();
  }

  // memcpy: a strided view need not be aligned.
  template <class T>
  static T load_as(const std::uint8_t* p) {
    T v;
    std::memcpy(&v, p, sizeof v);
    return v;
  }

  template <class T8, class T16, class T32, class T64>
  static std::int64_t load(const std::uint8_t* p, int bits) {
    if (bits == 8) return load_as<T8>(p);
    if (bits == 16) return load_as<T16>(p);
    if (bits == 32) return load_as<T32>(p);
    return std::int64_t(load_as<T64>(p));
  }

  static std::int64_t load_unsigned(const std::uint8_t* p, int bits, const char* method,
                                    const char* name) {
    const std::uint64_t v =
        std::uint64_t(load<std::uint8_t, std::uint16_t, std::uint32_t, std::uint64_t>(p, bits));
    if (bits == 64 && v > std::uint64_t(std::numeric_limits<std::int64_t>::max())) {
      throw std::invalid_argument(where(method) + name + " must fit in int64, got " +
                                  std::to_string(v));
    }
    return std::int64_t(v);
  }

  nb::ndarray<nb::ro> array_;
  std::vector<std::int64_t> owned_;
  const std::int64_t* data_ = nullptr;
  std::size_t size_ = 0;
};

// Hands a vector's buffer to NumPy without a copy: the array owns the vector. Strides in
// elements; none means C order.
template <class T>
nb::ndarray<nb::numpy, T> to_numpy(std::vector<T>&& v, std::initializer_list<std::size_t> shape,
                                   std::initializer_list<std::int64_t> strides = {}) {
  auto* owned = new std::vector<T>(std::move(v));
  nb::capsule owner(owned, [](void* p) noexcept { delete static_cast<std::vector<T>*>(p); });
  return nb::ndarray<nb::numpy, T>(owned->data(), shape, owner, strides);
}

}  // namespace

void bind_block_manager(nb::module_& m) {
  using Int64Array = nb::ndarray<nb::numpy, std::int64_t>;
  using Int32Array = nb::ndarray<nb::numpy, std::int32_t>;

  nb::class_<BlockManager>(
      m, "BlockManager",
      "The engine's allocator of physical KV-cache blocks: block ids, slot ids (block * "
      "block_size + offset), copy-on-write pairs and prefix caching. Owns no tensor memory. "
      "Thread-safe; every method releases the GIL.")
      .def(nb::init<std::int64_t, std::int64_t, bool>(), "num_blocks"_a, "block_size"_a,
           "enable_prefix_caching"_a = false)
      .def(
          "add_sequence",
          [](BlockManager& self, std::int64_t seq_id, nb::handle token_ids) {
            if (token_ids.is_none()) {
              nb::gil_scoped_release release;
              return self.add_sequence(seq_id);
            }
            Int64Arg ids(token_ids, "add_sequence", "token_ids");
            nb::gil_scoped_release release;
            return self.add_sequence(seq_id, ids.data(), ids.size());
          },
          "seq_id"_a, "token_ids"_a = nb::none(),
          nb::sig("def add_sequence(self, seq_id: int, token_ids: typing.Sequence[int] | "
                  "numpy.typing.ArrayLike | None = None) -> int"),
          "Registers a sequence. With prefix caching and token ids, attaches the cached blocks "
          "of the prompt's longest cached prefix and returns the tokens they cover (at most "
          "len(token_ids) - 1); those count as appended. Otherwise returns 0. The rest of the "
          "prompt is appended by the caller (append with its token ids).")
      .def(
          "match_prefix",
          [](const BlockManager& self, nb::handle token_ids) {
            Int64Arg ids(token_ids, "match_prefix", "token_ids");
            BlockManager::PrefixMatch match;
            {
              nb::gil_scoped_release release;
              match = self.match_prefix(ids.data(), ids.size());
            }
            nb::dict d;
            d["tokens"] = match.tokens;
            d["blocks"] = match.blocks;
            d["free_blocks"] = match.free_blocks;
            return d;
          },
          "token_ids"_a,
          nb::sig("def match_prefix(self, token_ids: typing.Sequence[int] | "
                  "numpy.typing.ArrayLike) -> dict[str, int]"),
          "What add_sequence would attach for this prompt, without changing anything: "
          "{'tokens': tokens covered, 'blocks': cached blocks, 'free_blocks': those now free, "
          "which attaching takes out of the free list}. For admission control.")
      .def(
          "append",
          [](BlockManager& self, std::int64_t seq_id, std::int64_t num_tokens,
             nb::handle token_ids) {
            std::vector<std::int64_t> slots;
            if (token_ids.is_none()) {
              nb::gil_scoped_release release;
              slots = self.append(seq_id, num_tokens);
            } else {
              Int64Arg ids(token_ids, "append", "token_ids");
              if (num_tokens >= 0 && ids.size() != num_tokens) {
                throw std::invalid_argument(where("append") + "token_ids must have num_tokens (" +
                                            std::to_string(num_tokens) + ") entries, got " +
                                            std::to_string(ids.size()));
              }
              nb::gil_scoped_release release;
              slots = self.append(seq_id, num_tokens, ids.data());
            }
            const std::size_t n = slots.size();
            return to_numpy(std::move(slots), {n});
          },
          "seq_id"_a, "num_tokens"_a, "token_ids"_a = nb::none(),
          nb::sig("def append(self, seq_id: int, num_tokens: int, token_ids: "
                  "typing.Sequence[int] | numpy.typing.ArrayLike | None = None) -> "
                  "numpy.typing.NDArray[numpy.int64]"),
          "Reserves the slots of the sequence's next num_tokens tokens and returns them (int64). "
          "A shared partial last block is copied first (see take_copies). Token ids key the "
          "blocks that become full. Raises OutOfBlocks, changing nothing, when blocks run out.")
      .def(
          "append_batch",
          [](BlockManager& self, nb::handle seq_ids, nb::handle num_tokens) {
            const char* method = "append_batch";
            Int64Arg ids(seq_ids, method, "seq_ids");
            std::vector<std::int64_t> same_count;
            const std::int64_t* counts = nullptr;
            std::int64_t count_size = 0;
            std::optional<Int64Arg> count_arg;
            std::int64_t one_count = 0;
            if (!nb::isinstance<nb::sequence>(num_tokens) &&
                nb::try_cast(num_tokens, one_count, /*convert=*/true)) {
              same_count.assign(std::size_t(ids.size()), one_count);
              counts = same_count.data();
              count_size = ids.size();
            } else {
              count_arg.emplace(num_tokens, method, "num_tokens");
              counts = count_arg->data();
              count_size = count_arg->size();
            }
            if (count_size != ids.size()) {
              throw std::invalid_argument(where(method) +
                                          "num_tokens must have one entry per "
                                          "sequence (" +
                                          std::to_string(ids.size()) + "), got " +
                                          std::to_string(count_size));
            }
            // Sized only when every count is valid; otherwise the core rejects the call before
            // it writes a slot.
            std::int64_t total = 0;
            bool valid = true;
            for (std::int64_t i = 0; i < count_size; ++i) {
              if (counts[i] < 0 || counts[i] > std::numeric_limits<std::int32_t>::max()) {
                valid = false;
              } else {
                total += counts[i];
              }
            }
            std::vector<std::int64_t> slots(valid ? std::size_t(total) : 0);
            {
              nb::gil_scoped_release release;
              self.append_batch(ids.data(), counts, ids.size(), slots.data());
            }
            const std::size_t n = slots.size();
            return to_numpy(std::move(slots), {n});
          },
          "seq_ids"_a, "num_tokens"_a,
          nb::sig("def append_batch(self, seq_ids: typing.Sequence[int] | "
                  "numpy.typing.ArrayLike, num_tokens: int | typing.Sequence[int] | "
                  "numpy.typing.ArrayLike) -> numpy.typing.NDArray[numpy.int64]"),
          "append() for every listed sequence (num_tokens: one count each, or one int for all), "
          "the slots concatenated in order. All-or-nothing over the batch. A sequence id may "
          "appear once.")
      .def("fork", &BlockManager::fork, "parent_id"_a, "child_id"_a,
           nb::call_guard<nb::gil_scoped_release>(),
           "The child shares every block of the parent; a shared partial block is copied when "
           "either of them appends into it.")
      .def("free", &BlockManager::free, "seq_id"_a, nb::call_guard<nb::gil_scoped_release>(),
           "Releases the sequence's blocks, tail first. Raises KeyError for an unknown id.")
      .def(
          "block_table",
          [](const BlockManager& self, nb::handle seq_ids) {
            Int64Arg ids(seq_ids, "block_table", "seq_ids");
            BlockManager::BlockTable t;
            {
              nb::gil_scoped_release release;
              t = self.block_table(ids.data(), ids.size());
            }
            const std::size_t batch = std::size_t(t.batch), width = std::size_t(t.width);
            return nb::make_tuple(to_numpy(std::move(t.table), {batch, width}),
                                  to_numpy(std::move(t.lens), {batch}));
          },
          "seq_ids"_a,
          nb::sig("def block_table(self, seq_ids: typing.Sequence[int] | "
                  "numpy.typing.ArrayLike) -> tuple[numpy.typing.NDArray[numpy.int32], "
                  "numpy.typing.NDArray[numpy.int32]]"),
          "(table int32 [batch, max_blocks] padded with 0, lens int32 [batch]).")
      .def(
          "take_copies",
          [](BlockManager& self) {
            // Column-major [P, 2]: pairs[:, 0] and pairs[:, 1] are contiguous, as copy_blocks
            // wants its src and dst.
            std::vector<std::int32_t> columns;
            {
              nb::gil_scoped_release release;
              const auto pairs = self.take_copies();
              columns.resize(2 * pairs.size());
              for (std::size_t i = 0; i < pairs.size(); ++i) {
                columns[i] = pairs[i].first;
                columns[pairs.size() + i] = pairs[i].second;
              }
            }
            const std::size_t n = columns.size() / 2;
            return to_numpy(std::move(columns), {n, 2}, {1, std::int64_t(n)});
          },
          nb::sig("def take_copies(self) -> numpy.typing.NDArray[numpy.int32]"),
          "The pending copy-on-write pairs, int32 [P, 2] as (src, dst), emptied by the call; "
          "pairs[:, 0] and pairs[:, 1] are contiguous. Run them (copy_blocks) before the step's "
          "kernels write anything.")
      .def("seq_len", &BlockManager::seq_len, "seq_id"_a, nb::call_guard<nb::gil_scoped_release>())
      .def(
          "block_ids",
          [](const BlockManager& self, std::int64_t seq_id) {
            std::vector<std::int32_t> ids;
            {
              nb::gil_scoped_release release;
              ids = self.block_ids(seq_id);
            }
            const std::size_t n = ids.size();
            return to_numpy(std::move(ids), {n});
          },
          "seq_id"_a,
          nb::sig("def block_ids(self, seq_id: int) -> "
                  "numpy.typing.NDArray[numpy.int32]"))
      .def("has_sequence", &BlockManager::has_sequence, "seq_id"_a,
           nb::call_guard<nb::gil_scoped_release>())
      .def("__contains__", &BlockManager::has_sequence, "seq_id"_a,
           nb::call_guard<nb::gil_scoped_release>())
      .def_prop_ro("num_free_blocks",
                   [](const BlockManager& self) {
                     nb::gil_scoped_release release;
                     return self.num_free_blocks();
                   })
      .def_prop_ro("num_blocks", &BlockManager::num_blocks)
      .def_prop_ro("block_size", &BlockManager::block_size)
      .def_prop_ro("prefix_caching", &BlockManager::prefix_caching)
      .def(
          "stats",
          [](const BlockManager& self) {
            BlockManager::Stats s;
            {
              nb::gil_scoped_release release;
              s = self.stats();
            }
            nb::dict d;
            d["num_blocks"] = s.num_blocks;
            d["num_free"] = s.num_free;
            d["num_used"] = s.num_used;
            d["num_cached"] = s.num_cached;
            d["num_evictable"] = s.num_evictable;
            d["num_shared"] = s.num_shared;
            d["num_sequences"] = s.num_sequences;
            d["num_tokens"] = s.num_tokens;
            d["waste_slots"] = s.waste_slots;
            d["prefix_hits"] = s.prefix_hits;
            d["prefix_queries"] = s.prefix_queries;
            d["evictions"] = s.evictions;
            return d;
          },
          nb::sig("def stats(self) -> dict[str, int]"))
      .def("check", &BlockManager::check, nb::call_guard<nb::gil_scoped_release>(),
           "Verifies every invariant; raises RuntimeError naming the first violation.")
      .def("__repr__", [](const BlockManager& self) {
        BlockManager::Stats s;
        {
          nb::gil_scoped_release release;
          s = self.stats();
        }
        return "BlockManager(num_blocks=" + std::to_string(s.num_blocks) +
               ", block_size=" + std::to_string(self.block_size()) +
               ", prefix_caching=" + (self.prefix_caching() ? "True" : "False") +
               ", num_free=" + std::to_string(s.num_free) +
               ", num_sequences=" + std::to_string(s.num_sequences) + ")";
      });
}

}  // namespace tinyserve::bindings
