// The CUDA small-M kernels: y[M, N] = x[M, K] @ W^T, W [N, K] decoded in registers (GEMVs, one
// warp per output row, M <= 4; int8 for the tensor cores, M <= 16) or into shared memory for the
// tensor cores (bitmask_int8, M <= 16).
// gemv_warp.h has the per-lane steps, shared with the CPU emulation that the tests run;
// docs/cuda.md has the design and the instruction counts.
//
// Target (platform "CUDA"): "ltjax_int8_gemv"
//   x f32 [M, K], codes s8 [N, K] (K % 16 == 0), scales f32 [N] -> y f32 [M, N]
//
// Target (platform "CUDA"): "ltjax_int8_mma"
//   x bf16 [Mp, 64 ceil(K / 64)] (Mp = 8 .. 48, zero rows and columns past x), codes and scales as
//   above -> y f32 [S, Mp, N]: one partial product per K split of chunk_cols (i64) columns
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
//
// Target (platform "CUDA"): "ltjax_bitmask_int8_mma"
//   x bf16 [Mp, 64 ceil(W / 2)] (Mp = 8 .. 48, zero rows and columns past x), the weight as above,
//   -> y f32 [S, Mp, N]: one partial product per K split of chunk_words (i64) mask words
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
    const float* __restrict__ x, BitmaskArrays arrays, Geometry g) {
  const uint32_t* __restrict__ mask = arrays.mask;
  const int32_t* __restrict__ row_starts = arrays.row_starts;
  const uint8_t* __restrict__ packed = arrays.codes;
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
      DecodeWord(word, start + carry + static_cast<int32_t>(incl - cnt), packed, nnz, select, FmaSink<M>{x, kp, 32 * w, acc});
    if (carried) carry += static_cast<int32_t>(__shfl_sync(kFull, incl, 31));
    word = next_word;
    start = next_start;
  }
#pragma unroll
  for (int m = 0; m < M; ++m)
#pragma unroll
    for (int d = 16; d > 0; d >>= 1) acc[m] += __shfl_xor_sync(kFull, acc[m], d);
  if (lane == 0) {
    const float sc = arrays.scales[r];
#pragma unroll
    for (int m = 0; m < M; ++m) arrays.y[m * g.n + r] = acc[m] * sc;
  }
}

// No columns: the partial sums are 0.
ffi::Error ZeroFill(ffi::AnyBuffer& y, cudaStream_t stream) {
  const cudaError_t err = cudaMemsetAsync(y.untyped_data(), 0, y.size_bytes(), stream);
  if (err != cudaSuccess) return ffi::Error::Internal(std::string("ltjax: cudaMemsetAsync: ") + cudaGetErrorString(err));
  return ffi::Error::Success();
}

ffi::Error Launched() {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return ffi::Error::Internal(std::string("ltjax: CUDA GEMV launch: ") + cudaGetErrorString(err));
  return ffi::Error::Success();
}

// The MMA kernels' grid: row blocks of 16 rows a warp, times the K splits.
ffi::Error MmaGrid(const Geometry& g, dim3* grid) {
  const int64_t row_blocks = (g.n + 16 * kRowsPerBlock - 1) / (16 * kRowsPerBlock);
  if (row_blocks >= (int64_t{1} << 31) || g.splits > 65535) return Invalid("the MMA kernel's grid is too large");
  *grid = dim3(static_cast<unsigned>(row_blocks), static_cast<unsigned>(g.splits));
  return ffi::Error::Success();
}

// bitmask_int8, 2 <= M <= 16: a warp decodes 16 weight rows, 64 columns a step, into bf16 in shared
// memory, and the tensor cores multiply them with NT n8 tiles of x (gemv_warp.h, "the MMA kernel's
// layouts"). Grid: (row blocks of 64, K splits); each split writes its own partial [Mp, N].
__device__ __forceinline__ void LdMatrixX4(const uint16_t* p, uint32_t* a) {
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(p));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(a[0]), "=r"(a[1]), "=r"(a[2]), "=r"(a[3]) : "r"(addr));
}

__device__ __forceinline__ void MmaBf16(float* c, const uint32_t* a, const uint32_t* b) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
               "{%0, %1, %2, %3};"
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

template <int NT>
__global__ void __launch_bounds__(32 * kRowsPerBlock, 4) BitmaskInt8Mma(
    const uint16_t* __restrict__ x, BitmaskArrays arrays, Geometry g) {
  const uint32_t* __restrict__ mask = arrays.mask;
  const int32_t* __restrict__ row_starts = arrays.row_starts;
  const uint8_t* __restrict__ packed = arrays.codes;
  __shared__ uint32_t select[16];
  __shared__ __align__(16) uint16_t tiles[kRowsPerBlock][16 * kTileStride];
  if (threadIdx.x < 16) select[threadIdx.x] = SelectorOf(threadIdx.x);
  __syncthreads();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, half = lane & 1;
  const int64_t r0 = (static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + warp) * 16;
  if (r0 >= g.n) return;  // whole warps
  const int64_t row = r0 + (lane >> 1);
  const bool row_ok = row < g.n;
  const int32_t nw = static_cast<int32_t>(g.w);
  const int tile_shift = TileShift(g);
  const uint32_t* mrow = mask + (row_ok ? row : 0) * g.w;
  const int32_t* srow = row_starts + (row_ok ? row : 0) * g.gc;
  uint16_t* tile = tiles[warp];
  const int32_t w_begin = static_cast<int32_t>(blockIdx.y) * g.chunk;
  const int32_t w_end = min(w_begin + g.chunk, nw);
  float acc[NT][4];
  const uint16_t* xb[NT];  // this lane's B fragments, advanced 64 columns a step
#pragma unroll
  for (int t = 0; t < NT; ++t) {
    acc[t][0] = acc[t][1] = acc[t][2] = acc[t][3] = 0.0f;
    xb[t] = BFragBase(x, g.kp, lane, t) + 32 * w_begin;
  }
  int32_t carry = 0;  // this row's values in earlier steps of the current tile column
  for (int32_t w0 = w_begin; w0 < w_end; w0 += 2) {
    const int32_t w = w0 + half;
    const uint32_t word = row_ok ? WordAt(mrow, w, nw) : 0u;
    const int32_t start = row_ok ? RowStartAt(srow, w, nw, tile_shift) : 0;
    const uint32_t cnt = Popc(word);
    const uint32_t other = __shfl_xor_sync(kFull, cnt, 1);
    uint32_t vals[16];
    if (word != 0) {
      DecodeWord(word, MmaWordStart(start, carry, other, half, tile_shift), packed, g.nnz, select, Bf16Sink{vals});
    } else {
#pragma unroll
      for (int i = 0; i < 16; ++i) vals[i] = 0;
    }
    carry = MmaNextCarry(carry, cnt + other, w0, tile_shift);
    uint4* dst = reinterpret_cast<uint4*>(tile + (lane >> 1) * kTileStride + half * 32);
#pragma unroll
    for (int i = 0; i < 4; ++i) dst[i] = make_uint4(vals[4 * i], vals[4 * i + 1], vals[4 * i + 2], vals[4 * i + 3]);
    __syncwarp();
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      uint32_t a[4];
      LdMatrixX4(tile + LdmRow(lane) * kTileStride + kk * 16 + LdmCol(lane), a);
#pragma unroll
      for (int t = 0; t < NT; ++t) {
        uint32_t b[2];
        BFrag(xb[t], 16 * kk, b);
        MmaBf16(acc[t], a, b);
      }
    }
#pragma unroll
    for (int t = 0; t < NT; ++t) xb[t] += 64;
    __syncwarp();  // the tile is rewritten next step
  }
  float* ys = arrays.y + static_cast<int64_t>(blockIdx.y) * g.m * g.n;
#pragma unroll
  for (int t = 0; t < NT; ++t)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int64_t rr = r0 + CRow(lane, i);
      if (rr < g.n) ys[(8 * t + CCol(lane, i)) * g.n + rr] = acc[t][i] * arrays.scales[rr];
    }
}

ffi::Error MmaImpl(cudaStream_t stream, ffi::AnyBuffer x, ffi::AnyBuffer mask, ffi::AnyBuffer row_starts,
                   ffi::AnyBuffer codes, ffi::AnyBuffer scales, ffi::Result<ffi::AnyBuffer> y, int64_t seg_words,
                   int64_t chunk_words) {
  Geometry g;
  if (ffi::Error err = MakeMmaGeometry(x, mask, row_starts, codes, scales, *y, seg_words, chunk_words, &g); err.failure())
    return err;
  if (g.n == 0) return ffi::Error::Success();
  if (g.w == 0) return ZeroFill(*y, stream);
  dim3 grid, block(32 * kRowsPerBlock);
  if (ffi::Error err = MmaGrid(g, &grid); err.failure()) return err;
  const auto* xs = static_cast<const uint16_t*>(x.untyped_data());
  const BitmaskArrays arrays = ArraysOf(mask, row_starts, codes, scales, *y);
  WithConstant<1, 6>(g.m / 8, [&](auto nt) { BitmaskInt8Mma<decltype(nt)::value><<<grid, block, 0, stream>>>(xs, arrays, g); });
  return Launched();
}

// int8, 3 <= M <= 16 (up to 48 bf16 rows of x): a warp multiplies 16 weight rows with x on the
// tensor cores, 64 columns a step, its A fragments made in registers from two 16-byte loads a lane
// (gemv_warp.h, "the int8 MMA's layouts"); the next step's codes load while this one multiplies.
// Grid: (row blocks of 64, K splits); each split writes its own partial [Mp, N].
template <int NT>
__global__ void __launch_bounds__(32 * kRowsPerBlock, 4) Int8Mma(const uint16_t* __restrict__ x,
                                                                  const uint8_t* __restrict__ codes,
                                                                  const float* __restrict__ scales,
                                                                  float* __restrict__ y, Geometry g) {
  const int lane = threadIdx.x & 31;
  const int64_t r0 = (static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + (threadIdx.x >> 5)) * 16;
  if (r0 >= g.n) return;  // whole warps
  const int64_t ra = r0 + (lane >> 2), rb = ra + 8;
  const bool ok_a = ra < g.n, ok_b = rb < g.n;
  const uint8_t* row_a = codes + (ok_a ? ra : 0) * g.k;
  const uint8_t* row_b = codes + (ok_b ? rb : 0) * g.k;
  const int64_t c_begin = static_cast<int64_t>(blockIdx.y) * g.chunk;
  const int64_t c_end = min(c_begin + g.chunk, g.kp);
  const int64_t col = 16 * (lane & 3);  // the lane's columns in a step: c0 + col .. + 15
  float acc[NT][4];
#pragma unroll
  for (int t = 0; t < NT; ++t) acc[t][0] = acc[t][1] = acc[t][2] = acc[t][3] = 0.0f;
  uint32_t va[4], vb[4];
  CodesAt(row_a, ok_a, c_begin + col, g.k, va);
  CodesAt(row_b, ok_b, c_begin + col, g.k, vb);
  for (int64_t c0 = c_begin; c0 < c_end; c0 += 64) {
    uint32_t na[4], nb[4];
    CodesAt(row_a, ok_a && c0 + 64 < c_end, c0 + 64 + col, g.k, na);
    CodesAt(row_b, ok_b && c0 + 64 < c_end, c0 + 64 + col, g.k, nb);
    uint32_t xw[NT][8];
#pragma unroll
    for (int t = 0; t < NT; ++t) Int8BWords(x, g.kp, lane, t, c0, xw[t]);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      uint32_t a[4];
      Int8AFrag(va[j], vb[j], a);
#pragma unroll
      for (int t = 0; t < NT; ++t) MmaBf16(acc[t], a, xw[t] + 2 * j);
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) va[i] = na[i], vb[i] = nb[i];
  }
  float* ys = y + static_cast<int64_t>(blockIdx.y) * g.m * g.n;
#pragma unroll
  for (int t = 0; t < NT; ++t)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int64_t rr = r0 + CRow(lane, i);
      if (rr < g.n) ys[(8 * t + CCol(lane, i)) * g.n + rr] = acc[t][i] * scales[rr];
    }
}

ffi::Error Int8MmaImpl(cudaStream_t stream, ffi::AnyBuffer x, ffi::AnyBuffer codes, ffi::AnyBuffer scales,
                       ffi::Result<ffi::AnyBuffer> y, int64_t chunk_cols) {
  Geometry g;
  if (ffi::Error err = MakeInt8MmaGeometry(x, codes, scales, *y, chunk_cols, &g); err.failure()) return err;
  if (g.n == 0) return ffi::Error::Success();
  if (g.kp == 0) return ZeroFill(*y, stream);
  dim3 grid, block(32 * kRowsPerBlock);
  if (ffi::Error err = MmaGrid(g, &grid); err.failure()) return err;
  const auto* xs = static_cast<const uint16_t*>(x.untyped_data());
  const auto* cs = static_cast<const uint8_t*>(codes.untyped_data());
  const auto* ss = static_cast<const float*>(scales.untyped_data());
  auto* ys = static_cast<float*>(y->untyped_data());
  WithConstant<1, 6>(g.m / 8, [&](auto nt) { Int8Mma<decltype(nt)::value><<<grid, block, 0, stream>>>(xs, cs, ss, ys, g); });
  return Launched();
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

// The GEMVs' grid: one warp per output row, kRowsPerBlock rows a block.
ffi::Error RowGrid(int64_t n, dim3* grid) {
  const int64_t blocks = (n + kRowsPerBlock - 1) / kRowsPerBlock;
  if (blocks >= (int64_t{1} << 31)) return Invalid("the GEMV's grid is too large");
  *grid = dim3(static_cast<unsigned>(blocks));
  return ffi::Error::Success();
}

ffi::Error Int8GemvImpl(cudaStream_t stream, ffi::AnyBuffer x, ffi::AnyBuffer codes, ffi::AnyBuffer scales,
                        ffi::Result<ffi::AnyBuffer> y) {
  Geometry g;
  if (ffi::Error err = MakeInt8Geometry(x, codes, scales, *y, &g); err.failure()) return err;
  if (g.n == 0) return ffi::Error::Success();
  dim3 grid, block(32 * kRowsPerBlock);
  if (ffi::Error err = RowGrid(g.n, &grid); err.failure()) return err;
  const auto* xs = static_cast<const float*>(x.untyped_data());
  const auto* cs = static_cast<const uint8_t*>(codes.untyped_data());
  const auto* ss = static_cast<const float*>(scales.untyped_data());
  auto* ys = static_cast<float*>(y->untyped_data());
  WithConstant<1, kMaxM>(g.m, [&](auto m) { Int8Gemv<decltype(m)::value><<<grid, block, 0, stream>>>(xs, cs, ss, ys, g); });
  return Launched();
}

ffi::Error GemvImpl(cudaStream_t stream, ffi::AnyBuffer x, ffi::AnyBuffer mask, ffi::AnyBuffer row_starts,
                    ffi::AnyBuffer codes, ffi::AnyBuffer scales, ffi::Result<ffi::AnyBuffer> y, int64_t seg_words) {
  Geometry g;
  if (ffi::Error err = MakeGeometry(x, mask, row_starts, codes, scales, *y, seg_words, &g); err.failure()) return err;
  if (g.n == 0) return ffi::Error::Success();
  dim3 grid, block(32 * kRowsPerBlock);
  if (ffi::Error err = RowGrid(g.n, &grid); err.failure()) return err;
  const auto* xs = static_cast<const float*>(x.untyped_data());
  const BitmaskArrays arrays = ArraysOf(mask, row_starts, codes, scales, *y);
  WithConstant<1, kMaxM>(g.m, [&](auto m) { BitmaskInt8Gemv<decltype(m)::value><<<grid, block, 0, stream>>>(xs, arrays, g); });
  return Launched();
}

}  // namespace
}  // namespace gemv
}  // namespace ltjax

XLA_FFI_DEFINE_HANDLER_SYMBOL(LtjaxBitmaskInt8MmaCuda, ltjax::gemv::MmaImpl,
                              ltjax::gemv::BindBitmask(xla::ffi::Ffi::Bind().Ctx<xla::ffi::PlatformStream<cudaStream_t>>())
                                  .Attr<int64_t>("chunk_words"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(LtjaxInt8MmaCuda, ltjax::gemv::Int8MmaImpl,
                              ltjax::gemv::BindInt8(xla::ffi::Ffi::Bind().Ctx<xla::ffi::PlatformStream<cudaStream_t>>())
                                  .Attr<int64_t>("chunk_cols"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(LtjaxInt8GemvCuda, ltjax::gemv::Int8GemvImpl,
                              ltjax::gemv::BindInt8(xla::ffi::Ffi::Bind().Ctx<xla::ffi::PlatformStream<cudaStream_t>>()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(LtjaxBitmaskInt8GemvCuda, ltjax::gemv::GemvImpl,
                              ltjax::gemv::BindBitmask(xla::ffi::Ffi::Bind().Ctx<xla::ffi::PlatformStream<cudaStream_t>>()));
