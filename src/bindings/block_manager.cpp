#include "tinyserve/block_manager.h"

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "convert.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace tinyserve::bindings {

void bind_block_manager(nb::module_& m) {
  using Int64Array = nb::ndarray<nb::numpy, std::int64_t>;
  using Int32Array = nb::ndarray<nb::numpy, std::int32_t>;

  nb::class_<BlockManager>(
      m, "BlockManager",
      "The engine's allocator of physical KV-cache blocks: block ids, slot ids (block * "
      "block_size + offset), copy-on-write pairs and prefix caching. Owns no tensor memory. "
      "Thread-safe; every method releases the GIL.")
      .def(
          "__init__",
          [](BlockManager* self, nb::handle num_blocks, nb::handle block_size,
             nb::handle enable_prefix_caching) {
            constexpr const char* op = "BlockManager";
            new (self) BlockManager(to_int<std::int64_t>(num_blocks, op, "num_blocks"),
                                    to_int<std::int64_t>(block_size, op, "block_size"),
                                    to_bool(enable_prefix_caching, op, "enable_prefix_caching"));
          },
          "num_blocks"_a.none(), "block_size"_a.none(), "enable_prefix_caching"_a.none() = false,
          nb::sig("def __init__(self, num_blocks: int, block_size: int, "
                  "enable_prefix_caching: bool = False) -> None"))
      .def(
          "add_sequence",
          [](BlockManager& self, nb::handle seq_id, nb::handle token_ids) {
            constexpr const char* op = "BlockManager.add_sequence";
            const std::int64_t id = to_int<std::int64_t>(seq_id, op, "seq_id");
            if (token_ids.is_none()) {
              nb::gil_scoped_release release;
              return self.add_sequence(id);
            }
            Int64Arg ids(token_ids, op, "token_ids");
            nb::gil_scoped_release release;
            return self.add_sequence(id, ids.data(), ids.size());
          },
          "seq_id"_a.none(), "token_ids"_a.none() = nb::none(),
          nb::sig("def add_sequence(self, seq_id: int, token_ids: typing.Sequence[int] | "
                  "numpy.typing.ArrayLike | None = None) -> int"),
          "Registers a sequence. With prefix caching and token ids, attaches the cached blocks "
          "of the prompt's longest cached prefix and returns the tokens they cover (at most "
          "len(token_ids) - 1); those count as appended. Otherwise returns 0. The rest of the "
          "prompt is appended by the caller (append with its token ids).")
      .def(
          "match_prefix",
          [](const BlockManager& self, nb::handle token_ids) {
            Int64Arg ids(token_ids, "BlockManager.match_prefix", "token_ids");
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
          "token_ids"_a.none(),
          nb::sig("def match_prefix(self, token_ids: typing.Sequence[int] | "
                  "numpy.typing.ArrayLike) -> dict[str, int]"),
          "What add_sequence would attach for this prompt, without changing anything: "
          "{'tokens': tokens covered, 'blocks': cached blocks, 'free_blocks': those now free, "
          "which attaching takes out of the free list}. For admission control.")
      .def(
          "append",
          [](BlockManager& self, nb::handle seq_id, nb::handle num_tokens, nb::handle token_ids) {
            constexpr const char* op = "BlockManager.append";
            const std::int64_t id = to_int<std::int64_t>(seq_id, op, "seq_id");
            const std::int64_t count = to_int<std::int64_t>(num_tokens, op, "num_tokens");
            std::vector<std::int64_t> slots;
            if (token_ids.is_none()) {
              nb::gil_scoped_release release;
              slots = self.append(id, count);
            } else {
              Int64Arg ids(token_ids, op, "token_ids");
              if (count >= 0 && ids.size() != count) {
                detail::fail(op, "token_ids must have num_tokens (", count, ") entries, got ",
                             ids.size());
              }
              nb::gil_scoped_release release;
              slots = self.append(id, count, ids.data());
            }
            const std::size_t n = slots.size();
            return to_numpy(std::move(slots), {n});
          },
          "seq_id"_a.none(), "num_tokens"_a.none(), "token_ids"_a.none() = nb::none(),
          nb::sig("def append(self, seq_id: int, num_tokens: int, token_ids: "
                  "typing.Sequence[int] | numpy.typing.ArrayLike | None = None) -> "
                  "numpy.typing.NDArray[numpy.int64]"),
          "Reserves the slots of the sequence's next num_tokens tokens and returns them (int64). "
          "A shared partial last block is copied first (see take_copies). Token ids key the "
          "blocks that become full. Raises OutOfBlocks, changing nothing, when blocks run out.")
      .def(
          "append_batch",
          [](BlockManager& self, nb::handle seq_ids, nb::handle num_tokens) {
            constexpr const char* op = "BlockManager.append_batch";
            Int64Arg ids(seq_ids, op, "seq_ids");
            std::vector<std::int64_t> slots;
            // One int for every sequence; arrays and lists (sequences) give one count each. An
            // array with __index__ (a one-element torch tensor) is an array: only ints and
            // scalars without dimensions (NumPy integers, 0-d arrays) count for every sequence.
            bool scalar = PyLong_Check(num_tokens.ptr());
            if (!scalar && PyIndex_Check(num_tokens.ptr())) {
              const nb::object shape = nb::getattr(num_tokens, "shape", nb::none());
              scalar = shape.is_none() || nb::len(shape) == 0;
            }
            if (scalar) {
              const std::int64_t each = to_int<std::int64_t>(num_tokens, op, "num_tokens");
              nb::gil_scoped_release release;
              slots = self.append_batch(ids.data(), ids.size(), each);
            } else {
              Int64Arg counts(num_tokens, op, "num_tokens");
              nb::gil_scoped_release release;
              slots = self.append_batch(ids.data(), ids.size(), counts.data(), counts.size());
            }
            const std::size_t n = slots.size();
            return to_numpy(std::move(slots), {n});
          },
          "seq_ids"_a.none(), "num_tokens"_a.none(),
          nb::sig("def append_batch(self, seq_ids: typing.Sequence[int] | "
                  "numpy.typing.ArrayLike, num_tokens: int | typing.Sequence[int] | "
                  "numpy.typing.ArrayLike) -> numpy.typing.NDArray[numpy.int64]"),
          "append() for every listed sequence (num_tokens: one count each, or one int for all), "
          "the slots concatenated in order. All-or-nothing over the batch. A sequence id may "
          "appear once.")
      .def(
          "fork",
          [](BlockManager& self, nb::handle parent_id, nb::handle child_id) {
            constexpr const char* op = "BlockManager.fork";
            const std::int64_t parent = to_int<std::int64_t>(parent_id, op, "parent_id");
            const std::int64_t child = to_int<std::int64_t>(child_id, op, "child_id");
            nb::gil_scoped_release release;
            self.fork(parent, child);
          },
          "parent_id"_a.none(), "child_id"_a.none(),
          nb::sig("def fork(self, parent_id: int, child_id: int) -> None"),
          "The child shares every block of the parent; a shared partial block is copied when "
          "either of them appends into it.")
      .def(
          "free",
          [](BlockManager& self, nb::handle seq_id) {
            const std::int64_t id = to_int<std::int64_t>(seq_id, "BlockManager.free", "seq_id");
            nb::gil_scoped_release release;
            self.free(id);
          },
          "seq_id"_a.none(), nb::sig("def free(self, seq_id: int) -> None"),
          "Releases the sequence's blocks, tail first. Raises KeyError for an unknown id.")
      .def(
          "block_table",
          [](const BlockManager& self, nb::handle seq_ids) {
            Int64Arg ids(seq_ids, "BlockManager.block_table", "seq_ids");
            BlockManager::BlockTable t;
            {
              nb::gil_scoped_release release;
              t = self.block_table(ids.data(), ids.size());
            }
            const std::size_t batch = std::size_t(t.batch), width = std::size_t(t.width);
            return nb::make_tuple(to_numpy(std::move(t.table), {batch, width}),
                                  to_numpy(std::move(t.lens), {batch}));
          },
          "seq_ids"_a.none(),
          nb::sig("def block_table(self, seq_ids: typing.Sequence[int] | "
                  "numpy.typing.ArrayLike) -> tuple[numpy.typing.NDArray[numpy.int32], "
                  "numpy.typing.NDArray[numpy.int32]]"),
          "(table int32 [batch, max_blocks] padded with 0, lens int32 [batch]). Raises "
          "RuntimeError for a sequence with offloaded blocks (Compactor.plan_recall first).")
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
      .def(
          "seq_len",
          [](const BlockManager& self, nb::handle seq_id) {
            const std::int64_t id = to_int<std::int64_t>(seq_id, "BlockManager.seq_len", "seq_id");
            nb::gil_scoped_release release;
            return self.seq_len(id);
          },
          "seq_id"_a.none(), nb::sig("def seq_len(self, seq_id: int) -> int"))
      .def(
          "block_ids",
          [](const BlockManager& self, nb::handle seq_id) {
            const std::int64_t id =
                to_int<std::int64_t>(seq_id, "BlockManager.block_ids", "seq_id");
            std::vector<std::int32_t> ids;
            {
              nb::gil_scoped_release release;
              ids = self.block_ids(id);
            }
            const std::size_t n = ids.size();
            return to_numpy(std::move(ids), {n});
          },
          "seq_id"_a.none(),
          nb::sig("def block_ids(self, seq_id: int) -> "
                  "numpy.typing.NDArray[numpy.int32]"))
      .def(
          "has_sequence",
          [](const BlockManager& self, nb::handle seq_id) {
            const std::int64_t id =
                to_int<std::int64_t>(seq_id, "BlockManager.has_sequence", "seq_id");
            nb::gil_scoped_release release;
            return self.has_sequence(id);
          },
          "seq_id"_a.none(), nb::sig("def has_sequence(self, seq_id: int) -> bool"))
      .def(
          "__contains__",
          [](const BlockManager& self, nb::handle seq_id) {
            // `x in manager` answers False for anything that is not an int64 id: ints and
            // other integers (NumPy's, a 0-d integer tensor: __index__) are ids, bools not.
            const std::optional<std::int64_t> id = as_int64(seq_id);
            if (!id) return false;
            nb::gil_scoped_release release;
            return self.has_sequence(*id);
          },
          "seq_id"_a.none(), nb::sig("def __contains__(self, seq_id: object) -> bool"))
      .def_prop_ro("num_free_blocks",
                   [](const BlockManager& self) {
                     nb::gil_scoped_release release;
                     return self.num_free_blocks();
                   })
      .def_prop_ro("num_blocks",
                   [](const BlockManager& self) {
                     nb::gil_scoped_release release;
                     return self.num_blocks();
                   })
      .def(
          "resize",
          [](BlockManager& self, nb::handle num_blocks) {
            const std::int64_t n =
                to_int<std::int64_t>(num_blocks, "BlockManager.resize", "num_blocks");
            nb::gil_scoped_release release;
            self.resize(n);
          },
          "num_blocks"_a.none(), nb::sig("def resize(self, num_blocks: int) -> None"),
          "Changes the number of usable blocks, to match a cache pool that was grown or shrunk. "
          "Growing appends free blocks at the back of the free list. Shrinking drops the blocks "
          "at or above num_blocks (cached free ones lose their prefix keys) and raises "
          "RuntimeError, changing nothing, if any of them is in use or read by a pending "
          "copy-on-write pair, or while a compactor plan is pending: compact first "
          "(Compactor.plan_compact(num_blocks)).")
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
            for (const auto& [name, value] : s.items()) d[name] = value;
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
