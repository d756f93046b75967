// pyfastpo CUDA driver (cuda_logps.cu): host entry points bound by bind_cuda.cpp.
// Plain C++ types only (pointers and the stream as integers), so the binding is
// compiled by the host compiler without CUDA headers. Every function throws
// std::runtime_error (-> Python RuntimeError) carrying the CUDA error string.
#pragma once

#include <cstdint>
#include <string>

namespace pfpo {

// Throws "no CUDA device" unless at least one device is usable; returns the count.
int cuda_device_count();

// Same contract as cpu_forward / cpu_backward (cpu_logps.h; log_sum_sq: the sixth row of
// out_stats), on `device`,
// enqueued on `stream` (a cudaStream_t as an integer; 0 = legacy default stream).
void cuda_forward(uintptr_t logits, int dtype, int64_t N, int64_t T, int64_t V, int64_t stride_n,
                  int64_t stride_t, uintptr_t labels, int64_t ignore_index, uintptr_t out_stats,
                  bool log_sum_sq, int device, uintptr_t stream);

void cuda_backward(uintptr_t logits, int dtype, int64_t N, int64_t T, int64_t V, int64_t stride_n,
                   int64_t stride_t, uintptr_t labels, uintptr_t row_max, uintptr_t log_sum,
                   uintptr_t grad_scale, int64_t ignore_index, uintptr_t out, int64_t out_stride_n,
                   int64_t out_stride_t, int device, uintptr_t stream);

}  // namespace pfpo
