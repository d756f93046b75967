// pyfastpo: host replay of the CUDA kernels' per-row math (device_emulation.cpp), for tests.
#pragma once

#include <cstdint>
#include <vector>

namespace pfpo {

// cuda_logps.cu's forward on one float32 row of V logits with target y, as a block
// of `threads` GPU threads runs it (the base-2 fast pass, the exact pass where that
// cannot finish the row), with the device's exp. Returns {logp, m, log s, entropy, sum_x,
// 1 if the fast pass finished the row else 0}, then log sum p^2 with log_sum_sq (WPO's kernel).
std::vector<float> emulate_device_forward(uintptr_t row, int64_t V, int64_t y, int threads, bool log_sum_sq);

// cuda_logps.cu's backward on one float32 row: out[v] = g * ([v == y] - p_v), NaN when log_s is
// (base 2 where |m| < 2^24, as on the device).
void emulate_device_backward(uintptr_t row, int64_t V, int64_t y, float m, float log_s, float g, uintptr_t out);

// The device's exp (device_exp: ex2 with a flush to zero) on n float32 values.
void emulated_device_exp(uintptr_t src, uintptr_t dst, int64_t n);

}  // namespace pfpo
