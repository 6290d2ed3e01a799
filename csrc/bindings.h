// What the bindings files of the op families share: pointer and dtype-code conversion, and the
// registration through which PYBIND11_MODULE in bindings.cpp binds each family once.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "common/dtype.h"

namespace fastkd {

// A data pointer passed from Python as an integer (tensor.data_ptr()); 0 is nullptr.
template <typename T> T* as_ptr(uintptr_t p) { return reinterpret_cast<T*>(p); }

// Raises std::invalid_argument (ValueError in Python) unless `code` is a DType code.
inline void check_dtype_code(int code) {
  if (code < kFloat32 || code > kFloat16)
    throw std::invalid_argument("unknown dtype code " + std::to_string(code));
}

// Adds one op family's functions and classes to the module.
using BindFamily = void (*)(pybind11::module_& m);

// Adds `bind` to the families PYBIND11_MODULE binds, in registration order (families define
// disjoint names, so the order does not matter). Called from a static initializer in the
// family's own bindings file through FASTKD_BIND_FAMILY, which runs when the library is loaded,
// before the module is initialized: adding a family edits no central list.
bool register_family(BindFamily bind);

#define FASTKD_BIND_FAMILY(fn) \
  [[maybe_unused]] static const bool fastkd_family_##fn = ::fastkd::register_family(&fn)

}  // namespace fastkd
