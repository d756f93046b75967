// pybind11 module pyfastpo.backends._C: the CPU driver (cpu_logps.cpp) over raw pointers.
// Tensors cross as integer addresses (tensor.data_ptr()), so this extension
// neither links against torch nor depends on its C++ ABI. The GIL is released
// around the kernels.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "cpu_logps.h"
#include "device_emulation.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "pyfastpo CPU kernels (OpenMP); see pyfastpo/backends/cpp_backend.py";
  using release = py::call_guard<py::gil_scoped_release>;
#ifdef PFPO_SOURCE_HASH
  m.attr("source_hash") = PFPO_SOURCE_HASH;  // of csrc/ at build time (setup.py): tells a stale build
#endif
  m.def("forward", &pfpo::cpu_forward, release(), py::arg("logits"), py::arg("dtype"),
        py::arg("N"), py::arg("T"), py::arg("V"), py::arg("stride_n"), py::arg("stride_t"),
        py::arg("labels"), py::arg("ignore_index"), py::arg("out_stats"), py::arg("num_threads") = 0,
        py::arg("log_sum_sq") = false,
        "Per-token logp, row max, log-sum-exp shift, entropy, sum of logits into a float32 [5, N*T] buffer "
        "(and log sum p^2 as a sixth row of a [6, N*T] one with log_sum_sq).");
  m.def("backward", &pfpo::cpu_backward, release(), py::arg("logits"), py::arg("dtype"),
        py::arg("N"), py::arg("T"), py::arg("V"), py::arg("stride_n"), py::arg("stride_t"),
        py::arg("labels"), py::arg("row_max"), py::arg("log_sum"), py::arg("grad_scale"),
        py::arg("ignore_index"), py::arg("out"), py::arg("out_stride_n"), py::arg("out_stride_t"),
        py::arg("num_threads") = 0,
        "out = g[n] * (onehot(y) - softmax(x)) in the logits' dtype; out may alias logits.");
  m.def("isa", &pfpo::cpu_isa, "Instruction set of the row kernels in use.");
  m.def("set_isa", &pfpo::set_cpu_isa, py::arg("isa"),
        "Force 'default', 'avx2' or 'avx512' ('' = best supported).");
  m.def("to_float", &pfpo::cpu_to_float, release(), py::arg("src"), py::arg("dtype"),
        py::arg("dst"), py::arg("n"), "Test hook: n values of dtype -> float32.");
  m.def("from_float", &pfpo::cpu_from_float, release(), py::arg("src"), py::arg("dst"),
        py::arg("dtype"), py::arg("n"), "Test hook: n float32 values -> dtype (RNE).");
  m.def("exp", &pfpo::cpu_exp, release(), py::arg("src"), py::arg("dst"), py::arg("n"),
        "Test hook: the vectorizable host exp on n float32 values.");
  m.def("device_exp", &pfpo::emulated_device_exp, release(), py::arg("src"), py::arg("dst"), py::arg("n"),
        "Test hook: the CUDA kernels' exp (ex2 with a flush to zero), emulated on the host.");
  m.def("emulate_device_forward", &pfpo::emulate_device_forward, release(), py::arg("row"), py::arg("V"),
        py::arg("y"), py::arg("threads"), py::arg("log_sum_sq") = false,
        "Test hook: the CUDA forward on one float32 row, replayed on the host -> [logp, m, log s, entropy, sum_x, "
        "fast pass (1) or exact pass (0)] (then log sum p^2 with log_sum_sq).");
  m.def("emulate_device_backward", &pfpo::emulate_device_backward, release(), py::arg("row"), py::arg("V"),
        py::arg("y"), py::arg("m"), py::arg("log_s"), py::arg("g"), py::arg("out"),
        "Test hook: the CUDA backward on one float32 row, replayed on the host.");
}
