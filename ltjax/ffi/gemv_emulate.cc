// The CUDA GEMVs (gemv_cuda.cu) run on the CPU, lane by lane: the same per-lane steps
// (gemv_warp.h), the warp's shuffles replaced by loops over the 32 lanes, in the same order.
// Registered as "ltjax_int8_gemv" and "ltjax_bitmask_int8_gemv" for platform "cpu", so the CPU
// tests run the decode the GPU runs through the very call ltjax makes (ltjax/ffi/gemv.py). A test vehicle, not a fast path:
// one thread, no SIMD.
#include <vector>

#include "gemv_ffi.h"

namespace ltjax {
namespace gemv {
namespace {

// Lane 0's sum after the kernels' __shfl_xor_sync butterfly (offsets 16, 8, 4, 2, 1), same order.
template <int M>
float ButterflySum(const float (&acc)[32][M], int m) {
  float v[32];
  for (int l = 0; l < 32; ++l) v[l] = acc[l][m];
  for (int d = 16; d > 0; d >>= 1) {
    float next[32];
    for (int l = 0; l < 32; ++l) next[l] = v[l] + v[l ^ d];
    for (int l = 0; l < 32; ++l) v[l] = next[l];
  }
  return v[0];
}

template <int M>
void EmulateRows(const Geometry& g, const float* x, const uint32_t* mask, const int32_t* row_starts,
                 const uint8_t* packed, const float* scales, float* y) {
  uint32_t select[16];
  for (uint32_t n = 0; n < 16; ++n) select[n] = SelectorOf(n);
  const int lanes = g.seg == 0 ? 32 : g.seg;
  const int32_t nw = static_cast<int32_t>(g.w);
  for (int64_t r = 0; r < g.n; ++r) {
    const uint32_t* mrow = mask + r * g.w;
    const int32_t* srow = row_starts + r * g.gc;
    float acc[32][M] = {};
    int32_t carry = 0;
    for (int32_t w0 = 0; w0 < nw; w0 += 32) {  // a step: lane l holds word w0 + l
      uint32_t word[32], cnt[32], incl[32];
      for (int l = 0; l < 32; ++l) {
        word[l] = WordAt(mrow, w0 + l, nw);
        cnt[l] = incl[l] = Popc(word[l]);
      }
      for (int d = 1; d < lanes; d <<= 1) {  // __shfl_up_sync: every lane reads before any writes
        uint32_t up[32];
        for (int l = 0; l < 32; ++l) up[l] = l >= d ? incl[l - d] : incl[l];
        for (int l = 0; l < 32; ++l)
          if ((l & (lanes - 1)) >= d) incl[l] += up[l];
      }
      for (int l = 0; l < 32; ++l) {
        if (word[l] == 0) continue;
        const int32_t p = RowStartAt(srow, w0 + l, nw, TileShift(g)) + carry + static_cast<int32_t>(incl[l] - cnt[l]);
        DecodeWord<M>(word[l], p, packed, g.nnz, select, x, g.kp, 32 * (w0 + l), acc[l]);
      }
      if (g.seg == 0) carry += static_cast<int32_t>(incl[31]);
    }
    for (int m = 0; m < M; ++m) y[m * g.n + r] = ButterflySum<M>(acc, m) * scales[r];
  }
}

template <int M>
void EmulateInt8Rows(const Geometry& g, const float* x, const uint8_t* codes, const float* scales, float* y) {
  for (int64_t r = 0; r < g.n; ++r) {
    float acc[32][M] = {};
    for (int l = 0; l < 32; ++l)
      for (int32_t c = 16 * l; c < g.kp; c += 512) Int8Chunk<M>(codes + r * g.kp, x, g.kp, c, acc[l]);
    for (int m = 0; m < M; ++m) y[m * g.n + r] = ButterflySum<M>(acc, m) * scales[r];
  }
}

ffi::Error EmulateInt8Impl(ffi::AnyBuffer x, ffi::AnyBuffer codes, ffi::AnyBuffer scales, ffi::Result<ffi::AnyBuffer> y) {
  Geometry g;
  if (ffi::Error err = MakeInt8Geometry(x, codes, scales, *y, &g); err.failure()) return err;
  auto* xs = static_cast<const float*>(x.untyped_data());
  auto* cs = static_cast<const uint8_t*>(codes.untyped_data());
  auto* ss = static_cast<const float*>(scales.untyped_data());
  auto* ys = static_cast<float*>(y->untyped_data());
  switch (g.m) {
    case 1: EmulateInt8Rows<1>(g, xs, cs, ss, ys); break;
    case 2: EmulateInt8Rows<2>(g, xs, cs, ss, ys); break;
    case 3: EmulateInt8Rows<3>(g, xs, cs, ss, ys); break;
    default: EmulateInt8Rows<4>(g, xs, cs, ss, ys); break;
  }
  return ffi::Error::Success();
}

ffi::Error EmulateImpl(ffi::AnyBuffer x, ffi::AnyBuffer mask, ffi::AnyBuffer row_starts, ffi::AnyBuffer codes,
                       ffi::AnyBuffer scales, ffi::Result<ffi::AnyBuffer> y, int64_t seg_words) {
  Geometry g;
  if (ffi::Error err = MakeGeometry(x, mask, row_starts, codes, scales, *y, seg_words, &g); err.failure()) return err;
  auto* xs = static_cast<const float*>(x.untyped_data());
  auto* ms = static_cast<const uint32_t*>(mask.untyped_data());
  auto* rs = static_cast<const int32_t*>(row_starts.untyped_data());
  auto* ps = static_cast<const uint8_t*>(codes.untyped_data());
  auto* ss = static_cast<const float*>(scales.untyped_data());
  auto* ys = static_cast<float*>(y->untyped_data());
  switch (g.m) {
    case 1: EmulateRows<1>(g, xs, ms, rs, ps, ss, ys); break;
    case 2: EmulateRows<2>(g, xs, ms, rs, ps, ss, ys); break;
    case 3: EmulateRows<3>(g, xs, ms, rs, ps, ss, ys); break;
    default: EmulateRows<4>(g, xs, ms, rs, ps, ss, ys); break;
  }
  return ffi::Error::Success();
}

}  // namespace
}  // namespace gemv
}  // namespace ltjax

XLA_FFI_DEFINE_HANDLER_SYMBOL(LtjaxBitmaskInt8GemvEmulated, ltjax::gemv::EmulateImpl,
                              xla::ffi::Ffi::Bind()
                                  .Arg<xla::ffi::AnyBuffer>()
                                  .Arg<xla::ffi::AnyBuffer>()
                                  .Arg<xla::ffi::AnyBuffer>()
                                  .Arg<xla::ffi::AnyBuffer>()
                                  .Arg<xla::ffi::AnyBuffer>()
                                  .Ret<xla::ffi::AnyBuffer>()
                                  .Attr<int64_t>("seg_words"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(LtjaxInt8GemvEmulated, ltjax::gemv::EmulateInt8Impl,
                              xla::ffi::Ffi::Bind()
                                  .Arg<xla::ffi::AnyBuffer>()
                                  .Arg<xla::ffi::AnyBuffer>()
                                  .Arg<xla::ffi::AnyBuffer>()
                                  .Ret<xla::ffi::AnyBuffer>());
