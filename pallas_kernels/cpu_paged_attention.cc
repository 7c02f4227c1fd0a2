// Paged attention on the CPU: the engine's "cpu" attention backend, an XLA FFI custom call.
//
// Why a C++ kernel: under XLA:CPU the xla backend gathers each token's cached blocks into a
// buffer and scores them in elementwise multiply-reduce fusions, which run an order of magnitude
// below this machine's vector rate (benchmarks/step_profile.py). This kernel reads the pool in
// place, block by block, with an online softmax, the way the Pallas kernels do on GPU.
//
// Semantics are those of jaxllm.models.attention.xla_paged_attention: token t of sequence s
// (cu_q_lens[s] <= t < cu_q_lens[s + 1]) attends to the keys of s at positions 0..positions[t]
// (and > positions[t] - sliding_window when sliding_window > 0); key position p lives in block
// block_tables[s, p / block_size] at offset p % block_size of `layer`. This step's K/V are already
// in the pool. Rows of padding tokens (t >= cu_q_lens[S]) are zeros.
//
// Work is split into units of (sequence, tile of up to kTileTokens of its tokens, kv heads: all of
// them, so a block's slot rows are read whole, or one each when there are too few tiles to keep
// the threads busy). A unit keeps the tile's query rows in a scratch buffer and streams the union
// of its tokens' key ranges once: each block's keys are scored for every row whose range covers
// them, then folded into that row's running max, sum and output. Units are handed out, longest
// first, through an atomic counter to the calling thread and to tasks on XLA's intra-op pool.
// With head dims of 64 or 128 and blocks of a multiple of 16 slots (RunUnitChunked), keys are
// taken 16 at a time: each key row is loaded (and a bfloat16 or quantised one converted) once for
// all the rows scored against it, and the 16 scores of a row are summed across lanes together
// (SumLanes16), not one tree per score. Other shapes take the plain per-key loop (RunUnit).
//
// A float32 pool's decode steps are bound by reading the pool (the K/V of every cached token,
// every layer, from blocks anywhere in memory): the same call runs about twice as fast when its
// blocks are already in cache. A bfloat16 pool halves the bytes, and prefill is arithmetic.
// benchmarks/cpu_kernels.py measures both cases on both pools.
//
// Pools: float32 or bfloat16 values (or uint16: bfloat16 bits, a bfloat16 model's pool on CPU);
// or int8 / uint8 (float8_e4m3fn bits) values with a float32 scale per (layer, block, slot, kv
// head), multiplied into the scores and the value weights.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>

#include "cpu_simd.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using jaxllm_cpu::ExpNonpositive;
using jaxllm_cpu::Vec16;
using jaxllm_cpu::Vec16i;

constexpr int64_t kTileTokens = 8;      // tokens of one sequence per unit (prefill chunks)
constexpr int64_t kUnitsPerThread = 4;  // fewer (sequence, tile) pairs per thread: split kv heads
constexpr float kNoScore = -3.0e38f;    // a finite "minus infinity": a row's max before any key

// float8_e4m3fn bit patterns -> float: 1 sign, 4 exponent (bias 7), 3 mantissa bits; no infinity,
// S.1111.111 is NaN.
struct Fp8Table {
  float value[256];
  Fp8Table() {
    for (int b = 0; b < 256; ++b) {
      const int exponent = (b >> 3) & 15, mantissa = b & 7;
      float magnitude;
      if (exponent == 15 && mantissa == 7) {
        magnitude = NAN;
      } else if (exponent == 0) {
        magnitude = std::ldexp(mantissa / 8.0f, -6);
      } else {
        magnitude = std::ldexp(1.0f + mantissa / 8.0f, exponent - 7);
      }
      value[b] = (b & 128) ? -magnitude : magnitude;
    }
  }
};
const Fp8Table kFp8;

struct Bf16 {
  uint16_t bits;
};

inline float to_float(float x) { return x; }
inline float to_float(int8_t x) { return static_cast<float>(x); }
inline float to_float(uint8_t x) { return kFp8.value[x]; }
inline float to_float(Bf16 x) {
  const uint32_t bits = static_cast<uint32_t>(x.bits) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}


typedef uint16_t U16x16 __attribute__((vector_size(32), aligned(2), may_alias));

template <typename V>
inline Vec16 Load16(const V* x) {
  if constexpr (std::is_same_v<V, float>) {
    return jaxllm_cpu::Load16(x);
  } else if constexpr (std::is_same_v<V, Bf16>) {
    // bfloat16 bits are a float's top half: widen and shift, 16 lanes at once (the scalar
    // to_float loop below compiles to one lane at a time, which made a bfloat16 pool slower to
    // score than a float32 one of twice the bytes).
    const U16x16 bits = *reinterpret_cast<const U16x16*>(x);
    return reinterpret_cast<Vec16>(__builtin_convertvector(bits, Vec16i) << 16);
  } else {
    Vec16 out;
    for (int l = 0; l < 16; ++l) out[l] = to_float(x[l]);
    return out;
  }
}

typedef float Vec8 __attribute__((vector_size(32)));
typedef float Vec4 __attribute__((vector_size(16)));

// Sum of the lanes as a tree (halves added pairwise), not a chain of 15 dependent adds.
inline float Sum16(Vec16 x) {
  const Vec8 a = __builtin_shufflevector(x, x, 0, 1, 2, 3, 4, 5, 6, 7) +
                 __builtin_shufflevector(x, x, 8, 9, 10, 11, 12, 13, 14, 15);
  const Vec4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  return (b[0] + b[2]) + (b[1] + b[3]);
}

// Max of the lanes, as a tree.
inline float Max16(Vec16 x) {
  const Vec8 a = __builtin_shufflevector(x, x, 0, 1, 2, 3, 4, 5, 6, 7);
  const Vec8 b = __builtin_shufflevector(x, x, 8, 9, 10, 11, 12, 13, 14, 15);
  const Vec8 m8 = a > b ? a : b;
  const Vec4 c = __builtin_shufflevector(m8, m8, 0, 1, 2, 3), d = __builtin_shufflevector(m8, m8, 4, 5, 6, 7);
  const Vec4 m4 = c > d ? c : d;
  return std::max(std::max(m4[0], m4[1]), std::max(m4[2], m4[3]));
}

struct Problem {
  const float* q;  // [T, N, H]
  const void* k;   // [L, NB, BS, K, H]
  const void* v;
  const float* k_scale;  // [L, NB, BS, K] or null
  const float* v_scale;
  const int32_t* positions;     // [T]
  const int32_t* block_tables;  // [S, B]
  const int32_t* cu_q_lens;     // [S + 1]
  float* out;                   // [T, N, H]
  int64_t T, N, H, K, G, L, NB, BS, S, B;
  int64_t layer, window;
  float scale;
};

struct Unit {
  int64_t seq, first, last;     // tokens first..last-1 of the flat batch
  int64_t head_begin, head_end;  // kv heads
  int64_t cost;                  // tokens x keys x heads the unit reads, to hand out the long ones first
};

// The next block's bytes, requested from memory into L2 a few lines at a time while the current
// block is scored (Step, once per key and query row). Blocks lie anywhere in the pool, so the
// hardware prefetcher cannot guess them. Asking for all of a block's lines at once (~400 for
// SmolLM2) into L1 stalled the core on its full miss queue and evicted the block being read:
// spread out and into L2, decode attention took 0.86 instead of 1.24 ms per call from memory
// (benchmarks/cpu_kernels.py, 2-core Zen 4), decode steps 5-10% less. Always inlined: as a
// function of its own GCC finds it has no side effects and drops the call.
struct Prefetcher {
  const char* k = nullptr;
  const char* v = nullptr;
  int64_t offset = 0, end = 0, step = 0;  // bytes

  // Block `phys` (skipped if outside the pool: reported when reached) for kv heads
  // [head_begin, head_end), spread over `steps` calls of Step.
  template <typename V>
  __attribute__((always_inline)) inline void Start(const Problem& p, int64_t phys, int64_t head_begin,
                                                   int64_t head_end, const V* k_pool, const V* v_pool, int64_t steps) {
    Finish();
    if (phys < 0 || phys >= p.NB) return;
    const int64_t at = (p.layer * p.NB + phys) * p.BS * p.K + head_begin;
    k = reinterpret_cast<const char*>(k_pool + at * p.H);
    v = reinterpret_cast<const char*>(v_pool + at * p.H);
    offset = 0;
    end = ((p.BS - 1) * p.K + head_end - head_begin) * p.H * static_cast<int64_t>(sizeof(V));
    step = ((end + 63) / 64 + steps - 1) / steps * 64;
  }
  __attribute__((always_inline)) inline void Step() { Upto(std::min(offset + step, end)); }
  __attribute__((always_inline)) inline void Finish() { Upto(end); }

 private:
  __attribute__((always_inline)) inline void Upto(int64_t stop) {
    for (; offset < stop; offset += 64) {
      __builtin_prefetch(k + offset, 0, 2);
      __builtin_prefetch(v + offset, 0, 2);
    }
  }
};

// Online softmax of one query row over scores w[ja..jb]: they become weights e^(s - peak) (other
// entries of w keep their scores), and the row's running max, sum and output rescale when its max
// rises. w must be readable 16 floats at a time from ja rounded down to a multiple of 16.
inline void SoftmaxUpdate(float* w, int64_t ja, int64_t jb, int64_t H, float& peak, float& total, float* acc) {
  const Vec16i lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  const Vec16 no_score = Vec16{} + kNoScore, zero = Vec16{};
  const int64_t c0 = ja - ja % 16;
  Vec16 maxes = no_score;
  for (int64_t c = c0; c <= jb; c += 16) {
    const Vec16i key = lane + static_cast<int32_t>(c);
    const Vec16i live = (key >= static_cast<int32_t>(ja)) & (key <= static_cast<int32_t>(jb));
    const Vec16 s = Load16(w + c);
    maxes = live ? (s > maxes ? s : maxes) : maxes;
  }
  const float new_peak = std::max(peak, Max16(maxes));
  const float rescale = ExpNonpositive(peak - new_peak);
  Vec16 totals = zero;
  for (int64_t c = c0; c <= jb; c += 16) {
    const Vec16i key = lane + static_cast<int32_t>(c);
    const Vec16i live = (key >= static_cast<int32_t>(ja)) & (key <= static_cast<int32_t>(jb));
    const Vec16 s = Load16(w + c);
    const Vec16 e = live ? ExpNonpositive(s - new_peak) : zero;
    totals += e;
    jaxllm_cpu::Store16(w + c, live ? e : s);
  }
  peak = new_peak;
  total = total * rescale + Sum16(totals);
  if (rescale != 1.0f) {
#pragma omp simd
    for (int64_t h = 0; h < H; ++h) acc[h] *= rescale;
  }
}

// One token's G query rows (one kv head) against keys ja..jb of one block: scores, the online
// softmax update of each row's running max, sum and output. k_block/v_block point at key 0's row
// of the kv head, ``at`` is key 0's (slot, head) index into the scales. kHeadDim is H when it is
// one of the common sizes (rows live in whole vector registers), else 0 and p.H is used.
template <typename V, int64_t kHeadDim>
inline void AttendBlock(const Problem& p, const V* k_block, const V* v_block, int64_t at, int64_t ja,
                        int64_t jb, const float* qs, float* acc, float* peak, float* total, float* weights,
                        Prefetcher& prefetch) {
  const int64_t H = kHeadDim > 0 ? kHeadDim : p.H;
  const int64_t G = p.G, BS = p.BS, K = p.K, slot_stride = K * H;
  // Scores: with a compile-time head dim one row at a time, its query in registers; otherwise
  // key by key for all G rows.
  if constexpr (kHeadDim > 0) {
    constexpr int64_t kVecs = kHeadDim / 16;
    for (int64_t g = 0; g < G; ++g) {
      Vec16 q_row[kVecs];
      for (int64_t i = 0; i < kVecs; ++i) q_row[i] = Load16(qs + g * H + 16 * i);
      for (int64_t j = ja; j <= jb; ++j) {
        prefetch.Step();
        const V* kr = k_block + j * slot_stride;
        Vec16 sum = q_row[0] * Load16(kr);
        for (int64_t i = 1; i < kVecs; ++i) sum += q_row[i] * Load16(kr + 16 * i);
        weights[g * BS + j] = p.k_scale != nullptr ? Sum16(sum) * p.k_scale[at + j * K] : Sum16(sum);
      }
    }
  } else {
    for (int64_t j = ja; j <= jb; ++j) {
      const V* kr = k_block + j * slot_stride;
      const float key_scale = p.k_scale != nullptr ? p.k_scale[at + j * K] : 1.0f;
      for (int64_t g = 0; g < G; ++g) {
        prefetch.Step();
        float s = 0.0f;
#pragma omp simd reduction(+ : s)
        for (int64_t h = 0; h < H; ++h) s += qs[g * H + h] * to_float(kr[h]);
        weights[g * BS + j] = s * key_scale;
      }
    }
  }
  // Online softmax per row, 16 scores at a time (lanes outside ja..jb masked): rescale what the
  // row holds when its max rises. `weights` has 16 floats of slack past its last row.
  for (int64_t g = 0; g < G; ++g) SoftmaxUpdate(weights + g * BS, ja, jb, H, peak[g], total[g], acc + g * H);
  // Values: with a compile-time head dim one row at a time, its accumulator in registers;
  // otherwise value row by value row into all G rows.
  if constexpr (kHeadDim > 0) {
    constexpr int64_t kVecs = kHeadDim / 16;
    for (int64_t g = 0; g < G; ++g) {
      Vec16 a[kVecs];
      for (int64_t i = 0; i < kVecs; ++i) a[i] = Load16(acc + g * H + 16 * i);
      const float* w = weights + g * BS;
      for (int64_t j = ja; j <= jb; ++j) {
        const V* vr = v_block + j * slot_stride;
        const float wj = p.v_scale != nullptr ? w[j] * p.v_scale[at + j * K] : w[j];
        for (int64_t i = 0; i < kVecs; ++i) a[i] += wj * Load16(vr + 16 * i);
      }
      for (int64_t i = 0; i < kVecs; ++i) jaxllm_cpu::Store16(acc + g * H + 16 * i, a[i]);
    }
  } else {
    for (int64_t j = ja; j <= jb; ++j) {
      const V* vr = v_block + j * slot_stride;
      const float value_scale = p.v_scale != nullptr ? p.v_scale[at + j * K] : 1.0f;
      for (int64_t g = 0; g < G; ++g) {
        const float w = weights[g * BS + j] * value_scale;
#pragma omp simd
        for (int64_t h = 0; h < H; ++h) acc[g * H + h] += w * to_float(vr[h]);
      }
    }
  }
}

// A unit's query rows in scratch: the scaled queries, each row's running output, max and sum,
// and each token's first visible key; Finish writes the normalised rows out. Rows are
// r = ((token - first) * heads + head - head_begin) * G + g, the order of q's and out's rows.
struct UnitRows {
  int64_t heads = 0, rows = 0;
  int64_t key_lo = INT64_MAX, key_hi = -1;  // the union of the tokens' key ranges
  int64_t lo[kTileTokens];                  // first visible key of each token
  float* qs = nullptr;                      // scaled queries [rows, H]
  float* acc = nullptr;                     // unnormalised outputs [rows, H]
  float* peak = nullptr;                    // running max score of each row
  float* total = nullptr;                   // running sum of weights of each row
  float* extra = nullptr;                   // the caller's extra_floats after them

  // False for a negative position or keys past the block table's width.
  bool Begin(const Problem& p, const Unit& u, std::vector<float>& scratch, int64_t extra_floats) {
    const int64_t H = p.H, G = p.G;
    heads = u.head_end - u.head_begin;
    rows = (u.last - u.first) * heads * G;
    scratch.resize(rows * (2 * H + 2) + extra_floats);
    qs = scratch.data();
    acc = qs + rows * H;
    peak = acc + rows * H;
    total = peak + rows;
    extra = total + rows;
    for (int64_t t = u.first; t < u.last; ++t) {
      const int64_t pos = p.positions[t];
      if (pos < 0) return false;
      lo[t - u.first] = p.window > 0 ? std::max<int64_t>(0, pos - p.window + 1) : 0;
      key_lo = std::min(key_lo, lo[t - u.first]);
      key_hi = std::max(key_hi, pos);
      const int64_t r0 = (t - u.first) * heads * G;
      const float* src = p.q + (t * p.N + u.head_begin * G) * H;  // the unit's heads are adjacent
      for (int64_t i = 0; i < heads * G * H; ++i) qs[r0 * H + i] = src[i] * p.scale;
    }
    std::fill(acc, acc + rows * H, 0.0f);
    std::fill(peak, peak + rows, kNoScore);
    std::fill(total, total + rows, 0.0f);
    return key_hi / p.BS < p.B;
  }

  void Finish(const Problem& p, const Unit& u) const {
    const int64_t H = p.H, G = p.G;
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t t = u.first + r / (heads * G);
      float* dst = p.out + (t * p.N + u.head_begin * G + r % (heads * G)) * H;
      const float inv = 1.0f / total[r];  // every row saw its own key: total >= 1
      for (int64_t h = 0; h < H; ++h) dst[h] = acc[r * H + h] * inv;
    }
  }
};

// One unit (its rows: UnitRows), block by block, each token's rows against each key in turn.
template <typename V, int64_t kHeadDim>
bool RunUnit(const Problem& p, const Unit& u, std::vector<float>& scratch) {
  const int64_t H = p.H, G = p.G, K = p.K, BS = p.BS;
  UnitRows ur;
  if (!ur.Begin(p, u, scratch, G * BS + 16)) return false;
  const int64_t heads = ur.heads, key_lo = ur.key_lo, key_hi = ur.key_hi;
  const int64_t* lo = ur.lo;
  float *qs = ur.qs, *acc = ur.acc, *peak = ur.peak, *total = ur.total;
  float* weights = ur.extra;  // one (token, kv head)'s scores, then weights, in a block [G, BS]

  const V* k_pool = static_cast<const V*>(p.k);
  const V* v_pool = static_cast<const V*>(p.v);
  const int32_t* table = p.block_tables + u.seq * p.B;
  Prefetcher prefetch;
  for (int64_t b = key_lo / BS; b <= key_hi / BS; ++b) {
    const int64_t phys = table[b];
    if (phys < 0 || phys >= p.NB) return false;
    const int64_t key0 = b * BS;
    // While scoring this block (heads x G rows x BS keys for a decode token), prefetch the next.
    if (b < key_hi / BS) prefetch.Start(p, table[b + 1], u.head_begin, u.head_end, k_pool, v_pool, heads * G * BS);
    for (int64_t t = u.first; t < u.last; ++t) {
      const int64_t ja = std::max(lo[t - u.first], key0) - key0;
      const int64_t jb = std::min<int64_t>(p.positions[t], key0 + BS - 1) - key0;
      if (ja > jb) continue;
      for (int64_t head = u.head_begin; head < u.head_end; ++head) {
        const int64_t at = (p.layer * p.NB + phys) * BS * K + head;  // (slot, head) index of key 0
        const int64_t r0 = ((t - u.first) * heads + head - u.head_begin) * G;
        AttendBlock<V, kHeadDim>(p, k_pool + at * H, v_pool + at * H, at, ja, jb, qs + r0 * H, acc + r0 * H,
                                 peak + r0, total + r0, weights, prefetch);
      }
    }
  }
  ur.Finish(p, u);
  return true;
}

// The lane sums of 16 vectors, in order: out[j] = x[j][0] + ... + x[j][15]. Pairs of vectors are
// folded half on half, so that each round halves the lanes per vector and doubles the vectors per
// register: 45 shuffles and adds for 16 sums, where one tree per vector (Sum16) takes about 150.
inline Vec16 SumLanes16(const float* x) {
  Vec16 y[8], z[4], w[2];
  for (int i = 0; i < 8; ++i) {  // y[i]: 8 partial sums of x[2i], then 8 of x[2i + 1]
    const Vec16 a = Load16(x + 32 * i), b = Load16(x + 32 * i + 16);
    y[i] = __builtin_shufflevector(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
           __builtin_shufflevector(a, b, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  }
  for (int i = 0; i < 4; ++i) {  // z[i]: 4 partial sums of each of x[4i .. 4i + 3]
    z[i] = __builtin_shufflevector(y[2 * i], y[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
           __builtin_shufflevector(y[2 * i], y[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
  }
  for (int i = 0; i < 2; ++i) {  // w[i]: 2 partial sums of each of x[8i .. 8i + 7]
    w[i] = __builtin_shufflevector(z[2 * i], z[2 * i + 1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) +
           __builtin_shufflevector(z[2 * i], z[2 * i + 1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
  }
  return __builtin_shufflevector(w[0], w[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
         __builtin_shufflevector(w[0], w[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}

// Scores of kRows query rows (kHeadDim floats each, adjacent; kept in registers) against 16 keys
// (float rows, key_stride apart), times the keys' scales, into w[r * 16 + j]. Each key row is
// loaded once for all the rows; each (row, key) leaves a vector of partial sums in `part`
// [kRows, 16, 16], summed 16 keys at a time by SumLanes16.
template <int64_t kHeadDim, int64_t kRows>
inline void ScoreRowsN(const float* q, const float* keys, int64_t key_stride, Vec16 key_scale, float* w,
                       float* part, Prefetcher& prefetch) {
  constexpr int64_t kVecs = kHeadDim / 16;
  Vec16 qr[kRows][kVecs];
  for (int64_t r = 0; r < kRows; ++r) {
    for (int64_t i = 0; i < kVecs; ++i) qr[r][i] = Load16(q + r * kHeadDim + 16 * i);
  }
  for (int64_t j = 0; j < 16; ++j) {
    prefetch.Step();
    Vec16 k[kVecs];
    for (int64_t i = 0; i < kVecs; ++i) k[i] = Load16(keys + j * key_stride + 16 * i);
    for (int64_t r = 0; r < kRows; ++r) {
      Vec16 sum = qr[r][0] * k[0];
      for (int64_t i = 1; i < kVecs; ++i) sum += qr[r][i] * k[i];
      jaxllm_cpu::Store16(part + (r * 16 + j) * 16, sum);
    }
  }
  for (int64_t r = 0; r < kRows; ++r) jaxllm_cpu::Store16(w + r * 16, SumLanes16(part + r * 256) * key_scale);
}

// ScoreRowsN for n rows, in groups that keep the queries in registers (4 rows of 64, 2 of 128).
template <int64_t kHeadDim>
inline void ScoreRows(const float* q, int64_t n, const float* keys, int64_t key_stride, Vec16 key_scale, float* w,
                      float* part, Prefetcher& prefetch) {
  constexpr int64_t kGroup = kHeadDim <= 64 ? 4 : 2;
  for (; n >= kGroup; n -= kGroup, q += kGroup * kHeadDim, w += kGroup * 16) {
    ScoreRowsN<kHeadDim, kGroup>(q, keys, key_stride, key_scale, w, part, prefetch);
  }
  if constexpr (kGroup == 4) {
    if (n == 3) ScoreRowsN<kHeadDim, 3>(q, keys, key_stride, key_scale, w, part, prefetch);
    if (n == 2) ScoreRowsN<kHeadDim, 2>(q, keys, key_stride, key_scale, w, part, prefetch);
  }
  if (n == 1) ScoreRowsN<kHeadDim, 1>(q, keys, key_stride, key_scale, w, part, prefetch);
}

// RunUnit for a head dim of 64 or 128 and blocks of a multiple of 16 slots: keys are taken 16 at a
// time per kv head; every query row of the unit that sees them (the G rows of each of its tokens)
// is scored against all 16 (ScoreRows: no sum across lanes per score), and a bfloat16 or quantised
// pool's 16 keys and values are converted to floats once (scales folded into the values), not
// once per row. The softmax and the value sums are RunUnit's.
template <typename V, int64_t kHeadDim>
bool RunUnitChunked(const Problem& p, const Unit& u, std::vector<float>& scratch) {
  constexpr int64_t H = kHeadDim, kVecs = kHeadDim / 16;
  const int64_t G = p.G, K = p.K, BS = p.BS;
  UnitRows ur;
  if (!ur.Begin(p, u, scratch, G * 16 + 16 * H * 2 + 4 * 256)) return false;
  const int64_t heads = ur.heads, key_lo = ur.key_lo, key_hi = ur.key_hi;
  const int64_t* lo = ur.lo;
  float *qs = ur.qs, *acc = ur.acc, *peak = ur.peak, *total = ur.total;
  float* weights = ur.extra;     // one (token, kv head)'s scores, then weights, of 16 keys [G, 16]
  float* kf = weights + G * 16;  // the 16 keys as floats [16, H] (pools other than float32)
  float* vf = kf + 16 * H;       // their values as scaled floats [16, H]
  float* part = vf + 16 * H;     // ScoreRows' partial sums [4, 16, 16]

  const V* k_pool = static_cast<const V*>(p.k);
  const V* v_pool = static_cast<const V*>(p.v);
  const int32_t* table = p.block_tables + u.seq * p.B;
  Prefetcher prefetch;
  for (int64_t b = key_lo / BS; b <= key_hi / BS; ++b) {
    const int64_t phys = table[b];
    if (phys < 0 || phys >= p.NB) return false;
    // While scoring this block (its keys once per group of rows), prefetch the next.
    if (b < key_hi / BS) prefetch.Start(p, table[b + 1], u.head_begin, u.head_end, k_pool, v_pool, heads * BS);
    for (int64_t j0 = 0; j0 < BS; j0 += 16) {
      const int64_t first_key = b * BS + j0, last_key = first_key + 15;
      if (last_key < key_lo || first_key > key_hi) continue;
      for (int64_t head = u.head_begin; head < u.head_end; ++head) {
        const int64_t at = (p.layer * p.NB + phys) * BS * K + j0 * K + head;  // (slot, head) index of key j0
        Vec16 key_scale = Vec16{} + 1.0f;
        if (p.k_scale != nullptr) {
          for (int64_t j = 0; j < 16; ++j) key_scale[j] = p.k_scale[at + j * K];
        }
        const float *keys = kf, *values = vf;
        int64_t stride = H;
        if constexpr (std::is_same_v<V, float>) {
          keys = k_pool + at * H;
          values = v_pool + at * H;
          stride = K * H;
        } else {
          for (int64_t j = 0; j < 16; ++j) {
            const float scale = p.v_scale != nullptr ? p.v_scale[at + j * K] : 1.0f;
            for (int64_t i = 0; i < kVecs; ++i) {
              jaxllm_cpu::Store16(kf + j * H + 16 * i, Load16(k_pool + (at + j * K) * H + 16 * i));
              jaxllm_cpu::Store16(vf + j * H + 16 * i, Load16(v_pool + (at + j * K) * H + 16 * i) * scale);
            }
          }
        }
        for (int64_t t = u.first; t < u.last; ++t) {
          const int64_t ja = std::max(lo[t - u.first], first_key) - first_key;
          const int64_t jb = std::min<int64_t>(p.positions[t], last_key) - first_key;
          if (ja > jb) continue;
          const int64_t r0 = ((t - u.first) * heads + head - u.head_begin) * G;
          ScoreRows<H>(qs + r0 * H, G, keys, stride, key_scale, weights, part, prefetch);
          for (int64_t g = 0; g < G; ++g) {
            float* w = weights + g * 16;
            float* row = acc + (r0 + g) * H;
            SoftmaxUpdate(w, ja, jb, H, peak[r0 + g], total[r0 + g], row);
            Vec16 a[kVecs];
            for (int64_t i = 0; i < kVecs; ++i) a[i] = Load16(row + 16 * i);
            for (int64_t j = ja; j <= jb; ++j) {
              for (int64_t i = 0; i < kVecs; ++i) a[i] += w[j] * Load16(values + j * stride + 16 * i);
            }
            for (int64_t i = 0; i < kVecs; ++i) jaxllm_cpu::Store16(row + 16 * i, a[i]);
          }
        }
      }
    }
  }
  ur.Finish(p, u);
  return true;
}

using UnitFn = bool (*)(const Problem&, const Unit&, std::vector<float>&);

template <typename V>
UnitFn ForShape(int64_t head_dim, int64_t block_size) {
  const bool chunks = block_size % 16 == 0;
  switch (head_dim) {
    case 64: return chunks ? RunUnitChunked<V, 64> : RunUnit<V, 64>;
    case 128: return chunks ? RunUnitChunked<V, 128> : RunUnit<V, 128>;
    default: return RunUnit<V, 0>;
  }
}

// Shared by the calling thread and the pool tasks; owned jointly, so that a task the pool starts
// after the call has returned finds no work left and touches nothing else.
struct Work {
  Problem problem;
  std::vector<Unit> units;
  UnitFn run;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  std::atomic<bool> failed{false};

  void Drain() {
    std::vector<float> scratch;
    const int64_t n = static_cast<int64_t>(units.size());
    for (int64_t i = next.fetch_add(1); i < n; i = next.fetch_add(1)) {
      if (!run(problem, units[i], scratch)) failed.store(true);
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

ffi::Error PagedAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::AnyBuffer k,
                          ffi::AnyBuffer v, ffi::Buffer<ffi::F32> k_scale,
                          ffi::Buffer<ffi::F32> v_scale, ffi::Buffer<ffi::S32> layer,
                          ffi::Buffer<ffi::S32> positions, ffi::Buffer<ffi::S32> block_tables,
                          ffi::Buffer<ffi::S32> cu_q_lens, int64_t sliding_window, float scale,
                          ffi::ResultBuffer<ffi::F32> out) {
  const auto qd = q.dimensions();
  const auto kd = k.dimensions();
  const auto td = block_tables.dimensions();
  if (qd.size() != 3 || kd.size() != 5 || td.size() != 2) {
    return ffi::Error::InvalidArgument("cpu paged attention: q must be [T, N, H], the pools "
                                       "[L, blocks, block_size, K, H], block_tables [S, B]");
  }
  const auto vd = v.dimensions();
  if (k.element_type() != v.element_type() || !std::equal(kd.begin(), kd.end(), vd.begin(), vd.end())) {
    return ffi::Error::InvalidArgument("cpu paged attention: k and v pools differ in dtype or shape");
  }
  Problem p{};
  p.T = qd[0];
  p.N = qd[1];
  p.H = qd[2];
  p.L = kd[0];
  p.NB = kd[1];
  p.BS = kd[2];
  p.K = kd[3];
  p.S = td[0];
  p.B = td[1];
  if (kd[4] != p.H || p.K <= 0 || p.N % p.K != 0) {
    return ffi::Error::InvalidArgument("cpu paged attention: pool head dim or kv heads do not match q");
  }
  if (positions.element_count() != static_cast<size_t>(p.T) ||
      cu_q_lens.element_count() != static_cast<size_t>(p.S + 1)) {
    return ffi::Error::InvalidArgument("cpu paged attention: positions must be [T], cu_q_lens [S + 1]");
  }
  p.G = p.N / p.K;
  p.layer = layer.typed_data()[0];
  if (p.layer < 0 || p.layer >= p.L) {
    return ffi::Error::InvalidArgument("cpu paged attention: layer out of range");
  }
  p.window = sliding_window;
  p.scale = scale;
  p.q = q.typed_data();
  p.k = k.untyped_data();
  p.v = v.untyped_data();
  p.positions = positions.typed_data();
  p.block_tables = block_tables.typed_data();
  p.cu_q_lens = cu_q_lens.typed_data();
  p.out = out->typed_data();

  UnitFn run = nullptr;
  bool scaled = false;
  switch (k.element_type()) {
    case ffi::DataType::F32: run = ForShape<float>(p.H, p.BS); break;
    case ffi::DataType::BF16:
    case ffi::DataType::U16: run = ForShape<Bf16>(p.H, p.BS); break;  // uint16: bfloat16 bits (kv_quant.BF16_BITS)
    case ffi::DataType::S8: run = ForShape<int8_t>(p.H, p.BS); scaled = true; break;
    case ffi::DataType::U8: run = ForShape<uint8_t>(p.H, p.BS); scaled = true; break;
    default:
      return ffi::Error::InvalidArgument("cpu paged attention: pool dtype must be float32, bfloat16, "
                                         "uint16 (bfloat16 bits), int8 or uint8 (fp8 bits)");
  }
  if (scaled) {
    const size_t slots = static_cast<size_t>(p.L * p.NB * p.BS * p.K);
    if (k_scale.element_count() != slots || v_scale.element_count() != slots) {
      return ffi::Error::InvalidArgument("cpu paged attention: int8/fp8 pools need scales "
                                         "[L, blocks, block_size, K]");
    }
    p.k_scale = k_scale.typed_data();
    p.v_scale = v_scale.typed_data();
  }

  auto work = std::make_shared<Work>();
  work->problem = p;
  work->run = run;
  const int32_t* cu = p.cu_q_lens;
  const int64_t real = std::clamp<int64_t>(cu[p.S], 0, p.T);
  // A unit reads every kv head of its blocks (whole slot rows: the fewest bytes per key), unless
  // there are too few units to keep the threads busy (a few long decodes): then one head each.
  const int64_t threads = std::max<int64_t>(pool.num_threads(), 1);
  int64_t tiles = 0;
  for (int64_t s = 0; s < p.S; ++s) {
    const int64_t len = std::min<int64_t>(cu[s + 1], real) - std::max<int64_t>(cu[s], 0);
    tiles += len > 0 ? (len + kTileTokens - 1) / kTileTokens : 0;
  }
  const int64_t unit_heads = tiles < kUnitsPerThread * threads ? 1 : p.K;
  for (int64_t s = 0; s < p.S; ++s) {
    const int64_t begin = std::max<int64_t>(cu[s], 0), end = std::min<int64_t>(cu[s + 1], real);
    for (int64_t first = begin; first < end; first += kTileTokens) {
      const int64_t last = std::min(first + kTileTokens, end);
      const int64_t keys = p.positions[last - 1] + 1;
      for (int64_t head = 0; head < p.K; head += unit_heads) {
        const int64_t head_end = std::min(head + unit_heads, p.K);
        work->units.push_back(Unit{s, first, last, head, head_end, (last - first) * keys * (head_end - head)});
      }
    }
  }
  std::stable_sort(work->units.begin(), work->units.end(),
                   [](const Unit& a, const Unit& b) { return a.cost > b.cost; });
  std::fill(p.out + real * p.N * p.H, p.out + p.T * p.N * p.H, 0.0f);

  const int64_t n = static_cast<int64_t>(work->units.size());
  const int64_t helpers = std::min<int64_t>(threads, n) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([work] { work->Drain(); });
  work->Drain();
  while (work->done.load(std::memory_order_acquire) < n) std::this_thread::yield();
  if (work->failed.load()) {
    return ffi::Error::InvalidArgument("cpu paged attention: a position or block id is outside "
                                       "its block table or the pool");
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxllmCpuPagedAttention, PagedAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q
                                  .Arg<ffi::AnyBuffer>()         // k pool
                                  .Arg<ffi::AnyBuffer>()         // v pool
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k scales (empty if unscaled)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v scales
                                  .Arg<ffi::Buffer<ffi::S32>>()  // layer
                                  .Arg<ffi::Buffer<ffi::S32>>()  // positions
                                  .Arg<ffi::Buffer<ffi::S32>>()  // block_tables
                                  .Arg<ffi::Buffer<ffi::S32>>()  // cu_q_lens
                                  .Attr<int64_t>("sliding_window")
                                  .Attr<float>("scale")
                                  .Ret<ffi::Buffer<ffi::F32>>());
