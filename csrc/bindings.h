// Registration functions of the op families bound in separate files; PYBIND11_MODULE in
// bindings.cpp calls each once.
#pragma once

#include <pybind11/pybind11.h>

namespace fastkd {

void bind_sample_teacher(pybind11::module_& m);   // sample_teacher_bindings.cpp
void bind_sinkhorn(pybind11::module_& m);         // sinkhorn_bindings.cpp
void bind_sparse_kd_loss(pybind11::module_& m);   // sparse_kd_loss_bindings.cpp
void bind_uld_loss(pybind11::module_& m);         // uld_loss_bindings.cpp

}  // namespace fastkd
