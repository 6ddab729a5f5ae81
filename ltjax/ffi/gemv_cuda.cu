// The CUDA GEMVs: y[M, N] = x[M, K] @ W^T for M <= 4, W [N, K] decoded in registers, one warp
// per output row (gemv_warp.h has the per-lane steps, shared with the CPU emulation that the
// tests run; docs/pallas.md, "CUDA GEMV").
//
// Target (platform "CUDA"): "ltjax_int8_gemv"
//   x f32 [M, K], codes s8 [N, K] (K % 16 == 0), scales f32 [N] -> y f32 [M, N]
//
// Target (platform "CUDA"): "ltjax_bitmask_int8_gemv"
//   x          f32 [M, Kp]      Kp = 32 W, zero past K
//   mask       u32 [N, W]
//   row_starts s32 [N * GC]     packed index of row r's first value in tile column j (from XLA)
//   codes      s8  [nnz]
//   scales     f32 [N]
//   -> y       f32 [M, N]
//   attribute  seg_words (i64): words per tile column (a power of two <= 32), or 0 for one tile
//              column spanning the row
#include <cuda_runtime.h>

#include "gemv_ffi.h"

namespace ltjax {
namespace gemv {
namespace {

constexpr unsigned kFull = 0xFFFFFFFFu;
constexpr int kRowsPerBlock = 4;  // warps per block
// Blocks an SM must hold: the register budget ptxas gets (left to itself it chose 32 for the
// bitmask M = 1 kernel and spilled). 8 blocks (32 warps): 64 registers; 6: 80 and 4: 128, which
// the bitmask kernel's in-flight loads need at M = 2 and M >= 3 (96 still spilled at M = 4).
constexpr int kMinBlocksPerSm = 8;
template <int M>
constexpr int kBitmaskMinBlocks = M == 1 ? 8 : M == 2 ? 6 : 4;

template <int M>
__global__ void __launch_bounds__(32 * kRowsPerBlock, kBitmaskMinBlocks<M>) BitmaskInt8Gemv(
    const float* __restrict__ x, const uint32_t* __restrict__ mask, const int32_t* __restrict__ row_starts,
    const uint8_t* __restrict__ packed, const float* __restrict__ scales, float* __restrict__ y, Geometry g) {
  __shared__ uint32_t select[16];
  if (threadIdx.x < 16) select[threadIdx.x] = SelectorOf(threadIdx.x);
  __syncthreads();
  const int lane = threadIdx.x & 31;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + (threadIdx.x >> 5);
  if (r >= g.n) return;  // whole warps: the shuffles below never see an exited lane
  const int lanes = g.seg == 0 ? 32 : g.seg;
  float acc[M];
#pragma unroll
  for (int m = 0; m < M; ++m) acc[m] = 0.0f;
  int32_t carry = 0;  // seg == 0: the row's values in earlier steps
  const uint32_t* mrow = mask + r * g.w;
  const int32_t* srow = row_starts + r * g.gc;
  const int32_t nw = static_cast<int32_t>(g.w);
  const int tile_shift = TileShift(g);
  const bool carried = g.seg == 0;
  const int32_t nnz = g.nnz;
  const int64_t kp = g.kp;
  // Software-pipelined: step s + 1's mask word and row start are loaded while step s decodes.
  uint32_t word = WordAt(mrow, lane, nw);
  int32_t start = RowStartAt(srow, lane, nw, tile_shift);
  for (int32_t w = lane; w - lane < nw; w += 32) {  // w: this lane's word in the step
    const uint32_t next_word = WordAt(mrow, w + 32, nw);
    const int32_t next_start = RowStartAt(srow, w + 32, nw, tile_shift);
    const uint32_t cnt = Popc(word);
    uint32_t incl = cnt;
    for (int d = 1; d < lanes; d <<= 1) {
      const uint32_t v = __shfl_up_sync(kFull, incl, d);
      if ((lane & (lanes - 1)) >= d) incl += v;
    }
    if (word != 0)
      DecodeWord<M>(word, start + carry + static_cast<int32_t>(incl - cnt), packed, nnz, select, x, kp, 32 * w, acc);
    if (carried) carry += static_cast<int32_t>(__shfl_sync(kFull, incl, 31));
    word = next_word;
    start = next_start;
  }
#pragma unroll
  for (int m = 0; m < M; ++m)
#pragma unroll
    for (int d = 16; d > 0; d >>= 1) acc[m] += __shfl_xor_sync(kFull, acc[m], d);
  if (lane == 0) {
    const float sc = scales[r];
#pragma unroll
    for (int m = 0; m < M; ++m) y[m * g.n + r] = acc[m] * sc;
  }
}

// int8: 16 codes per lane per load, 512 columns per warp step, 2-4 loads in flight.
template <int M>
__global__ void __launch_bounds__(32 * kRowsPerBlock, kMinBlocksPerSm) Int8Gemv(
    const float* __restrict__ x, const uint8_t* __restrict__ codes, const float* __restrict__ scales,
    float* __restrict__ y, Geometry g) {
  const int lane = threadIdx.x & 31;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + (threadIdx.x >> 5);
  if (r >= g.n) return;
  const uint8_t* row = codes + r * g.kp;
  float acc[M];
#pragma unroll
  for (int m = 0; m < M; ++m) acc[m] = 0.0f;
  const int32_t k = static_cast<int32_t>(g.kp);
  constexpr int kUnroll = M == 1 ? 4 : 2;  // loads in flight per lane; M >= 3 unrolled 4 spills at 64 registers
#pragma unroll kUnroll
  for (int32_t c = 16 * lane; c < k; c += 512) Int8Chunk<M>(row, x, g.kp, c, acc);
#pragma unroll
  for (int m = 0; m < M; ++m)
#pragma unroll
    for (int d = 16; d > 0; d >>= 1) acc[m] += __shfl_xor_sync(kFull, acc[m], d);
  if (lane == 0) {
    const float sc = scales[r];
#pragma unroll
    for (int m = 0; m < M; ++m) y[m * g.n + r] = acc[m] * sc;
  }
}

ffi::Error Launched() {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return ffi::Error::Internal(std::string("ltjax: CUDA GEMV launch: ") + cudaGetErrorString(err));
  return ffi::Error::Success();
}

ffi::Error Int8GemvImpl(cudaStream_t stream, ffi::AnyBuffer x, ffi::AnyBuffer codes, ffi::AnyBuffer scales,
                        ffi::Result<ffi::AnyBuffer> y) {
  Geometry g;
  if (ffi::Error err = MakeInt8Geometry(x, codes, scales, *y, &g); err.failure()) return err;
  if (g.n == 0) return ffi::Error::Success();
  const dim3 grid(static_cast<unsigned>((g.n + kRowsPerBlock - 1) / kRowsPerBlock)), block(32 * kRowsPerBlock);
  auto* xs = static_cast<const float*>(x.untyped_data());
  auto* cs = static_cast<const uint8_t*>(codes.untyped_data());
  auto* ss = static_cast<const float*>(scales.untyped_data());
  auto* ys = static_cast<float*>(y->untyped_data());
  switch (g.m) {
    case 1: Int8Gemv<1><<<grid, block, 0, stream>>>(xs, cs, ss, ys, g); break;
    case 2: Int8Gemv<2><<<grid, block, 0, stream>>>(xs, cs, ss, ys, g); break;
    case 3: Int8Gemv<3><<<grid, block, 0, stream>>>(xs, cs, ss, ys, g); break;
    default: Int8Gemv<4><<<grid, block, 0, stream>>>(xs, cs, ss, ys, g); break;
  }
  return Launched();
}

ffi::Error GemvImpl(cudaStream_t stream, ffi::AnyBuffer x, ffi::AnyBuffer mask, ffi::AnyBuffer row_starts,
                    ffi::AnyBuffer codes, ffi::AnyBuffer scales, ffi::Result<ffi::AnyBuffer> y, int64_t seg_words) {
  Geometry g;
  if (ffi::Error err = MakeGeometry(x, mask, row_starts, codes, scales, *y, seg_words, &g); err.failure()) return err;
  if (g.n == 0) return ffi::Error::Success();
  const dim3 grid(static_cast<unsigned>((g.n + kRowsPerBlock - 1) / kRowsPerBlock)), block(32 * kRowsPerBlock);
  auto* xs = static_cast<const float*>(x.untyped_data());
  auto* ms = static_cast<const uint32_t*>(mask.untyped_data());
  auto* rs = static_cast<const int32_t*>(row_starts.untyped_data());
  auto* ps = static_cast<const uint8_t*>(codes.untyped_data());
  auto* ss = static_cast<const float*>(scales.untyped_data());
  auto* ys = static_cast<float*>(y->untyped_data());
  switch (g.m) {
    case 1: BitmaskInt8Gemv<1><<<grid, block, 0, stream>>>(xs, ms, rs, ps, ss, ys, g); break;
    case 2: BitmaskInt8Gemv<2><<<grid, block, 0, stream>>>(xs, ms, rs, ps, ss, ys, g); break;
    case 3: BitmaskInt8Gemv<3><<<grid, block, 0, stream>>>(xs, ms, rs, ps, ss, ys, g); break;
    default: BitmaskInt8Gemv<4><<<grid, block, 0, stream>>>(xs, ms, rs, ps, ss, ys, g); break;
  }
  return Launched();
}

}  // namespace
}  // namespace gemv
}  // namespace ltjax

XLA_FFI_DEFINE_HANDLER_SYMBOL(LtjaxInt8GemvCuda, ltjax::gemv::Int8GemvImpl,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<xla::ffi::AnyBuffer>()
                                  .Arg<xla::ffi::AnyBuffer>()
                                  .Arg<xla::ffi::AnyBuffer>()
                                  .Ret<xla::ffi::AnyBuffer>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(LtjaxBitmaskInt8GemvCuda, ltjax::gemv::GemvImpl,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<xla::ffi::AnyBuffer>()
                                  .Arg<xla::ffi::AnyBuffer>()
                                  .Arg<xla::ffi::AnyBuffer>()
                                  .Arg<xla::ffi::AnyBuffer>()
                                  .Arg<xla::ffi::AnyBuffer>()
                                  .Ret<xla::ffi::AnyBuffer>()
                                  .Attr<int64_t>("seg_words"));
