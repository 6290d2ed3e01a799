// Registration functions of the op families bound in separate files; PYBIND11_MODULE in
// bindings.cpp calls each once.
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

void bind_sample_teacher(pybind11::module_& m);   // sample_teacher_bindings.cpp
void bind_sinkhorn(pybind11::module_& m);         // sinkhorn_bindings.cpp
void bind_sparse_kd_loss(pybind11::module_& m);   // sparse_kd_loss_bindings.cpp
void bind_uld_loss(pybind11::module_& m);         // uld_loss_bindings.cpp

}  // namespace fastkd
