// pyfastpo CPU driver (cpu_logps.cpp): raw-pointer entry points bound by bind_cpu.cpp.
// Pointers are addresses (tensor.data_ptr()); strides and sizes are in elements.
#pragma once

#include <cstdint>
#include <string>

#include "native_abi.h"  // dtype codes, number of statistics

namespace pfpo {

// Per-token statistics into out_stats, a contiguous float32 [5, N*T] buffer:
// logp, m (row max), log s (s = sum exp(x - m)), entropy, sum of logits.
// Ignored tokens (label == ignore_index or outside [0, V)) are not read; their
// five values are written as 0. An undefined row (NaN, +inf or only -inf
// logits) gets log s = entropy = logp = NaN. log_sum_sq: a sixth row, log sum_v p_v^2
// (WPO's weight) from the same pass, into a [6, N*T] buffer.
void cpu_forward(uintptr_t logits, int dtype, int64_t N, int64_t T, int64_t V, int64_t stride_n,
                 int64_t stride_t, uintptr_t labels, int64_t ignore_index, uintptr_t out_stats,
                 int num_threads, bool log_sum_sq);

// out[n,t,:] = g[n] * (onehot(y) - exp((x - m[n,t]) - log_s[n,t])) in the logits' dtype;
// zeros for ignored tokens, NaN for a row whose log s is NaN. out may be logits
// itself (every row is read before it is written).
void cpu_backward(uintptr_t logits, int dtype, int64_t N, int64_t T, int64_t V, int64_t stride_n,
                  int64_t stride_t, uintptr_t labels, uintptr_t row_max, uintptr_t log_sum,
                  uintptr_t grad_scale, int64_t ignore_index, uintptr_t out, int64_t out_stride_n,
                  int64_t out_stride_t, int num_threads);

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
