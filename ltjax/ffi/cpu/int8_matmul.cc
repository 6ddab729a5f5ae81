// Fused int8 weight-only matmul on CPU: y = x @ (codes * scales[:, None])^T without a dense W.
//
// Targets: "ltjax_int8_matmul"   y[M, N]  = x[M, K] @ W^T     (forward)
//          "ltjax_int8_matmul_t" dx[M, K] = dy[M, N] @ W      (backward for x)
// W is the int8 storage matrix [N, K] (one scale per output channel). Accumulation is exact f32
// of codes * x (codes converted in registers), times the channel scale at the end.
#include "amx.h"

namespace ltjax {
namespace {

class Int8Rows : public RowDecoder {
 public:
  Int8Rows(const int8_t* codes, int64_t k, int64_t kp) : codes_(codes), k_(k), kp_(kp) {}
  bool Row(int64_t n, float* dst) override {
    CodesToF32(codes_ + n * k_, k_, kp_, dst);
    return true;
  }

 private:
  const int8_t* codes_;
  int64_t k_, kp_;
};

// M = 1 on AVX-512 VNNI: four rows a pass against x's three balanced base-256 digits (XDigits,
// bitmask_rows.h: the bitmask_int8 GEMV's exact-integer scheme, with its error bound), the codes'
// sign bit flipped to make them vpdpbusd's unsigned operand. Per 64 columns and row: one XOR and
// three vpdpbusd, where the f32 walk converts and multiplies sixteen lanes at a time; per row three
// int32 sums T_d = sum (c + 128) e_d, exact while K <= kVnniMaxK, so y = qs * scale *
// sum_d 256^d (T_d - 128 E_d). The rows' codes are prefetched 16 rows ahead into L2 (int4's
// scheme; an L1 prefetch of 8 rows of 4 KiB fills a Zen 4 core's L1D).
constexpr int64_t kVnniMaxK = 65536;  // |T_d| <= K * 255 * 128 < 2^31

LTJAX_AVX512_VNNI void GemvInt8Vnni(const int8_t* c, int64_t n_all, int64_t k, const XDigits& xd,
                                    const float* scales, int64_t n0, int64_t n1, Elt elt, void* y) {
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  const int8_t* d0 = xd.d;
  const int8_t* d1 = xd.d + xd.stride;
  const int8_t* d2 = xd.d + 2 * xd.stride;
  auto store = [&](int64_t n, __m512i t0, __m512i t1, __m512i t2) LTJAX_AVX512_VNNI {
    const int64_t q0 = _mm512_reduce_add_epi32(t0) - 128 * xd.sum[0];
    const int64_t q1 = _mm512_reduce_add_epi32(t1) - 128 * xd.sum[1];
    const int64_t q2 = _mm512_reduce_add_epi32(t2) - 128 * xd.sum[2];
    const double dot = static_cast<double>(q0 + 256 * q1 + 65536 * q2) * xd.qs;
    StoreOut(elt, y, n, static_cast<float>(dot) * scales[n]);
  };
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) {
    const int8_t* r = c + n * k;
    const char* pf = reinterpret_cast<const char*>(c + std::min(n + 16, n_all - 4) * k);
    __m512i a[4][3];
    for (auto& row : a) row[0] = row[1] = row[2] = _mm512_setzero_si512();
    for (int64_t i = 0; i < k; i += 64) {
      const __mmask64 m = k - i >= 64 ? ~0ull : _bzhi_u64(~0ull, static_cast<unsigned>(k - i));
      for (int j = 0; j < 4; ++j) _mm_prefetch(pf + j * k + i, _MM_HINT_T1);
      const __m512i x0 = _mm512_loadu_si512(d0 + i), x1 = _mm512_loadu_si512(d1 + i),
                    x2 = _mm512_loadu_si512(d2 + i);
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) {
        // masked-off columns load 0 (then 128) against digits that are 0 there: nothing added
        const __m512i w = _mm512_xor_si512(_mm512_maskz_loadu_epi8(m, r + j * k + i), flip);
        a[j][0] = _mm512_dpbusd_epi32(a[j][0], w, x0);
        a[j][1] = _mm512_dpbusd_epi32(a[j][1], w, x1);
        a[j][2] = _mm512_dpbusd_epi32(a[j][2], w, x2);
      }
    }
    for (int j = 0; j < 4; ++j) store(n + j, a[j][0], a[j][1], a[j][2]);
  }
  for (; n < n1; ++n) {
    const int8_t* r = c + n * k;
    __m512i t0 = _mm512_setzero_si512(), t1 = t0, t2 = t0;
    for (int64_t i = 0; i < k; i += 64) {
      const __mmask64 m = k - i >= 64 ? ~0ull : _bzhi_u64(~0ull, static_cast<unsigned>(k - i));
      const __m512i w = _mm512_xor_si512(_mm512_maskz_loadu_epi8(m, r + i), flip);
      t0 = _mm512_dpbusd_epi32(t0, w, _mm512_loadu_si512(d0 + i));
      t1 = _mm512_dpbusd_epi32(t1, w, _mm512_loadu_si512(d1 + i));
      t2 = _mm512_dpbusd_epi32(t2, w, _mm512_loadu_si512(d2 + i));
    }
    store(n, t0, t1, t2);
  }
}

ffi::Error CheckWeight(const ffi::AnyBuffer& codes, const ffi::AnyBuffer& scales, int64_t* n, int64_t* k) {
  LTJAX_RETURN_IF_ERROR(CheckType("codes", codes, ffi::DataType::S8, "int8"));
  LTJAX_RETURN_IF_ERROR(CheckType("scales", scales, ffi::DataType::F32, "float32"));
  LTJAX_CHECK(codes.dimensions().size() == 2, "ltjax: codes must be 2-D [N, K], got " + Dims(codes));
  *n = codes.dimensions()[0];
  *k = codes.dimensions()[1];
  return CheckShape("scales", scales, {*n});
}

ffi::Error Int8MatmulImpl(ffi::AnyBuffer x, ffi::AnyBuffer codes, ffi::AnyBuffer scales,
                          ffi::Result<ffi::AnyBuffer> y) {
  LTJAX_CHECK(CurrentIsa() != Isa::kNone, "ltjax: this CPU lacks AVX2/FMA");
  int64_t n, k;
  LTJAX_RETURN_IF_ERROR(CheckWeight(codes, scales, &n, &k));
  Elt elt, yelt;
  LTJAX_CHECK(EltOf(x.element_type(), &elt) && elt != Elt::kF16, "ltjax: x must be float32 or bfloat16");
  LTJAX_CHECK(x.dimensions().size() == 2, "ltjax: x must be 2-D [M, K], got " + Dims(x));
  int64_t m = x.dimensions()[0];
  LTJAX_RETURN_IF_ERROR(CheckShape("x", x, {m, k}));
  LTJAX_CHECK(EltOf(y->element_type(), &yelt) && yelt == elt, "ltjax: y must have the dtype of x");
  LTJAX_RETURN_IF_ERROR(CheckShape("y", *y, {m, n}));
  int64_t kp = RoundUp(std::max<int64_t>(k, 1), 32);
  const float* xs = PaddedF32(elt, x.untyped_data(), m, k, kp, 2);
  auto* c = static_cast<const int8_t*>(codes.untyped_data());
  auto* sc = static_cast<const float*>(scales.untyped_data());
#if LTJAX_HAS_AMX
  if (AmxFits(m, k) && n > 0 && k > 0 && HasAmx()) {
    // x in passes of up to 64 rows (its digits stay in L2 while every row block of W streams past).
    bool finite = true;
    for (int64_t m0 = 0; m0 < m && finite; m0 += kAmxMaxM) {
      const int64_t mc = std::min(kAmxMaxM, m - m0);
      AmxDigits xd;
      finite = AmxDigitsOf(xs + m0 * kp, mc, k, kp, &xd);
      if (finite)
        ParallelRange(n, 16, 64, [&](int64_t n0, int64_t n1, int) {
          AmxGemm(c, n, k, mc, xd, sc, n0, n1, elt, y->untyped_data(), m0);
        });
    }
    if (finite) return ffi::Error::Success();  // else (NaN/inf in x) the whole call on the f32 path
  }
#endif
  if (m == 1 && k <= kVnniMaxK && CurrentVnni() == Vnni::kAvx512) {
    XDigits xd;
    auto* digits = reinterpret_cast<int8_t*>(Scratch(1, (3 * (kp + 64) + 3) / 4));
    if (MakeXDigits(xs, kp, digits, &xd)) {  // (non-finite x: the f32 walk below)
      const int64_t min_chunk = n * k < kInlineWork ? n : 16;
      ParallelRange(n, 4, min_chunk, [&](int64_t n0, int64_t n1, int) {
        GemvInt8Vnni(c, n, k, xd, sc, n0, n1, elt, y->untyped_data());
      });
      return ffi::Error::Success();
    }
  }
  Forward(m, k, n, kp, xs, sc, elt, y->untyped_data(), [&](int64_t) { return std::make_unique<Int8Rows>(c, k, kp); },
          c);
  return ffi::Error::Success();
}

ffi::Error Int8MatmulTImpl(ffi::AnyBuffer dy, ffi::AnyBuffer codes, ffi::AnyBuffer scales,
                           ffi::Result<ffi::AnyBuffer> dx) {
  LTJAX_CHECK(CurrentIsa() != Isa::kNone, "ltjax: this CPU lacks AVX2/FMA");
  int64_t n, k;
  LTJAX_RETURN_IF_ERROR(CheckWeight(codes, scales, &n, &k));
  Elt elt, xelt;
  LTJAX_CHECK(EltOf(dy.element_type(), &elt) && elt != Elt::kF16, "ltjax: dy must be float32 or bfloat16");
  LTJAX_CHECK(dy.dimensions().size() == 2, "ltjax: dy must be 2-D [M, N], got " + Dims(dy));
  int64_t m = dy.dimensions()[0];
  LTJAX_RETURN_IF_ERROR(CheckShape("dy", dy, {m, n}));
  LTJAX_CHECK(EltOf(dx->element_type(), &xelt) && xelt == elt, "ltjax: dx must have the dtype of dy");
  LTJAX_RETURN_IF_ERROR(CheckShape("dx", *dx, {m, k}));
  int64_t kp = RoundUp(std::max<int64_t>(k, 1), 32);
  const float* dys = PaddedF32(elt, dy.untyped_data(), m, n, n, 1);
  auto* c = static_cast<const int8_t*>(codes.untyped_data());
  Transposed(m, k, n, kp, dys, static_cast<const float*>(scales.untyped_data()), elt, dx->untyped_data(),
             [&](int64_t) { return std::make_unique<Int8Rows>(c, k, kp); });
  return ffi::Error::Success();
}

}  // namespace
}  // namespace ltjax

XLA_FFI_DEFINE_HANDLER_SYMBOL(LtjaxInt8Matmul, ltjax::Int8MatmulImpl,
                              xla::ffi::Ffi::Bind()
                                  .Arg<xla::ffi::AnyBuffer>()    // x [M, K] f32 | bf16
                                  .Arg<xla::ffi::AnyBuffer>()    // codes [N, K] int8 (storage)
                                  .Arg<xla::ffi::AnyBuffer>()    // scales [N] f32
                                  .Ret<xla::ffi::AnyBuffer>());  // y [M, N], dtype of x

XLA_FFI_DEFINE_HANDLER_SYMBOL(LtjaxInt8MatmulT, ltjax::Int8MatmulTImpl,
                              xla::ffi::Ffi::Bind()
                                  .Arg<xla::ffi::AnyBuffer>()    // dy [M, N] f32 | bf16
                                  .Arg<xla::ffi::AnyBuffer>()    // codes [N, K] int8 (storage)
                                  .Arg<xla::ffi::AnyBuffer>()    // scales [N] f32
                                  .Ret<xla::ffi::AnyBuffer>());  // dx [M, K], dtype of dy
