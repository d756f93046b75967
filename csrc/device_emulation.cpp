// pyfastpo: the CUDA kernels' per-row algorithm run on the host, for tests.
//
// No GPU runs in CI, so this file compiles the shared math header the way the
// device sees it (PFPO_EMULATE_DEVICE: pfpo_exp is the device's device_exp,
// ex2 with a flush to zero, not the host polynomial; pfpo_max is fmaxf) and replays cuda_logps.cu's forward for one row:
// each of `threads` threads folds its strided 16-byte vectors with update_k
// (then the scalar tail with update), lanes merge by the xor-shuffle tree of
// warp_reduce, warps through the shared-memory step of block_reduce, thread 0
// finalizes. The same algorithm and order of reduction, so the same special-value
// behaviour; the same numbers only up to FMA contraction (nvcc fuses t + d*s and
// c*s + e into FFMAs, the host build here does not) and the error of the GPU's
// ex2.approx (~2 ulp; exp2f here): compare with a tolerance, never bit for bit.
// Only the math is replayed, not which thread touches which element: the
// in-place ownership of the backward is checked on a model of its schedule
// (tests/test_device_emulation.py::test_in_place_backward_schedule_is_race_free).
//
// The namespace is renamed: the header's inline functions differ from the
// host build's (another pfpo_exp), and two definitions under one name would
// break the one-definition rule (the linker could pick either).
#define PFPO_EMULATE_DEVICE 1
#define pfpo pfpo_device_emulation
#include "logps_math.h"
#undef pfpo

#include <cstdint>
#include <stdexcept>
#include <vector>

#include "device_emulation.h"

namespace pfpo {

namespace dev = pfpo_device_emulation;

namespace {

dev::State warp_reduce(std::vector<dev::State> lanes) {  // 32 lanes, xor butterfly as __shfl_xor_sync
  for (int off = 16; off > 0; off >>= 1) {
    std::vector<dev::State> next(32);
    for (int l = 0; l < 32; ++l) next[l] = dev::merge(lanes[l], lanes[l ^ off]);
    lanes.swap(next);
  }
  return lanes[0];
}

}  // namespace

std::vector<float> emulate_device_forward(uintptr_t row_ptr, int64_t V, int64_t y, int threads, int vec) {
  if (threads < 32 || threads % 32 || threads > 1024) throw std::invalid_argument("threads: a multiple of 32 in [32, 1024]");
  if (vec != 0 && vec != 4) throw std::invalid_argument("vec: 0 (scalar kernel) or 4 (float32 16-byte vectors)");
  const float* row = reinterpret_cast<const float*>(row_ptr);
  std::vector<dev::State> st(threads, dev::empty_state());
  int64_t done = 0;
  if (vec == 4) {
    // The lead before the row's first 16-byte boundary (of the row's real address,
    // as the kernel computes it), one element per thread; then two 16-byte vectors
    // per step, one re-base per pair (cuda_logps.cu's forward loop).
    int64_t lead = static_cast<int64_t>((16 - row_ptr % 16) % 16) / 4;
    lead = lead < V ? lead : V;
    for (int tid = 0; tid < lead; ++tid) dev::update(st[tid], row[tid]);
    const float* vrow = row + lead;
    const int64_t nvec = (V - lead) / 4;
    for (int tid = 0; tid < threads; ++tid) {
      int64_t i = tid;
      for (; i + threads < nvec; i += 2 * threads) {
        float x[8];
        for (int k = 0; k < 4; ++k) x[k] = vrow[4 * i + k], x[4 + k] = vrow[4 * (i + threads) + k];
        dev::update_k<8>(st[tid], x);
      }
      if (i < nvec) {
        const float x[4] = {vrow[4 * i], vrow[4 * i + 1], vrow[4 * i + 2], vrow[4 * i + 3]};
        dev::update_k<4>(st[tid], x);
      }
    }
    done = lead + nvec * 4;
  }
  for (int tid = 0; tid < threads; ++tid)
    for (int64_t i = done + tid; i < V; i += threads) dev::update(st[tid], row[i]);
  const int nwarps = threads / 32;
  std::vector<dev::State> shared(32, dev::empty_state());
  for (int w = 0; w < nwarps; ++w)
    shared[w] = warp_reduce(std::vector<dev::State>(st.begin() + 32 * w, st.begin() + 32 * (w + 1)));
  dev::State total = warp_reduce(shared);  // lanes >= nwarps hold the empty state
  if (total.sum_x != total.sum_x)  // the kernel's count_nans, for a row whose sum is NaN
    for (int64_t i = 0; i < V; ++i) total.nan += dev::is_nan(row[i]);
  const dev::Stats f = dev::finalize(total);
  return {dev::token_logp(row[y], total.m, f.log_s), total.m, f.log_s, f.entropy, total.sum_x};
}

void emulate_device_backward(uintptr_t row_ptr, int64_t V, int64_t y, float m, float log_s, float g,
                             uintptr_t out_ptr) {
  const float* row = reinterpret_cast<const float*>(row_ptr);
  float* out = reinterpret_cast<float*>(out_ptr);
  // cuda_logps.cu's backward: -g p everywhere (NaN when log s is), then the target column.
  for (int64_t v = 0; v < V; ++v) out[v] = dev::grad_other(row[v], m, log_s, g);
  out[y] = dev::grad_target(row[y], m, log_s, g);
}

void emulated_device_exp(uintptr_t src, uintptr_t dst, int64_t n) {
  const float* in = reinterpret_cast<const float*>(src);
  float* out = reinterpret_cast<float*>(dst);
  for (int64_t i = 0; i < n; ++i) out[i] = dev::pfpo_exp(in[i]);
}

}  // namespace pfpo
