// Dense f32 micro-kernels (AVX-512 and AVX2 variants) and the two drivers every fused matmul
// shares: `Forward` (y = x @ W^T over storage rows of W, threads split output channels) and
// `Transposed` (dx = dy @ W, threads split rows of W and sum private partials).
// A codec plugs in as a `RowDecoder`, which writes storage rows of W as f32 (scales applied
// later, per row) into a small per-thread buffer: no dense copy of the weight ever exists.
#pragma once

#include <memory>

#include "common.h"

namespace ltjax {

constexpr int kNB = 4;  // storage rows (output channels) per block
constexpr int64_t kInlineWork = 128 * 1024;  // M*N*K below which Forward stays on the caller

// ---------------------------------------------------------------- AVX-512
// acc[i * kNB + j] = dot(x[i, :Kp], w[j, :Kp]) for i < MB (x, w padded with zeros to Kp % 32 == 0).
template <int MB>
LTJAX_AVX512 void DotBlock512(const float* x, const float* w, int64_t kp, float* acc) {
  __m512 a[MB][kNB];
#pragma GCC unroll 16
  for (int i = 0; i < MB; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < kNB; ++j) a[i][j] = _mm512_setzero_ps();
  for (int64_t k = 0; k < kp; k += 16) {
    __m512 wv[kNB];
#pragma GCC unroll 4
    for (int j = 0; j < kNB; ++j) wv[j] = _mm512_loadu_ps(w + j * kp + k);
#pragma GCC unroll 16
    for (int i = 0; i < MB; ++i) {
      __m512 xv = _mm512_loadu_ps(x + i * kp + k);
#pragma GCC unroll 4
      for (int j = 0; j < kNB; ++j) a[i][j] = _mm512_fmadd_ps(xv, wv[j], a[i][j]);
    }
  }
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < kNB; ++j) acc[i * kNB + j] = _mm512_reduce_add_ps(a[i][j]);
}

// y[:Kp] += sum_j coef[j] * w[j, :Kp]
LTJAX_AVX512 inline void Axpy512(float* y, const float* w, int64_t kp, const float* coef) {
  __m512 c0 = _mm512_set1_ps(coef[0]), c1 = _mm512_set1_ps(coef[1]);
  __m512 c2 = _mm512_set1_ps(coef[2]), c3 = _mm512_set1_ps(coef[3]);
  for (int64_t k = 0; k < kp; k += 16) {
    __m512 v = _mm512_loadu_ps(y + k);
    v = _mm512_fmadd_ps(c0, _mm512_loadu_ps(w + k), v);
    v = _mm512_fmadd_ps(c1, _mm512_loadu_ps(w + kp + k), v);
    v = _mm512_fmadd_ps(c2, _mm512_loadu_ps(w + 2 * kp + k), v);
    v = _mm512_fmadd_ps(c3, _mm512_loadu_ps(w + 3 * kp + k), v);
    _mm512_storeu_ps(y + k, v);
  }
}

// int8 codes [K] -> f32 [Kp] (zero tail).
LTJAX_AVX512 inline void CodesToF32_512(const int8_t* c, int64_t k, int64_t kp, float* dst) {
  int64_t i = 0;
  for (; i + 16 <= k; i += 16)
    _mm512_storeu_ps(dst + i, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(c + i)))));
  if (i < k) {
    __mmask16 m = static_cast<__mmask16>((1u << (k - i)) - 1u);
    _mm512_storeu_ps(dst + i, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, c + i))));
    i += 16;
  }
  for (; i < kp; i += 16) _mm512_storeu_ps(dst + i, _mm512_setzero_ps());
}

// Two rows of int8 codes against one f32 x, streaming the codes once: (dot(c0, x), dot(c1, x)).
LTJAX_AVX512 inline void DotCodes2_512(const int8_t* c0, const int8_t* c1, const float* x, int64_t k,
                                       float* out) {
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), b0 = _mm512_setzero_ps(),
         b1 = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= k; i += 32) {
    __m512 x0 = _mm512_loadu_ps(x + i), x1 = _mm512_loadu_ps(x + i + 16);
    a0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(c0 + i)))), x0, a0);
    a1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(c0 + i + 16)))), x1, a1);
    b0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(c1 + i)))), x0, b0);
    b1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(c1 + i + 16)))), x1, b1);
  }
  for (; i < k; i += 16) {
    __mmask16 m = k - i >= 16 ? 0xffff : static_cast<__mmask16>((1u << (k - i)) - 1u);
    __m512 xv = _mm512_maskz_loadu_ps(m, x + i);
    a0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, c0 + i))), xv, a0);
    b0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, c1 + i))), xv, b0);
  }
  out[0] = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
  out[1] = _mm512_reduce_add_ps(_mm512_add_ps(b0, b1));
}

// Four rows of int8 codes (row stride `ld`) against one f32 x: out[j] = dot(c0 + j*ld, x).
// Cold-cache streaming (see docs/ffi.md "Cold-cache GEMV"): a row of K = 4096 codes is exactly
// one 4 KiB page and the hardware stream prefetchers stop at page boundaries, so every row
// restarts a stream. Four rows in flight plus a software prefetch of the four rows at `pf`
// (the caller passes the block 8 rows ahead, clamped to the matrix) keep enough misses
// outstanding to run at the DRAM read rate. Summation: two partial sums per row.
LTJAX_AVX512 inline void DotCodes4_512(const int8_t* c0, int64_t ld, const float* x, int64_t k,
                                       const int8_t* pf, float* out) {
  const int8_t* c1 = c0 + ld;
  const int8_t* c2 = c1 + ld;
  const int8_t* c3 = c2 + ld;
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
#define LTJAX_CV(p) _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(p))))
  int64_t i = 0;
  for (; i + 32 <= k; i += 32) {
    if ((i & 63) == 0) {
      const char* q = reinterpret_cast<const char*>(pf) + i;
      _mm_prefetch(q, _MM_HINT_T0);
      _mm_prefetch(q + ld, _MM_HINT_T0);
      _mm_prefetch(q + 2 * ld, _MM_HINT_T0);
      _mm_prefetch(q + 3 * ld, _MM_HINT_T0);
    }
    __m512 x0 = _mm512_loadu_ps(x + i), x1 = _mm512_loadu_ps(x + i + 16);
    a0 = _mm512_fmadd_ps(LTJAX_CV(c0 + i), x0, a0);
    b0 = _mm512_fmadd_ps(LTJAX_CV(c0 + i + 16), x1, b0);
    a1 = _mm512_fmadd_ps(LTJAX_CV(c1 + i), x0, a1);
    b1 = _mm512_fmadd_ps(LTJAX_CV(c1 + i + 16), x1, b1);
    a2 = _mm512_fmadd_ps(LTJAX_CV(c2 + i), x0, a2);
    b2 = _mm512_fmadd_ps(LTJAX_CV(c2 + i + 16), x1, b2);
    a3 = _mm512_fmadd_ps(LTJAX_CV(c3 + i), x0, a3);
    b3 = _mm512_fmadd_ps(LTJAX_CV(c3 + i + 16), x1, b3);
  }
#undef LTJAX_CV
#define LTJAX_CM(p) _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, p)))
  for (; i < k; i += 16) {
    __mmask16 m = k - i >= 16 ? 0xffff : static_cast<__mmask16>((1u << (k - i)) - 1u);
    __m512 xv = _mm512_maskz_loadu_ps(m, x + i);
    a0 = _mm512_fmadd_ps(LTJAX_CM(c0 + i), xv, a0);
    a1 = _mm512_fmadd_ps(LTJAX_CM(c1 + i), xv, a1);
    a2 = _mm512_fmadd_ps(LTJAX_CM(c2 + i), xv, a2);
    a3 = _mm512_fmadd_ps(LTJAX_CM(c3 + i), xv, a3);
  }
#undef LTJAX_CM
  out[0] = _mm512_reduce_add_ps(_mm512_add_ps(a0, b0));
  out[1] = _mm512_reduce_add_ps(_mm512_add_ps(a1, b1));
  out[2] = _mm512_reduce_add_ps(_mm512_add_ps(a2, b2));
  out[3] = _mm512_reduce_add_ps(_mm512_add_ps(a3, b3));
}

// ---------------------------------------------------------------- AVX2
LTJAX_AVX2 inline float Hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <int MB>
LTJAX_AVX2 void DotBlock256(const float* x, const float* w, int64_t kp, float* acc) {
  // 2 x-rows at a time keeps 8 accumulators + 4 w registers inside the 16 ymm registers.
  for (int i0 = 0; i0 < MB; i0 += 2) {
    const int rows = MB - i0 < 2 ? 1 : 2;
    __m256 a[2][kNB];
    for (int i = 0; i < 2; ++i)
      for (int j = 0; j < kNB; ++j) a[i][j] = _mm256_setzero_ps();
    for (int64_t k = 0; k < kp; k += 8) {
      __m256 wv[kNB];
      for (int j = 0; j < kNB; ++j) wv[j] = _mm256_loadu_ps(w + j * kp + k);
      for (int i = 0; i < rows; ++i) {
        __m256 xv = _mm256_loadu_ps(x + (i0 + i) * kp + k);
        for (int j = 0; j < kNB; ++j) a[i][j] = _mm256_fmadd_ps(xv, wv[j], a[i][j]);
      }
    }
    for (int i = 0; i < rows; ++i)
      for (int j = 0; j < kNB; ++j) acc[(i0 + i) * kNB + j] = Hsum256(a[i][j]);
  }
}

LTJAX_AVX2 inline void Axpy256(float* y, const float* w, int64_t kp, const float* coef) {
  __m256 c0 = _mm256_set1_ps(coef[0]), c1 = _mm256_set1_ps(coef[1]);
  __m256 c2 = _mm256_set1_ps(coef[2]), c3 = _mm256_set1_ps(coef[3]);
  for (int64_t k = 0; k < kp; k += 8) {
    __m256 v = _mm256_loadu_ps(y + k);
    v = _mm256_fmadd_ps(c0, _mm256_loadu_ps(w + k), v);
    v = _mm256_fmadd_ps(c1, _mm256_loadu_ps(w + kp + k), v);
    v = _mm256_fmadd_ps(c2, _mm256_loadu_ps(w + 2 * kp + k), v);
    v = _mm256_fmadd_ps(c3, _mm256_loadu_ps(w + 3 * kp + k), v);
    _mm256_storeu_ps(y + k, v);
  }
}

LTJAX_AVX2 inline void CodesToF32_256(const int8_t* c, int64_t k, int64_t kp, float* dst) {
  int64_t i = 0;
  for (; i + 8 <= k; i += 8) {
    __m128i b = _mm_loadl_epi64((const __m128i*)(c + i));
    _mm256_storeu_ps(dst + i, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)));
  }
  for (; i < k; ++i) dst[i] = static_cast<float>(c[i]);
  for (; i < kp; ++i) dst[i] = 0.0f;
}

LTJAX_AVX2 inline void DotCodes2_256(const int8_t* c0, const int8_t* c1, const float* x, int64_t k,
                                     float* out) {
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), b0 = _mm256_setzero_ps(),
         b1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= k; i += 16) {
    __m256 x0 = _mm256_loadu_ps(x + i), x1 = _mm256_loadu_ps(x + i + 8);
    a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(c0 + i)))), x0, a0);
    a1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(c0 + i + 8)))), x1, a1);
    b0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(c1 + i)))), x0, b0);
    b1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(c1 + i + 8)))), x1, b1);
  }
  float s0 = Hsum256(_mm256_add_ps(a0, a1)), s1 = Hsum256(_mm256_add_ps(b0, b1));
  for (; i < k; ++i) {
    s0 += static_cast<float>(c0[i]) * x[i];
    s1 += static_cast<float>(c1[i]) * x[i];
  }
  out[0] = s0;
  out[1] = s1;
}

// DotCodes4_512 for AVX2: four rows (stride `ld`) against one x, software prefetch of the rows
// at `pf`; 8 codes per step and two partial sums per row (8 accumulators + 2 x registers).
LTJAX_AVX2 inline void DotCodes4_256(const int8_t* c0, int64_t ld, const float* x, int64_t k, const int8_t* pf,
                                     float* out) {
  const int8_t* c[4] = {c0, c0 + ld, c0 + 2 * ld, c0 + 3 * ld};
  __m256 a[4], b[4];
  for (int j = 0; j < 4; ++j) a[j] = b[j] = _mm256_setzero_ps();
#define LTJAX_CV8(p) _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))))
  int64_t i = 0;
  for (; i + 16 <= k; i += 16) {
    if ((i & 63) == 0)
      for (int j = 0; j < 4; ++j) _mm_prefetch(reinterpret_cast<const char*>(pf) + j * ld + i, _MM_HINT_T0);
    const __m256 x0 = _mm256_loadu_ps(x + i), x1 = _mm256_loadu_ps(x + i + 8);
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) {
      a[j] = _mm256_fmadd_ps(LTJAX_CV8(c[j] + i), x0, a[j]);
      b[j] = _mm256_fmadd_ps(LTJAX_CV8(c[j] + i + 8), x1, b[j]);
    }
  }
#undef LTJAX_CV8
  for (int j = 0; j < 4; ++j) {
    float t = Hsum256(_mm256_add_ps(a[j], b[j]));
    for (int64_t q = i; q < k; ++q) t += static_cast<float>(c[j][q]) * x[q];
    out[j] = t;
  }
}

// ---------------------------------------------------------------- dispatch helpers
inline void DotBlock(int mb, const float* x, const float* w, int64_t kp, float* acc) {
  if (CurrentIsa() == Isa::kAvx512) {
    switch (mb) {
      case 1: return DotBlock512<1>(x, w, kp, acc);
      case 2: return DotBlock512<2>(x, w, kp, acc);
      case 3: return DotBlock512<3>(x, w, kp, acc);
      default: return DotBlock512<4>(x, w, kp, acc);
    }
  }
  switch (mb) {
    case 1: return DotBlock256<1>(x, w, kp, acc);
    case 2: return DotBlock256<2>(x, w, kp, acc);
    case 3: return DotBlock256<3>(x, w, kp, acc);
    default: return DotBlock256<4>(x, w, kp, acc);
  }
}

inline void Axpy(float* y, const float* w, int64_t kp, const float* coef) {
  if (CurrentIsa() == Isa::kAvx512) return Axpy512(y, w, kp, coef);
  return Axpy256(y, w, kp, coef);
}

inline void CodesToF32(const int8_t* c, int64_t k, int64_t kp, float* dst) {
  if (CurrentIsa() == Isa::kAvx512) return CodesToF32_512(c, k, kp, dst);
  return CodesToF32_256(c, k, kp, dst);
}

// ---------------------------------------------------------------- drivers
// Writes storage row n of W (f32, unscaled, padded with zeros to kp) into dst. Rows are asked
// for in increasing order from the row the decoder was made for. Returns false on bad data.
class RowDecoder {
 public:
  virtual ~RowDecoder() = default;
  virtual bool Row(int64_t n, float* dst) = 0;
  // Optional fused dot(row n, x) for M == 1 (x padded f32); same order rules as Row.
  virtual bool HasDot() const { return false; }
  virtual bool Dot(int64_t, const float*, float*) { return false; }
};
using DecoderFactory = std::function<std::unique_ptr<RowDecoder>(int64_t row0)>;

// x [M, K] (elt) -> padded f32 copy [M, kp] in the caller's scratch.
inline const float* PaddedF32(Elt elt, const void* x, int64_t m, int64_t k, int64_t kp, int slot) {
  float* xs = Scratch(slot, m * kp);
  for (int64_t i = 0; i < m; ++i) {
    ToF32(elt, static_cast<const char*>(x) + i * k * EltSize(elt), k, xs + i * kp);
    std::fill(xs + i * kp + k, xs + (i + 1) * kp, 0.0f);
  }
  return xs;
}

inline void StoreOut(Elt elt, void* out, int64_t idx, float v) {
  if (elt == Elt::kF32) static_cast<float*>(out)[idx] = v;
  else if (elt == Elt::kBf16) static_cast<uint16_t*>(out)[idx] = F32ToBf16(v);
  else static_cast<uint16_t*>(out)[idx] = F32ToF16(v);
}

// y[m, n] = scale[n] * sum_k x[m, k] W[n, k];  x: padded f32 [M, kp]; y: [M, N] of `elt`.
// `int8_rows` (optional) lets M == 1 stream int8 rows straight from the codes.
// `align`: chunk starts (a multiple of kNB; the tile height lets bitmask cursors start at a tile).
inline bool Forward(int64_t M, int64_t K, int64_t N, int64_t kp, const float* xs, const float* scales,
                    Elt elt, void* y, const DecoderFactory& make, const int8_t* int8_rows, int64_t align = kNB) {
  std::atomic<bool> ok{true};
  // Small problems (< kInlineWork multiply-adds, e.g. a 576x192 GEMV: ~5 µs) run on the caller
  // alone: handing half of it to a worker costs about as much as it saves.
  const int64_t min_chunk = M * N * K < kInlineWork ? N : 16;
  ParallelRange(N, align, min_chunk, [&](int64_t n0, int64_t n1, int) {
    if (M == 1 && int8_rows != nullptr) {
      bool avx512 = CurrentIsa() == Isa::kAvx512;
      int64_t n = n0;
      for (; n + 4 <= n1; n += 4) {
        const int8_t* c0 = int8_rows + n * K;
        const int8_t* pf = int8_rows + std::min(n + 8, N - 4) * K;  // 4 rows, all inside W
        float d[4];
        if (avx512) DotCodes4_512(c0, K, xs, K, pf, d);
        else DotCodes4_256(c0, K, xs, K, pf, d);
        for (int j = 0; j < 4; ++j) StoreOut(elt, y, n + j, d[j] * scales[n + j]);
      }
      for (; n < n1; n += 2) {
        const int8_t* c0 = int8_rows + n * K;
        const int8_t* c1 = n + 1 < n1 ? c0 + K : c0;
        float d[2];
        if (avx512) DotCodes2_512(c0, c1, xs, K, d);
        else DotCodes2_256(c0, c1, xs, K, d);
        StoreOut(elt, y, n, d[0] * scales[n]);
        if (n + 1 < n1) StoreOut(elt, y, n + 1, d[1] * scales[n + 1]);
      }
      return;
    }
    std::unique_ptr<RowDecoder> dec = make(n0);
    if (M == 1 && dec->HasDot()) {
      for (int64_t n = n0; n < n1; ++n) {
        float d;
        if (!dec->Dot(n, xs, &d)) return ok.store(false);
        StoreOut(elt, y, n, d * (scales ? scales[n] : 1.0f));
      }
      return;
    }
    float* w = Scratch(0, kNB * kp);
    float acc[4 * kNB];
    for (int64_t n = n0; n < n1; n += kNB) {
      int nb = static_cast<int>(std::min<int64_t>(kNB, n1 - n));
      for (int j = 0; j < nb; ++j)
        if (!dec->Row(n + j, w + j * kp)) {
          ok.store(false);
          return;
        }
      for (int j = nb; j < kNB; ++j) std::fill(w + j * kp, w + (j + 1) * kp, 0.0f);
      for (int64_t m = 0; m < M; m += 4) {
        int mb = static_cast<int>(std::min<int64_t>(4, M - m));
        DotBlock(mb, xs + m * kp, w, kp, acc);
        for (int i = 0; i < mb; ++i)
          for (int j = 0; j < nb; ++j) {
            float s = scales ? scales[n + j] : 1.0f;
            StoreOut(elt, y, (m + i) * N + n + j, acc[i * kNB + j] * s);
          }
      }
    }
  });
  return ok.load();
}

// dx[m, k] = sum_n dy[m, n] scale[n] W[n, k];  dy: f32 [M, N]; dx: [M, K] of `elt`.
inline bool Transposed(int64_t M, int64_t K, int64_t N, int64_t kp, const float* dy, const float* scales,
                       Elt elt, void* dx, const DecoderFactory& make, int64_t align = kNB) {
  std::atomic<bool> ok{true};
  const int slots = Pool::Get().size();
  float* partial = Scratch(3, static_cast<int64_t>(slots) * M * kp);  // caller's buffer, one per slot
  std::vector<char> used(slots, 0);                                    // each written by its own slot
  ParallelRange(N, align, 16, [&](int64_t n0, int64_t n1, int slot) {
    float* acc = partial + slot * M * kp;
    if (!used[slot]) {
      std::fill(acc, acc + M * kp, 0.0f);
      used[slot] = 1;
    }
    std::unique_ptr<RowDecoder> dec = make(n0);
    float* w = Scratch(0, kNB * kp);
    for (int64_t n = n0; n < n1; n += kNB) {
      int nb = static_cast<int>(std::min<int64_t>(kNB, n1 - n));
      for (int j = 0; j < nb; ++j)
        if (!dec->Row(n + j, w + j * kp)) return ok.store(false);
      for (int j = nb; j < kNB; ++j) std::fill(w + j * kp, w + (j + 1) * kp, 0.0f);
      for (int64_t m = 0; m < M; ++m) {
        float coef[kNB] = {0, 0, 0, 0};
        for (int j = 0; j < nb; ++j) coef[j] = dy[m * N + n + j] * (scales ? scales[n + j] : 1.0f);
        Axpy(acc + m * kp, w, kp, coef);
      }
    }
  });
  if (!ok.load()) return false;
  std::vector<const float*> parts;
  for (int p = 0; p < slots; ++p)
    if (used[p]) parts.push_back(partial + p * M * kp);
  ParallelRange(M * K, 256, 4096, [&](int64_t b, int64_t e, int) {
    for (int64_t i = b; i < e; ++i) {
      int64_t m = i / K, k = i % K;
      float v = 0.0f;
      for (const float* p : parts) v += p[m * kp + k];
      StoreOut(elt, dx, i, v);
    }
  });
  return true;
}

}  // namespace ltjax
