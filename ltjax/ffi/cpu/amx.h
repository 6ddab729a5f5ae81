// int8 GEMM on AMX tiles (Intel Sapphire Rapids and later): y = x @ (codes * scales)^T for
// M >= 2 (bitmask_int8: 8 <= M <= 64), where the f32 micro-kernel is bound by its FMAs
// (docs/ffi.md "AMX int8 GEMM").
//
// x is written once per call as 24-bit fixed point per row, in three balanced base-256 digits
// (the scheme of bitmask_rows.h, XDigits: x[m] ~= qs[m] * (e0 + 256 e1 + 65536 e2)), and
// `tdpbssd` multiplies 16 rows x 64 codes (A, loaded straight from the codes) by 64 x 16 digit
// bytes (B, one tile per digit) into exact int32 sums (C, one tile per digit): signed x signed,
// so no sign flip and no correction. The only error is the rounding of x: per output at most
// scale * sum_k |b_k| * qs[m] / 2 (tested against float64 in tests/test_ffi.py).
//
// Tiles: C0..C2 = 0..2 (16 rows of W x 16 rows of x, int32), A = 3 (16 x 64 codes), B0..B2 =
// 4..6 (16 x 64 digit bytes: row kk holds, for each of 16 x rows, its 4 digits at k = 4 kk..4 kk+3).
#pragma once

#include <sys/syscall.h>
#include <unistd.h>

#include "bitmask_rows.h"

#ifndef LTJAX_HAS_AMX
#if (defined(__clang__) && __clang_major__ >= 12) || (!defined(__clang__) && __GNUC__ >= 11)
#define LTJAX_HAS_AMX 1
#else
#define LTJAX_HAS_AMX 0
#endif
#endif

namespace ltjax {

// AMX needs the CPU feature, the AVX-512 level (the digit code below), and the kernel's
// permission for the tile state (arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA), granted to
// the whole process). LTJAX_FFI_AMX=0 (Config::amx) turns it off.
inline bool HasAmx() {
  static const bool amx = [] {
    Configured().used = true;
#if LTJAX_HAS_AMX && defined(SYS_arch_prctl)
    if (!Configured().amx) return false;
    if (CurrentIsa() != Isa::kAvx512 || !__builtin_cpu_supports("amx-tile") || !__builtin_cpu_supports("amx-int8"))
      return false;
    constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
#else
    return false;
#endif
  }();
  return amx;
}

constexpr int64_t kAmxMaxM = 64;  // rows of x per pass over the codes (larger M: several passes)
constexpr int64_t kAmxMinBitmaskM = 8;  // bitmask_int8 from this many rows of x (the expansion's cost)
// int32 tile sums stay exact while K * 127 * 128 < 2^31.
inline bool AmxFits(int64_t m, int64_t k) { return m >= 2 && k * 127 * 128 < (int64_t{1} << 31); }

#if LTJAX_HAS_AMX
#define LTJAX_AMX __attribute__((target("amx-tile,amx-int8,avx512f,avx512bw,avx512vl,avx512dq,fma,f16c,bmi,bmi2,popcnt")))

struct alignas(64) TileConfig {
  uint8_t palette_id = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// x's digits in B-tile order. For x row m (block mb = m / 16, column c = m % 16), digit d and
// column k: B[d][mb][k / 64][(k % 64) / 4][c][k % 4]. Rows past M and columns past K are zero.
struct AmxDigits {
  int8_t* b;      // 3 * mblocks * kc * 1024 bytes
  int64_t kc;     // K chunks of 64
  int64_t mblocks;
  double qs[kAmxMaxM];
  int8_t* Tile(int d, int64_t mb, int64_t c) const { return b + ((d * mblocks + mb) * kc + c) * 1024; }
};

// x [M, kp] (zero-padded rows, kp % 32 == 0) as B tiles: each row's digits by MakeXDigits (the
// M = 1 GEMV's), then every 4 digits of a row, one int32, to its place in the tile. `tmp` holds
// one row's digits (3 * (kp + 64) bytes). False if some x is NaN or inf (then the f32 path).
LTJAX_AVX512 inline bool MakeAmxDigits(const float* xs, int64_t m, int64_t k, int64_t kp, int8_t* buf, int8_t* tmp,
                                       AmxDigits* out) {
  out->b = buf;
  out->kc = (k + 63) / 64;
  out->mblocks = (m + 15) / 16;
  std::memset(buf, 0, 3 * out->mblocks * out->kc * 1024);
  for (int64_t r = 0; r < m; ++r) {
    XDigits xd;
    if (!MakeXDigits(xs + r * kp, kp, tmp, &xd)) return false;
    out->qs[r] = xd.qs;
    const int64_t mb = r / 16, col = r % 16;
    for (int d = 0; d < 3; ++d) {
      const int8_t* src = xd.d + d * xd.stride;
      for (int64_t kk = 0; kk < std::min(kp, 64 * out->kc) / 4; ++kk)
        std::memcpy(out->Tile(d, mb, kk / 16) + (kk % 16) * 64 + col * 4, src + 4 * kk, 4);
    }
  }
  return true;
}

// MakeAmxDigits into the calling thread's scratch (slots 1 and 3), for one pass of m <= 64 rows.
inline bool AmxDigitsOf(const float* xs, int64_t m, int64_t k, int64_t kp, AmxDigits* out) {
  const int64_t kc = (k + 63) / 64;
  auto* buf = reinterpret_cast<int8_t*>(Scratch(1, (3 * ((m + 15) / 16) * kc * 1024 + 3) / 4));
  auto* tmp = reinterpret_cast<int8_t*>(Scratch(3, (3 * (kp + 64) + 3) / 4));
  return MakeAmxDigits(xs, m, k, kp, buf, tmp, out);
}

// 16 rows of 64 * kc bytes of the calling thread's scratch (slot 0): a zero-padded row block.
inline int8_t* AmxRowBlock(int64_t kc) { return reinterpret_cast<int8_t*>(Scratch(0, 16 * 64 * kc / 4)); }

inline TileConfig AmxConfig() {
  TileConfig cfg;
  for (int t = 0; t < 7; ++t) cfg.colsb[t] = 64, cfg.rows[t] = 16;
  return cfg;
}

// One block of `rows` <= 16 storage rows starting at row n, whose codes are at `a` (row stride
// lda; chunks of 64 columns before `direct` read there, the one after from `tail`, 16 x 64),
// against x's digits: rows [row0, row0 + m) of y [., n_total]. Tiles configured by the caller.
LTJAX_AMX LTJAX_INLINE void AmxBlock(const int8_t* a, int64_t lda, int64_t direct, const int8_t* tail, int64_t rows,
                                     int64_t n, int64_t n_total, int64_t m, const AmxDigits& xd, const float* scales,
                                     Elt elt, void* y, int64_t row0) {
  alignas(64) int32_t c[3][16][16];
  for (int64_t mb = 0; mb < xd.mblocks; ++mb) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    for (int64_t ch = 0; ch < xd.kc; ++ch) {
      if (ch < direct) _tile_loadd(3, a + ch * 64, lda);
      else _tile_loadd(3, tail, 64);
      _tile_loadd(4, xd.Tile(0, mb, ch), 64);
      _tile_loadd(5, xd.Tile(1, mb, ch), 64);
      _tile_loadd(6, xd.Tile(2, mb, ch), 64);
      _tile_dpbssd(0, 3, 4);
      _tile_dpbssd(1, 3, 5);
      _tile_dpbssd(2, 3, 6);
    }
    _tile_stored(0, c[0], 64);
    _tile_stored(1, c[1], 64);
    _tile_stored(2, c[2], 64);
    for (int64_t col = 0; col < 16 && mb * 16 + col < m; ++col) {
      const int64_t r = mb * 16 + col;
      for (int64_t i = 0; i < rows; ++i) {
        const int64_t q = int64_t{c[0][i][col]} + 256 * int64_t{c[1][i][col]} + 65536 * int64_t{c[2][i][col]};
        const double dot = static_cast<double>(q) * xd.qs[r];
        StoreOut(elt, y, (row0 + r) * n_total + n + i, static_cast<float>(dot) * scales[n + i]);
      }
    }
  }
}

// int8 codes [n_total, k]: rows [n0, n1) (n0 a multiple of 16) into rows [row0, row0 + m) of y.
// A last block of fewer than 16 rows goes through a zero-padded copy (AmxRowBlock), so tiles
// never read past the codes; a column tail (K % 64) through a 16 x 64 copy.
LTJAX_AMX inline void AmxGemm(const int8_t* codes, int64_t n_total, int64_t k, int64_t m, const AmxDigits& xd,
                              const float* scales, int64_t n0, int64_t n1, Elt elt, void* y, int64_t row0) {
  const TileConfig cfg = AmxConfig();
  _tile_loadconfig(&cfg);
  alignas(64) int8_t tail[16 * 64];
  const int64_t kfull = k / 64;  // whole chunks of 64 columns
  for (int64_t n = n0; n < n1; n += 16) {
    const int64_t rows = std::min<int64_t>(16, n1 - n);
    if (rows < 16) {
      int8_t* pad = AmxRowBlock(xd.kc);
      std::memset(pad, 0, 16 * 64 * xd.kc);
      for (int64_t r = 0; r < rows; ++r) std::memcpy(pad + r * 64 * xd.kc, codes + (n + r) * k, k);
      AmxBlock(pad, 64 * xd.kc, xd.kc, nullptr, rows, n, n_total, m, xd, scales, elt, y, row0);
      continue;
    }
    if (kfull < xd.kc) {
      std::memset(tail, 0, sizeof(tail));
      for (int64_t r = 0; r < 16; ++r) std::memcpy(tail + r * 64, codes + (n + r) * k + kfull * 64, k - kfull * 64);
    }
    AmxBlock(codes + n * k, k, kfull, tail, 16, n, n_total, m, xd, scales, elt, y, row0);
  }
  _tile_release();
}

// bitmask_int8: each block of 16 rows is first expanded (RowBits, vpexpandb) into a row block of
// the thread's scratch (AmxRowBlock), then runs as int8. False on damaged offsets/mask.
LTJAX_AMX inline bool AmxGemmBitmask(const BitmaskGeometry& g, const int8_t* packed, int64_t m, const AmxDigits& xd,
                                     const float* scales, int64_t n0, int64_t n1, Elt elt, void* y) {
  const TileConfig cfg = AmxConfig();
  _tile_loadconfig(&cfg);
  const int64_t ld = 64 * xd.kc;
  int8_t* buf = AmxRowBlock(xd.kc);
  std::memset(buf, 0, 16 * ld);  // the columns past 32 * words stay zero
  RowCursor cur(g, n0);
  bool ok = true;
  for (int64_t n = n0; n < n1 && ok; n += 16) {
    const int64_t rows = std::min<int64_t>(16, n1 - n);
    for (int64_t r = 0; r < rows && ok; ++r) ok = RowBits(Packed::kI8, cur, packed, g.w, buf + r * ld);
    if (!ok) break;
    if (rows < 16) std::memset(buf + rows * ld, 0, (16 - rows) * ld);
    AmxBlock(buf, ld, xd.kc, nullptr, rows, n, g.c, m, xd, scales, elt, y, 0);
  }
  _tile_release();
  return ok;
}
#endif

}  // namespace ltjax
