// Argument checks, pointers and bindings of the "ltjax_int8_gemv", "ltjax_int8_mma",
// "ltjax_bitmask_int8_gemv" and "ltjax_bitmask_int8_mma" targets, shared by their CUDA handlers (gemv_cuda.cu) and CPU emulations
// (gemv_emulate.cc): a call is refused the same way on both.
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>
#include <type_traits>
#include <utility>

#include "gemv_warp.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace ltjax {
namespace gemv {

inline std::string DimsOf(const ffi::AnyBuffer& b) {
  std::string s = "[";
  for (size_t i = 0; i < b.dimensions().size(); ++i) s += (i ? ", " : "") + std::to_string(b.dimensions()[i]);
  return s + "]";
}

inline ffi::Error Invalid(const std::string& what) { return ffi::Error::InvalidArgument("ltjax: " + what); }

// The bitmask_int8 weight (mask [N, W] u32, row_starts [N * tile columns] s32, codes [nnz] s8,
// scales [N] f32; seg_words: words per tile column, a power of two <= 32, or 0 for one tile
// column): checks and fills n, w, nnz, seg, seg_log2, gc.
inline ffi::Error CheckBitmaskWeight(const ffi::AnyBuffer& mask, const ffi::AnyBuffer& row_starts,
                                     const ffi::AnyBuffer& codes, const ffi::AnyBuffer& scales, int64_t seg_words,
                                     Geometry* g) {
  using ffi::DataType;
  if (mask.element_type() != DataType::U32 || mask.dimensions().size() != 2)
    return Invalid("mask must be uint32 [N, W], got " + DimsOf(mask));
  if (codes.element_type() != DataType::S8 || codes.dimensions().size() != 1)
    return Invalid("codes must be int8 [nnz], got " + DimsOf(codes));
  if (codes.dimensions()[0] >= (int64_t{1} << 31)) return Invalid("codes must hold < 2**31 values, got " + DimsOf(codes));
  if (!(seg_words == 0 || (seg_words > 0 && seg_words <= 32 && (seg_words & (seg_words - 1)) == 0)))
    return Invalid("seg_words must be 0 or a power of two <= 32, got " + std::to_string(seg_words));
  g->n = mask.dimensions()[0];
  g->w = mask.dimensions()[1];
  g->nnz = static_cast<int32_t>(codes.dimensions()[0]);
  g->seg = static_cast<int>(seg_words);
  g->seg_log2 = 0;
  while (g->seg > 0 && (1 << g->seg_log2) < g->seg) ++g->seg_log2;
  g->gc = seg_words == 0 ? 1 : (g->w + seg_words - 1) / seg_words;
  if (row_starts.element_type() != DataType::S32 || row_starts.element_count() != static_cast<size_t>(g->n * g->gc))
    return Invalid("row_starts must be int32 [N * tile columns] = [" + std::to_string(g->n * g->gc) + "], got " +
                   DimsOf(row_starts));
  if (scales.element_type() != DataType::F32 || scales.element_count() != static_cast<size_t>(g->n))
    return Invalid("scales must be float32 [N], got " + DimsOf(scales));
  return ffi::Error::Success();
}

inline ffi::Error CheckOutput(const ffi::AnyBuffer& y, int64_t count, const std::string& shape) {
  if (y.element_type() != ffi::DataType::F32 || y.element_count() != static_cast<size_t>(count))
    return Invalid("y must be float32 " + shape + ", got " + DimsOf(y));
  return ffi::Error::Success();
}

inline BitmaskArrays ArraysOf(const ffi::AnyBuffer& mask, const ffi::AnyBuffer& row_starts, const ffi::AnyBuffer& codes,
                              const ffi::AnyBuffer& scales, ffi::AnyBuffer& y) {
  return {static_cast<const uint32_t*>(mask.untyped_data()), static_cast<const int32_t*>(row_starts.untyped_data()),
          static_cast<const uint8_t*>(codes.untyped_data()), static_cast<const float*>(scales.untyped_data()),
          static_cast<float*>(y.untyped_data())};
}

// The bitmask GEMV's operands: x f32 [M, 32 W] (M <= 4, zero past K), the weight, y f32 [M, N].
inline ffi::Error MakeGeometry(const ffi::AnyBuffer& x, const ffi::AnyBuffer& mask, const ffi::AnyBuffer& row_starts,
                               const ffi::AnyBuffer& codes, const ffi::AnyBuffer& scales, const ffi::AnyBuffer& y,
                               int64_t seg_words, Geometry* g) {
  *g = Geometry{};
  if (x.element_type() != ffi::DataType::F32 || x.dimensions().size() != 2)
    return Invalid("x must be float32 [M, 32 W], got " + DimsOf(x));
  if (ffi::Error err = CheckBitmaskWeight(mask, row_starts, codes, scales, seg_words, g); err.failure()) return err;
  g->m = static_cast<int>(x.dimensions()[0]);
  g->kp = x.dimensions()[1];
  if (g->kp >= (int64_t{1} << 31)) return Invalid("the GEMV needs K < 2**31, got x " + DimsOf(x));
  if (g->kp != 32 * g->w)
    return Invalid("x must have 32 columns per mask word, got " + DimsOf(x) + " for mask " + DimsOf(mask));
  if (g->m < 1 || g->m > kMaxM) return Invalid("the GEMV takes 1 to 4 rows of x, got " + DimsOf(x));
  return CheckOutput(y, g->m * g->n, "[M, N]");
}

// The MMA kernels' rows of x (8, 16, ..., 48: whole n8 tiles) and their output y f32 [S, Mp, N], S
// = ceil(total / chunk) K splits (chunk checked by the caller).
inline ffi::Error CheckMmaSplits(const ffi::AnyBuffer& x, const ffi::AnyBuffer& y, int64_t chunk, int64_t total,
                                 Geometry* g) {
  if (g->m < 8 || g->m > 48 || g->m % 8)
    return Invalid("the MMA kernel takes 8, 16, ..., 48 rows of x, got " + DimsOf(x));
  g->chunk = static_cast<int32_t>(chunk);
  g->splits = static_cast<int>(std::max<int64_t>(1, (total + chunk - 1) / chunk));
  return CheckOutput(y, static_cast<int64_t>(g->splits) * g->m * g->n,
                     "[splits, Mp, N] = [" + std::to_string(g->splits) + ", " + std::to_string(g->m) + ", " +
                         std::to_string(g->n) + "]");
}

// The bitmask_int8 MMA kernel's operands: x bf16 [Mp, Kp] (Mp = 8, 16, ..., 48; Kp = 64 ceil(W / 2)),
// the weight, y f32 [S, Mp, N] (S = ceil(W / chunk_words) K splits; chunk_words: even, a multiple
// of seg_words, or at least W for one tile column).
inline ffi::Error MakeMmaGeometry(const ffi::AnyBuffer& x, const ffi::AnyBuffer& mask, const ffi::AnyBuffer& row_starts,
                                  const ffi::AnyBuffer& codes, const ffi::AnyBuffer& scales, const ffi::AnyBuffer& y,
                                  int64_t seg_words, int64_t chunk_words, Geometry* g) {
  *g = Geometry{};
  if (x.element_type() != ffi::DataType::BF16 || x.dimensions().size() != 2)
    return Invalid("x must be bfloat16 [Mp, 64 ceil(W / 2)], got " + DimsOf(x));
  if (ffi::Error err = CheckBitmaskWeight(mask, row_starts, codes, scales, seg_words, g); err.failure()) return err;
  g->m = static_cast<int>(x.dimensions()[0]);
  g->kp = x.dimensions()[1];
  if (g->kp >= (int64_t{1} << 31)) return Invalid("the MMA kernel needs K < 2**31, got x " + DimsOf(x));
  if (g->kp != 64 * ((g->w + 1) / 2))
    return Invalid("x must have 64 columns per two mask words, got " + DimsOf(x) + " for mask " + DimsOf(mask));
  const bool chunk_ok = chunk_words > 0 && chunk_words % 2 == 0 &&
                        (seg_words == 0 ? chunk_words >= g->w : chunk_words % seg_words == 0) && chunk_words < (1 << 30);
  if (!chunk_ok)
    return Invalid("chunk_words must be even, a multiple of seg_words (0: at least W), got " + std::to_string(chunk_words));
  return CheckMmaSplits(x, y, chunk_words, g->w, g);
}

// The int8 weight: codes s8 [N, K] (K % 16 == 0: 16-byte rows, K < 2**31), scales f32 [N]; fills n, k.
inline ffi::Error CheckInt8Weight(const ffi::AnyBuffer& codes, const ffi::AnyBuffer& scales, const std::string& kernel,
                                  Geometry* g) {
  using ffi::DataType;
  if (codes.element_type() != DataType::S8 || codes.dimensions().size() != 2)
    return Invalid("codes must be int8 [N, K], got " + DimsOf(codes));
  g->n = codes.dimensions()[0];
  g->k = codes.dimensions()[1];
  if (g->k % 16 != 0) return Invalid("the int8 " + kernel + " needs K % 16 == 0 (16-byte rows), got codes " + DimsOf(codes));
  if (g->k >= (int64_t{1} << 31)) return Invalid("the int8 " + kernel + " needs K < 2**31, got codes " + DimsOf(codes));
  if (scales.element_type() != DataType::F32 || scales.element_count() != static_cast<size_t>(g->n))
    return Invalid("scales must be float32 [N], got " + DimsOf(scales));
  return ffi::Error::Success();
}

// The int8 GEMV's operands: x f32 [M, K], codes s8 [N, K] (K % 16 == 0), scales f32 [N], y f32 [M, N].
inline ffi::Error MakeInt8Geometry(const ffi::AnyBuffer& x, const ffi::AnyBuffer& codes, const ffi::AnyBuffer& scales,
                                   const ffi::AnyBuffer& y, Geometry* g) {
  *g = Geometry{};
  if (x.element_type() != ffi::DataType::F32 || x.dimensions().size() != 2)
    return Invalid("x must be float32 [M, K], got " + DimsOf(x));
  if (ffi::Error err = CheckInt8Weight(codes, scales, "GEMV", g); err.failure()) return err;
  g->kp = g->k;
  g->m = static_cast<int>(x.dimensions()[0]);
  if (x.dimensions()[1] != g->kp) return Invalid("x " + DimsOf(x) + " does not match codes " + DimsOf(codes));
  if (g->m < 1 || g->m > kMaxM) return Invalid("the GEMV takes 1 to 4 rows of x, got " + DimsOf(x));
  return CheckOutput(y, g->m * g->n, "[M, N]");
}

// The int8 MMA kernel's operands: x bf16 [Mp, Kp] (Mp = 8, 16, ..., 48; Kp = 64 ceil(K / 64), zero
// past K), codes s8 [N, K] (K % 16 == 0), scales f32 [N], y f32 [S, Mp, N] (S = ceil(Kp / chunk_cols)
// K splits; chunk_cols a multiple of 64).
inline ffi::Error MakeInt8MmaGeometry(const ffi::AnyBuffer& x, const ffi::AnyBuffer& codes, const ffi::AnyBuffer& scales,
                                      const ffi::AnyBuffer& y, int64_t chunk_cols, Geometry* g) {
  *g = Geometry{};
  if (x.element_type() != ffi::DataType::BF16 || x.dimensions().size() != 2)
    return Invalid("x must be bfloat16 [Mp, 64 ceil(K / 64)], got " + DimsOf(x));
  if (ffi::Error err = CheckInt8Weight(codes, scales, "MMA kernel", g); err.failure()) return err;
  g->m = static_cast<int>(x.dimensions()[0]);
  g->kp = x.dimensions()[1];
  if (g->kp != 64 * ((g->k + 63) / 64))
    return Invalid("x must have 64 ceil(K / 64) columns, got " + DimsOf(x) + " for codes " + DimsOf(codes));
  if (chunk_cols <= 0 || chunk_cols % 64 != 0 || chunk_cols >= (int64_t{1} << 30))
    return Invalid("chunk_cols must be a positive multiple of 64, got " + std::to_string(chunk_cols));
  return CheckMmaSplits(x, y, chunk_cols, g->kp, g);
}

// The handlers' bindings: the bitmask targets take x and the weight's four arrays, the int8 GEMV
// x, codes and scales; each returns y.
template <typename B>
auto BindBitmask(B binding) {
  return std::move(binding)
      .template Arg<ffi::AnyBuffer>()
      .template Arg<ffi::AnyBuffer>()
      .template Arg<ffi::AnyBuffer>()
      .template Arg<ffi::AnyBuffer>()
      .template Arg<ffi::AnyBuffer>()
      .template Ret<ffi::AnyBuffer>()
      .template Attr<int64_t>("seg_words");
}

template <typename B>
auto BindInt8(B binding) {
  return std::move(binding)
      .template Arg<ffi::AnyBuffer>()
      .template Arg<ffi::AnyBuffer>()
      .template Arg<ffi::AnyBuffer>()
      .template Ret<ffi::AnyBuffer>();
}

// f(std::integral_constant<int, v>) for v in [Lo, Hi] (Hi for anything above): a runtime row
// count to a template's.
template <int Lo, int Hi, typename F>
void WithConstant(int v, F&& f) {
  if constexpr (Lo < Hi) {
    if (v <= Lo) return f(std::integral_constant<int, Lo>{});
    return WithConstant<Lo + 1, Hi>(v, f);
  } else {
    return f(std::integral_constant<int, Hi>{});
  }
}

}  // namespace gemv
}  // namespace ltjax
