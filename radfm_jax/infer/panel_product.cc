// The decode's weight products on XLA:CPU: y [n, out] = x [n, in] . W^T, W [out, in] packed once
// into panels [ceil(out / LANES), in, LANES] (zero-padded outputs): float32 weights, or int8 ones
// with a float32 scale per output (quantize='int8'). radfm_jax/infer/panel_kernel.py
// builds this file with the host's C++ compiler (-O3 -march=native) and calls it through the XLA
// FFI; docs/performance.md has the measurements behind it.
//
// Why a kernel of our own: a decode step multiplies every decoder weight by 1-16 rows. XLA:CPU's
// GEMMs copy the weight into their packed layout first, so a batch-8 step reads each weight
// twice and writes it once (the `bench` lm_head: 3.05 ms at 8 rows against 1.2 ms at 1 row); no
// library XLA:CPU calls takes a pre-packed weight. Here the weight is packed once, when the
// decode view is made, and each product streams it exactly once: for every k, one vector of
// LANES outputs of W is loaded and multiplied by each row's x[b, k] (a broadcast from L1) into
// per-row accumulators that stay in registers, so no horizontal sums are needed and the loads
// are contiguous. The outputs are split over XLA's intra-op thread pool in chunks of panels;
// the pool's threads that helped with one product stay a moment for the next (`help`).
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <mutex>
#include <thread>

#include "xla/ffi/api/ffi.h"

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#if defined(__x86_64__) || defined(__i386__)
#define SPIN_PAUSE() __builtin_ia32_pause()
#else
#define SPIN_PAUSE() ((void)0)
#endif

namespace ffi = xla::ffi;

// Everything but the two exported symbols has internal linkage (and the library is built with
// -fvisibility=hidden): a process may load other libraries built from other versions of this
// file, and the dynamic linker must not resolve one's template tables to another's.
namespace {

#if defined(__AVX512F__)
// 32 vector registers: 2 panels x 8 rows of 16-float accumulators, 2 weight vectors.
constexpr int LANES = 16;
constexpr int ROWS = 8;
#else
// 16 vector registers (AVX2): 2 panels x 4 rows of 8-float accumulators.
constexpr int LANES = 8;
constexpr int ROWS = 4;
#endif

constexpr int PREFETCH = 4096;   // bytes ahead of the weight streams

typedef float vec __attribute__((vector_size(LANES * 4)));
// The same vector read from any float address (XLA's buffers are aligned, but nothing says so
// to this file): an unaligned load, allowed to alias the floats it reads.
typedef float vec_unaligned __attribute__((vector_size(LANES * 4), aligned(4), may_alias));
// LANES int8 weights (`quantize='int8'`, weight-only), widened to floats as they are loaded.
typedef int8_t i8vec_unaligned __attribute__((vector_size(LANES), aligned(1), may_alias));

static inline vec load(const float* p) { return *reinterpret_cast<const vec_unaligned*>(p); }
static inline vec load(const int8_t* p) {
  // Sign-extend to int32, then convert (GCC turns a direct int8 -> float vector conversion into
  // one scalar conversion per lane).
#if defined(__AVX512F__)
  return (vec)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)));
#elif defined(__AVX2__)
  return (vec)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)));
#else
  typedef int32_t i32vec __attribute__((vector_size(LANES * 4)));
  return __builtin_convertvector(
      __builtin_convertvector(*reinterpret_cast<const i8vec_unaligned*>(p), i32vec), vec);
#endif
}

// Writes the valid outputs of one panel's accumulators (the last panel may be padding), times
// their scales for int8 weights (one per output channel; none for float weights).
template <int N>
static inline void store(const vec (&acc)[N], int64_t panel, float* y, int64_t out,
                         const float* scale) {
  const int64_t o0 = panel * LANES;
  const int valid = static_cast<int>(std::min<int64_t>(LANES, out - o0));
  for (int b = 0; b < N; ++b)
    for (int j = 0; j < valid; ++j)
      y[b * out + o0 + j] = scale ? acc[b][j] * scale[o0 + j] : acc[b][j];
}

// Panels [p0, p1) of y for N rows (N a compile-time constant, so the accumulators live in
// registers): two panels at a time, then the odd one. W: float or int8_t weights.
template <int N, typename W>
static void rows_panels(const float* x, const void* weights, const float* scale, float* y,
                        int64_t in, int64_t out, int64_t p0, int64_t p1) {
  const W* w = static_cast<const W*>(weights);
  // One prefetch per cache line of each stream: every feature for floats, every 4th for int8.
  constexpr int64_t kLine = 64 / (LANES * static_cast<int64_t>(sizeof(W)));
  int64_t p = p0;
  for (; p + 2 <= p1; p += 2) {
    const W* w0 = w + p * in * LANES;
    const W* w1 = w0 + in * LANES;
    vec acc0[N], acc1[N];
    for (int b = 0; b < N; ++b) acc0[b] = acc1[b] = vec{};
    for (int64_t k = 0; k < in; ++k) {
      // Ask for the weights 4 KiB ahead of each stream: at 8 rows the FMAs keep the core busy,
      // and the hardware prefetcher alone then leaves the stream short (docs/performance.md:
      // 8-row products 7-10% faster, 1 row unchanged). Non-temporal (prefetchnta): each weight
      // is read once per step and the next product's evicts it anyway; measured 3-8% faster
      // at 1 and 8 rows than into all cache levels.
      if (k % kLine == 0) {
        __builtin_prefetch(reinterpret_cast<const char*>(w0 + k * LANES) + PREFETCH, 0, 0);
        __builtin_prefetch(reinterpret_cast<const char*>(w1 + k * LANES) + PREFETCH, 0, 0);
      }
      const vec a = load(w0 + k * LANES), c = load(w1 + k * LANES);
#pragma GCC unroll 8
      for (int b = 0; b < N; ++b) {
        const float xb = x[b * in + k];
        acc0[b] += xb * a;
        acc1[b] += xb * c;
      }
    }
    store<N>(acc0, p, y, out, scale);
    store<N>(acc1, p + 1, y, out, scale);
  }
  if (p < p1) {
    const W* w0 = w + p * in * LANES;
    vec acc0[N];
    for (int b = 0; b < N; ++b) acc0[b] = vec{};
    for (int64_t k = 0; k < in; ++k) {
      const vec a = load(w0 + k * LANES);
#pragma GCC unroll 8
      for (int b = 0; b < N; ++b) acc0[b] += x[b * in + k] * a;
    }
    store<N>(acc0, p, y, out, scale);
  }
}

using RowsFn = void (*)(const float*, const void*, const float*, float*, int64_t, int64_t,
                        int64_t, int64_t);

// rows_panels<n, W> for a block of n = 1..ROWS rows.
template <typename W>
struct RowsTable {
#if defined(__AVX512F__)
  static constexpr RowsFn fns[ROWS] = {rows_panels<1, W>, rows_panels<2, W>, rows_panels<3, W>,
                                       rows_panels<4, W>, rows_panels<5, W>, rows_panels<6, W>,
                                       rows_panels<7, W>, rows_panels<8, W>};
#else
  static constexpr RowsFn fns[ROWS] = {rows_panels<1, W>, rows_panels<2, W>, rows_panels<3, W>,
                                       rows_panels<4, W>};
#endif
};

// One product, shared by the threads that work on it (held by shared_ptr: a helper task that
// starts after the caller has finished finds no chunk left and only drops its reference).
struct Product {
  const float* x;
  const void* w;
  const float* scale;     // int8 weights: one per output; float weights: nullptr
  const RowsFn* rows_fns;  // RowsTable<W>::fns
  float* y;
  int64_t n, in, out, panels, chunk, chunks;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};

  void run() {
    for (;;) {
      const int64_t c = next.fetch_add(1, std::memory_order_relaxed);
      if (c >= chunks) return;
      const int64_t p0 = c * chunk, p1 = std::min(panels, p0 + chunk);
      // Every row block over this chunk of panels, so the chunk is read from memory once and
      // from cache for the other blocks (a prefill's hundreds of rows).
      for (int64_t r = 0; r < n; r += ROWS) {
        const int64_t rows = std::min<int64_t>(ROWS, n - r);
        rows_fns[rows - 1](x + r * in, w, scale, y + r * out, in, out, p0, p1);
      }
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

// Helpers stay for the next product: a decode step's products come every 20-150 us, and a
// helper handed back to XLA's pool falls asleep, so each product waited 3-13 us on average for
// its wake-up (more on a VM), the caller alone on the work meanwhile. After its chunks a helper
// spins for up to kLinger watching for the next posted product, then returns to the pool.
constexpr std::chrono::microseconds kLinger(300);

// The newest product stays posted after its call has returned: every chunk of it was taken by
// then, so a helper that picks it up late finds none left and touches none of its buffers.
struct Team {
  std::mutex mu;
  std::shared_ptr<Product> job;       // the newest posted product (under mu)
  uint64_t job_seq = 0;               // its post number (under mu)
  std::atomic<uint64_t> posted{0};    // posts so far
  std::atomic<int> lingering{0};      // helpers spinning for the next post
};

// Never destroyed: a helper may still be lingering while the process exits.
Team& team() {
  static Team* t = new Team;
  return *t;
}

void post(const std::shared_ptr<Product>& job, uint64_t* seq) {
  Team& t = team();
  std::lock_guard<std::mutex> lock(t.mu);
  t.job = job;
  t.job_seq = *seq = t.posted.load(std::memory_order_relaxed) + 1;
  t.posted.store(t.job_seq, std::memory_order_release);
}

void help(std::shared_ptr<Product> job, uint64_t seq) {
  Team& t = team();
  for (;;) {
    job->run();
    job.reset();
    t.lingering.fetch_add(1, std::memory_order_relaxed);
    const auto deadline = std::chrono::steady_clock::now() + kLinger;
    for (int spins = 1; t.posted.load(std::memory_order_acquire) == seq; ++spins) {
      SPIN_PAUSE();
      if (spins % 256 == 0 && std::chrono::steady_clock::now() > deadline) {
        t.lingering.fetch_sub(1, std::memory_order_relaxed);
        return;
      }
    }
    t.lingering.fetch_sub(1, std::memory_order_relaxed);
    std::lock_guard<std::mutex> lock(t.mu);
    job = t.job;
    seq = t.job_seq;
  }
}

// y [n, out] = x [n, in] times the panels `w` (weights of type W) [ceil(out / LANES), in, LANES],
// each output times its `scale` when there is one (int8 weights).
template <typename W>
static ffi::Error Multiply(ffi::ThreadPool pool, const float* x, const W* w,
                           const float* scale, float* y, int64_t n, int64_t in, int64_t out,
                           int64_t panels) {
  if (n == 0 || out == 0) return ffi::Error::Success();
  auto job = std::make_shared<Product>();
  job->x = x;
  job->w = w;
  job->scale = scale;
  job->rows_fns = RowsTable<W>::fns;
  job->y = y;
  job->n = n;
  job->in = in;
  job->out = out;
  job->panels = panels;
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  // Chunks of >= 64 KiB of weights (the scheduling cost stays small against the work) and up to
  // 8 per thread (the threads finish together when one is slowed).
  const int64_t panel_bytes = in * LANES * static_cast<int64_t>(sizeof(W));
  const int64_t least = std::max<int64_t>(2, (64 * 1024 + panel_bytes - 1) / panel_bytes);
  int64_t chunk = std::max<int64_t>(least, (panels + 8 * threads - 1) / (8 * threads));
  chunk += chunk & 1;   // whole panel pairs
  job->chunk = chunk;
  job->chunks = (panels + chunk - 1) / chunk;
  // Lingering helpers take the posted product; new ones are scheduled for the rest.
  uint64_t seq = 0;
  post(job, &seq);
  const int64_t want = std::min(threads, job->chunks) - 1;
  const int64_t ready = team().lingering.load(std::memory_order_relaxed);
  for (int64_t t = ready; t < want; ++t) pool.Schedule([job, seq] { help(job, seq); });
  job->run();
  // The chunks other threads took are in progress: spin briefly (they take microseconds), then
  // yield the core, so that a descheduled helper on a busy host is not starved by this wait.
  for (int spins = 0; job->done.load(std::memory_order_acquire) < job->chunks; ++spins) {
    if (spins < 4096) SPIN_PAUSE();
    else std::this_thread::yield();
  }
  return ffi::Error::Success();
}

// Whether x [n, in], packed weights [panels, in, LANES] and y [n, out] agree.
static bool Shapes(ffi::Span<const int64_t> xd, ffi::Span<const int64_t> wd,
                   ffi::Span<const int64_t> yd) {
  return xd.size() == 2 && wd.size() == 3 && yd.size() == 2 && wd[2] == LANES &&
         wd[1] == xd[1] && yd[0] == xd[0] && wd[0] * LANES >= yd[1] &&
         (wd[0] - 1) * LANES < yd[1];
}

static ffi::Error PanelProductImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                                   ffi::Buffer<ffi::F32> w, ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  if (!Shapes(xd, wd, yd))
    return ffi::Error::InvalidArgument("panel_product: expected x [n, in], w [ceil(out / lanes), "
                                       "in, lanes], y [n, out]");
  return Multiply<float>(pool, x.typed_data(), w.typed_data(), nullptr, y->typed_data(), xd[0],
                         xd[1], yd[1], wd[0]);
}

static ffi::Error PanelProductInt8Impl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                                       ffi::Buffer<ffi::S8> w, ffi::Buffer<ffi::F32> scale,
                                       ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  const auto sd = scale.dimensions();
  if (!Shapes(xd, wd, yd) || sd.size() != 1 || sd[0] != yd[1])
    return ffi::Error::InvalidArgument("panel_product_int8: expected x [n, in], w int8 "
                                       "[ceil(out / lanes), in, lanes], scale [out], y [n, out]");
  return Multiply<int8_t>(pool, x.typed_data(), w.typed_data(), scale.typed_data(),
                          y->typed_data(), xd[0], xd[1], yd[1], wd[0]);
}

}  // namespace

#pragma GCC visibility push(default)
XLA_FFI_DEFINE_HANDLER_SYMBOL(RadfmPanelProduct, PanelProductImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(RadfmPanelProductInt8, PanelProductInt8Impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

// The panel width this build packs for (the Python side packs the weights to match).
extern "C" int radfm_panel_lanes() { return LANES; }
#pragma GCC visibility pop
