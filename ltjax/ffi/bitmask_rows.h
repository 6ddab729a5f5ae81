// Decoding one storage row of a bitmask codec: mask words + packed values (tile-major) ->
// a dense row. AVX-512 VBMI2 expands 32 packed elements per mask word in registers
// (masked load of popcount(word) elements, then vpexpand{b,w,d}); the AVX2 path scatters
// set bits one at a time. Shared by bitmask_matmul.cc and bitmask_unpack.cc.
#pragma once

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

inline float PackedToF32(Packed P, const void* packed, int64_t i) {
  switch (P) {
    case Packed::kI8: return static_cast<float>(static_cast<const int8_t*>(packed)[i]);
    case Packed::kF32: return static_cast<const float*>(packed)[i];
    case Packed::kBf16: return Bf16ToF32(static_cast<const uint16_t*>(packed)[i]);
    default: return F16ToF32(static_cast<const uint16_t*>(packed)[i]);
  }
}

// Portable (AVX2-machine) versions: one set bit at a time.
inline bool RowF32_Scalar(Packed P, RowCursor& cur, const void* packed, int64_t words, float* dst) {
  std::fill(dst, dst + 32 * words, 0.0f);
  return cur.Row([&](int64_t w, uint32_t m, int64_t s) {
    for (float* d = dst + 32 * w; m; m &= m - 1) d[__builtin_ctz(m)] = PackedToF32(P, packed, s++);
  });
}

inline bool RowBits_Scalar(Packed P, RowCursor& cur, const void* packed, int64_t words, void* dst) {
  size_t es = P == Packed::kI8 ? 1 : P == Packed::kF32 ? 4 : 2;
  std::memset(dst, 0, 32 * words * es);
  return cur.Row([&](int64_t w, uint32_t m, int64_t s) {
    for (; m; m &= m - 1, ++s)
      std::memcpy(static_cast<char*>(dst) + (32 * w + __builtin_ctz(m)) * es,
                  static_cast<const char*>(packed) + s * es, es);
  });
}

// int8 version of RowDot_512 taking two mask words per step: one masked load of
// popcount(64-bit mask) codes, one 64-byte vpexpandb, four conversions + FMAs (half the
// popcounts, loads and expands per element of the 32-bit walk; the M = 1 bitmask_int8 path is
// compute-bound, see docs/ffi.md "Cold-cache GEMV").
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
    }
  });
  *out = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
  return ok;
}

inline bool RowDot(Packed P, RowCursor& cur, const void* packed, const float* x, float* out) {
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
  return RowF32_Scalar(P, cur, packed, words, dst);
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
  return RowBits_Scalar(P, cur, packed, words, dst);
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
  bool HasDot() const override { return CurrentIsa() == Isa::kAvx512; }
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
