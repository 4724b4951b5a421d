#include "tinyserve/compactor.h"

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "convert.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace tinyserve::bindings {

namespace {

// The plan's pairs as a fresh int32 array (the plan stays immutable from Python).
nb::ndarray<nb::numpy, std::int32_t> ids(const std::vector<std::int32_t>& v) {
  std::vector<std::int32_t> copy(v);
  const std::size_t n = copy.size();
  return to_numpy(std::move(copy), {n});
}

}  // namespace

void bind_compactor(nb::module_& m) {
  nb::class_<MovePlan>(m, "MovePlan",
                       "Block moves planned by a Compactor, for the engine to run and then "
                       "commit (or abort). kind: 'evict' (src: cached free blocks whose keys are "
                       "dropped, no data moves, dst empty), 'offload' (device src -> host dst, "
                       "swap_blocks), 'recall' (host src -> device dst, swap_blocks), 'compact' "
                       "(device src -> device dst, copy_blocks). No pair reads a block another "
                       "pair writes.")
      .def_prop_ro("kind", [](const MovePlan& p) { return std::string(p.kind_name()); })
      .def_prop_ro(
          "src", [](const MovePlan& p) { return ids(p.src); }, nb::rv_policy::automatic,
          nb::sig("def src(self) -> numpy.typing.NDArray[numpy.int32]"))
      .def_prop_ro(
          "dst", [](const MovePlan& p) { return ids(p.dst); }, nb::rv_policy::automatic,
          nb::sig("def dst(self) -> numpy.typing.NDArray[numpy.int32]"))
      .def_ro(
          "serial", &MovePlan::serial,
          "The plan's id, unique over the process (commit and abort accept only the pending plan).")
      .def(
          "num_bytes",
          [](const MovePlan& p, nb::handle bytes_per_block) {
            return p.num_bytes(
                to_int<std::int64_t>(bytes_per_block, "MovePlan.num_bytes", "bytes_per_block"));
          },
          "bytes_per_block"_a.none(), nb::sig("def num_bytes(self, bytes_per_block: int) -> int"),
          "Bytes the plan copies, given one block's bytes over every cache tensor (0 for evict).")
      .def("__len__", [](const MovePlan& p) { return p.src.size(); })
      .def("__repr__", [](const MovePlan& p) {
        return "MovePlan(kind='" + std::string(p.kind_name()) +
               "', num_pairs=" + std::to_string(p.src.size()) +
               ", serial=" + std::to_string(p.serial) + ")";
      });

  // commit and abort: the plan argument checked as a MovePlan, then the call without the GIL.
  const auto on_plan = [](void (Compactor::*method)(const MovePlan&), const char* op) {
    return [method, op](Compactor& self, nb::handle plan) {
      const MovePlan& p = instance_of<MovePlan>(plan, op, "plan", "MovePlan");
      nb::gil_scoped_release release;
      (self.*method)(p);
    };
  };
  nb::class_<Compactor>(
      m, "Compactor",
      "The LRU memory compactor over a BlockManager (sharing its block pool): plans evictions, "
      "offloads to a host pool, recalls and compactions that the engine executes (copy_blocks, "
      "swap_blocks; see tinyserve.execute_plan) and then commits. One plan at a time; while one "
      "is pending, the manager's calls that change sequences raise RuntimeError. Plans are "
      "all-or-nothing (OutOfBlocks). A manager takes one compactor at a time. Thread-safe; "
      "every method releases the GIL.")
      .def(
          "__init__",
          [](Compactor* self, nb::handle manager, nb::handle num_host_blocks) {
            BlockManager& m =
                instance_of<BlockManager>(manager, "Compactor", "block_manager", "BlockManager");
            new (self)
                Compactor(m, to_int<std::int64_t>(num_host_blocks, "Compactor", "num_host_blocks"));
          },
          "block_manager"_a.none(), "num_host_blocks"_a.none() = 0, nb::keep_alive<1, 2>(),
          nb::sig("def __init__(self, block_manager: BlockManager, num_host_blocks: int = 0) "
                  "-> None"),
          "A compactor over the manager with a host pool of num_host_blocks block slots.")
      .def(
          "touch",
          [](Compactor& self, nb::handle seq_ids) {
            Int64Arg seqs(seq_ids, "Compactor.touch", "seq_ids");
            nb::gil_scoped_release release;
            self.touch(seqs.data(), seqs.size());
          },
          "seq_ids"_a.none(),
          nb::sig("def touch(self, seq_ids: typing.Sequence[int] | numpy.typing.ArrayLike) -> "
                  "None"),
          "Recency: these sequences were attended this step.")
      .def(
          "record_hits",
          [](Compactor& self, nb::handle hits) {
            Int64Arg counts(hits, "Compactor.record_hits", "hits");
            nb::gil_scoped_release release;
            self.record_hits(counts.data(), counts.size());
          },
          "hits"_a.none(),
          nb::sig("def record_hits(self, hits: typing.Sequence[int] | numpy.typing.ArrayLike) "
                  "-> None"),
          "Frequency: adds per-block hit counts (select_pages' hits, num_blocks entries, >= 0).")
      .def(
          "plan_evict",
          [](Compactor& self, nb::handle num_blocks) {
            const std::int64_t n =
                to_int<std::int64_t>(num_blocks, "Compactor.plan_evict", "num_blocks");
            nb::gil_scoped_release release;
            return self.plan_evict(n);
          },
          "num_blocks"_a.none(), nb::sig("def plan_evict(self, num_blocks: int) -> MovePlan"),
          "Drop the prefix-cache keys of num_blocks cached, unreferenced blocks, least recently "
          "used first. No data moves.")
      .def(
          "plan_offload",
          [](Compactor& self, nb::handle num_blocks) {
            const std::int64_t n =
                to_int<std::int64_t>(num_blocks, "Compactor.plan_offload", "num_blocks");
            nb::gil_scoped_release release;
            return self.plan_offload(n);
          },
          "num_blocks"_a.none(), nb::sig("def plan_offload(self, num_blocks: int) -> MovePlan"),
          "Move num_blocks blocks of live sequences (least recent, then least often selected) "
          "to the host pool. Their sequences have no block table until recalled.")
      .def(
          "plan_offload_sequences",
          [](Compactor& self, nb::handle seq_ids) {
            Int64Arg seqs(seq_ids, "Compactor.plan_offload_sequences", "seq_ids");
            nb::gil_scoped_release release;
            return self.plan_offload_sequences(seqs.data(), seqs.size());
          },
          "seq_ids"_a.none(),
          nb::sig("def plan_offload_sequences(self, seq_ids: typing.Sequence[int] | "
                  "numpy.typing.ArrayLike) -> MovePlan"),
          "Preemption by offload: move every device block held only by these sequences to the "
          "host pool (blocks shared with other sequences stay). They have no block table until "
          "recalled (plan_recall).")
      .def(
          "plan_recall",
          [](Compactor& self, nb::handle seq_ids) {
            Int64Arg seqs(seq_ids, "Compactor.plan_recall", "seq_ids");
            nb::gil_scoped_release release;
            return self.plan_recall(seqs.data(), seqs.size());
          },
          "seq_ids"_a.none(),
          nb::sig("def plan_recall(self, seq_ids: typing.Sequence[int] | "
                  "numpy.typing.ArrayLike) -> MovePlan"),
          "Bring every offloaded block of these sequences back into free device blocks.")
      .def(
          "plan_compact",
          [](Compactor& self, nb::handle num_blocks) {
            constexpr const char* op = "Compactor.plan_compact";
            // None is the default target; the C++ API spells it -1, which Python callers must
            // not be able to pass by accident (an off-by-one target would silently compact to
            // the used count).
            std::int64_t n = -1;
            if (!num_blocks.is_none()) {
              n = to_int<std::int64_t>(num_blocks, op, "num_blocks");
              if (n < 0) detail::fail(op, "num_blocks must be >= 0 or None, got ", n);
            }
            nb::gil_scoped_release release;
            return self.plan_compact(n);
          },
          "num_blocks"_a.none() = nb::none(),
          nb::sig("def plan_compact(self, num_blocks: int | None = None) -> MovePlan"),
          "Move used blocks so that every used block id is below num_blocks (>= 0; default: the "
          "number of used blocks), into free blocks there, uncached ones first (a cached one "
          "loses its key only when no other is left); cached free blocks at or above it are "
          "evicted, not moved. After commit, the free tail is taken last.")
      .def("commit", on_plan(&Compactor::commit, "Compactor.commit"), "plan"_a.none(),
           nb::sig("def commit(self, plan: MovePlan) -> None"),
           "After the plan's copies ran: remap the sequences' blocks and free the sources.")
      .def("abort", on_plan(&Compactor::abort, "Compactor.abort"), "plan"_a.none(),
           nb::sig("def abort(self, plan: MovePlan) -> None"),
           "Forget the pending plan; nothing changes.")
      .def(
          "num_offloaded",
          [](const Compactor& self, nb::handle seq_id) {
            const std::int64_t id =
                to_int<std::int64_t>(seq_id, "Compactor.num_offloaded", "seq_id");
            nb::gil_scoped_release release;
            return self.num_offloaded(id);
          },
          "seq_id"_a.none(), nb::sig("def num_offloaded(self, seq_id: int) -> int"),
          "Blocks of the sequence now in the host pool.")
      .def_prop_ro("num_host_blocks", &Compactor::num_host_blocks)
      .def_prop_ro("num_free_host_blocks", &Compactor::num_free_host_blocks)
      .def_prop_ro("has_pending_plan", &Compactor::has_pending_plan)
      .def("__repr__", [](const Compactor& self) {
        return "Compactor(num_host_blocks=" + std::to_string(self.num_host_blocks()) +
               ", num_free_host_blocks=" + std::to_string(self.num_free_host_blocks()) +
               ", has_pending_plan=" + (self.has_pending_plan() ? "True" : "False") + ")";
      });
}

}  // namespace tinyserve::bindings
