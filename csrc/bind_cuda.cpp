// pybind11 module pyfastpo.backends._cuda: the CUDA driver (cuda_logps.cu) over raw
// pointers and a stream handle. The CUDA runtime is linked statically, so this
// module imports on a machine without a GPU or libcudart; the entry points then
// raise RuntimeError("... no CUDA device ...").
#include <pybind11/pybind11.h>

#include "cuda_logps.h"

namespace py = pybind11;

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "pyfastpo CUDA kernels; see pyfastpo/backends/cuda_backend.py";
  using release = py::call_guard<py::gil_scoped_release>;
#ifdef PFPO_SOURCE_HASH
  m.attr("source_hash") = PFPO_SOURCE_HASH;  // of csrc/ at build time (setup.py): tells a stale build
#endif
  m.def("device_count", &pfpo::cuda_device_count, release(),
        "Number of CUDA devices; raises RuntimeError when there is none.");
  m.def("forward", &pfpo::cuda_forward, release(), py::arg("logits"), py::arg("dtype"),
        py::arg("N"), py::arg("T"), py::arg("V"), py::arg("stride_n"), py::arg("stride_t"),
        py::arg("labels"), py::arg("ignore_index"), py::arg("out_stats"), py::arg("log_sum_sq"),
        py::arg("device"), py::arg("stream"),
        "Per-token logp, row max, log-sum-exp shift, entropy, sum of logits into a float32 [5, N*T] device buffer "
        "(and log sum p^2 as a sixth row of a [6, N*T] one with log_sum_sq).");
  m.def("backward", &pfpo::cuda_backward, release(), py::arg("logits"), py::arg("dtype"),
        py::arg("N"), py::arg("T"), py::arg("V"), py::arg("stride_n"), py::arg("stride_t"),
        py::arg("labels"), py::arg("row_max"), py::arg("log_sum"), py::arg("grad_scale"),
        py::arg("ignore_index"),
        py::arg("out"), py::arg("out_stride_n"), py::arg("out_stride_t"), py::arg("device"),
        py::arg("stream"),
        "out = g[n] * (onehot(y) - softmax(x)) in the logits' dtype; out may alias logits.");
}
