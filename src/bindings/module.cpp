#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>

#include <string>

#include "tinyserve/errors.h"
#include "tinyserve/version.h"

namespace nb = nanobind;

namespace tinyserve::bindings {

namespace {
PyObject* argument_type_error_type = nullptr;
}

PyObject* argument_type_error() { return argument_type_error_type; }

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

  // Both bases: Python code catches a wrong kind of argument as TypeError, the contract
  // (DESIGN.md section 6) calls every bad argument a ValueError.
  nb::object bases = nb::steal(PyTuple_Pack(2, PyExc_TypeError, PyExc_ValueError));
  // Named after the module as imported (as nb::exception names OutOfBlocks), so that stubgen,
  // which imports it as a top-level module, finds it as its own.
  const std::string name = nb::cast<std::string>(m.attr("__name__")) + ".ArgumentTypeError";
  nb::object argument_type_error = nb::steal(PyErr_NewExceptionWithDoc(
      name.c_str(),
      "An argument of the wrong kind (a list where an array goes, a string where an int goes): "
      "both a TypeError and a ValueError.",
      bases.ptr(), nullptr));
  if (!argument_type_error.is_valid()) throw nb::python_error();
  tinyserve::bindings::argument_type_error_type = argument_type_error.inc_ref().ptr();
  m.attr("ArgumentTypeError") = argument_type_error;

  tinyserve::bindings::bind_ops(m);
  tinyserve::bindings::bind_block_manager(m);
  tinyserve::bindings::bind_compactor(m);
  tinyserve::bindings::bind_cache_pool(m);
}
