// Causal attention over a packed row on CPU, batch-invariant and skipping masked blocks.
//
// Every query's result is computed from exactly its own keys, in one fixed order: key blocks of
// KEY_BLOCK keys aligned to the start of its sequence (position 0, whether the first keys come from
// a shared prefix or from the row itself), each dot product summed over the head dimension in
// index order, each block folded into the running softmax in key order. Nothing a query computes
// depends on the queries around it (tile mates, row neighbours, the row's length), so a
// conversation gets the same bits scored alone, in any batch, or continuing a shared prompt.
// Blocks entirely after a tile's last query are never computed (causal skipping), nor, under a
// sliding window, blocks entirely before its first query's window; a block that is masked for some
// lanes of a tile is an exact no-op for them (probability 0, rescale 1).
//
// The amx build's bf16 takes key blocks of AMX_KEY_BLOCK (its bits are its own in bf16 anyway);
// fp32 takes KEY_BLOCK in every build, so fp32 results are the same bits whichever build runs.
//
// Two per-layer options, as transformers' eager attention applies them: a sliding window W (a query
// at position p sees keys at positions p - W + 1 .. p; 0: none) and logit softcapping C (a score s
// becomes C * tanh(s / C) before the softmax; 0: none).
//
// Layout of the inner loops: a tile of TILE queries sits across vector lanes ([dim][TILE],
// transposed), so the softmax statistics of a key block are element-wise maxima and sums over
// rows, never horizontal reductions. Work items (sequence, key head, chunk of queries) run on torch's
// OpenMP threads (built with -fopenmp: at::parallel_for is inline, serial without it). Compiled
// once per instruction set (build.py: AVX2+FMA, AVX-512, AVX-512 BF16, AMX; the loader picks one
// from cpuid), with GCC vector extensions: 8 lanes under AVX2, 16 under AVX-512.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <immintrin.h>
#include <initializer_list>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

#ifndef RS_LANES  // overridable to check the 16-lane logic on an AVX2 machine (GCC splits the vectors)
#if defined(__AVX512F__)
#define RS_LANES 16
#else
#define RS_LANES 8
#endif
#endif
constexpr int LANES = RS_LANES;
#ifndef RS_VECS
#define RS_VECS 2
#endif
#ifndef RS_KEY_BLOCK
#define RS_KEY_BLOCK 32
#endif
constexpr int VECS = RS_VECS;             // vectors of queries per tile
constexpr int TILE = LANES * VECS;        // queries per tile
constexpr int KEY_BLOCK = RS_KEY_BLOCK;   // keys per softmax step; also the alignment of the blocks
// bf16 on AMX tiles: keys per softmax step there (fewer softmax passes per product; measured 11-12%
// more attention per second than 32). fp32 keeps KEY_BLOCK in every build, so its bits match across them.
constexpr int AMX_KEY_BLOCK = 64;
constexpr int ROWS = 6;                   // keys (or dims) per register block: 6 x 2 accumulators, as in sgemm
constexpr int CHUNK_TILES = 8;             // tiles per work item (bounds the keys packed per item)
// bf16 on AMX tiles: more tiles share a packing of the keys, whose values are transposed one by one for
// the tiles (measured: multi-turn bf16 about 7% faster with 16; fp32 GRPO 3-5% slower with 16)
constexpr int AMX_CHUNK_TILES = 16;

typedef float vf __attribute__((vector_size(LANES * 4)));
typedef int32_t vi __attribute__((vector_size(LANES * 4)));

inline vf load(const float* p) { vf v; std::memcpy(&v, p, sizeof v); return v; }
inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
#if RS_LANES == 16 && defined(__AVX512F__)
inline vf splat(float x) { return (vf)_mm512_set1_ps(x); }
#elif RS_LANES == 8 && defined(__AVX__)
inline vf splat(float x) { return (vf)_mm256_set1_ps(x); }
#else
inline vf splat(float x) {
  vf v;
  for (int i = 0; i < LANES; ++i) v[i] = x;
  return v;
}
#endif
inline vf vmax(vf a, vf b) { return a > b ? a : b; }

#include "vexp.h"  // exp on every lane (shared with layers.cpp)

// tanh on every lane as 1 - 2 / (exp(2x) + 1): within ~1e-7 of tanh in absolute terms, which is
// what a softcapped score (C * tanh(s / C)) needs; exp's clamping makes the tails exactly +-1.
inline vf vtanh(vf x) { return splat(1.0f) - splat(2.0f) / (vexp(x + x) + splat(1.0f)); }

template <typename T>
inline float to_float(T x) { return static_cast<float>(x); }

// Round every lane to the nearest bf16 (ties to even), kept as a float. Finite inputs only.
inline vf round_bf16(vf x) {
  vi bits = (vi)x;
  bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & int32_t(0xFFFF0000);
  return (vf)bits;
}

// St[i][lanes] = sum_d K[i][d] * Qt[d][lanes] for keys i0 .. i0 + R - 1 (R x VECS accumulators);
// when `top` is given, top[v] = max(top[v], St[i][v]) over those keys too.
template <int R>
inline void scores_rows(const float* K, const float* Qt, float* St, int dim, vf* top, int i0) {
  vf acc[R][VECS] = {};
  for (int d = 0; d < dim; ++d) {
    vf q[VECS];
    for (int v = 0; v < VECS; ++v) q[v] = load(Qt + d * TILE + v * LANES);
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i) {
      vf k = splat(K[(i0 + i) * dim + d]);
      for (int v = 0; v < VECS; ++v) acc[i][v] += k * q[v];
    }
  }
  for (int i = 0; i < R; ++i)
    for (int v = 0; v < VECS; ++v) {
      store(St + (i0 + i) * TILE + v * LANES, acc[i][v]);
      if (top) top[v] = vmax(top[v], acc[i][v]);
    }
}

// The scores of one key block: every element is the same sum in the same order whichever row
// block computes it.
inline void scores(const float* K, const float* Qt, float* St, int dim, vf* top) {
  int i0 = 0;
  for (; i0 + ROWS <= KEY_BLOCK; i0 += ROWS) scores_rows<ROWS>(K, Qt, St, dim, top, i0);
  for (; i0 + 2 <= KEY_BLOCK; i0 += 2) scores_rows<2>(K, Qt, St, dim, top, i0);
}

// Ot[d][lanes] += sum_i V[i][d] * P[i][lanes] over the block's keys, for dims d0 .. d0 + R - 1.
template <int R>
inline void accumulate_rows(const float* V, const float* P, float* Ot, int dim, int d0) {
  vf acc[R][VECS];
  for (int j = 0; j < R; ++j)
    for (int v = 0; v < VECS; ++v) acc[j][v] = load(Ot + (d0 + j) * TILE + v * LANES);
  for (int i = 0; i < KEY_BLOCK; ++i) {
    vf p[VECS];
    for (int v = 0; v < VECS; ++v) p[v] = load(P + i * TILE + v * LANES);
#pragma GCC unroll 8
    for (int j = 0; j < R; ++j) {
      vf x = splat(V[i * dim + d0 + j]);
      for (int v = 0; v < VECS; ++v) acc[j][v] += x * p[v];
    }
  }
  for (int j = 0; j < R; ++j)
    for (int v = 0; v < VECS; ++v) store(Ot + (d0 + j) * TILE + v * LANES, acc[j][v]);
}

inline void accumulate(const float* V, const float* P, float* Ot, int dim) {
  int d0 = 0;
  for (; d0 + ROWS <= dim; d0 += ROWS) accumulate_rows<ROWS>(V, P, Ot, dim, d0);
  for (; d0 + 2 <= dim; d0 += 2) accumulate_rows<2>(V, P, Ot, dim, d0);
}

#if defined(__AVX512BF16__) && RS_LANES == 16 && !defined(RS_NO_PAIRS)
// bf16 on a CPU with AVX-512 BF16: both products of the block in bf16 pairs, `vdpbf16ps` (each lane
// adds two exact bf16 products to its fp32 sum, in a fixed order): half the instructions of fp32
// FMA on the same values. Queries and keys are read unscaled (the scores are scaled in fp32 after
// the dot product, as torch's flash attention does); the probabilities are rounded to bf16 to meet
// the values, as in the fp32 path of bf16.
#define RS_PAIRS 1
inline vf dot_pairs(vf acc, const uint32_t* a, uint32_t b) {
  __m512bh x, y;
  std::memcpy(&x, a, 64);
  const __m512i bb = _mm512_set1_epi32(int(b));
  std::memcpy(&y, &bb, 64);
  return (vf)_mm512_dpbf16_ps((__m512)acc, x, y);
}

// St[i][lanes] = scale * sum_e (K[i] . Q)[pair e] for keys i0 .. i0 + R - 1; K [KEY_BLOCK][half]
// and Qp [half][TILE] hold (dim 2e, dim 2e + 1) pairs.
template <int R>
inline void scores_pairs_rows(const uint32_t* K, const uint32_t* Qp, float* St, int half, vf* top, int i0,
                              vf scale) {
  vf acc[R][VECS] = {};
  for (int e = 0; e < half; ++e)
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i) {
      const uint32_t k = K[(i0 + i) * half + e];
      for (int v = 0; v < VECS; ++v) acc[i][v] = dot_pairs(acc[i][v], Qp + e * TILE + v * LANES, k);
    }
  for (int i = 0; i < R; ++i)
    for (int v = 0; v < VECS; ++v) {
      const vf s = acc[i][v] * scale;
      store(St + (i0 + i) * TILE + v * LANES, s);
      if (top) top[v] = vmax(top[v], s);
    }
}

inline void scores_pairs(const uint32_t* K, const uint32_t* Qp, float* St, int half, vf* top, vf scale) {
  int i0 = 0;
  for (; i0 + ROWS <= KEY_BLOCK; i0 += ROWS) scores_pairs_rows<ROWS>(K, Qp, St, half, top, i0, scale);
  for (; i0 + 2 <= KEY_BLOCK; i0 += 2) scores_pairs_rows<2>(K, Qp, St, half, top, i0, scale);
}

// Ot[d][lanes] += sum_e (Vp[e][d] . Pp[e][lanes]) over the block's key pairs e (keys 2e, 2e + 1).
template <int R>
inline void accumulate_pairs_rows(const uint32_t* Vp, const uint32_t* Pp, float* Ot, int dim, int d0) {
  vf acc[R][VECS];
  for (int j = 0; j < R; ++j)
    for (int v = 0; v < VECS; ++v) acc[j][v] = load(Ot + (d0 + j) * TILE + v * LANES);
  for (int e = 0; e < KEY_BLOCK / 2; ++e)
#pragma GCC unroll 8
    for (int j = 0; j < R; ++j) {
      const uint32_t x = Vp[e * dim + d0 + j];
      for (int v = 0; v < VECS; ++v) acc[j][v] = dot_pairs(acc[j][v], Pp + e * TILE + v * LANES, x);
    }
  for (int j = 0; j < R; ++j)
    for (int v = 0; v < VECS; ++v) store(Ot + (d0 + j) * TILE + v * LANES, acc[j][v]);
}

inline void accumulate_pairs(const uint32_t* Vp, const uint32_t* Pp, float* Ot, int dim) {
  int d0 = 0;
  for (; d0 + ROWS <= dim; d0 += ROWS) accumulate_pairs_rows<ROWS>(Vp, Pp, Ot, dim, d0);
  for (; d0 + 2 <= dim; d0 += 2) accumulate_pairs_rows<2>(Vp, Pp, Ot, dim, d0);
}

// Two lanes' probabilities as one bf16 pair per lane: (round(even), round(odd)).
inline void store_pair(uint32_t* Pp, vf even, vf odd) {
  typedef uint32_t vu __attribute__((vector_size(LANES * 4)));
  const vu a = (vu)even, b = (vu)odd;  // finite, >= 0: round to nearest even by bits
  const vu lo = (a + 0x7FFFu + ((a >> 16) & 1u)) >> 16;
  const vu hi = (b + 0x7FFFu + ((b >> 16) & 1u)) & 0xFFFF0000u;
  const vu pair = lo | hi;
  std::memcpy(Pp, &pair, sizeof pair);
}
// out[d] = (a[d], b[d]) as one bf16 pair (a in the low half) for d < dim; a null row reads as zeros.
template <typename T>
inline void interleave(uint32_t* out, const T* a, const T* b, int64_t dim) {
  typedef uint16_t vh __attribute__((vector_size(LANES * 2)));
  typedef uint32_t vu __attribute__((vector_size(LANES * 4)));
  int64_t d = 0;
  for (; d + LANES <= dim; d += LANES) {
    vh x = {}, y = {};
    if (a) std::memcpy(&x, a + d, sizeof x);
    if (b) std::memcpy(&y, b + d, sizeof y);
    const vu pair = __builtin_convertvector(x, vu) | __builtin_convertvector(y, vu) << 16;
    std::memcpy(out + d, &pair, sizeof pair);
  }
  for (; d < dim; ++d) {
    uint16_t x = 0, y = 0;
    if (a) std::memcpy(&x, a + d, 2);
    if (b) std::memcpy(&y, b + d, 2);
    out[d] = uint32_t(x) | uint32_t(y) << 16;
  }
}
#else
#define RS_PAIRS 0
#endif

#if RS_PAIRS && defined(__AMX_TILE__) && defined(__AMX_BF16__) && !defined(RS_NO_AMX)
// bf16 on a CPU with AMX: both products of a block on tiles (`tdpbf16ps`), the operands already in
// the layouts the pairs use. Scores: St [keys][queries] = K [keys][dims] x Qp [dim pairs][queries];
// values: Ot [dims][queries] += Vt [dims][key pairs] x Pp [key pairs][queries]. Every element of a
// tile product is its own row of A and column of B summed in the instruction's fixed order, chunk
// after chunk of 32 dims (or the block's 32 keys): no element depends on the rows or columns around
// it, so the bits of a query do not depend on its tile mates, as in the other builds. The rounding
// is the instruction's own (it differs from `vdpbf16ps` in the last bits).
#define RS_AMX 1
#include <sys/syscall.h>
#include <unistd.h>
static_assert(TILE == 32 && KEY_BLOCK % 32 == 0 && AMX_KEY_BLOCK % 32 == 0, "the AMX products tile 32 keys x 32 queries");

// Linux hands out the tile registers on request only (once per process).
bool amx_permitted() {
  static const bool permitted = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
  return permitted;
}

struct TileConfig {  // palette 1: 8 tiles of 16 rows x 64 bytes
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {64, 64, 64, 64, 64, 64, 64, 64};
  uint8_t rows[16] = {16, 16, 16, 16, 16, 16, 16, 16};
};

// C (32 x TILE fp32, row stride TILE) += A (32 rows of `pairs` bf16 pairs, row stride `lda`) x B (`pairs`
// rows of TILE pairs), 16 pairs (32 products) at a time; C starts at zero unless `accumulate`.
// Tiles 0-3: C (rows 0-15 / 16-31 x columns 0-15 / 16-31: four independent sums, so one's load or
// store overlaps another's product); 4-5: A; 6-7: B.
inline void product_amx(const uint32_t* A, int lda, const uint32_t* B, int pairs, float* C, bool accumulate) {
  if (accumulate) {
    _tile_loadd(0, C, TILE * 4);
    _tile_loadd(1, C + 16, TILE * 4);
    _tile_loadd(2, C + 16 * TILE, TILE * 4);
    _tile_loadd(3, C + 16 * TILE + 16, TILE * 4);
  } else {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
  }
  for (int e0 = 0; e0 < pairs; e0 += 16) {
    _tile_loadd(4, A + e0, lda * 4);
    _tile_loadd(5, A + 16 * lda + e0, lda * 4);
    _tile_loadd(6, B + e0 * TILE, TILE * 4);
    _tile_loadd(7, B + e0 * TILE + 16, TILE * 4);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
  _tile_stored(0, C, TILE * 4);
  _tile_stored(1, C + 16, TILE * 4);
  _tile_stored(2, C + 16 * TILE, TILE * 4);
  _tile_stored(3, C + 16 * TILE + 16, TILE * 4);
}

// St [KB][TILE] = scale * K [keys][dim / 2 pairs] x Qp [dim / 2][TILE], 32 keys at a time.
template <int KB>
inline void scores_amx(const uint32_t* K, const uint32_t* Qp, float* St, int half, vf* top, vf scale) {
  for (int k0 = 0; k0 < KB; k0 += 32) product_amx(K + k0 * half, half, Qp, half, St + k0 * TILE, false);
  for (int i = 0; i < KB; ++i)  // scaled in fp32 after the dot product, as the pairs do
    for (int v = 0; v < VECS; ++v) {
      const vf x = load(St + i * TILE + v * LANES) * scale;
      store(St + i * TILE + v * LANES, x);
      if (top) top[v] = vmax(top[v], x);
    }
}

// Ot [dim][TILE] += Vt [dim][KB / 2 pairs] x Pp [KB / 2][TILE], 32 dims at a time (dim is
// a multiple of 32).
template <int KB>
inline void accumulate_amx(const uint32_t* Vt, const uint32_t* Pp, float* Ot, int dim) {
  constexpr int PAIRS_PER_ROW = KB / 2;
  for (int d0 = 0; d0 < dim; d0 += 32)
    product_amx(Vt + d0 * PAIRS_PER_ROW, PAIRS_PER_ROW, Pp, PAIRS_PER_ROW, Ot + d0 * TILE, true);
}
#else
#define RS_AMX 0
inline bool amx_permitted() { return false; }
#endif

// A [tokens, heads, dim] view (any strides on the first two, dim contiguous).
template <typename T>
struct View {
  const T* data;
  int64_t token_stride, head_stride;
  const T* at(int64_t token, int64_t head) const { return data + token * token_stride + head * head_stride; }
};

template <typename T>
View<T> view_of(const at::Tensor& t) {
  return View<T>{t.data_ptr<T>(), t.stride(0), t.stride(1)};
}

struct Segment {
  int64_t start, length, offset;  // rows of the packed row; its first position (prefix length)
  int64_t prefix;                 // index into the prefix lists, or -1
};

// The running softmax of one tile: TILE queries of one head, across lanes.
// KB: keys per softmax step (KEY_BLOCK, or AMX_KEY_BLOCK for bf16 on AMX tiles).
template <int KB>
struct Tile {
  int64_t head, first, count, position0;  // position0: the first query's position in its sequence
  int64_t first_block, blocks;             // key blocks it needs: from its first query's window to its last query
  std::vector<float> Qt, Ot;               // [dim][TILE]: queries (scaled) and the unnormalised output
  std::vector<uint32_t> Qp;                // pairs: [dim / 2][TILE] unscaled bf16 query pairs (Qt unused)
  vf m[VECS], l[VECS], position[VECS];

  Tile(int64_t head, int64_t first, int64_t count, int64_t position0, int64_t dim, int64_t window, bool pairs)
      : head(head), first(first), count(count), position0(position0),
        first_block(window > 0 ? std::max<int64_t>(0, position0 - window + 1) / KB : 0),
        blocks((position0 + count - 1) / KB + 1), Qt(pairs ? 0 : dim * TILE, 0.0f), Ot(dim * TILE, 0.0f),
        Qp(pairs ? dim / 2 * TILE : 0, 0u) {
    for (int v = 0; v < VECS; ++v) {
      m[v] = splat(-std::numeric_limits<float>::infinity());
      l[v] = splat(0.0f);
      for (int lane = 0; lane < LANES; ++lane)  // padded lanes see every key: finite, discarded
        position[v][lane] = float(position0 + v * LANES + lane);
    }
  }

  // Fold key block b into the softmax. K, V: [KB][dim] floats; with PAIRS, K [KB][dim / 2]
  // and V [KB / 2][dim] bf16 pairs (see scores_pairs, accumulate_pairs), Pp scratch
  // [KB / 2][TILE]. St is scratch [KB][TILE].
  // round: the probabilities meet the values rounded to bf16, as torch's kernel does in bf16
  // (the sum is of the unrounded ones, as there), so bf16 scores stay within an ulp of transformers'.
  template <bool PAIRS>
  void step(int64_t b, const void* K, const void* V, float* St, uint32_t* Pp, int dim, bool round, int64_t window,
            float softcap, float scale, bool amx = false) {
    const vf minus_inf = splat(-std::numeric_limits<float>::infinity());
    const int64_t j0 = b * KB;
    const bool diagonal = j0 + KB - 1 > position0;  // some key after some lane's query
    // some key at or before p - W for some lane p (the tile's padded lanes included: they are discarded)
    const bool behind = window > 0 && j0 + window <= position0 + TILE - 1;
    const bool masked = diagonal || behind;
    vf top[VECS];
    for (int v = 0; v < VECS; ++v) top[v] = m[v];
    vf* running_top = masked || softcap > 0 ? nullptr : top;
#if RS_AMX
    if (PAIRS && amx)
      scores_amx<KB>(static_cast<const uint32_t*>(K), Qp.data(), St, dim / 2, running_top, splat(scale));
    else
#endif
#if RS_PAIRS
    if constexpr (PAIRS)
      scores_pairs(static_cast<const uint32_t*>(K), Qp.data(), St, dim / 2, running_top, splat(scale));
    else
#endif
      scores(static_cast<const float*>(K), Qt.data(), St, dim, running_top);
    if (masked || softcap > 0) {  // capped; masked keys -inf, and out of the lane's maximum
      const vf cap = splat(softcap), inverse_cap = splat(softcap > 0 ? 1.0f / softcap : 0.0f);
      const vf span = splat(float(window));
      for (int i = 0; i < KB; ++i) {
        const vf key_position = splat(float(j0 + i));
        for (int v = 0; v < VECS; ++v) {
          vf s = load(St + i * TILE + v * LANES);
          if (softcap > 0) s = cap * vtanh(s * inverse_cap);
          if (diagonal) s = key_position > position[v] ? minus_inf : s;
          if (behind) s = key_position + span <= position[v] ? minus_inf : s;
          store(St + i * TILE + v * LANES, s);
          top[v] = vmax(top[v], s);
        }
      }
    }
    vf alpha[VECS], sum[VECS];
    bool rescale = false;
    for (int v = 0; v < VECS; ++v) {
      // the first block's old maximum is -inf (nothing to rescale); an unchanged maximum rescales by exactly 1
      alpha[v] = m[v] == top[v] ? splat(1.0f) : vexp(m[v] - top[v]);
      alpha[v] = m[v] == minus_inf ? splat(0.0f) : alpha[v];
      for (int lane = 0; lane < LANES; ++lane) rescale |= alpha[v][lane] != 1.0f;
      sum[v] = splat(0.0f);
    }
    auto probability = [&](int i, int v) {
      const vf s = load(St + i * TILE + v * LANES);
      vf p = vexp(s - top[v]);
      if (masked) p = s == minus_inf ? splat(0.0f) : p;
      return p;
    };
    if constexpr (PAIRS) {  // summed in key order as below; stored as bf16 pairs of keys
#if RS_PAIRS
      for (int i = 0; i < KB; i += 2)
        for (int v = 0; v < VECS; ++v) {
          const vf even = probability(i, v), odd = probability(i + 1, v);
          sum[v] += even;
          sum[v] += odd;
          store_pair(Pp + (i / 2) * TILE + v * LANES, even, odd);
        }
#endif
    } else {
      for (int i = 0; i < KB; ++i)
        for (int v = 0; v < VECS; ++v) {
          const vf p = probability(i, v);
          sum[v] += p;
          store(St + i * TILE + v * LANES, round ? round_bf16(p) : p);
        }
    }
    for (int v = 0; v < VECS; ++v) {
      l[v] = l[v] * alpha[v] + sum[v];
      m[v] = top[v];
    }
    if (rescale)  // multiplying by exactly 1 changes nothing: skipped
      for (int d = 0; d < dim; ++d)
        for (int v = 0; v < VECS; ++v) {
          float* row = Ot.data() + d * TILE + v * LANES;
          store(row, load(row) * alpha[v]);
        }
#if RS_AMX
    if (PAIRS && amx) {  // V: [dim][KB / 2] pairs
      accumulate_amx<KB>(static_cast<const uint32_t*>(V), Pp, Ot.data(), dim);
      return;
    }
#endif
#if RS_PAIRS
    if constexpr (PAIRS) {
      accumulate_pairs(static_cast<const uint32_t*>(V), Pp, Ot.data(), dim);
      return;
    }
#endif
    accumulate(static_cast<const float*>(V), St, Ot.data(), dim);
  }
};

template <typename T, int KB>
void run_blocks(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, at::Tensor& out,
                const std::vector<Segment>& segments, const std::vector<at::Tensor>& prefix_keys,
                const std::vector<at::Tensor>& prefix_values, double scale, int64_t window, double softcap,
                bool amx) {
  const int64_t heads = query.size(1), kv_heads = key.size(1), dim = query.size(2);
  const int64_t group = heads / kv_heads;
  const View<T> q = view_of<T>(query), k = view_of<T>(key), v = view_of<T>(value);
  std::vector<View<T>> pk, pv;
  for (size_t i = 0; i < prefix_keys.size(); ++i) {
    pk.push_back(view_of<T>(prefix_keys[i]));
    pv.push_back(view_of<T>(prefix_values[i]));
  }
  T* o = out.data_ptr<T>();
  const int64_t o_token = out.stride(0), o_head = out.stride(1);

  // A work item: the queries [first, last) of one sequence, for every query head of one key head.
  // Its key blocks are converted once and used by all its tiles while in L1 (the outer loop).
  struct Item { int64_t segment, kv_head, first, last; };
  std::vector<Item> items;
  const int64_t chunk = int64_t(TILE) * std::max<int64_t>(1, (amx ? AMX_CHUNK_TILES : CHUNK_TILES) / group);
  for (size_t s = 0; s < segments.size(); ++s)
    for (int64_t g = 0; g < kv_heads; ++g)
      for (int64_t first = 0; first < segments[s].length; first += chunk)
        items.push_back({int64_t(s), g, first, std::min(segments[s].length, first + chunk)});

  const float fscale = float(scale);
  constexpr bool PAIRS = RS_PAIRS && std::is_same<T, at::BFloat16>::value;
  at::parallel_for(0, int64_t(items.size()), 1, [&](int64_t begin, int64_t end) {
#if RS_AMX
    const TileConfig config;
    if (amx) _tile_loadconfig(&config);  // per thread: the tile state is a thread's own
#endif
    std::vector<float> K(PAIRS ? 0 : KB * dim), V(PAIRS ? 0 : KB * dim), St(KB * TILE);
    // pairs: the block's keys as stored ([KB][dim] bf16 = [KB][dim / 2] pairs), its values
    // as pairs of keys ([KB / 2][dim]: (value of key 2e, of key 2e + 1) at each dim)
    std::vector<uint32_t> Kp(PAIRS ? KB * dim / 2 : 0), Vp(PAIRS ? KB / 2 * dim : 0),
        Pp(PAIRS ? KB / 2 * TILE : 0);
    auto bits = [](const T* x, int64_t d) -> uint32_t {
      uint16_t b;
      std::memcpy(&b, x + d, 2);
      return b;
    };
    for (int64_t n = begin; n < end; ++n) {
      const Item& item = items[n];
      const Segment& seg = segments[item.segment];
      std::vector<Tile<KB>> tiles;
      for (int64_t h = item.kv_head * group; h < (item.kv_head + 1) * group; ++h)
        for (int64_t t0 = item.first; t0 < item.last; t0 += TILE) {
          tiles.emplace_back(h, t0, std::min<int64_t>(TILE, item.last - t0), seg.offset + t0, dim, window, PAIRS);
          Tile<KB>& tile = tiles.back();
          for (int64_t lane = 0; lane < tile.count; ++lane) {
            const T* qr = q.at(seg.start + t0 + lane, h);
            if constexpr (PAIRS)
              for (int64_t e = 0; e < dim / 2; ++e) tile.Qp[e * TILE + lane] = bits(qr, 2 * e) | bits(qr, 2 * e + 1) << 16;
            else
              for (int64_t d = 0; d < dim; ++d) tile.Qt[d * TILE + lane] = to_float(qr[d]) * fscale;
          }
        }
      // keys at positions [0, visible): the prefix's, then the segment's own; a block's keys past
      // them are zeros (not garbage: a masked key's value is still multiplied by 0). Under a window,
      // blocks before the item's first query's window are neither read nor computed.
      const int64_t visible = seg.offset + item.last;
      const int64_t blocks = (visible - 1) / KB + 1;
      const int64_t first_block = tiles.front().first_block;  // the item's first query is its first tile's
      const T zeros[1] = {T(0.0f)};
      const T* previous_value = nullptr;  // pairs: the even key's value row, or null past the keys
      for (int64_t b = first_block; b < blocks; ++b) {
        for (int64_t i = 0; i < KB; ++i) {
          const int64_t j = b * KB + i;
          const bool past = j >= visible;
          const T* kr = past ? zeros : j < seg.offset ? pk[seg.prefix].at(j, item.kv_head)
                                                      : k.at(seg.start + j - seg.offset, item.kv_head);
          const T* vr = past ? zeros : j < seg.offset ? pv[seg.prefix].at(j, item.kv_head)
                                                      : v.at(seg.start + j - seg.offset, item.kv_head);
          const int64_t stride = past ? 0 : 1;  // past the keys: every element reads the one zero
          if constexpr (PAIRS) {
            // a key row's bf16 values are already its (2e, 2e + 1) pairs: copied as they are
            if (past)
              std::memset(Kp.data() + i * (dim / 2), 0, 2 * dim);
            else
              std::memcpy(Kp.data() + i * (dim / 2), kr, 2 * dim);
            if (i % 2 == 0)
              previous_value = past ? nullptr : vr;
            else if (amx)  // the same pairs, transposed: [dim][KB / 2] (a tile's rows are dims)
              for (int64_t d = 0; d < dim; ++d)
                Vp[d * (KB / 2) + i / 2] = (previous_value ? bits(previous_value, d) : 0u) |
                                                  (past ? 0u : bits(vr, d)) << 16;
            else  // values of keys i - 1 and i interleaved: pair (key i - 1, key i) at each dim
              interleave(Vp.data() + (i / 2) * dim, previous_value, past ? nullptr : vr, dim);
          } else if (std::is_same<T, float>::value && !past) {  // fp32 rows copied as they are
            std::memcpy(K.data() + i * dim, kr, 4 * dim);
            std::memcpy(V.data() + i * dim, vr, 4 * dim);
          } else {
            for (int64_t d = 0; d < dim; ++d) {
              K[i * dim + d] = to_float(kr[d * stride]);
              V[i * dim + d] = to_float(vr[d * stride]);
            }
          }
        }
        for (Tile<KB>& tile : tiles)
          if (b >= tile.first_block && b < tile.blocks) {
            if constexpr (PAIRS)
              tile.template step<true>(b, Kp.data(), Vp.data(), St.data(), Pp.data(), int(dim), true, window, float(softcap),
                              fscale, amx);
            else
              tile.template step<false>(b, K.data(), V.data(), St.data(), nullptr, int(dim), std::is_same<T, at::BFloat16>::value,
                               window, float(softcap), fscale);
          }
      }
      for (const Tile<KB>& tile : tiles)
        for (int64_t lane = 0; lane < tile.count; ++lane) {
          const float inverse = 1.0f / tile.l[lane / LANES][lane % LANES];
          T* orow = o + (seg.start + tile.first + lane) * o_token + tile.head * o_head;
          for (int64_t d = 0; d < dim; ++d) orow[d] = static_cast<T>(tile.Ot[d * TILE + lane] * inverse);
        }
    }
#if RS_AMX
    // back to the initial state, as oneDNN's primitives and torch's brgemm users leave it: whoever
    // uses tiles next loads its own configuration (a product right after costs the same either way)
    if (amx) _tile_release();
#endif
  });
}

template <typename T>
void run(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, at::Tensor& out,
         const std::vector<Segment>& segments, const std::vector<at::Tensor>& prefix_keys,
         const std::vector<at::Tensor>& prefix_values, double scale, int64_t window, double softcap) {
  constexpr bool PAIRS = RS_PAIRS && std::is_same<T, at::BFloat16>::value;
  // AMX tiles take 32 dims at a time; other head sizes (and a kernel the OS refuses tiles) use the pairs
  const bool amx = PAIRS && RS_AMX && query.size(2) % 32 == 0 && amx_permitted();
  if constexpr (PAIRS && RS_AMX)
    if (amx)  // bf16 on tiles, in larger key blocks (the block's other products take 32 keys: AMX only)
      return run_blocks<T, AMX_KEY_BLOCK>(query, key, value, out, segments, prefix_keys, prefix_values, scale,
                                          window, softcap, true);
  run_blocks<T, KEY_BLOCK>(query, key, value, out, segments, prefix_keys, prefix_values, scale, window, softcap, amx);
}

// query [T, heads, dim], key/value [T, kv_heads, dim] (one packed row; dim contiguous); out
// [T, heads, dim]. segments: int64 [S, 4] rows (start, length, offset, prefix index or -1);
// prefix_keys/values[i]: [offset, kv_heads, dim], the recorded keys a segment continues.
// window: the layer's sliding window in tokens (0: none); softcap: its logit softcapping (0: none).
void packed_attention(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, at::Tensor& out,
                      const at::Tensor& segments, const std::vector<at::Tensor>& prefix_keys,
                      const std::vector<at::Tensor>& prefix_values, double scale, int64_t window, double softcap) {
  TORCH_CHECK(window >= 0 && softcap >= 0, "window and softcap must be >= 0 (0: none)");
  TORCH_CHECK(query.dim() == 3 && key.dim() == 3 && value.dim() == 3 && out.dim() == 3, "expected [T, heads, dim] tensors");
  TORCH_CHECK(query.device().is_cpu(), "CPU tensors only");
  TORCH_CHECK(query.size(2) % 2 == 0, "head dim must be even");
  TORCH_CHECK(query.size(1) % key.size(1) == 0, "query heads must be a multiple of key heads");
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&query, &key, &value, &out}) {
    TORCH_CHECK(t->stride(2) == 1, "the head dimension must be contiguous");
    TORCH_CHECK(t->scalar_type() == query.scalar_type(), "all tensors must share one dtype");
  }
  TORCH_CHECK(segments.scalar_type() == at::kLong && segments.dim() == 2 && segments.size(1) == 4, "segments: int64 [S, 4]");
  const at::Tensor seg = segments.contiguous();
  std::vector<Segment> list;
  const int64_t* s = seg.data_ptr<int64_t>();
  for (int64_t i = 0; i < seg.size(0); ++i) {
    Segment one{s[4 * i], s[4 * i + 1], s[4 * i + 2], s[4 * i + 3]};
    TORCH_CHECK(one.start >= 0 && one.start + one.length <= query.size(0), "segment ", i, " outside the row");
    TORCH_CHECK(one.offset == 0 || (one.prefix >= 0 && one.prefix < int64_t(prefix_keys.size()) &&
                                    prefix_keys[one.prefix].size(0) >= one.offset), "segment ", i, ": bad prefix");
    list.push_back(one);
  }
  for (size_t i = 0; i < prefix_keys.size(); ++i)
    TORCH_CHECK(prefix_keys[i].stride(2) == 1 && prefix_values[i].stride(2) == 1 &&
                prefix_keys[i].scalar_type() == query.scalar_type(), "prefix ", i, ": bad layout or dtype");
  if (query.scalar_type() == at::kFloat)
    run<float>(query, key, value, out, list, prefix_keys, prefix_values, scale, window, softcap);
  else if (query.scalar_type() == at::kBFloat16)
    run<at::BFloat16>(query, key, value, out, list, prefix_keys, prefix_values, scale, window, softcap);
  else
    TORCH_CHECK(false, "float32 or bfloat16 only");
}

}  // namespace

void register_layers(pybind11::module& m);  // layers.cpp: the element-wise work of a decoder layer

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  register_layers(m);
  // every function runs without the GIL (tensors only): the process's other Python threads (Triton's stub
  // taking requests while the engine's worker computes) go on meanwhile
  m.def("packed_attention", &packed_attention, "Batch-invariant causal attention over a packed row (CPU)",
        py::call_guard<py::gil_scoped_release>(),
        py::arg("query"), py::arg("key"), py::arg("value"), py::arg("out"), py::arg("segments"), py::arg("prefix_keys"),
        py::arg("prefix_values"), py::arg("scale"), py::arg("window") = 0, py::arg("softcap") = 0.0);
  m.attr("lanes") = LANES;
  m.attr("bf16_pairs") = bool(RS_PAIRS);  // bf16 products in AVX-512 BF16 pairs (vdpbf16ps)
  m.attr("amx") = bool(RS_AMX) && amx_permitted();  // bf16 products on AMX tiles (head sizes of 32k)
  m.attr("key_block") = KEY_BLOCK;
  m.attr("amx_key_block") = RS_AMX ? AMX_KEY_BLOCK : KEY_BLOCK;  // bf16 on AMX tiles
}
