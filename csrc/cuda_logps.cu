// pyfastpo CUDA driver: forward stats and backward gradient of sequence_logps.
//
// Layout: ONE BLOCK PER TOKEN ROW (grid-stride over rows). LLM vocabularies
// are 32k-256k, i.e. a row is 64-512 KiB: a whole block streaming it keeps
// many 16-byte loads in flight per row, and N*T (thousands of rows) fills the
// GPU. (A warp per row would only pay off for V below a few thousand, which is
// not this library's case; small V stays correct, just not tuned.)
//
// Each thread keeps an online state {m, s, t, sum_x} (logps_math.h) in
// registers, updated once per pair of 16-byte vectors (update_k: one re-base
// per pair, one exp per element: ex2.approx, see device_exp); states are merged
// with __shfl_xor_sync inside a warp, then across warps through shared memory.
// Reduction order is fixed for a given V, so results are deterministic. NaN
// logits are counted only in a row whose sum of logits is NaN (a second read
// of that row), so the hot loop carries no NaN test. Instruction counts of the
// inner loops (SASS, sm_90) are checked in CI: tests/test_aot_budget.py.
//
// Vector loads need every row start (and, in backward, every output row
// start) 16-byte aligned: checked on the host from the base pointers and the
// strides; otherwise the scalar kernel runs. Backward reads each element once
// and writes it once, by the same thread, so out may alias logits (no
// __restrict__ / __ldg on that path). All offsets are int64.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "cuda_logps.h"
#include "logps_math.h"

namespace pfpo {
namespace {

enum DtypeCode : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };
constexpr int kNumStats = 5;  // per-token statistics of the forward (cpu_logps.h's order)

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("pyfastpo._cuda: ") + what + " failed: " +
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

__device__ __forceinline__ bool is_ignored(int64_t y, int64_t ignore_index, int64_t V) {
  return y == ignore_index || y < 0 || y >= V;  // out-of-range labels are never read
}

__device__ __forceinline__ State shfl_merge(State a, int offset) {
  State b;
  b.m = __shfl_xor_sync(0xffffffffu, a.m, offset);
  b.s = __shfl_xor_sync(0xffffffffu, a.s, offset);
  b.t = __shfl_xor_sync(0xffffffffu, a.t, offset);
  b.sum_x = __shfl_xor_sync(0xffffffffu, a.sum_x, offset);
  b.nan = __shfl_xor_sync(0xffffffffu, a.nan, offset);
  return merge(a, b);
}

__device__ __forceinline__ State warp_reduce(State st) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) st = shfl_merge(st, off);
  return st;
}

// The state of the whole block in thread 0 (others get garbage). blockDim.x is
// a multiple of 32 and at most 1024.
__device__ __forceinline__ State block_reduce(State st, State* shared) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  st = warp_reduce(st);
  if (lane == 0) shared[warp] = st;
  __syncthreads();
  if (warp == 0) {
    st = lane < nwarps ? shared[lane] : empty_state();
    st = warp_reduce(st);
  }
  __syncthreads();  // shared is reused by the next row
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

// Loads a 16-byte vector of T as K floats.
template <typename T>
__device__ __forceinline__ void load_vec(const uint4& raw, float* x) {
  const T* in = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int k = 0; k < Vec16<T>::K; ++k) x[k] = to_f(in[k]);
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

template <typename T, bool VEC>
__global__ void forward_kernel(const T* __restrict__ logits, int64_t T_len, int64_t V,
                               int64_t stride_n, int64_t stride_t,
                               const int64_t* __restrict__ labels, int64_t ignore_index,
                               float* __restrict__ out, int64_t rows) {
  // out: [kNumStats, rows] float32: logp, m, log s, entropy, sum_x.
  __shared__ State shared[32];
  __shared__ float row_sum_x;
  __shared__ int row_nans;
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const int64_t y = labels[r];
    if (is_ignored(y, ignore_index, V)) {  // block-uniform: the row is never read
      if (threadIdx.x == 0)
        for (int k = 0; k < kNumStats; ++k) out[k * rows + r] = 0.0f;
      continue;
    }
    const T* row = logits + (r / T_len) * stride_n + (r % T_len) * stride_t;
    State st = empty_state();
    int64_t done = 0;
    if (VEC) {
      // The few elements before the row's first 16-byte boundary, one per thread;
      // then two 16-byte loads in flight per thread, one re-base per pair of vectors.
      constexpr int K = Vec16<T>::K;
      const int64_t lead = lead_elements(row, V);
      if (threadIdx.x < lead) update(st, to_f(row[threadIdx.x]));
      const int64_t nvec = (V - lead) / K;
      const uint4* vrow = reinterpret_cast<const uint4*>(row + lead);
      int64_t i = threadIdx.x;
      for (; i + blockDim.x < nvec; i += 2 * blockDim.x) {
        const uint4 a = vrow[i], b = vrow[i + blockDim.x];
        float x[2 * K];
        load_vec<T>(a, x);
        load_vec<T>(b, x + K);
        update_k<2 * K>(st, x);
      }
      if (i < nvec) {
        float x[K];
        const uint4 raw = vrow[i];  // one 16-byte load (bound by reference, it became K scalar loads)
        load_vec<T>(raw, x);
        update_k<K>(st, x);
      }
      done = lead + nvec * K;
    }
    for (int64_t i = done + threadIdx.x; i < V; i += blockDim.x) update(st, to_f(row[i]));
    st = block_reduce(st, shared);
    if (threadIdx.x == 0) row_sum_x = st.sum_x;
    __syncthreads();
    const float sum_x = row_sum_x;  // block-uniform from here
    if (sum_x != sum_x) st.nan = static_cast<float>(count_nans(row, V, &row_nans));
    if (threadIdx.x == 0) {
      const Stats f = finalize(st);
      out[r] = token_logp(to_f(row[y]), st.m, f.log_s);
      out[rows + r] = st.m;
      out[2 * rows + r] = f.log_s;
      out[3 * rows + r] = f.entropy;
      out[4 * rows + r] = st.sum_x;
    }
  }
}

// -g p for the K columns of one 16-byte vector (p = exp((x - m) - log s), NaN
// when log s is NaN); the target column is fixed up apart, once per row.
template <typename T>
__device__ __forceinline__ uint4 grad_vec(const uint4& raw, float m, float ls, float g) {
  constexpr int K = Vec16<T>::K;
  float x[K];
  load_vec<T>(raw, x);
  uint4 res;
  T* o = reinterpret_cast<T*>(&res);
#pragma unroll
  for (int k = 0; k < K; ++k) o[k] = from_f<T>(grad_other(x[k], m, ls, g));
  return res;
}

template <typename T, bool VEC>
__global__ void backward_kernel(const T* logits, int64_t T_len, int64_t V, int64_t stride_n,
                                int64_t stride_t, const int64_t* __restrict__ labels,
                                const float* __restrict__ row_max, const float* __restrict__ log_sum,
                                const float* __restrict__ grad_scale,
                                int64_t ignore_index, T* out, int64_t out_stride_n,
                                int64_t out_stride_t, int64_t rows) {
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const int64_t n = r / T_len, t = r % T_len;
    const int64_t y = labels[r];
    const T* row = logits + n * stride_n + t * stride_t;
    T* orow = out + n * out_stride_n + t * out_stride_t;
    if (is_ignored(y, ignore_index, V)) {  // block-uniform: zeros, the row is never read
      int64_t done = 0;
      if (VEC) {  // 16-byte zero stores after the peeled lead: many rows are prompt tokens
        const int64_t lead = lead_elements(orow, V);
        if (threadIdx.x < lead) orow[threadIdx.x] = from_f<T>(0.0f);
        const int64_t nvec = (V - lead) / Vec16<T>::K;
        uint4* vout = reinterpret_cast<uint4*>(orow + lead);
        for (int64_t i = threadIdx.x; i < nvec; i += blockDim.x) vout[i] = make_uint4(0, 0, 0, 0);
        done = lead + nvec * Vec16<T>::K;
      }
      for (int64_t i = done + threadIdx.x; i < V; i += blockDim.x) orow[i] = from_f<T>(0.0f);
      continue;
    }
    // An undefined row (log s NaN) gets NaN everywhere: exp of NaN is NaN on the device.
    const float m = row_max[r], ls = log_sum[r], g = grad_scale[n];
    int64_t done = 0;
    if (VEC) {
      // Every element is read, then written, by the same thread (out may alias
      // logits). The thread whose vectors hold the target reads its logit before
      // any of its stores and rewrites that column after them: no per-element test.
      // The elements before the first 16-byte boundary are peeled off, one per
      // thread (logits and out share the misalignment: checked on the host).
      constexpr int K = Vec16<T>::K;
      const int64_t lead = lead_elements(row, V);
      if (threadIdx.x < lead) {
        const int64_t v = threadIdx.x;
        const float x = to_f(row[v]);
        orow[v] = from_f<T>(v == y ? grad_target(x, m, ls, g) : grad_other(x, m, ls, g));
      }
      const int64_t nvec = (V - lead) / K;
      const bool owns_target = y >= lead && y < lead + nvec * K && ((y - lead) / K) % blockDim.x == threadIdx.x;
      const float xy = owns_target ? to_f(row[y]) : 0.0f;
      const uint4* vrow = reinterpret_cast<const uint4*>(row + lead);
      uint4* vout = reinterpret_cast<uint4*>(orow + lead);
      int64_t i = threadIdx.x;
      for (; i + blockDim.x < nvec; i += 2 * blockDim.x) {  // two 16-byte loads in flight
        const int64_t i2 = i + blockDim.x;
        const uint4 a = vrow[i], b = vrow[i2];
        const uint4 ra = grad_vec<T>(a, m, ls, g), rb = grad_vec<T>(b, m, ls, g);
        vout[i] = ra;
        vout[i2] = rb;
      }
      if (i < nvec) {
        const uint4 raw = vrow[i];  // one 16-byte load (bound by reference, it became K scalar loads)
        vout[i] = grad_vec<T>(raw, m, ls, g);
      }
      if (owns_target) orow[y] = from_f<T>(grad_target(xy, m, ls, g));
      done = lead + nvec * K;
    }
    for (int64_t i = done + threadIdx.x; i < V; i += blockDim.x) {
      const float x = to_f(row[i]);
      orow[i] = from_f<T>(i == y ? grad_target(x, m, ls, g) : grad_other(x, m, ls, g));
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

void prepare(int device) {
  cuda_device_count();
  PFPO_CHECK(cudaSetDevice(device));
}

template <typename T>
void launch_forward(uintptr_t logits, int64_t N, int64_t T_len, int64_t V, int64_t sn,
                    int64_t st, uintptr_t labels, int64_t ignore_index, uintptr_t out,
                    cudaStream_t stream) {
  const int64_t rows = N * T_len;
  // Every row streams in 16-byte vectors after peeling its misaligned lead.
  forward_kernel<T, true><<<blocks_for(rows), threads_for(V), 0, stream>>>(
      reinterpret_cast<const T*>(logits), T_len, V, sn, st,
      reinterpret_cast<const int64_t*>(labels), ignore_index, reinterpret_cast<float*>(out), rows);
  PFPO_CHECK(cudaGetLastError());
}

template <typename T>
void launch_backward(uintptr_t logits, int64_t N, int64_t T_len, int64_t V, int64_t sn,
                     int64_t st, uintptr_t labels, uintptr_t m, uintptr_t ls, uintptr_t g,
                     int64_t ignore_index, uintptr_t out, int64_t osn, int64_t ost,
                     cudaStream_t stream) {
  const int64_t rows = N * T_len;
  // Vectors after a peel when out and logits share every row's misalignment (in
  // place, always); else the scalar kernel.
  const bool vec = same_misalignment(logits, out, sizeof(T), sn, st, osn, ost);
  auto kernel = vec ? backward_kernel<T, true> : backward_kernel<T, false>;
  kernel<<<blocks_for(rows), threads_for(V), 0, stream>>>(
      reinterpret_cast<const T*>(logits), T_len, V, sn, st,
      reinterpret_cast<const int64_t*>(labels), reinterpret_cast<const float*>(m),
      reinterpret_cast<const float*>(ls), reinterpret_cast<const float*>(g), ignore_index, reinterpret_cast<T*>(out), osn, ost, rows);
  PFPO_CHECK(cudaGetLastError());
}

}  // namespace

int cuda_device_count() {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess || count == 0) {
    cudaGetLastError();  // reset the runtime's last-error slot (not sticky)
    throw std::runtime_error(
        std::string("pyfastpo._cuda: no CUDA device available (cudaGetDeviceCount: ") +
        (err != cudaSuccess ? cudaGetErrorString(err) : "0 devices") +
        "); use backend='cpp' or 'reference' for CPU tensors");
  }
  return count;
}

void cuda_forward(uintptr_t logits, int dtype, int64_t N, int64_t T, int64_t V, int64_t stride_n,
                  int64_t stride_t, uintptr_t labels, int64_t ignore_index, uintptr_t out_stats,
                  int device, uintptr_t stream) {
  prepare(device);
  if (N * T == 0) return;
  auto s = reinterpret_cast<cudaStream_t>(stream);
  switch (dtype) {
    case kFloat32:
      return launch_forward<float>(logits, N, T, V, stride_n, stride_t, labels, ignore_index,
                                   out_stats, s);
    case kBFloat16:
      return launch_forward<__nv_bfloat16>(logits, N, T, V, stride_n, stride_t, labels,
                                           ignore_index, out_stats, s);
    case kFloat16:
      return launch_forward<__half>(logits, N, T, V, stride_n, stride_t, labels, ignore_index,
                                    out_stats, s);
  }
  throw std::invalid_argument("pyfastpo._cuda: unknown dtype code " + std::to_string(dtype));
}

void cuda_backward(uintptr_t logits, int dtype, int64_t N, int64_t T, int64_t V, int64_t stride_n,
                   int64_t stride_t, uintptr_t labels, uintptr_t row_max, uintptr_t log_sum,
                   uintptr_t grad_scale, int64_t ignore_index, uintptr_t out, int64_t out_stride_n,
                   int64_t out_stride_t, int device, uintptr_t stream) {
  prepare(device);
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
  throw std::invalid_argument("pyfastpo._cuda: unknown dtype code " + std::to_string(dtype));
}

}  // namespace pfpo
