// pyfastpo: the per-token math of sequence_logps, shared by the CPU driver
// (cpu_logps.cpp) and the CUDA kernels (cuda_logps.cu).
//
// For one token row x[0..V) with target y:
//   m = max x,  s = sum exp(x - m),  logp = (x_y - m) - log s,
//   entropy = lse - sum p x = log s - u / s   with  u = sum exp(x - m) * (x - m),
//   sum_x = sum x,   d logp / d x_v = [v == y] - exp((x_v - m) - log s).
//
// m and log s are kept APART (never lse = m + log s): at logits of size 1e6 the
// sum m + log s rounds away log s's digits (0.06 nats per token in float32), and
// at 1e30 it loses log s entirely. x - m is exact to the rounding of the inputs,
// so logp and the softmax keep the precision of torch's log_softmax at any offset.
//
// u is accumulated RELATIVE to the running max (x - m, not x): the textbook
// form lse - (sum exp(x-m) x)/s subtracts two numbers of size |x| and loses
// all digits of the entropy for large logits (1e4 -> ~1e-3 absolute error);
// the shifted form is exact to float32 rounding of log s and u/s.
//
// Special values, without branches: a shift d = x - m is clamped to
// [PFPO_D_MIN, +inf) before exp, so -inf logits (masked vocabulary entries)
// and the empty state (m = -inf) contribute exactly 0 instead of 0 * inf = nan;
// a NaN logit can be dropped by the max and the clamps, so NaNs are counted
// apart (State::nan), off the hot loops: a NaN always makes sum_x NaN, so only
// a row whose sum_x is NaN is read again to count them (sum_x alone is no
// witness: finite logits of 1e35 and -1e35 sum to inf - inf = NaN). finalize()
// marks a row UNDEFINED (log s = entropy = NaN, hence NaN logp and NaN gradient
// in every backend) when it holds a NaN, a +inf, or only -inf logits: softmax
// is not defined there, and a finite number would hide it.
#pragma once

#include <stdint.h>
#include <string.h>
#include <math.h>

#ifdef __CUDACC__
#define PFPO_HD __host__ __device__ __forceinline__
#define PFPO_UNROLL _Pragma("unroll")
#else
#define PFPO_HD inline __attribute__((always_inline))
#define PFPO_UNROLL
#endif

namespace pfpo {

// Shifts below this are treated as exp(d) == 0 (pfpo_exp returns exactly 0
// below PFPO_EXP_LO on host and device alike).
constexpr float PFPO_D_MIN = -100.0f;

// ---------------------------------------------------------------- bit casts
PFPO_HD uint32_t f2u(float f) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(f);
#else
  uint32_t u;
  memcpy(&u, &f, 4);
  return u;
#endif
}
PFPO_HD float u2f(uint32_t u) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(u);
#else
  float f;
  memcpy(&f, &u, 4);
  return f;
#endif
}

// max (NaN handling: see finalize). On the host a select, which vectorizes
// without -ffast-math; on the device fmaxf, one FMNMX (the select is two).
PFPO_HD float pfpo_max(float m, float x) {
#if defined(__CUDA_ARCH__) || defined(PFPO_EMULATE_DEVICE)
  return fmaxf(m, x);
#else
  return (x <= m) ? m : x;
#endif
}

// Clamp a shift d = x - m (<= 0) so that exp and d * exp(d) stay finite; NaN -> PFPO_D_MIN.
PFPO_HD float clamp_shift(float d) { return (d > PFPO_D_MIN) ? d : PFPO_D_MIN; }

// The one exp rule of host and device: below PFPO_EXP_LO, where float32's
// exp would be subnormal (expf(-100) = 3.8e-44), the result is exactly 0.
// Host and device thus agree on every row, masked (-inf) and clamped entries
// included. (NaN: 0 on the host, NaN on the device; the kernels pass NaN to
// exp only in an undefined row, whose outputs are NaN either way.)
constexpr float PFPO_EXP_LO = -87.33654f;  // ~ log(FLT_MIN): n = round(x / ln2) >= -126

constexpr float PFPO_LOG2E = 1.44269504088896341f;

// 2^y by ex2.approx.ftz (one MUFU.EX2; relative error ~2^-22, the instruction
// Triton's tl.exp uses). Its FTZ flush of subnormal results is the rule above:
// 2^y is subnormal exactly when y < -126. Also compiled on the host to emulate
// the device in tests (csrc/device_emulation.cpp), there as exp2f with the same
// flush (NaN stays NaN, as on the device).
PFPO_HD float device_exp2(float y) {
#ifdef __CUDA_ARCH__
  float r;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(y));
  return r;
#else
  return (y != y) ? y : ((y >= -126.0f) ? exp2f(y) : 0.0f);
#endif
}

// The device exp: 2^(x log2 e), two instructions (FMUL, MUFU.EX2) where expf takes
// ten; exactly 0 below PFPO_EXP_LO (x log2e < -126).
PFPO_HD float device_exp(float x) { return device_exp2(x * PFPO_LOG2E); }

// exp(x) in float32. On the device: device_exp (memory-bound kernels: the inner
// loop's instruction count decides the bandwidth). On the host: a branch-free Cephes-style polynomial that GCC
// vectorizes (libm's expf call does not): round x/ln2 to n with the 1.5*2^23
// trick, reduce r = x - n ln2 (ln2 split in two for exactness), degree-6
// polynomial on |r| <= ln2/2, scale by 2^n through the exponent bits.
// Max relative error ~2 ulp on [-87.3, 88] (saturates above 88) (tests/test_cpp_backend.py);
// returns exactly 0 below PFPO_EXP_LO (never a subnormal) and for NaN.
PFPO_HD float pfpo_exp(float x) {
#if defined(__CUDA_ARCH__) || defined(PFPO_EMULATE_DEVICE)
  return device_exp(x);
#else
  const float lo = PFPO_EXP_LO, hi = 88.0f;  // n = round(x / ln2) in [-126, 127]
  float xc = (x < lo) ? lo : x;
  xc = (xc > hi) ? hi : xc;
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  float t = xc * 1.44269504088896341f + magic;
  float n = t - magic;
  int32_t ni = (int32_t)(f2u(t) - f2u(magic));  // n as an integer
  float r = xc - n * 0.693359375f;               // ln2 high part (exact product)
  r = r - n * -2.12194440e-4f;                   // ln2 low part
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  float y = p * (r * r) + r + 1.0f;
  y = y * u2f((uint32_t)(ni + 127) << 23);  // 2^n, n in [-126, 127]
  // 0 below lo (and for NaN: NaN is tracked through the max). Masking the bits
  // instead of `cond ? y : 0` keeps GCC from turning this into a branch
  // (which, under the default -ftrapping-math, blocks vectorization).
  return u2f(f2u(y) & ((x >= lo) ? 0xffffffffu : 0u));
#endif
}

// ---------------------------------------------------------------- online state
// A partial reduction of a row: m = running max, s = sum exp(x - m),
// u = sum exp(x - m) * (x - m), sum_x = sum x, nan = number of NaN elements
// (counted off the hot loops: only a row whose sum_x is NaN is read again).
// Empty state: {-inf, 0, 0, 0, 0}.
struct State {
  float m, s, u, sum_x, nan;
};

PFPO_HD State empty_state() { return State{-INFINITY, 0.0f, 0.0f, 0.0f, 0.0f}; }

// 1 for a NaN element, else 0 (a select: vectorizes, counts exactly up to 2^24).
PFPO_HD float is_nan(float x) { return (x != x) ? 1.0f : 0.0f; }

// Re-base a state from its max to a larger max m_new (in place); returns the factor c.
PFPO_HD float rebase(float& m, float& s, float& u, float m_new) {
  float d = clamp_shift(m - m_new);
  float c = pfpo_exp(d);
  // sum e^(x-m_new)(x-m_new) = c * sum e^(x-m)((x-m) + d) = c * (u + d s)
  u = c * (u + d * s);
  s = c * s;
  m = m_new;
  return c;
}

// Add one element x to a state whose max m already satisfies m >= x; returns exp(x - m).
PFPO_HD float accumulate_at_max(float m, float& s, float& u, float x) {
  float d = clamp_shift(x - m);
  float e = pfpo_exp(d);
  s += e;
  u += e * d;
  return e;
}

// Add one element x (general online update: one or two exps).
PFPO_HD void update(State& st, float x) {
  rebase(st.m, st.s, st.u, pfpo_max(st.m, x));
  accumulate_at_max(st.m, st.s, st.u, x);
  st.sum_x += x;
}

// Add K elements with a single re-base (what a GPU thread does per vector load). SQ: q
// (see SqState) rides along; without it the q arguments are dead and compiled away.
template <int K, bool SQ>
PFPO_HD void update_k_q(State& st, float& q, const float (&x)[K]) {
  float m_new = st.m;
PFPO_UNROLL
  for (int k = 0; k < K; ++k) m_new = pfpo_max(m_new, x[k]);
  const float c = rebase(st.m, st.s, st.u, m_new);
  if (SQ) q *= c * c;
PFPO_UNROLL
  for (int k = 0; k < K; ++k) {
    const float e = accumulate_at_max(st.m, st.s, st.u, x[k]);
    if (SQ) q += e * e;
    st.sum_x += x[k];
  }
}

template <int K>
PFPO_HD void update_k(State& st, const float (&x)[K]) {
  float unused = 0.0f;
  update_k_q<K, false>(st, unused, x);
}

// Combine two partial states (lanes of a CPU vector, GPU threads / warps).
PFPO_HD State merge(State a, State b) {
  float m = pfpo_max(a.m, b.m);
  rebase(a.m, a.s, a.u, m);
  rebase(b.m, b.s, b.u, m);
  return State{m, a.s + b.s, a.u + b.u, a.sum_x + b.sum_x, a.nan + b.nan};
}

struct Stats {
  float log_s, entropy;
};

// log s and entropy = log s - u / s (nats), once per row, off the hot loop.
// An undefined row (a NaN logit, counted in nan; a +inf logit, m = +inf, which
// the max finds exactly when no NaN is present; or every logit -inf, m = -inf)
// gets log s = entropy = NaN, so logp = (x_y - m) - log s is NaN.
PFPO_HD Stats finalize(State st) {
  float log_s = logf(st.s);
  Stats r{log_s, log_s - st.u / st.s};
  const bool defined = (st.nan == 0.0f) && (st.m > -INFINITY) && (st.m < INFINITY);
  if (!defined) r.log_s = r.entropy = NAN;
  return r;
}

// ---------------------------------------------------------------- base-2 fast path (device)
// The CUDA kernels' hot loops work in base-2 units, so that the shift and the scale
// to log2 are ONE FFMA per element (instead of a subtract, a clamp and a multiply):
//   m2 = rn(m log2e),   d2 = fma(x, log2e, -m2) = (x - m) log2e + c,   c = fma(m, log2e, -m2),
// c being m2's rounding error, the same for every element of the row. The state
// keeps s2 = sum 2^d2 and u2 = sum 2^d2 d2 (relative to m2), and at the end
//   log s = ln2 (log2 s2 - c),   entropy = ln2 (log2 s2 - u2 / s2)   (c cancels).
// The one clamp is inside u's product (e * max(d2, PFPO_D2_MIN)), so -inf logits (a
// masked vocabulary) add exactly 0. The pass is exact for a row whose max is finite
// and below PFPO_FAST_MAX_ABS in size (then |c| <= ulp(m2)/2 <= 1) and which holds no
// NaN. Any other row ends with a non-finite s2 (a NaN propagates) or a max out of
// range (+inf, all -inf, huge), which fast_state_ok() tells; the kernels then compute
// that row again with the exact natural-units path above (update, merge, finalize,
// NaN count). Plain rows, masked ones included, are read once.
constexpr float PFPO_FAST_MAX_ABS = 16777216.0f;  // 2^24
constexpr float PFPO_LN2 = 0.693147180559945309f;
// Shifts (base 2) below this give exactly 0: ex2's flush starts at -126.
constexpr float PFPO_D2_MIN = -150.0f;

// m2 = rn(m log2e), never fused with a neighbouring add (d2's consistency needs
// the very same rounded m2 in every use).
PFPO_HD float scaled_max(float m) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(m, PFPO_LOG2E);
#else
  return m * PFPO_LOG2E;  // the host build has no FMA contraction (no -march, -ffp-contract)
#endif
}

// The fast pass's empty state: its max starts at -2^25, finite, so that m2 is never
// -inf and d2 never the NaN of -inf - -inf (no select per step). A row whose logits
// all lie below it (only -inf logits, say) keeps that max, out of the fast range:
// fast_state_ok sends it to the exact pass, which finds its true max.
PFPO_HD State fast_empty_state() { return State{-2.0f * PFPO_FAST_MAX_ABS, 0.0f, 0.0f, 0.0f, 0.0f}; }

// Re-base a base-2 state from max m to m_new >= m; returns the factor 2^d. The clamp keeps
// the empty state (m = -inf: d = -inf, or NaN when m_new is -inf too) at exactly 0, never
// 0 * -inf.
PFPO_HD float rebase2(float& m, float& s, float& u, float m_new) {
  const float d = pfpo_max(scaled_max(m) - scaled_max(m_new), PFPO_D2_MIN);  // fmaxf drops a NaN
  const float c = device_exp2(d);
  u = c * (u + d * s);
  s = c * s;
  m = m_new;
  return c;
}

// Add K elements whose max (with st.m) is m_new: one re-base, then per element one
// FFMA, one ex2, three adds (s, u, sum_x) and the clamp of u's factor (-inf logits).
// SQ: q2 = sum 2^(2 d2) rides along (SqState), one FFMA more per element.
template <int K, bool SQ>
PFPO_HD void update2_k_q(State& st, float& q, const float (&x)[K], float m_new) {
  const float c = rebase2(st.m, st.s, st.u, m_new);
  if (SQ) q *= c * c;
  const float m2 = scaled_max(st.m);  // finite: the pass starts from fast_empty_state
PFPO_UNROLL
  for (int k = 0; k < K; ++k) {
    const float d2 = fmaf(x[k], PFPO_LOG2E, -m2);
    const float e = device_exp2(d2);
    st.s += e;
    st.u = fmaf(e, pfpo_max(d2, PFPO_D2_MIN), st.u);  // a -inf logit: e = 0, adds 0 (not 0 * -inf)
    if (SQ) q = fmaf(e, e, q);
    st.sum_x += x[k];
  }
}

template <int K>
PFPO_HD void update2_k(State& st, const float (&x)[K], float m_new) {
  float unused = 0.0f;
  update2_k_q<K, false>(st, unused, x, m_new);
}

// Add K elements (their max taken here).
template <int K>
PFPO_HD void update2_k(State& st, const float (&x)[K]) {
  float m_new = st.m;
PFPO_UNROLL
  for (int k = 0; k < K; ++k) m_new = pfpo_max(m_new, x[k]);
  update2_k<K>(st, x, m_new);
}

PFPO_HD State merge2(State a, State b) {
  const float m = pfpo_max(a.m, b.m);
  rebase2(a.m, a.s, a.u, m);
  rebase2(b.m, b.s, b.u, m);
  return State{m, a.s + b.s, a.u + b.u, a.sum_x + b.sum_x, 0.0f};
}

// Whether a whole row's base-2 state is exact (a plain row), else the row must be
// computed again by the natural-units path.
PFPO_HD bool fast_state_ok(const State& st) {
  return fabsf(st.m) < PFPO_FAST_MAX_ABS && isfinite(st.s) && isfinite(st.u);
}

// log s and entropy of a plain row's base-2 state (fast_state_ok). Both are >= 0 (the max
// element alone contributes 1 to s); the max element's 2^c and log2(s2) - c round apart,
// which could leave -1e-8 where a near-certain token has log s = 0 (logp would be > 0).
PFPO_HD Stats finalize2(State st) {
  const float c = fmaf(st.m, PFPO_LOG2E, -scaled_max(st.m));
  const float l2 = log2f(st.s);
  return Stats{pfpo_max(l2 - c, 0.0f) * PFPO_LN2, pfpo_max(l2 - st.u / st.s, 0.0f) * PFPO_LN2};
}

// ---------------------------------------------------------------- WPO's statistic
// log sum_v p_v^2 = log q - 2 log s with q = sum exp(2 (x - m)): one accumulator more on
// the same exp (e^2), re-based by the square of a state's factor. In base 2 the fast
// pass keeps q2 = sum 2^(2 d2) = 2^(2c) q, and the row's rounding c of m2 cancels:
// log sum p^2 = ln2 (log2 q2 - 2 log2 s2). q >= 1 (the max element), so it never
// underflows; an undefined row gets NaN through log s.
struct SqState {
  State st;
  float q;
};

template <int K>
PFPO_HD void update_k(SqState& a, const float (&x)[K]) {
  update_k_q<K, true>(a.st, a.q, x);
}

template <int K>
PFPO_HD void update2_k(SqState& a, const float (&x)[K], float m_new) {
  update2_k_q<K, true>(a.st, a.q, x, m_new);
}

PFPO_HD SqState merge(SqState a, SqState b) {
  const float m = pfpo_max(a.st.m, b.st.m);
  const float ca = rebase(a.st.m, a.st.s, a.st.u, m), cb = rebase(b.st.m, b.st.s, b.st.u, m);
  const State st{m, a.st.s + b.st.s, a.st.u + b.st.u, a.st.sum_x + b.st.sum_x, a.st.nan + b.st.nan};
  return SqState{st, a.q * ca * ca + b.q * cb * cb};
}

PFPO_HD SqState merge2(SqState a, SqState b) {
  const float m = pfpo_max(a.st.m, b.st.m);
  const float ca = rebase2(a.st.m, a.st.s, a.st.u, m), cb = rebase2(b.st.m, b.st.s, b.st.u, m);
  const State st{m, a.st.s + b.st.s, a.st.u + b.st.u, a.st.sum_x + b.st.sum_x, 0.0f};
  return SqState{st, a.q * ca * ca + b.q * cb * cb};
}

// log sum p^2 of an exact (natural-units) state, given its finalize()d log s.
PFPO_HD float log_sum_sq(const SqState& a, Stats f) { return logf(a.q) - 2.0f * f.log_s; }

// log sum p^2 of a plain row's base-2 state (fast_state_ok(a.st)).
PFPO_HD float log_sum_sq2(const SqState& a) { return (log2f(a.q) - 2.0f * log2f(a.st.s)) * PFPO_LN2; }

// The plain State of either kind, and the empty states of the two passes.
PFPO_HD State& base_state(State& st) { return st; }
PFPO_HD State& base_state(SqState& a) { return a.st; }
template <typename S>
PFPO_HD S empty_of();
template <>
PFPO_HD State empty_of<State>() { return empty_state(); }
template <>
PFPO_HD SqState empty_of<SqState>() { return SqState{empty_state(), 0.0f}; }
template <typename S>
PFPO_HD S fast_empty_of();
template <>
PFPO_HD State fast_empty_of<State>() { return fast_empty_state(); }
template <>
PFPO_HD SqState fast_empty_of<SqState>() { return SqState{fast_empty_state(), 0.0f}; }

// The backward's per-element map in base 2: -g p = g' 2^fma(x, log2e, -k_hi). k_hi + k_lo
// = (m + log s) log2e, split in double once per row, and g' = -g 2^-k_lo carries the low
// part, so the exponent keeps every digit at any offset below PFPO_FAST_MAX_ABS (larger
// maxima, and rows with an infinite max, take the exact grad_other).
struct FastGrad {
  float k_hi, g;
};

PFPO_HD FastGrad fast_grad(float m, float log_s, float g) {
  const double k = (double)m * (double)PFPO_LOG2E + (double)log_s * (double)PFPO_LOG2E;
  const float k_hi = (float)k;
  return FastGrad{k_hi, (float)(-(double)g * exp2(-(k - (double)k_hi)))};
}

PFPO_HD float grad_other2(float x, FastGrad f) { return device_exp2(fmaf(x, PFPO_LOG2E, -f.k_hi)) * f.g; }

// The token's log-probability from its target logit and the row's (m, log s).
PFPO_HD float token_logp(float x_y, float m, float log_s) { return (x_y - m) - log_s; }

// Softmax probability of logit x: exp((x - m) - log s), never exp(x - (m + log s)).
PFPO_HD float softmax_p(float x, float m, float log_s) { return pfpo_exp((x - m) - log_s); }

// d logp / d x_v scaled by g, for a non-target column: -g * p_v.
PFPO_HD float grad_other(float x, float m, float log_s, float g) { return -g * softmax_p(x, m, log_s); }

// The target column as g * (1 - p) in float32 (never via a 16-bit p).
PFPO_HD float grad_target(float x, float m, float log_s, float g) {
  return g * (1.0f - softmax_p(x, m, log_s));
}

// ---------------------------------------------------------------- 16-bit <-> float (host)
// Device code uses cuda_bf16.h / cuda_fp16.h instead; these are plain bit
// routines so that the CPU loops vectorize without F16C or _Float16.

// bfloat16 is the top half of a float32.
inline float bf16_to_float(uint16_t h) { return u2f((uint32_t)h << 16); }

// Round to nearest even; NaN stays a (quiet) NaN.
inline uint16_t float_to_bf16(float f) {
  uint32_t u = f2u(f);
  uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  uint32_t nan = ((u >> 16) | 0x40u);
  return (uint16_t)(((u & 0x7fffffffu) > 0x7f800000u) ? nan : rounded);
}

// IEEE half -> float: shift exponent+mantissa into float position and multiply
// by 2^112 (= 2^(127-15)) -- exact for normals and subnormals; inf/NaN get the
// float exponent directly.
inline float fp16_to_float(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  uint32_t em = (uint32_t)(h & 0x7fffu) << 13;
  float finite = u2f(em) * 5.192296858534828e33f;  // 2^112
  uint32_t special = em | 0x7f800000u;             // inf / NaN (payload kept)
  uint32_t bits = (em >= (0x7c00u << 13)) ? special : f2u(finite);
  return u2f(bits | sign);
}

// float -> IEEE half, round to nearest even, overflow -> inf, NaN -> quiet NaN
// (F. Giesen's float_to_half_fast3_rtne, written branch-free).
inline uint16_t float_to_fp16(float f) {
  const uint32_t f32infty = 255u << 23;
  const uint32_t f16max = (127u + 16u) << 23;
  const uint32_t denorm_magic_u = ((127u - 15u) + (23u - 10u) + 1u) << 23;
  uint32_t u = f2u(f);
  uint32_t sign = (u >> 16) & 0x8000u;
  u &= 0x7fffffffu;
  // Subnormal result: float addition aligns the 10 mantissa bits, rounding RNE.
  uint32_t sub = f2u(u2f(u) + u2f(denorm_magic_u)) - denorm_magic_u;
  // Normal result: re-bias the exponent and round RNE by hand.
  uint32_t norm = (u + ((uint32_t)(15 - 127) << 23) + 0xfffu + ((u >> 13) & 1u)) >> 13;
  uint32_t big = (u > f32infty) ? 0x7e00u : 0x7c00u;
  uint32_t o = (u >= f16max) ? big : ((u < (113u << 23)) ? sub : norm);
  return (uint16_t)(o | sign);
}

}  // namespace pfpo
