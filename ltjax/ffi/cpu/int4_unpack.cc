// int4 unpack on CPU: codes + group scales (+ mins) -> the dense storage matrix [C, R].
//
// Targets (codes [C, R/2] uint8, scales [C, R/G] float16; docs/int4.md):
//   "ltjax_int4_unpack"       out = (q - 8) * s                      (f32, then cast to out's dtype)
//   "ltjax_int4_asym_unpack"  out = q * s + m, mins [C, R/G] float16
// Bit-exact against the reference decoder: each f32 weight is exact or rounded once, as there
// (int4_rows.h), then rounded to out's dtype (nearest even). Threads split rows.
#include "int4_rows.h"

namespace ltjax {
namespace {

ffi::Error UnpackImpl(ffi::AnyBuffer codes, ffi::AnyBuffer scales, const ffi::AnyBuffer* mins,
                      ffi::Result<ffi::AnyBuffer> out) {
  LTJAX_CHECK(CurrentIsa() != Isa::kNone, "ltjax: this CPU lacks AVX2/FMA");
  LTJAX_RETURN_IF_ERROR(CheckType("codes", codes, ffi::DataType::U8, "uint8"));
  LTJAX_RETURN_IF_ERROR(CheckType("scales", scales, ffi::DataType::F16, "float16"));
  LTJAX_CHECK(codes.dimensions().size() == 2, "ltjax: int4 codes must be 2-D [C, R/2], got " + Dims(codes));
  LTJAX_CHECK(scales.dimensions().size() == 2, "ltjax: int4 scales must be 2-D [C, R/G], got " + Dims(scales));
  const int64_t c = codes.dimensions()[0], r = 2 * codes.dimensions()[1], groups = scales.dimensions()[1];
  LTJAX_RETURN_IF_ERROR(CheckShape("scales", scales, {c, groups}));
  Elt oelt;
  LTJAX_CHECK(EltOf(out->element_type(), &oelt), "ltjax: out must be float32, bfloat16 or float16");
  LTJAX_RETURN_IF_ERROR(CheckShape("out", *out, {c, r}));
  if (c == 0 || r == 0) return ffi::Error::Success();
  const int64_t g = groups > 0 && r % groups == 0 ? r / groups : 0;
  LTJAX_CHECK(g == 32 || g == 64 || g == 128,
              "ltjax: int4 scales [C, R/G] must give groups G of 32, 64 or 128 columns; got R=" + std::to_string(r) +
                  " and " + std::to_string(groups) + " groups per row");
  if (mins) {
    LTJAX_RETURN_IF_ERROR(CheckType("mins", *mins, ffi::DataType::F16, "float16"));
    LTJAX_RETURN_IF_ERROR(CheckShape("mins", *mins, {c, groups}));
  }
  const Int4Weight w{static_cast<const uint8_t*>(codes.untyped_data()),
                     static_cast<const uint16_t*>(scales.untyped_data()),
                     mins ? static_cast<const uint16_t*>(mins->untyped_data()) : nullptr, c, r, g};
  char* o = static_cast<char*>(out->untyped_data());
  const size_t oes = EltSize(oelt);
  ParallelRange(c, 1, 8, [&](int64_t r0, int64_t r1, int) {
    std::vector<float> sc(2 * (groups + 16));
    float* row = Scratch(0, r);  // r is a multiple of 32: no padding
    for (int64_t n = r0; n < r1; ++n) {
      float* dst = oelt == Elt::kF32 ? reinterpret_cast<float*>(o + n * r * oes) : row;
      Int4RowF32(w, n, r, sc.data(), dst);
      if (oelt != Elt::kF32) FromF32(oelt, row, r, o + n * r * oes);
    }
  });
  return ffi::Error::Success();
}

ffi::Error Int4UnpackImpl(ffi::AnyBuffer codes, ffi::AnyBuffer scales, ffi::Result<ffi::AnyBuffer> out) {
  return UnpackImpl(codes, scales, nullptr, out);
}
ffi::Error Int4AsymUnpackImpl(ffi::AnyBuffer codes, ffi::AnyBuffer scales, ffi::AnyBuffer mins,
                              ffi::Result<ffi::AnyBuffer> out) {
  return UnpackImpl(codes, scales, &mins, out);
}

}  // namespace
}  // namespace ltjax

XLA_FFI_DEFINE_HANDLER_SYMBOL(LtjaxInt4Unpack, ltjax::Int4UnpackImpl,
                              xla::ffi::Ffi::Bind()
                                  .Arg<xla::ffi::AnyBuffer>()    // codes [C, R/2] uint8, two columns a byte
                                  .Arg<xla::ffi::AnyBuffer>()    // scales [C, R/G] f16
                                  .Ret<xla::ffi::AnyBuffer>());  // out [C, R] f32 | bf16 | f16

XLA_FFI_DEFINE_HANDLER_SYMBOL(LtjaxInt4AsymUnpack, ltjax::Int4AsymUnpackImpl,
                              xla::ffi::Ffi::Bind()
                                  .Arg<xla::ffi::AnyBuffer>()    // codes [C, R/2] uint8
                                  .Arg<xla::ffi::AnyBuffer>()    // scales [C, R/G] f16
                                  .Arg<xla::ffi::AnyBuffer>()    // mins [C, R/G] f16
                                  .Ret<xla::ffi::AnyBuffer>());  // out [C, R] f32 | bf16 | f16
