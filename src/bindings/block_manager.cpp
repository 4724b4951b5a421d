#include <nanobind/nanobind.h>
namespace nb = nanobind;
namespace tinyserve::bindings {
// placeholder until the BlockManager binding lands
void bind_block_manager(nb::module_& m) { m.attr("BlockManager") = nb::none(); }
}  // namespace tinyserve::bindings
