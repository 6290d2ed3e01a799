// What the bindings files of the op families share: pointer and dtype-code conversion
// (common/checked_args.h), and the registration through which PYBIND11_MODULE in bindings.cpp binds
// each family once.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "common/checked_args.h"

namespace fastkd {

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
