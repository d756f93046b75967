// pyfastpo CUDA driver: forward stats and backward gradient of sequence_logps.
//
// Layout: ONE BLOCK PER TOKEN ROW (grid-stride over rows). LLM vocabularies
// are 32k-256k, i.e. a row is 64-512 KiB: a whole block streaming it keeps
// many 16-byte loads in flight per row, and N*T (thousands of rows) fills the
// GPU. (A warp per row would only pay off for V below a few thousand, which is
// not this library's case; small V stays correct, just not tuned.)
//
// Forward: each thread keeps an online state {m, s, u, sum_x} (logps_math.h; WPO's
// variant adds q = sum p^2 unnormalized) in registers, updated once per 4 16-byte vectors in flight (one re-base per step).
// The hot pass works in base 2 (update2_k: one FFMA, one ex2.approx, three adds and
// a clamp per element, a packed max for 16-bit types); a row it cannot finish
// exactly (a NaN or +inf logit, only -inf logits, |max| >= 2^24: fast_state_ok) is
// read again by the exact natural-units pass, which also counts NaNs where the sum
// of logits is NaN.
// States are merged with __shfl_xor_sync inside a warp, then across warps through
// shared memory. Reduction order is fixed for a given V, so results are
// deterministic. Instruction counts of the inner loops (SASS, sm_90) are checked in
// CI: tests/test_aot_budget.py; the per-row math is replayed on the host in
// csrc/device_emulation.cpp and tested there.
//
// Rows stream in 16-byte vectors after peeling the few elements before their first
// 16-byte boundary. Backward: -g p = g' 2^fma(x, log2e, -k_hi) per element (FastGrad),
// read and written by the same thread, so out may alias logits (no __restrict__ /
// __ldg on that path); an out-of-place output misaligned unlike the logits takes the
// scalar kernel. The block size is a template argument (immediate load offsets);
// offsets between rows are int64, a row's vector index int32 (V < 2^31, checked).

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>
#include <type_traits>

#include "cuda_logps.h"
#include "logps_math.h"
#include "native_abi.h"

namespace pfpo {
namespace {


void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("pyfastpo.backends._cuda: ") + what + " failed: " +
                             cudaGetErrorName(err) + ": " + cudaGetErrorString(err));
}
#define PFPO_CHECK(expr) check((expr), #expr)

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }

template <typename T>
__device__ __forceinline__ T from_f(float f);
template <>
__device__ __forceinline__ float from_f<float>(float f) { return f; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float f) { return __float2bfloat16_rn(f); }
template <>
__device__ __forceinline__ __half from_f<__half>(float f) { return __float2half_rn(f); }

// Elements of T in one 16-byte (uint4) load/store.
template <typename T>
struct Vec16 {
  static constexpr int K = 16 / sizeof(T);
};

// 16-byte vectors each thread has in flight per step of the streaming loops: at
// 512 threads, 2 blocks per SM, 64 KiB of loads in flight per SM, and the loop's
// bookkeeping (addresses, branch, re-base) spread over 4 vectors.
constexpr int kUnroll = 4;

__device__ __forceinline__ bool is_ignored(int64_t y, int64_t ignore_index, int64_t V) {
  return y == ignore_index || y < 0 || y >= V;  // out-of-range labels are never read
}

template <bool BASE2, typename S>
__device__ __forceinline__ S merge_any(S a, S b) {
  return BASE2 ? merge2(a, b) : merge(a, b);
}

__device__ __forceinline__ State shfl_xor(const State& a, int offset) {
  State b;
  b.m = __shfl_xor_sync(0xffffffffu, a.m, offset);
  b.s = __shfl_xor_sync(0xffffffffu, a.s, offset);
  b.u = __shfl_xor_sync(0xffffffffu, a.u, offset);
  b.sum_x = __shfl_xor_sync(0xffffffffu, a.sum_x, offset);
  b.nan = __shfl_xor_sync(0xffffffffu, a.nan, offset);
  return b;
}
__device__ __forceinline__ SqState shfl_xor(const SqState& a, int offset) {
  return SqState{shfl_xor(a.st, offset), __shfl_xor_sync(0xffffffffu, a.q, offset)};
}

template <bool BASE2, typename S>
__device__ __forceinline__ S warp_reduce(S st) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) st = merge_any<BASE2>(st, shfl_xor(st, off));
  return st;
}

// The state of the whole block in thread 0 (others get garbage). blockDim.x is
// a multiple of 32 and at most 1024. BASE2: states of the fast path (merge2). S: State,
// or SqState (WPO's q beside it).
template <bool BASE2, typename S>
__device__ __forceinline__ S block_reduce(S st, S* shared) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  st = warp_reduce<BASE2>(st);
  if (lane == 0) shared[warp] = st;
  __syncthreads();
  if (warp == 0) {
    st = lane < nwarps ? shared[lane] : empty_of<S>();
    st = warp_reduce<BASE2>(st);
  }
  __syncthreads();  // shared is reused by the next reduction
  return st;
}

// Elements of T before the first 16-byte boundary of a row (0..K-1, at most V):
// they are peeled off so that any row, whatever its offset, streams in 16-byte
// vectors (a row starts at least T-aligned: a tensor's elements always are).
template <typename T>
__device__ __forceinline__ int64_t lead_elements(const T* row, int64_t V) {
  const int64_t bytes = (16 - static_cast<int64_t>(reinterpret_cast<uintptr_t>(row) % 16)) % 16;
  const int64_t lead = bytes / static_cast<int64_t>(sizeof(T));
  return lead < V ? lead : V;
}

// ---------------------------------------------------------------- 16-byte vectors <-> floats
// One instruction per element: a bfloat16 is the top half of a float32, so the
// low half of a 32-bit word is a shift and the high half a mask (the intrinsics
// spend a PRMT more); fp16 converts by HADD2.F32.
template <typename T>
__device__ __forceinline__ void load_vec(const uint4& raw, float* x);
template <>
__device__ __forceinline__ void load_vec<float>(const uint4& raw, float* x) {
  x[0] = __uint_as_float(raw.x), x[1] = __uint_as_float(raw.y);
  x[2] = __uint_as_float(raw.z), x[3] = __uint_as_float(raw.w);
}
template <>
__device__ __forceinline__ void load_vec<__nv_bfloat16>(const uint4& raw, float* x) {
  const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int j = 0; j < 4; ++j) x[2 * j] = __uint_as_float(w[j] << 16), x[2 * j + 1] = __uint_as_float(w[j] & 0xffff0000u);
}
template <>
__device__ __forceinline__ void load_vec<__half>(const uint4& raw, float* x) {
  const __half2* h = reinterpret_cast<const __half2*>(&raw);
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const float2 f = __half22float2(h[j]);
    x[2 * j] = f.x, x[2 * j + 1] = f.y;
  }
}

// The K gradients of one vector, rounded to T and packed (16-bit: one F2FP per pair).
__device__ __forceinline__ __nv_bfloat162 pack2(float a, float b, __nv_bfloat16) { return __floats2bfloat162_rn(a, b); }
__device__ __forceinline__ __half2 pack2(float a, float b, __half) { return __floats2half2_rn(a, b); }
template <typename T>
__device__ __forceinline__ uint4 store_vec(const float* g) {  // 16-bit T: one packed convert per pair
  uint4 res;
  auto* o = reinterpret_cast<decltype(pack2(0.0f, 0.0f, T()))*>(&res);
#pragma unroll
  for (int j = 0; j < 4; ++j) o[j] = pack2(g[2 * j], g[2 * j + 1], T());
  return res;
}
template <>
__device__ __forceinline__ uint4 store_vec<float>(const float* g) {
  return make_uint4(__float_as_uint(g[0]), __float_as_uint(g[1]), __float_as_uint(g[2]), __float_as_uint(g[3]));
}

// Max of N vectors. 16-bit: a packed max over the raw words (exact: max never
// rounds; a NaN lane is dropped as by fmaxf), half an instruction per element.
template <typename T, int N>
__device__ __forceinline__ float vec_max(const uint4 (&v)[N]) {
  float m = -INFINITY;
#pragma unroll
  for (int u = 0; u < N; ++u) {
    float x[Vec16<T>::K];
    load_vec<T>(v[u], x);
#pragma unroll
    for (int k = 0; k < Vec16<T>::K; ++k) m = fmaxf(m, x[k]);
  }
  return m;
}
template <typename H2, int N>
__device__ __forceinline__ H2 packed_max(const uint4 (&v)[N]) {
  const H2* w = reinterpret_cast<const H2*>(&v[0]);
  H2 acc = w[0];
#pragma unroll
  for (int j = 1; j < 4 * N; ++j) acc = __hmax2(acc, w[j]);
  return acc;
}
template <>
__device__ __forceinline__ float vec_max<__nv_bfloat16, kUnroll>(const uint4 (&v)[kUnroll]) {
  const __nv_bfloat162 acc = packed_max<__nv_bfloat162, kUnroll>(v);
  return fmaxf(__low2float(acc), __high2float(acc));
}
template <>
__device__ __forceinline__ float vec_max<__half, kUnroll>(const uint4 (&v)[kUnroll]) {
  const __half2 acc = packed_max<__half2, kUnroll>(v);
  return fmaxf(__low2float(acc), __high2float(acc));
}

// Streams one row of logits through add(x, max_of_x), x a float array: the elements
// before the first 16-byte boundary (one per thread), then kUnroll 16-byte vectors
// per step (thread i takes vectors i, i + THREADS, ...), the remaining vectors one
// by one, then the tail. Vector j always belongs to thread j % THREADS.
template <typename T, int THREADS, typename Add>
__device__ __forceinline__ void stream_row(const T* __restrict__ row, int64_t V, Add&& add) {
  constexpr int K = Vec16<T>::K;
  const int64_t lead = lead_elements(row, V);
  if (threadIdx.x < lead) {
    const float x[1] = {to_f(row[threadIdx.x])};
    add(x, x[0]);
  }
  const int nvec = static_cast<int>((V - lead) / K);  // V < 2^31: checked on the host
  const uint4* __restrict__ vrow = reinterpret_cast<const uint4*>(row + lead);
  int i = threadIdx.x;
  for (; i + (kUnroll - 1) * THREADS < nvec; i += kUnroll * THREADS) {
    uint4 raw[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) raw[u] = vrow[i + u * THREADS];
    float x[kUnroll * K];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) load_vec<T>(raw[u], x + u * K);
    add(x, vec_max<T, kUnroll>(raw));
  }
  for (; i < nvec; i += THREADS) {
    const uint4 raw[1] = {vrow[i]};
    float x[K];
    load_vec<T>(raw[0], x);
    add(x, vec_max<T, 1>(raw));
  }
  for (int64_t j = lead + int64_t(nvec) * K + threadIdx.x; j < V; j += THREADS) {
    const float x[1] = {to_f(row[j])};
    add(x, x[0]);
  }
}

// Count of NaN logits in a row, block-wide (every thread gets it). Run only for
// a row whose sum of logits is NaN (rare), so the hot loop carries no NaN test.
template <typename T>
__device__ int count_nans(const T* row, int64_t V, int* counter) {
  if (threadIdx.x == 0) *counter = 0;
  __syncthreads();
  int local = 0;
  for (int64_t i = threadIdx.x; i < V; i += blockDim.x) {
    const float v = to_f(row[i]);
    local += (v != v);
  }
  if (local) atomicAdd(counter, local);  // integers: exact in any order
  __syncthreads();
  return *counter;
}

// Forward: one block of THREADS per row. A fast pass in base-2 units (logps_math.h:
// update2_k); a row it cannot finish exactly (fast_state_ok) is read again by the
// exact natural-units pass, which also counts NaNs where the sum of logits is NaN.
// SQ: also WPO's log sum p^2 (one accumulator more on the same exp, logps_math.h's
// SqState), a separate instantiation so that the plain kernel is unchanged.
template <typename T, int THREADS, bool SQ>
__global__ void __launch_bounds__(THREADS, 1024 / THREADS)
forward_kernel(const T* __restrict__ logits, int64_t T_len, int64_t V, int64_t stride_n, int64_t stride_t,
               const int64_t* __restrict__ labels, int64_t ignore_index, float* __restrict__ out, int64_t rows) {
  // out: [kNumStats + SQ, rows] float32: logp, m, log s, entropy, sum_x (, log sum p^2).
  using S = typename std::conditional<SQ, SqState, State>::type;
  __shared__ S shared[32];
  __shared__ float row_sum_x;
  __shared__ bool row_fast;
  __shared__ int row_nans;
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const int64_t y = labels[r];
    if (is_ignored(y, ignore_index, V)) {  // block-uniform: the row is never read
      if (threadIdx.x == 0)
        for (int k = 0; k < kNumStats + SQ; ++k) out[k * rows + r] = 0.0f;
      continue;
    }
    const T* row = logits + (r / T_len) * stride_n + (r % T_len) * stride_t;
    S st = fast_empty_of<S>();
    stream_row<T, THREADS>(row, V, [&](const auto& x, float x_max) { update2_k(st, x, pfpo_max(base_state(st).m, x_max)); });
    st = block_reduce<true>(st, shared);
    if (threadIdx.x == 0) row_fast = fast_state_ok(base_state(st));
    __syncthreads();
    Stats f;
    float sq = 0.0f;
    if (row_fast) {  // block-uniform
      if (threadIdx.x == 0) {
        f = finalize2(base_state(st));
        if constexpr (SQ) sq = log_sum_sq2(st);
      }
    } else {
      st = empty_of<S>();
      stream_row<T, THREADS>(row, V, [&](const auto& x, float) { update_k(st, x); });
      st = block_reduce<false>(st, shared);
      if (threadIdx.x == 0) row_sum_x = base_state(st).sum_x;
      __syncthreads();
      if (row_sum_x != row_sum_x) base_state(st).nan = static_cast<float>(count_nans(row, V, &row_nans));
      if (threadIdx.x == 0) {
        f = finalize(base_state(st));
        if constexpr (SQ) sq = log_sum_sq(st, f);
      }
    }
    if (threadIdx.x == 0) {
      const State& b = base_state(st);
      out[r] = token_logp(to_f(row[y]), b.m, f.log_s);
      out[rows + r] = b.m;
      out[2 * rows + r] = f.log_s;
      out[3 * rows + r] = f.entropy;
      out[4 * rows + r] = b.sum_x;
      if constexpr (SQ) out[kNumStats * rows + r] = sq;
    }
    __syncthreads();  // row_fast and row_sum_x are rewritten by the next row
  }
}

// Backward, vector path (out and logits share every row's misalignment: in place,
// always): -g p for every column by `grad` (x -> float), read and written by the
// same thread (out may alias logits: no __restrict__), the same schedule as
// stream_row; the thread whose vector holds the target reads its logit before any
// of its stores and rewrites that column after them: no per-element test.
template <typename T, int THREADS, typename Grad>
__device__ __forceinline__ void grad_row(const T* row, T* orow, int64_t V, int64_t y, float m, float ls, float g,
                                         Grad&& grad) {
  constexpr int K = Vec16<T>::K;
  const int64_t lead = lead_elements(row, V);
  if (threadIdx.x < lead) {
    const int64_t v = threadIdx.x;
    const float x = to_f(row[v]);
    orow[v] = from_f<T>(v == y ? grad_target(x, m, ls, g) : grad(x));
  }
  const int nvec = static_cast<int>((V - lead) / K);  // V < 2^31: checked on the host
  const bool owns_target = y >= lead && y < lead + int64_t(nvec) * K && ((y - lead) / K) % THREADS == threadIdx.x;
  const float xy = owns_target ? to_f(row[y]) : 0.0f;
  const uint4* vrow = reinterpret_cast<const uint4*>(row + lead);
  uint4* vout = reinterpret_cast<uint4*>(orow + lead);
  int i = threadIdx.x;
  for (; i + (kUnroll - 1) * THREADS < nvec; i += kUnroll * THREADS) {
    uint4 raw[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) raw[u] = vrow[i + u * THREADS];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      float x[K];
      load_vec<T>(raw[u], x);
#pragma unroll
      for (int k = 0; k < K; ++k) x[k] = grad(x[k]);
      vout[i + u * THREADS] = store_vec<T>(x);
    }
  }
  for (; i < nvec; i += THREADS) {
    float x[K];
    load_vec<T>(vrow[i], x);
#pragma unroll
    for (int k = 0; k < K; ++k) x[k] = grad(x[k]);
    vout[i] = store_vec<T>(x);
  }
  if (owns_target) orow[y] = from_f<T>(grad_target(xy, m, ls, g));
  for (int64_t v = lead + int64_t(nvec) * K + threadIdx.x; v < V; v += THREADS) {
    const float x = to_f(row[v]);
    orow[v] = from_f<T>(v == y ? grad_target(x, m, ls, g) : grad(x));
  }
}

// Zeros for an ignored row: 16-byte stores after the peeled lead (many rows are prompt tokens).
template <typename T, int THREADS>
__device__ __forceinline__ void zero_row(T* orow, int64_t V) {
  const int64_t lead = lead_elements(orow, V);
  if (threadIdx.x < lead) orow[threadIdx.x] = from_f<T>(0.0f);
  const int64_t nvec = (V - lead) / Vec16<T>::K;
  uint4* vout = reinterpret_cast<uint4*>(orow + lead);
  for (int64_t i = threadIdx.x; i < nvec; i += THREADS) vout[i] = make_uint4(0, 0, 0, 0);
  for (int64_t i = lead + nvec * Vec16<T>::K + threadIdx.x; i < V; i += THREADS) orow[i] = from_f<T>(0.0f);
}

// THREADS > 0: the vector kernel at that block size; THREADS == 0: the scalar
// kernel (an out-of-place output misaligned unlike the logits), any block size.
template <typename T, int THREADS>
__global__ void __launch_bounds__(THREADS > 0 ? THREADS : 1024)
backward_kernel(const T* logits, int64_t T_len, int64_t V, int64_t stride_n, int64_t stride_t,
                const int64_t* __restrict__ labels, const float* __restrict__ row_max,
                const float* __restrict__ log_sum, const float* __restrict__ grad_scale, int64_t ignore_index, T* out,
                int64_t out_stride_n, int64_t out_stride_t, int64_t rows) {
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const int64_t n = r / T_len, t = r % T_len;
    const int64_t y = labels[r];
    const T* row = logits + n * stride_n + t * stride_t;
    T* orow = out + n * out_stride_n + t * out_stride_t;
    const bool ignored = is_ignored(y, ignore_index, V);  // block-uniform
    if constexpr (THREADS > 0) {
      if (ignored) {
        zero_row<T, THREADS>(orow, V);
        continue;
      }
      // An undefined row (log s NaN) gets NaN everywhere: NaN flows through fma and ex2.
      const float m = row_max[r], ls = log_sum[r], g = grad_scale[n];
      if (fabsf(m) < PFPO_FAST_MAX_ABS) {  // block-uniform: base 2, one FFMA, ex2, FMUL per element
        const FastGrad f = fast_grad(m, ls, g);
        grad_row<T, THREADS>(row, orow, V, y, m, ls, g, [f](float x) { return grad_other2(x, f); });
      } else {
        grad_row<T, THREADS>(row, orow, V, y, m, ls, g, [=](float x) { return grad_other(x, m, ls, g); });
      }
    } else if (ignored) {
      for (int64_t i = threadIdx.x; i < V; i += blockDim.x) orow[i] = from_f<T>(0.0f);
    } else {
      // The vector kernel's formulas, so that a gradient's bits never depend on the layout.
      const float m = row_max[r], ls = log_sum[r], g = grad_scale[n];
      auto scalar_row = [&](auto grad) {
        for (int64_t i = threadIdx.x; i < V; i += blockDim.x) {
          const float x = to_f(row[i]);
          orow[i] = from_f<T>(i == y ? grad_target(x, m, ls, g) : grad(x));
        }
      };
      if (fabsf(m) < PFPO_FAST_MAX_ABS) {
        const FastGrad f = fast_grad(m, ls, g);
        scalar_row([f](float x) { return grad_other2(x, f); });
      } else {
        scalar_row([=](float x) { return grad_other(x, m, ls, g); });
      }
    }
  }
}

int threads_for(int64_t V) {
  if (V >= 16384) return 512;
  if (V >= 2048) return 256;
  return 128;
}

unsigned blocks_for(int64_t rows) {
  return static_cast<unsigned>(rows < (int64_t(1) << 30) ? rows : (int64_t(1) << 30));
}

// Whether every row of out has the same offset from a 16-byte boundary as the
// same row of logits (in place: always), so that one peel aligns both.
bool same_misalignment(uintptr_t logits, uintptr_t out, int64_t es, int64_t sn, int64_t st,
                       int64_t osn, int64_t ost) {
  return (out - logits) % 16 == 0 && ((osn - sn) * es) % 16 == 0 && ((ost - st) * es) % 16 == 0;
}

void prepare(int device, int64_t V) {
  // The kernels index a row's 16-byte vectors with 32-bit integers.
  if (V >= (int64_t(1) << 31))
    throw std::invalid_argument("pyfastpo.backends._cuda: a row of " + std::to_string(V) + " logits; at most 2^31 - 1 are supported");
  cuda_device_count();
  PFPO_CHECK(cudaSetDevice(device));
}

// Calls launch.template operator()<THREADS>() with the block size for V: the
// kernels take it as a template argument so that the unrolled loads' offsets are
// immediates.
template <typename Launch>
void with_threads(int64_t V, Launch&& launch) {
  const int threads = threads_for(V);
  if (threads == 512) return launch(std::integral_constant<int, 512>());
  if (threads == 256) return launch(std::integral_constant<int, 256>());
  return launch(std::integral_constant<int, 128>());
}

template <typename T>
void launch_forward(uintptr_t logits, int64_t N, int64_t T_len, int64_t V, int64_t sn,
                    int64_t st, uintptr_t labels, int64_t ignore_index, uintptr_t out, bool log_sum_sq,
                    cudaStream_t stream) {
  const int64_t rows = N * T_len;
  // Every row streams in 16-byte vectors after peeling its misaligned lead.
  with_threads(V, [&](auto threads) {
    auto kernel = log_sum_sq ? forward_kernel<T, threads(), true> : forward_kernel<T, threads(), false>;
    kernel<<<blocks_for(rows), threads(), 0, stream>>>(reinterpret_cast<const T*>(logits), T_len, V, sn, st,
                                                       reinterpret_cast<const int64_t*>(labels), ignore_index,
                                                       reinterpret_cast<float*>(out), rows);
  });
  PFPO_CHECK(cudaGetLastError());
}

template <typename T>
void launch_backward(uintptr_t logits, int64_t N, int64_t T_len, int64_t V, int64_t sn,
                     int64_t st, uintptr_t labels, uintptr_t m, uintptr_t ls, uintptr_t g,
                     int64_t ignore_index, uintptr_t out, int64_t osn, int64_t ost,
                     cudaStream_t stream) {
  const int64_t rows = N * T_len;
  auto args = [&](auto kernel, int threads) {
    kernel<<<blocks_for(rows), threads, 0, stream>>>(
        reinterpret_cast<const T*>(logits), T_len, V, sn, st, reinterpret_cast<const int64_t*>(labels),
        reinterpret_cast<const float*>(m), reinterpret_cast<const float*>(ls), reinterpret_cast<const float*>(g),
        ignore_index, reinterpret_cast<T*>(out), osn, ost, rows);
  };
  // Vectors after a peel when out and logits share every row's misalignment (in
  // place, always); else the scalar kernel.
  if (same_misalignment(logits, out, sizeof(T), sn, st, osn, ost))
    with_threads(V, [&](auto threads) { args(backward_kernel<T, threads()>, threads()); });
  else
    args(backward_kernel<T, 0>, threads_for(V));
  PFPO_CHECK(cudaGetLastError());
}

}  // namespace

int cuda_device_count() {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess || count == 0) {
    cudaGetLastError();  // reset the runtime's last-error slot (not sticky)
    throw std::runtime_error(
        std::string("pyfastpo.backends._cuda: no CUDA device available (cudaGetDeviceCount: ") +
        (err != cudaSuccess ? cudaGetErrorString(err) : "0 devices") +
        "); use backend='cpp' or 'reference' for CPU tensors");
  }
  return count;
}

void cuda_forward(uintptr_t logits, int dtype, int64_t N, int64_t T, int64_t V, int64_t stride_n,
                  int64_t stride_t, uintptr_t labels, int64_t ignore_index, uintptr_t out_stats,
                  bool log_sum_sq, int device, uintptr_t stream) {
  prepare(device, V);
  if (N * T == 0) return;
  auto s = reinterpret_cast<cudaStream_t>(stream);
  switch (dtype) {
    case kFloat32:
      return launch_forward<float>(logits, N, T, V, stride_n, stride_t, labels, ignore_index,
                                   out_stats, log_sum_sq, s);
    case kBFloat16:
      return launch_forward<__nv_bfloat16>(logits, N, T, V, stride_n, stride_t, labels,
                                           ignore_index, out_stats, log_sum_sq, s);
    case kFloat16:
      return launch_forward<__half>(logits, N, T, V, stride_n, stride_t, labels, ignore_index,
                                    out_stats, log_sum_sq, s);
  }
  throw std::invalid_argument("pyfastpo.backends._cuda: unknown dtype code " + std::to_string(dtype));
}

void cuda_backward(uintptr_t logits, int dtype, int64_t N, int64_t T, int64_t V, int64_t stride_n,
                   int64_t stride_t, uintptr_t labels, uintptr_t row_max, uintptr_t log_sum,
                   uintptr_t grad_scale, int64_t ignore_index, uintptr_t out, int64_t out_stride_n,
                   int64_t out_stride_t, int device, uintptr_t stream) {
  prepare(device, V);
  if (N * T == 0) return;
  auto s = reinterpret_cast<cudaStream_t>(stream);
  switch (dtype) {
    case kFloat32:
      return launch_backward<float>(logits, N, T, V, stride_n, stride_t, labels, row_max, log_sum,
                                    grad_scale, ignore_index, out, out_stride_n, out_stride_t, s);
    case kBFloat16:
      return launch_backward<__nv_bfloat16>(logits, N, T, V, stride_n, stride_t, labels, row_max,
                                            log_sum, grad_scale, ignore_index, out, out_stride_n,
                                            out_stride_t, s);
    case kFloat16:
      return launch_backward<__half>(logits, N, T, V, stride_n, stride_t, labels, row_max, log_sum,
                                     grad_scale, ignore_index, out, out_stride_n, out_stride_t, s);
  }
  throw std::invalid_argument("pyfastpo.backends._cuda: unknown dtype code " + std::to_string(dtype));
}

}  // namespace pfpo
