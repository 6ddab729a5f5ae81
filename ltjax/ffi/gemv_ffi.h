// Argument checks of the "ltjax_bitmask_int8_gemv" and "ltjax_int8_gemv" targets, shared by their
// CUDA handlers (gemv_cuda.cu) and CPU emulations (gemv_emulate.cc): a call is refused the same way.
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>

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

// Checks dtypes and shapes (see gemv_cuda.cu for the operands) and fills `g`.
inline ffi::Error MakeGeometry(const ffi::AnyBuffer& x, const ffi::AnyBuffer& mask, const ffi::AnyBuffer& row_starts,
                               const ffi::AnyBuffer& codes, const ffi::AnyBuffer& scales, const ffi::AnyBuffer& y,
                               int64_t seg_words, Geometry* g) {
  using ffi::DataType;
  if (x.element_type() != DataType::F32 || x.dimensions().size() != 2)
    return Invalid("x must be float32 [M, 32 W], got " + DimsOf(x));
  if (mask.element_type() != DataType::U32 || mask.dimensions().size() != 2)
    return Invalid("mask must be uint32 [N, W], got " + DimsOf(mask));
  if (codes.element_type() != DataType::S8 || codes.dimensions().size() != 1)
    return Invalid("codes must be int8 [nnz], got " + DimsOf(codes));
  if (codes.dimensions()[0] >= (int64_t{1} << 31)) return Invalid("codes must hold < 2**31 values, got " + DimsOf(codes));
  *g = Geometry{};
  g->n = mask.dimensions()[0];
  g->w = mask.dimensions()[1];
  g->m = static_cast<int>(x.dimensions()[0]);
  g->kp = x.dimensions()[1];
  g->nnz = static_cast<int32_t>(codes.dimensions()[0]);
  if (g->kp >= (int64_t{1} << 31)) return Invalid("the GEMV needs K < 2**31, got x " + DimsOf(x));
  if (g->kp != 32 * g->w)
    return Invalid("x must have 32 columns per mask word, got " + DimsOf(x) + " for mask " + DimsOf(mask));
  if (g->m < 1 || g->m > kMaxM) return Invalid("the GEMV takes 1 to 4 rows of x, got " + DimsOf(x));
  if (!(seg_words == 0 || (seg_words > 0 && seg_words <= 32 && (seg_words & (seg_words - 1)) == 0)))
    return Invalid("seg_words must be 0 or a power of two <= 32, got " + std::to_string(seg_words));
  g->seg = static_cast<int>(seg_words);
  while (g->seg > 0 && (1 << g->seg_log2) < g->seg) ++g->seg_log2;
  g->gc = seg_words == 0 ? 1 : (g->w + seg_words - 1) / seg_words;
  if (row_starts.element_type() != DataType::S32 || row_starts.element_count() != static_cast<size_t>(g->n * g->gc))
    return Invalid("row_starts must be int32 [N * tile columns] = [" + std::to_string(g->n * g->gc) + "], got " +
                   DimsOf(row_starts));
  if (scales.element_type() != DataType::F32 || scales.element_count() != static_cast<size_t>(g->n))
    return Invalid("scales must be float32 [N], got " + DimsOf(scales));
  if (y.element_type() != DataType::F32 || y.element_count() != static_cast<size_t>(g->m * g->n))
    return Invalid("y must be float32 [M, N], got " + DimsOf(y));
  return ffi::Error::Success();
}

// The bitmask_int8 MMA kernel's operands: x bf16 [Mp, Kp] (Mp = 8, 16, ..., 48; Kp = 64 ceil(W / 2)),
// mask, row_starts, codes, scales as the GEMV's, y f32 [S, Mp, N] (S = ceil(W / chunk_words) K splits).
inline ffi::Error MakeMmaGeometry(const ffi::AnyBuffer& x, const ffi::AnyBuffer& mask, const ffi::AnyBuffer& row_starts,
                                  const ffi::AnyBuffer& codes, const ffi::AnyBuffer& scales, const ffi::AnyBuffer& y,
                                  int64_t seg_words, int64_t chunk_words, Geometry* g) {
  using ffi::DataType;
  if (x.element_type() != DataType::BF16 || x.dimensions().size() != 2)
    return Invalid("x must be bfloat16 [Mp, 64 ceil(W / 2)], got " + DimsOf(x));
  if (mask.element_type() != DataType::U32 || mask.dimensions().size() != 2)
    return Invalid("mask must be uint32 [N, W], got " + DimsOf(mask));
  if (codes.element_type() != DataType::S8 || codes.dimensions().size() != 1)
    return Invalid("codes must be int8 [nnz], got " + DimsOf(codes));
  if (codes.dimensions()[0] >= (int64_t{1} << 31)) return Invalid("codes must hold < 2**31 values, got " + DimsOf(codes));
  *g = Geometry{};
  g->n = mask.dimensions()[0];
  g->w = mask.dimensions()[1];
  g->m = static_cast<int>(x.dimensions()[0]);
  g->kp = x.dimensions()[1];
  g->nnz = static_cast<int32_t>(codes.dimensions()[0]);
  if (g->kp >= (int64_t{1} << 31)) return Invalid("the MMA kernel needs K < 2**31, got x " + DimsOf(x));
  if (g->kp != 64 * ((g->w + 1) / 2))
    return Invalid("x must have 64 columns per two mask words, got " + DimsOf(x) + " for mask " + DimsOf(mask));
  if (g->m < 8 || g->m > 48 || g->m % 8)
    return Invalid("the MMA kernel takes 8, 16, ..., 48 rows of x, got " + DimsOf(x));
  if (!(seg_words == 0 || (seg_words > 0 && seg_words <= 32 && (seg_words & (seg_words - 1)) == 0)))
    return Invalid("seg_words must be 0 or a power of two <= 32, got " + std::to_string(seg_words));
  g->seg = static_cast<int>(seg_words);
  while (g->seg > 0 && (1 << g->seg_log2) < g->seg) ++g->seg_log2;
  g->gc = seg_words == 0 ? 1 : (g->w + seg_words - 1) / seg_words;
  const bool chunk_ok = chunk_words > 0 && chunk_words % 2 == 0 &&
                        (seg_words == 0 ? chunk_words >= g->w : chunk_words % seg_words == 0) && chunk_words < (1 << 30);
  if (!chunk_ok)
    return Invalid("chunk_words must be even, a multiple of seg_words (0: at least W), got " + std::to_string(chunk_words));
  g->chunk = static_cast<int32_t>(chunk_words);
  g->splits = static_cast<int>(std::max<int64_t>(1, (g->w + chunk_words - 1) / chunk_words));
  if (row_starts.element_type() != DataType::S32 || row_starts.element_count() != static_cast<size_t>(g->n * g->gc))
    return Invalid("row_starts must be int32 [N * tile columns] = [" + std::to_string(g->n * g->gc) + "], got " +
                   DimsOf(row_starts));
  if (scales.element_type() != DataType::F32 || scales.element_count() != static_cast<size_t>(g->n))
    return Invalid("scales must be float32 [N], got " + DimsOf(scales));
  if (y.element_type() != DataType::F32 || y.element_count() != static_cast<size_t>(g->splits * g->m * g->n))
    return Invalid("y must be float32 [splits, Mp, N] = [" + std::to_string(g->splits) + ", " + std::to_string(g->m) +
                   ", " + std::to_string(g->n) + "], got " + DimsOf(y));
  return ffi::Error::Success();
}

// The int8 GEMV's operands: x f32 [M, K], codes s8 [N, K] (K % 16 == 0), scales f32 [N], y f32 [M, N].
inline ffi::Error MakeInt8Geometry(const ffi::AnyBuffer& x, const ffi::AnyBuffer& codes, const ffi::AnyBuffer& scales,
                                   const ffi::AnyBuffer& y, Geometry* g) {
  using ffi::DataType;
  if (x.element_type() != DataType::F32 || x.dimensions().size() != 2)
    return Invalid("x must be float32 [M, K], got " + DimsOf(x));
  if (codes.element_type() != DataType::S8 || codes.dimensions().size() != 2)
    return Invalid("codes must be int8 [N, K], got " + DimsOf(codes));
  *g = Geometry{};
  g->n = codes.dimensions()[0];
  g->kp = codes.dimensions()[1];
  g->m = static_cast<int>(x.dimensions()[0]);
  if (g->kp % 16 != 0) return Invalid("the int8 GEMV needs K % 16 == 0 (16-byte rows), got codes " + DimsOf(codes));
  if (g->kp >= (int64_t{1} << 31)) return Invalid("the int8 GEMV needs K < 2**31, got codes " + DimsOf(codes));
  if (x.dimensions()[1] != g->kp) return Invalid("x " + DimsOf(x) + " does not match codes " + DimsOf(codes));
  if (g->m < 1 || g->m > kMaxM) return Invalid("the GEMV takes 1 to 4 rows of x, got " + DimsOf(x));
  if (scales.element_type() != DataType::F32 || scales.element_count() != static_cast<size_t>(g->n))
    return Invalid("scales must be float32 [N], got " + DimsOf(scales));
  if (y.element_type() != DataType::F32 || y.element_count() != static_cast<size_t>(g->m * g->n))
    return Invalid("y must be float32 [M, N], got " + DimsOf(y));
  return ffi::Error::Success();
}

}  // namespace gemv
}  // namespace ltjax
