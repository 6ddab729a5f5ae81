// Shared pieces of the ltjax CPU FFI handlers: CPU feature dispatch, a small persistent
// thread pool, bf16/f16 conversion, argument checks and the bitmask row cursor.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ltjax {

namespace ffi = xla::ffi;

#define LTJAX_AVX2 __attribute__((target("avx2,fma,f16c,bmi,bmi2,popcnt")))
#define LTJAX_AVX512 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi2,fma,f16c,bmi,bmi2,popcnt")))
#define LTJAX_AVX512_VNNI \
  __attribute__((target("avx512vnni,avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi2,fma,f16c,bmi,bmi2,popcnt")))
// AVX-VNNI (target "avxvnni", _mm256_dpbusd_avx_epi32) needs GCC >= 11 or clang >= 12; older
// compilers build everything else and leave that one path out (CurrentVnni never picks it).
#ifndef LTJAX_HAS_AVXVNNI
#if (defined(__clang__) && __clang_major__ >= 12) || (!defined(__clang__) && __GNUC__ >= 11)
#define LTJAX_HAS_AVXVNNI 1
#else
#define LTJAX_HAS_AVXVNNI 0
#endif
#endif
#if LTJAX_HAS_AVXVNNI
#define LTJAX_AVX2_VNNI __attribute__((target("avxvnni,avx2,fma,f16c,bmi,bmi2,popcnt")))
#else
#define LTJAX_AVX2_VNNI LTJAX_AVX2
#endif
#define LTJAX_INLINE inline __attribute__((always_inline))

// ---------------------------------------------------------------- configuration
// What Python hands the extension before the first handler runs (`configure` in module.cc, from
// ltjax._config.settings(): the handlers never read the environment). Each choice below is fixed
// the first time it is asked for, which also marks the configuration as used.
struct Config {
  bool avx2_only = false;  // LTJAX_FFI_ISA=avx2: the AVX2 kernels even where AVX-512 is present
  bool vnni = true;        // LTJAX_FFI_VNNI=0: the VNNI paths (and int4's AVX2 integer GEMV) off
  bool amx = true;         // LTJAX_FFI_AMX=0: the AMX int8 GEMM off
  int threads = -1;        // LTJAX_FFI_THREADS (-1: the cores)
  int spin_us = 200;       // LTJAX_FFI_SPIN_US
  bool used = false;       // a choice was made from it: configuring again has no effect
};

inline Config& Configured() {
  static Config config;
  return config;
}

// ---------------------------------------------------------------- CPU level (runtime dispatch)
enum class Isa : int { kNone = 0, kAvx2 = 1, kAvx512 = 2 };

inline Isa DetectIsa() {
  Configured().used = true;
  __builtin_cpu_init();
  bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                __builtin_cpu_supports("avx512vbmi2");
  if (Configured().avx2_only && avx2) return Isa::kAvx2;  // testing/benchmarking override
  return avx512 ? Isa::kAvx512 : avx2 ? Isa::kAvx2 : Isa::kNone;
}

inline Isa CurrentIsa() {
  static const Isa isa = DetectIsa();
  return isa;
}

// Integer dot products (vpdpbusd) for the M = 1 bitmask_int8 GEMV, which then runs in exact
// integer arithmetic (bitmask_rows.h, XDigits): AVX-512 VNNI (zmm) on the AVX-512 level, else
// AVX-VNNI (ymm, VEX encoded: Intel client CPUs since Alder Lake, AMD Zen 5) on the AVX2 level.
// LTJAX_FFI_VNNI=0 (Config::vnni) turns both off (the f32 walk runs).
enum class Vnni : int { kNone = 0, kAvx = 1, kAvx512 = 2 };

inline Vnni CurrentVnni() {
  static const Vnni vnni = [] {
    Configured().used = true;
    if (!Configured().vnni) return Vnni::kNone;
    if (CurrentIsa() == Isa::kAvx512 && __builtin_cpu_supports("avx512vnni")) return Vnni::kAvx512;
#if LTJAX_HAS_AVXVNNI
    if (CurrentIsa() != Isa::kNone && __builtin_cpu_supports("avxvnni")) return Vnni::kAvx;
#endif
    return Vnni::kNone;
  }();
  return vnni;
}

// ---------------------------------------------------------------- thread pool
// A small persistent pool of std::threads. `Run(n, f)` calls f(task, slot) for task in [0, n):
// tasks are taken from a shared counter, the caller (slot 0) working too, so when the machine
// is oversubscribed and a worker is late the caller simply does more of the tasks.
// Jobs are serialised; a caller that finds the pool busy (XLA may run two custom calls at
// once) runs its job inline instead of waiting, so the pool can never deadlock XLA.
//
// Wake-up cost: a worker asleep on a condition variable takes tens of µs to wake (futex + an
// idle vCPU's wake-up), longer than a whole 576x576 GEMV. So after each job a worker spins
// (`_mm_pause`) for `Config::spin_us` µs (LTJAX_FFI_SPIN_US, default 200) watching for the next job, and only
// then sleeps; the caller signals the condition variable only when a worker is asleep.
// Memory safety: a worker announces itself in `active_` before it reads the job pointer, and
// the caller, after all tasks are done, clears the pointer and waits for `active_ == 0`, so a
// late worker can never call a job whose caller has returned.
class Pool {
 public:
  using Task = std::function<void(int task, int slot)>;
  static Pool& Get() {
    static Pool* pool = new Pool();  // leaked on purpose: no destruction-order issues at exit
    return *pool;
  }
  int size() const { return static_cast<int>(workers_.size()) + 1; }

  void Run(int n, const Task& f) {
    std::unique_lock<std::mutex> busy(run_mu_, std::defer_lock);
    if (n <= 1 || workers_.empty() || !busy.try_lock()) {
      for (int i = 0; i < n; ++i) f(i, 0);
      return;
    }
    next_.store(0, std::memory_order_relaxed);
    done_.store(0, std::memory_order_relaxed);
    n_tasks_.store(n, std::memory_order_relaxed);
    job_.store(&f, std::memory_order_seq_cst);
    bool wake;
    {
      std::lock_guard<std::mutex> lk(mu_);
      generation_.fetch_add(1, std::memory_order_seq_cst);
      wake = sleepers_ > 0;
    }
    if (wake) cv_.notify_all();
    Work(f, n, 0);
    for (int spins = 0; done_.load(std::memory_order_acquire) < n; ++spins) {
      if (spins < 4096) _mm_pause();
      else std::this_thread::yield();
    }
    job_.store(nullptr, std::memory_order_seq_cst);
    while (active_.load(std::memory_order_seq_cst) != 0) _mm_pause();
  }

 private:
  Pool() {
    const Config& config = Configured();
    Configured().used = true;
    int n = config.threads >= 0 ? config.threads : static_cast<int>(std::thread::hardware_concurrency());
    n = std::max(1, std::min(n, 64));
    spin_us_ = std::max(0, config.spin_us);
    for (int i = 1; i < n; ++i) workers_.emplace_back([this, i] { Loop(i); });
    for (auto& t : workers_) t.detach();
  }

  void Work(const Task& f, int n, int slot) {
    for (int i; (i = next_.fetch_add(1)) < n;) {
      f(i, slot);
      done_.fetch_add(1, std::memory_order_release);
    }
  }

  // Joins the current job if it is still open.
  void Join(int slot) {
    active_.fetch_add(1, std::memory_order_seq_cst);
    const Task* job = job_.load(std::memory_order_seq_cst);
    if (job != nullptr) Work(*job, n_tasks_.load(std::memory_order_relaxed), slot);
    active_.fetch_sub(1, std::memory_order_seq_cst);
  }

  void Loop(int slot) {
    uint64_t seen = generation_.load();
    for (;;) {
      // Spin a while for the next job ...
      auto t0 = std::chrono::steady_clock::now();
      const auto spin = std::chrono::microseconds(spin_us_);
      bool got = false;
      for (int k = 0;; ++k) {
        if (generation_.load(std::memory_order_acquire) != seen) { got = true; break; }
        _mm_pause();
        if ((k & 63) == 63 && std::chrono::steady_clock::now() - t0 >= spin) break;
      }
      // ... then sleep.
      if (!got) {
        std::unique_lock<std::mutex> lk(mu_);
        ++sleepers_;
        cv_.wait(lk, [&] { return generation_.load() != seen; });
        --sleepers_;
      }
      seen = generation_.load();
      Join(slot);
    }
  }

  std::vector<std::thread> workers_;
  std::mutex run_mu_, mu_;
  std::condition_variable cv_;
  int sleepers_ = 0;  // guarded by mu_
  int spin_us_ = 200;
  std::atomic<const Task*> job_{nullptr};
  std::atomic<int> n_tasks_{0};
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> next_{0}, done_{0}, active_{0};
};

// Splits [0, n) into chunks (starts aligned to `align`, at least `min_chunk` long, about 4 per
// pool thread) and runs f(begin, end, slot) on the pool.
inline void ParallelRange(int64_t n, int64_t align, int64_t min_chunk,
                          const std::function<void(int64_t, int64_t, int)>& f) {
  Pool& pool = Pool::Get();
  int64_t want = pool.size() == 1 ? 1 : 4 * pool.size();
  int64_t chunk = std::max<int64_t>({1, min_chunk, (n + want - 1) / want});
  chunk = (chunk + align - 1) / align * align;
  int64_t parts = (n + chunk - 1) / chunk;
  pool.Run(static_cast<int>(parts), [&](int i, int slot) {
    int64_t b = i * chunk, e = std::min(n, b + chunk);
    if (b < e) f(b, e, slot);
  });
}

// ---------------------------------------------------------------- scalars
inline float Bf16ToF32(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint16_t F32ToBf16(float f) {  // round to nearest even, NaN kept quiet
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}
LTJAX_AVX2 inline float F16ToF32(uint16_t h) { return _cvtsh_ss(h); }
LTJAX_AVX2 inline uint16_t F32ToF16(float f) { return _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT); }

inline int64_t RoundUp(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

// Float-like element types the handlers read or write.
enum class Elt { kF32, kBf16, kF16 };
inline bool EltOf(ffi::DataType t, Elt* e) {
  switch (t) {
    case ffi::DataType::F32: *e = Elt::kF32; return true;
    case ffi::DataType::BF16: *e = Elt::kBf16; return true;
    case ffi::DataType::F16: *e = Elt::kF16; return true;
    default: return false;
  }
}
inline size_t EltSize(Elt e) { return e == Elt::kF32 ? 4 : 2; }

// Converts a row of n elements of type `e` to f32.
inline void ToF32(Elt e, const void* src, int64_t n, float* dst) {
  if (e == Elt::kF32) {
    std::memcpy(dst, src, n * 4);
  } else if (e == Elt::kBf16) {
    auto* s = static_cast<const uint16_t*>(src);
    for (int64_t i = 0; i < n; ++i) dst[i] = Bf16ToF32(s[i]);
  } else {
    auto* s = static_cast<const uint16_t*>(src);
    for (int64_t i = 0; i < n; ++i) dst[i] = F16ToF32(s[i]);
  }
}
inline void FromF32(Elt e, const float* src, int64_t n, void* dst) {
  if (e == Elt::kF32) {
    std::memcpy(dst, src, n * 4);
  } else if (e == Elt::kBf16) {
    auto* d = static_cast<uint16_t*>(dst);
    for (int64_t i = 0; i < n; ++i) d[i] = F32ToBf16(src[i]);
  } else {
    auto* d = static_cast<uint16_t*>(dst);
    for (int64_t i = 0; i < n; ++i) d[i] = F32ToF16(src[i]);
  }
}

// Per-thread scratch that grows and is reused across calls (no allocation in steady state).
inline float* Scratch(int slot, int64_t n) {
  thread_local std::vector<float> bufs[4];
  auto& b = bufs[slot];
  if (static_cast<int64_t>(b.size()) < n) b.assign(n, 0.0f);
  return b.data();
}

// ---------------------------------------------------------------- argument checks
inline std::string Dims(const ffi::AnyBuffer& b) {
  std::string s = "[";
  auto d = b.dimensions();
  for (size_t i = 0; i < d.size(); ++i) s += (i ? ", " : "") + std::to_string(d[i]);
  return s + "]";
}

#define LTJAX_CHECK(cond, msg)                                         \
  do {                                                                 \
    if (!(cond)) return ffi::Error::InvalidArgument(std::string(msg)); \
  } while (0)

inline ffi::Error CheckShape(const char* name, const ffi::AnyBuffer& b, std::vector<int64_t> want) {
  auto d = b.dimensions();
  bool ok = d.size() == want.size();
  for (size_t i = 0; ok && i < want.size(); ++i) ok = d[i] == want[i];
  if (ok) return ffi::Error::Success();
  std::string w = "[";
  for (size_t i = 0; i < want.size(); ++i) w += (i ? ", " : "") + std::to_string(want[i]);
  return ffi::Error::InvalidArgument(std::string("ltjax: ") + name + " has shape " + Dims(b) +
                                     ", expected " + w + "]");
}

inline ffi::Error CheckType(const char* name, const ffi::AnyBuffer& b, ffi::DataType t,
                            const char* tname) {
  if (b.element_type() == t) return ffi::Error::Success();
  return ffi::Error::InvalidArgument(std::string("ltjax: ") + name + " must be " + tname);
}

#define LTJAX_RETURN_IF_ERROR(expr)      \
  do {                                   \
    ffi::Error _e = (expr);              \
    if (_e.failure()) return _e;         \
  } while (0)

// ---------------------------------------------------------------- bitmask geometry
// The LT-Block bitmask layout of a storage matrix [C, R]: mask [C, W] uint32, packed values in
// tile-major order with per-tile exclusive prefix `offsets`. A tile column holds `tc / 32`
// mask words (tc is a multiple of 32 or spans the whole row).
struct BitmaskGeometry {
  int64_t c, r, w;       // rows, columns, mask words per row
  int64_t tr, tc;        // tile rows, tile cols
  int64_t gr, gc;        // tile grid
  int64_t nnz;           // packed values
  uint32_t last_word;    // valid bits of each row's last word
  const uint32_t* mask;
  const int32_t* offsets;

};

inline ffi::Error MakeGeometry(const ffi::AnyBuffer& mask, const ffi::AnyBuffer& offsets, int64_t nnz,
                               int64_t c, int64_t r, int64_t tr, int64_t tc, BitmaskGeometry* g) {
  LTJAX_RETURN_IF_ERROR(CheckType("mask", mask, ffi::DataType::U32, "uint32"));
  LTJAX_RETURN_IF_ERROR(CheckType("offsets", offsets, ffi::DataType::S32, "int32"));
  LTJAX_CHECK(tr >= 1 && tc >= 1, "ltjax: tile sizes must be >= 1");
  LTJAX_CHECK(tc % 32 == 0 || tc >= r, "ltjax: tile cols must be a multiple of 32 or span the row");
  g->c = c;
  g->r = r;
  g->w = (r + 31) / 32;
  g->tr = tr;
  g->tc = tc;
  g->gr = std::max<int64_t>(1, (c + tr - 1) / tr);
  g->gc = std::max<int64_t>(1, (r + tc - 1) / tc);
  g->nnz = nnz;
  g->last_word = (r % 32) ? ((1u << (r % 32)) - 1u) : 0xffffffffu;
  LTJAX_RETURN_IF_ERROR(CheckShape("mask", mask, {c, g->w}));
  LTJAX_RETURN_IF_ERROR(CheckShape("offsets", offsets, {g->gr * g->gc}));
  g->mask = static_cast<const uint32_t*>(mask.untyped_data());
  g->offsets = static_cast<const int32_t*>(offsets.untyped_data());
  return ffi::Error::Success();
}

// Set mask bits of row n in tile column j (`wpt` mask words per tile column).
inline int64_t SpanCount(const BitmaskGeometry& g, int64_t n, int64_t j, int64_t wpt) {
  const uint32_t* mrow = g.mask + n * g.w;
  int64_t w0 = j * wpt, w1 = std::min(g.w, w0 + wpt), c = 0;
  for (int64_t w = w0; w < w1; ++w) c += __builtin_popcount(w == g.w - 1 ? (mrow[w] & g.last_word) : mrow[w]);
  return c;
}

// Walks the rows of a bitmask matrix from any starting row, tracking where each tile column's
// packed values continue. Every span it hands out is checked against [0, nnz) before any
// value is read: damaged offsets or masks give an error, never an out-of-bounds read.
class RowCursor {
 public:
  RowCursor(const BitmaskGeometry& g, int64_t row0)
      : g_(g), wpt_(g.gc == 1 ? g.w : g.tc / 32), cur_(g.gc), row_(row0) {
    Reset(row0 - row0 % g.tr);
    for (int64_t n = row0 - row0 % g.tr; n < row0; ++n) {
      for (int64_t j = 0; j < g_.gc; ++j) cur_[j] += Count(n, j);
    }
  }
  // Calls f(word, mask_bits, packed_start) for every mask word of the current row, in order,
  // then moves to the next row. Returns false (calling nothing more) on inconsistent data.
  // (always_inline here and in Spans, and no lambda of their own: the kernels calling these
  // are compiled for AVX-512/AVX2, and GCC inlines a kernel's lambda only where the call sits
  // in code compiled for that target. Called out of line, or from a helper lambda compiled for
  // the baseline ISA, the kernel's lambda ran as a call per mask word with its accumulators in
  // memory: ~1.4x slower at M = 1, docs/ffi.md "AVX2 bitmask expansion".)
  template <class F>
  LTJAX_INLINE bool Row(F&& f) {
    const uint32_t* mrow = g_.mask + row_ * g_.w;
    for (int64_t j = 0; j < g_.gc; ++j) {
      int64_t s = cur_[j], w0 = j * wpt_, w1 = std::min(g_.w, w0 + wpt_);
      if (!SpanFits(j, s, w0, w1)) return false;
      for (int64_t w = w0; w < w1; ++w) {
        const uint32_t m = w == g_.w - 1 ? (mrow[w] & g_.last_word) : mrow[w];
        f(w, m, s);
        s += __builtin_popcount(m);
      }
      cur_[j] = s;
    }
    NextRow();
    return true;
  }
  // Like Row, but calls f(mask_row, w0, w1, packed_start) once per tile column (mask words
  // [w0, w1) of the current row; the caller masks word words() - 1 with last_word()), so a
  // kernel can consume several mask words per step. f returns where its packed values ended.
  template <class F>
  LTJAX_INLINE bool Spans(F&& f) {
    const uint32_t* mrow = g_.mask + row_ * g_.w;
    for (int64_t j = 0; j < g_.gc; ++j) {
      int64_t s = cur_[j], w0 = j * wpt_, w1 = std::min(g_.w, w0 + wpt_);
      if (!SpanFits(j, s, w0, w1)) return false;
      cur_[j] = f(mrow, w0, w1, s);
    }
    NextRow();
    return true;
  }
  int64_t row() const { return row_; }
  int64_t nnz() const { return g_.nnz; }
  int64_t next(int64_t j) const { return cur_[j]; }  // where tile column j's values continue
  int64_t words() const { return g_.w; }
  uint32_t last_word() const { return g_.last_word; }

 private:
  int64_t Count(int64_t n, int64_t j) const { return SpanCount(g_, n, j, wpt_); }
  // Whether the current row's span of tile column j (words [w0, w1), values from s) lies in
  // [0, nnz): cheaply by its largest possible count (32 per word), by its exact popcount only
  // within that distance of the end. Checked before any of its values is read.
  LTJAX_INLINE bool SpanFits(int64_t j, int64_t s, int64_t w0, int64_t w1) const {
    return s >= 0 && (s + 32 * (w1 - w0) <= g_.nnz || s + Count(row_, j) <= g_.nnz);
  }
  LTJAX_INLINE void NextRow() {
    ++row_;
    if (row_ % g_.tr == 0 && row_ < g_.c) Reset(row_);
  }
  void Reset(int64_t row) {
    int64_t i = std::min(row / g_.tr, g_.gr - 1);
    for (int64_t j = 0; j < g_.gc; ++j) cur_[j] = g_.offsets[i * g_.gc + j];
  }
  const BitmaskGeometry& g_;
  int64_t wpt_;  // mask words per tile column
  std::vector<int64_t> cur_;
  int64_t row_;
};

}  // namespace ltjax
