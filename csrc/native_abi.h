// pyfastpo: what the Python side and both C++ drivers (cpu_logps.cpp, cuda_logps.cu)
// agree on when they talk through raw pointers. The Python mirror is
// pyfastpo/backends/native.py (tests/test_native_abi.py checks that they match).
#pragma once

namespace pfpo {

// Logits dtype codes.
enum DtypeCode : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// Number of per-token statistics the forward writes into its contiguous float32
// [kNumStats, N*T] buffer, in this order: logp, m (row max), log s, entropy, sum of logits.
constexpr int kNumStats = 5;

}  // namespace pfpo
