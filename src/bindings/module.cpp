#include <nanobind/nanobind.h>

#include "tinyserve/errors.h"
#include "tinyserve/version.h"

namespace nb = nanobind;

namespace tinyserve::bindings {
void bind_ops(nb::module_& m);
void bind_block_manager(nb::module_& m);
void bind_compactor(nb::module_& m);
void bind_cache_pool(nb::module_& m);
}  // namespace tinyserve::bindings

NB_MODULE(_tinyserve, m) {
  m.doc() = "tinyserve's compiled core; use the tinyserve package, which wraps it.";
  m.attr("__version__") = TINYSERVE_VERSION;

  static nb::exception<tinyserve::OutOfBlocks> out_of_blocks(m, "OutOfBlocks", PyExc_RuntimeError);
  nb::register_exception_translator([](const std::exception_ptr& p, void*) {
    try {
      std::rethrow_exception(p);
    } catch (const tinyserve::UnknownSequence& e) {
      PyErr_SetString(PyExc_KeyError, e.what());
    }
  });

  tinyserve::bindings::bind_ops(m);
  tinyserve::bindings::bind_block_manager(m);
  tinyserve::bindings::bind_compactor(m);
  tinyserve::bindings::bind_cache_pool(m);
}
