// Float32 matmul for the CPU, called from JAX through XLA's FFI: out [M, N] = x [M, K] @ W; and
// the same for bfloat16 x and W with float32 sums and results (the bfloat16 format, below).
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
//
// Calls of 64 rows or more take Intel AMX tiles where the CPU has them (the `amx` attribute, on
// by default; see the AMX section below): float32 products computed as six bfloat16 tile
// products, as accurate as the FMA path (tests/test_cpu_matmul.py); SmolLM2's 30 MLP layers ran
// 1.35x / 1.38x faster at 128 / 337 rows (benchmarks/cpu_kernels.py). A row's result never
// depends on the other rows, on either path.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cmath>
#include <cstring>
#include <memory>
#include <thread>

#include "cpu_simd.h"
#include "xla/ffi/api/ffi.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#define JAXLLM_CPU_AMX 1
#endif

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kPanel = 64;  // columns per panel: 4 vectors of 16 floats
constexpr int kRows = 6;        // rows per register tile: 6 x 4 accumulators of the 32 registers
constexpr int64_t kMaxChunkRows = 64;
constexpr int64_t kUnitsPerThread = 4;
constexpr int64_t kBlockK = 64;  // panel rows per pass: 16 KB, kept in L1 while every row tile uses them

#ifndef __AVX512F__
typedef float Vec8 __attribute__((vector_size(32), aligned(4), may_alias));
typedef int32_t Vec8i __attribute__((vector_size(32), aligned(4), may_alias));
inline Vec8 Load8(const float* p) { return *reinterpret_cast<const Vec8*>(p); }
inline void Store8(float* p, Vec8 v) { *reinterpret_cast<Vec8*>(p) = v; }
#endif

using jaxllm_cpu::ExpNonpositive;
using jaxllm_cpu::Vec16;
using jaxllm_cpu::Vec16i;

// A tile's R x 64 accumulators: zeros on a panel's first block, else c's partial sums; and back.
template <int R>
inline void LoadTile(Vec16 (&acc)[R][4], const float* c, bool first) {
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < 4; ++v) acc[r][v] = first ? Vec16{} : *reinterpret_cast<const Vec16*>(c + r * kPanel + 16 * v);
  }
}

template <int R>
inline void StoreTile(const Vec16 (&acc)[R][4], float* c) {
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < 4; ++v) *reinterpret_cast<Vec16*>(c + r * kPanel + 16 * v) = acc[r][v];
  }
}

// c[r, :] (+)= x[r, :kn] @ block for R rows: block is kn rows of a panel, c an [R, 64] tile (set
// on the first block, added to after), x rows ldx apart. Meanwhile `lines` cache lines from
// `prefetch` are requested, spread over the k loop: the block the row tiles will need next.
#ifdef __AVX512F__
template <int R>
void Tile(const float* x, int64_t ldx, int64_t kn, const float* block, float* c, bool first,
          const char* prefetch, int64_t lines) {
  Vec16 acc[R][4];
  LoadTile<R>(acc, c, first);
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
  StoreTile<R>(acc, c);
}
#else
// Without AVX-512 a Vec16 is two of AVX2's 16 ymm registers, and GCC keeps generic 64-byte
// vectors on the stack there: every FMA of the tile above read and wrote memory, and the kernel
// ran 10-15x slower than XLA's dot at 16-64 rows on an AVX2-only EPYC. This tile takes its 64
// columns 16 at a time in native 8-float vectors, four passes over the block (in L1 by then):
// R x 16 accumulators (12 ymm at R = 6), two weight vectors and the broadcast fit the registers.
// Each output's sum still runs over k in order: the same results as the AVX-512 tile.
template <int R>
void Tile(const float* x, int64_t ldx, int64_t kn, const float* block, float* c, bool first,
          const char* prefetch, int64_t lines) {
  const int64_t per_k = (lines + kn - 1) / kn;
  for (int v = 0; v < 4; ++v) {
    Vec8 acc[R][2];
    for (int r = 0; r < R; ++r) {
      for (int h = 0; h < 2; ++h) acc[r][h] = first ? Vec8{} : Load8(c + r * kPanel + 16 * v + 8 * h);
    }
    for (int64_t k = 0; k < kn; ++k) {
      if (v == 0) {
        for (int64_t i = k * per_k; i < std::min(lines, (k + 1) * per_k); ++i) __builtin_prefetch(prefetch + 64 * i, 0, 2);
      }
      const Vec8 w0 = Load8(block + k * kPanel + 16 * v), w1 = Load8(block + k * kPanel + 16 * v + 8);
      for (int r = 0; r < R; ++r) {
        const float xs = x[r * ldx + k];
        acc[r][0] += xs * w0;
        acc[r][1] += xs * w1;
      }
    }
    for (int r = 0; r < R; ++r) {
      for (int h = 0; h < 2; ++h) Store8(c + r * kPanel + 16 * v + 8 * h, acc[r][h]);
    }
  }
}
#endif

// The bfloat16 format: a panel row pair (w[2q][j], w[2q + 1][j]) for its 64 columns j, the
// even row's bits in the low half of each 32-bit lane, 128 uint16 per pair; x rows are bfloat16
// bits with an even K, so x[2q], x[2q + 1] is one 32-bit load. acc (+)= x pair . w pair per lane,
// products exact in float32 and summed in float32 (one rounding per product added). The units,
// blocks, prefetches and tiles are the float32 path's (a 64-pair block is 16 KB too), each
// vdpbf16ps doing two k steps: SmolLM2's 30 MLP layers ran 1.6-2.1x faster than the float32 path
// at 6-337 rows on a Zen 4 host (1.2x at 9 rows in the same run), and faster than torch's bfloat16
// matmuls at every row count (benchmarks/cpu_kernels.py). No AMX path (bf16 tiles would need no split, but it is untested).
#ifdef __AVX512BF16__
// vdpbf16ps: 32 multiply-adds per instruction where an FMA does 16.
inline void DotPair(Vec16& acc, uint32_t xp, Vec16i w) {
  acc = (Vec16)_mm512_dpbf16_ps((__m512)acc, (__m512bh)_mm512_set1_epi32(static_cast<int>(xp)), (__m512bh)w);
}
#else
// Without AVX512-BF16: both rows widened to float32 (a bfloat16 is a float32's high half), two FMAs.
inline void DotPair(Vec16& acc, uint32_t xp, Vec16i w) {
  float even, odd;
  const uint32_t even_bits = xp << 16, odd_bits = xp & 0xffff0000u;
  std::memcpy(&even, &even_bits, sizeof even);
  std::memcpy(&odd, &odd_bits, sizeof odd);
  acc += even * reinterpret_cast<Vec16>(w << 16);
  acc += odd * reinterpret_cast<Vec16>(w & static_cast<int32_t>(0xffff0000u));
}
#endif

// Tile over a bfloat16 block: kn (even) panel rows as kn / 2 pair rows.
#ifdef __AVX512F__
template <int R>
void Tile(const uint16_t* x, int64_t ldx, int64_t kn, const uint16_t* block, float* c, bool first,
          const char* prefetch, int64_t lines) {
  Vec16 acc[R][4];
  LoadTile<R>(acc, c, first);
  const int64_t pairs = kn / 2, per_q = (lines + pairs - 1) / pairs;
  for (int64_t q = 0; q < pairs; ++q) {
    for (int64_t i = q * per_q; i < std::min(lines, (q + 1) * per_q); ++i) __builtin_prefetch(prefetch + 64 * i, 0, 2);
    const Vec16i* row = reinterpret_cast<const Vec16i*>(block + q * 2 * kPanel);
    const Vec16i w0 = row[0], w1 = row[1], w2 = row[2], w3 = row[3];
    for (int r = 0; r < R; ++r) {
      uint32_t xp;
      std::memcpy(&xp, x + r * ldx + 2 * q, sizeof xp);
      DotPair(acc[r][0], xp, w0);
      DotPair(acc[r][1], xp, w1);
      DotPair(acc[r][2], xp, w2);
      DotPair(acc[r][3], xp, w3);
    }
  }
  StoreTile<R>(acc, c);
}
#else
// AVX2: 16 columns at a time in 8-float vectors, as the float32 tile above.
inline void DotPair8(Vec8& acc, uint32_t xp, Vec8i w) {
  float even, odd;
  const uint32_t even_bits = xp << 16, odd_bits = xp & 0xffff0000u;
  std::memcpy(&even, &even_bits, sizeof even);
  std::memcpy(&odd, &odd_bits, sizeof odd);
  acc += even * reinterpret_cast<Vec8>(w << 16);
  acc += odd * reinterpret_cast<Vec8>(w & static_cast<int32_t>(0xffff0000u));
}

template <int R>
void Tile(const uint16_t* x, int64_t ldx, int64_t kn, const uint16_t* block, float* c, bool first,
          const char* prefetch, int64_t lines) {
  const int64_t pairs = kn / 2, per_q = (lines + pairs - 1) / pairs;
  for (int v = 0; v < 4; ++v) {
    Vec8 acc[R][2];
    for (int r = 0; r < R; ++r) {
      for (int h = 0; h < 2; ++h) acc[r][h] = first ? Vec8{} : Load8(c + r * kPanel + 16 * v + 8 * h);
    }
    for (int64_t q = 0; q < pairs; ++q) {
      if (v == 0) {
        for (int64_t i = q * per_q; i < std::min(lines, (q + 1) * per_q); ++i) __builtin_prefetch(prefetch + 64 * i, 0, 2);
      }
      // A pair row is 128 uint16: 64 32-bit lanes, one per column; columns 16v.. are lanes 16v..
      const uint16_t* row = block + q * 2 * kPanel + 2 * 16 * v;
      const Vec8i w0 = *reinterpret_cast<const Vec8i*>(row), w1 = *reinterpret_cast<const Vec8i*>(row + 16);
      for (int r = 0; r < R; ++r) {
        uint32_t xp;
        std::memcpy(&xp, x + r * ldx + 2 * q, sizeof xp);
        DotPair8(acc[r][0], xp, w0);
        DotPair8(acc[r][1], xp, w1);
      }
    }
    for (int r = 0; r < R; ++r) {
      for (int h = 0; h < 2; ++h) Store8(c + r * kPanel + 16 * v + 8 * h, acc[r][h]);
    }
  }
}
#endif

// c [rows, 64] = x[:rows] @ panel (rows <= kMaxChunkRows). The panel is taken block_k rows at a
// time, each block used by every row tile while in L1, and while they run they prefetch the next
// block (of this panel, or `next`'s first) from memory into L2.
// T: float, or uint16_t for the bfloat16 format (block_k even; offsets in elements are the same,
// a pair row being two panel rows).
template <typename T>
void Product(const T* x, int64_t rows, int64_t K, const T* panel, const T* next, int64_t block_k, float* c) {
  const int64_t tiles = (rows + kRows - 1) / kRows;
  for (int64_t kb = 0; kb < K; kb += block_k) {
    const int64_t kn = std::min(block_k, K - kb);
    const bool inside = kb + block_k < K;
    const T* ahead = inside ? panel + (kb + block_k) * kPanel : next;
    const int64_t ahead_rows = inside ? std::min(block_k, K - kb - block_k) : (next ? std::min(block_k, K) : 0);
    const int64_t lines = ahead_rows * kPanel * sizeof(T) / 64, per_tile = (lines + tiles - 1) / tiles;
    for (int64_t t = 0; t < tiles; ++t) {
      const int64_t m = t * kRows, n = std::min<int64_t>(kRows, rows - m);
      const char* pf = reinterpret_cast<const char*>(ahead) + 64 * t * per_tile;
      const int64_t pf_lines = std::max<int64_t>(0, std::min(per_tile, lines - t * per_tile));
      const T* xm = x + m * K + kb;
      const T* block = panel + kb * kPanel;
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

#ifdef JAXLLM_CPU_AMX
// ---- AMX: float32 products as six bfloat16 products (bf16x6) --------------------------------
//
// Intel's AMX tiles multiply bfloat16 pairs and accumulate in float32: one tile product is
// 16 x 16 x 32 multiply-adds every 16 cycles, 16x the 64 float32 flops per cycle of two AVX-512
// FMA units. A float32 v is split exactly into three bfloat16 pieces, v = h + m + l (each takes
// the next 8 bits of v's 24-bit significand), and x . w is summed as
// xh.wh + xh.wm + xm.wh + xh.wl + xm.wm + xl.wh: the three dropped cross terms are below 2^-22 of
// each product, under float32's own rounding of the running sum, so the result is a float32
// product (measured error against float64 below the in-order float32 sum's; tests assert it). It
// is how XLA's TPU backend computes float32 matmuls at Precision.HIGHEST.
//
// The weights stay the float32 panels above, split per panel into the tiles' pair-interleaved
// layout (by truncation, exact: a mask and a subtraction per piece, a shift and an or per pair of
// rows), a slice between each k block's tile products of the panel before, so that the split's
// vector work runs while the tile unit multiplies;
// x is split once per call (rounded, which halves the pieces' magnitudes) into row-major bfloat16
// copies. An inf in x gives NaN here (inf - inf in the split) where the FMA path gives inf.
// Tiles: 0-3 hold a 32 x 32 block of the result, 4-5 x's two 16-row tiles, 6-7 the weights' two
// 16-column tiles.
#define JAXLLM_AMX_TARGET __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw")))

constexpr int64_t kAmxRows = 32;      // result rows per register block
constexpr int64_t kAmxK = 32;         // k per tile (16 pairs)
constexpr int64_t kTileElems = 512;   // bfloat16s per 1 KB tile
// Fewer rows take the FMA path: each call splits every panel it reads, a cost small calls cannot
// amortize, and blocks are padded to 32 rows. In the engine's decode steps
// (benchmarks/step_profile.py --only-breakdown with this set to 32, then 64, back to back) AMX
// made the whole step 33% / 18% / 9% slower at 33 / 41 / 49 sequences and no faster at 57.
constexpr int64_t kAmxMinRows = 64;

// CPUID says AMX-TILE, AMX-BF16 and AVX-512BW, and Linux lets this process use the tile state.
bool AmxUsable() {
  static const bool usable = [] {
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    const bool cpu = (d >> 24 & 1) && (d >> 22 & 1) && (b >> 16 & 1) && (b >> 30 & 1);
    constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;  // asm/prctl.h
    return cpu && syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return usable;
}

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t bytes_per_row[16] = {};
  uint8_t rows[16] = {};
};

JAXLLM_AMX_TARGET void StartTiles() {
  TileConfig config;
  for (int t = 0; t < 8; ++t) config.bytes_per_row[t] = 64, config.rows[t] = 16;
  _tile_loadconfig(&config);
}

JAXLLM_AMX_TARGET void StopTiles() { _tile_release(); }

// v's lanes rounded to the nearest bfloat16 (ties to even), as float32 bit patterns.
JAXLLM_AMX_TARGET inline __m512i RoundToBf16(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i up = _mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff)));
  return _mm512_and_si512(up, _mm512_set1_epi32(static_cast<int>(0xffff0000u)));
}

// Rows [r0, r1) of x [M, K] as three bfloat16 pieces, each [Mp, Kp] row-major at xs + s * piece;
// rows >= M and columns >= K are zeros.
JAXLLM_AMX_TARGET void SplitRows(const float* x, int64_t M, int64_t K, int64_t Kp, int64_t r0, int64_t r1,
                                 uint16_t* xs, int64_t piece) {
  for (int64_t r = r0; r < r1; ++r) {
    for (int64_t k = 0; k < Kp; k += 16) {
      const __mmask16 mask = r >= M || k >= K ? 0 : k + 16 <= K ? 0xffff : (1u << (K - k)) - 1;
      __m512 v = _mm512_maskz_loadu_ps(mask, x + r * K + k);
      for (int s = 0; s < 3; ++s) {
        const __m512i h = RoundToBf16(v);
        v = _mm512_sub_ps(v, _mm512_castsi512_ps(h));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(xs + s * piece + r * Kp + k),
                            _mm512_cvtepi32_epi16(_mm512_srli_epi32(h, 16)));
      }
    }
  }
}

// A panel [K, 64] as tiles: for each 32-row k block, piece s and 16-column group c, the 1 KB tile
// at bs + ((kb * 3 + s) * 4 + c) * 512 whose row p holds (w[2p][j], w[2p + 1][j]) for the group's
// 16 columns j. Rows past K are zeros. Pair rows q = 16 * kb + p in [q0, q1) are written.
JAXLLM_AMX_TARGET void SplitPairRows(const float* panel, int64_t K, int64_t q0, int64_t q1, uint16_t* bs) {
  const __m512i high = _mm512_set1_epi32(static_cast<int>(0xffff0000u));
  for (int64_t q = q0; q < q1; ++q) {
    const int64_t k = 2 * q;
    uint16_t* row = bs + (q / 16 * 12) * kTileElems + q % 16 * 32;
    for (int c = 0; c < 4; ++c) {
      __m512i pieces[2][3];  // by truncation: each piece's low 16 bits are zero
      for (int i = 0; i < 2; ++i) {
        __m512 v = k + i < K ? _mm512_loadu_ps(panel + (k + i) * kPanel + 16 * c) : _mm512_setzero_ps();
        for (int s = 0; s < 2; ++s) {  // the remainder keeps the low bits exactly
          pieces[i][s] = _mm512_and_si512(_mm512_castps_si512(v), high);
          v = _mm512_sub_ps(v, _mm512_castsi512_ps(pieces[i][s]));
        }
        pieces[i][2] = _mm512_castps_si512(v);  // at most 8 significant bits left: exact
      }
      // Lane j: the even row's bfloat16 in the low word, the odd row's in the high word.
      for (int s = 0; s < 3; ++s) {
        const __m512i pair = _mm512_or_si512(pieces[1][s], _mm512_srli_epi32(pieces[0][s], 16));
        _mm512_storeu_si512(row + (s * 4 + c) * kTileElems, pair);
      }
    }
  }
}

// Splits a panel a slice at a time, between the tile products of the panel before it: the tiles
// run on their own unit, so the split's vector work overlaps them.
struct Splitter {
  const float* panel;
  int64_t K, done = 0, total, per_step;
  uint16_t* bs;

  Splitter(const float* panel, int64_t K, int64_t Kp, uint16_t* bs, int64_t steps)
      : panel(panel), K(K), total(panel ? Kp / 2 : 0), per_step((Kp / 2 + steps - 1) / steps), bs(bs) {}

  JAXLLM_AMX_TARGET void Step() {
    const int64_t end = std::min(total, done + per_step);
    if (done < end) SplitPairRows(panel, K, done, end, bs);
    done = end;
  }
  JAXLLM_AMX_TARGET void Finish() {
    if (done < total) SplitPairRows(panel, K, done, total, bs);
    done = total;
  }
};

// Tiles 0-3 = rows [r, r + 32) of x (pieces at xs) @ the panel's columns [32 * half, + 32) (split
// at bs), over Kp / 32 k blocks, a step of `split` per block. Per block: x's high piece
// against the weights' low, middle and high pieces, then x's low and middle pieces against the
// weights' high (still loaded), and x's middle against the weights' middle: 14 tile loads for 24
// products.
JAXLLM_AMX_TARGET void AmxBlock(const uint16_t* xs, int64_t piece, int64_t Kp, int64_t r, const uint16_t* bs,
                                int half, Splitter& split) {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  const int64_t kblocks = Kp / kAmxK, stride = Kp * 2;
  const auto products = [] {
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  };
  for (int64_t kb = 0; kb < kblocks; ++kb) {
    const uint16_t* a = xs + r * Kp + kb * kAmxK;
    const uint16_t* b = bs + (kb * 12 + 2 * half) * kTileElems;
    _tile_loadd(4, a, stride);
    _tile_loadd(5, a + 16 * Kp, stride);
    for (int sb = 2; sb >= 0; --sb) {
      _tile_loadd(6, b + sb * 4 * kTileElems, 64);
      _tile_loadd(7, b + (sb * 4 + 1) * kTileElems, 64);
      products();
    }
    for (int sa = 2; sa >= 1; --sa) {
      _tile_loadd(4, a + sa * piece, stride);
      _tile_loadd(5, a + sa * piece + 16 * Kp, stride);
      products();
    }
    _tile_loadd(6, b + 4 * kTileElems, 64);
    _tile_loadd(7, b + 5 * kTileElems, 64);
    products();
    split.Step();
  }
}

// The 32 x 32 result block in tiles 0-3 to c (row stride ldc floats).
JAXLLM_AMX_TARGET void StoreBlock(float* c, int64_t ldc) {
  const int64_t stride = ldc * sizeof(float);
  _tile_stored(0, c, stride);
  _tile_stored(1, c + 16, stride);
  _tile_stored(2, c + 16 * ldc, stride);
  _tile_stored(3, c + 16 * ldc + 16, stride);
}
#else
bool AmxUsable() { return false; }
#endif

// silu(g) * u, the sigmoid taken from e^-|g| so that nothing overflows.
inline Vec16 SiluTimes(Vec16 g, Vec16 u) {
  const Vec16 zero = Vec16{}, one = zero + 1.0f;
  const Vec16 t = ExpNonpositive(g < zero ? g : -g);
  return g * ((g >= zero ? one : t) / (one + t)) * u;
}

// Per-thread scratch that grows to the largest request and is kept (64-byte aligned).
class Scratch {
 public:
  ~Scratch() { std::free(data_); }
  void* Get(size_t bytes) {
    if (bytes > size_) {
      std::free(data_);
      size_ = (bytes + 63) / 64 * 64;
      data_ = std::aligned_alloc(64, size_);
    }
    return data_;
  }

 private:
  void* data_ = nullptr;
  size_t size_ = 0;
};

// Shared by the calling thread and the pool tasks (see cpu_paged_attention.cc's Work).
struct Work {
  const void* x;  // float, or bfloat16 bits (uint16_t) when bf16
  const void* w;  // float32 panels, or bfloat16 pair panels when bf16
  bool bf16 = false;
  float* out;
  int64_t M, K, N, panels, chunk_rows, chunks, threads;
  bool gated;  // packed panels come in (gate, up) pairs; out = silu(x @ gate) * (x @ up)
  // The AMX path: x's bfloat16 pieces [3, Mp, Kp] (rows and k padded to 32), made by the
  // threads 32 rows at a time before any unit starts.
  bool amx = false;
  uint16_t* xs = nullptr;
  int64_t Mp = 0, Kp = 0;
  std::atomic<int64_t> next_rows{0};
  std::atomic<int64_t> rows_done{0};
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};

  int64_t units() const { return panels * chunks; }

  void Drain() {
#ifdef JAXLLM_CPU_AMX
    if (amx) return DrainAmx();
#endif
    if (bf16) return DrainFma(static_cast<const uint16_t*>(x), static_cast<const uint16_t*>(w));
    DrainFma(static_cast<const float*>(x), static_cast<const float*>(w));
  }

  template <typename T>
  void DrainFma(const T* x, const T* w) {
    const int64_t n = units();
    for (int64_t u = next.fetch_add(1); u < n; u = next.fetch_add(1)) {
      const int64_t p = u / chunks, first = (u % chunks) * chunk_rows;
      const int64_t rows = std::min(chunk_rows, M - first);
      const int64_t cols = std::min(kPanel, N - p * kPanel), width = gated ? 2 : 1;
      // The unit this thread most likely takes next (threads take turns at the counter): its
      // panel is prefetched, unless it is this one.
      const int64_t guess = u + threads, next_panel = guess / chunks;
      const T* next = guess < n && next_panel != p ? w + next_panel * width * K * kPanel : nullptr;
      const T* panel = w + p * width * K * kPanel;
      const int64_t block_k = M <= 64 ? kBlockK : K;
      const T* xs = x + first * K;
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

#ifdef JAXLLM_CPU_AMX
  void DrainAmx() {  // float32 operands only (Plan)
    const float* x = static_cast<const float*>(this->x);
    const float* w = static_cast<const float*>(this->w);
    const int64_t row_blocks = Mp / kAmxRows, piece = Mp * Kp;
    for (int64_t b = next_rows.fetch_add(1); b < row_blocks; b = next_rows.fetch_add(1)) {
      SplitRows(x, M, K, Kp, b * kAmxRows, (b + 1) * kAmxRows, xs, piece);
      rows_done.fetch_add(1, std::memory_order_release);
    }
    while (rows_done.load(std::memory_order_acquire) < row_blocks) std::this_thread::yield();

    // A job is one panel of a unit (gated units: the gate's, then the up's). While a job's tile
    // products run, the next job's panel is split into the other tile buffer. (Prefetching the
    // panel after that into L2 as well made the MLP layers slower: the split's own reads and
    // the tile loads already fill L2's bandwidth.)
    static thread_local Scratch tiles_scratch[2], gate_scratch;
    const size_t tile_bytes = Kp / kAmxK * 12 * kTileElems * sizeof(uint16_t);
    uint16_t* buffers[2] = {static_cast<uint16_t*>(tiles_scratch[0].Get(tile_bytes)),
                            static_cast<uint16_t*>(tiles_scratch[1].Get(tile_bytes))};
    float* gate = gated ? static_cast<float*>(gate_scratch.Get(chunk_rows * kPanel * sizeof(float))) : nullptr;
    const int64_t n = units(), width = gated ? 2 : 1;
    const auto panel_of = [&](int64_t u, int64_t pass) {
      return u < n ? w + ((u / chunks) * width + pass) * K * kPanel : nullptr;
    };
    int64_t u = next.fetch_add(1), pass = 0;
    if (u >= n) return;
    StartTiles();
    int cur = 0;
    Splitter(panel_of(u, 0), K, Kp, buffers[cur], 1).Finish();
    while (u < n) {
      int64_t u1 = u, pass1 = pass + 1;
      if (pass1 == width) u1 = next.fetch_add(1), pass1 = 0;
      const float* panel = panel_of(u, pass), *following = panel_of(u1, pass1);
      const bool same = following == panel;  // row chunks of one panel: split once
      const int64_t p = u / chunks, first = (u % chunks) * chunk_rows;
      const int64_t rows = std::min(chunk_rows, M - first), blocks = (rows + kAmxRows - 1) / kAmxRows;
      const int64_t cols = std::min(kPanel, N - p * kPanel), halves = (cols + 31) / 32;
      const bool last = pass == width - 1;
      const int64_t steps = Kp / kAmxK * blocks * halves;
      Splitter split(same ? nullptr : following, K, Kp, buffers[1 - cur], steps);
      for (int64_t b = 0; b < blocks; ++b) {
        const int64_t r = first + b * kAmxRows, real = std::min(kAmxRows, M - r);
        for (int64_t half = 0; half < halves; ++half) {
          AmxBlock(xs, piece, Kp, r, buffers[cur], half, split);
          const int64_t col = p * kPanel + 32 * half, real_cols = std::min<int64_t>(32, cols - 32 * half);
          if (gated && !last) {
            StoreBlock(gate + b * kAmxRows * kPanel + 32 * half, kPanel);
            continue;
          }
          alignas(64) float c[kAmxRows * 32];
          if (!gated && real == kAmxRows && real_cols == 32) {
            StoreBlock(out + r * N + col, N);
            continue;
          }
          StoreBlock(c, 32);
          for (int64_t i = 0; i < real; ++i) {
            float* ci = c + i * 32;
            if (gated) {
              const float* gi = gate + (b * kAmxRows + i) * kPanel + 32 * half;
              for (int v = 0; v < 2; ++v) {
                jaxllm_cpu::Store16(ci + 16 * v, SiluTimes(jaxllm_cpu::Load16(gi + 16 * v), jaxllm_cpu::Load16(ci + 16 * v)));
              }
            }
            std::memcpy(out + (r + i) * N + col, ci, real_cols * sizeof(float));
          }
        }
      }
      split.Finish();
      if (last) done.fetch_add(1, std::memory_order_release);
      if (!same) cur = 1 - cur;
      u = u1, pass = pass1;
    }
    StopTiles();
  }
#endif
};

// How a call's work is cut into units (its M, K, N, panels and gated set): rows per chunk, and
// whether the AMX path runs (then x's pieces are laid out in this thread's scratch).
void Plan(Work& work, int64_t threads, bool amx) {
  const int64_t real = work.M, P = work.panels;
  // Whole row range per panel when there are panels enough to keep the threads busy; else halve
  // the chunks (in multiples of the tile's rows) until there are.
  int64_t chunk = std::min(real, kMaxChunkRows);
  while (chunk > kRows && P * ((real + chunk - 1) / chunk) < kUnitsPerThread * threads) {
    chunk = std::max<int64_t>(kRows, (chunk / 2 + kRows - 1) / kRows * kRows);
  }
  work.threads = threads;
#ifdef JAXLLM_CPU_AMX
  static thread_local Scratch pieces_scratch;
  if (amx && !work.bf16 && real >= kAmxMinRows && AmxUsable()) {
    work.amx = true;
    work.Mp = (real + kAmxRows - 1) / kAmxRows * kAmxRows;
    work.Kp = (work.K + kAmxK - 1) / kAmxK * kAmxK;
    work.xs = static_cast<uint16_t*>(pieces_scratch.Get(3 * work.Mp * work.Kp * sizeof(uint16_t)));
    // Whole row range per panel (each panel split once per call), in 32-row multiples, halved
    // down to 64 rows while there are too few units to keep the threads busy.
    chunk = work.Mp;
    while (chunk > 2 * kAmxRows && P * ((real + chunk - 1) / chunk) < kUnitsPerThread * threads) {
      chunk = (chunk / 2 + kAmxRows - 1) / kAmxRows * kAmxRows;
    }
  }
#endif
  work.chunk_rows = chunk;
  work.chunks = (real + chunk - 1) / chunk;
}

// out [M, N] = x [M, K] @ the packed weights at `layer`: dims of x, w (its last axis `row`
// elements: 64 float32 or 128 bfloat16 per panel row (pair)), out, checked here.
ffi::Error Run(ffi::ThreadPool& pool, const void* x, ffi::Span<const int64_t> xd, const void* w,
               ffi::Span<const int64_t> wd, ffi::Buffer<ffi::S32>& layer, ffi::Buffer<ffi::S32>& real_rows, bool gated,
               bool amx, bool bf16, ffi::ResultBuffer<ffi::F32>& out) {
  const auto od = out->dimensions();
  const int64_t row = bf16 ? 2 * kPanel : kPanel;
  if (xd.size() != 2 || od.size() != 2 || (wd.size() != 3 && wd.size() != 4) || wd[wd.size() - 1] != row) {
    return ffi::Error::InvalidArgument(bf16 ? "cpu matmul: x must be [M, K], the weights [P, K / 2, 128] or "
                                              "[L, P, K / 2, 128] (bfloat16 pairs), the result [M, N]"
                                            : "cpu matmul: x must be [M, K], the weights [P, K, 64] or "
                                              "[L, P, K, 64], the result [M, N]");
  }
  const int64_t M = xd[0], K = xd[1], N = od[1];
  const int64_t packed = wd[wd.size() - 3], num_layers = wd.size() == 4 ? wd[0] : 1;
  const int64_t P = gated ? packed / 2 : packed;  // output panels
  const int64_t packed_k = bf16 ? 2 * wd[wd.size() - 2] : wd[wd.size() - 2];
  if ((gated && packed % 2 != 0) || packed_k != K || od[0] != M || N <= (P - 1) * kPanel || N > P * kPanel) {
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
  work->x = x;
  const size_t element = bf16 ? sizeof(uint16_t) : sizeof(float);  // a panel is K * 64 elements in both
  work->w = static_cast<const char*>(w) + l * packed * K * kPanel * element;
  work->bf16 = bf16;
  work->gated = gated;
  work->out = out->typed_data();
  work->M = real;
  work->K = K;
  work->N = N;
  work->panels = P;
  Plan(*work, std::max<int64_t>(pool.num_threads(), 1), amx);

  const int64_t n = work->units();
  const int64_t helpers = std::min<int64_t>(work->threads, n) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([work] { work->Drain(); });
  work->Drain();
  while (work->done.load(std::memory_order_acquire) < n) std::this_thread::yield();
  return ffi::Error::Success();
}

ffi::Error Matmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                  ffi::Buffer<ffi::S32> layer, ffi::Buffer<ffi::S32> real_rows, bool gated, bool amx,
                  ffi::ResultBuffer<ffi::F32> out) {
  return Run(pool, x.typed_data(), x.dimensions(), w.typed_data(), w.dimensions(), layer, real_rows, gated, amx,
             false, out);
}

ffi::Error MatmulBf16(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> x, ffi::Buffer<ffi::U16> w,
                      ffi::Buffer<ffi::S32> layer, ffi::Buffer<ffi::S32> real_rows, bool gated,
                      ffi::ResultBuffer<ffi::F32> out) {
  if (x.dimensions().size() == 2 && x.dimensions()[1] % 2 != 0) {
    return ffi::Error::InvalidArgument("cpu matmul: bfloat16 x needs an even K (pad it with a zero column)");
  }
  return Run(pool, x.untyped_data(), x.dimensions(), w.typed_data(), w.dimensions(), layer, real_rows, gated, false,
             true, out);
}

}  // namespace

// 1 when the AMX path can run in this process (see AmxUsable), for Python to report.
extern "C" int JaxllmCpuMatmulAmxUsable() { return AmxUsable() ? 1 : 0; }

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxllmCpuMatmul, Matmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x [M, K]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // packed weights
                                  .Arg<ffi::Buffer<ffi::S32>>()  // layer index (scalar)
                                  .Arg<ffi::Buffer<ffi::S32>>()  // real rows (scalar)
                                  .Attr<bool>("gated")
                                  .Attr<bool>("amx")
                                  .Ret<ffi::Buffer<ffi::F32>>());  // [M, N]

// The bfloat16 format (cpu_matmul.py's pack of a bfloat16 weight): float32 results.
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxllmCpuMatmulBf16, MatmulBf16,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()  // x [M, K], K even
                                  .Arg<ffi::Buffer<ffi::U16>>()   // packed pairs [(L,) P, K / 2, 128]
                                  .Arg<ffi::Buffer<ffi::S32>>()   // layer index (scalar)
                                  .Arg<ffi::Buffer<ffi::S32>>()   // real rows (scalar)
                                  .Attr<bool>("gated")
                                  .Ret<ffi::Buffer<ffi::F32>>());  // [M, N]
