// Fused int4 weight-only matmul on CPU: y = x @ W^T with W decoded from its 4-bit codes and group
// scales in registers (M = 1) or four rows at a time into L1/L2 (M > 1), never as a dense matrix.
//
// Targets (W is the storage matrix [N, K]: codes [N, K/2] uint8, scales [N, K/G] float16, G the
// group of 32, 64 or 128 columns, read from the shapes; docs/int4.md):
//   "ltjax_int4_matmul"         y[M, N]  = x[M, K] @ W^T   W = (q - 8) * s        (symmetric)
//   "ltjax_int4_matmul_t"       dx[M, K] = dy[M, N] @ W                            (backward for x)
//   "ltjax_int4_asym_matmul"    y[M, N]  = x[M, K] @ W^T   W = q * s + m, mins [N, K/G] float16
//   "ltjax_int4_asym_matmul_t"  dx[M, K] = dy[M, N] @ W
// M = 1 streams the codes once, in exact integer sums against x as 24-bit fixed point
// (int4_rows.h: vpdpbusd on AVX-512 VNNI, vpmaddubsw on AVX2; the error is stated there), or, with
// LTJAX_FFI_VNNI=0 or NaN/inf in x, each weight decoded in registers and multiplied in f32. M > 1 and the transposed product
// decode four rows at a time to f32 and run the shared drivers (kernels.h, Forward / Transposed).
#include "int4_rows.h"

namespace ltjax {
namespace {

// The weight's arrays: codes [N, K/2] uint8, scales [N, K/G] float16, mins (or null) like scales;
// K = 2 * codes.shape[1], G = K / scales.shape[1] in {32, 64, 128}.
ffi::Error CheckInt4(const ffi::AnyBuffer& codes, const ffi::AnyBuffer& scales, const ffi::AnyBuffer* mins,
                     Int4Weight* w) {
  LTJAX_RETURN_IF_ERROR(CheckType("codes", codes, ffi::DataType::U8, "uint8"));
  LTJAX_RETURN_IF_ERROR(CheckType("scales", scales, ffi::DataType::F16, "float16"));
  LTJAX_CHECK(codes.dimensions().size() == 2, "ltjax: int4 codes must be 2-D [N, K/2], got " + Dims(codes));
  LTJAX_CHECK(scales.dimensions().size() == 2, "ltjax: int4 scales must be 2-D [N, K/G], got " + Dims(scales));
  const int64_t n = codes.dimensions()[0], k = 2 * codes.dimensions()[1], groups = scales.dimensions()[1];
  LTJAX_RETURN_IF_ERROR(CheckShape("scales", scales, {n, groups}));
  int64_t g = 32;
  if (k > 0) {
    g = groups > 0 && k % groups == 0 ? k / groups : 0;
    LTJAX_CHECK(g == 32 || g == 64 || g == 128,
                "ltjax: int4 scales [N, K/G] must give groups G of 32, 64 or 128 columns; got K=" + std::to_string(k) +
                    " and " + std::to_string(groups) + " groups per row");
  }
  if (mins) {
    LTJAX_RETURN_IF_ERROR(CheckType("mins", *mins, ffi::DataType::F16, "float16"));
    LTJAX_RETURN_IF_ERROR(CheckShape("mins", *mins, {n, groups}));
  }
  *w = Int4Weight{static_cast<const uint8_t*>(codes.untyped_data()),
                  static_cast<const uint16_t*>(scales.untyped_data()),
                  mins ? static_cast<const uint16_t*>(mins->untyped_data()) : nullptr, n, k, g};
  return ffi::Error::Success();
}

ffi::Error ForwardImpl(ffi::AnyBuffer x, ffi::AnyBuffer codes, ffi::AnyBuffer scales, const ffi::AnyBuffer* mins,
                       ffi::Result<ffi::AnyBuffer> y) {
  LTJAX_CHECK(CurrentIsa() != Isa::kNone, "ltjax: this CPU lacks AVX2/FMA");
  Int4Weight w;
  LTJAX_RETURN_IF_ERROR(CheckInt4(codes, scales, mins, &w));
  Elt elt, yelt;
  LTJAX_CHECK(EltOf(x.element_type(), &elt) && elt != Elt::kF16, "ltjax: x must be float32 or bfloat16");
  LTJAX_CHECK(x.dimensions().size() == 2, "ltjax: x must be 2-D [M, K], got " + Dims(x));
  const int64_t m = x.dimensions()[0], k = w.k, n = w.n;
  LTJAX_RETURN_IF_ERROR(CheckShape("x", x, {m, k}));
  LTJAX_CHECK(EltOf(y->element_type(), &yelt) && yelt == elt, "ltjax: y must have the dtype of x");
  LTJAX_RETURN_IF_ERROR(CheckShape("y", *y, {m, n}));
  if (m == 0 || n == 0) return ffi::Error::Success();
  if (k == 0) {
    for (int64_t i = 0; i < m * n; ++i) StoreOut(elt, y->untyped_data(), i, 0.0f);
    return ffi::Error::Success();
  }
  const int64_t kp = RoundUp(k, kInt4Block);
  const float* xs = PaddedF32(elt, x.untyped_data(), m, k, kp, 2);
  void* out = y->untyped_data();
  if (m == 1) {
    const int64_t min_chunk = n * k < kInlineWork ? n : 16;
    if (Int4IntegerGemv()) {  // x as 24-bit integers: AVX-512 VNNI, else AVX2 (vpmaddubsw)
      const bool vnni = CurrentVnni() == Vnni::kAvx512;
      auto* buf = reinterpret_cast<int8_t*>(Scratch(1, (Int4DigitsBytes(kp, kp / w.g) + 3) / 4));
      Int4Digits xd;
      if (vnni ? MakeInt4Digits(xs, kp, w.g, buf, &xd) : MakeInt4Digits256(xs, kp, w.g, buf, &xd)) {
        ParallelRange(n, 4, min_chunk, [&](int64_t n0, int64_t n1, int) {
          if (vnni) GemvInt4Vnni(w, xd, n0, n1, elt, out);
          else GemvInt4Avx2Int(w, xd, n0, n1, elt, out);
        });
        return ffi::Error::Success();
      }  // else (NaN/inf in x) the f32 walk
    }
    const bool avx512 = CurrentIsa() == Isa::kAvx512;
    float* xn = Scratch(1, kp);
    Int4NibbleOrder(xs, kp, avx512 ? 32 : 16, xn);
    ParallelRange(n, 4, min_chunk, [&](int64_t n0, int64_t n1, int) {
      if (avx512) GemvInt4F32_512(w, xn, n0, n1, elt, out);
      else GemvInt4F32_256(w, xn, n0, n1, elt, out);
    });
    return ffi::Error::Success();
  }
  Forward(m, k, n, kp, xs, nullptr, elt, out, [&](int64_t) { return std::make_unique<Int4Rows>(w, kp); }, nullptr);
  return ffi::Error::Success();
}

ffi::Error TransposedImpl(ffi::AnyBuffer dy, ffi::AnyBuffer codes, ffi::AnyBuffer scales, const ffi::AnyBuffer* mins,
                          ffi::Result<ffi::AnyBuffer> dx) {
  LTJAX_CHECK(CurrentIsa() != Isa::kNone, "ltjax: this CPU lacks AVX2/FMA");
  Int4Weight w;
  LTJAX_RETURN_IF_ERROR(CheckInt4(codes, scales, mins, &w));
  Elt elt, xelt;
  LTJAX_CHECK(EltOf(dy.element_type(), &elt) && elt != Elt::kF16, "ltjax: dy must be float32 or bfloat16");
  LTJAX_CHECK(dy.dimensions().size() == 2, "ltjax: dy must be 2-D [M, N], got " + Dims(dy));
  const int64_t m = dy.dimensions()[0], k = w.k, n = w.n;
  LTJAX_RETURN_IF_ERROR(CheckShape("dy", dy, {m, n}));
  LTJAX_CHECK(EltOf(dx->element_type(), &xelt) && xelt == elt, "ltjax: dx must have the dtype of dy");
  LTJAX_RETURN_IF_ERROR(CheckShape("dx", *dx, {m, k}));
  if (m == 0 || k == 0) return ffi::Error::Success();
  const int64_t kp = RoundUp(k, 32);
  const float* dys = PaddedF32(elt, dy.untyped_data(), m, n, n, 1);
  Transposed(m, k, n, kp, dys, nullptr, elt, dx->untyped_data(),
             [&](int64_t) { return std::make_unique<Int4Rows>(w, kp); });
  return ffi::Error::Success();
}

ffi::Error Int4MatmulImpl(ffi::AnyBuffer x, ffi::AnyBuffer codes, ffi::AnyBuffer scales,
                          ffi::Result<ffi::AnyBuffer> y) {
  return ForwardImpl(x, codes, scales, nullptr, y);
}
ffi::Error Int4AsymMatmulImpl(ffi::AnyBuffer x, ffi::AnyBuffer codes, ffi::AnyBuffer scales, ffi::AnyBuffer mins,
                              ffi::Result<ffi::AnyBuffer> y) {
  return ForwardImpl(x, codes, scales, &mins, y);
}
ffi::Error Int4MatmulTImpl(ffi::AnyBuffer dy, ffi::AnyBuffer codes, ffi::AnyBuffer scales,
                           ffi::Result<ffi::AnyBuffer> dx) {
  return TransposedImpl(dy, codes, scales, nullptr, dx);
}
ffi::Error Int4AsymMatmulTImpl(ffi::AnyBuffer dy, ffi::AnyBuffer codes, ffi::AnyBuffer scales, ffi::AnyBuffer mins,
                               ffi::Result<ffi::AnyBuffer> dx) {
  return TransposedImpl(dy, codes, scales, &mins, dx);
}

}  // namespace
}  // namespace ltjax

XLA_FFI_DEFINE_HANDLER_SYMBOL(LtjaxInt4Matmul, ltjax::Int4MatmulImpl,
                              xla::ffi::Ffi::Bind()
                                  .Arg<xla::ffi::AnyBuffer>()    // x [M, K] f32 | bf16
                                  .Arg<xla::ffi::AnyBuffer>()    // codes [N, K/2] uint8, two columns a byte
                                  .Arg<xla::ffi::AnyBuffer>()    // scales [N, K/G] f16
                                  .Ret<xla::ffi::AnyBuffer>());  // y [M, N], dtype of x

XLA_FFI_DEFINE_HANDLER_SYMBOL(LtjaxInt4MatmulT, ltjax::Int4MatmulTImpl,
                              xla::ffi::Ffi::Bind()
                                  .Arg<xla::ffi::AnyBuffer>()    // dy [M, N] f32 | bf16
                                  .Arg<xla::ffi::AnyBuffer>()    // codes [N, K/2] uint8
                                  .Arg<xla::ffi::AnyBuffer>()    // scales [N, K/G] f16
                                  .Ret<xla::ffi::AnyBuffer>());  // dx [M, K], dtype of dy

XLA_FFI_DEFINE_HANDLER_SYMBOL(LtjaxInt4AsymMatmul, ltjax::Int4AsymMatmulImpl,
                              xla::ffi::Ffi::Bind()
                                  .Arg<xla::ffi::AnyBuffer>()    // x [M, K] f32 | bf16
                                  .Arg<xla::ffi::AnyBuffer>()    // codes [N, K/2] uint8
                                  .Arg<xla::ffi::AnyBuffer>()    // scales [N, K/G] f16
                                  .Arg<xla::ffi::AnyBuffer>()    // mins [N, K/G] f16
                                  .Ret<xla::ffi::AnyBuffer>());  // y [M, N], dtype of x

XLA_FFI_DEFINE_HANDLER_SYMBOL(LtjaxInt4AsymMatmulT, ltjax::Int4AsymMatmulTImpl,
                              xla::ffi::Ffi::Bind()
                                  .Arg<xla::ffi::AnyBuffer>()    // dy [M, N] f32 | bf16
                                  .Arg<xla::ffi::AnyBuffer>()    // codes [N, K/2] uint8
                                  .Arg<xla::ffi::AnyBuffer>()    // scales [N, K/G] f16
                                  .Arg<xla::ffi::AnyBuffer>()    // mins [N, K/G] f16
                                  .Ret<xla::ffi::AnyBuffer>());  // dx [M, K], dtype of dy
