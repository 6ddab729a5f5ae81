// Decoding int4 storage rows (docs/int4.md): codes [N, K/2] uint8, column 2j in the low nibble of
// byte j and 2j + 1 in the high one; float16 scales [N, K/G] per group of G (32, 64, 128) columns;
// float16 mins [N, K/G] when asymmetric. A weight is (q - 8) * s (symmetric) or q * s + m, in f32.
// Shared by int4_matmul.cc and int4_unpack.cc. The ways to use a row:
//
//  * `Int4RowF32`: the decoded row, f32, in column order, into a buffer (the M > 1 micro-kernel,
//    the transposed product, unpack). Per 32 columns: 16 code bytes, the two nibbles masked out
//    and interleaved back into column order (vpunpck{l,h}bw), 8 taken off when symmetric,
//    widened, converted, and fma(q', s, c) with c = -0.0 or m: exactly the reference's f32 weight
//    ((q - 8) s has at most 14 significant bits, and adding -0.0 keeps its sign; q s + m is q s,
//    exact, plus m, rounded once), so unpack is bit-exact.
//  * M = 1, the default: `GemvInt4Vnni` (AVX-512 VNNI) and `GemvInt4Avx2Int` (AVX2): x as 24-bit
//    integers (bitmask_rows.h, XDigits), the nibbles (0..15, the unsigned operand) multiplied by
//    its three digits in exact int32 sums, one f32 product per 8 columns and group scale.
//  * M = 1, `GemvInt4F32_512` / `_256`, the f32 walk (LTJAX_FFI_VNNI=0, or NaN/inf in x): each
//    weight decoded in registers against x in "nibble order" (per 32 columns, the 16 even columns
//    then the 16 odd ones; per 16 on AVX2), so the nibbles need no interleave; f32 products and
//    sums, as the reference's.
#pragma once

#include "bitmask_rows.h"

namespace ltjax {

constexpr int64_t kInt4Block = 128;  // columns per step of the VNNI GEMV (64 code bytes, one zmm)
// The GEMVs prefetch the codes of the rows this many ahead, at the column they are reading, into
// L2 (the int8 GEMV's scheme, docs/ffi.md "Cold-cache GEMV": a row of K = 8192 int4 codes is one
// 4 KiB page, where the hardware prefetchers stop). Into L2, not L1: 8 rows ahead into L1 is 32 KiB,
// a Zen 4 core's whole L1D, so the lines were evicted before use (8192^2, cold, 2 threads: median
// 2.7 ms with _MM_HINT_T0 8 rows ahead, 2.2-2.4 ms with _MM_HINT_T1 8 or 16 ahead, 3.5 ms without).
constexpr int64_t kInt4PrefetchRows = 16;

struct Int4Weight {
  const uint8_t* codes;   // [n, k / 2]
  const uint16_t* scales; // [n, k / g] float16
  const uint16_t* mins;   // [n, k / g] float16, or null (symmetric)
  int64_t n, k, g;
  int64_t groups() const { return k / g; }
  int64_t ld() const { return k / 2; }
};

// `count` float16 values as f32, then 16 zeros. (It calls nothing beyond the AVX2 level, which
// every ISA the handlers run on has.)
LTJAX_AVX2 inline void F16RowToF32(const uint16_t* h, int64_t count, float* out) {
  int64_t g = 0;
  for (; g + 8 <= count; g += 8)
    _mm256_storeu_ps(out + g, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h + g))));
  for (; g < count; ++g) out[g] = F16ToF32(h[g]);
  std::fill(out + count, out + count + 16, 0.0f);
}

// Row n's scales s and (c non-null) offsets c as f32, padded with 16 zeros. A weight is then
// fma(q, s, c) with c = m, or -8 s when symmetric (the GEMVs: a dot product has no use for the
// sign of a zero weight); `exact`: fma(q - 8, s, -0.0) when symmetric, which is (q - 8) * s with
// its sign of zero (q = 8 and s < 0 give -0.0, as the reference decoder).
LTJAX_AVX2 inline void Int4RowScales(const Int4Weight& w, int64_t n, float* s, float* c, bool exact = false) {
  const int64_t groups = w.groups();
  F16RowToF32(w.scales + n * groups, groups, s);
  if (!c) return;
  if (w.mins) return F16RowToF32(w.mins + n * groups, groups, c);
  for (int64_t g = 0; g < groups + 16; ++g) c[g] = exact ? -0.0f : -8.0f * s[g];
}

// ---------------------------------------------------------------- decoded rows (column order)
// (`s`, `c` from Int4RowScales(..., exact = true): the codes lose 8 first when symmetric.)
LTJAX_AVX512 inline void Int4RowF32_512(const Int4Weight& w, int64_t n, const float* s, const float* c,
                                        int64_t kp, float* dst) {
  const uint8_t* p = w.codes + n * w.ld();
  const __m128i m4 = _mm_set1_epi8(0x0f), off = _mm_set1_epi8(w.mins ? 0 : 8);
  for (int64_t g = 0; g < w.groups(); ++g) {
    const __m512 vs = _mm512_set1_ps(s[g]), vc = _mm512_set1_ps(c[g]);
    for (int64_t j = g * w.g; j < (g + 1) * w.g; j += 32) {
      const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + j / 2));
      const __m128i lo = _mm_and_si128(v, m4), hi = _mm_and_si128(_mm_srli_epi16(v, 4), m4);
      const __m128i a = _mm_sub_epi8(_mm_unpacklo_epi8(lo, hi), off);  // columns j .. j + 15
      const __m128i b = _mm_sub_epi8(_mm_unpackhi_epi8(lo, hi), off);  // columns j + 16 .. j + 31
      _mm512_storeu_ps(dst + j, _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(a)), vs, vc));
      _mm512_storeu_ps(dst + j + 16, _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b)), vs, vc));
    }
  }
  std::fill(dst + w.k, dst + kp, 0.0f);
}

LTJAX_AVX2 inline void Int4RowF32_256(const Int4Weight& w, int64_t n, const float* s, const float* c, int64_t kp,
                                      float* dst) {
  const uint8_t* p = w.codes + n * w.ld();
  const __m128i m4 = _mm_set1_epi8(0x0f), off = _mm_set1_epi8(w.mins ? 0 : 8);
  for (int64_t g = 0; g < w.groups(); ++g) {
    const __m256 vs = _mm256_set1_ps(s[g]), vc = _mm256_set1_ps(c[g]);
    for (int64_t j = g * w.g; j < (g + 1) * w.g; j += 16) {
      const __m128i v = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + j / 2));
      const __m128i lo = _mm_and_si128(v, m4), hi = _mm_and_si128(_mm_srli_epi16(v, 4), m4);
      const __m128i a = _mm_sub_epi8(_mm_unpacklo_epi8(lo, hi), off);  // columns j .. j + 15
      _mm256_storeu_ps(dst + j, _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(a)), vs, vc));
      _mm256_storeu_ps(dst + j + 8,
                       _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(a, 8))), vs, vc));
    }
  }
  std::fill(dst + w.k, dst + kp, 0.0f);
}

// Row n decoded to f32 [kp] (zeros past k); `sc` holds room for its scales (2 * (groups + 16)).
inline void Int4RowF32(const Int4Weight& w, int64_t n, int64_t kp, float* sc, float* dst) {
  const int64_t gs = w.groups() + 16;
  Int4RowScales(w, n, sc, sc + gs, /*exact=*/true);
  if (CurrentIsa() == Isa::kAvx512) return Int4RowF32_512(w, n, sc, sc + gs, kp, dst);
  return Int4RowF32_256(w, n, sc, sc + gs, kp, dst);
}

// A `RowDecoder` over int4 storage (decoded f32 rows, scales applied: the drivers get no scales).
class Int4Rows : public RowDecoder {
 public:
  Int4Rows(const Int4Weight& w, int64_t kp) : w_(w), kp_(kp), sc_(2 * (w.groups() + 16)) {}
  bool Row(int64_t n, float* dst) override {
    Int4RowF32(w_, n, kp_, sc_.data(), dst);
    return true;
  }

 private:
  Int4Weight w_;
  int64_t kp_;
  std::vector<float> sc_;
};

// ---------------------------------------------------------------- M = 1, f32
// x in nibble order: per `p` columns (32 for zmm, 16 for ymm) the p/2 even columns, then the odd.
inline void Int4NibbleOrder(const float* x, int64_t kp, int64_t p, float* out) {
  for (int64_t j = 0; j < kp; j += p)
    for (int64_t i = 0; i < p / 2; ++i) {
      out[j + i] = x[j + 2 * i];
      out[j + p / 2 + i] = x[j + 2 * i + 1];
    }
}

// out[r] = dot(decoded row n + r, x) for R rows; `xn` in nibble order of 32; `s`, `c` the rows'
// scales and offsets (row r at r * gs); `pf`: the rows to prefetch (kInt4PrefetchRows ahead).
template <int R>
LTJAX_AVX512 LTJAX_INLINE void DotInt4F32_512(const Int4Weight& w, int64_t n, const float* xn, const float* s,
                                              const float* c, int64_t gs, const uint8_t* pf, float* out) {
  const int64_t ld = w.ld();
  const __m128i m4 = _mm_set1_epi8(0x0f);
  const uint8_t* p[R];
  __m512 a[R], b[R];
  for (int r = 0; r < R; ++r) p[r] = w.codes + (n + r) * ld, a[r] = b[r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < w.groups(); ++g) {
    __m512 vs[R], vc[R];
    for (int r = 0; r < R; ++r) vs[r] = _mm512_set1_ps(s[r * gs + g]), vc[r] = _mm512_set1_ps(c[r * gs + g]);
    for (int64_t j = g * w.g; j < (g + 1) * w.g; j += 32) {
      if ((j & 127) == 0)
        for (int r = 0; r < R; ++r) _mm_prefetch(reinterpret_cast<const char*>(pf + r * ld + j / 2), _MM_HINT_T1);
      const __m512 x0 = _mm512_loadu_ps(xn + j), x1 = _mm512_loadu_ps(xn + j + 16);
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p[r] + j / 2));
        const __m128i lo = _mm_and_si128(v, m4), hi = _mm_and_si128(_mm_srli_epi16(v, 4), m4);
        a[r] = _mm512_fmadd_ps(_mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(lo)), vs[r], vc[r]), x0, a[r]);
        b[r] = _mm512_fmadd_ps(_mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(hi)), vs[r], vc[r]), x1, b[r]);
      }
    }
  }
  for (int r = 0; r < R; ++r) out[r] = _mm512_reduce_add_ps(_mm512_add_ps(a[r], b[r]));
}

// The same for AVX2; `xn` in nibble order of 16. Two partial sums per row (even and odd columns)
// take 8 of the 16 ymm registers, so each row's scale and offset are broadcast from L1 at each use.
template <int R>
LTJAX_AVX2 LTJAX_INLINE void DotInt4F32_256(const Int4Weight& w, int64_t n, const float* xn, const float* s,
                                            const float* c, int64_t gs, const uint8_t* pf, float* out) {
  const int64_t ld = w.ld();
  const __m128i m4 = _mm_set1_epi8(0x0f);
  const uint8_t* p[R];
  __m256 a[R], b[R];
  for (int r = 0; r < R; ++r) p[r] = w.codes + (n + r) * ld, a[r] = b[r] = _mm256_setzero_ps();
  for (int64_t g = 0; g < w.groups(); ++g) {
    for (int64_t j = g * w.g; j < (g + 1) * w.g; j += 16) {
      if ((j & 127) == 0)
        for (int r = 0; r < R; ++r) _mm_prefetch(reinterpret_cast<const char*>(pf + r * ld + j / 2), _MM_HINT_T1);
      const __m256 x0 = _mm256_loadu_ps(xn + j), x1 = _mm256_loadu_ps(xn + j + 8);
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        const __m256 vs = _mm256_broadcast_ss(s + r * gs + g), vc = _mm256_broadcast_ss(c + r * gs + g);
        const __m128i v = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p[r] + j / 2));
        const __m128i lo = _mm_and_si128(v, m4), hi = _mm_and_si128(_mm_srli_epi16(v, 4), m4);
        a[r] = _mm256_fmadd_ps(_mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo)), vs, vc), x0, a[r]);
        b[r] = _mm256_fmadd_ps(_mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi)), vs, vc), x1, b[r]);
      }
    }
  }
  for (int r = 0; r < R; ++r) out[r] = Hsum256(_mm256_add_ps(a[r], b[r]));
}

// y[n] for rows [n0, n1), f32 walk: four rows per pass (x loaded once for four; four streams in
// flight), the rest one by one. `xn` in nibble order of 32 (AVX-512) or 16 (AVX2). One copy per
// ISA: each inlines its kernel, compiled for that ISA.
#define LTJAX_GEMV_INT4_F32(NAME, TARGET, DOT)                                               \
  TARGET inline void NAME(const Int4Weight& w, const float* xn, int64_t n0, int64_t n1, Elt elt, void* y) { \
    const int64_t gs = w.groups() + 16;                                                     \
    float* s = Scratch(0, 8 * gs);                                                          \
    float* c = s + 4 * gs;                                                                  \
    float d[4];                                                                             \
    for (int64_t n = n0; n < n1;) {                                                         \
      const int rows = n + 4 <= n1 ? 4 : 1;                                                 \
      for (int r = 0; r < rows; ++r) Int4RowScales(w, n + r, s + r * gs, c + r * gs);       \
      if (rows == 4) DOT<4>(w, n, xn, s, c, gs, w.codes + std::min(n + kInt4PrefetchRows, w.n - 4) * w.ld(), d); \
      else DOT<1>(w, n, xn, s, c, gs, w.codes + n * w.ld(), d);                             \
      for (int r = 0; r < rows; ++r) StoreOut(elt, y, n + r, d[r]);                         \
      n += rows;                                                                            \
    }                                                                                       \
  }
LTJAX_GEMV_INT4_F32(GemvInt4F32_512, LTJAX_AVX512, DotInt4F32_512)
LTJAX_GEMV_INT4_F32(GemvInt4F32_256, LTJAX_AVX2, DotInt4F32_256)
#undef LTJAX_GEMV_INT4_F32

// ---------------------------------------------------------------- M = 1, VNNI (exact integer sums)
// x is written once per call as 24-bit integers, e_k = round(x_k / qs), qs = max|x| / 8355711, in
// three balanced base-256 digits (MakeXDigits), and laid out in nibble order per 128 columns: for
// block b and digit d, 64 bytes for the even columns b*128 + 2i, then 64 for the odd ones. One zmm
// of 64 code bytes then gives two vectors of codes (low nibbles: even columns; high: odd), and
// vpdpbusd of each against the matching digit vector puts, in int32 lane L, the sum over columns
// b*128 + 8L .. 8L + 7: eight consecutive columns, inside one group for every G. Per block and
// row: 6 vpdpbusd into one accumulator, shifted by 8 bits between digits, t = 65536 T2 + 256 T1
// + T0 - 8 E_lane (E_lane = sum of e over the lane's
// columns, from the same digits), so t = sum (q - 8) e exactly (|t| <= 8 * 8 * 8355711 < 2^31,
// intermediate wraps cancel), converted to f32 and multiplied by the lane's group scale into an
// f32 accumulator. Both rules are centred on code 8: q s + m = (q - 8) s + (m + 8 s), so the
// asymmetric rule adds sum_g (m_g + 8 s_g) E_g once per row (E_g: e summed over group g, as f32;
// m + 8 s is the group's midpoint, small where the weights are centred, so the two terms do not
// cancel). y = qs * (that sum).
//
// Error: x rounded to qs, |y - y_exact| <= (qs / 2) * sum_k |w_k|, plus the f32 roundings of the
// lane sums' conversion, the scale products and the sums over blocks and lanes (and, asymmetric,
// of the midpoints and their term): of the order of an f32 dot's own, over terms |(q - 8) s x|
// and |m + 8 s| |x| (tests/test_ffi_int4.py checks the bound against float64, outliers in x
// included). Non-finite x cannot be digits: that call takes the f32 walk.
struct Int4Digits {
  const int8_t* d;    // [blocks][3][2][64]: digit, even/odd columns
  const int32_t* e8;  // [blocks][16]: 8 * E_lane (the centring on code 8)
  const float* eg;    // [groups + 16]: E_g (the asymmetric rule's midpoint term), zeros past the groups
  int64_t blocks;
  double qs;
};

// Bytes of scratch MakeInt4Digits needs for x of `kp` (a multiple of kInt4Block) columns.
inline int64_t Int4DigitsBytes(int64_t kp, int64_t groups) {
  return 3 * (kp + 64) + 64 + 3 * kp + 64 * (kp / kInt4Block) + 4 * (kp / 8) + 4 * (groups + 16) + 256;
}

// From x [kp] (f32, zeros past k, kp a multiple of kInt4Block). False if x is not finite.
LTJAX_AVX512_VNNI inline bool MakeInt4Digits(const float* x, int64_t kp, int64_t group, int8_t* buf,
                                             Int4Digits* out) {
  XDigits nat;  // digits in column order
  if (!MakeXDigits(x, kp, buf, &nat)) return false;
  const int64_t blocks = kp / kInt4Block, groups = kp / group;
  auto align = [](int8_t* p) { return reinterpret_cast<int8_t*>((reinterpret_cast<uintptr_t>(p) + 63) & ~uintptr_t{63}); };
  int8_t* dst = align(buf + 3 * nat.stride);
  int32_t* e8 = reinterpret_cast<int32_t*>(dst + 3 * kp);
  int32_t* elane = e8 + 16 * blocks;
  float* eg = reinterpret_cast<float*>(elane + kp / 8);
  // Per 128-bit lane: its 8 even bytes, then its 8 odd ones; then the lanes' even halves first.
  const __m512i ctl = _mm512_set4_epi32(0x0f0d0b09, 0x07050301, 0x0e0c0a08, 0x06040200);
  const __m512i qidx = _mm512_setr_epi64(0, 2, 4, 6, 1, 3, 5, 7);
  const __m512i ones = _mm512_set1_epi8(1);
  for (int64_t b = 0; b < blocks; ++b) {
    __m512i e[3];
    for (int d = 0; d < 3; ++d) {
      const int8_t* src = nat.d + d * nat.stride + b * kInt4Block;
      const __m512i p0 = _mm512_permutexvar_epi64(qidx, _mm512_shuffle_epi8(_mm512_loadu_si512(src), ctl));
      const __m512i p1 = _mm512_permutexvar_epi64(qidx, _mm512_shuffle_epi8(_mm512_loadu_si512(src + 64), ctl));
      const __m512i even = _mm512_shuffle_i64x2(p0, p1, _MM_SHUFFLE(1, 0, 1, 0));
      const __m512i odd = _mm512_shuffle_i64x2(p0, p1, _MM_SHUFFLE(3, 2, 3, 2));
      _mm512_store_si512(dst + (b * 3 + d) * 128, even);
      _mm512_store_si512(dst + (b * 3 + d) * 128 + 64, odd);
      e[d] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), ones, even), ones, odd);
    }
    const __m512i el = _mm512_add_epi32(e[0], _mm512_add_epi32(_mm512_slli_epi32(e[1], 8), _mm512_slli_epi32(e[2], 16)));
    _mm512_storeu_si512(elane + 16 * b, el);
    _mm512_storeu_si512(e8 + 16 * b, _mm512_slli_epi32(el, 3));
  }
  const int64_t lanes_per_group = group / 8;
  for (int64_t g = 0; g < groups; ++g) {
    int64_t sum = 0;
    for (int64_t l = g * lanes_per_group; l < (g + 1) * lanes_per_group; ++l) sum += elane[l];
    eg[g] = static_cast<float>(sum);
  }
  std::fill(eg + groups, eg + groups + 16, 0.0f);
  out->d = dst;
  out->e8 = e8;
  out->eg = eg;
  out->blocks = blocks;
  out->qs = nat.qs;
  return true;
}

// sum_k (q - 8) s e for R rows (before qs; asymmetric without the midpoints' term). `s`: the rows'
// f32 scales, row r at r * gs, zeros past the groups. The last block may be partial (w.k).
template <int R>
LTJAX_AVX512_VNNI LTJAX_INLINE void DotInt4Vnni(const Int4Weight& w, int64_t n, const Int4Digits& xd,
                                                const float* s, int64_t gs, const uint8_t* pf, float* out) {
  const int64_t ld = w.ld(), full = w.k / kInt4Block, gpb = kInt4Block / w.g;  // groups per block
  const __mmask64 tail = (uint64_t{1} << ((w.k % kInt4Block) / 2)) - 1;      // code bytes of a partial block
  const __m512i m4 = _mm512_set1_epi8(0x0f);
  // lane L of a block sums columns 8L .. 8L + 7: group L * 8 / G of the block's
  const __m512i gidx = _mm512_srli_epi32(_mm512_setr_epi32(0, 8, 16, 24, 32, 40, 48, 56, 64, 72, 80, 88, 96, 104,
                                                           112, 120),
                                         w.g == 32 ? 5 : w.g == 64 ? 6 : 7);
  const uint8_t* p[R];
  __m512 acc[R];
  for (int r = 0; r < R; ++r) p[r] = w.codes + (n + r) * ld, acc[r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < xd.blocks; ++b) {
    const int8_t* dg = xd.d + b * 384;
    const __m512i x0e = _mm512_load_si512(dg), x0o = _mm512_load_si512(dg + 64);
    const __m512i x1e = _mm512_load_si512(dg + 128), x1o = _mm512_load_si512(dg + 192);
    const __m512i x2e = _mm512_load_si512(dg + 256), x2o = _mm512_load_si512(dg + 320);
    const __m512i e8 = _mm512_loadu_si512(xd.e8 + 16 * b);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      _mm_prefetch(reinterpret_cast<const char*>(pf + r * ld + b * 64), _MM_HINT_T1);
      const __m512i v = b < full ? _mm512_loadu_si512(p[r] + b * 64) : _mm512_maskz_loadu_epi8(tail, p[r] + b * 64);
      const __m512i lo = _mm512_and_si512(v, m4), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
      // ((T2 * 256 + T1) * 256 + T0) in one accumulator: the shifts between the digits' sums
      __m512i t = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, x2e), hi, x2o);
      t = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_slli_epi32(t, 8), lo, x1e), hi, x1o);
      t = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_slli_epi32(t, 8), lo, x0e), hi, x0o);
      t = _mm512_sub_epi32(t, e8);
      const __m512 sv = _mm512_permutexvar_ps(gidx, _mm512_loadu_ps(s + r * gs + b * gpb));
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), sv, acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) out[r] = _mm512_reduce_add_ps(acc[r]);
}

// `count` float16 values as f32, then 16 zeros (AVX-512: 16 at a time, the tail masked).
LTJAX_AVX512 inline void F16RowToF32_512(const uint16_t* h, int64_t count, float* out) {
  for (int64_t g = 0; g < count + 16; g += 16) {
    const __mmask16 live = g >= count ? 0 : count - g >= 16 ? 0xffff : static_cast<__mmask16>((1u << (count - g)) - 1);
    _mm512_storeu_ps(out + g, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(live, h + g)));
  }
}

// sum_g (m_g + 8 s_g) E_g over a row's float16 mins `mh` and f32 scales `s` (zero-padded like `eg`).
LTJAX_AVX512 inline float Int4MidpointTerm(const uint16_t* mh, const float* s, const float* eg, int64_t groups) {
  __m512 a = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; g += 16) {
    const __mmask16 live = groups - g >= 16 ? 0xffff : static_cast<__mmask16>((1u << (groups - g)) - 1);
    const __m512 m = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(live, mh + g));
    a = _mm512_fmadd_ps(_mm512_fmadd_ps(_mm512_loadu_ps(s + g), _mm512_set1_ps(8.0f), m), _mm512_loadu_ps(eg + g), a);
  }
  return _mm512_reduce_add_ps(a);
}

// y[n] for rows [n0, n1): four rows per pass (x's digits loaded once for four; four streams of
// codes in flight, with the prefetch of the rows kInt4PrefetchRows ahead), the rest one by one.
LTJAX_AVX512_VNNI inline void GemvInt4Vnni(const Int4Weight& w, const Int4Digits& xd, int64_t n0, int64_t n1,
                                           Elt elt, void* y) {
  const int64_t groups = w.groups(), gs = groups + 32;  // room for F16RowToF32_512's last 16
  float* s = Scratch(0, 4 * gs);
  float d[4];
  for (int64_t n = n0; n < n1;) {
    const int rows = n + 4 <= n1 ? 4 : 1;
    for (int r = 0; r < rows; ++r) F16RowToF32_512(w.scales + (n + r) * groups, groups, s + r * gs);
    if (rows == 4) DotInt4Vnni<4>(w, n, xd, s, gs, w.codes + std::min(n + kInt4PrefetchRows, w.n - 4) * w.ld(), d);
    else DotInt4Vnni<1>(w, n, xd, s, gs, w.codes + n * w.ld(), d);
    for (int r = 0; r < rows; ++r) {
      float dot = d[r];
      if (w.mins) dot += Int4MidpointTerm(w.mins + (n + r) * groups, s + r * gs, xd.eg, groups);
      StoreOut(elt, y, n + r, static_cast<float>(static_cast<double>(dot) * xd.qs));
    }
    n += rows;
  }
}


// ---------------------------------------------------------------- M = 1, AVX2 integer sums
// The VNNI GEMV's scheme on AVX2, which has no vpdpbusd: vpmaddubsw (codes, unsigned, times x's
// digits, signed: two products a 16-bit lane, |sum| <= 2 * 15 * 128, no saturation), the even and
// odd columns' pairs added (<= 7680), vpmaddwd against ones (int32 lane L of a 64-column block:
// columns 8L .. 8L + 7, as on AVX-512). Digits in nibble order per 64 columns: block b, digit d,
// 32 bytes for the even columns, then 32 for the odd. The same exact integers t = sum (q - 8) e
// per lane, the same f32 finish, the same error bound. LTJAX_FFI_VNNI=0 turns it off with the
// VNNI paths (then the f32 walk runs), so both integer GEMVs and the f32 walks stay testable.
constexpr int64_t kInt4Block256 = 64;

inline bool Int4IntegerGemv() {
  Configured().used = true;
  return Configured().vnni;
}

// From x [kp] (f32, zeros past k, kp a multiple of kInt4Block). False if x is not finite. Scalar:
// x's digits by MakeXDigitsScalar (the AVX-512 conversion's rounding), then placed one by one.
LTJAX_AVX2 inline bool MakeInt4Digits256(const float* x, int64_t kp, int64_t group, int8_t* buf, Int4Digits* out) {
  XDigits nat;
  if (!MakeXDigitsScalar(x, kp, buf, &nat)) return false;
  const int64_t blocks = kp / kInt4Block256, groups = kp / group;
  auto align = [](int8_t* p) { return reinterpret_cast<int8_t*>((reinterpret_cast<uintptr_t>(p) + 63) & ~uintptr_t{63}); };
  int8_t* dst = align(buf + 3 * nat.stride);
  int32_t* e8 = reinterpret_cast<int32_t*>(dst + 3 * kp);
  int32_t* elane = e8 + kp / 8;
  float* eg = reinterpret_cast<float*>(elane + kp / 8);
  for (int64_t b = 0; b < blocks; ++b) {
    for (int d = 0; d < 3; ++d) {
      const int8_t* src = nat.d + d * nat.stride + b * kInt4Block256;
      int8_t* o = dst + (b * 3 + d) * 64;
      for (int i = 0; i < 32; ++i) o[i] = src[2 * i], o[32 + i] = src[2 * i + 1];
    }
  }
  for (int64_t l = 0; l < kp / 8; ++l) {
    int32_t e = 0;
    for (int c = 0; c < 8; ++c)
      for (int d = 2; d >= 0; --d) e += static_cast<int32_t>(nat.d[d * nat.stride + 8 * l + c]) << (8 * d);
    elane[l] = e;
    e8[l] = 8 * e;
  }
  for (int64_t g = 0; g < groups; ++g) {
    int64_t sum = 0;
    for (int64_t l = g * group / 8; l < (g + 1) * group / 8; ++l) sum += elane[l];
    eg[g] = static_cast<float>(sum);
  }
  std::fill(eg + groups, eg + groups + 16, 0.0f);
  *out = Int4Digits{dst, e8, eg, blocks, nat.qs};
  return true;
}

template <int R>
LTJAX_AVX2 LTJAX_INLINE void DotInt4Avx2Int(const Int4Weight& w, int64_t n, const Int4Digits& xd, const float* s,
                                            int64_t gs, const uint8_t* pf, float* out) {
  // K's blocks (x's digits may run on to a multiple of 128 columns: zeros, not read); a partial
  // block has 32 columns (K % 32 == 0), 16 code bytes, all inside the row
  const int64_t ld = w.ld(), full = w.k / kInt4Block256, blocks = (w.k + kInt4Block256 - 1) / kInt4Block256;
  const __m256i m4 = _mm256_set1_epi8(0x0f), ones = _mm256_set1_epi16(1);
  const int gshift = w.g == 32 ? 5 : w.g == 64 ? 6 : 7;  // log2(G)
  const __m256i gidx = _mm256_srli_epi32(_mm256_setr_epi32(0, 8, 16, 24, 32, 40, 48, 56), gshift);
  const uint8_t* p[R];
  __m256 acc[R];
  for (int r = 0; r < R; ++r) p[r] = w.codes + (n + r) * ld, acc[r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    const __m256i* dg = reinterpret_cast<const __m256i*>(xd.d + b * 192);
    const __m256i e8 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xd.e8 + 8 * b));
    const int64_t g0 = (b * kInt4Block256) >> gshift;  // the block's first group
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      if ((b & 1) == 0) _mm_prefetch(reinterpret_cast<const char*>(pf + r * ld + b * 32), _MM_HINT_T1);
      const __m256i v = b < full ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p[r] + b * 32))
                                 : _mm256_zextsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p[r] + b * 32)));
      const __m256i lo = _mm256_and_si256(v, m4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
      auto digit = [&](int d) LTJAX_AVX2 {
        const __m256i pairs = _mm256_add_epi16(_mm256_maddubs_epi16(lo, _mm256_load_si256(dg + 2 * d)),
                                               _mm256_maddubs_epi16(hi, _mm256_load_si256(dg + 2 * d + 1)));
        return _mm256_madd_epi16(pairs, ones);
      };
      __m256i t = digit(2);
      t = _mm256_add_epi32(_mm256_slli_epi32(t, 8), digit(1));
      t = _mm256_add_epi32(_mm256_slli_epi32(t, 8), digit(0));
      t = _mm256_sub_epi32(t, e8);
      const __m256 sv = _mm256_permutevar8x32_ps(_mm256_loadu_ps(s + r * gs + g0), gidx);
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(t), sv, acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) out[r] = Hsum256(acc[r]);
}

// sum_g (m_g + 8 s_g) E_g (AVX2): the row's mins as f32 in `m` (zero-padded), scales `s`.
LTJAX_AVX2 inline float Int4MidpointTerm_256(const float* m, const float* s, const float* eg, int64_t groups) {
  __m256 a = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; g += 8) {
    const __m256 mid = _mm256_fmadd_ps(_mm256_loadu_ps(s + g), _mm256_set1_ps(8.0f), _mm256_loadu_ps(m + g));
    a = _mm256_fmadd_ps(mid, _mm256_loadu_ps(eg + g), a);
  }
  return Hsum256(a);
}

LTJAX_AVX2 inline void GemvInt4Avx2Int(const Int4Weight& w, const Int4Digits& xd, int64_t n0, int64_t n1, Elt elt,
                                       void* y) {
  const int64_t groups = w.groups(), gs = groups + 16;
  float* s = Scratch(0, 5 * gs);
  float* m = s + 4 * gs;
  float d[4];
  for (int64_t n = n0; n < n1;) {
    const int rows = n + 4 <= n1 ? 4 : 1;
    for (int r = 0; r < rows; ++r) F16RowToF32(w.scales + (n + r) * groups, groups, s + r * gs);
    if (rows == 4) DotInt4Avx2Int<4>(w, n, xd, s, gs, w.codes + std::min(n + kInt4PrefetchRows, w.n - 4) * w.ld(), d);
    else DotInt4Avx2Int<1>(w, n, xd, s, gs, w.codes + n * w.ld(), d);
    for (int r = 0; r < rows; ++r) {
      float dot = d[r];
      if (w.mins) {
        F16RowToF32(w.mins + (n + r) * groups, groups, m);
        dot += Int4MidpointTerm_256(m, s + r * gs, xd.eg, groups);
      }
      StoreOut(elt, y, n + r, static_cast<float>(static_cast<double>(dot) * xd.qs));
    }
    n += rows;
  }
}

}  // namespace ltjax
