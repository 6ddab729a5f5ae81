// The CUDA kernels (gemv_cuda.cu) run on the CPU, lane by lane: the same per-lane steps
// (gemv_warp.h), the warp's shuffles replaced by loops over the 32 lanes, in the same order.
// Built only for the tests (CMake option LTJAX_CUDA_EMULATION) into _ltjax_cuda_emulate.so, whose
// handlers ltjax/ffi/cuda registers under the CUDA targets' names for platform "cpu", so the CPU
// tests run the decode the GPU runs through the very call ltjax makes. A test vehicle, not a fast
// path: one thread, no SIMD.
#include <algorithm>
#include <cstring>
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
void EmulateRows(const Geometry& g, const float* x, const BitmaskArrays& a) {
  uint32_t select[16];
  for (uint32_t n = 0; n < 16; ++n) select[n] = SelectorOf(n);
  const int lanes = g.seg == 0 ? 32 : g.seg;
  const int32_t nw = static_cast<int32_t>(g.w);
  for (int64_t r = 0; r < g.n; ++r) {
    const uint32_t* mrow = a.mask + r * g.w;
    const int32_t* srow = a.row_starts + r * g.gc;
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
        DecodeWord(word[l], p, a.codes, g.nnz, select, FmaSink<M>{x, g.kp, 32 * (w0 + l), acc[l]});
      }
      if (g.seg == 0) carry += static_cast<int32_t>(incl[31]);
    }
    for (int m = 0; m < M; ++m) a.y[m * g.n + r] = ButterflySum<M>(acc, m) * a.scales[r];
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
  WithConstant<1, kMaxM>(g.m, [&](auto m) { EmulateInt8Rows<decltype(m)::value>(g, xs, cs, ss, ys); });
  return ffi::Error::Success();
}

// bf16 bits -> float.
float Bf16(uint32_t half_bits) { return AsFloat(half_bits << 16); }

// mma.m16n8k16.row.col (bf16 in, f32 accumulate) over the warp's fragments, laid out as the PTX
// ISA has them: a_j holds row g + 8 (j & 1), columns 2 q + 8 (j >> 1) + {0, 1}; b_j rows (k)
// 2 q + 8 j + {0, 1} of column g; c_i as CRow / CCol (g = lane >> 2, q = lane & 3).
template <int NT>
void MmaEmulate(const uint32_t (&a)[32][4], const uint32_t (&b)[32][NT][2], float (&c)[32][NT][4]) {
  float A[16][16], B[NT][16][8];
  for (int l = 0; l < 32; ++l) {
    const int g = l >> 2, q = l & 3;
    for (int j = 0; j < 4; ++j)
      for (int e = 0; e < 2; ++e) A[g + 8 * (j & 1)][2 * q + 8 * (j >> 1) + e] = Bf16((a[l][j] >> (16 * e)) & 0xFFFF);
    for (int t = 0; t < NT; ++t)
      for (int j = 0; j < 2; ++j)
        for (int e = 0; e < 2; ++e) B[t][2 * q + 8 * j + e][g] = Bf16((b[l][t][j] >> (16 * e)) & 0xFFFF);
  }
  for (int l = 0; l < 32; ++l)
    for (int t = 0; t < NT; ++t)
      for (int i = 0; i < 4; ++i) {
        float s = 0.0f;
        for (int k = 0; k < 16; ++k) s += A[CRow(l, i)][k] * B[t][k][CCol(l, i)];
        c[l][t][i] += s;
      }
}

// A warp's accumulators (rows r0 .. r0 + 15) times the rows' scales into its split's [Mp, N].
template <int NT>
void StoreMma(const float (&acc)[32][NT][4], int64_t r0, int64_t n, const float* scales, float* ys) {
  for (int l = 0; l < 32; ++l)
    for (int t = 0; t < NT; ++t)
      for (int i = 0; i < 4; ++i) {
        const int64_t rr = r0 + CRow(l, i);
        if (rr < n) ys[(8 * t + CCol(l, i)) * n + rr] = acc[l][t][i] * scales[rr];
      }
}

template <int NT>
void EmulateMma(const Geometry& g, const uint16_t* x, const BitmaskArrays& a) {
  uint32_t select[16];
  for (uint32_t n = 0; n < 16; ++n) select[n] = SelectorOf(n);
  const int32_t nw = static_cast<int32_t>(g.w);
  const int tile_shift = TileShift(g);
  std::vector<uint16_t> tile(16 * kTileStride);
  for (int s = 0; s < g.splits; ++s) {
    const int32_t w_begin = s * g.chunk, w_end = std::min(w_begin + g.chunk, nw);
    float* ys = a.y + static_cast<int64_t>(s) * g.m * g.n;
    for (int64_t r0 = 0; r0 < g.n; r0 += 16) {  // a warp
      float acc[32][NT][4] = {};
      int32_t carry[32] = {};
      for (int32_t w0 = w_begin; w0 < w_end; w0 += 2) {
        uint32_t cnt[32];
        uint32_t word[32];
        int32_t start[32];
        for (int l = 0; l < 32; ++l) {
          const int64_t row = r0 + (l >> 1);
          const bool ok = row < g.n;
          word[l] = ok ? WordAt(a.mask + row * g.w, w0 + (l & 1), nw) : 0u;
          start[l] = ok ? RowStartAt(a.row_starts + row * g.gc, w0 + (l & 1), nw, tile_shift) : 0;
          cnt[l] = Popc(word[l]);
        }
        for (int l = 0; l < 32; ++l) {
          const uint32_t other = cnt[l ^ 1];  // __shfl_xor_sync(.., 1)
          uint32_t vals[16] = {};
          if (word[l] != 0)
            DecodeWord(word[l], MmaWordStart(start[l], carry[l], other, l & 1, tile_shift), a.codes, g.nnz, select,
                       Bf16Sink{vals});
          carry[l] = MmaNextCarry(carry[l], cnt[l] + other, w0, tile_shift);
          std::memcpy(tile.data() + (l >> 1) * kTileStride + (l & 1) * 32, vals, 64);
        }
        for (int kk = 0; kk < 4; ++kk) {
          uint32_t af[32][4], bf[32][NT][2];
          for (int l = 0; l < 32; ++l) {
            for (int j = 0; j < 4; ++j) {  // ldmatrix.x4: matrix j's row l >> 2, addressed by lane 8 j + (l >> 2)
              const int src = 8 * j + (l >> 2);
              std::memcpy(&af[l][j], tile.data() + LdmRow(src) * kTileStride + kk * 16 + LdmCol(src) + 2 * (l & 3), 4);
            }
            for (int t = 0; t < NT; ++t) BFrag(BFragBase(x, g.kp, l, t) + 32 * w0, 16 * kk, bf[l][t]);
          }
          MmaEmulate<NT>(af, bf, acc);
        }
      }
      StoreMma<NT>(acc, r0, g.n, a.scales, ys);
    }
  }
}

template <int NT>
void EmulateInt8Mma(const Geometry& g, const uint16_t* x, const uint8_t* codes, const float* scales, float* y) {
  for (int s = 0; s < g.splits; ++s) {
    const int64_t c_begin = static_cast<int64_t>(s) * g.chunk, c_end = std::min<int64_t>(c_begin + g.chunk, g.kp);
    float* ys = y + static_cast<int64_t>(s) * g.m * g.n;
    for (int64_t r0 = 0; r0 < g.n; r0 += 16) {  // a warp
      float acc[32][NT][4] = {};
      for (int64_t c0 = c_begin; c0 < c_end; c0 += 64) {
        uint32_t va[32][4], vb[32][4], xw[32][NT][8];
        for (int l = 0; l < 32; ++l) {
          const int64_t ra = r0 + (l >> 2), rb = ra + 8, c = c0 + 16 * (l & 3);
          CodesAt(codes + (ra < g.n ? ra : 0) * g.k, ra < g.n, c, g.k, va[l]);
          CodesAt(codes + (rb < g.n ? rb : 0) * g.k, rb < g.n, c, g.k, vb[l]);
          for (int t = 0; t < NT; ++t) Int8BWords(x, g.kp, l, t, c0, xw[l][t]);
        }
        for (int j = 0; j < 4; ++j) {
          uint32_t af[32][4], bf[32][NT][2];
          for (int l = 0; l < 32; ++l) {
            Int8AFrag(va[l][j], vb[l][j], af[l]);
            for (int t = 0; t < NT; ++t) bf[l][t][0] = xw[l][t][2 * j], bf[l][t][1] = xw[l][t][2 * j + 1];
          }
          MmaEmulate<NT>(af, bf, acc);
        }
      }
      StoreMma<NT>(acc, r0, g.n, scales, ys);
    }
  }
}

ffi::Error EmulateInt8MmaImpl(ffi::AnyBuffer x, ffi::AnyBuffer codes, ffi::AnyBuffer scales, ffi::Result<ffi::AnyBuffer> y,
                              int64_t chunk_cols) {
  Geometry g;
  if (ffi::Error err = MakeInt8MmaGeometry(x, codes, scales, *y, chunk_cols, &g); err.failure()) return err;
  std::memset(y->untyped_data(), 0, y->size_bytes());
  WithConstant<1, 6>(g.m / 8, [&](auto nt) {
    EmulateInt8Mma<decltype(nt)::value>(g, static_cast<const uint16_t*>(x.untyped_data()),
                                        static_cast<const uint8_t*>(codes.untyped_data()),
                                        static_cast<const float*>(scales.untyped_data()), static_cast<float*>(y->untyped_data()));
  });
  return ffi::Error::Success();
}

ffi::Error EmulateMmaImpl(ffi::AnyBuffer x, ffi::AnyBuffer mask, ffi::AnyBuffer row_starts, ffi::AnyBuffer codes,
                          ffi::AnyBuffer scales, ffi::Result<ffi::AnyBuffer> y, int64_t seg_words, int64_t chunk_words) {
  Geometry g;
  if (ffi::Error err = MakeMmaGeometry(x, mask, row_starts, codes, scales, *y, seg_words, chunk_words, &g); err.failure())
    return err;
  const auto* xs = static_cast<const uint16_t*>(x.untyped_data());
  const BitmaskArrays arrays = ArraysOf(mask, row_starts, codes, scales, *y);
  std::memset(arrays.y, 0, y->size_bytes());
  WithConstant<1, 6>(g.m / 8, [&](auto nt) { EmulateMma<decltype(nt)::value>(g, xs, arrays); });
  return ffi::Error::Success();
}

ffi::Error EmulateImpl(ffi::AnyBuffer x, ffi::AnyBuffer mask, ffi::AnyBuffer row_starts, ffi::AnyBuffer codes,
                       ffi::AnyBuffer scales, ffi::Result<ffi::AnyBuffer> y, int64_t seg_words) {
  Geometry g;
  if (ffi::Error err = MakeGeometry(x, mask, row_starts, codes, scales, *y, seg_words, &g); err.failure()) return err;
  const auto* xs = static_cast<const float*>(x.untyped_data());
  const BitmaskArrays arrays = ArraysOf(mask, row_starts, codes, scales, *y);
  WithConstant<1, kMaxM>(g.m, [&](auto m) { EmulateRows<decltype(m)::value>(g, xs, arrays); });
  return ffi::Error::Success();
}

}  // namespace
}  // namespace gemv
}  // namespace ltjax

XLA_FFI_DEFINE_HANDLER_SYMBOL(LtjaxBitmaskInt8GemvEmulated, ltjax::gemv::EmulateImpl,
                              ltjax::gemv::BindBitmask(xla::ffi::Ffi::Bind()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(LtjaxBitmaskInt8MmaEmulated, ltjax::gemv::EmulateMmaImpl,
                              ltjax::gemv::BindBitmask(xla::ffi::Ffi::Bind()).Attr<int64_t>("chunk_words"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(LtjaxInt8MmaEmulated, ltjax::gemv::EmulateInt8MmaImpl,
                              ltjax::gemv::BindInt8(xla::ffi::Ffi::Bind()).Attr<int64_t>("chunk_cols"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(LtjaxInt8GemvEmulated, ltjax::gemv::EmulateInt8Impl, ltjax::gemv::BindInt8(xla::ffi::Ffi::Bind()));
