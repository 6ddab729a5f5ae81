// The per-lane steps of the CUDA GEMVs (gemv_cuda.cu), written once for the device and for the
// host: gemv_emulate.cc runs the same functions lane by lane on the CPU, so the decode the GPU
// runs is the decode the CPU tests check (docs/cuda.md).
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

LTJAX_HD uint32_t FloatBits(float f) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
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
// The selector for a mask nibble n: output byte i takes the rank of bit i among n's set bits
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
// The 4 int8 codes of v (bytes) as f32, exactly and without I2F: (code ^ 0x80) in a float's low
// mantissa byte under exponent 2^23 is 2^23 + 128 + code; one subtract leaves the code. Absent
// codes (0) come out 0.
LTJAX_HD void CodesToF32(uint32_t v, float* w) {
  const uint32_t u = v ^ 0x80808080u;
#pragma unroll
  for (int i = 0; i < 4; ++i) w[i] = AsFloat(BytePerm(u, 0x4Bu, 0x4550u + i)) - 8388736.0f;
}

// acc[m] += sum over the 4 codes in v of code * x[m][c + i].
template <int M>
LTJAX_HD void Fma4(uint32_t v, const float* x, int64_t kp, int32_t c, float* acc) {
  float w[4];
  CodesToF32(v, w);
#pragma unroll
  for (int m = 0; m < M; ++m) {
    float xm[4];
    Load4(x + m * kp + c, xm);
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[m] += w[i] * xm[i];
  }
}

// The GEMV's sink: acc[m] += code * x[m][c0 + o + i] for the 4 codes of v at word offset o.
template <int M>
struct FmaSink {
  static constexpr int kUnroll = M >= 3 ? 2 : 4;  // mask bytes decoded together (M >= 3: x loads spill at 4)
  const float* x;
  int64_t kp;
  int32_t c0;
  float* acc;
  LTJAX_HD void operator()(uint32_t v, int o) const { Fma4<M>(v, x, kp, c0 + o, acc); }
};

// Two floats that are exact in bf16 (a code: at most 8 significant bits) as one bf16 pair, lo in
// the low half: their high halves, one byte permute.
LTJAX_HD uint32_t PackBf16x2(float lo, float hi) { return BytePerm(FloatBits(lo), FloatBits(hi), 0x7632u); }

// The bitmask MMA kernel's sink: the codes as bf16, two per word, out[o / 2 + j] holding the
// codes at word offsets o + 2 j, o + 2 j + 1 (low half first).
struct Bf16Sink {
  static constexpr int kUnroll = 4;
  uint32_t* out;
  LTJAX_HD void operator()(uint32_t v, int o) const {
    float f[4];
    CodesToF32(v, f);
    out[o / 2] = PackBf16x2(f[0], f[1]);
    out[o / 2 + 1] = PackBf16x2(f[2], f[3]);
  }
};

// The 32 codes of mask word `word`, whose first nonzero is packed[p], handed to `sink` four at a
// time (word offsets 0, 4, ..., 28). Every byte of the word is decoded, absent or not (no branch,
// so the compiler issues all the word's loads before the first use); absent codes come out 0.
template <bool Fast, typename Sink>
LTJAX_HD void DecodeWordAs(uint32_t word, int32_t p, const uint8_t* packed, int32_t nnz, const uint32_t* select,
                           const Sink& sink) {
#pragma unroll Sink::kUnroll
  for (int k = 0; k < 4; ++k) {
    const uint32_t mb = (word >> (8 * k)) & 0xFF;
    // Packed index of this byte's first nonzero (int32: the format's offsets are int32).
    const int32_t q = p + static_cast<int32_t>(Popc(word & ((1u << (8 * k)) - 1u)));
    const uint32_t sh = static_cast<uint32_t>(q & 3) * 8;
    uint32_t w[3];
    PackedWords3<Fast>(packed, nnz, q >> 2, w);  // q >> 2: floor, also for a (damaged) negative q
    const uint32_t lo = FunnelShiftRC(w[0], w[1], sh), hi = FunnelShiftRC(w[1], w[2], sh);  // packed[q .. q + 7]
    const uint32_t n0 = mb & 0xF, n1 = mb >> 4;
    sink(BytePerm(lo, 0, select[n0]), 8 * k);
    sink(BytePerm(FunnelShiftRC(lo, hi, 8 * Popc(n0)), 0, select[n1]), 8 * k + 4);
  }
}

// The same, with one bounds check for the whole word: the fast path where every packed word it
// may read (at most words (p + 24) / 4 + 2, for 32 values from p) lies inside the array.
template <typename Sink>
LTJAX_HD void DecodeWord(uint32_t word, int32_t p, const uint8_t* packed, int32_t nnz, const uint32_t* select,
                         const Sink& sink) {
  if (p >= 0 && ((p + 24) >> 2) + 3 <= (nnz >> 2))
    DecodeWordAs<true>(word, p, packed, nnz, select, sink);
  else
    DecodeWordAs<false>(word, p, packed, nnz, select, sink);
}

// int8: the 16 codes of row `row` at columns c .. c + 15 (c % 16 == 0), against x [M, kp].
template <int M>
LTJAX_HD void Int8Chunk(const uint8_t* row, const float* x, int64_t kp, int32_t c, float* acc) {
  uint32_t v[4];
  Load16(row + c, v);
#pragma unroll
  for (int i = 0; i < 4; ++i) Fma4<M>(v[i], x, kp, c + 4 * i, acc);
}

// ------------------------------------------------------------------ the MMA kernel's layouts
// bitmask_int8 at 2 <= M <= 16 (gemv_cuda.cu, BitmaskInt8Mma): a warp owns 16 weight rows; in a
// step lane l decodes word w0 + (l & 1) of row l >> 1 (64 columns of 16 rows a step) into bf16 in
// shared memory, and `mma.m16n8k16` (bf16 in, f32 accumulate) takes the rows as A (16 x 16 per
// instruction, loaded with `ldmatrix.x4`) and x as B (k16 x n8: 8 rows of x). The fragment
// layouts are the PTX ISA's for m16n8k16 .bf16 (groupID = lane >> 2, threadID_in_group = lane & 3).
constexpr int kTileStride = 72;  // bf16 per shared row: 64 + 8, so ldmatrix's 8 rows hit 8 distinct bank groups

// The shared-memory row and column whose 16 bytes lane `lane` addresses in `ldmatrix.x4`:
// matrices 0-3 are rows 0-7 / 8-15 of columns 0-7, then of columns 8-15: a0..a3 of the A fragment.
LTJAX_HD int LdmRow(int lane) { return ((lane >> 3) & 1) * 8 + (lane & 7); }
LTJAX_HD int LdmCol(int lane) { return (lane >> 4) * 8; }

// Two bf16 at p (4-byte aligned) as one word.
LTJAX_HD uint32_t Load2Bf16(const uint16_t* p) {
#ifdef __CUDA_ARCH__
  return __ldg(reinterpret_cast<const uint32_t*>(p));
#else
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
#endif
}

// Where lane `lane`'s B fragments of n8 tile t start in x [rows, kp] (bf16, row-major): row
// 8 t + g, column 2 q (g = lane >> 2, q = lane & 3).
LTJAX_HD const uint16_t* BFragBase(const uint16_t* x, int64_t kp, int lane, int t) {
  return x + (8 * t + (lane >> 2)) * kp + 2 * (lane & 3);
}

// The B fragment at column k0: b0 holds x[8 t + g][k0 + 2 q, + 1], b1 the same 8 columns on.
LTJAX_HD void BFrag(const uint16_t* base, int32_t k0, uint32_t* b) {
  b[0] = Load2Bf16(base + k0);
  b[1] = Load2Bf16(base + k0 + 8);
}

// The tile row (weight row) and column (row of x) of accumulator c_i of lane `lane`.
LTJAX_HD int CRow(int lane, int i) { return (lane >> 2) + 8 * (i >> 1); }
LTJAX_HD int CCol(int lane, int i) { return 2 * (lane & 3) + (i & 1); }

// The packed index of this lane's word in an MMA step (lanes l, l ^ 1 hold words w0, w0 + 1 of
// one row): the row's start in the word's tile column, plus (tile columns wider than a word) the
// row's values in earlier steps of that column and, for the second word, the first word's.
LTJAX_HD int32_t MmaWordStart(int32_t start, int32_t carry, uint32_t first_cnt, int half, int tile_shift) {
  return tile_shift == 0 ? start : start + carry + (half ? static_cast<int32_t>(first_cnt) : 0);
}

// The carry for the next step: reset where the next step starts a new tile column.
LTJAX_HD int32_t MmaNextCarry(int32_t carry, uint32_t cnt_pair, int32_t w0, int tile_shift) {
  return ((w0 + 2) >> tile_shift) != (w0 >> tile_shift) ? 0 : carry + static_cast<int32_t>(cnt_pair);
}

// ------------------------------------------------------------------ the int8 MMA's layouts
// int8 at 3 <= M <= 16 (gemv_cuda.cu, Int8Mma): a warp owns 16 weight rows and takes 64 columns a
// step. Lane l (g = l >> 2, q = l & 3) loads 16 codes of row g and of row g + 8 at columns
// c0 + 16 q .. c0 + 16 q + 15 (two 16-byte loads; the 4 lanes of a row read 64 contiguous bytes),
// and makes the A fragments of the step's four mma.m16n8k16 in registers, no shared memory: the
// sum over k does not depend on which 16 columns an instruction takes, only on A and B agreeing.
// So instruction j takes, in lane l's k slots 2 q, 2 q + 1, 2 q + 8, 2 q + 9, the columns
// c0 + 16 q + 4 j + 0, 1, 2, 3: code word j of each row for A, and for B the same four columns of
// x (row 8 t + g of n8 tile t), words 2 j and 2 j + 1 of the lane's 16 bf16 of x.

// The 16 codes of a weight row at columns c .. c + 15 as four words: zeros past the row's end
// (c >= k, K % 16 == 0) or for a row past the weight's (ok false).
LTJAX_HD void CodesAt(const uint8_t* row, bool ok, int64_t c, int64_t k, uint32_t* v) {
  if (ok && c < k) {
    Load16(row + c, v);
  } else {
    v[0] = v[1] = v[2] = v[3] = 0u;
  }
}

// Instruction j's A fragment from code word j of rows g (wa) and g + 8 (wb): a0 = row g, k slots
// 2 q, 2 q + 1; a1 = row g + 8, the same; a2, a3: slots 2 q + 8, 2 q + 9 (the PTX ISA's layout).
LTJAX_HD void Int8AFrag(uint32_t wa, uint32_t wb, uint32_t* a) {
  float fa[4], fb[4];
  CodesToF32(wa, fa);
  CodesToF32(wb, fb);
  a[0] = PackBf16x2(fa[0], fa[1]);
  a[1] = PackBf16x2(fb[0], fb[1]);
  a[2] = PackBf16x2(fa[2], fa[3]);
  a[3] = PackBf16x2(fb[2], fb[3]);
}

// Lane l's 16 bf16 of x row 8 t + g at columns c0 + 16 q .. (x [rows, kp], kp % 64 == 0) as eight
// words: two 16-byte loads. Instruction j's B fragment is words 2 j, 2 j + 1.
LTJAX_HD void Int8BWords(const uint16_t* x, int64_t kp, int lane, int t, int64_t c0, uint32_t* xw) {
  const uint8_t* p = reinterpret_cast<const uint8_t*>(x + (8 * t + (lane >> 2)) * kp + c0 + 16 * (lane & 3));
  Load16(p, xw);
  Load16(p + 16, xw + 4);
}

// ------------------------------------------------------------------ the geometry
// Words of row r: W. Tile columns: `seg` = 2^seg_log2 words each (at most 32), or seg = 0: one
// tile column spanning the row (the warp's packed values then continue from step to step).
struct Geometry {
  int64_t n, w, gc, kp;  // kp: x's row stride
  int64_t k;             // int8: the codes' row length (the MMA's kp: K rounded up to 64)
  int32_t nnz;
  int seg, seg_log2;  // seg: lanes per tile column inside a step; 0: one tile column, carried across steps
  int m;              // rows of x (MMA: a multiple of 8)
  int32_t chunk;      // MMA: mask words (int8: columns) per K split
  int splits;         // MMA: K splits (partial outputs)
};

// The bitmask_int8 weight's arrays and the output, as the kernels read them.
struct BitmaskArrays {
  const uint32_t* mask;       // [N, W]
  const int32_t* row_starts;  // [N * tile columns]
  const uint8_t* codes;       // [nnz], tile by tile, row-major inside a tile
  const float* scales;        // [N]
  float* y;
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
