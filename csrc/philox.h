// Counter-based normal noise for the fused step op (docs/design.md, "The op").
//
//   words  : Philox4x32-10 of counter (lo32(q), hi32(q), 0, 0) under key (lo32(seed), hi32(seed)),
//            the same words as Triton's tl.randint4x(seed, q) (triton/language/random.py);
//   uniform: Triton's uint_to_uniform_float: bitcast to int32, x = ~x if x < 0, float(x) * 4.6566127342e-10f;
//   pairs  : pair p of the stream is Box-Muller on the words (r0, r1) of counter q = p >> 1 when p is
//            even, (r2, r3) when p is odd: u1 = max(1e-7, u(first)), u2 = u(second),
//            rad = sqrt(-2 ln u1), th = 2 pi u2, pair = (rad cos th, rad sin th);
//   normal : normal k of the stream is the cos half of pair k >> 1 for even k, the sin half for odd k.
//
// So one Philox call gives four normals and every Box-Muller pair is used whole. A state element
// with counter c takes normal c (dim 1), or pair c as (xi_x, xi_m) (dim 2): a pure function of c,
// whatever the layout, the batch or the backend (the Triton kernel computes the same words).
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

// Box-Muller on the pair uniforms, in place: a[k] = rad cos th, b[k] = rad sin th.
FASTINT_INLINE void box_muller_run(float* __restrict a, float* __restrict b, int64_t n) {
  for (int64_t k = 0; k < n; ++k) {
    const float rad = box_muller_radius(a[k]);
    float s, c;
    sincos_0_2pi(two_pi_times(b[k]), s, c);
    a[k] = rad * c;
    b[k] = rad * s;
  }
}

// The uniforms (u1[k], u2[k]) of the pairs p + k * step, k < n (mod 2^64): the words (r0, r1) of
// counter (p + k step) >> 1 for an even pair, (r2, r3) for an odd one.
FASTINT_INLINE void pair_uniforms_run(float* __restrict u1, float* __restrict u2, int64_t n, uint64_t seed, uint64_t p,
                                      uint64_t step) {
  for (int64_t k = 0; k < n; ++k) {
    const uint64_t pk = p + static_cast<uint64_t>(k) * step;
    const Words w = randint4x(seed, pk >> 1);
    const uint32_t odd = 0u - static_cast<uint32_t>(pk & 1u);
    u1[k] = uint_to_uniform_float((w.r2 & odd) | (w.r0 & ~odd));
    u2[k] = uint_to_uniform_float((w.r3 & odd) | (w.r1 & ~odd));
  }
}

#if defined(FASTINT_X86) && defined(__GNUC__)
// The same for consecutive pairs (step 1), hand-vectorised: one Philox call per two pairs, the
// 32x32 -> 64 multiplies as even / odd vpmuludq (GCC vectorises the loop above by widening every
// lane to 64 bits, vpmullq, about half the speed). Same words, bit for bit.
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

// Stores the 16 uniforms of (a[0], b[0], a[1], b[1], ..., a[7], b[7]) at u.
FASTINT_TARGET_AVX2 inline void store_interleaved8(float* u, __m256 a, __m256 b) {
  const __m256 lo = _mm256_unpacklo_ps(a, b);  // a0 b0 a1 b1 | a4 b4 a5 b5
  const __m256 hi = _mm256_unpackhi_ps(a, b);  // a2 b2 a3 b3 | a6 b6 a7 b7
  _mm256_storeu_ps(u, _mm256_permute2f128_ps(lo, hi, 0x20));
  _mm256_storeu_ps(u + 8, _mm256_permute2f128_ps(lo, hi, 0x31));
}

FASTINT_TARGET_AVX2 inline void pair_uniforms_run_avx2(float* u1, float* u2, int64_t n, uint64_t seed, uint64_t p) {
  int64_t k = 0;
  if (n > 0 && (p & 1u)) {  // an odd first pair: the second half of its counter's words
    pair_uniforms_run(u1, u2, 1, seed, p, 1);
    k = 1;
  }
  const __m256i A = _mm256_set1_epi32(static_cast<int32_t>(kRoundA));
  const __m256i B = _mm256_set1_epi32(static_cast<int32_t>(kRoundB));
  const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i sign = _mm256_set1_epi32(INT32_MIN);
  for (; k + 16 <= n; k += 16) {
    const uint64_t base = (p + static_cast<uint64_t>(k)) >> 1;  // 8 counters, 16 pairs
    const __m256i blo = _mm256_set1_epi32(static_cast<int32_t>(static_cast<uint32_t>(base)));
    __m256i c0 = _mm256_add_epi32(blo, iota);
    // Lanes whose low word wrapped (c0 < blo, unsigned) carry into the high word.
    const __m256i wrapped = _mm256_cmpgt_epi32(_mm256_xor_si256(blo, sign), _mm256_xor_si256(c0, sign));
    __m256i c1 = _mm256_sub_epi32(_mm256_set1_epi32(static_cast<int32_t>(static_cast<uint32_t>(base >> 32))), wrapped);
    c1 = _mm256_and_si256(c1, _mm256_set1_epi32(INT32_MAX));  // the counter p >> 1 wraps mod 2^63
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
    store_interleaved8(u1 + k, uniform8(c0), uniform8(c2));
    store_interleaved8(u2 + k, uniform8(c1), uniform8(c3));
  }
  pair_uniforms_run(u1 + k, u2 + k, n - k, seed, p + static_cast<uint64_t>(k), 1);
}

// AVX-512: the counters sit in 64-bit lanes, one 32-bit word in the low half of each (vpmuludq reads
// only the low halves, so the high halves may hold anything): a round is then 2 multiplies, 2 shifts
// and 2 three-way xors (vpternlogq) per 8 counters, no blends. Same words, bit for bit.
FASTINT_TARGET_AVX512 inline __m512 uniform16(__m512i x) {
  x = _mm512_xor_si512(x, _mm512_srai_epi32(x, 31));
  return _mm512_mul_ps(_mm512_cvtepi32_ps(x), _mm512_set1_ps(4.6566127342e-10f));
}

// Philox4x32-10 of the counters in the 64-bit lanes of ctr[0..L), 8 per vector, as L independent
// chains interleaved round by round (one chain alone waits on each multiply's latency); the words
// r0..r3 in the low halves of c0..c3 on return.
template <int L>
FASTINT_TARGET_AVX512 inline void philox_avx512(const __m512i* ctr, uint32_t k0, uint32_t k1, __m512i* c0, __m512i* c1,
                                                __m512i* c2, __m512i* c3) {
  const __m512i A = _mm512_set1_epi64(kRoundA), B = _mm512_set1_epi64(kRoundB);
  for (int l = 0; l < L; ++l) {
    c0[l] = ctr[l];
    c1[l] = _mm512_srli_epi64(ctr[l], 32);
    c2[l] = c3[l] = _mm512_setzero_si512();
  }
  for (int round = 0; round < 10; ++round) {
    const __m512i kk0 = _mm512_set1_epi64(k0), kk1 = _mm512_set1_epi64(k1);
    for (int l = 0; l < L; ++l) {
      const __m512i pa = _mm512_mul_epu32(c0[l], A);
      const __m512i pb = _mm512_mul_epu32(c2[l], B);
      c0[l] = _mm512_ternarylogic_epi64(_mm512_srli_epi64(pb, 32), c1[l], kk0, 0x96);
      c2[l] = _mm512_ternarylogic_epi64(_mm512_srli_epi64(pa, 32), c3[l], kk1, 0x96);
      c1[l] = pb;
      c3[l] = pa;
    }
    k0 += kKeyA;
    k1 += kKeyB;
  }
}

// The 16 uniforms of pairs (2j, 2j + 1), j < 8, in pair order: the low half of each 64-bit lane
// from `even` (r0 or r1), the high half from `odd` (r2 or r3).
FASTINT_TARGET_AVX512 inline __m512 pair_lanes16(__m512i even, __m512i odd) {
  return uniform16(_mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32)));
}

// Pairs p + k .. of blocks of 16 L pairs (p + k even) while they fit in n; returns the next k.
template <int L>
FASTINT_TARGET_AVX512 inline int64_t pair_blocks_avx512(float* u1, float* u2, int64_t k, int64_t n, uint64_t seed,
                                                        uint64_t p) {
  const __m512i iota = _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7);
  const __m512i m63 = _mm512_set1_epi64(INT64_MAX);
  const uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (; k + 16 * L <= n; k += 16 * L) {
    const uint64_t base = (p + static_cast<uint64_t>(k)) >> 1;
    __m512i ctr[L], w0[L], w1[L], w2[L], w3[L];
    // 64-bit adds, so the carry into the high word is exact; the pair index wraps mod 2^64, so its
    // counter p >> 1 wraps mod 2^63
    for (int l = 0; l < L; ++l)
      ctr[l] = _mm512_and_si512(_mm512_add_epi64(_mm512_set1_epi64(static_cast<int64_t>(base + 8u * l)), iota), m63);
    philox_avx512<L>(ctr, k0, k1, w0, w1, w2, w3);
    for (int l = 0; l < L; ++l) {
      _mm512_storeu_ps(u1 + k + 16 * l, pair_lanes16(w0[l], w2[l]));
      _mm512_storeu_ps(u2 + k + 16 * l, pair_lanes16(w1[l], w3[l]));
    }
  }
  return k;
}

FASTINT_TARGET_AVX512 inline void pair_uniforms_run_avx512(float* u1, float* u2, int64_t n, uint64_t seed, uint64_t p) {
  int64_t k = 0;
  if (n > 0 && (p & 1u)) {  // an odd first pair: the second half of its counter's words
    pair_uniforms_run(u1, u2, 1, seed, p, 1);
    k = 1;
  }
  k = pair_blocks_avx512<4>(u1, u2, k, n, seed, p);  // 4 chains: 64 pairs per iteration
  k = pair_blocks_avx512<1>(u1, u2, k, n, seed, p);  // then 16 at a time
  pair_uniforms_run(u1 + k, u2 + k, n - k, seed, p + static_cast<uint64_t>(k), 1);
}
#endif  // FASTINT_X86

}  // namespace philox
}  // namespace fastint
