// pyfastpo: the CUDA kernels' per-row algorithm run on the host, for tests.
//
// No GPU runs in CI, so this file compiles the shared math header the way the
// device sees it (PFPO_EMULATE_DEVICE: pfpo_exp is the device's device_exp, ex2 with
// a flush to zero, not the host polynomial; pfpo_max is fmaxf) and replays
// cuda_logps.cu's forward for one float32 row: each of `threads` threads streams its
// lead element, its groups of kUnroll 16-byte vectors, remaining vectors and tail
// (stream_row) through the base-2 fast pass (update2_k); lanes merge by the
// xor-shuffle tree of warp_reduce, warps through the shared-memory step of
// block_reduce; a row the fast pass cannot finish is replayed through the exact pass
// (update_k, merge, NaN count). The same algorithm and order of reduction, so the
// same special-value behaviour; the same numbers only up to the error of the GPU's
// ex2.approx (~2 ulp; exp2f here): compare with a tolerance, never bit for bit. Only
// float32 is replayed: the 16-bit loads and the packed bf16x2/fp16x2 max are exact
// (a max never rounds) and are covered by the GPU check. Which thread touches which
// element is checked on a model of the backward's schedule
// (tests/test_device_emulation.py::test_in_place_backward_schedule_is_race_free).
//
// No FMA contraction in this file: the base-2 pass needs m2 = rn(m log2e) rounded
// on its own, as __fmul_rn gives on the device; a host compiler that fuses
// `m * L - m_new * L` (GCC does wherever the target has FMA: aarch64, -march=native)
// would replay different numbers. Explicit fmaf calls still fuse.
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif
//
// The namespace is renamed: the header's inline functions differ from the
// host build's (another pfpo_exp), and two definitions under one name would
// break the one-definition rule (the linker could pick either).
#define PFPO_EMULATE_DEVICE 1
#define pfpo pfpo_device_emulation
#include "logps_math.h"
#undef pfpo

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <type_traits>
#include <vector>

#include "device_emulation.h"

namespace pfpo {

namespace dev = pfpo_device_emulation;

namespace {

// 16-byte vectors per step of the kernels' streaming loops (cuda_logps.cu's kUnroll).
constexpr int kUnroll = 4;

// xor butterfly over 32 lanes, as __shfl_xor_sync; `merge` is dev::merge2 (fast
// pass, base 2) or dev::merge (exact pass). S: dev::State, or dev::SqState (WPO).
template <typename S, typename Merge>
S warp_reduce(std::vector<S> lanes, Merge merge) {
  for (int off = 16; off > 0; off >>= 1) {
    std::vector<S> next(32);
    for (int l = 0; l < 32; ++l) next[l] = merge(lanes[l], lanes[l ^ off]);
    lanes.swap(next);
  }
  return lanes[0];
}

// cuda_logps.cu's block_reduce: each warp, then the warps' results (lanes >= nwarps empty).
template <typename S, typename Merge>
S block_reduce(const std::vector<S>& st, Merge merge) {
  const int nwarps = static_cast<int>(st.size()) / 32;
  std::vector<S> shared(32, dev::empty_of<S>());
  for (int w = 0; w < nwarps; ++w) shared[w] = warp_reduce(std::vector<S>(st.begin() + 32 * w, st.begin() + 32 * (w + 1)), merge);
  return warp_reduce(shared, merge);
}

// cuda_logps.cu's stream_row for float32 (K = 4): the lead before the row's first
// 16-byte boundary (of its real address), one element per thread; kUnroll vectors per
// step; the remaining vectors; the tail. add(state, x, n, max of x) per call.
template <typename S, typename Add>
void stream_row(uintptr_t row_ptr, int64_t V, std::vector<S>& st, Add add) {

  const float* row = reinterpret_cast<const float*>(row_ptr);
  const int threads = static_cast<int>(st.size());
  const auto max_of = [](const float* x, int n) {
    float m = -INFINITY;
    for (int k = 0; k < n; ++k) m = fmaxf(m, x[k]);
    return m;
  };
  int64_t lead = static_cast<int64_t>((16 - row_ptr % 16) % 16) / 4;
  lead = lead < V ? lead : V;
  for (int tid = 0; tid < lead; ++tid) add(st[tid], row + tid, 1, row[tid]);
  const float* vrow = row + lead;
  const int64_t nvec = (V - lead) / 4;
  for (int tid = 0; tid < threads; ++tid) {
    int64_t i = tid;
    for (; i + (kUnroll - 1) * threads < nvec; i += kUnroll * threads) {
      float x[4 * kUnroll];
      for (int u = 0; u < kUnroll; ++u)
        for (int k = 0; k < 4; ++k) x[4 * u + k] = vrow[4 * (i + u * threads) + k];
      add(st[tid], x, 4 * kUnroll, max_of(x, 4 * kUnroll));
    }
    for (; i < nvec; i += threads) add(st[tid], vrow + 4 * i, 4, max_of(vrow + 4 * i, 4));
  }
  for (int tid = 0; tid < threads; ++tid)
    for (int64_t j = lead + nvec * 4 + tid; j < V; j += threads) add(st[tid], row + j, 1, row[j]);
}

template <int N, typename S>
void fast_add(S& st, const float* x, float x_max) {
  float a[N];
  for (int k = 0; k < N; ++k) a[k] = x[k];
  dev::update2_k<N>(st, a, dev::pfpo_max(dev::base_state(st).m, x_max));
}

template <int N, typename S>
void exact_add(S& st, const float* x) {
  float a[N];
  for (int k = 0; k < N; ++k) a[k] = x[k];
  dev::update_k<N>(st, a);
}

// The forward of one row with the state S (dev::State, or dev::SqState for WPO's q).
template <typename S>
std::vector<float> forward_row(uintptr_t row_ptr, int64_t V, int64_t y, int threads) {
  const float* row = reinterpret_cast<const float*>(row_ptr);
  // The fast pass, in base 2.
  std::vector<S> st(threads, dev::fast_empty_of<S>());
  stream_row(row_ptr, V, st, [](S& s, const float* x, int n, float x_max) {
    if (n == 1) fast_add<1>(s, x, x_max);
    else if (n == 4) fast_add<4>(s, x, x_max);
    else fast_add<4 * kUnroll>(s, x, x_max);
  });
  S total = block_reduce(st, [](S a, S b) { return dev::merge2(a, b); });
  dev::Stats f;
  float sq = 0.0f;
  const bool fast = dev::fast_state_ok(dev::base_state(total));
  if (fast) {
    f = dev::finalize2(dev::base_state(total));
    if constexpr (std::is_same_v<S, dev::SqState>) sq = dev::log_sum_sq2(total);
  } else {  // the exact pass, natural units, NaNs counted where the sum is NaN
    std::fill(st.begin(), st.end(), dev::empty_of<S>());
    stream_row(row_ptr, V, st, [](S& s, const float* x, int n, float) {
      if (n == 1) exact_add<1>(s, x);
      else if (n == 4) exact_add<4>(s, x);
      else exact_add<4 * kUnroll>(s, x);
    });
    total = block_reduce(st, [](S a, S b) { return dev::merge(a, b); });
    dev::State& b = dev::base_state(total);
    if (b.sum_x != b.sum_x)
      for (int64_t i = 0; i < V; ++i) b.nan += dev::is_nan(row[i]);
    f = dev::finalize(b);
    if constexpr (std::is_same_v<S, dev::SqState>) sq = dev::log_sum_sq(total, f);
  }
  const dev::State& b = dev::base_state(total);
  std::vector<float> out{dev::token_logp(row[y], b.m, f.log_s), b.m, f.log_s, f.entropy, b.sum_x, fast ? 1.0f : 0.0f};
  if constexpr (std::is_same_v<S, dev::SqState>) out.push_back(sq);
  return out;
}

}  // namespace

std::vector<float> emulate_device_forward(uintptr_t row_ptr, int64_t V, int64_t y, int threads, bool log_sum_sq) {
  if (threads < 32 || threads % 32 || threads > 1024) throw std::invalid_argument("threads: a multiple of 32 in [32, 1024]");
  return log_sum_sq ? forward_row<dev::SqState>(row_ptr, V, y, threads) : forward_row<dev::State>(row_ptr, V, y, threads);
}

void emulate_device_backward(uintptr_t row_ptr, int64_t V, int64_t y, float m, float log_s, float g,
                             uintptr_t out_ptr) {
  const float* row = reinterpret_cast<const float*>(row_ptr);
  float* out = reinterpret_cast<float*>(out_ptr);
  // cuda_logps.cu's backward: -g p everywhere (base 2 unless |m| is out of the fast
  // range; NaN when log s is), then the target column.
  if (fabsf(m) < dev::PFPO_FAST_MAX_ABS) {
    const dev::FastGrad fg = dev::fast_grad(m, log_s, g);
    for (int64_t v = 0; v < V; ++v) out[v] = dev::grad_other2(row[v], fg);
  } else {
    for (int64_t v = 0; v < V; ++v) out[v] = dev::grad_other(row[v], m, log_s, g);
  }
  out[y] = dev::grad_target(row[y], m, log_s, g);
}

void emulated_device_exp(uintptr_t src, uintptr_t dst, int64_t n) {
  const float* in = reinterpret_cast<const float*>(src);
  float* out = reinterpret_cast<float*>(dst);
  for (int64_t i = 0; i < n; ++i) out[i] = dev::pfpo_exp(in[i]);
}

}  // namespace pfpo
