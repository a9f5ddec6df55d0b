// Fused step op, CPU kernel (docs/design.md, "The op"): one affine update per pixel,
//
//   dim 2:  x' = P00 x + P01 m + sum_j (Qj00 ex_j + Qj01 em_j) + S00 xi_x
//           m' = P10 x + P11 m + sum_j (Qj10 ex_j + Qj11 em_j) + S10 xi_x + S11 xi_m
//   dim 1:  x' = P00 x + sum_j Qj00 e_j + S00 xi
//
// with the coefficients read once per call from row `step` of `coef`, float32 arithmetic, terms
// summed left to right as written, and xi from `noise`, or from Philox (philox.h) keyed by
// `seed_tensor` or `seed` when no noise tensor is given, or absent.
//
// Memory: one pass. The x-part [B, C, *S] is split over threads (at::parallel_for) and walked
// in tiles of at most kTile elements; a tile's update is accumulated in float32 buffers on the
// stack (L1-resident) by one simple loop per operand, then written out once. The x and m halves
// are one strided view, the m pointer C * stride(1) further on: nothing is copied, whatever the
// strides (a noise tensor of a dtype other than float32/64, float16 or bfloat16 is the one
// exception: it is read through a float32 copy).
//
// Order: the walk follows the output's memory order (empty_like(z), so channels_last stays
// channels_last), merging adjacent dims wherever every operand allows; any rank works. The
// Philox counter of an element is offset + its LOGICAL row-major index in the x-part, carried as
// one more strided operand, so the noise depends neither on the memory layout nor on the thread
// split. Every path computes the same float32 terms in the same order, so the result is also
// bit-identical across layouts, thread counts and instruction sets.
//
// Tiles with K <= 3 whose runs are unit-stride in every operand skip the accumulator buffers:
// one loop per run reads every operand, keeps the update in registers and writes the result
// (direct_run2 / direct_run1), with the same float terms in the same order. Deterministic ones
// take up to kDirectTile elements; Philox ones first prefetch their operands and make their
// normals into a kTile buffer, which the runs add last.
//
// Tiles: long innermost runs are looped along the run; short ones (channels_last with C < 16:
// runs of C channels) across runs; and when every operand is channels_last-like, a tile of pixels
// is one contiguous stretch per operand, handled by the pixel-interleaved path (run_pairs).
//
// Vectorisation: the loops are plain scalar code that GCC auto-vectorises (philox.h brings its own
// branch-free log / sin / cos; setup.py's -fno-math-errno lets sqrt vectorise), except Philox's
// word generation, hand-written with AVX2 / AVX-512 intrinsics, and the float16 conversions of the
// AVX2 / AVX-512 builds (F16C; float16 runs go through float32 buffers, see HalfRuns). The kernel
// body is compiled for baseline x86-64 (SSE2), AVX2 and AVX-512 and picked at run time from torch's
// CPU capability (which honours ATEN_CPU_CAPABILITY) and the CPU's own flags, so the extension
// stays portable (no -march flags; other architectures get the baseline build).
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

#include "philox.h"

namespace fastint {
namespace {

constexpr int64_t kTile = 1024;   // elements per tile: the float buffers (16 KiB) stay in L1
constexpr int64_t kDirectTile = 65536;  // elements per direct tile (no buffers: see run_range)
constexpr int64_t kGrain = 16384; // elements per parallel task, at least

// ---------------------------------------------------------------------------------------------
// Element conversions, with the rounding of torch's own casts (round to nearest even). float16 has
// its own branch-free integer versions (c10's do not vectorise here); they agree with c10's on every
// input except for NaN payloads.

// a if c else b, through an integer mask: both sides are computed, so GCC if-converts and vectorises
// (a ?: whose side holds float arithmetic stays a branch under the default -ftrapping-math).
FASTINT_INLINE uint32_t select_bits(bool c, uint32_t a, uint32_t b) {
  const uint32_t m = 0u - static_cast<uint32_t>(c);
  return (a & m) | (b & ~m);
}

FASTINT_INLINE float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t em = h & 0x7fffu;  // exponent and mantissa
  // Normal, inf, NaN: rebias the exponent by 127 - 15 (and once more for inf / NaN, to reach 0xff).
  const uint32_t normal = (em << 13) + 0x38000000u + select_bits(em >= 0x7c00u, 0x38000000u, 0u);
  // Subnormal and zero: em * 2^-24, exact in float.
  const uint32_t sub = philox::float_to_bits(static_cast<float>(static_cast<int32_t>(em)) * 5.9604644775390625e-08f);
  return philox::bits_to_float(sign | select_bits(em < 0x0400u, sub, normal));
}

FASTINT_INLINE uint16_t float_to_half(float f) {
  const uint32_t x = philox::float_to_bits(f);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t a = x & 0x7fffffffu;
  // Normal range: drop 13 mantissa bits, rounding to nearest even (a carry moves into the exponent).
  const uint32_t normal = ((a - 0x38000000u) + 0x0fffu + ((a >> 13) & 1u)) >> 13;
  // Below 2^-14: adding 0.5 rounds |f| to a multiple of 2^-24 (nearest even), which is the half
  // subnormal's integer, read off the mantissa.
  const uint32_t sub = philox::float_to_bits(philox::bits_to_float(a) + 0.5f) - 0x3f000000u;
  uint32_t h = select_bits(a < 0x38800000u, sub, normal);
  h = select_bits(a >= 0x477ff000u, 0x7c00u, h);  // rounds past 65504: inf
  h = select_bits(a > 0x7f800000u, 0x7e00u, h);   // NaN
  return static_cast<uint16_t>(sign | h);
}

FASTINT_INLINE float to_float(float v) { return v; }
FASTINT_INLINE float to_float(double v) { return static_cast<float>(v); }
FASTINT_INLINE float to_float(c10::Half v) { return half_to_float(v.x); }
FASTINT_INLINE float to_float(c10::BFloat16 v) { return c10::detail::f32_from_bits(v.x); }

template <class T>
FASTINT_INLINE T from_float(float v);
template <>
FASTINT_INLINE float from_float<float>(float v) {
  return v;
}
template <>
FASTINT_INLINE c10::Half from_float<c10::Half>(float v) {
  return c10::Half(float_to_half(v), c10::Half::from_bits());
}
template <>
FASTINT_INLINE c10::BFloat16 from_float<c10::BFloat16>(float v) {
  return c10::BFloat16(c10::detail::round_to_nearest_even(v), c10::BFloat16::from_bits());
}

// ---------------------------------------------------------------------------------------------
// float16 runs in vector registers. GCC vectorises neither half_to_float / float_to_half nor
// _Float16 casts, so the AVX2 and AVX-512 builds convert unit-stride float16 runs with F16C's
// vcvtph2ps / vcvtps2ph (round to nearest even, exceptions suppressed) into and out of float32
// buffers, and the float32 loops run on those (the AVX-512 direct runs convert in registers, see
// direct_run2_half). Both conversions are exact (half to float) or
// correctly rounded (float to half), like the scalar functions above: the same bits but for NaN
// payloads (vcvtph2ps quiets a signalling NaN; vcvtps2ph keeps a NaN's top payload bits where
// float_to_half writes 0x7e00). tests/test_step_fp16.py checks every build against torch's casts
// (under the default MXCSR: no flush-to-zero).
//
// HalfRuns<Isa>: kVector (whether the build converts runs this way), load (v = p as float) and
// store (p = v rounded to float16), n elements at unit stride. The baseline build keeps the scalar
// conversions inside its loops.
struct IsaBaseline;
template <class Isa>
struct HalfRuns {
  static constexpr bool kVector = false;
  static FASTINT_INLINE void load(float* __restrict v, const c10::Half* __restrict p, int64_t n) {
    for (int64_t j = 0; j < n; ++j) v[j] = half_to_float(p[j].x);
  }
  static FASTINT_INLINE void store(c10::Half* __restrict p, const float* __restrict v, int64_t n) {
    for (int64_t j = 0; j < n; ++j) p[j].x = float_to_half(v[j]);
  }
};

#if defined(FASTINT_X86) && defined(__GNUC__)
#define FASTINT_TARGET_AVX2_F16C __attribute__((target("avx2,f16c")))
#define FASTINT_TARGET_AVX512_F16C __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,f16c")))
constexpr int kRoundNearest = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;

// 8 at a time, the tail (< 8) scalar.
FASTINT_TARGET_AVX2_F16C inline void half_load_avx2(float* __restrict v, const c10::Half* __restrict p, int64_t n) {
  int64_t j = 0;
  for (; j + 8 <= n; j += 8)
    _mm256_storeu_ps(v + j, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + j))));
  for (; j < n; ++j) v[j] = half_to_float(p[j].x);
}

FASTINT_TARGET_AVX2_F16C inline void half_store_avx2(c10::Half* __restrict p, const float* __restrict v, int64_t n) {
  int64_t j = 0;
  for (; j + 8 <= n; j += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p + j), _mm256_cvtps_ph(_mm256_loadu_ps(v + j), kRoundNearest));
  for (; j < n; ++j) p[j].x = float_to_half(v[j]);
}

// 16 at a time, the tail (< 16) through masked loads and stores.
FASTINT_TARGET_AVX512_F16C inline void half_load_avx512(float* __restrict v, const c10::Half* __restrict p,
                                                        int64_t n) {
  int64_t j = 0;
  for (; j + 16 <= n; j += 16)
    _mm512_storeu_ps(v + j, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + j))));
  if (j < n) {
    const __mmask16 m = static_cast<__mmask16>((1u << (n - j)) - 1u);
    _mm512_mask_storeu_ps(v + j, m, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p + j)));
  }
}

FASTINT_TARGET_AVX512_F16C inline void half_store_avx512(c10::Half* __restrict p, const float* __restrict v,
                                                         int64_t n) {
  int64_t j = 0;
  for (; j + 16 <= n; j += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + j), _mm512_cvtps_ph(_mm512_loadu_ps(v + j), kRoundNearest));
  if (j < n) {
    const __mmask16 m = static_cast<__mmask16>((1u << (n - j)) - 1u);
    _mm256_mask_storeu_epi16(p + j, m, _mm512_cvtps_ph(_mm512_maskz_loadu_ps(m, v + j), kRoundNearest));
  }
}

struct IsaAvx2;
struct IsaAvx512;
template <>
struct HalfRuns<IsaAvx2> {
  static constexpr bool kVector = true;
  static FASTINT_INLINE void load(float* v, const c10::Half* p, int64_t n) { half_load_avx2(v, p, n); }
  static FASTINT_INLINE void store(c10::Half* p, const float* v, int64_t n) { half_store_avx2(p, v, n); }
};
template <>
struct HalfRuns<IsaAvx512> {
  static constexpr bool kVector = true;
  static FASTINT_INLINE void load(float* v, const c10::Half* p, int64_t n) { half_load_avx512(v, p, n); }
  static FASTINT_INLINE void store(c10::Half* p, const float* v, int64_t n) { half_store_avx512(p, v, n); }
};
#endif

// Storage type T is float16 and the build converts its runs in vector registers.
template <class T, class Isa>
constexpr bool kVectorHalf = std::is_same<T, c10::Half>::value && HalfRuns<Isa>::kVector;

// ---------------------------------------------------------------------------------------------
// Tile passes. A tile is `rows` runs of `cols` elements; an operand's element (r, k) sits at
// p[r * rs + k * cs]. Long runs are looped along the run (unit stride gets its own loop, the one
// that vectorises best), and the float buffers hold the tile as [r][k]; short runs (e.g.
// channels_last with a few channels: runs of C) are looped across runs instead, with the buffers
// as [k][r], so that the vectorised loop is long and the buffer side contiguous either way.
constexpr int64_t kShortRun = 16;

#if defined(__GNUC__)
#define FASTINT_LAMBDA_INLINE __attribute__((always_inline))
#else
#define FASTINT_LAMBDA_INLINE
#endif

// Calls f(i, s) for every element of a tile: i its buffer index, s its offset from the operand's
// tile origin. Every pass of a tile uses the same (rows, cols), hence the same buffer layout.
template <class F>
FASTINT_INLINE void tile_loop(int64_t rows, int64_t cols, int64_t rs, int64_t cs, const F& f) {
  if (cols >= kShortRun) {
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t i0 = r * cols, s0 = r * rs;
      if (cs == 1) {
        for (int64_t k = 0; k < cols; ++k) f(i0 + k, s0 + k);
      } else {
        for (int64_t k = 0; k < cols; ++k) f(i0 + k, s0 + k * cs);
      }
    }
  } else {
    for (int64_t k = 0; k < cols; ++k) {
      const int64_t i0 = k * rows, s0 = k * cs;
      for (int64_t r = 0; r < rows; ++r) f(i0 + r, s0 + r * rs);
    }
  }
}

// A float16 operand's tile as float32 in buffer layout (v[i], i as in tile_loop), long unit-stride
// runs converted in vector registers. The tile passes below then run their float32 loop on v.
template <class Isa>
FASTINT_INLINE void tile_half_to_float(float* __restrict v, const c10::Half* __restrict p, int64_t rows, int64_t cols,
                                       int64_t rs, int64_t cs) {
  if (cols >= kShortRun && cs == 1) {
    for (int64_t r = 0; r < rows; ++r) HalfRuns<Isa>::load(v + r * cols, p + r * rs, cols);
  } else {
    tile_loop(rows, cols, rs, cs, [=](int64_t i, int64_t s) FASTINT_LAMBDA_INLINE { v[i] = to_float(p[s]); });
  }
}

// a = ca * p, b = cb * p
template <class T, class Isa = IsaBaseline>
FASTINT_INLINE void tile_mul2(float* __restrict a, float* __restrict b, float ca, float cb, const T* __restrict p,
                              int64_t rows, int64_t cols, int64_t rs, int64_t cs) {
  if constexpr (kVectorHalf<T, Isa>) {
    alignas(64) float v[kTile];
    tile_half_to_float<Isa>(v, p, rows, cols, rs, cs);
    return tile_mul2<float>(a, b, ca, cb, v, 1, rows * cols, 0, 1);
  }
  tile_loop(rows, cols, rs, cs, [=](int64_t i, int64_t s) FASTINT_LAMBDA_INLINE {
    const float v = to_float(p[s]);
    a[i] = ca * v;
    b[i] = cb * v;
  });
}

// a += ca * p, b += cb * p
template <class T, class Isa = IsaBaseline>
FASTINT_INLINE void tile_acc2(float* __restrict a, float* __restrict b, float ca, float cb, const T* __restrict p,
                              int64_t rows, int64_t cols, int64_t rs, int64_t cs) {
  if constexpr (kVectorHalf<T, Isa>) {
    alignas(64) float v[kTile];
    tile_half_to_float<Isa>(v, p, rows, cols, rs, cs);
    return tile_acc2<float>(a, b, ca, cb, v, 1, rows * cols, 0, 1);
  }
  tile_loop(rows, cols, rs, cs, [=](int64_t i, int64_t s) FASTINT_LAMBDA_INLINE {
    const float v = to_float(p[s]);
    a[i] = a[i] + ca * v;
    b[i] = b[i] + cb * v;
  });
}

// a = ca * p
template <class T, class Isa = IsaBaseline>
FASTINT_INLINE void tile_mul1(float* __restrict a, float ca, const T* __restrict p, int64_t rows, int64_t cols,
                              int64_t rs, int64_t cs) {
  if constexpr (kVectorHalf<T, Isa>) {
    alignas(64) float v[kTile];
    tile_half_to_float<Isa>(v, p, rows, cols, rs, cs);
    return tile_mul1<float>(a, ca, v, 1, rows * cols, 0, 1);
  }
  tile_loop(rows, cols, rs, cs, [=](int64_t i, int64_t s) FASTINT_LAMBDA_INLINE { a[i] = ca * to_float(p[s]); });
}

// a += ca * p
template <class T, class Isa = IsaBaseline>
FASTINT_INLINE void tile_acc1(float* __restrict a, float ca, const T* __restrict p, int64_t rows, int64_t cols,
                              int64_t rs, int64_t cs) {
  if constexpr (kVectorHalf<T, Isa>) {
    alignas(64) float v[kTile];
    tile_half_to_float<Isa>(v, p, rows, cols, rs, cs);
    return tile_acc1<float>(a, ca, v, 1, rows * cols, 0, 1);
  }
  tile_loop(rows, cols, rs, cs,
            [=](int64_t i, int64_t s) FASTINT_LAMBDA_INLINE { a[i] = a[i] + ca * to_float(p[s]); });
}

// p = a, rounded to T
template <class T, class Isa = IsaBaseline>
FASTINT_INLINE void tile_store(T* __restrict p, const float* __restrict a, int64_t rows, int64_t cols, int64_t rs,
                               int64_t cs) {
  if constexpr (kVectorHalf<T, Isa>) {
    if (cols >= kShortRun && cs == 1) {
      for (int64_t r = 0; r < rows; ++r) HalfRuns<Isa>::store(p + r * rs, a + r * cols, cols);
      return;
    }
  }
  tile_loop(rows, cols, rs, cs, [=](int64_t i, int64_t s) FASTINT_LAMBDA_INLINE { p[s] = from_float<T>(a[i]); });
}

// Instruction-set tags: how the uniforms of a run of Box-Muller pairs are made (philox.h).
struct IsaBaseline {
  static FASTINT_INLINE void pairs(float* u1, float* u2, int64_t n, uint64_t seed, uint64_t p, uint64_t step) {
    philox::pair_uniforms_run(u1, u2, n, seed, p, step);
  }
};
#if defined(FASTINT_X86) && defined(__GNUC__)
struct IsaAvx2 {
  static FASTINT_INLINE void pairs(float* u1, float* u2, int64_t n, uint64_t seed, uint64_t p, uint64_t step) {
    if (step == 1) philox::pair_uniforms_run_avx2(u1, u2, n, seed, p);
    else philox::pair_uniforms_run(u1, u2, n, seed, p, step);
  }
};
struct IsaAvx512 {
  static FASTINT_INLINE void pairs(float* u1, float* u2, int64_t n, uint64_t seed, uint64_t p, uint64_t step) {
    if (step == 1) philox::pair_uniforms_run_avx512(u1, u2, n, seed, p);
    else philox::pair_uniforms_run(u1, u2, n, seed, p, step);
  }
};
#endif

// Normals out[k] = normal c + k * step of the stream (philox.h), k < n: the cos half of pair
// (c + k step) >> 1 for an even index, the sin half for an odd one. s1 and s2 are scratch of n
// floats each. With step 1 the run covers about n / 2 consecutive pairs, each made once.
template <class Isa>
FASTINT_INLINE void normals_run(float* __restrict out, float* __restrict s1, float* __restrict s2, int64_t n,
                                uint64_t seed, uint64_t c, uint64_t step) {
  if (n <= 0) return;
  if (step == 1) {
    const uint64_t to_wrap = 0u - c;  // normals before the counter wraps to 0 (0: none)
    if (to_wrap != 0 && to_wrap < static_cast<uint64_t>(n)) {  // pair c >> 1 jumps back to 0 there: two runs
      const int64_t first = static_cast<int64_t>(to_wrap);
      normals_run<Isa>(out, s1, s2, first, seed, c, 1);
      normals_run<Isa>(out + first, s1, s2, n - first, seed, 0, 1);
      return;
    }
    const int64_t odd = static_cast<int64_t>(c & 1u);
    const int64_t np = (odd + n + 1) >> 1;  // pairs (c >> 1) .. ((c + n - 1) >> 1)
    Isa::pairs(s1, s2, np, seed, c >> 1, 1);
    philox::box_muller_run(s1, s2, np);
    // out = cos, sin of each pair in turn, from the sin half of the first pair when c is odd
    float* o = out;
    int64_t m = n;
    if (odd) {
      o[0] = s2[0];
      ++o;
      --m;
    }
    const float* a = s1 + odd;
    const float* b = s2 + odd;
    for (int64_t j = 0; j < m / 2; ++j) {
      o[2 * j] = a[j];
      o[2 * j + 1] = b[j];
    }
    if (m & 1) o[m - 1] = a[m / 2];
    return;
  }
  uint64_t last;  // c + (n - 1) step, if it does not wrap
  const bool wraps = __builtin_mul_overflow(static_cast<uint64_t>(n - 1), step, &last) ||
                     __builtin_add_overflow(c, last, &last);
  if ((step & 1u) == 0 && !wraps) {  // an even stride keeps the parity: pairs (c >> 1) + k (step / 2), one half of each
    Isa::pairs(s1, s2, n, seed, c >> 1, step >> 1);
    philox::box_muller_run(s1, s2, n);
    const float* half = (c & 1u) ? s2 : s1;
    for (int64_t k = 0; k < n; ++k) out[k] = half[k];
    return;
  }
  for (int64_t k = 0; k < n; ++k) {
    const uint64_t ck = c + static_cast<uint64_t>(k) * step;
    philox::pair_uniforms_run(s1 + k, s2 + k, 1, seed, ck >> 1, 1);
  }
  philox::box_muller_run(s1, s2, n);
  for (int64_t k = 0; k < n; ++k) {
    const uint32_t odd = 0u - static_cast<uint32_t>((c + static_cast<uint64_t>(k) * step) & 1u);
    out[k] = philox::bits_to_float((philox::float_to_bits(s2[k]) & odd) | (philox::float_to_bits(s1[k]) & ~odd));
  }
}

// Philox normals of a tile: element (r, k) has counter c0 + r * crs + k * ccs (mod 2^64).
// With `both` (dim 2) the element takes pair c: n0 = its cos half (xi_x), n1 = its sin half (xi_m);
// else n0 = normal c (xi) and n1, s are scratch (n1: a tile, s: a tile). In tile_loop's buffer
// layout ([r][k] for long runs, [k][r] for short ones), made one run of that layout at a time.
template <class Isa>
FASTINT_INLINE void tile_philox(float* __restrict n0, float* __restrict n1, float* __restrict s, bool both,
                                uint64_t seed, uint64_t c0, uint64_t crs, uint64_t ccs, int64_t rows, int64_t cols) {
  const bool by_rows = cols < kShortRun;
  const int64_t runs = by_rows ? cols : rows, len = by_rows ? rows : cols;
  const uint64_t run_step = by_rows ? ccs : crs, step = by_rows ? crs : ccs;
  if (both) {
    for (int64_t q = 0; q < runs; ++q) Isa::pairs(n0 + q * len, n1 + q * len, len, seed, c0 + q * run_step, step);
    philox::box_muller_run(n0, n1, rows * cols);
  } else {
    for (int64_t q = 0; q < runs; ++q) normals_run<Isa>(n0 + q * len, n1, s, len, seed, c0 + q * run_step, step);
  }
}

// ---------------------------------------------------------------------------------------------
// Pixel-interleaved tiles. With few channels and every operand laid out like channels_last
// (channel stride 1, the m half right after the x half, pixels back to back), a tile of `rows`
// pixels is one contiguous run of L = rows * 2C elements per operand, x and m interleaved with
// period 2C. The walk above would read it with stride 2C; instead each operand is converted into
// a float buffer with one contiguous loop, and every output element j takes its (x, m) pair
// from the buffer at j and j + C (x positions) or j - C and j (m positions), picked by a mask,
// so every loop is contiguous. Same terms in the same order as the other path: same results.

FASTINT_INLINE float select_float(uint32_t mask, float a, float b) {
  return philox::bits_to_float((philox::float_to_bits(a) & mask) | (philox::float_to_bits(b) & ~mask));
}

// v[j] = p[j], j < n (contiguous)
template <class T, class Isa = IsaBaseline>
FASTINT_INLINE void run_load(float* __restrict v, const T* __restrict p, int64_t n) {
  if constexpr (kVectorHalf<T, Isa>) {
    HalfRuns<Isa>::load(v, p, n);
  } else {
    for (int64_t j = 0; j < n; ++j) v[j] = to_float(p[j]);
  }
}

// p[j] = v[j], j < n (contiguous)
template <class T, class Isa = IsaBaseline>
FASTINT_INLINE void run_store(T* __restrict p, const float* __restrict v, int64_t n) {
  if constexpr (kVectorHalf<T, Isa>) {
    HalfRuns<Isa>::store(p, v, n);
  } else {
    for (int64_t j = 0; j < n; ++j) p[j] = from_float<T>(v[j]);
  }
}

// The Philox normals from tile_loop's short-run layout [k][r] to interleaved pixels:
// v[r * 2C + k] = nx[k * rows + r], v[r * 2C + C + k] = nm[k * rows + r].
FASTINT_INLINE void interleave_pixels(float* __restrict v, const float* __restrict nx, const float* __restrict nm,
                                      int64_t rows, int64_t C) {
  for (int64_t k = 0; k < C; ++k) {
    float* __restrict vx = v + k;
    float* __restrict vm = v + C + k;
    const float* __restrict sx = nx + k * rows;
    const float* __restrict sm = nm + k * rows;
    for (int64_t r = 0; r < rows; ++r) {
      vx[r * 2 * C] = sx[r];
      vm[r * 2 * C] = sm[r];
    }
  }
}

// One operand's term on an interleaved run: with (u, w) the (x, m) pair of position j,
//   x positions: acc + ax u + bx w   (just acc + ax u without XSecond: the noise's S00 xi_x)
//   m positions: acc + am u + bm w
// acc is not read with First. v must be readable from v - C to v + n + C (padding).
template <bool First, bool XSecond>
FASTINT_INLINE void run_pairs(float* __restrict acc, const float* __restrict v, const uint32_t* __restrict xmask,
                              int64_t n, int64_t C, float ax, float bx, float am, float bm) {
  for (int64_t j = 0; j < n; ++j) {
    const uint32_t isx = xmask[j];
    const float before = v[j - C], here = v[j], after = v[j + C];
    const float u = select_float(isx, here, before);
    const float w = select_float(isx, after, here);
    const float a = select_float(isx, ax, am);
    const float b = select_float(isx, bx, bm);
    const float r = First ? a * u : acc[j] + a * u;
    const float r2 = r + b * w;
    acc[j] = XSecond ? r2 : select_float(isx, r, r2);
  }
}

// ---------------------------------------------------------------------------------------------
// The plan of one call: iteration dims (outer to inner, at least 2) and every operand's strides.

enum class NoiseMode { kNone, kTensor, kPhilox };

struct Operand {
  const char* base = nullptr;  // x half; the m half is `moff` elements further on
  int64_t moff = 0;
  std::vector<int64_t> stride;  // in elements, per iteration dim
};

struct Plan {
  int dim = 2;
  int64_t K = 0;                 // number of eps terms
  std::vector<int64_t> size;     // iteration sizes, outer to inner
  std::vector<Operand> ops;      // 0 = out, 1 = z, 2 .. K+1 = eps, K+2 = noise (kTensor)
  std::vector<uint64_t> cstride; // Philox counter strides (logical row-major), kPhilox
  NoiseMode mode = NoiseMode::kNone;
  bool pixels = false;  // whole-run tiles may take the pixel-interleaved path (see run_pairs)
  bool unit_inner = false;  // every operand has unit stride along the innermost iteration dim
  at::ScalarType noise_dtype = at::kFloat;
  uint64_t seed = 0, offset = 0;
  float P[4] = {0, 0, 0, 0}, S[3] = {0, 0, 0};
  std::vector<float> Q;  // 4 per eps term
};

template <class T>
FASTINT_INLINE const T* cptr(const Operand& op, int64_t off) {
  return reinterpret_cast<const T*>(op.base) + off;
}

// Adds the noise tensor's term to the tile, for its own dtype.
template <class N>
FASTINT_INLINE void tile_noise_tensor(const Plan& p, float* ax, float* am, int64_t off, int64_t rows, int64_t cols) {
  const Operand& op = p.ops[p.K + 2];
  const int D = static_cast<int>(p.size.size());
  const int64_t rs = op.stride[D - 2], cs = op.stride[D - 1];
  const N* nx = cptr<N>(op, off);
  if (p.dim == 2) {
    tile_acc2<N>(ax, am, p.S[0], p.S[1], nx, rows, cols, rs, cs);
    tile_acc1<N>(am, p.S[2], nx + op.moff, rows, cols, rs, cs);
  } else {
    tile_acc1<N>(ax, p.S[0], nx, rows, cols, rs, cs);
  }
}

// ---------------------------------------------------------------------------------------------
// Direct runs. A deterministic tile (no noise, K <= 3) whose runs are unit-stride in every operand
// is done in one loop per run, the update kept in registers: no float buffers, no pass per
// operand. Same float terms in the same order as the tile passes (P z, then Q_j eps_j for
// j = 0, 1, ..., each 2x2 term as (col 0, col 1)), hence the same bits.

template <class T, int K, bool Noisy = false>
FASTINT_INLINE void direct_run2(T* __restrict ox, T* __restrict om, const T* __restrict x, const T* __restrict m,
                                const T* __restrict e0x, const T* __restrict e0m, const T* __restrict e1x,
                                const T* __restrict e1m, const T* __restrict e2x, const T* __restrict e2m,
                                const float* P, const float* Q, int64_t n, const float* S = nullptr,
                                const float* __restrict nx = nullptr, const float* __restrict nm = nullptr) {
  const float p0 = P[0], p1 = P[1], p2 = P[2], p3 = P[3];
  const float s0 = Noisy ? S[0] : 0.f, s1 = Noisy ? S[1] : 0.f, s2 = Noisy ? S[2] : 0.f;
  const float a0 = Q[0], a1 = Q[1], a2 = Q[2], a3 = Q[3];
  const float b0 = K > 1 ? Q[4] : 0.f, b1 = K > 1 ? Q[5] : 0.f, b2 = K > 1 ? Q[6] : 0.f, b3 = K > 1 ? Q[7] : 0.f;
  const float c0 = K > 2 ? Q[8] : 0.f, c1 = K > 2 ? Q[9] : 0.f, c2 = K > 2 ? Q[10] : 0.f, c3 = K > 2 ? Q[11] : 0.f;
  for (int64_t k = 0; k < n; ++k) {
    const float xv = to_float(x[k]), mv = to_float(m[k]);
    float u = p0 * xv, w = p2 * xv;
    u = u + p1 * mv;
    w = w + p3 * mv;
    {
      const float ex = to_float(e0x[k]), em = to_float(e0m[k]);
      u = u + a0 * ex;
      w = w + a2 * ex;
      u = u + a1 * em;
      w = w + a3 * em;
    }
    if constexpr (K > 1) {
      const float ex = to_float(e1x[k]), em = to_float(e1m[k]);
      u = u + b0 * ex;
      w = w + b2 * ex;
      u = u + b1 * em;
      w = w + b3 * em;
    }
    if constexpr (K > 2) {
      const float ex = to_float(e2x[k]), em = to_float(e2m[k]);
      u = u + c0 * ex;
      w = w + c2 * ex;
      u = u + c1 * em;
      w = w + c3 * em;
    }
    if constexpr (Noisy) {
      u = u + s0 * nx[k];
      w = w + s1 * nx[k];
      w = w + s2 * nm[k];
    }
    ox[k] = from_float<T>(u);
    om[k] = from_float<T>(w);
  }
}

template <class T, int K, bool Noisy = false>
FASTINT_INLINE void direct_run1(T* __restrict ox, const T* __restrict x, const T* __restrict e0,
                                const T* __restrict e1, const T* __restrict e2, const float* P, const float* Q,
                                int64_t n, const float* S = nullptr, const float* __restrict nx = nullptr) {
  const float p0 = P[0], a0 = Q[0], b0 = K > 1 ? Q[4] : 0.f, c0 = K > 2 ? Q[8] : 0.f, s0 = Noisy ? S[0] : 0.f;
  for (int64_t k = 0; k < n; ++k) {
    float u = p0 * to_float(x[k]);
    u = u + a0 * to_float(e0[k]);
    if constexpr (K > 1) u = u + b0 * to_float(e1[k]);
    if constexpr (K > 2) u = u + c0 * to_float(e2[k]);
    if constexpr (Noisy) u = u + s0 * nx[k];
    ox[k] = from_float<T>(u);
  }
}

// float16 direct runs in a build with vector conversions (in: x, m, then each eps's x and m; dim 1:
// x, then each eps). AVX-512 keeps 16 lanes in registers: the same float32 products and sums as
// direct_run2 / direct_run1, lane by lane (vmulps, vaddps: no FMA), the last < 16 lanes masked.
// AVX2 converts the run in blocks of kBlock elements into float buffers, runs direct_run2 /
// direct_run1 on them and converts the result back. Same terms, same order, same bits either way.
#if defined(FASTINT_X86) && defined(__GNUC__)
// The lanes of p under mask m as float (zero elsewhere), and back, rounded to float16 (m's lanes only).
FASTINT_TARGET_AVX512_F16C inline __m512 half_load16(const c10::Half* p, __mmask16 m) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p));
}
FASTINT_TARGET_AVX512_F16C inline void half_store16(c10::Half* p, __m512 v, __mmask16 m) {
  _mm256_mask_storeu_epi16(p, m, _mm512_cvtps_ph(v, kRoundNearest));
}
// u + c * e
FASTINT_TARGET_AVX512_F16C inline __m512 add_mul16(__m512 u, __m512 c, __m512 e) {
  return _mm512_add_ps(u, _mm512_mul_ps(c, e));
}

template <int K, bool Noisy>
FASTINT_TARGET_AVX512_F16C inline void direct_run2_half_avx512(c10::Half* ox, c10::Half* om,
                                                               const c10::Half* const* in, const float* P,
                                                               const float* Q, int64_t n, const float* S,
                                                               const float* nx, const float* nm) {
  __m512 p[4], q[4 * K];  // broadcast once: the stores may alias anything, P and Q would be re-read
  for (int i = 0; i < 4; ++i) p[i] = _mm512_set1_ps(P[i]);
  for (int i = 0; i < 4 * K; ++i) q[i] = _mm512_set1_ps(Q[i]);
  for (int64_t k = 0; k < n; k += 16) {
    const __mmask16 m = n - k >= 16 ? __mmask16(0xffff) : static_cast<__mmask16>((1u << (n - k)) - 1u);
    const __m512 xv = half_load16(in[0] + k, m), mv = half_load16(in[1] + k, m);
    __m512 u = _mm512_mul_ps(p[0], xv), w = _mm512_mul_ps(p[2], xv);
    u = add_mul16(u, p[1], mv);
    w = add_mul16(w, p[3], mv);
    for (int j = 0; j < K; ++j) {
      const __m512 ex = half_load16(in[2 + 2 * j] + k, m), em = half_load16(in[3 + 2 * j] + k, m);
      u = add_mul16(u, q[4 * j], ex);
      w = add_mul16(w, q[4 * j + 2], ex);
      u = add_mul16(u, q[4 * j + 1], em);
      w = add_mul16(w, q[4 * j + 3], em);
    }
    if constexpr (Noisy) {
      const __m512 xi = _mm512_maskz_loadu_ps(m, nx + k), xm = _mm512_maskz_loadu_ps(m, nm + k);
      u = add_mul16(u, _mm512_set1_ps(S[0]), xi);
      w = add_mul16(w, _mm512_set1_ps(S[1]), xi);
      w = add_mul16(w, _mm512_set1_ps(S[2]), xm);
    }
    half_store16(ox + k, u, m);
    half_store16(om + k, w, m);
  }
}

template <int K, bool Noisy>
FASTINT_TARGET_AVX512_F16C inline void direct_run1_half_avx512(c10::Half* ox, const c10::Half* const* in,
                                                               const float* P, const float* Q, int64_t n,
                                                               const float* S, const float* nx) {
  const __m512 p0 = _mm512_set1_ps(P[0]);
  __m512 q[K];
  for (int j = 0; j < K; ++j) q[j] = _mm512_set1_ps(Q[4 * j]);
  for (int64_t k = 0; k < n; k += 16) {
    const __mmask16 m = n - k >= 16 ? __mmask16(0xffff) : static_cast<__mmask16>((1u << (n - k)) - 1u);
    __m512 u = _mm512_mul_ps(p0, half_load16(in[0] + k, m));
    for (int j = 0; j < K; ++j) u = add_mul16(u, q[j], half_load16(in[1 + j] + k, m));
    if constexpr (Noisy) u = add_mul16(u, _mm512_set1_ps(S[0]), _mm512_maskz_loadu_ps(m, nx + k));
    half_store16(ox + k, u, m);
  }
}
#endif

constexpr int64_t kBlock = 256;

template <class Isa, int K, bool Noisy>
FASTINT_INLINE void direct_run2_half(c10::Half* ox, c10::Half* om, const c10::Half* const* in, const float* P,
                                     const float* Q, int64_t n, const float* S, const float* nx, const float* nm) {
#if defined(FASTINT_X86) && defined(__GNUC__)
  if constexpr (std::is_same<Isa, IsaAvx512>::value) {
    direct_run2_half_avx512<K, Noisy>(ox, om, in, P, Q, n, S, nx, nm);
    return;
  }
#endif
  constexpr int kIn = 2 + 2 * K;
  alignas(64) float v[kIn][kBlock], o[2][kBlock];
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t len = std::min(kBlock, n - b);
    for (int s = 0; s < kIn; ++s) HalfRuns<Isa>::load(v[s], in[s] + b, len);
    direct_run2<float, K, Noisy>(o[0], o[1], v[0], v[1], v[2], v[3], v[K > 1 ? 4 : 2], v[K > 1 ? 5 : 2],
                                 v[K > 2 ? 6 : 2], v[K > 2 ? 7 : 2], P, Q, len, S, nx + b, nm + b);
    HalfRuns<Isa>::store(ox + b, o[0], len);
    HalfRuns<Isa>::store(om + b, o[1], len);
  }
}

template <class Isa, int K, bool Noisy>
FASTINT_INLINE void direct_run1_half(c10::Half* ox, const c10::Half* const* in, const float* P, const float* Q,
                                     int64_t n, const float* S, const float* nx) {
#if defined(FASTINT_X86) && defined(__GNUC__)
  if constexpr (std::is_same<Isa, IsaAvx512>::value) {
    direct_run1_half_avx512<K, Noisy>(ox, in, P, Q, n, S, nx);
    return;
  }
#endif
  constexpr int kIn = 1 + K;
  alignas(64) float v[kIn][kBlock], o[kBlock];
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t len = std::min(kBlock, n - b);
    for (int s = 0; s < kIn; ++s) HalfRuns<Isa>::load(v[s], in[s] + b, len);
    direct_run1<float, K, Noisy>(o, v[0], v[1], v[K > 1 ? 2 : 1], v[K > 2 ? 3 : 1], P, Q, len, S, nx + b);
    HalfRuns<Isa>::store(ox + b, o, len);
  }
}

// Prefetches the tile's operands (rows runs of cols unit-stride elements at offsets `off`) into
// L2, the output for writing: a Philox tile computes its normals first, long enough for the loads
// to arrive, so the memory time hides behind the noise instead of following it.
template <class T>
FASTINT_INLINE void prefetch_tile(const Plan& p, const int64_t* off, int64_t rows, int64_t cols) {
  const int D = static_cast<int>(p.size.size());
  const int64_t bytes = cols * static_cast<int64_t>(sizeof(T));
  for (int64_t o = 0; o < 2 + p.K; ++o) {
    const Operand& op = p.ops[o];
    for (int64_t r = 0; r < rows; ++r) {
      const char* x = reinterpret_cast<const char*>(cptr<T>(op, off[o] + r * op.stride[D - 2]));
      for (int h = 0; h < p.dim; ++h, x += op.moff * static_cast<int64_t>(sizeof(T))) {
        for (int64_t b = 0; b < bytes; b += 64) {
          if (o == 0) __builtin_prefetch(x + b, 1, 2);
          else __builtin_prefetch(x + b, 0, 2);
        }
      }
    }
  }
}

// The tile (rows runs of cols elements) at offsets `off`, by direct runs; with Noisy, plus S xi
// from the normals nx, nm in buffer layout (row r at r * cols), added last as in the tile passes.
template <class T, int K, class Isa, bool Noisy = false>
FASTINT_INLINE void direct_tile(const Plan& p, const int64_t* off, int64_t rows, int64_t cols,
                                const float* nx = nullptr, const float* nm = nullptr) {
  const int D = static_cast<int>(p.size.size());
  const float* S = p.S;
  for (int64_t r = 0; r < rows; ++r) {
    const float* rx = Noisy ? nx + r * cols : nullptr;
    const float* rm = Noisy ? nm + r * cols : nullptr;
    const T* in[2 + 3] = {nullptr, nullptr, nullptr, nullptr, nullptr};
    for (int64_t o = 1; o < 2 + K; ++o) in[o] = cptr<T>(p.ops[o], off[o] + r * p.ops[o].stride[D - 2]);
    T* out = const_cast<T*>(cptr<T>(p.ops[0], off[0] + r * p.ops[0].stride[D - 2]));
    if (p.dim == 2) {
      const int64_t zm = p.ops[1].moff, om = p.ops[0].moff;
      const int64_t m2 = p.ops[2].moff, m3 = K > 1 ? p.ops[3].moff : 0, m4 = K > 2 ? p.ops[4].moff : 0;
      if constexpr (kVectorHalf<T, Isa>) {
        const T* const h[8] = {in[1], in[1] + zm, in[2], in[2] + m2, in[3], in[3] + m3, in[4], in[4] + m4};
        direct_run2_half<Isa, K, Noisy>(out, out + om, h, p.P, p.Q.data(), cols, S, rx, rm);
      } else {
        direct_run2<T, K, Noisy>(out, out + om, in[1], in[1] + zm, in[2], in[2] + m2, K > 1 ? in[3] : in[2],
                                 K > 1 ? in[3] + m3 : in[2], K > 2 ? in[4] : in[2], K > 2 ? in[4] + m4 : in[2],
                                 p.P, p.Q.data(), cols, S, rx, rm);
      }
    } else if constexpr (kVectorHalf<T, Isa>) {
      direct_run1_half<Isa, K, Noisy>(out, in + 1, p.P, p.Q.data(), cols, S, rx);
    } else {
      direct_run1<T, K, Noisy>(out, in[1], in[2], K > 1 ? in[3] : in[2], K > 2 ? in[4] : in[2], p.P, p.Q.data(),
                               cols, S, rx);
    }
  }
}

// Processes iteration elements [begin, end) (linear index over `size`, row-major).
template <class T, class Isa>
FASTINT_INLINE void run_range(const Plan& p, int64_t begin, int64_t end) {
  // ax and am are adjacent: the pixel path uses them as one accumulator of 2 * kTile.
  alignas(64) float acc[2 * kTile], nx[kTile], nm[kTile], ns[kTile];
  float* const ax = acc;
  float* const am = acc + kTile;
  const int D = static_cast<int>(p.size.size());
  const int64_t nops = static_cast<int64_t>(p.ops.size());
  const int64_t n1 = p.size[D - 1], n2 = p.size[D - 2];
  // Pixel path: a padded operand buffer and the x-position mask (period 2 * n1).
  constexpr int64_t kPad = kShortRun;
  std::vector<float> vbuf;
  std::vector<uint32_t> xmask;
  if (p.pixels) {
    vbuf.assign(2 * kTile + 2 * kPad, 0.0f);
    xmask.resize(2 * kTile);
    for (int64_t j = 0, t = 0; j < 2 * kTile; ++j, t = (t + 1 == 2 * n1) ? 0 : t + 1) xmask[j] = t < n1 ? ~0u : 0u;
  }
  std::vector<int64_t> idx(D), off(nops);
  {
    int64_t rest = begin;
    for (int d = D - 1; d >= 0; --d) {
      idx[d] = rest % p.size[d];
      rest /= p.size[d];
    }
  }
  int64_t pos = begin;
  // Direct tiles use no buffers, so they may be longer (fewer per-tile set-ups); a tile that
  // is not direct (its runs shorter than kShortRun) stays within kTile.
  const bool runs_ok = p.unit_inner && p.K <= 3;  // unit-stride runs, at most 3 eps: direct runs apply
  const bool direct_ok = p.mode == NoiseMode::kNone && runs_ok;
  // The Philox counter of the tile's first element (idx): offset + its logical index.
  auto tile_counter = [&]() {
    uint64_t c = p.offset;
    for (int d = 0; d < D; ++d) c += static_cast<uint64_t>(idx[d]) * p.cstride[d];
    return c;
  };
  const int64_t limit = direct_ok && n1 >= kShortRun ? kDirectTile : kTile;
  while (pos < end) {
    // A tile: whole runs (rows) when they fit, else a piece of one run.
    int64_t rows = 1, cols;
    if (idx[D - 1] == 0 && n1 <= limit && end - pos >= n1) {
      cols = n1;
      rows = std::min({limit / n1, n2 - idx[D - 2], (end - pos) / n1});
    } else {
      cols = std::min({n1 - idx[D - 1], end - pos, limit});
    }
    for (int64_t o = 0; o < nops; ++o) {
      int64_t s = 0;
      for (int d = 0; d < D; ++d) s += idx[d] * p.ops[o].stride[d];
      off[o] = s;
    }
    const Operand& out = p.ops[0];
    const Operand& z = p.ops[1];
    const int64_t zrs = z.stride[D - 2], zcs = z.stride[D - 1];
    const T* zx = cptr<T>(z, off[1]);
    // Philox tiles of long unit-stride runs: the normals into nx (nm), then direct runs with S xi
    // added last, as the tile passes add it (same bits, no accumulator passes).
    const bool noisy_direct = p.mode == NoiseMode::kPhilox && runs_ok && cols >= kShortRun;
    const bool direct = (direct_ok && cols >= kShortRun) || noisy_direct;
    if (noisy_direct) {
      prefetch_tile<T>(p, off.data(), rows, cols);
      tile_philox<Isa>(nx, nm, ns, p.dim == 2, p.seed, tile_counter(), p.cstride[D - 2], p.cstride[D - 1], rows,
                       cols);
      if (p.K == 1) direct_tile<T, 1, Isa, true>(p, off.data(), rows, cols, nx, nm);
      else if (p.K == 2) direct_tile<T, 2, Isa, true>(p, off.data(), rows, cols, nx, nm);
      else direct_tile<T, 3, Isa, true>(p, off.data(), rows, cols, nx, nm);
    } else if (direct) {
      if (p.K == 1) direct_tile<T, 1, Isa>(p, off.data(), rows, cols);
      else if (p.K == 2) direct_tile<T, 2, Isa>(p, off.data(), rows, cols);
      else direct_tile<T, 3, Isa>(p, off.data(), rows, cols);
    } else if (p.pixels && cols == n1) {
      const int64_t L = rows * 2 * n1;
      float* v = vbuf.data() + kPad;
      run_load<T, Isa>(v, zx, L);
      run_pairs<true, true>(acc, v, xmask.data(), L, n1, p.P[0], p.P[1], p.P[2], p.P[3]);
      for (int64_t j = 0; j < p.K; ++j) {
        const float* q = &p.Q[4 * j];
        run_load<T, Isa>(v, cptr<T>(p.ops[2 + j], off[2 + j]), L);
        run_pairs<false, true>(acc, v, xmask.data(), L, n1, q[0], q[1], q[2], q[3]);
      }
      bool noisy = true;
      if (p.mode == NoiseMode::kPhilox) {
        tile_philox<Isa>(nx, nm, ns, true, p.seed, tile_counter(), p.cstride[D - 2], p.cstride[D - 1], rows, cols);
        interleave_pixels(v, nx, nm, rows, n1);
      } else if (p.mode == NoiseMode::kTensor) {
        const Operand& o = p.ops[p.K + 2];
        switch (p.noise_dtype) {
          case at::kFloat: run_load<float>(v, cptr<float>(o, off[p.K + 2]), L); break;
          case at::kDouble: run_load<double>(v, cptr<double>(o, off[p.K + 2]), L); break;
          case at::kHalf: run_load<c10::Half>(v, cptr<c10::Half>(o, off[p.K + 2]), L); break;
          default: run_load<c10::BFloat16>(v, cptr<c10::BFloat16>(o, off[p.K + 2]), L); break;
        }
      } else {
        noisy = false;
      }
      if (noisy) run_pairs<false, false>(acc, v, xmask.data(), L, n1, p.S[0], 0.0f, p.S[1], p.S[2]);
      run_store<T, Isa>(const_cast<T*>(cptr<T>(out, off[0])), acc, L);
    } else if (p.dim == 2) {
      tile_mul2<T, Isa>(ax, am, p.P[0], p.P[2], zx, rows, cols, zrs, zcs);
      tile_acc2<T, Isa>(ax, am, p.P[1], p.P[3], zx + z.moff, rows, cols, zrs, zcs);
      for (int64_t j = 0; j < p.K; ++j) {
        const Operand& e = p.ops[2 + j];
        const int64_t rs = e.stride[D - 2], cs = e.stride[D - 1];
        const T* ex = cptr<T>(e, off[2 + j]);
        const float* q = &p.Q[4 * j];
        tile_acc2<T, Isa>(ax, am, q[0], q[2], ex, rows, cols, rs, cs);
        tile_acc2<T, Isa>(ax, am, q[1], q[3], ex + e.moff, rows, cols, rs, cs);
      }
    } else {
      tile_mul1<T, Isa>(ax, p.P[0], zx, rows, cols, zrs, zcs);
      for (int64_t j = 0; j < p.K; ++j) {
        const Operand& e = p.ops[2 + j];
        tile_acc1<T, Isa>(ax, p.Q[4 * j], cptr<T>(e, off[2 + j]), rows, cols, e.stride[D - 2], e.stride[D - 1]);
      }
    }
    if (direct || (p.pixels && cols == n1)) {
      // done above
    } else if (p.mode == NoiseMode::kPhilox) {
      tile_philox<Isa>(nx, nm, ns, p.dim == 2, p.seed, tile_counter(), p.cstride[D - 2], p.cstride[D - 1], rows,
                       cols);
      // The normals are already in buffer layout: add them as one dense run.
      const int64_t n = rows * cols;
      if (p.dim == 2) {
        tile_acc2<float>(ax, am, p.S[0], p.S[1], nx, 1, n, 0, 1);
        tile_acc1<float>(am, p.S[2], nm, 1, n, 0, 1);
      } else {
        tile_acc1<float>(ax, p.S[0], nx, 1, n, 0, 1);
      }
    } else if (p.mode == NoiseMode::kTensor) {
      const int64_t o = off[p.K + 2];
      switch (p.noise_dtype) {
        case at::kFloat: tile_noise_tensor<float>(p, ax, am, o, rows, cols); break;
        case at::kDouble: tile_noise_tensor<double>(p, ax, am, o, rows, cols); break;
        case at::kHalf: tile_noise_tensor<c10::Half>(p, ax, am, o, rows, cols); break;
        default: tile_noise_tensor<c10::BFloat16>(p, ax, am, o, rows, cols); break;
      }
    }
    if (!direct && !(p.pixels && cols == n1)) {
      T* ox = const_cast<T*>(cptr<T>(out, off[0]));
      const int64_t ors = out.stride[D - 2], ocs = out.stride[D - 1];
      tile_store<T, Isa>(ox, ax, rows, cols, ors, ocs);
      if (p.dim == 2) tile_store<T, Isa>(ox + out.moff, am, rows, cols, ors, ocs);
    }

    // Advance the multi-index.
    pos += rows * cols;
    int d;
    if (rows > 1 || cols == n1) {
      d = D - 2;
      idx[d] += rows;
    } else {
      d = D - 1;
      idx[d] += cols;
    }
    while (d > 0 && idx[d] >= p.size[d]) {
      idx[d] -= p.size[d];
      ++idx[--d];
    }
  }
}

// The same body compiled for each instruction set: inlined into a function with a target
// attribute, its loops are vectorised for that target.
template <class T>
void run_baseline(const Plan& p, int64_t b, int64_t e) {
  run_range<T, IsaBaseline>(p, b, e);
}
#if defined(FASTINT_X86) && defined(__GNUC__)
template <class T>
FASTINT_TARGET_AVX2_F16C void run_avx2(const Plan& p, int64_t b, int64_t e) {
  run_range<T, IsaAvx2>(p, b, e);
}
template <class T>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,f16c,prefer-vector-width=512"))) void run_avx512(
    const Plan& p, int64_t b, int64_t e) {
  run_range<T, IsaAvx512>(p, b, e);
}
#endif

using RangeFn = void (*)(const Plan&, int64_t, int64_t);

// The build for torch's CPU capability (DEFAULT / AVX2 / AVX512; it honours ATEN_CPU_CAPABILITY),
// capped by what this CPU really supports (the AVX2 and AVX-512 builds also use F16C).
template <class T>
RangeFn pick_kernel() {
#if defined(FASTINT_X86) && defined(__GNUC__)
  static const int level = [] {
    const std::string cap = at::get_cpu_capability();
    __builtin_cpu_init();
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
    const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
    if (cap == "AVX512" && avx512) return 2;
    if ((cap == "AVX512" || cap == "AVX2") && avx2) return 1;
    return 0;
  }();
  if (level == 2) return &run_avx512<T>;
  if (level == 1) return &run_avx2<T>;
#endif
  return &run_baseline<T>;
}

template <class T>
void run(const Plan& p, int64_t numel) {
  const RangeFn fn = pick_kernel<T>();
  at::parallel_for(0, numel, kGrain, [&](int64_t b, int64_t e) { fn(p, b, e); });
}

// ---------------------------------------------------------------------------------------------
// Validation.

std::string shape_str(at::IntArrayRef s) {
  std::string r = "[";
  for (size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
  return r + "]";
}

bool is_storage_dtype(at::ScalarType t) { return t == at::kFloat || t == at::kHalf || t == at::kBFloat16; }

void check_operand(const at::Tensor& t, const at::Tensor& z, const std::string& name) {
  TORCH_CHECK_VALUE(t.device() == z.device(), "fastint::step: ", name, " must be on z's device (", z.device(),
                    "), got ", t.device());
  TORCH_CHECK_VALUE(t.sizes() == z.sizes(), "fastint::step: ", name, " must have z's shape ", shape_str(z.sizes()),
                    ", got ", shape_str(t.sizes()));
}

// Checks the arguments of fastint::step (and of step_out, but for out).
void check_args(const at::Tensor& z, at::TensorList eps, const at::Tensor& coef, int64_t step,
                int64_t dim, const std::optional<at::Tensor>& noise, std::optional<int64_t> seed,
                const std::optional<at::Tensor>& seed_tensor) {
  // ---- arguments
  TORCH_CHECK_TYPE(is_storage_dtype(z.scalar_type()),
                   "fastint::step: z must be float32, float16 or bfloat16, got ", z.scalar_type());
  TORCH_CHECK_VALUE(z.device().is_cpu(), "fastint::step (CPU kernel): z must be a CPU tensor, got ", z.device());
  TORCH_CHECK_VALUE(dim == 1 || dim == 2, "fastint::step: dim must be 1 (state x) or 2 (state (x, m)), got ", dim);
  TORCH_CHECK_VALUE(z.dim() >= 2, "fastint::step: z must have at least 2 dims [B, dim*C, ...], got shape ",
                    shape_str(z.sizes()));
  TORCH_CHECK_VALUE(dim == 1 || z.size(1) % 2 == 0,
                    "fastint::step: z must have an even channel count for dim=2 (x and m halves), got z.size(1) = ",
                    z.size(1));
  const int64_t K = static_cast<int64_t>(eps.size());
  TORCH_CHECK_VALUE(K >= 1, "fastint::step: eps must hold at least one tensor (eps[0] = newest model output), got []");
  for (int64_t j = 0; j < K; ++j) {
    const std::string name = "eps[" + std::to_string(j) + "]";
    TORCH_CHECK_TYPE(eps[j].scalar_type() == z.scalar_type(), "fastint::step: ", name, " must have z's dtype ",
                     z.scalar_type(), ", got ", eps[j].scalar_type());
    check_operand(eps[j], z, name);
  }
  TORCH_CHECK_TYPE(coef.scalar_type() == at::kFloat, "fastint::step: coef must be float32, got ", coef.scalar_type());
  TORCH_CHECK_VALUE(coef.device() == z.device(), "fastint::step: coef must be on z's device (", z.device(), "), got ",
                    coef.device());
  TORCH_CHECK_VALUE(coef.dim() == 2, "fastint::step: coef must be 2-D [R, W], got shape ", shape_str(coef.sizes()));
  TORCH_CHECK_VALUE(coef.is_contiguous(), "fastint::step: coef must be contiguous");
  TORCH_CHECK_VALUE(coef.size(1) >= 7 + 4 * K, "fastint::step: coef must have W >= 7 + 4*len(eps) = ", 7 + 4 * K,
                    " columns, got ", coef.size(1));
  TORCH_CHECK_VALUE(step >= 0 && step < coef.size(0), "fastint::step: step must be in [0, ", coef.size(0),
                    ") (rows of coef), got ", step);
  const bool use_noise = noise.has_value() && noise->defined();
  if (use_noise) {
    TORCH_CHECK_TYPE(at::isFloatingType(noise->scalar_type()), "fastint::step: noise must be a floating-point tensor, got ",
                     noise->scalar_type());
    check_operand(*noise, z, "noise");
  } else if (seed.has_value()) {
    TORCH_CHECK_VALUE(*seed >= 0, "fastint::step: seed must be a non-negative integer, got ", *seed);
  }
  const bool use_key = seed_tensor.has_value() && seed_tensor->defined();
  if (use_key) {
    TORCH_CHECK_TYPE(seed_tensor->scalar_type() == at::kLong, "fastint::step: seed_tensor must be int64, got ",
                     seed_tensor->scalar_type());
    TORCH_CHECK_VALUE(seed_tensor->numel() == 1, "fastint::step: seed_tensor must hold one element, got shape ",
                      shape_str(seed_tensor->sizes()));
    TORCH_CHECK_VALUE(seed_tensor->device() == z.device(), "fastint::step: seed_tensor must be on z's device (",
                      z.device(), "), got ", seed_tensor->device());
  }

}

// Writes the update into `out` (z's shape, dtype and device; checked by the callers).
void step_into(const at::Tensor& out, const at::Tensor& z, at::TensorList eps, const at::Tensor& coef, int64_t step,
               int64_t dim, const std::optional<at::Tensor>& noise, std::optional<int64_t> seed, int64_t offset,
               const std::optional<at::Tensor>& seed_tensor) {
  if (z.numel() == 0) return;
  const int64_t K = static_cast<int64_t>(eps.size());
  const bool use_noise = noise.has_value() && noise->defined();
  const bool use_key = seed_tensor.has_value() && seed_tensor->defined();
  at::Tensor xi;  // the noise tensor as read: float32/64, float16 or bfloat16
  if (use_noise) {
    const at::ScalarType nt = noise->scalar_type();
    const bool direct = nt == at::kFloat || nt == at::kDouble || nt == at::kHalf || nt == at::kBFloat16;
    xi = direct ? *noise : noise->to(at::kFloat);  // rare dtypes (float8): one float32 copy
  }

  // ---- coefficients: row `step`, read once
  Plan p;
  p.dim = static_cast<int>(dim);
  p.K = K;
  {
    const float* c = coef.data_ptr<float>() + step * coef.stride(0);
    const int64_t cs = coef.stride(1);
    for (int i = 0; i < 4; ++i) p.P[i] = c[i * cs];
    for (int i = 0; i < 3; ++i) p.S[i] = c[(4 + i) * cs];
    p.Q.resize(4 * K);
    for (int64_t i = 0; i < 4 * K; ++i) p.Q[i] = c[(7 + i) * cs];
  }
  // Noise source, first given wins: the noise tensor, Philox keyed by seed_tensor, by seed.
  p.mode = use_noise ? NoiseMode::kTensor : (use_key || seed.has_value() ? NoiseMode::kPhilox : NoiseMode::kNone);
  if (use_noise) p.noise_dtype = xi.scalar_type();
  if (use_key) p.seed = static_cast<uint64_t>(*seed_tensor->const_data_ptr<int64_t>());  // CPU: no sync
  else if (seed.has_value()) p.seed = static_cast<uint64_t>(*seed);
  p.offset = static_cast<uint64_t>(offset);

  // ---- iteration space: the x-part [B, C, *S]
  const int64_t r = z.dim();
  std::vector<int64_t> xsize(z.sizes().begin(), z.sizes().end());
  if (dim == 2) xsize[1] /= 2;
  std::vector<const at::Tensor*> tensors = {&out, &z};
  for (int64_t j = 0; j < K; ++j) tensors.push_back(&eps[j]);
  if (use_noise) tensors.push_back(&xi);
  std::vector<uint64_t> logical(r);  // row-major strides of the x-part
  {
    uint64_t s = 1;
    for (int64_t d = r - 1; d >= 0; --d) {
      logical[d] = s;
      s *= static_cast<uint64_t>(xsize[d]);
    }
  }
  // Dims of size > 1, ordered by the output's strides (outermost first; ties keep logical order).
  // The channel dim stays for dim 2 even with C = 1 (z.size(1) = 2 gives it real strides): then
  // x and m still form interleaved pixels ([N, 2] states, one-channel channels_last images).
  std::vector<int64_t> order;
  for (int64_t d = 0; d < r; ++d)
    if (xsize[d] > 1 || (dim == 2 && d == 1)) order.push_back(d);
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return out.stride(a) > out.stride(b); });
  // Merge an outer dim into the next inner one when every operand (and the counter) allows.
  const bool philox_on = p.mode == NoiseMode::kPhilox;
  std::vector<std::vector<int64_t>> groups;  // each: logical dims, outer to inner
  for (int64_t d : order) {
    if (!groups.empty()) {
      const int64_t prev = groups.back().back();
      bool ok = true;
      for (const at::Tensor* t : tensors) ok = ok && t->stride(prev) == t->stride(d) * xsize[d];
      if (philox_on) ok = ok && logical[prev] == logical[d] * static_cast<uint64_t>(xsize[d]);
      if (ok) {
        groups.back().push_back(d);
        continue;
      }
    }
    groups.push_back({d});
  }
  while (groups.size() < 2) groups.insert(groups.begin(), std::vector<int64_t>{});  // at least 2 dims
  const int D = static_cast<int>(groups.size());
  p.size.assign(D, 1);
  for (int g = 0; g < D; ++g)
    for (int64_t d : groups[g]) p.size[g] *= xsize[d];
  // A merged dim's stride is that of its innermost member; an empty (padding) dim has stride 0.
  auto inner = [&](int g) { return groups[g].empty() ? int64_t(-1) : groups[g].back(); };
  for (const at::Tensor* t : tensors) {
    Operand op;
    op.base = static_cast<const char*>(t->data_ptr());
    op.moff = dim == 2 ? xsize[1] * t->stride(1) : 0;
    op.stride.resize(D);
    for (int g = 0; g < D; ++g) op.stride[g] = inner(g) < 0 ? 0 : t->stride(inner(g));
    p.ops.push_back(std::move(op));
  }
  {
    const int64_t C1 = p.size[D - 1];
    bool pix = dim == 2 && C1 < kShortRun;
    for (const Operand& op : p.ops)
      pix = pix && op.stride[D - 1] == 1 && op.moff == C1 && op.stride[D - 2] == 2 * C1;
    p.pixels = pix;
    bool unit = true;
    for (const Operand& op : p.ops) unit = unit && op.stride[D - 1] == 1;
    p.unit_inner = unit;
  }
  if (philox_on) {
    p.cstride.resize(D);
    for (int g = 0; g < D; ++g) p.cstride[g] = inner(g) < 0 ? 0 : logical[inner(g)];
  }

  const int64_t numel = z.numel() / (dim == 2 ? 2 : 1);
  switch (z.scalar_type()) {
    case at::kFloat: run<float>(p, numel); break;
    case at::kHalf: run<c10::Half>(p, numel); break;
    default: run<c10::BFloat16>(p, numel); break;
  }
}

// ValueError if `out` shares memory with `t`. (Even out == t exactly is refused: the kernels read
// through __restrict pointers, so the compiler may reload an input after a store.)
void check_out_alias(const at::Tensor& out, const at::Tensor& t, const std::string& name) {
  if (out.numel() == 0 || !out.storage().is_alias_of(t.storage())) return;
  auto range = [](const at::Tensor& a) {
    const char* b = static_cast<const char*>(a.data_ptr());
    int64_t lo = 0, hi = 0;
    for (int64_t d = 0; d < a.dim(); ++d) {
      const int64_t ext = (a.size(d) - 1) * a.stride(d);
      (ext < 0 ? lo : hi) += ext;
    }
    return std::make_pair(b + lo * a.element_size(), b + (hi + 1) * a.element_size());
  };
  const auto ro = range(out), rt = range(t);
  TORCH_CHECK_VALUE(ro.second <= rt.first || rt.second <= ro.first, "fastint::step_out: out must not overlap ",
                    name, " (write into a separate buffer)");
}

}  // namespace

at::Tensor step_cpu(const at::Tensor& z, at::TensorList eps, const at::Tensor& coef, int64_t step, int64_t dim,
                    const std::optional<at::Tensor>& noise, std::optional<int64_t> seed, int64_t offset,
                    const std::optional<at::Tensor>& seed_tensor) {
  check_args(z, eps, coef, step, dim, noise, seed, seed_tensor);
  at::Tensor out = at::empty_like(z);
  step_into(out, z, eps, coef, step, dim, noise, seed, offset, seed_tensor);
  return out;
}

void step_out_cpu(const at::Tensor& z, at::TensorList eps, const at::Tensor& coef, int64_t step, int64_t dim,
                  const at::Tensor& out, const std::optional<at::Tensor>& noise, std::optional<int64_t> seed,
                  int64_t offset, const std::optional<at::Tensor>& seed_tensor) {
  check_args(z, eps, coef, step, dim, noise, seed, seed_tensor);
  TORCH_CHECK_TYPE(out.scalar_type() == z.scalar_type(), "fastint::step_out: out must have z's dtype ",
                   z.scalar_type(), ", got ", out.scalar_type());
  check_operand(out, z, "out");
  TORCH_CHECK_VALUE(at::has_internal_overlap(out) != at::MemOverlap::Yes,
                    "fastint::step_out: out has overlapping elements (e.g. an expanded tensor)");
  check_out_alias(out, z, "z");
  for (size_t j = 0; j < eps.size(); ++j) check_out_alias(out, eps[j], "eps[" + std::to_string(j) + "]");
  if (noise.has_value() && noise->defined()) check_out_alias(out, *noise, "noise");
  step_into(out, z, eps, coef, step, dim, noise, seed, offset, seed_tensor);
}

}  // namespace fastint

TORCH_LIBRARY_IMPL(fastint, CPU, m) {
  m.impl("step", &fastint::step_cpu);
  m.impl("step_out", &fastint::step_out_cpu);
}
