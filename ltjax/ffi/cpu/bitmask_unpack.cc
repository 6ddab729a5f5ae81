// Bitmask unpack on CPU: mask words + tile-major packed values -> the dense storage matrix.
//
// Targets (out is the storage matrix [C, R]; `tile_rows`, `tile_cols` are the LT-Block tile):
//   "ltjax_bitmask_unpack"       out = expand(values)                  bit-exact when dtypes match
//   "ltjax_bitmask_int8_unpack"  out = expand(codes) * scales[:, None]  (f32 product, then cast)
// Threads split rows; each starts its own cursor into the packed values from the tile offsets.
#include "bitmask_rows.h"

namespace ltjax {
namespace {

ffi::Error UnpackImpl(ffi::AnyBuffer mask, ffi::AnyBuffer offsets, ffi::AnyBuffer packed, const ffi::AnyBuffer* scales,
                      ffi::Result<ffi::AnyBuffer> out, int64_t tile_rows, int64_t tile_cols) {
  LTJAX_CHECK(CurrentIsa() != Isa::kNone, "ltjax: this CPU lacks AVX2/FMA");
  LTJAX_CHECK(out->dimensions().size() == 2, "ltjax: out must be 2-D [C, R], got " + Dims(*out));
  LTJAX_CHECK(packed.dimensions().size() == 1, "ltjax: packed values must be 1-D, got " + Dims(packed));
  Elt oelt;
  LTJAX_CHECK(EltOf(out->element_type(), &oelt), "ltjax: out must be float32, bfloat16 or float16");
  int64_t c = out->dimensions()[0], r = out->dimensions()[1];
  Packed kind;
  const float* sc = nullptr;
  if (scales) {
    LTJAX_RETURN_IF_ERROR(CheckType("codes", packed, ffi::DataType::S8, "int8"));
    LTJAX_RETURN_IF_ERROR(CheckType("scales", *scales, ffi::DataType::F32, "float32"));
    LTJAX_RETURN_IF_ERROR(CheckShape("scales", *scales, {c}));
    kind = Packed::kI8;
    sc = static_cast<const float*>(scales->untyped_data());
  } else {
    LTJAX_CHECK(PackedOf(packed.element_type(), &kind) && kind != Packed::kI8,
                "ltjax: bitmask values must be float32, bfloat16 or float16");
  }
  BitmaskGeometry g;
  LTJAX_RETURN_IF_ERROR(MakeGeometry(mask, offsets, packed.dimensions()[0], c, r, tile_rows, tile_cols, &g));
  if (r == 0 || c == 0) return ffi::Error::Success();
  // Same element type in and out (bitmask): move bits, so -0.0 and NaN payloads survive.
  bool bits = !scales && ((kind == Packed::kF32 && oelt == Elt::kF32) || (kind == Packed::kBf16 && oelt == Elt::kBf16) ||
                          (kind == Packed::kF16 && oelt == Elt::kF16));
  const size_t oes = EltSize(oelt);
  char* o = static_cast<char*>(out->untyped_data());
  std::atomic<bool> ok{true};
  ParallelRange(c, 1, 8, [&](int64_t r0, int64_t r1, int) {
    RowCursor cur(g, r0);
    float* row = Scratch(0, 32 * g.w);
    for (int64_t n = r0; n < r1; ++n) {
      if (bits) {
        if (!RowBits(kind, cur, packed.untyped_data(), g.w, row)) return ok.store(false);
        std::memcpy(o + n * r * oes, row, r * oes);
        continue;
      }
      if (!RowF32(kind, cur, packed.untyped_data(), g.w, row)) return ok.store(false);
      if (sc)
        for (int64_t i = 0; i < r; ++i) row[i] *= sc[n];
      FromF32(oelt, row, r, o + n * r * oes);
    }
  });
  LTJAX_CHECK(ok.load(), "ltjax: bitmask offsets/mask disagree with the packed values (damaged tensor)");
  return ffi::Error::Success();
}

ffi::Error BitmaskUnpackImpl(ffi::AnyBuffer mask, ffi::AnyBuffer offsets, ffi::AnyBuffer values,
                             ffi::Result<ffi::AnyBuffer> out, int64_t tile_rows, int64_t tile_cols) {
  return UnpackImpl(mask, offsets, values, nullptr, out, tile_rows, tile_cols);
}
ffi::Error BitmaskInt8UnpackImpl(ffi::AnyBuffer mask, ffi::AnyBuffer offsets, ffi::AnyBuffer codes,
                                 ffi::AnyBuffer scales, ffi::Result<ffi::AnyBuffer> out, int64_t tile_rows,
                                 int64_t tile_cols) {
  return UnpackImpl(mask, offsets, codes, &scales, out, tile_rows, tile_cols);
}

}  // namespace
}  // namespace ltjax

namespace xffi = xla::ffi;

XLA_FFI_DEFINE_HANDLER_SYMBOL(LtjaxBitmaskUnpack, ltjax::BitmaskUnpackImpl,
                              xffi::Ffi::Bind()
                                  .Arg<xffi::AnyBuffer>()  // mask [C, ceil(R/32)] uint32
                                  .Arg<xffi::AnyBuffer>()  // offsets [num_tiles] int32, per-tile prefix
                                  .Arg<xffi::AnyBuffer>()  // values [nnz] f32 | bf16 | f16, tile-major
                                  .Ret<xffi::AnyBuffer>()  // out [C, R] f32 | bf16 | f16
                                  .Attr<int64_t>("tile_rows")
                                  .Attr<int64_t>("tile_cols"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(LtjaxBitmaskInt8Unpack, ltjax::BitmaskInt8UnpackImpl,
                              xffi::Ffi::Bind()
                                  .Arg<xffi::AnyBuffer>()  // mask [C, ceil(R/32)] uint32
                                  .Arg<xffi::AnyBuffer>()  // offsets [num_tiles] int32
                                  .Arg<xffi::AnyBuffer>()  // codes [nnz] int8, tile-major
                                  .Arg<xffi::AnyBuffer>()  // scales [C] f32
                                  .Ret<xffi::AnyBuffer>()  // out [C, R] f32 | bf16 | f16
                                  .Attr<int64_t>("tile_rows")
                                  .Attr<int64_t>("tile_cols"));
