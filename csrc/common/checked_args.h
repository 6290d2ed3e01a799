// What the checked constructors of the kernels' argument structs (make_*_args in *_args.h)
// share: pointers passed as integers, and dtype codes checked. A bad argument throws
// std::invalid_argument (ValueError in Python). No pybind11 or CUDA headers: the bindings and the
// CPU execution of the CUDA kernels (tools/cuda_on_cpu/entry.cpp) build each struct through the
// same constructor.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

#include "dtype.h"

namespace fastkd {

// A data pointer passed from Python as an integer (tensor.data_ptr()); 0 is nullptr.
template <typename T> T* as_ptr(uintptr_t p) { return reinterpret_cast<T*>(p); }

// Throws std::invalid_argument unless `code` is a DType code.
inline void check_dtype_code(int code) {
  if (code < kFloat32 || code > kFloat16)
    throw std::invalid_argument("unknown dtype code " + std::to_string(code));
}

}  // namespace fastkd
