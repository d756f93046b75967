// pyfastpo CPU driver: token rows in parallel (OpenMP), each row streamed once
// in L1-sized blocks with 16 lanes of partial online states.
//
// Scheme per row (forward): for each block of BLOCK elements (converted to a
// float buffer first for bf16/fp16), pass 1 takes the lane-wise max and sum of
// x, each lane state is re-based once to its new max, pass 2 adds exp(x - m)
// and exp(x - m) * (x - m) per lane: one exp per element, the block re-read
// from L1. The 16 lane states are merged at the end of the row
// (logps_math.h's merge). Backward: block -> float buffer -> gradient -> store.
//
// ISA: the distributed build targets the x86-64 baseline (SSE2), so the row
// kernels are compiled three times (default, avx2+fma, avx512) through GCC
// target attributes and picked at run time with __builtin_cpu_supports.
//
// Which loops GCC vectorizes, the flags that need, and the measured speed of the
// three ISA variants: docs/cpu_kernels.md.

#include "cpu_logps.h"

#include <omp.h>

#include <algorithm>
#include <cstring>
#include <stdexcept>

#include "logps_math.h"

#define PFPO_INLINE static inline __attribute__((always_inline))

namespace pfpo {
namespace {

constexpr int L = 16;           // lanes of partial states (one AVX-512 / two AVX2 vectors)
constexpr int64_t BLOCK = 1024;  // elements per block: a 4 KiB float buffer, stays in L1

template <int DT>
struct Elem;
template <>
struct Elem<kFloat32> {
  using T = float;
  PFPO_INLINE float load(T v) { return v; }
  PFPO_INLINE T store(float f) { return f; }
};
template <>
struct Elem<kBFloat16> {
  using T = uint16_t;
  PFPO_INLINE float load(T v) { return bf16_to_float(v); }
  PFPO_INLINE T store(float f) { return float_to_bf16(f); }
};
template <>
struct Elem<kFloat16> {
  using T = uint16_t;
  PFPO_INLINE float load(T v) { return fp16_to_float(v); }
  PFPO_INLINE T store(float f) { return float_to_fp16(f); }
};

template <int DT>
PFPO_INLINE void load_block(const typename Elem<DT>::T* src, int64_t n, float* buf) {
  for (int64_t i = 0; i < n; ++i) buf[i] = Elem<DT>::load(src[i]);
}

template <int DT>
PFPO_INLINE void store_block(const float* buf, int64_t n, typename Elem<DT>::T* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = Elem<DT>::store(buf[i]);
}

// q's lanes re-based to their new maxima bm (before rebase() moves lm there): q *= c^2.
PFPO_INLINE void rescale_sq(const float* lm, float* lq, const float* bm) {
  for (int j = 0; j < L; ++j) {
    const float c = pfpo_exp(clamp_shift(lm[j] - bm[j]));
    lq[j] *= c * c;
  }
}

// e * e, or exactly 0 where that would be subnormal (e < 2^-63): a subnormal product
// costs a microcode assist on x86, and such terms are below q's precision (q >= 1).
PFPO_INLINE float square_normal(float e) { return e * ((e >= 0x1p-63f) ? e : 0.0f); }

// Online state of one row, 16 lanes at a time. SQ: also q = sum exp(2 (x - m)) (WPO's
// log sum p^2 = log q - 2 log s), into *q_out; a separate instantiation, so the plain
// pass is unchanged.
template <int DT, bool SQ>
PFPO_INLINE State row_state(const typename Elem<DT>::T* row, int64_t V, float* q_out) {
  float lm[L], ls[L], lu[L], lx[L], lq[L];
  for (int j = 0; j < L; ++j) {
    lm[j] = -INFINITY;
    ls[j] = lu[j] = lx[j] = lq[j] = 0.0f;
  }
  alignas(64) float buf[BLOCK];
  alignas(64) float ebuf[SQ ? BLOCK : 1];  // the block's exps (WPO's q)
  for (int64_t b = 0; b < V; b += BLOCK) {
    const int64_t nb = std::min(BLOCK, V - b);
    const float* x;
    if (DT == kFloat32) {
      x = reinterpret_cast<const float*>(row) + b;
    } else {
      load_block<DT>(row + b, nb, buf);
      x = buf;
    }
    const int64_t nfull = nb / L * L;
    // Pass 1: lane-wise max and sum. GCC 12 leaves these 16-way reductions
    // scalar; a GCC-vector-type version measured no faster (pass 2's exp
    // dominates), so the plain loop stays.
    float bm[L];
    for (int j = 0; j < L; ++j) bm[j] = lm[j];
    for (int64_t i = 0; i < nfull; i += L)
      for (int j = 0; j < L; ++j) {
        bm[j] = pfpo_max(bm[j], x[i + j]);
        lx[j] += x[i + j];
      }
    if (SQ) rescale_sq(lm, lq, bm);
    for (int j = 0; j < L; ++j) rebase(lm[j], ls[j], lu[j], bm[j]);
    if (SQ) {
      // q from the same exps, squared in a loop of their own over the L1-resident
      // block: adding q += e * e to the loop above made GCC's if-converted exp code
      // (blends per clamp case, lane states kept in memory) cost 1.6-2x the plain forward.
      for (int64_t i = 0; i < nfull; i += L)
        for (int j = 0; j < L; ++j) ebuf[i + j] = accumulate_at_max(lm[j], ls[j], lu[j], x[i + j]);
      for (int64_t i = 0; i < nfull; i += L)
        for (int j = 0; j < L; ++j) lq[j] += square_normal(ebuf[i + j]);
    } else {
      for (int64_t i = 0; i < nfull; i += L)
        for (int j = 0; j < L; ++j) accumulate_at_max(lm[j], ls[j], lu[j], x[i + j]);
    }
    // Fewer than L elements left (last block only): general updates, one per lane.
    for (int64_t k = 0; k < nb - nfull; ++k) {
      const float v = x[nfull + k];
      const float mk = pfpo_max(lm[k], v);
      if (SQ) {
        const float c = pfpo_exp(clamp_shift(lm[k] - mk)), e = pfpo_exp(clamp_shift(v - mk));
        lq[k] = lq[k] * c * c + e * e;
      }
      rebase(lm[k], ls[k], lu[k], mk);
      accumulate_at_max(lm[k], ls[k], lu[k], v);
      lx[k] += v;
    }
  }
  if (SQ) {  // q of the lanes at the row max, in a fixed order (deterministic)
    float m = -INFINITY, q = 0.0f;
    for (int j = 0; j < L; ++j) m = pfpo_max(m, lm[j]);
    for (int j = 0; j < L; ++j) {
      const float c = pfpo_exp(clamp_shift(lm[j] - m));
      q += lq[j] * c * c;
    }
    *q_out = q;
  }
  // Pairwise tree merge of the lanes (fixed order: deterministic).
  State st[L];
  for (int j = 0; j < L; ++j) st[j] = State{lm[j], ls[j], lu[j], lx[j], 0.0f};
  for (int w = L / 2; w > 0; w /= 2)
    for (int j = 0; j < w; ++j) st[j] = merge(st[j], st[j + w]);
  // NaNs are counted off the hot loop: a NaN logit always makes sum_x NaN, so
  // only such a row (rare: a NaN, or +-inf / huge logits of both signs) is
  // scanned again. Counting in the loop above cost ~30% of the forward (AVX2).
  if (st[0].sum_x != st[0].sum_x)
    for (int64_t i = 0; i < V; ++i) st[0].nan += is_nan(Elem<DT>::load(row[i]));
  return st[0];
}

template <int DT, bool SQ>
PFPO_INLINE void fwd_row(const void* row_v, int64_t V, int64_t y, float* out, int64_t rows) {
  const auto* row = static_cast<const typename Elem<DT>::T*>(row_v);
  float q = 0.0f;
  const State st = row_state<DT, SQ>(row, V, &q);
  const Stats r = finalize(st);
  if (SQ) out[kNumStats * rows] = logf(q) - 2.0f * r.log_s;  // NaN with log s for an undefined row
  // out points at this token's slot of five [rows] arrays: logp, m, log s, entropy, sum_x.
  out[0] = token_logp(Elem<DT>::load(row[y]), st.m, r.log_s);
  out[rows] = st.m;
  out[2 * rows] = r.log_s;
  out[3 * rows] = r.entropy;
  out[4 * rows] = st.sum_x;
}

template <int DT>
PFPO_INLINE void bwd_row(const void* row_v, int64_t V, int64_t y, float m, float log_s, float g,
                         void* out_v) {
  using T = typename Elem<DT>::T;
  const T* row = static_cast<const T*>(row_v);
  T* out = static_cast<T*>(out_v);
  if (log_s != log_s) {  // undefined row (NaN / +inf / all -inf logits): NaN gradient, as every backend
    for (int64_t i = 0; i < V; ++i) out[i] = Elem<DT>::store(NAN);
    return;
  }
  // Read the target logit before anything is written: out may alias row.
  const float xy = Elem<DT>::load(row[y]);
  alignas(64) float buf[BLOCK];
  for (int64_t b = 0; b < V; b += BLOCK) {
    const int64_t nb = std::min(BLOCK, V - b);
    // Through a local buffer so that the compute loop never sees row and out
    // (possibly the same memory) together: no alias checks, always vectorized.
    load_block<DT>(row + b, nb, buf);
    for (int64_t i = 0; i < nb; ++i) buf[i] = grad_other(buf[i], m, log_s, g);
    store_block<DT>(buf, nb, out + b);
  }
  out[y] = Elem<DT>::store(grad_target(xy, m, log_s, g));
}

using FwdRowFn = void (*)(int, bool, const void*, int64_t, int64_t, float*, int64_t);
using BwdRowFn = void (*)(int, const void*, int64_t, int64_t, float, float, float, void*);

// One copy of the row kernels per instruction set.
#define PFPO_DEFINE_ISA(SUFFIX, ATTR)                                                            \
  ATTR void fwd_row_##SUFFIX(int dt, bool sq, const void* row, int64_t V, int64_t y, float* out, \
                             int64_t rows) {                                                    \
    if (sq) {                                                                                   \
      if (dt == kFloat32) fwd_row<kFloat32, true>(row, V, y, out, rows);                        \
      else if (dt == kBFloat16) fwd_row<kBFloat16, true>(row, V, y, out, rows);                 \
      else fwd_row<kFloat16, true>(row, V, y, out, rows);                                       \
    } else if (dt == kFloat32) fwd_row<kFloat32, false>(row, V, y, out, rows);                  \
    else if (dt == kBFloat16) fwd_row<kBFloat16, false>(row, V, y, out, rows);                  \
    else fwd_row<kFloat16, false>(row, V, y, out, rows);                                        \
  }                                                                                             \
  ATTR void bwd_row_##SUFFIX(int dt, const void* row, int64_t V, int64_t y, float m,            \
                             float log_s, float g, void* out) {                                 \
    if (dt == kFloat32) bwd_row<kFloat32>(row, V, y, m, log_s, g, out);                         \
    else if (dt == kBFloat16) bwd_row<kBFloat16>(row, V, y, m, log_s, g, out);                  \
    else bwd_row<kFloat16>(row, V, y, m, log_s, g, out);                                        \
  }

PFPO_DEFINE_ISA(default, )
#if defined(__x86_64__) && defined(__GNUC__)
PFPO_DEFINE_ISA(avx2, __attribute__((target("avx2,fma"))))
PFPO_DEFINE_ISA(avx512, __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,prefer-vector-width=512"))))
#define PFPO_HAVE_X86_ISAS 1
#endif

struct Isa {
  const char* name;
  FwdRowFn fwd;
  BwdRowFn bwd;
};

bool cpu_has(const std::string& isa) {
#ifdef PFPO_HAVE_X86_ISAS
  if (isa == "avx512")
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
  if (isa == "avx2") return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
  return isa == "default";
}

Isa make_isa(const std::string& name) {
#ifdef PFPO_HAVE_X86_ISAS
  if (name == "avx512") return Isa{"avx512", fwd_row_avx512, bwd_row_avx512};
  if (name == "avx2") return Isa{"avx2", fwd_row_avx2, bwd_row_avx2};
#endif
  return Isa{"default", fwd_row_default, bwd_row_default};
}

Isa best_isa() {
  for (const char* name : {"avx512", "avx2"})
    if (cpu_has(name)) return make_isa(name);
  return make_isa("default");
}

Isa& current_isa() {
  static Isa isa = best_isa();
  return isa;
}

int64_t elem_size(int dtype) {
  if (dtype == kFloat32) return 4;
  if (dtype == kBFloat16 || dtype == kFloat16) return 2;
  throw std::invalid_argument("pyfastpo.backends._C: unknown dtype code " + std::to_string(dtype));
}

// Rows per OpenMP chunk: about 16k elements of work each, so small vocabularies
// are not dominated by scheduling and big ones still balance (rows with an
// ignored label cost nothing, hence dynamic scheduling).
int64_t rows_per_chunk(int64_t V) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(V, 1)); }

int threads(int requested) { return requested > 0 ? requested : omp_get_max_threads(); }

}  // namespace

void cpu_forward(uintptr_t logits, int dtype, int64_t N, int64_t T, int64_t V, int64_t stride_n,
                 int64_t stride_t, uintptr_t labels, int64_t ignore_index, uintptr_t out_stats,
                 int num_threads, bool log_sum_sq) {
  const int64_t es = elem_size(dtype);
  const char* base = reinterpret_cast<const char*>(logits);
  const int64_t* lab = reinterpret_cast<const int64_t*>(labels);
  float* out = reinterpret_cast<float*>(out_stats);
  const FwdRowFn fwd = current_isa().fwd;
  const int64_t rows = N * T, chunk = rows_per_chunk(V);
#pragma omp parallel for schedule(dynamic, chunk) num_threads(threads(num_threads))
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t y = lab[r];
    if (y == ignore_index || y < 0 || y >= V) {  // ignored: never read the row
      for (int k = 0; k < kNumStats + log_sum_sq; ++k) out[k * rows + r] = 0.0f;
      continue;
    }
    const int64_t n = r / T, t = r % T;
    const char* row = base + (n * stride_n + t * stride_t) * es;
    fwd(dtype, log_sum_sq, row, V, y, out + r, rows);
  }
}

void cpu_backward(uintptr_t logits, int dtype, int64_t N, int64_t T, int64_t V, int64_t stride_n,
                  int64_t stride_t, uintptr_t labels, uintptr_t row_max, uintptr_t log_sum,
                  uintptr_t grad_scale, int64_t ignore_index, uintptr_t out, int64_t out_stride_n,
                  int64_t out_stride_t, int num_threads) {
  const int64_t es = elem_size(dtype);
  const char* base = reinterpret_cast<const char*>(logits);
  char* obase = reinterpret_cast<char*>(out);
  const int64_t* lab = reinterpret_cast<const int64_t*>(labels);
  const float* m = reinterpret_cast<const float*>(row_max);
  const float* ls = reinterpret_cast<const float*>(log_sum);
  const float* g = reinterpret_cast<const float*>(grad_scale);
  const BwdRowFn bwd = current_isa().bwd;
  const int64_t rows = N * T, chunk = rows_per_chunk(V);
#pragma omp parallel for schedule(dynamic, chunk) num_threads(threads(num_threads))
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t n = r / T, t = r % T;
    char* orow = obase + (n * out_stride_n + t * out_stride_t) * es;
    const int64_t y = lab[r];
    if (y == ignore_index || y < 0 || y >= V) {
      std::memset(orow, 0, V * es);  // +0.0 is all-zero bits in all three dtypes
      continue;
    }
    const char* row = base + (n * stride_n + t * stride_t) * es;
    bwd(dtype, row, V, y, m[r], ls[r], g[n], orow);
  }
}

std::string cpu_isa() { return current_isa().name; }

void set_cpu_isa(const std::string& isa) {
  if (isa.empty()) {
    current_isa() = best_isa();
    return;
  }
  if (isa != "default" && isa != "avx2" && isa != "avx512")
    throw std::invalid_argument("pyfastpo.backends._C: unknown ISA '" + isa + "' (default, avx2, avx512)");
  if (!cpu_has(isa)) throw std::runtime_error("pyfastpo.backends._C: this CPU does not support " + isa);
  current_isa() = make_isa(isa);
}

void cpu_to_float(uintptr_t src, int dtype, uintptr_t dst, int64_t n) {
  float* out = reinterpret_cast<float*>(dst);
  if (dtype == kFloat32) {
    std::memcpy(out, reinterpret_cast<const void*>(src), n * 4);
  } else if (dtype == kBFloat16) {
    load_block<kBFloat16>(reinterpret_cast<const uint16_t*>(src), n, out);
  } else {
    elem_size(dtype);
    load_block<kFloat16>(reinterpret_cast<const uint16_t*>(src), n, out);
  }
}

void cpu_from_float(uintptr_t src, uintptr_t dst, int dtype, int64_t n) {
  const float* in = reinterpret_cast<const float*>(src);
  if (dtype == kFloat32) {
    std::memcpy(reinterpret_cast<void*>(dst), in, n * 4);
  } else if (dtype == kBFloat16) {
    store_block<kBFloat16>(in, n, reinterpret_cast<uint16_t*>(dst));
  } else {
    elem_size(dtype);
    store_block<kFloat16>(in, n, reinterpret_cast<uint16_t*>(dst));
  }
}

void cpu_exp(uintptr_t src, uintptr_t dst, int64_t n) {
  const float* in = reinterpret_cast<const float*>(src);
  float* out = reinterpret_cast<float*>(dst);
  for (int64_t i = 0; i < n; ++i) out[i] = pfpo_exp(in[i]);
}

}  // namespace pfpo
