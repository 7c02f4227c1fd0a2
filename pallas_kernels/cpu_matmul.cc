// Float32 matmul for the CPU, called from JAX through XLA's FFI: out [M, N] = x [M, K] @ W.
//
// W comes packed (pallas_kernels/cpu_matmul.py packs it once, outside jit): the [K, N] matrix cut
// into 64-column panels, each panel stored as its own contiguous [K, 64] block, the last one
// zero-padded: [P, K, 64], or [L, P, K, 64] for a model's stacked layers with the layer chosen by
// an index operand, so a scanned layer reads its weights in place (XLA:CPU copies a dynamic slice
// of the stack before every dot).
//
// Why not XLA's dot: at the row counts of decode steps (1-64 rows) it streams W with a stride of
// N floats between rows and re-packs it on every call; a packed panel is one sequential stream,
// and the 6 x 64 register tile below does 24 FMAs per four panel loads. A unit of work is one
// panel for a chunk of rows (all rows up to 64, else 64 at a time), so a unit's panel and rows sit
// in L2 while it runs; units go to the calling thread and to tasks on XLA's intra-op pool through
// an atomic counter, as in cpu_paged_attention.cc.
//
// Reading W from memory is the other cost: a decode step streams every weight once, and a row
// tile waiting on it computes nothing. Up to 64 rows the panel is taken 64 rows (16 KB) at a time,
// every row tile using the block while it is in L1, and the tiles prefetch the next block, or the
// first block of the panel this thread likely takes next, into L2, spread over their k loops.
// Measured on SmolLM2's 30 MLP layers with the weights coming from memory: 7-17% faster at 16-64
// rows than one pass per tile; on a later 2.6 GHz host also at 6-12 rows (one pass was 20-30%
// slower there), and prefetching into L2 rather than L1 (which the next block would crowd) took
// another 4-17% off at 6-25 rows (benchmarks/cpu_kernels.py times this loop).
//
// Sums over k run in order, one accumulator per output: results differ from XLA's dot by float32
// rounding only.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cmath>
#include <cstring>
#include <memory>
#include <thread>

#include "cpu_simd.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kPanel = 64;  // columns per panel: 4 vectors of 16 floats
constexpr int kRows = 6;        // rows per register tile: 6 x 4 accumulators of the 32 registers
constexpr int64_t kMaxChunkRows = 64;
constexpr int64_t kUnitsPerThread = 4;
constexpr int64_t kBlockK = 64;  // panel rows per pass: 16 KB, kept in L1 while every row tile uses them

using jaxllm_cpu::ExpNonpositive;
using jaxllm_cpu::Vec16;

// c[r, :] (+)= x[r, :kn] @ block for R rows: block is kn rows of a panel, c an [R, 64] tile (set
// on the first block, added to after), x rows ldx apart. Meanwhile `lines` cache lines from
// `prefetch` are requested, spread over the k loop: the block the row tiles will need next.
template <int R>
void Tile(const float* x, int64_t ldx, int64_t kn, const float* block, float* c, bool first,
          const char* prefetch, int64_t lines) {
  Vec16 acc[R][4];
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < 4; ++v) acc[r][v] = first ? Vec16{} : *reinterpret_cast<const Vec16*>(c + r * kPanel + 16 * v);
  }
  const int64_t per_k = (lines + kn - 1) / kn;
  for (int64_t k = 0; k < kn; ++k) {
    for (int64_t i = k * per_k; i < std::min(lines, (k + 1) * per_k); ++i) __builtin_prefetch(prefetch + 64 * i, 0, 2);
    const Vec16* row = reinterpret_cast<const Vec16*>(block + k * kPanel);
    const Vec16 w0 = row[0], w1 = row[1], w2 = row[2], w3 = row[3];
    for (int r = 0; r < R; ++r) {
      const float xs = x[r * ldx + k];
      acc[r][0] += xs * w0;
      acc[r][1] += xs * w1;
      acc[r][2] += xs * w2;
      acc[r][3] += xs * w3;
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < 4; ++v) *reinterpret_cast<Vec16*>(c + r * kPanel + 16 * v) = acc[r][v];
  }
}

// c [rows, 64] = x[:rows] @ panel (rows <= kMaxChunkRows). The panel is taken block_k rows at a
// time, each block used by every row tile while in L1, and while they run they prefetch the next
// block (of this panel, or `next`'s first) from memory into L2.
void Product(const float* x, int64_t rows, int64_t K, const float* panel, const float* next, int64_t block_k,
             float* c) {
  const int64_t tiles = (rows + kRows - 1) / kRows;
  for (int64_t kb = 0; kb < K; kb += block_k) {
    const int64_t kn = std::min(block_k, K - kb);
    const bool inside = kb + block_k < K;
    const float* ahead = inside ? panel + (kb + block_k) * kPanel : next;
    const int64_t ahead_rows = inside ? std::min(block_k, K - kb - block_k) : (next ? std::min(block_k, K) : 0);
    const int64_t lines = ahead_rows * kPanel * sizeof(float) / 64, per_tile = (lines + tiles - 1) / tiles;
    for (int64_t t = 0; t < tiles; ++t) {
      const int64_t m = t * kRows, n = std::min<int64_t>(kRows, rows - m);
      const char* pf = reinterpret_cast<const char*>(ahead) + 64 * t * per_tile;
      const int64_t pf_lines = std::max<int64_t>(0, std::min(per_tile, lines - t * per_tile));
      const float* xm = x + m * K + kb;
      const float* block = panel + kb * kPanel;
      float* cm = c + m * kPanel;
      switch (n) {
        case 6: Tile<6>(xm, K, kn, block, cm, kb == 0, pf, pf_lines); break;
        case 5: Tile<5>(xm, K, kn, block, cm, kb == 0, pf, pf_lines); break;
        case 4: Tile<4>(xm, K, kn, block, cm, kb == 0, pf, pf_lines); break;
        case 3: Tile<3>(xm, K, kn, block, cm, kb == 0, pf, pf_lines); break;
        case 2: Tile<2>(xm, K, kn, block, cm, kb == 0, pf, pf_lines); break;
        default: Tile<1>(xm, K, kn, block, cm, kb == 0, pf, pf_lines); break;
      }
    }
  }
}

// silu(g) * u, the sigmoid taken from e^-|g| so that nothing overflows.
inline Vec16 SiluTimes(Vec16 g, Vec16 u) {
  const Vec16 zero = Vec16{}, one = zero + 1.0f;
  const Vec16 t = ExpNonpositive(g < zero ? g : -g);
  return g * ((g >= zero ? one : t) / (one + t)) * u;
}

// Shared by the calling thread and the pool tasks (see cpu_paged_attention.cc's Work).
struct Work {
  const float* x;
  const float* w;
  float* out;
  int64_t M, K, N, panels, chunk_rows, chunks, threads;
  bool gated;  // packed panels come in (gate, up) pairs; out = silu(x @ gate) * (x @ up)
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};

  int64_t units() const { return panels * chunks; }

  void Drain() {
    const int64_t n = units();
    for (int64_t u = next.fetch_add(1); u < n; u = next.fetch_add(1)) {
      const int64_t p = u / chunks, first = (u % chunks) * chunk_rows;
      const int64_t rows = std::min(chunk_rows, M - first);
      const int64_t cols = std::min(kPanel, N - p * kPanel), width = gated ? 2 : 1;
      // The unit this thread most likely takes next (threads take turns at the counter): its
      // panel is prefetched, unless it is this one.
      const int64_t guess = u + threads, next_panel = guess / chunks;
      const float* next = guess < n && next_panel != p ? w + next_panel * width * K * kPanel : nullptr;
      const float* panel = w + p * width * K * kPanel;
      const int64_t block_k = M <= 64 ? kBlockK : K;
      const float* xs = x + first * K;
      float* o = out + first * N + p * kPanel;
      alignas(64) float c[kMaxChunkRows * kPanel];
      if (!gated) {
        Product(xs, rows, K, panel, next, block_k, c);
        for (int64_t r = 0; r < rows; ++r) std::memcpy(o + r * N, c + r * kPanel, cols * sizeof(float));
      } else {
        alignas(64) float up[kMaxChunkRows * kPanel];
        Product(xs, rows, K, panel, panel + K * kPanel, block_k, c);
        Product(xs, rows, K, panel + K * kPanel, next, block_k, up);
        for (int64_t r = 0; r < rows; ++r) {
          Vec16* cr = reinterpret_cast<Vec16*>(c + r * kPanel);
          const Vec16* ur = reinterpret_cast<const Vec16*>(up + r * kPanel);
          for (int v = 0; v < 4; ++v) cr[v] = SiluTimes(cr[v], ur[v]);
          std::memcpy(o + r * N, c + r * kPanel, cols * sizeof(float));
        }
      }
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

ffi::Error Matmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                  ffi::Buffer<ffi::S32> layer, ffi::Buffer<ffi::S32> real_rows, bool gated,
                  ffi::ResultBuffer<ffi::F32> out) {
  const auto xd = x.dimensions();
  const auto wd = w.dimensions();
  const auto od = out->dimensions();
  if (xd.size() != 2 || od.size() != 2 || (wd.size() != 3 && wd.size() != 4) ||
      wd[wd.size() - 1] != kPanel) {
    return ffi::Error::InvalidArgument("cpu matmul: x must be [M, K], the weights [P, K, 64] or "
                                       "[L, P, K, 64], the result [M, N]");
  }
  const int64_t M = xd[0], K = xd[1], N = od[1];
  const int64_t packed = wd[wd.size() - 3], num_layers = wd.size() == 4 ? wd[0] : 1;
  const int64_t P = gated ? packed / 2 : packed;  // output panels
  if ((gated && packed % 2 != 0) || wd[wd.size() - 2] != K || od[0] != M || N <= (P - 1) * kPanel ||
      N > P * kPanel) {
    return ffi::Error::InvalidArgument("cpu matmul: x's K, the packed weights' K and panels, and "
                                       "the result's [M, N] do not agree");
  }
  const int64_t l = layer.element_count() ? layer.typed_data()[0] : 0;
  if (l < 0 || l >= num_layers) {
    return ffi::Error::InvalidArgument("cpu matmul: layer index outside the stacked weights");
  }
  // Rows past `real_rows` are the flat batch's padding: zeros, not computed.
  const int64_t real = real_rows.element_count() ? std::clamp<int64_t>(real_rows.typed_data()[0], 0, M) : M;
  std::fill(out->typed_data() + real * N, out->typed_data() + M * N, 0.0f);
  if (real == 0) return ffi::Error::Success();

  auto work = std::make_shared<Work>();
  work->x = x.typed_data();
  work->w = w.typed_data() + l * packed * K * kPanel;
  work->gated = gated;
  work->out = out->typed_data();
  work->M = real;
  work->K = K;
  work->N = N;
  work->panels = P;
  // Whole row range per panel when there are panels enough to keep the threads busy; else halve
  // the chunks (in multiples of the tile's rows) until there are.
  const int64_t threads = std::max<int64_t>(pool.num_threads(), 1);
  int64_t chunk = std::min(real, kMaxChunkRows);
  while (chunk > kRows && P * ((real + chunk - 1) / chunk) < kUnitsPerThread * threads) {
    chunk = std::max<int64_t>(kRows, (chunk / 2 + kRows - 1) / kRows * kRows);
  }
  work->chunk_rows = chunk;
  work->threads = threads;
  work->chunks = (real + chunk - 1) / chunk;

  const int64_t n = work->units();
  const int64_t helpers = std::min<int64_t>(threads, n) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([work] { work->Drain(); });
  work->Drain();
  while (work->done.load(std::memory_order_acquire) < n) std::this_thread::yield();
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxllmCpuMatmul, Matmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x [M, K]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // packed weights
                                  .Arg<ffi::Buffer<ffi::S32>>()  // layer index (scalar)
                                  .Arg<ffi::Buffer<ffi::S32>>()  // real rows (scalar)
                                  .Attr<bool>("gated")
                                  .Ret<ffi::Buffer<ffi::F32>>());  // [M, N]
