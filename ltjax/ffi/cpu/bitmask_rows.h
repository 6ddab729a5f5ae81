// Decoding one storage row of a bitmask codec: mask words + packed values (tile-major) ->
// a dense row. AVX-512 VBMI2 expands 32 packed elements per mask word in registers
// (masked load of popcount(word) elements, then vpexpand{b,w,d}); AVX2, which has no expand,
// shuffles 8 elements per mask byte with a control from a 256-entry table (`kExpand`).
// Shared by bitmask_matmul.cc and bitmask_unpack.cc.
#pragma once

#include <cmath>
#include <type_traits>

#include "kernels.h"

namespace ltjax {

enum class Packed { kI8, kF32, kBf16, kF16 };

inline bool PackedOf(ffi::DataType t, Packed* p) {
  switch (t) {
    case ffi::DataType::S8: *p = Packed::kI8; return true;
    case ffi::DataType::F32: *p = Packed::kF32; return true;
    case ffi::DataType::BF16: *p = Packed::kBf16; return true;
    case ffi::DataType::F16: *p = Packed::kF16; return true;
    default: return false;
  }
}

// 32 packed elements expanded by mask word m, as two f32 vectors (AVX-512 VBMI2).
template <Packed P>
LTJAX_AVX512 inline void Expand32_512(uint32_t m, const void* packed, int64_t s, __m512* lo, __m512* hi) {
  unsigned cnt = __builtin_popcount(m);
  if constexpr (P == Packed::kI8) {
    auto* p = static_cast<const int8_t*>(packed) + s;
    __m256i v = _mm256_maskz_expand_epi8(m, _mm256_maskz_loadu_epi8(_bzhi_u32(~0u, cnt), p));
    *lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(v)));
    *hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(v, 1)));
  } else if constexpr (P == Packed::kF32) {
    auto* p = static_cast<const float*>(packed) + s;
    __mmask16 ml = static_cast<__mmask16>(m), mh = static_cast<__mmask16>(m >> 16);
    unsigned cl = __builtin_popcount(ml);
    *lo = _mm512_maskz_expand_ps(ml, _mm512_maskz_loadu_ps(_bzhi_u32(0xffffu, cl), p));
    *hi = _mm512_maskz_expand_ps(mh, _mm512_maskz_loadu_ps(_bzhi_u32(0xffffu, cnt - cl), p + cl));
  } else {
    auto* p = static_cast<const uint16_t*>(packed) + s;
    __m512i v = _mm512_maskz_expand_epi16(m, _mm512_maskz_loadu_epi16(_bzhi_u32(~0u, cnt), p));
    __m256i a = _mm512_castsi512_si256(v), b = _mm512_extracti64x4_epi64(v, 1);
    if constexpr (P == Packed::kBf16) {
      *lo = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(a), 16));
      *hi = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16));
    } else {
      *lo = _mm512_cvtph_ps(a);
      *hi = _mm512_cvtph_ps(b);
    }
  }
}

// Row `cur.row()` as f32 into dst[0 : 32 * words] (zeros where the mask is clear); advances cur.
template <Packed P>
LTJAX_AVX512 bool RowF32_512(RowCursor& cur, const void* packed, int64_t, float* dst) {
  return cur.Row([&](int64_t w, uint32_t m, int64_t s) LTJAX_AVX512 {
    __m512 lo, hi;
    Expand32_512<P>(m, packed, s, &lo, &hi);
    _mm512_storeu_ps(dst + 32 * w, lo);
    _mm512_storeu_ps(dst + 32 * w + 16, hi);
  });
}

// dot(row `cur.row()`, x) without writing the row anywhere (x padded to 32 * words); advances cur.
template <Packed P>
LTJAX_AVX512 bool RowDot_512(RowCursor& cur, const void* packed, const float* x, float* out) {
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
  bool ok = cur.Row([&](int64_t w, uint32_t m, int64_t s) LTJAX_AVX512 {
    __m512 lo, hi;
    Expand32_512<P>(m, packed, s, &lo, &hi);
    a0 = _mm512_fmadd_ps(lo, _mm512_loadu_ps(x + 32 * w), a0);
    a1 = _mm512_fmadd_ps(hi, _mm512_loadu_ps(x + 32 * w + 16), a1);
  });
  *out = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
  return ok;
}

// Row `cur.row()` as the packed elements' own bits (elements of 1, 2 or 4 bytes) into dst.
template <Packed P>
LTJAX_AVX512 bool RowBits_512(RowCursor& cur, const void* packed, int64_t, void* dst) {
  return cur.Row([&](int64_t w, uint32_t m, int64_t s) LTJAX_AVX512 {
    unsigned cnt = __builtin_popcount(m);
    if constexpr (P == Packed::kF32) {
      auto* p = static_cast<const int32_t*>(packed) + s;
      auto* d = static_cast<int32_t*>(dst) + 32 * w;
      __mmask16 lo = static_cast<__mmask16>(m), hi = static_cast<__mmask16>(m >> 16);
      unsigned clo = __builtin_popcount(lo);
      _mm512_storeu_si512(d, _mm512_maskz_expand_epi32(lo, _mm512_maskz_loadu_epi32(_bzhi_u32(0xffffu, clo), p)));
      _mm512_storeu_si512(
          d + 16, _mm512_maskz_expand_epi32(hi, _mm512_maskz_loadu_epi32(_bzhi_u32(0xffffu, cnt - clo), p + clo)));
    } else if constexpr (P == Packed::kI8) {
      auto* p = static_cast<const int8_t*>(packed) + s;
      _mm256_storeu_si256(static_cast<__m256i*>(dst) + w,
                          _mm256_maskz_expand_epi8(m, _mm256_maskz_loadu_epi8(_bzhi_u32(~0u, cnt), p)));
    } else {
      auto* p = static_cast<const uint16_t*>(packed) + s;
      _mm512_storeu_si512(static_cast<__m512i*>(dst) + w,
                          _mm512_maskz_expand_epi16(m, _mm512_maskz_loadu_epi16(_bzhi_u32(~0u, cnt), p)));
    }
  });
}

// ---------------------------------------------------------------- AVX2 (no vpexpand)
// AVX2 has no expand instruction, so each mask byte (8 columns) picks a shuffle control from a
// 256-entry table: byte j of idx8[b] is the packed position of column j (the rank of bit j
// among b's set bits), or 0x80 where bit j is clear, which `vpshufb` turns into a zero and
// `vpermd` + a blend on the sign bit likewise. Two bytes share one 16-byte shuffle by adding
// the first byte's popcount to the second's control (0x80 + 8 keeps its top bit). Each step
// reads a full vector past the word's first packed element, so within 32 elements of the
// end of the packed array the word's elements are first copied to a zero-padded buffer.
struct ExpandTables {
  uint64_t idx8[256];
  alignas(16) uint8_t idx16[256][16];  // the same for two-byte elements: bytes 2r, 2r + 1
  constexpr ExpandTables() : idx8(), idx16() {
    for (int b = 0; b < 256; ++b) {
      uint64_t v = 0;
      for (int j = 0, r = 0; j < 8; ++j) {
        const bool set = (b >> j) & 1;
        v |= static_cast<uint64_t>(set ? r : 0x80) << (8 * j);
        idx16[b][2 * j] = static_cast<uint8_t>(set ? 2 * r : 0x80);
        idx16[b][2 * j + 1] = static_cast<uint8_t>(set ? 2 * r + 1 : 0x80);
        r += set;
      }
      idx8[b] = v;
    }
  }
};
inline constexpr ExpandTables kExpand{};
struct ExpandHiTables {
  uint64_t t[9][256];  // idx8[b] + c in every byte: the control of a second byte after c elements
  constexpr ExpandHiTables() : t() {
    for (int c = 0; c < 9; ++c)
      for (int b = 0; b < 256; ++b) t[c][b] = kExpand.idx8[b] + static_cast<uint64_t>(c) * 0x0101010101010101ull;
  }
};
inline constexpr ExpandHiTables kExpandHi{};

// Where word m's packed elements can be read a whole vector at a time: base + s, or (within
// 32 elements of the end) a copy of its popcount(m) elements in buf[32], zero-padded. The
// cursor has already checked s + popcount(m) <= nnz.
template <class T>
LTJAX_INLINE const T* Readable32(const T* base, int64_t s, uint32_t m, int64_t nnz, T* buf) {
  if (s + 32 <= nnz) return base + s;
  std::memset(static_cast<void*>(buf), 0, 32 * sizeof(T));
  std::memcpy(static_cast<void*>(buf), base + s, __builtin_popcount(m) * sizeof(T));
  return buf;
}

// 16 int8 elements at the columns of the 16-bit mask m16.
LTJAX_AVX2 LTJAX_INLINE __m128i Expand16I8_256(uint32_t m16, const int8_t* p) {
  const uint32_t b0 = m16 & 0xff, b1 = m16 >> 8;
  const __m128i ctrl = _mm_set_epi64x(static_cast<int64_t>(kExpandHi.t[__builtin_popcount(b0)][b1]),
                                      static_cast<int64_t>(kExpand.idx8[b0]));
  return _mm_shuffle_epi8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)), ctrl);
}

// 8 elements (mask byte b) as f32, and as their own 32-bit pattern (f32 values only).
LTJAX_AVX2 LTJAX_INLINE __m256 Expand8F32Bits_256(uint32_t b, const float* p) {
  const __m256i idx = _mm256_cvtepi8_epi32(_mm_cvtsi64_si128(static_cast<int64_t>(kExpand.idx8[b])));
  return _mm256_blendv_ps(_mm256_permutevar8x32_ps(_mm256_loadu_ps(p), idx), _mm256_setzero_ps(),
                          _mm256_castsi256_ps(idx));
}
LTJAX_AVX2 LTJAX_INLINE __m128i Expand8U16_256(uint32_t b, const uint16_t* p) {
  return _mm_shuffle_epi8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)),
                          _mm_load_si128(reinterpret_cast<const __m128i*>(kExpand.idx16[b])));
}

// The 32 columns of word m as four f32 vectors of 8 (word w's values start at p).
template <Packed P>
LTJAX_AVX2 LTJAX_INLINE void Expand32_256(uint32_t m, const void* p, __m256* v) {
  if constexpr (P == Packed::kI8) {
    auto* c = static_cast<const int8_t*>(p);
    const __m128i lo = Expand16I8_256(m & 0xffff, c), hi = Expand16I8_256(m >> 16, c + __builtin_popcount(m & 0xffff));
    v[0] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo));
    v[1] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8)));
    v[2] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi));
    v[3] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8)));
  } else {
    int64_t s = 0;
    for (int q = 0; q < 4; ++q) {
      const uint32_t b = (m >> (8 * q)) & 0xff;
      if constexpr (P == Packed::kF32) {
        v[q] = Expand8F32Bits_256(b, static_cast<const float*>(p) + s);
      } else {
        const __m128i h = Expand8U16_256(b, static_cast<const uint16_t*>(p) + s);
        if constexpr (P == Packed::kBf16) v[q] = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
        else v[q] = _mm256_cvtph_ps(h);
      }
      s += __builtin_popcount(b);
    }
  }
}

template <Packed P>
using PackedT = std::conditional_t<P == Packed::kI8, int8_t, std::conditional_t<P == Packed::kF32, float, uint16_t>>;

// cur.Row for the AVX2 walks: f(w, m, p) per mask word, p where word w's values can be read a
// whole vector at a time (Readable32).
template <Packed P, class F>
LTJAX_AVX2 LTJAX_INLINE bool RowReadable256(RowCursor& cur, const void* packed, F&& f) {
  using T = PackedT<P>;
  const T* base = static_cast<const T*>(packed);
  const int64_t nnz = cur.nnz();
  alignas(32) T buf[32];
  return cur.Row([&](int64_t w, uint32_t m, int64_t s) LTJAX_AVX2 { f(w, m, Readable32(base, s, m, nnz, buf)); });
}

// Row `cur.row()` as f32 into dst[0 : 32 * words]; advances cur.
template <Packed P>
LTJAX_AVX2 bool RowF32_256(RowCursor& cur, const void* packed, float* dst) {
  return RowReadable256<P>(cur, packed, [&](int64_t w, uint32_t m, const PackedT<P>* p) LTJAX_AVX2 {
    __m256 v[4];
    Expand32_256<P>(m, p, v);
    for (int q = 0; q < 4; ++q) _mm256_storeu_ps(dst + 32 * w + 8 * q, v[q]);
  });
}

// dot(row `cur.row()`, x) without writing the row (x padded to 32 * words); advances cur.
template <Packed P>
LTJAX_AVX2 bool RowDot_256(RowCursor& cur, const void* packed, const float* x, float* out) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  bool ok = RowReadable256<P>(cur, packed, [&](int64_t w, uint32_t m, const PackedT<P>* p) LTJAX_AVX2 {
    __m256 v[4];
    Expand32_256<P>(m, p, v);
    const float* xp = x + 32 * w;
    a0 = _mm256_fmadd_ps(v[0], _mm256_loadu_ps(xp), a0);
    a1 = _mm256_fmadd_ps(v[1], _mm256_loadu_ps(xp + 8), a1);
    a2 = _mm256_fmadd_ps(v[2], _mm256_loadu_ps(xp + 16), a2);
    a3 = _mm256_fmadd_ps(v[3], _mm256_loadu_ps(xp + 24), a3);
  });
  *out = Hsum256(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
  return ok;
}

// Row `cur.row()` as the packed elements' own bits (1, 2 or 4 bytes each) into dst.
template <Packed P>
LTJAX_AVX2 bool RowBits_256(RowCursor& cur, const void* packed, void* dst) {
  using T = PackedT<P>;
  return RowReadable256<P>(cur, packed, [&](int64_t w, uint32_t m, const T* p) LTJAX_AVX2 {
    T* d = static_cast<T*>(dst) + 32 * w;
    if constexpr (P == Packed::kI8) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(d), Expand16I8_256(m & 0xffff, p));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(d + 16), Expand16I8_256(m >> 16, p + __builtin_popcount(m & 0xffff)));
    } else {
      for (int q = 0; q < 4; ++q, m >>= 8) {
        if constexpr (P == Packed::kF32) _mm256_storeu_ps(d + 8 * q, Expand8F32Bits_256(m & 0xff, p));
        else _mm_storeu_si128(reinterpret_cast<__m128i*>(d + 8 * q), Expand8U16_256(m & 0xff, p));
        p += __builtin_popcount(m & 0xff);
      }
    }
  });
}

// int8 version of RowDot_512 taking two mask words per step: one masked load of
// popcount(64-bit mask) codes, one 64-byte vpexpandb, four conversions + FMAs (half the
// popcounts, loads and expands per element of the 32-bit walk). The M = 1 bitmask_int8 GEMV
// uses it only where VNNI is missing or x is not finite: GemvI8_Vnni below is ~1.8x faster.
LTJAX_AVX512 inline bool RowDotI8_512(RowCursor& cur, const void* packed, const float* x, float* out) {
  const int8_t* base = static_cast<const int8_t*>(packed);
  const int64_t last = cur.words() - 1;
  const uint32_t last_bits = cur.last_word();
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  bool ok = cur.Spans([&](const uint32_t* mrow, int64_t w0, int64_t w1, int64_t s) LTJAX_AVX512 {
    int64_t w = w0;
    for (; w + 2 <= w1; w += 2) {
      uint64_t lo = mrow[w], hi = w + 1 == last ? (mrow[w + 1] & last_bits) : mrow[w + 1];
      uint64_t m = lo | (hi << 32);
      unsigned cnt = static_cast<unsigned>(__builtin_popcountll(m));
      __m512i v = _mm512_maskz_expand_epi8(m, _mm512_maskz_loadu_epi8(_bzhi_u64(~0ull, cnt), base + s));
      s += cnt;
      const float* xp = x + 32 * w;
      a0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_extracti32x4_epi32(v, 0))),
                           _mm512_loadu_ps(xp), a0);
      a1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_extracti32x4_epi32(v, 1))),
                           _mm512_loadu_ps(xp + 16), a1);
      a2 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_extracti32x4_epi32(v, 2))),
                           _mm512_loadu_ps(xp + 32), a2);
      a3 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_extracti32x4_epi32(v, 3))),
                           _mm512_loadu_ps(xp + 48), a3);
    }
    if (w < w1) {
      uint32_t m = w == last ? (mrow[w] & last_bits) : mrow[w];
      __m512 lo, hi;
      Expand32_512<Packed::kI8>(m, packed, s, &lo, &hi);
      a0 = _mm512_fmadd_ps(lo, _mm512_loadu_ps(x + 32 * w), a0);
      a1 = _mm512_fmadd_ps(hi, _mm512_loadu_ps(x + 32 * w + 16), a1);
      s += __builtin_popcount(m);
    }
    return s;
  });
  *out = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
  return ok;
}

// ---------------------------------------------------------------- M = 1 bitmask_int8 on VNNI
// At M = 1 every weight is used once, so the f32 walk above pays, per 64 columns, one
// vpexpandb plus 16-lane sign extensions, conversions and FMAs for all 64 (zeros included):
// it is bound by ports 0/5, not by memory (docs/ffi.md "bitmask_int8 at M = 1"). With VNNI the
// expanded codes feed vpdpbusd directly, 64 multiply-adds per instruction, no conversion:
//
//   x ~= qs * q,  q = e0 + 256 e1 + 65536 e2,  e_d in [-128, 127] (balanced base-256 digits),
//   |q| <= 8355711, qs = max|x| / 8355711        (x rounded to 24-bit fixed point, per call)
//   sum_k b_k q_k = sum_d 256^d (sum_k (b_k + 128) e_d[k] - 128 E_d),  E_d = sum_k e_d[k]
//
// (b + 128 is the code with its sign bit flipped: the unsigned operand of vpdpbusd; a masked-out
// column contributes 128 e_d[k], which E_d removes.) The integer sums are exact, so the only
// error is rounding x to qs: |y - y_exact| <= scale * (qs / 2) * sum_k |b_k|, i.e. each x off by
// at most 2^-24 of max|x|: the size of one f32 rounding of the largest element (tested against
// a float64 reference in tests/test_ffi.py). Non-finite x takes the f32 walk instead.
struct XDigits {
  const int8_t* d;  // [3][stride]: digit d of column k at d[d * stride + k]; zero past kp
  int64_t stride;
  int64_t sum[3];   // E_d
  double qs;
};

constexpr int64_t kQMax = 8355711;  // 127 * (1 + 256 + 65536): the largest |q| with digits in range

// Digits of x[0 : kp] (kp a multiple of 32) into buf (3 * (kp + 64) bytes). False if x is not finite.
LTJAX_AVX512 inline bool MakeXDigits(const float* x, int64_t kp, int8_t* buf, XDigits* out) {
  __m512 amax = _mm512_setzero_ps();
  __mmask16 nan = 0;
  for (int64_t k = 0; k < kp; k += 16) {
    __m512 v = _mm512_loadu_ps(x + k);
    amax = _mm512_max_ps(amax, _mm512_abs_ps(v));
    nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);  // max_ps drops NaNs: look for them explicitly
  }
  float a = _mm512_reduce_max_ps(amax);
  if (nan || !(a <= 3.4028234663852886e38f)) return false;
  const int64_t stride = kp + 64;
  out->d = buf;
  out->stride = stride;
  out->qs = a > 0 ? static_cast<double>(a) / kQMax : 1.0;
  const __m512d inv = _mm512_set1_pd(1.0 / out->qs);
  const __m512i lim = _mm512_set1_epi32(static_cast<int32_t>(kQMax)), c128 = _mm512_set1_epi32(128),
                c255 = _mm512_set1_epi32(255);
  __m512i e_sum[3] = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512()};
  for (int64_t k = 0; k < kp; k += 16) {
    __m512 v = _mm512_loadu_ps(x + k);
    __m256i q_lo = _mm512_cvtpd_epi32(_mm512_mul_pd(_mm512_cvtps_pd(_mm512_castps512_ps256(v)), inv));
    __m256i q_hi = _mm512_cvtpd_epi32(_mm512_mul_pd(_mm512_cvtps_pd(_mm512_extractf32x8_ps(v, 1)), inv));
    __m512i q = _mm512_inserti64x4(_mm512_castsi256_si512(q_lo), q_hi, 1);
    q = _mm512_max_epi32(_mm512_min_epi32(q, lim), _mm512_sub_epi32(_mm512_setzero_si512(), lim));
    for (int d = 0; d < 3; ++d) {
      __m512i e = _mm512_sub_epi32(_mm512_and_si512(_mm512_add_epi32(q, c128), c255), c128);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(buf + d * stride + k), _mm512_cvtepi32_epi8(e));
      e_sum[d] = _mm512_add_epi32(e_sum[d], e);
      q = _mm512_srai_epi32(_mm512_sub_epi32(q, e), 8);  // exact: q - e is a multiple of 256
    }
  }
  for (int d = 0; d < 3; ++d) {
    std::memset(buf + d * stride + kp, 0, 64);
    out->sum[d] = _mm512_reduce_add_epi32(e_sum[d]);  // |sum| <= 128 kp: no overflow below 2^24 columns
  }
  return true;
}

// MakeXDigits for CPUs without AVX-512 (the AVX-VNNI path): the same digits, element by element
// (round to nearest even in double, as _mm512_cvtpd_epi32 does under the default MXCSR).
LTJAX_AVX2 inline bool MakeXDigitsScalar(const float* x, int64_t kp, int8_t* buf, XDigits* out) {
  float a = 0.0f;
  for (int64_t k = 0; k < kp; ++k) {
    if (!(std::fabs(x[k]) <= 3.4028234663852886e38f)) return false;  // NaN or inf
    a = std::max(a, std::fabs(x[k]));
  }
  const int64_t stride = kp + 64;
  out->d = buf;
  out->stride = stride;
  out->qs = a > 0 ? static_cast<double>(a) / kQMax : 1.0;
  const double inv = 1.0 / out->qs;
  int64_t e_sum[3] = {0, 0, 0};
  for (int64_t k = 0; k < kp; ++k) {
    int64_t q = static_cast<int64_t>(std::nearbyint(static_cast<double>(x[k]) * inv));
    q = std::max(-kQMax, std::min(kQMax, q));
    for (int d = 0; d < 3; ++d) {
      const int64_t e = ((q + 128) & 255) - 128;
      buf[d * stride + k] = static_cast<int8_t>(e);
      e_sum[d] += e;
      q = (q - e) >> 8;
    }
  }
  for (int d = 0; d < 3; ++d) {
    std::memset(buf + d * stride + kp, 0, 64);
    out->sum[d] = e_sum[d];
  }
  return true;
}

// One span (mask words [w0, w1) of one row, packed codes from base + s) into the row's three
// int32 digit accumulators acc[0..2]; returns where its codes ended. `last_bits` masks word
// `last` (the row's final, partial word); an odd final word loads only 32 digits.
LTJAX_AVX512_VNNI LTJAX_INLINE int64_t SpanVnni(const uint32_t* mrow, int64_t w0, int64_t w1, int64_t last,
                                                uint32_t last_bits, const int8_t* base, int64_t s,
                                                const int8_t* const* d, __m512i* acc) {
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  __m512i c0 = _mm512_loadu_si512(acc), c1 = _mm512_loadu_si512(acc + 1), c2 = _mm512_loadu_si512(acc + 2);
  int64_t w = w0;
  for (; w + 2 <= w1; w += 2) {
    uint64_t lo = mrow[w], hi = w + 1 == last ? (mrow[w + 1] & last_bits) : mrow[w + 1];
    uint64_t m = lo | (hi << 32);
    __m512i v = _mm512_xor_si512(_mm512_maskz_expandloadu_epi8(m, base + s), flip);
    s += __builtin_popcountll(m);
    c0 = _mm512_dpbusd_epi32(c0, v, _mm512_loadu_si512(d[0] + 32 * w));
    c1 = _mm512_dpbusd_epi32(c1, v, _mm512_loadu_si512(d[1] + 32 * w));
    c2 = _mm512_dpbusd_epi32(c2, v, _mm512_loadu_si512(d[2] + 32 * w));
  }
  if (w < w1) {
    uint32_t m = w == last ? (mrow[w] & last_bits) : mrow[w];
    __m512i v = _mm512_xor_si512(_mm512_maskz_expandloadu_epi8(m, base + s), flip);
    s += __builtin_popcount(m);
    c0 = _mm512_dpbusd_epi32(c0, v, _mm512_maskz_loadu_epi8(0xffffffffull, d[0] + 32 * w));
    c1 = _mm512_dpbusd_epi32(c1, v, _mm512_maskz_loadu_epi8(0xffffffffull, d[1] + 32 * w));
    c2 = _mm512_dpbusd_epi32(c2, v, _mm512_maskz_loadu_epi8(0xffffffffull, d[2] + 32 * w));
  }
  _mm512_storeu_si512(acc, c0), _mm512_storeu_si512(acc + 1, c1), _mm512_storeu_si512(acc + 2, c2);
  return s;
}

// The common span, 256 full columns (8 mask words), for two rows at once: the span's 12
// digit vectors stay in registers for the whole block of rows, the two rows' expands overlap.
LTJAX_AVX512_VNNI LTJAX_INLINE int64_t Span8x2Vnni(const uint32_t* ma, const uint32_t* mb, const int8_t* base,
                                                   int64_t s, const __m512i (*X)[3], __m512i* acc) {
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  uint64_t m[8];
  std::memcpy(m, ma, 32);
  std::memcpy(m + 4, mb, 32);
  int64_t sa = s, sb = s;
  for (int q = 0; q < 4; ++q) sb += __builtin_popcountll(m[q]);
  __m512i a0 = _mm512_loadu_si512(acc), a1 = _mm512_loadu_si512(acc + 1), a2 = _mm512_loadu_si512(acc + 2);
  __m512i b0 = _mm512_loadu_si512(acc + 3), b1 = _mm512_loadu_si512(acc + 4), b2 = _mm512_loadu_si512(acc + 5);
#pragma GCC unroll 4
  for (int q = 0; q < 4; ++q) {
    __m512i va = _mm512_xor_si512(_mm512_maskz_expandloadu_epi8(m[q], base + sa), flip);
    __m512i vb = _mm512_xor_si512(_mm512_maskz_expandloadu_epi8(m[4 + q], base + sb), flip);
    sa += __builtin_popcountll(m[q]);
    sb += __builtin_popcountll(m[4 + q]);
    a0 = _mm512_dpbusd_epi32(a0, va, X[q][0]), a1 = _mm512_dpbusd_epi32(a1, va, X[q][1]);
    a2 = _mm512_dpbusd_epi32(a2, va, X[q][2]);
    b0 = _mm512_dpbusd_epi32(b0, vb, X[q][0]), b1 = _mm512_dpbusd_epi32(b1, vb, X[q][1]);
    b2 = _mm512_dpbusd_epi32(b2, vb, X[q][2]);
  }
  _mm512_storeu_si512(acc, a0), _mm512_storeu_si512(acc + 1, a1), _mm512_storeu_si512(acc + 2, a2);
  _mm512_storeu_si512(acc + 3, b0), _mm512_storeu_si512(acc + 4, b1), _mm512_storeu_si512(acc + 5, b2);
  return sb;
}

// ---- AVX-VNNI (ymm, VEX: AVX2 CPUs with vpdpbusd, e.g. Intel client cores since Alder Lake)
// The same digits and sums 32 columns (one mask word) at a time: the word's codes expanded by
// table (Expand16I8_256, reading within 32 codes of the end from a padded copy), flipped, and
// three vpdpbusd against the digits, read from L1 (16 ymm registers cannot hold a span's 24).
LTJAX_AVX2_VNNI LTJAX_INLINE __m256i FlippedCodes32(uint32_t m, const int8_t* base, int64_t s, int64_t nnz) {
  alignas(32) int8_t buf[32];
  const int8_t* p = Readable32(base, s, m, nnz, buf);
  const __m128i lo = Expand16I8_256(m & 0xffff, p), hi = Expand16I8_256(m >> 16, p + __builtin_popcount(m & 0xffff));
  return _mm256_xor_si256(_mm256_set_m128i(hi, lo), _mm256_set1_epi8(static_cast<char>(0x80)));
}

LTJAX_AVX2_VNNI LTJAX_INLINE void Dp3(__m256i v, const int8_t* const* d, int64_t w, __m256i* acc) {
#if LTJAX_HAS_AVXVNNI
  for (int e = 0; e < 3; ++e)
    acc[e] = _mm256_dpbusd_avx_epi32(acc[e], v, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(d[e] + 32 * w)));
#else
  (void)v, (void)d, (void)w, (void)acc;
  __builtin_trap();  // unreachable: CurrentVnni() never picks AVX-VNNI in such a build
#endif
}

// The two vector widths as policies of one driver (GemvDigits below): per-row accumulators
// (kAccBytes: three int32 vectors), the generic span, the 256-column two-row span, the lane sum.
struct ZmmVnni {
  static constexpr int64_t kAccBytes = 3 * 64;
  struct Digits {
    __m512i X[4][3];
  };
  LTJAX_AVX512_VNNI static void LoadDigits(Digits* x, const int8_t* const* d, int64_t w0) {
    for (int q = 0; q < 4; ++q)
      for (int e = 0; e < 3; ++e) x->X[q][e] = _mm512_loadu_si512(d[e] + 32 * (w0 + 2 * q));
  }
  LTJAX_AVX512_VNNI static int64_t Span(const uint32_t* mrow, int64_t w0, int64_t w1, int64_t last,
                                                     uint32_t last_bits, const int8_t* base, int64_t s, int64_t,
                                                     const int8_t* const* d, void* acc) {
    return SpanVnni(mrow, w0, w1, last, last_bits, base, s, d, static_cast<__m512i*>(acc));
  }
  LTJAX_AVX512_VNNI static int64_t Span8x2(const uint32_t* ma, const uint32_t* mb, const int8_t* base,
                                                        int64_t s, int64_t, const Digits& x, void* acc) {
    return Span8x2Vnni(ma, mb, base, s, x.X, static_cast<__m512i*>(acc));
  }
  LTJAX_AVX512_VNNI static int64_t LaneSum(const void* acc, int e) {
    return _mm512_reduce_add_epi32(_mm512_loadu_si512(static_cast<const __m512i*>(acc) + e));
  }
};

struct YmmVnni {
  static constexpr int64_t kAccBytes = 3 * 32;
  struct Digits {
    const int8_t* d[3];
  };
  LTJAX_AVX2_VNNI static void LoadDigits(Digits* x, const int8_t* const* d, int64_t w0) {
    for (int e = 0; e < 3; ++e) x->d[e] = d[e] + 32 * w0;  // the span's first word
  }
  LTJAX_AVX2_VNNI static int64_t Span(const uint32_t* mrow, int64_t w0, int64_t w1, int64_t last,
                                                   uint32_t last_bits, const int8_t* base, int64_t s, int64_t nnz,
                                                   const int8_t* const* d, void* acc) {
    auto* a = static_cast<__m256i*>(acc);
    __m256i c[3] = {_mm256_loadu_si256(a), _mm256_loadu_si256(a + 1), _mm256_loadu_si256(a + 2)};
    for (int64_t w = w0; w < w1; ++w) {
      const uint32_t m = w == last ? (mrow[w] & last_bits) : mrow[w];
      Dp3(FlippedCodes32(m, base, s, nnz), d, w, c);
      s += __builtin_popcount(m);
    }
    for (int e = 0; e < 3; ++e) _mm256_storeu_si256(a + e, c[e]);
    return s;
  }
  // Rows a and b over one 8-word span (all full words): b's codes follow a's.
  LTJAX_AVX2_VNNI static int64_t Span8x2(const uint32_t* ma, const uint32_t* mb, const int8_t* base,
                                                      int64_t s, int64_t nnz, const Digits& x, void* acc) {
    auto* a = static_cast<__m256i*>(acc);
    __m256i ca[3], cb[3];
    for (int e = 0; e < 3; ++e) ca[e] = _mm256_loadu_si256(a + e), cb[e] = _mm256_loadu_si256(a + 3 + e);
    int64_t sb = s;
    for (int q = 0; q < 8; ++q) sb += __builtin_popcount(ma[q]);
#pragma GCC unroll 8
    for (int q = 0; q < 8; ++q) {
      Dp3(FlippedCodes32(ma[q], base, s, nnz), x.d, q, ca);
      Dp3(FlippedCodes32(mb[q], base, sb, nnz), x.d, q, cb);
      s += __builtin_popcount(ma[q]);
      sb += __builtin_popcount(mb[q]);
    }
    for (int e = 0; e < 3; ++e) _mm256_storeu_si256(a + e, ca[e]), _mm256_storeu_si256(a + 3 + e, cb[e]);
    return sb;
  }
  LTJAX_AVX2_VNNI static int64_t LaneSum(const void* acc, int e) {
    const __m256i v = _mm256_loadu_si256(static_cast<const __m256i*>(acc) + e);
    __m128i t = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4e));
    t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0xb1));
    return _mm_cvtsi128_si32(t);
  }
};

// Whether the int32 lanes are safe: a row adds at most 4 * 255 * 128 to a lane per lane step
// (64 columns for zmm, 32 for ymm).
inline bool VnniRowFits(const BitmaskGeometry& g) {
  const int64_t words_per_step = CurrentVnni() == Vnni::kAvx512 ? 2 : 1;
  return (g.w + words_per_step - 1) / words_per_step * 4 * 255 * 128 < (int64_t{1} << 31);
}

// y[n] = scales[n] * dot(row n, x) for rows [n0, n1) of a bitmask_int8 matrix, from x's digits.
// Rows go in blocks of up to kRows inside one tile row, and each block walks the tile columns
// in turn (the span's digits stay in registers; per-row accumulators in a thread's scratch).
// Every block's span of codes is checked against [0, nnz) before it is read, as in RowCursor.
// Flattened into GemvI8_Vnni (zmm) and GemvI8_AvxVnni (ymm), each compiled for its own ISA (an
// always_inline template would be checked against the baseline ISA before it is inlined).
template <class V>
inline bool GemvDigits(const BitmaskGeometry& g, const int8_t* base, const XDigits& xd, const float* scales,
                             int64_t n0, int64_t n1, Elt elt, void* y) {
  // Cold-cache prefetch (measured: docs/ffi.md "bitmask_int8 at M = 1"): a row's mask words of
  // one tile column are 4*w bytes apart from the next row's, a stride the hardware prefetchers
  // do not follow ahead, and the codes of a tile column are one sequential stream per block.
  constexpr int64_t kRows = 128, kMaskAhead = 16, kCodesAhead = 4096;
  const int64_t wpt = g.gc == 1 ? g.w : g.tc / 32, last = g.w - 1;
  const int8_t* d[3] = {xd.d, xd.d + xd.stride, xd.d + 2 * xd.stride};
  char* acc = reinterpret_cast<char*>(Scratch(0, kRows * V::kAccBytes / 4));
  std::vector<int64_t> cur(g.gc);
  RowCursor start(g, n0);  // where each tile column's codes continue at row n0
  for (int64_t j = 0; j < g.gc; ++j) cur[j] = start.next(j);
  for (int64_t n = n0; n < n1;) {
    const int64_t tile_end = (n / g.tr + 1) * g.tr, nb = std::min({n1, tile_end, n + kRows}) - n;
    std::memset(acc, 0, nb * V::kAccBytes);
    for (int64_t j = 0; j < g.gc; ++j) {
      const int64_t w0 = j * wpt, w1 = std::min(g.w, w0 + wpt);
      int64_t s = cur[j];
      if (s < 0 || s + 32 * (w1 - w0) * nb > g.nnz) {  // near the end of the codes: count exactly
        int64_t cnt = 0;
        for (int64_t r = n; r < n + nb; ++r) cnt += SpanCount(g, r, j, wpt);
        if (s < 0 || s + cnt > g.nnz) return false;
      }
      const uint32_t* mrow = g.mask + n * g.w;
      int64_t r = 0;
      if (w1 - w0 == 8 && (w1 < g.w || g.last_word == 0xffffffffu)) {
        typename V::Digits x;
        V::LoadDigits(&x, d, w0);
        for (; r + 2 <= nb; r += 2) {
          if ((j & 1) == 0 && r + kMaskAhead + 2 <= nb) {  // one 64-byte line holds two tile columns
            _mm_prefetch(reinterpret_cast<const char*>(mrow + (r + kMaskAhead) * g.w + w0), _MM_HINT_T0);
            _mm_prefetch(reinterpret_cast<const char*>(mrow + (r + kMaskAhead + 1) * g.w + w0), _MM_HINT_T0);
          }
          for (int q = 0; q < 4; ++q) _mm_prefetch(reinterpret_cast<const char*>(base + s + kCodesAhead + 64 * q), _MM_HINT_T0);
          s = V::Span8x2(mrow + r * g.w + w0, mrow + (r + 1) * g.w + w0, base, s, g.nnz, x, acc + r * V::kAccBytes);
        }
      }
      for (; r < nb; ++r)
        s = V::Span(mrow + r * g.w, w0, w1, last, g.last_word, base, s, g.nnz, d, acc + r * V::kAccBytes);
      cur[j] = s;
    }
    for (int64_t r = 0; r < nb; ++r) {
      int64_t q[3];
      for (int e = 0; e < 3; ++e) q[e] = V::LaneSum(acc + r * V::kAccBytes, e) - 128 * xd.sum[e];
      double dot = static_cast<double>(q[0] + 256 * q[1] + 65536 * q[2]) * xd.qs;
      StoreOut(elt, y, n + r, static_cast<float>(dot) * scales[n + r]);
    }
    n += nb;
    if (n == tile_end && n < g.c)
      for (int64_t j = 0; j < g.gc; ++j) cur[j] = g.offsets[(n / g.tr) * g.gc + j];
  }
  return true;
}

LTJAX_AVX512_VNNI __attribute__((flatten)) inline bool GemvI8_Vnni(const BitmaskGeometry& g, const int8_t* base,
                                                                  const XDigits& xd, const float* scales, int64_t n0,
                                                                  int64_t n1, Elt elt, void* y) {
  return GemvDigits<ZmmVnni>(g, base, xd, scales, n0, n1, elt, y);
}
LTJAX_AVX2_VNNI __attribute__((flatten)) inline bool GemvI8_AvxVnni(const BitmaskGeometry& g, const int8_t* base,
                                                                   const XDigits& xd, const float* scales, int64_t n0,
                                                                   int64_t n1, Elt elt, void* y) {
  return GemvDigits<YmmVnni>(g, base, xd, scales, n0, n1, elt, y);
}

inline bool RowDot(Packed P, RowCursor& cur, const void* packed, const float* x, float* out) {
  if (CurrentIsa() != Isa::kAvx512) {
    switch (P) {
      case Packed::kI8: return RowDot_256<Packed::kI8>(cur, packed, x, out);
      case Packed::kF32: return RowDot_256<Packed::kF32>(cur, packed, x, out);
      case Packed::kBf16: return RowDot_256<Packed::kBf16>(cur, packed, x, out);
      default: return RowDot_256<Packed::kF16>(cur, packed, x, out);
    }
  }
  switch (P) {
    case Packed::kI8: return RowDotI8_512(cur, packed, x, out);
    case Packed::kF32: return RowDot_512<Packed::kF32>(cur, packed, x, out);
    case Packed::kBf16: return RowDot_512<Packed::kBf16>(cur, packed, x, out);
    default: return RowDot_512<Packed::kF16>(cur, packed, x, out);
  }
}

inline bool RowF32(Packed P, RowCursor& cur, const void* packed, int64_t words, float* dst) {
  if (CurrentIsa() == Isa::kAvx512) {
    switch (P) {
      case Packed::kI8: return RowF32_512<Packed::kI8>(cur, packed, words, dst);
      case Packed::kF32: return RowF32_512<Packed::kF32>(cur, packed, words, dst);
      case Packed::kBf16: return RowF32_512<Packed::kBf16>(cur, packed, words, dst);
      case Packed::kF16: return RowF32_512<Packed::kF16>(cur, packed, words, dst);
    }
  }
  switch (P) {
    case Packed::kI8: return RowF32_256<Packed::kI8>(cur, packed, dst);
    case Packed::kF32: return RowF32_256<Packed::kF32>(cur, packed, dst);
    case Packed::kBf16: return RowF32_256<Packed::kBf16>(cur, packed, dst);
    default: return RowF32_256<Packed::kF16>(cur, packed, dst);
  }
}

inline bool RowBits(Packed P, RowCursor& cur, const void* packed, int64_t words, void* dst) {
  if (CurrentIsa() == Isa::kAvx512) {
    switch (P) {
      case Packed::kI8: return RowBits_512<Packed::kI8>(cur, packed, words, dst);
      case Packed::kF32: return RowBits_512<Packed::kF32>(cur, packed, words, dst);
      case Packed::kBf16: return RowBits_512<Packed::kBf16>(cur, packed, words, dst);
      case Packed::kF16: return RowBits_512<Packed::kF16>(cur, packed, words, dst);
    }
  }
  switch (P) {
    case Packed::kI8: return RowBits_256<Packed::kI8>(cur, packed, dst);
    case Packed::kF32: return RowBits_256<Packed::kF32>(cur, packed, dst);
    case Packed::kBf16: return RowBits_256<Packed::kBf16>(cur, packed, dst);
    default: return RowBits_256<Packed::kF16>(cur, packed, dst);
  }
}

// A `RowDecoder` over a bitmask matrix (f32 rows, unscaled).
class BitmaskRows : public RowDecoder {
 public:
  BitmaskRows(const BitmaskGeometry& g, Packed p, const void* packed, int64_t row0)
      : cur_(g, row0), p_(p), packed_(packed), words_(g.w) {}
  bool Row(int64_t n, float* dst) override {
    if (n != cur_.row()) return false;
    return RowF32(p_, cur_, packed_, words_, dst);
  }
  bool HasDot() const override { return true; }
  bool Dot(int64_t n, const float* x, float* out) override {
    if (n != cur_.row()) return false;
    return RowDot(p_, cur_, packed_, x, out);
  }

 private:
  RowCursor cur_;
  Packed p_;
  const void* packed_;
  int64_t words_;
};

}  // namespace ltjax
