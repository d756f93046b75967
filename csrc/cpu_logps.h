// pyfastpo CPU driver (cpu_logps.cpp): raw-pointer entry points bound by bind_cpu.cpp.
// Pointers are addresses (tensor.data_ptr()); strides and sizes are in elements.
#pragma once

#include <cstdint>
#include <string>

namespace pfpo {

// Logits dtype codes shared with pyfastpo/backends/cpp_backend.py and the CUDA driver.
enum DtypeCode : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// Per-token logp, lse, entropy, sum of logits (each [N*T] float32, contiguous).
// Ignored tokens (label == ignore_index or outside [0, V)) are not read; their
// outputs are written as 0.
void cpu_forward(uintptr_t logits, int dtype, int64_t N, int64_t T, int64_t V, int64_t stride_n,
                 int64_t stride_t, uintptr_t labels, int64_t ignore_index, uintptr_t out_logp,
                 uintptr_t out_lse, uintptr_t out_entropy, uintptr_t out_sum_x, int num_threads);

// out[n,t,:] = g[n] * (onehot(y) - exp(x - lse[n,t])) in the logits' dtype; zeros
// for ignored tokens. out may be logits itself (every row is read before it is written).
void cpu_backward(uintptr_t logits, int dtype, int64_t N, int64_t T, int64_t V, int64_t stride_n,
                  int64_t stride_t, uintptr_t labels, uintptr_t lse, uintptr_t grad_scale,
                  int64_t ignore_index, uintptr_t out, int64_t out_stride_n, int64_t out_stride_t,
                  int num_threads);

// Which instruction-set variant of the row kernels runs: "avx512", "avx2" or
// "default" (SSE2). set_isa forces one ("" = best this CPU supports); it throws
// if the CPU lacks it.
std::string cpu_isa();
void set_cpu_isa(const std::string& isa);

// Test hooks for the header's scalar helpers (single-threaded, n elements).
void cpu_to_float(uintptr_t src, int dtype, uintptr_t dst, int64_t n);
void cpu_from_float(uintptr_t src, uintptr_t dst, int dtype, int64_t n);
void cpu_exp(uintptr_t src, uintptr_t dst, int64_t n);

}  // namespace pfpo
