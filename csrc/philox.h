// Counter-based normal noise for the fused step op (docs/design.md, "The op"), bit-compatible with Triton.
//
//   words  : Philox4x32-10 of counter (lo32(c), hi32(c), 0, 0) under key (lo32(seed), hi32(seed)),
//            the same words as Triton's tl.randint4x(seed, c) (triton/language/random.py);
//   uniform: Triton's uint_to_uniform_float: bitcast to int32, x = ~x if x < 0, float(x) * 4.6566127342e-10f;
//   normal : Box-Muller, u1 = max(1e-7, u(r0)), u2 = u(r1), rad = sqrt(-2 ln u1), th = 2 pi u2,
//            (rad cos th, rad sin th).
//
// The scalar functions are branch-free code on plain integers and floats, written so that GCC
// auto-vectorises loops over them: log / sin / cos are our own polynomial kernels (a call into
// libm does not vectorise). Measured over every uniform Triton can produce: log and the radius
// within 1 float32 ulp, sin and cos within 1.6 * 2^-24 absolute. The words are exact. The word
// generator also comes hand-vectorised for AVX2 and AVX-512 (same words, bit for bit).
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define FASTINT_X86 1
#endif

#if defined(__GNUC__)
#define FASTINT_INLINE inline __attribute__((always_inline))
#else
#define FASTINT_INLINE inline
#endif

namespace fastint {
namespace philox {

constexpr uint32_t kRoundA = 0xD2511F53u;  // multiplier of words 0 and 1
constexpr uint32_t kRoundB = 0xCD9E8D57u;  // multiplier of words 2 and 3
constexpr uint32_t kKeyA = 0x9E3779B9u;    // key increments (golden ratio, sqrt(3) - 1)
constexpr uint32_t kKeyB = 0xBB67AE85u;

struct Words {
  uint32_t r0, r1, r2, r3;
};

// Philox4x32 with 10 rounds. One round, with (hi, lo) the halves of a 32x32 -> 64-bit product:
//   c0' = hi(B c2) ^ c1 ^ k0,  c1' = lo(B c2),  c2' = hi(A c0) ^ c3 ^ k1,  c3' = lo(A c0),
// then k0 += kKeyA, k1 += kKeyB (mod 2^32).
FASTINT_INLINE Words philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
  for (int round = 0; round < 10; ++round) {
    const uint64_t pa = static_cast<uint64_t>(kRoundA) * c0;
    const uint64_t pb = static_cast<uint64_t>(kRoundB) * c2;
    const uint32_t n0 = static_cast<uint32_t>(pb >> 32) ^ c1 ^ k0;
    const uint32_t n2 = static_cast<uint32_t>(pa >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(pb);
    c3 = static_cast<uint32_t>(pa);
    c0 = n0;
    c2 = n2;
    k0 += kKeyA;
    k1 += kKeyB;
  }
  return {c0, c1, c2, c3};
}

// The words of Triton's tl.randint4x(seed, counter) for a 64-bit counter.
FASTINT_INLINE Words randint4x(uint64_t seed, uint64_t counter) {
  return philox4x32_10(static_cast<uint32_t>(counter), static_cast<uint32_t>(counter >> 32), 0u, 0u,
                       static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

FASTINT_INLINE float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

FASTINT_INLINE uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

// Triton's uint_to_uniform_float for 32-bit words: a float in [0, 1).
FASTINT_INLINE float uint_to_uniform_float(uint32_t r) {
  int32_t x = static_cast<int32_t>(r);
  x = x < 0 ? ~x : x;
  return static_cast<float>(x) * 4.6566127342e-10f;
}

// Natural log for finite x > 0 (normal floats), within 1 ulp. x = 2^e * m with m in [sqrt(1/2), sqrt(2)),
// f = m - 1 (exact), log(1 + f) = f - f^2/2 + f^3 R(f), R a degree-7 fit (Lawson's weighted minimax
// iteration on the relative error, our own fit), plus e ln 2 in two parts.
FASTINT_INLINE float log_pos(float x) {
  const uint32_t shifted = float_to_bits(x) + (0x3f800000u - 0x3f3504f3u);  // moves [sqrt(1/2), 1) up an octave
  const int32_t e = static_cast<int32_t>(shifted >> 23) - 127;
  const float m = bits_to_float((shifted & 0x007fffffu) + 0x3f3504f3u);  // in [sqrt(1/2), sqrt(2))
  const float f = m - 1.0f;
  float r = -0.07634538412094116f;
  r = r * f + 0.12761640548706055f;
  r = r * f - 0.1316019743680954f;
  r = r * f + 0.14201751351356506f;
  r = r * f - 0.16623355448246002f;
  r = r * f + 0.20001226663589478f;
  r = r * f - 0.250008225440979f;
  r = r * f + 0.3333333134651184f;
  const float f2 = f * f;
  const float ef = static_cast<float>(e);
  // ln 2 = 0.693359375 (exact in 9 bits, so ef * it is exact) - 2.12194440e-4 (the rest).
  const float tail = (f2 * f) * r + ef * -2.12194440e-4f;
  return ((f + (tail - 0.5f * f2)) + ef * 0.693359375f);
}

// sin and cos of th in [0, 2 pi] (absolute error < 2^-23): q = round(th / (pi/2)) in 0..4, r = th - q pi/2 in
// [-pi/4, pi/4] (three-part pi/2, the first two products q * part exact), sin r = r + r^3 S(r^2),
// cos r = 1 - r^2/2 + r^4 C(r^2), S and C degree-2 fits (same method as log_pos), then the quadrant.
FASTINT_INLINE void sincos_0_2pi(float th, float& s, float& c) {
  const int32_t q = static_cast<int32_t>(th * 0.636619772367581343f + 0.5f);
  const float qf = static_cast<float>(q);
  // pi/2 = 1.5707950592041016 + 1.2675900507019833e-06 (20 significant bits each) + 7.4435477313e-13.
  float r = th - qf * 1.5707950592041016f;
  r = r - qf * 1.2675900507019833e-06f;
  r = r - qf * 7.4435477313145038e-13f;
  const float z = r * r;
  float ps = -0.00019515286840032786f;
  ps = ps * z + 0.008332161232829094f;
  ps = ps * z - 0.16666655242443085f;
  const float sr = r + (r * z) * ps;
  float pc = 2.44331567955669e-05f;
  pc = pc * z - 0.0013887316454201937f;
  pc = pc * z + 0.04166664555668831f;
  const float cr = (1.0f - 0.5f * z) + (z * z) * pc;
  // Quadrant, with integer masks (branch-free, so it vectorises): odd q swaps sin and cos; sin is
  // negated for q = 2, 3 and cos for q = 1, 2 (the sign bit flipped by xor).
  const uint32_t swap = 0u - static_cast<uint32_t>(q & 1);
  const uint32_t sb = float_to_bits(sr), cb = float_to_bits(cr);
  const uint32_t s0 = (cb & swap) | (sb & ~swap);
  const uint32_t c0 = (sb & swap) | (cb & ~swap);
  s = bits_to_float(s0 ^ (static_cast<uint32_t>(q & 2) << 30));
  c = bits_to_float(c0 ^ (static_cast<uint32_t>((q + 1) & 2) << 30));
}

// Box-Muller on two uniforms (Triton's pair_uniform_to_normal).
// max(1e-7, u1) as an integer compare of the bit patterns (exact for u1 >= 0): a float compare would
// keep GCC from vectorising the loop under the default -ftrapping-math. The square root needs
// -fno-math-errno (setup.py) to vectorise.
FASTINT_INLINE float box_muller_radius(float u1) {
  const uint32_t lo = 0x33d6bf95u;  // bits of 1.0e-7f
  const uint32_t b = float_to_bits(u1);
  const float u = bits_to_float(b > lo ? b : lo);
  return __builtin_sqrtf(-2.0f * log_pos(u));
}

FASTINT_INLINE float two_pi_times(float u2) { return 6.283185307179586f * u2; }

// Uniforms u1[i] = u(r0), u2[i] = u(r1) of the counters c + i * step, i < n (mod 2^64).
FASTINT_INLINE void uniforms_run(float* __restrict u1, float* __restrict u2, int64_t n, uint64_t seed, uint64_t c,
                                 uint64_t step) {
  for (int64_t i = 0; i < n; ++i) {
    const Words w = randint4x(seed, c + static_cast<uint64_t>(i) * step);
    u1[i] = uint_to_uniform_float(w.r0);
    u2[i] = uint_to_uniform_float(w.r1);
  }
}

#if defined(FASTINT_X86) && defined(__GNUC__)
// The same for consecutive counters (step 1), hand-vectorised: GCC vectorises the loop above by
// widening every lane to 64 bits (vpmullq), about half the speed of the even / odd 32x32 -> 64
// multiplies (vpmuludq) used here. Same words, bit for bit.
#define FASTINT_TARGET_AVX2 __attribute__((target("avx2")))
#define FASTINT_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2")))

// hi and lo halves of the 32x32 -> 64-bit products m * x, lane by lane (m broadcast).
FASTINT_TARGET_AVX2 inline void mulhilo8(__m256i m, __m256i x, __m256i& hi, __m256i& lo) {
  const __m256i even = _mm256_mul_epu32(x, m);                         // lanes 0, 2, 4, 6
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(x, 32), m);  // lanes 1, 3, 5, 7
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
}

FASTINT_TARGET_AVX2 inline __m256 uniform8(__m256i x) {
  x = _mm256_xor_si256(x, _mm256_srai_epi32(x, 31));  // ~x where x < 0
  return _mm256_mul_ps(_mm256_cvtepi32_ps(x), _mm256_set1_ps(4.6566127342e-10f));
}

FASTINT_TARGET_AVX2 inline void uniforms_run_avx2(float* u1, float* u2, int64_t n, uint64_t seed, uint64_t c) {
  const __m256i A = _mm256_set1_epi32(static_cast<int32_t>(kRoundA));
  const __m256i B = _mm256_set1_epi32(static_cast<int32_t>(kRoundB));
  const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i sign = _mm256_set1_epi32(INT32_MIN);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const uint64_t base = c + static_cast<uint64_t>(i);
    const __m256i blo = _mm256_set1_epi32(static_cast<int32_t>(static_cast<uint32_t>(base)));
    __m256i c0 = _mm256_add_epi32(blo, iota);
    // Lanes whose low word wrapped (c0 < blo, unsigned) carry into the high word.
    const __m256i wrapped = _mm256_cmpgt_epi32(_mm256_xor_si256(blo, sign), _mm256_xor_si256(c0, sign));
    __m256i c1 = _mm256_sub_epi32(_mm256_set1_epi32(static_cast<int32_t>(static_cast<uint32_t>(base >> 32))), wrapped);
    __m256i c2 = _mm256_setzero_si256(), c3 = _mm256_setzero_si256();
    uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
    for (int round = 0; round < 10; ++round) {
      __m256i hia, loa, hib, lob;
      mulhilo8(A, c0, hia, loa);
      mulhilo8(B, c2, hib, lob);
      c0 = _mm256_xor_si256(_mm256_xor_si256(hib, c1), _mm256_set1_epi32(static_cast<int32_t>(k0)));
      c2 = _mm256_xor_si256(_mm256_xor_si256(hia, c3), _mm256_set1_epi32(static_cast<int32_t>(k1)));
      c1 = lob;
      c3 = loa;
      k0 += kKeyA;
      k1 += kKeyB;
    }
    _mm256_storeu_ps(u1 + i, uniform8(c0));
    _mm256_storeu_ps(u2 + i, uniform8(c1));
  }
  uniforms_run(u1 + i, u2 + i, n - i, seed, c + static_cast<uint64_t>(i), 1);
}

// AVX-512: the counters sit in 64-bit lanes, one 32-bit word in the low half of each (vpmuludq reads
// only the low halves, so the high halves may hold anything): a round is then 2 multiplies, 2 shifts
// and 2 three-way xors (vpternlogq) per 8 counters, no blends. Same words, bit for bit.
FASTINT_TARGET_AVX512 inline __m512 uniform16(__m512i x) {
  x = _mm512_xor_si512(x, _mm512_srai_epi32(x, 31));
  return _mm512_mul_ps(_mm512_cvtepi32_ps(x), _mm512_set1_ps(4.6566127342e-10f));
}

// Philox4x32-10 of the counters in the 64-bit lanes of (lo, hi) (the words c0, c1; c2 = c3 = 0), r0 in
// lo and r1 in hi on return (low halves).
FASTINT_TARGET_AVX512 inline void philox8_avx512(__m512i& lo, __m512i& hi, uint32_t k0, uint32_t k1) {
  const __m512i A = _mm512_set1_epi64(kRoundA), B = _mm512_set1_epi64(kRoundB);
  __m512i c0 = lo, c1 = hi, c2 = _mm512_setzero_si512(), c3 = _mm512_setzero_si512();
  for (int round = 0; round < 10; ++round) {
    const __m512i pa = _mm512_mul_epu32(c0, A);
    const __m512i pb = _mm512_mul_epu32(c2, B);
    c0 = _mm512_ternarylogic_epi64(_mm512_srli_epi64(pb, 32), c1, _mm512_set1_epi64(k0), 0x96);
    c2 = _mm512_ternarylogic_epi64(_mm512_srli_epi64(pa, 32), c3, _mm512_set1_epi64(k1), 0x96);
    c1 = pb;
    c3 = pa;
    k0 += kKeyA;
    k1 += kKeyB;
  }
  lo = c0;
  hi = c1;
}

FASTINT_TARGET_AVX512 inline void uniforms_run_avx512(float* u1, float* u2, int64_t n, uint64_t seed, uint64_t c) {
  const __m512i iota = _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7);
  const __m512i eight = _mm512_set1_epi64(8);
  // the low halves of a's lanes, then of b's: 32-bit elements 0, 2, .., 14 of a and of b
  const __m512i evens = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512i ca = _mm512_add_epi64(_mm512_set1_epi64(static_cast<int64_t>(c + static_cast<uint64_t>(i))), iota);
    const __m512i cb = _mm512_add_epi64(ca, eight);  // 64-bit adds: the carry into the high word is exact
    __m512i alo = ca, ahi = _mm512_srli_epi64(ca, 32), blo = cb, bhi = _mm512_srli_epi64(cb, 32);
    philox8_avx512(alo, ahi, k0, k1);
    philox8_avx512(blo, bhi, k0, k1);
    _mm512_storeu_ps(u1 + i, uniform16(_mm512_permutex2var_epi32(alo, evens, blo)));
    _mm512_storeu_ps(u2 + i, uniform16(_mm512_permutex2var_epi32(ahi, evens, bhi)));
  }
  uniforms_run(u1 + i, u2 + i, n - i, seed, c + static_cast<uint64_t>(i), 1);
}
#endif  // FASTINT_X86

}  // namespace philox
}  // namespace fastint
