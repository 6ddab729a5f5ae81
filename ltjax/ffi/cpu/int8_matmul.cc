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
