// pyfastpo: host replay of the CUDA kernels' per-row math (device_emulation.cpp), for tests.
#pragma once

#include <cstdint>
#include <vector>

namespace pfpo {

// cuda_logps.cu's forward on one float32 row of V logits with target y, as
// `threads` GPU threads would run it (vec = 4: the 16-byte vector path, 0: the
// scalar kernel), with the device's exp. Returns {logp, m, log s, entropy, sum_x}.
std::vector<float> emulate_device_forward(uintptr_t row, int64_t V, int64_t y, int threads, int vec);

// cuda_logps.cu's backward on one float32 row: out[v] = g * ([v == y] - p_v), NaN when log_s is.
void emulate_device_backward(uintptr_t row, int64_t V, int64_t y, float m, float log_s, float g, uintptr_t out);

// The device's exp (device_exp: ex2 with a flush to zero) on n float32 values.
void emulated_device_exp(uintptr_t src, uintptr_t dst, int64_t n);

}  // namespace pfpo
