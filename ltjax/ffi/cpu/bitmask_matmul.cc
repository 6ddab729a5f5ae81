// Fused sparse matmul over the bitmask codecs on CPU: y = x @ W^T, W decoded row by row in
// registers / L1 from mask words + packed values, never as a dense matrix.
//
// Targets (W is the storage matrix [N, K]; `tile_rows`, `tile_cols` are the LT-Block tile):
//   "ltjax_bitmask_int8_matmul"    y[M, N]  = x[M, K] @ W^T   W = expand(codes) * scales[:, None]
//   "ltjax_bitmask_int8_matmul_t"  dx[M, K] = dy[M, N] @ W
//   "ltjax_bitmask_matmul"         y[M, N]  = x[M, K] @ W^T   W = expand(values)  (f32/bf16/f16)
//   "ltjax_bitmask_matmul_t"       dx[M, K] = dy[M, N] @ W
// The two codecs share every line but the scales, so they live in one file.
#include "amx.h"

namespace ltjax {
namespace {

struct Weight {
  BitmaskGeometry g;
  Packed packed_kind;
  const void* packed;
  const float* scales;  // null for "bitmask"
};

ffi::Error CheckWeight(const ffi::AnyBuffer& mask, const ffi::AnyBuffer& offsets, const ffi::AnyBuffer& packed,
                       const ffi::AnyBuffer* scales, int64_t k, int64_t tile_rows, int64_t tile_cols, Weight* w) {
  LTJAX_CHECK(mask.dimensions().size() == 2, "ltjax: mask must be 2-D [N, ceil(K/32)], got " + Dims(mask));
  LTJAX_CHECK(packed.dimensions().size() == 1, "ltjax: packed values must be 1-D, got " + Dims(packed));
  int64_t n = mask.dimensions()[0];
  if (scales) {
    LTJAX_RETURN_IF_ERROR(CheckType("codes", packed, ffi::DataType::S8, "int8"));
    LTJAX_RETURN_IF_ERROR(CheckType("scales", *scales, ffi::DataType::F32, "float32"));
    LTJAX_RETURN_IF_ERROR(CheckShape("scales", *scales, {n}));
    w->scales = static_cast<const float*>(scales->untyped_data());
  } else {
    LTJAX_CHECK(PackedOf(packed.element_type(), &w->packed_kind) && w->packed_kind != Packed::kI8,
                "ltjax: bitmask values must be float32, bfloat16 or float16");
    w->scales = nullptr;
  }
  if (scales) w->packed_kind = Packed::kI8;
  w->packed = packed.untyped_data();
  return MakeGeometry(mask, offsets, packed.dimensions()[0], n, k, tile_rows, tile_cols, &w->g);
}

// Chunks start on tile rows when there are enough of them, so cursors need no mask scan.
int64_t TileAlign(const BitmaskGeometry& g) {
  return (g.tr % kNB == 0 && g.gr >= 2 * Pool::Get().size()) ? g.tr : kNB;
}

ffi::Error ForwardImpl(ffi::AnyBuffer x, ffi::AnyBuffer mask, ffi::AnyBuffer offsets, ffi::AnyBuffer packed,
                       const ffi::AnyBuffer* scales, ffi::Result<ffi::AnyBuffer> y, int64_t tile_rows,
                       int64_t tile_cols) {
  LTJAX_CHECK(CurrentIsa() != Isa::kNone, "ltjax: this CPU lacks AVX2/FMA");
  Elt elt, yelt;
  LTJAX_CHECK(EltOf(x.element_type(), &elt) && elt != Elt::kF16, "ltjax: x must be float32 or bfloat16");
  LTJAX_CHECK(x.dimensions().size() == 2, "ltjax: x must be 2-D [M, K], got " + Dims(x));
  int64_t m = x.dimensions()[0], k = x.dimensions()[1];
  Weight w;
  LTJAX_RETURN_IF_ERROR(CheckWeight(mask, offsets, packed, scales, k, tile_rows, tile_cols, &w));
  int64_t n = w.g.c;
  LTJAX_CHECK(EltOf(y->element_type(), &yelt) && yelt == elt, "ltjax: y must have the dtype of x");
  LTJAX_RETURN_IF_ERROR(CheckShape("y", *y, {m, n}));
  if (k == 0) {
    for (int64_t i = 0; i < m * n; ++i) StoreOut(elt, y->untyped_data(), i, 0.0f);
    return ffi::Error::Success();
  }
  int64_t kp = 32 * w.g.w;
  const float* xs = PaddedF32(elt, x.untyped_data(), m, k, kp, 2);
  bool ok;
  XDigits xd;
#if LTJAX_HAS_AMX
  // 8 <= M <= 64: expand 16 rows at a time and multiply on AMX tiles (one pass over W). Below 8
  // rows the expansion is not repaid (measured, 1024^2, M = 4: 133 us against 102 us for the f32
  // micro-kernel; docs/ffi.md "AMX int8 GEMM").
  if (w.packed_kind == Packed::kI8 && m >= kAmxMinBitmaskM && m <= kAmxMaxM && AmxFits(m, k) && n > 0 && HasAmx()) {
    AmxDigits ad;
    if (AmxDigitsOf(xs, m, k, kp, &ad)) {  // else (NaN/inf in x) the f32 path below
      std::atomic<bool> good{true};
      const int64_t align = w.g.tr % 16 == 0 && w.g.gr >= 2 * Pool::Get().size() ? w.g.tr : 16;
      ParallelRange(n, align, 64, [&](int64_t n0, int64_t n1, int) {
        if (!AmxGemmBitmask(w.g, static_cast<const int8_t*>(w.packed), m, ad, w.scales, n0, n1, elt,
                            y->untyped_data()))
          good.store(false);
      });
      LTJAX_CHECK(good.load(), "ltjax: bitmask offsets/mask disagree with the packed values (damaged tensor)");
      return ffi::Error::Success();
    }
  }
#endif
  const Vnni vnni = m == 1 && w.packed_kind == Packed::kI8 && VnniRowFits(w.g) ? CurrentVnni() : Vnni::kNone;
  int8_t* digits = vnni != Vnni::kNone ? reinterpret_cast<int8_t*>(Scratch(1, (3 * (kp + 64) + 3) / 4)) : nullptr;
  if (vnni != Vnni::kNone &&
      (vnni == Vnni::kAvx512 ? MakeXDigits(xs, kp, digits, &xd) : MakeXDigitsScalar(xs, kp, digits, &xd))) {
    std::atomic<bool> good{true};
    const int64_t min_chunk = n * k < kInlineWork ? n : 16;
    auto body = [&](int64_t n0, int64_t n1, int) {
      const auto* codes = static_cast<const int8_t*>(w.packed);
      if (!(vnni == Vnni::kAvx512 ? GemvI8_Vnni(w.g, codes, xd, w.scales, n0, n1, elt, y->untyped_data())
                                  : GemvI8_AvxVnni(w.g, codes, xd, w.scales, n0, n1, elt, y->untyped_data())))
        good.store(false);
    };
    ParallelRange(n, TileAlign(w.g), min_chunk, body);
    ok = good.load();
  } else {
    ok = Forward(m, k, n, kp, xs, w.scales, elt, y->untyped_data(), [&](int64_t row0) {
      return std::make_unique<BitmaskRows>(w.g, w.packed_kind, w.packed, row0);
    }, nullptr, TileAlign(w.g));
  }
  LTJAX_CHECK(ok, "ltjax: bitmask offsets/mask disagree with the packed values (damaged tensor)");
  return ffi::Error::Success();
}

ffi::Error TransposedImpl(ffi::AnyBuffer dy, ffi::AnyBuffer mask, ffi::AnyBuffer offsets, ffi::AnyBuffer packed,
                          const ffi::AnyBuffer* scales, ffi::Result<ffi::AnyBuffer> dx, int64_t tile_rows,
                          int64_t tile_cols) {
  LTJAX_CHECK(CurrentIsa() != Isa::kNone, "ltjax: this CPU lacks AVX2/FMA");
  Elt elt, xelt;
  LTJAX_CHECK(EltOf(dy.element_type(), &elt) && elt != Elt::kF16, "ltjax: dy must be float32 or bfloat16");
  LTJAX_CHECK(dy.dimensions().size() == 2, "ltjax: dy must be 2-D [M, N], got " + Dims(dy));
  LTJAX_CHECK(dx->dimensions().size() == 2, "ltjax: dx must be 2-D [M, K], got " + Dims(*dx));
  int64_t m = dy.dimensions()[0], k = dx->dimensions()[1];
  Weight w;
  LTJAX_RETURN_IF_ERROR(CheckWeight(mask, offsets, packed, scales, k, tile_rows, tile_cols, &w));
  int64_t n = w.g.c;
  LTJAX_RETURN_IF_ERROR(CheckShape("dy", dy, {m, n}));
  LTJAX_CHECK(EltOf(dx->element_type(), &xelt) && xelt == elt, "ltjax: dx must have the dtype of dy");
  LTJAX_RETURN_IF_ERROR(CheckShape("dx", *dx, {m, k}));
  if (k == 0) return ffi::Error::Success();
  int64_t kp = 32 * w.g.w;
  const float* dys = PaddedF32(elt, dy.untyped_data(), m, n, n, 1);
  bool ok = Transposed(m, k, n, kp, dys, w.scales, elt, dx->untyped_data(), [&](int64_t row0) {
    return std::make_unique<BitmaskRows>(w.g, w.packed_kind, w.packed, row0);
  }, TileAlign(w.g));
  LTJAX_CHECK(ok, "ltjax: bitmask offsets/mask disagree with the packed values (damaged tensor)");
  return ffi::Error::Success();
}

ffi::Error BitmaskInt8MatmulImpl(ffi::AnyBuffer x, ffi::AnyBuffer mask, ffi::AnyBuffer offsets, ffi::AnyBuffer codes,
                                 ffi::AnyBuffer scales, ffi::Result<ffi::AnyBuffer> y, int64_t tile_rows,
                                 int64_t tile_cols) {
  return ForwardImpl(x, mask, offsets, codes, &scales, y, tile_rows, tile_cols);
}
ffi::Error BitmaskInt8MatmulTImpl(ffi::AnyBuffer dy, ffi::AnyBuffer mask, ffi::AnyBuffer offsets,
                                  ffi::AnyBuffer codes, ffi::AnyBuffer scales, ffi::Result<ffi::AnyBuffer> dx,
                                  int64_t tile_rows, int64_t tile_cols) {
  return TransposedImpl(dy, mask, offsets, codes, &scales, dx, tile_rows, tile_cols);
}
ffi::Error BitmaskMatmulImpl(ffi::AnyBuffer x, ffi::AnyBuffer mask, ffi::AnyBuffer offsets, ffi::AnyBuffer values,
                             ffi::Result<ffi::AnyBuffer> y, int64_t tile_rows, int64_t tile_cols) {
  return ForwardImpl(x, mask, offsets, values, nullptr, y, tile_rows, tile_cols);
}
ffi::Error BitmaskMatmulTImpl(ffi::AnyBuffer dy, ffi::AnyBuffer mask, ffi::AnyBuffer offsets, ffi::AnyBuffer values,
                              ffi::Result<ffi::AnyBuffer> dx, int64_t tile_rows, int64_t tile_cols) {
  return TransposedImpl(dy, mask, offsets, values, nullptr, dx, tile_rows, tile_cols);
}

}  // namespace
}  // namespace ltjax

namespace xffi = xla::ffi;

XLA_FFI_DEFINE_HANDLER_SYMBOL(LtjaxBitmaskInt8Matmul, ltjax::BitmaskInt8MatmulImpl,
                              xffi::Ffi::Bind()
                                  .Arg<xffi::AnyBuffer>()  // x [M, K] f32 | bf16
                                  .Arg<xffi::AnyBuffer>()  // mask [N, ceil(K/32)] uint32
                                  .Arg<xffi::AnyBuffer>()  // offsets [num_tiles] int32, per-tile prefix
                                  .Arg<xffi::AnyBuffer>()  // codes [nnz] int8, tile-major
                                  .Arg<xffi::AnyBuffer>()  // scales [N] f32
                                  .Ret<xffi::AnyBuffer>()  // y [M, N], dtype of x
                                  .Attr<int64_t>("tile_rows")
                                  .Attr<int64_t>("tile_cols"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(LtjaxBitmaskInt8MatmulT, ltjax::BitmaskInt8MatmulTImpl,
                              xffi::Ffi::Bind()
                                  .Arg<xffi::AnyBuffer>()  // dy [M, N] f32 | bf16
                                  .Arg<xffi::AnyBuffer>()  // mask [N, ceil(K/32)] uint32
                                  .Arg<xffi::AnyBuffer>()  // offsets [num_tiles] int32
                                  .Arg<xffi::AnyBuffer>()  // codes [nnz] int8
                                  .Arg<xffi::AnyBuffer>()  // scales [N] f32
                                  .Ret<xffi::AnyBuffer>()  // dx [M, K], dtype of dy
                                  .Attr<int64_t>("tile_rows")
                                  .Attr<int64_t>("tile_cols"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(LtjaxBitmaskMatmul, ltjax::BitmaskMatmulImpl,
                              xffi::Ffi::Bind()
                                  .Arg<xffi::AnyBuffer>()  // x [M, K] f32 | bf16
                                  .Arg<xffi::AnyBuffer>()  // mask [N, ceil(K/32)] uint32
                                  .Arg<xffi::AnyBuffer>()  // offsets [num_tiles] int32
                                  .Arg<xffi::AnyBuffer>()  // values [nnz] f32 | bf16 | f16, tile-major
                                  .Ret<xffi::AnyBuffer>()  // y [M, N], dtype of x
                                  .Attr<int64_t>("tile_rows")
                                  .Attr<int64_t>("tile_cols"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(LtjaxBitmaskMatmulT, ltjax::BitmaskMatmulTImpl,
                              xffi::Ffi::Bind()
                                  .Arg<xffi::AnyBuffer>()  // dy [M, N] f32 | bf16
                                  .Arg<xffi::AnyBuffer>()  // mask [N, ceil(K/32)] uint32
                                  .Arg<xffi::AnyBuffer>()  // offsets [num_tiles] int32
                                  .Arg<xffi::AnyBuffer>()  // values [nnz] f32 | bf16 | f16
                                  .Ret<xffi::AnyBuffer>()  // dx [M, K], dtype of dy
                                  .Attr<int64_t>("tile_rows")
                                  .Attr<int64_t>("tile_cols"));
