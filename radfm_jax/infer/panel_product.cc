// The decode's products on XLA:CPU, called through the XLA FFI on XLA's intra-op thread pool;
// radfm_jax/infer/panel_kernel.py builds this file with the host's C++ compiler (-O3
// -march=native); docs/performance.md has the measurements behind it.
//
// 1. Weight products: y [n, out] = x [n, in] . W^T, W [out, in] packed once into panels
//    [ceil(out / PANEL), in, PANEL] (PANEL = 2 vectors of LANES outputs; zero-padded outputs):
//    float32 weights, or int8 ones with a float32 scale per output (quantize='int8').
//    Why a kernel of our own: a decode step multiplies every decoder weight by 1-16 rows.
//    XLA:CPU's GEMMs copy the weight into their packed layout first, so a batch-8 step reads each
//    weight twice and writes it once (the `bench` lm_head: 3.05 ms at 8 rows against 1.2 ms at 1
//    row); no library XLA:CPU calls takes a pre-packed weight. Here the weight is packed once,
//    when the decode view is made, and each product streams it exactly once: for every k, the
//    panel's two vectors of LANES outputs of W are loaded and multiplied by each row's x[b, k] (a
//    broadcast from L1) into per-row accumulators that stay in registers, so no horizontal sums
//    are needed, and a panel is one contiguous stream (two vectors of one feature, then the next
//    feature's). The outputs are split over the threads in chunks of panels.
// 2. A one-token step's attention with one layer's KV cache (scores = keys . q, softmax, out =
//    probabilities . values, per batch row and head): XLA:CPU runs the two products as many
//    small matrix-vector products on one thread (a batch-8 step read its cache at one core's
//    bandwidth) and the softmax as a dozen small ops; here the (row, head) pairs are split over
//    the threads, the softmax stays with its scores in L1, and only the slots written so far are
//    read (the cache is allocated in chunks ahead of them).
// 3. Greedy decoding's argmax over a step's [batch, vocab] logits: the maximum in vector chains,
//    then a vector scan for its first index.
//
// The pool's threads that helped with one product stay a moment for the next (`help`).
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

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
// 32 vector registers: a panel's 2 vectors x 8 rows of 16-float accumulators, 2 weight vectors.
constexpr int LANES = 16;
constexpr int ROWS = 8;
#else
// 16 vector registers (AVX2): 2 vectors x 4 rows of 8-float accumulators.
constexpr int LANES = 8;
constexpr int ROWS = 4;
#endif
// A panel's outputs: two vectors, loaded together for every feature.
constexpr int PANEL = 2 * LANES;

constexpr int PREFETCH = 4096;   // bytes ahead of the cache attention's reads

// Bytes ahead of a panel's weight stream that the products ask for: float32 panels read 128 B
// (AVX-512) per feature, so 8 KiB is 64 features ahead, as far as the 4 KiB ahead of each of
// the two streams the panels had when they were one vector wide (docs/performance.md: at 1 row
// 4 KiB ahead of the one stream was 4% slower than 8 KiB). int8 panels read a quarter of the
// bytes per feature for the same multiply-adds, and keep their 4 KiB.
template <typename W>
constexpr int64_t kWeightsAhead = sizeof(W) == 1 ? 4096 : 8192;

typedef float vec __attribute__((vector_size(LANES * 4)));
typedef int32_t ivec __attribute__((vector_size(LANES * 4)));   // lane masks, exponents
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
  return __builtin_convertvector(
      __builtin_convertvector(*reinterpret_cast<const i8vec_unaligned*>(p), ivec), vec);
#endif
}

// Writes the valid outputs of one vector of a panel's accumulators (outputs o0 ... o0 + LANES -
// 1; the last panel may be padding), times their scales for int8 weights (one per output
// channel; none for float weights).
template <int N>
static inline void store(const vec (&acc)[N], int64_t o0, float* y, int64_t out,
                         const float* scale) {
  const int valid = static_cast<int>(std::min<int64_t>(LANES, out - o0));
  for (int b = 0; b < N; ++b)
    for (int j = 0; j < valid; ++j)
      y[b * out + o0 + j] = scale ? acc[b][j] * scale[o0 + j] : acc[b][j];
}

// Panels [p0, p1) of y for N rows (N a compile-time constant, so the accumulators live in
// registers). W: float or int8_t weights.
template <int N, typename W>
static void rows_panels(const float* x, const void* weights, const float* scale, float* y,
                        int64_t in, int64_t out, int64_t p0, int64_t p1) {
  const W* w = static_cast<const W*>(weights);
  // One prefetch per cache line of the stream: a feature is kBytes of it (AVX-512: two lines
  // for floats, half a line for int8).
  constexpr int64_t kBytes = PANEL * static_cast<int64_t>(sizeof(W));
  for (int64_t p = p0; p < p1; ++p) {
    const W* wp = w + p * in * PANEL;
    vec acc0[N], acc1[N];
    for (int b = 0; b < N; ++b) acc0[b] = acc1[b] = vec{};
    for (int64_t k = 0; k < in; ++k) {
      // Ask for the weights kWeightsAhead bytes ahead: at 8 rows the FMAs keep the core busy,
      // and the hardware prefetcher alone then leaves the stream short. Non-temporal
      // (prefetchnta): each weight is read once per step and the next product's evicts it
      // anyway; measured 3-8% faster at 1 and 8 rows than into all cache levels. One stream per
      // panel (its two vectors side by side), not one per vector: a step's 8-row products 6-10%
      // faster, the 1-row ones 2% (docs/performance.md).
      const char* ahead = reinterpret_cast<const char*>(wp + k * PANEL) + kWeightsAhead<W>;
      if (kBytes >= 64) {
        for (int64_t line = 0; line < kBytes; line += 64) __builtin_prefetch(ahead + line, 0, 0);
      } else if (k * kBytes % 64 == 0) {
        __builtin_prefetch(ahead, 0, 0);
      }
      const vec a = load(wp + k * PANEL), c = load(wp + k * PANEL + LANES);
#pragma GCC unroll 8
      for (int b = 0; b < N; ++b) {
        const float xb = x[b * in + k];
        acc0[b] += xb * a;
        acc1[b] += xb * c;
      }
    }
    store<N>(acc0, p * PANEL, y, out, scale);
    store<N>(acc1, p * PANEL + LANES, y, out, scale);
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
// starts after the caller has finished finds no chunk left and only drops its reference). The
// threads take its chunks in turn; `chunk` runs one.
struct Job {
  int64_t per_chunk = 0, chunks = 0;   // items (panels, cache pairs) per chunk; chunks
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  virtual ~Job() = default;
  virtual void chunk(int64_t c) const = 0;

  // Cuts `items` into chunks of `per` (the last one shorter).
  void Divide(int64_t items, int64_t per) {
    per_chunk = per;
    chunks = (items + per - 1) / per;
  }

  void run() {
    for (;;) {
      const int64_t c = next.fetch_add(1, std::memory_order_relaxed);
      if (c >= chunks) return;
      chunk(c);
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

// A weight product; a chunk is a run of panels.
struct Product : Job {
  const float* x;
  const void* w;
  const float* scale;     // int8 weights: one per output; float weights: nullptr
  const RowsFn* rows_fns;  // RowsTable<W>::fns
  float* y;
  int64_t n, in, out, panels;

  void chunk(int64_t c) const override {
    const int64_t p0 = c * per_chunk, p1 = std::min(panels, p0 + per_chunk);
    // Every row block over this chunk of panels, so the chunk is read from memory once and
    // from cache for the other blocks (a prefill's hundreds of rows).
    for (int64_t r = 0; r < n; r += ROWS) {
      const int64_t rows = std::min<int64_t>(ROWS, n - r);
      rows_fns[rows - 1](x + r * in, w, scale, y + r * out, in, out, p0, p1);
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
  std::shared_ptr<Job> job;           // the newest posted product (under mu)
  uint64_t job_seq = 0;               // its post number (under mu)
  std::atomic<uint64_t> posted{0};    // posts so far
  std::atomic<int> lingering{0};      // helpers spinning for the next post
};

// Never destroyed: a helper may still be lingering while the process exits.
Team& team() {
  static Team* t = new Team;
  return *t;
}

void post(const std::shared_ptr<Job>& job, uint64_t* seq) {
  Team& t = team();
  std::lock_guard<std::mutex> lock(t.mu);
  t.job = job;
  t.job_seq = *seq = t.posted.load(std::memory_order_relaxed) + 1;
  t.posted.store(t.job_seq, std::memory_order_release);
}

void help(std::shared_ptr<Job> job, uint64_t seq) {
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

// Runs `job` on this thread and up to the pool's other threads: lingering helpers take the
// posted job, new ones are scheduled for the rest; returns when every chunk is done.
static void Share(ffi::ThreadPool& pool, const std::shared_ptr<Job>& job) {
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
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
}

// How many of `items` (each `item_bytes` of the streamed input) make one chunk: >= 64 KiB (the
// scheduling cost stays small against the work) and up to 8 chunks per thread (the threads finish
// together when one is slowed); at least `least`.
static int64_t PerChunk(const ffi::ThreadPool& pool, int64_t items, int64_t item_bytes,
                        int64_t least) {
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t enough = (64 * 1024 + item_bytes - 1) / std::max<int64_t>(1, item_bytes);
  return std::max({least, enough, (items + 8 * threads - 1) / (8 * threads)});
}

// y [n, out] = x [n, in] times the panels `w` (weights of type W) [ceil(out / PANEL), in, PANEL],
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
  job->Divide(panels, PerChunk(pool, panels, in * PANEL * static_cast<int64_t>(sizeof(W)), 1));
  Share(pool, job);
  return ffi::Error::Success();
}

// exp(x) for LANES floats at a time: Cody-Waite range reduction and Cephes' degree-6
// polynomial (within 2 ulp of the true value); 0 below -87 (exp(-87) = 1.6e-38, under float32's
// resolution of any sum it joins: a masked score, or the tail of a block); above 88.3 the value
// at 88.3 (the softmax only asks for x <= 0). Written here because the softmax needs a vector
// exp and the C++ standard library has only a scalar one.
static inline vec Exp(vec x) {
  const vec clamped = x < 88.3f ? (x > -87.0f ? x : vec{} - 87.0f) : vec{} + 88.3f;
  // round(x / ln 2) by the float addition of 1.5 * 2^23 (exact for |t| < 2^22)
  const vec n = (clamped * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const vec r = clamped - n * 0.693359375f - n * -2.12194440e-4f;
  vec p = vec{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const vec y = p * (r * r) + r + 1.0f;
  const ivec bits = (__builtin_convertvector(n, ivec) + 127) << 23;
  const vec e = y * reinterpret_cast<const vec&>(bits);
  return x < -87.0f ? vec{} : (x == x ? e : x);   // NaN stays NaN
}

static inline float Sum(vec a) {
#if defined(__AVX512F__)
  return _mm512_reduce_add_ps(reinterpret_cast<__m512>(a));
#else
  float s = 0.0f;
  for (int l = 0; l < LANES; ++l) s += a[l];
  return s;
#endif
}

static inline float Dot(const float* a, const float* b, int64_t parts) {
  vec acc = load(a) * load(b);
  for (int64_t v = 1; v < parts; ++v) acc += load(a + v * LANES) * load(b + v * LANES);
  return Sum(acc);
}

// Asks for each cache line PREFETCH bytes past the cache row `row` (parts lines of LANES floats)
// in the order the attention reads them: past `end` (the block's last written row) the lines
// come from `next`, the block read after it (a pair's values after its keys, the next pair's
// keys after its values). Prefetching only a row's first line left the rest to the hardware
// prefetcher, and the attention of a batch-8 step took 8-10% longer (4-6% at batch 1); stopping
// at each block's end left the next block's first 4 KiB unasked for (3-10% longer;
// docs/performance.md).
static inline void Prefetch(const float* row, int64_t parts, const float* end, const float* next) {
  for (int64_t p = 0; p < parts; ++p) {
    const char* line = reinterpret_cast<const char*>(row + p * LANES) + PREFETCH;
    const char* stop = reinterpret_cast<const char*>(end);
    __builtin_prefetch(line < stop ? line : reinterpret_cast<const char*>(next) + (line - stop),
                       0, 0);
  }
}

// A one-token decode step's attention with one layer's KV cache, per (batch row, head) pair:
// scores of the new token's query with the cached keys and its own key, scaled and masked, one
// softmax over them, and the probabilities times the cached values and its own value: what
// `layers.cached_attention` computes for one new token (masked entries at float32's minimum, as
// HF does; the softmax over every allocated slot, the unwritten ones masked). XLA:CPU runs the
// two products with the cache as small matrix-vector products on one thread (a batch-8 step
// read its cache at one core's bandwidth) and the softmax as a dozen small ops; here the pairs
// are split over the threads, only the `written` slots are read (the cache is allocated in
// chunks ahead of them), and the softmax stays with its scores in L1. A chunk is a run of pairs.
//
// A row's masked slots before its first attended one (a left-padded prompt's padding: up to 63
// slots of a prompt rounded up to 64, more in a batch of prompts of different lengths) are not
// read either: their probability is exp(float32's minimum - the maximum score) = 0 exactly once
// any slot or the own key is attended, so their keys do not change the softmax and their values
// add 0 * value = 0 to the sums. Their scores still count as masked ones, in the same lanes of
// the same blocks as when they are read, so the sums are the same bits. (A row that attends to
// nothing reads them all: its softmax is uniform over the masked slots.)
struct CacheAttention : Job {
  const float *q, *k, *v;           // the new token's [pairs, head_dim]
  const float *keys, *values;       // the cache [pairs, slots, head_dim]
  const bool *cached, *own;         // [batch, slots]: slot j attended; [batch]: own key attended
  float* y;                         // [pairs, head_dim]
  float scale;
  int64_t slots, head_dim, written, pairs, heads;
  std::vector<int64_t> first;       // [batch]: each row's first attended slot (< written), or
                                    // `written` when none is

  // Sets `first` from `cached` (call once `written` and the shapes are set).
  void FindFirst(int64_t batch) {
    first.assign(batch, written);
    for (int64_t b = 0; b < batch; ++b)
      for (int64_t j = 0; j < written; ++j)
        if (cached[b * slots + j]) {
          first[b] = j;
          break;
        }
  }

  void chunk(int64_t c) const override {
    thread_local std::vector<float> scores;
    const int64_t blocks = (written + LANES - 1) / LANES;
    scores.resize(std::max<int64_t>(1, blocks) * LANES);
    const int64_t end = std::min(pairs, (c + 1) * per_chunk);
    for (int64_t i = c * per_chunk; i < end; ++i) Attend(i, scores.data(), blocks);
  }

  // The first cache row pair i's keys are read from (its row's first attended slot's).
  const float* FirstKey(int64_t i) const {
    return keys + (i * slots + first[i / heads]) * head_dim;
  }

  void Attend(int64_t i, float* s, int64_t blocks) const {
    constexpr float kNeg = -3.40282347e38f;   // float32's minimum: a masked score
    constexpr int kMaxParts = 256 / LANES;    // head_dim <= 256
    const int64_t parts = head_dim / LANES, b = i / heads;
    const float* qi = q + i * head_dim;
    const float* key = keys + i * slots * head_dim;
    const float* value = values + i * slots * head_dim;
    const float* next_key = i + 1 < pairs ? FirstKey(i + 1) : key;
    const bool* mask = cached + b * slots;
    // The masked prefix [0, lead) is skipped; scores start at the block holding slot `lead`.
    const int64_t lead = first[b], from = lead / LANES * LANES;
    // scores, the maximum (the unwritten slots and the skipped ones count as masked ones)
    float top = written < slots || lead > 0 ? kNeg : -INFINITY;
    std::fill(s + from, s + lead, kNeg);
    for (int64_t j = lead; j < written; ++j) {
      const float* row = key + j * head_dim;
      Prefetch(row, parts, key + written * head_dim, value + lead * head_dim);
      s[j] = mask[j] ? Dot(row, qi, parts) * scale : kNeg;
      top = std::max(top, s[j]);
    }
    std::fill(s + written, s + blocks * LANES, -INFINITY);   // exp -> 0
    const float mine = own[b] ? Dot(k + i * head_dim, qi, parts) * scale : kNeg;
    top = std::max(top, mine);
    // A masked slot's probability; when it is not 0 (nothing attended), every slot is read.
    const float e_masked = Exp(vec{} + (kNeg - top))[0];
    const bool skip = e_masked == 0.0f;
    const int64_t start = skip ? from : 0;
    std::fill(s + start, s + from, kNeg);
    // exp(score - max) and their sum, the unwritten slots' included
    vec total = vec{};
    for (int64_t blk = start / LANES; blk < blocks; ++blk) {
      vec e = Exp(load(s + blk * LANES) - top);
      *reinterpret_cast<vec_unaligned*>(s + blk * LANES) = e;
      total += e;
    }
    const float e_mine = Exp(vec{} + (mine - top))[0];
    const float unwritten = static_cast<float>(slots - written) * e_masked;
    const float denom = Sum(total) + unwritten + e_mine;
    // the probabilities times the values: the cache's, then the new token's
    vec acc[kMaxParts];
    for (int64_t p = 0; p < parts; ++p) acc[p] = vec{};
    for (int64_t j = skip ? lead : 0; j < written; ++j) {
      const float* row = value + j * head_dim;
      Prefetch(row, parts, value + written * head_dim, next_key);
      const float pj = s[j] / denom;
      for (int64_t p = 0; p < parts; ++p) acc[p] += pj * load(row + p * LANES);
    }
    const float p_mine = e_mine / denom;
    const float* vi = v + i * head_dim;
    for (int64_t p = 0; p < parts; ++p)
      *reinterpret_cast<vec_unaligned*>(y + i * head_dim + p * LANES) =
          acc[p] + p_mine * load(vi + p * LANES);
  }
};

// Cache attentions reading less than this (keys and values) run on the calling thread alone:
// handing a few hundred KiB to a helper cost more than it saved (split, a batch-1 `bench` step
// measured ~0.6 ms slower at 101 tokens; docs/performance.md).
constexpr int64_t kSplitBytes = int64_t{2} << 20;

// The new token's q, k, v [batch, heads, head_dim] (head_dim a multiple of LANES, <= 256), the
// cache's keys and values [batch, heads, slots, head_dim], `cached` [batch, slots] (slot
// attended), `own` [batch] (own key attended), `written` (int32 []: the slots holding keys /
// values; later ones must be masked) -> y [batch, heads, head_dim].
static ffi::Error CacheAttentionImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                                     ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                                     ffi::Buffer<ffi::F32> keys, ffi::Buffer<ffi::F32> values,
                                     ffi::Buffer<ffi::PRED> cached, ffi::Buffer<ffi::PRED> own,
                                     ffi::Buffer<ffi::S32> written, float scale,
                                     ffi::ResultBuffer<ffi::F32> y) {
  const auto qd = q.dimensions(), cd = keys.dimensions(), md = cached.dimensions();
  const auto same = [](ffi::Span<const int64_t> a, ffi::Span<const int64_t> b) {
    return a.size() == b.size() && std::equal(a.begin(), a.end(), b.begin());
  };
  const bool fits = cd.size() == 4 && cd[3] % LANES == 0 && cd[3] > 0 && cd[3] <= 256 &&
                    qd.size() == 3 && qd[0] == cd[0] && qd[1] == cd[1] && qd[2] == cd[3] &&
                    same(k.dimensions(), qd) && same(v.dimensions(), qd) &&
                    same(y->dimensions(), qd) && same(values.dimensions(), cd) &&
                    md.size() == 2 && md[0] == cd[0] && md[1] == cd[2] &&
                    own.dimensions().size() == 1 && own.dimensions()[0] == cd[0] &&
                    written.element_count() == 1;
  if (!fits)
    return ffi::Error::InvalidArgument(
        "cache_attention: expected q, k, v [batch, heads, head_dim], keys, values [batch, heads, "
        "slots, head_dim], cached [batch, slots], own [batch], written int32 [], out [batch, "
        "heads, head_dim]");
  const int64_t pairs = cd[0] * cd[1];
  if (pairs == 0) return ffi::Error::Success();
  auto job = std::make_shared<CacheAttention>();
  job->q = q.typed_data();
  job->k = k.typed_data();
  job->v = v.typed_data();
  job->keys = keys.typed_data();
  job->values = values.typed_data();
  job->cached = cached.typed_data();
  job->own = own.typed_data();
  job->y = y->typed_data();
  job->scale = scale;
  job->heads = cd[1];
  job->slots = cd[2];
  job->head_dim = cd[3];
  job->written = std::clamp<int64_t>(written.typed_data()[0], 0, cd[2]);
  job->pairs = pairs;
  job->FindFirst(cd[0]);
  int64_t read = 0;                          // the cache rows read, summed over the batch rows
  for (int64_t row : job->first) read += job->written - row;
  const int64_t pair_bytes = 2 * std::max<int64_t>(1, read / cd[0]) * job->head_dim * 4;
  if (pairs * pair_bytes < kSplitBytes) {   // on this thread alone
    job->Divide(pairs, pairs);
    job->run();
  } else {
    job->Divide(pairs, PerChunk(pool, pairs, pair_bytes, 1));
    Share(pool, job);
  }
  return ffi::Error::Success();
}

// The index of each row's first maximum (the first NaN where there is one: numpy's and
// `jnp.argmax`'s answer), for greedy decoding's [batch, vocab] logits. XLA:CPU computes an
// argmax as a scalar (value, index) reduction, or as two vector passes and a select
// (`layers.first_argmax`: ~0.18 ms for a batch-8 step's [8, 32000]). Here: the maximum in
// four independent vector chains (a NaN noted on the way), then a scan for its first index.
static int32_t FirstArgmax(const float* x, int64_t m) {
  float top = x[0];
  bool nan = x[0] != x[0];
  int64_t j = 0;
  if (m >= 4 * LANES) {
    vec t[4] = {load(x), load(x + LANES), load(x + 2 * LANES), load(x + 3 * LANES)};
    ivec odd = (t[0] != t[0]) | (t[1] != t[1]) | (t[2] != t[2]) | (t[3] != t[3]);
    for (j = 4 * LANES; j + 4 * LANES <= m; j += 4 * LANES)
      for (int c = 0; c < 4; ++c) {
        const vec v = load(x + j + c * LANES);
        t[c] = v > t[c] ? v : t[c];   // a NaN in v leaves t[c]: noted below
        odd |= v != v;
      }
    for (int c = 0; c < 4; ++c)
      for (int l = 0; l < LANES; ++l) top = t[c][l] > top ? t[c][l] : top;
    for (int l = 0; l < LANES; ++l) nan |= odd[l] != 0;
  }
  for (; j < m; ++j) {
    top = x[j] > top ? x[j] : top;
    nan |= x[j] != x[j];
  }
  int64_t i = 0;
#if defined(__AVX512F__) || defined(__AVX2__)
  for (; i + LANES <= m; i += LANES) {
#if defined(__AVX512F__)
    const __m512 v = _mm512_loadu_ps(x + i);
    const unsigned bits = nan ? _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q)
                              : _mm512_cmp_ps_mask(v, _mm512_set1_ps(top), _CMP_EQ_OQ);
#else
    const __m256 v = _mm256_loadu_ps(x + i);
    const unsigned bits = _mm256_movemask_ps(nan ? _mm256_cmp_ps(v, v, _CMP_UNORD_Q)
                                                 : _mm256_cmp_ps(v, _mm256_set1_ps(top),
                                                                 _CMP_EQ_OQ));
#endif
    if (bits) return static_cast<int32_t>(i + __builtin_ctz(bits));
  }
#endif
  for (; i < m; ++i)
    if (nan ? x[i] != x[i] : x[i] == top) return static_cast<int32_t>(i);
  return 0;
}

static ffi::Error FirstArgmaxImpl(ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::S32> y) {
  const auto xd = x.dimensions(), yd = y->dimensions();
  if (xd.size() != 2 || xd[1] == 0 || yd.size() != 1 || yd[0] != xd[0])
    return ffi::Error::InvalidArgument("first_argmax: expected x [n, m] (m > 0), out int32 [n]");
  for (int64_t r = 0; r < xd[0]; ++r)
    y->typed_data()[r] = FirstArgmax(x.typed_data() + r * xd[1], xd[1]);
  return ffi::Error::Success();
}

// Whether x [n, in], packed weights [panels, in, PANEL] and y [n, out] agree.
static bool Shapes(ffi::Span<const int64_t> xd, ffi::Span<const int64_t> wd,
                   ffi::Span<const int64_t> yd) {
  return xd.size() == 2 && wd.size() == 3 && yd.size() == 2 && wd[2] == PANEL &&
         wd[1] == xd[1] && yd[0] == xd[0] && wd[0] * PANEL >= yd[1] &&
         (wd[0] - 1) * PANEL < yd[1];
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

XLA_FFI_DEFINE_HANDLER_SYMBOL(RadfmCacheAttention, CacheAttentionImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Attr<float>("scale")
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(RadfmFirstArgmax, FirstArgmaxImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());

// The panel width this build packs for (the Python side packs the weights to match).
extern "C" int radfm_panel_lanes() { return PANEL; }
#pragma GCC visibility pop
