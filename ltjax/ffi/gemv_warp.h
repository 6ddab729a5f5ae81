// The per-lane steps of the CUDA GEMVs (gemv_cuda.cu), written once for the device and for the
// host: gemv_emulate.cc runs the same functions lane by lane on the CPU, so the decode the GPU
// runs is the decode the CPU tests check (docs/pallas.md, "CUDA GEMV").
//
// A warp computes one output row r: y[m, r] = scale[r] * sum_k x[m, k] * code[r, k], M <= 4.
// int8: lane l takes 16 codes (one 16-byte load) at columns 16 l + 512 i, i = 0, 1, ...
// bitmask_int8: step s covers mask words 32 s .. 32 s + 31 of row r, one per lane. Lane l:
//   1. loads its word (columns 32 w .. 32 w + 31, w = 32 s + l) and counts its bits;
//   2. an exclusive prefix of those counts over the lanes of the same tile column (segments of
//      `seg` lanes; the warp's words are consecutive, and so are their packed values inside a
//      tile, which stores its values row by row), plus the row's start in that tile
//      (`row_starts[r, tile column]`, from XLA), is the packed index p of its word's first nonzero;
//   3. decodes its 32 codes from the packed bytes at p with two byte permutes per mask byte
//      (a 16-entry selector table: nibble -> which of 4 bytes goes where, absent ones read a zero
//      byte), turns them into f32 exactly (byte into a float's mantissa, one subtract) and
//      accumulates code * x into M f32 sums.
// The warp then adds its 32 lanes' sums. No dense weight, no global scan, no shared memory but
// the 64-byte selector table.
#pragma once

#include <cstdint>
#include <cstring>

#ifdef __CUDACC__
#define LTJAX_HD __host__ __device__ __forceinline__
#define LTJAX_HDC __host__ __device__ constexpr
#else
#define LTJAX_HD inline
#define LTJAX_HDC constexpr
#endif

namespace ltjax {
namespace gemv {

constexpr int kMaxM = 4;

// ------------------------------------------------------------------ intrinsics, host twins
LTJAX_HD uint32_t Popc(uint32_t v) {
#ifdef __CUDA_ARCH__
  return __popc(v);
#else
  return static_cast<uint32_t>(__builtin_popcount(v));
#endif
}

// Bytes of {y, x} (x: bytes 0-3, y: 4-7) picked by the 4-bit selectors of s (each < 8).
LTJAX_HD uint32_t BytePerm(uint32_t x, uint32_t y, uint32_t s) {
#ifdef __CUDA_ARCH__
  uint32_t r;  // prmt itself: __byte_perm masks every selector with 0x7777 first (one more LOP3)
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(r) : "r"(x), "r"(y), "r"(s));
  return r;
#else
  const uint64_t t = (static_cast<uint64_t>(y) << 32) | x;
  uint32_t r = 0;
  for (int i = 0; i < 4; ++i) r |= static_cast<uint32_t>((t >> (8 * ((s >> (4 * i)) & 7))) & 0xFF) << (8 * i);
  return r;
#endif
}

// The low 32 bits of {hi, lo} >> min(sh, 32).
LTJAX_HD uint32_t FunnelShiftRC(uint32_t lo, uint32_t hi, uint32_t sh) {
#ifdef __CUDA_ARCH__
  return __funnelshift_rc(lo, hi, sh);
#else
  return static_cast<uint32_t>(((static_cast<uint64_t>(hi) << 32) | lo) >> (sh > 32 ? 32 : sh));
#endif
}

LTJAX_HD float AsFloat(uint32_t u) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}

// x[0 .. 3] (16-byte aligned): one vector load on the device.
LTJAX_HD void Load4(const float* x, float* out) {
#ifdef __CUDA_ARCH__
  const float4 v = __ldg(reinterpret_cast<const float4*>(x));
  out[0] = v.x, out[1] = v.y, out[2] = v.z, out[3] = v.w;
#else
  std::memcpy(out, x, 16);
#endif
}

// 16 bytes at p (16-byte aligned) as four words: one vector load on the device.
LTJAX_HD void Load16(const uint8_t* p, uint32_t* out) {
#ifdef __CUDA_ARCH__
  const uint4 v = __ldg(reinterpret_cast<const uint4*>(p));
  out[0] = v.x, out[1] = v.y, out[2] = v.z, out[3] = v.w;
#else
  std::memcpy(out, p, 16);
#endif
}

// ------------------------------------------------------------------ the selector table
// kSelect[n] for a mask nibble n: output byte i takes the rank of bit i among n's set bits
// (the packed position of that value) when bit i is set, else 4 (byte 0 of the zero operand).
LTJAX_HDC uint32_t SelectorOf(uint32_t n) {
  uint32_t s = 0, rank = 0;
  for (uint32_t i = 0; i < 4; ++i) {
    const bool set = (n >> i) & 1;
    s |= (set ? rank : 4u) << (4 * i);
    rank += set ? 1 : 0;
  }
  return s;
}

// ------------------------------------------------------------------ the packed bytes
// Word i of the packed codes (bytes 4 i .. 4 i + 3), byte by byte, zero outside [0, nnz): the
// rare case of a word at the array's end (or a damaged index), which must not read past it.
LTJAX_HD uint32_t PackedWordSlow(const uint8_t* packed, int32_t nnz, int32_t i) {
  uint32_t w = 0;
  for (int j = 0; j < 4; ++j) {
    const int64_t b = 4 * static_cast<int64_t>(i) + j;
    if (b >= 0 && b < nnz) w |= static_cast<uint32_t>(packed[b]) << (8 * j);
  }
  return w;
}

// Words i, i + 1, i + 2 of the packed codes: three aligned loads (Fast: the caller checked they
// lie inside the array), else byte by byte.
template <bool Fast>
LTJAX_HD void PackedWords3(const uint8_t* packed, int32_t nnz, int32_t i, uint32_t* w) {
  if (Fast) {
#ifdef __CUDA_ARCH__
    const uint32_t* p = reinterpret_cast<const uint32_t*>(packed) + i;
    w[0] = __ldg(p), w[1] = __ldg(p + 1), w[2] = __ldg(p + 2);
#else
    std::memcpy(w, packed + 4 * static_cast<int64_t>(i), 12);
#endif
  } else {
    for (int j = 0; j < 3; ++j) w[j] = PackedWordSlow(packed, nnz, i + j);
  }
}

// ------------------------------------------------------------------ step 3: one lane's word
// acc[m] += sum over the 4 codes in v (bytes, absent = 0) of code * x[m][c + i].
template <int M>
LTJAX_HD void Fma4(uint32_t v, const float* x, int64_t kp, int32_t c, float* acc) {
  // (code ^ 0x80) in a float's low mantissa byte under exponent 2^23: 2^23 + 128 + code, exact;
  // absent codes are 0 and contribute 0.
  const uint32_t u = v ^ 0x80808080u;
  float w[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) w[i] = AsFloat(BytePerm(u, 0x4Bu, 0x4550u + i)) - 8388736.0f;
#pragma unroll
  for (int m = 0; m < M; ++m) {
    float xm[4];
    Load4(x + m * kp + c, xm);
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[m] += w[i] * xm[i];
  }
}

// The 32 codes of mask word `word` (columns c0 .. c0 + 31), whose first nonzero is packed[p].
// Every byte of the word is decoded, absent or not (no branch, so the compiler issues all the
// word's loads before the first use); absent codes come out 0 and add 0.
template <int M, bool Fast>
LTJAX_HD void DecodeWordAs(uint32_t word, int32_t p, const uint8_t* packed, int32_t nnz, const uint32_t* select,
                           const float* x, int64_t kp, int32_t c0, float* acc) {
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const uint32_t mb = (word >> (8 * k)) & 0xFF;
    // Packed index of this byte's first nonzero (int32: the format's offsets are int32).
    const int32_t q = p + static_cast<int32_t>(Popc(word & ((1u << (8 * k)) - 1u)));
    const uint32_t sh = static_cast<uint32_t>(q & 3) * 8;
    uint32_t w[3];
    PackedWords3<Fast>(packed, nnz, q >> 2, w);  // q >> 2: floor, also for a (damaged) negative q
    const uint32_t lo = FunnelShiftRC(w[0], w[1], sh), hi = FunnelShiftRC(w[1], w[2], sh);  // packed[q .. q + 7]
    const uint32_t n0 = mb & 0xF, n1 = mb >> 4;
    const uint32_t v0 = BytePerm(lo, 0, select[n0]);
    const uint32_t v1 = BytePerm(FunnelShiftRC(lo, hi, 8 * Popc(n0)), 0, select[n1]);
    Fma4<M>(v0, x, kp, c0 + 8 * k, acc);
    Fma4<M>(v1, x, kp, c0 + 8 * k + 4, acc);
  }
}

// The same, with one bounds check for the whole word: the fast path where every packed word it
// may read (at most words (p + 24) / 4 + 2, for 32 values from p) lies inside the array.
template <int M>
LTJAX_HD void DecodeWord(uint32_t word, int32_t p, const uint8_t* packed, int32_t nnz, const uint32_t* select,
                         const float* x, int64_t kp, int32_t c0, float* acc) {
  if (p >= 0 && ((p + 24) >> 2) + 3 <= (nnz >> 2))
    DecodeWordAs<M, true>(word, p, packed, nnz, select, x, kp, c0, acc);
  else
    DecodeWordAs<M, false>(word, p, packed, nnz, select, x, kp, c0, acc);
}

// int8: the 16 codes of row `row` at columns c .. c + 15 (c % 16 == 0), against x [M, kp].
template <int M>
LTJAX_HD void Int8Chunk(const uint8_t* row, const float* x, int64_t kp, int32_t c, float* acc) {
  uint32_t v[4];
  Load16(row + c, v);
#pragma unroll
  for (int i = 0; i < 4; ++i) Fma4<M>(v[i], x, kp, c + 4 * i, acc);
}

// ------------------------------------------------------------------ the geometry
// Words of row r: W. Tile columns: `seg` = 2^seg_log2 words each (at most 32), or seg = 0: one
// tile column spanning the row (the warp's packed values then continue from step to step).
struct Geometry {
  int64_t n, w, gc, kp;
  int32_t nnz;
  int seg, seg_log2;  // seg: lanes per tile column inside a step; 0: one tile column, carried across steps
  int m;
};

// Step 1: word w of a row's mask words `mrow` (0 past the row's end, w >= nw).
LTJAX_HD uint32_t WordAt(const uint32_t* mrow, int32_t w, int32_t nw) { return w < nw ? mrow[w] : 0u; }

// The packed index of the row's first value in the tile column of word w (`srow`: the row's
// starts, one per tile column; 0 past the row's end). `tile_shift`: log2 of the words per tile
// column, or 31 for one tile column (every w < nw maps to column 0).
LTJAX_HD int32_t RowStartAt(const int32_t* srow, int32_t w, int32_t nw, int tile_shift) {
  return w < nw ? srow[w >> tile_shift] : 0;
}

LTJAX_HD int TileShift(const Geometry& g) { return g.seg == 0 ? 31 : g.seg_log2; }

}  // namespace gemv
}  // namespace ltjax
