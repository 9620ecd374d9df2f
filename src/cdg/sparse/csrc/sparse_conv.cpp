// Sparse inference kernels of CDG's gated 3x3 convolution (cdg/sparse/engine.py, docs/design.md §1):
// float32, channels-last (N x H x W x C contiguous), branch a1 (base path = the diagonal blocks).
//
//   base_conv   Y_base = X * W_b (Eq. 1), the grouped 3x3 convolution of the diagonal blocks. Each
//               8-lane vector of output channels reads only the input channels of its own group(s);
//               register-blocked over P consecutive output positions (P accumulators: one weight
//               vector load and P broadcasts per P FMAs).
//   thresholds  per sample and gate entry e (a channel, or a run of C_g channels, Eq. 12):
//               thr = mu + tau * sqrt(var + 1e-5) of S = Y_base (or its C_g mean) over H x W, in
//               double; M = [S > thr] is normal(S) > tau (Eq. 2), the test of _gate_inference.
//   cond        Eq. 3, Y = Y_base + M * Y_cond, with Y_cond = conv(X, W_c), W_c = W - W_b, computed
//               ONLY at the open (position, channel) entries, then the epilogue
//               out = relu(a * Y + b + residual) (the following BatchNorm as a per-channel affine, the
//               block's shortcut, ReLU).
//
// Both convolution kernels work on tiles of output rows of one sample. A tile first copies the input
// rows it reads into a buffer with one zero pixel left and right (and zero rows above/below the
// image), 64-byte aligned and sized to stay in L1; a patch is then 3 segments (kh = 0, 1, 2) of
// 3 x C_in contiguous floats read in place (no im2col).
// The cond kernel has two loop orders, both dot products over input channels in 8-lane vectors with
// an 8-way transposing reduction at the end:
//   channel-major (C_out > 32): per output channel, the list of its open positions in the tile (one
//     byte per (position, entry) from a vectorised compare, then a branch-free compaction) and dot
//     products of the channel's W_c row (in L1 for the whole tile) with the patches of 8 open
//     positions at a time (one weight load per 8 FMAs). Where C_in / G is a multiple of 8 the
//     channel's own group of input channels (the base path's) is skipped, so an open entry costs
//     (1 - 1/G) of a dense output's MACs; otherwise those weights are zero and read.
//   position-major (C_out <= 32): per position, its open channels (AVX2: compare 8 channels,
//     compact their indices with a permutation looked up by the 8-bit mask; no branch) and dot
//     products of the patch with up to 8 open channels' W_c rows at a time (one input load per 8
//     FMAs), then the epilogue of the position's row while it is hot.
// With C_g > 1 an open entry opens C_g consecutive channels, which join the same blocks, except:
//   block order (C_g a multiple of 8, packed weights given): per gate entry, the list of its open
//     positions in the tile, then an outer-product micro-kernel over 6 open positions x 16 channels
//     (or 12 x 8): per input channel two weight vectors and six broadcasts feed twelve FMAs, the
//     GEMM form, with the entry's own input group skipped. Tiles are larger here (longer lists).

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX__)
#include <immintrin.h>
#endif

namespace {

typedef float v8 __attribute__((vector_size(32)));

inline v8 load8(const float* p) {
  v8 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void store8(float* p, const v8& v) { std::memcpy(p, &v, sizeof v); }
inline v8 splat(float x) { return v8{x, x, x, x, x, x, x, x}; }

inline float hsum(const v8& v) {
  float s = 0.0f;
  for (int j = 0; j < 8; ++j) s += v[j];
  return s;
}

// out[k] = sum of the 8 lanes of acc[k], k < K
template <int K>
inline void reduce(const v8* acc, float* out) {
#if defined(__AVX__)
  if constexpr (K > 2) {
    __m256 a[8];
    for (int k = 0; k < 8; ++k) a[k] = k < K ? (__m256)acc[k] : _mm256_setzero_ps();
    __m256 t0 = _mm256_hadd_ps(a[0], a[1]), t1 = _mm256_hadd_ps(a[2], a[3]);
    __m256 t2 = _mm256_hadd_ps(a[4], a[5]), t3 = _mm256_hadd_ps(a[6], a[7]);
    t0 = _mm256_hadd_ps(t0, t1);
    t2 = _mm256_hadd_ps(t2, t3);
    const __m256 r = _mm256_add_ps(_mm256_permute2f128_ps(t0, t2, 0x20), _mm256_permute2f128_ps(t0, t2, 0x31));
    float tmp[8];
    _mm256_storeu_ps(tmp, r);
    for (int k = 0; k < K; ++k) out[k] = tmp[k];
    return;
  }
#endif
  for (int k = 0; k < K; ++k) out[k] = hsum(acc[k]);
}

// S of gate entry e at one position: the channel, or the mean of its C_g channels (Eq. 12). The
// thresholds and the cond kernel use this same function, so an entry is decided consistently.
inline float salience(const float* y, int64_t cg) {
  if (cg == 1) return y[0];
  float s = 0.0f;
  for (int64_t j = 0; j < cg; ++j) s += y[j];
  return s / static_cast<float>(cg);
}

std::atomic<int64_t> g_calls_base{0}, g_calls_thresholds{0}, g_calls_cond{0}, g_calls_combine{0}, g_calls_blocks{0};
// optional phase timing of the cond kernel (set_profile): ns in (input rows, gate, lists + dots, epilogue)
bool g_profile = false;
std::atomic<int64_t> g_phase_ns[4];
inline int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// layers with at most this many output channels run the cond kernel in position-major order
constexpr int64_t POSITION_MAJOR_MAX_CO = 32;

struct Geom {
  int64_t n, h, w, ci, ho, wo, co, s;
};

// A tile: output rows [oh0, oh1) of samples [n0, n1) (several samples only when they are whole).
struct Tile {
  int64_t n0, n1, oh0, oh1;
  int64_t rows() const { return oh1 - oh0; }
};

// bytes of padded input rows that samples of small feature maps may share in one tile: the
// weights then pass through the caches once per tile rather than once per sample
constexpr int64_t MULTI_SAMPLE_BYTES = 256 * 1024;

// Output rows per tile: as many as keep the padded input rows they read within `budget` bytes;
// where a whole sample fits, as many whole samples as fit in MULTI_SAMPLE_BYTES.
std::vector<Tile> plan_tiles(const Geom& g, int64_t budget) {
  const int64_t row_bytes = (g.w + 2) * g.ci * static_cast<int64_t>(sizeof(float));
  int64_t tr = 1;
  while (tr < g.ho && (tr * g.s + 3) * row_bytes <= budget) ++tr;
  std::vector<Tile> tiles;
  if (tr < g.ho) {
    for (int64_t n = 0; n < g.n; ++n)
      for (int64_t oh = 0; oh < g.ho; oh += tr) tiles.push_back({n, n + 1, oh, std::min(g.ho, oh + tr)});
    return tiles;
  }
  const int64_t sample_bytes = ((g.ho - 1) * g.s + 3) * row_bytes;
  const int64_t per = std::max<int64_t>(1, std::min(g.n, MULTI_SAMPLE_BYTES / sample_bytes));
  for (int64_t n = 0; n < g.n; n += per) tiles.push_back({n, std::min(g.n, n + per), 0, g.ho});
  return tiles;
}

// The input rows a tile reads, per sample, with a zero pixel either side; rows outside the image are
// zero. The copy starts on a 64-byte boundary (with C_in a multiple of 8 no vector load of a patch
// then straddles two cache lines). Returns the start; *rs = the row stride, *ss = the sample stride
// (floats).
const float* fill_rows(const float* x, const Geom& g, const Tile& t, std::vector<float>& buf, int64_t* rs_out,
                       int64_t* ss_out) {
  const int64_t rs = (g.w + 2) * g.ci, rows = (t.rows() - 1) * g.s + 3, ss = rows * rs;
  buf.resize((t.n1 - t.n0) * ss + 16);
  float* base = buf.data();
  base += ((64 - reinterpret_cast<uintptr_t>(base) % 64) % 64) / sizeof(float);
  for (int64_t n = t.n0; n < t.n1; ++n) {
    for (int64_t lr = 0; lr < rows; ++lr) {
      const int64_t ih = t.oh0 * g.s - 1 + lr;
      float* d = base + (n - t.n0) * ss + lr * rs;
      if (ih < 0 || ih >= g.h) {
        std::memset(d, 0, rs * sizeof(float));
      } else {
        std::memset(d, 0, g.ci * sizeof(float));
        std::memcpy(d + g.ci, x + (n * g.h + ih) * g.w * g.ci, g.w * g.ci * sizeof(float));
        std::memset(d + (g.w + 1) * g.ci, 0, g.ci * sizeof(float));
      }
    }
  }
  *rs_out = rs;
  *ss_out = ss;
  return base;
}

// ------------------------------------------------------------------------------------ base path

// P consecutive output positions x V chunks of 8 output channels that read the same input channels
// (one output group): P x V accumulators, V weight loads and P broadcasts per P x V FMAs.
// xb[q]: position q's tap (0, 0) in the padded rows; toff[t]: offset of tap t; wk: V x [9][nci][8].
template <int P, int V>
inline void base_block(const float* const* xb, const int64_t* toff, const bool* tap_ok, const float* wk, int64_t ci0,
                       int64_t nci, v8* acc) {
  for (int j = 0; j < P * V; ++j) acc[j] = v8{};
  const int64_t vstride = 9 * nci * 8;
  for (int t = 0; t < 9; ++t) {
    if (!tap_ok[t]) continue;
    const float* __restrict w = wk + t * nci * 8;
    const float* xs[P];
    for (int q = 0; q < P; ++q) xs[q] = xb[q] + toff[t] + ci0;
    for (int64_t i = 0; i < nci; ++i) {
      v8 wv[V];
      for (int v = 0; v < V; ++v) wv[v] = load8(w + v * vstride + i * 8);
      for (int q = 0; q < P; ++q) {
        const v8 xv = splat(xs[q][i]);
        for (int v = 0; v < V; ++v) acc[q * V + v] += xv * wv[v];
      }
    }
  }
}

template <int P, int V>
void store_block(const v8* acc, float* y, const Geom& g, int64_t n, int64_t oh, int64_t ow0, int64_t np, int64_t k) {
  for (int v = 0; v < V; ++v) {
    const int64_t lanes = std::min<int64_t>(8, g.co - 8 * (k + v));
    for (int64_t q = 0; q < np; ++q) {
      float* dst = y + (((n * g.ho) + oh) * g.wo + ow0 + q) * g.co + 8 * (k + v);
      if (lanes == 8) {
        store8(dst, acc[q * V + v]);
      } else {
        float tmp[8];
        store8(tmp, acc[q * V + v]);
        std::memcpy(dst, tmp, lanes * sizeof(float));
      }
    }
  }
}

// One tile. Chunk pairs of one output group (C_out / G >= 16) run as 4 positions x 2 chunks, other
// chunks as 8 positions x 1 chunk: 8 accumulators either way. Chunks are the outer loop, so that a
// chunk's weights stay in L1 over the whole tile.
void base_tile(const float* x, const float* wp, const int64_t* meta, int64_t nk, float* y, const Geom& g,
               const Tile& tile, std::vector<float>& buf) {
  int64_t rs = 0, ss = 0;
  const float* rows = fill_rows(x, g, tile, buf, &rs, &ss);
  int64_t toff[9];
  for (int t = 0; t < 9; ++t) toff[t] = (t / 3) * rs + (t % 3) * g.ci;
  const float* xb[8];
  bool tap_ok[9];
  v8 acc[8];
  int64_t k = 0;
  while (k < nk) {
    const int64_t ci0 = meta[3 * k], nci = meta[3 * k + 1], woff = meta[3 * k + 2];
    const bool pair = k + 1 < nk && meta[3 * (k + 1)] == ci0 && meta[3 * (k + 1) + 1] == nci &&
                      meta[3 * (k + 1) + 2] == woff + 9 * nci * 8;
    const int P = pair ? 4 : 8;
    for (int64_t n = tile.n0; n < tile.n1; ++n) {
      for (int64_t oh = tile.oh0; oh < tile.oh1; ++oh) {
        for (int t = 0; t < 9; ++t) {
          const int64_t ih = oh * g.s - 1 + t / 3;
          tap_ok[t] = ih >= 0 && ih < g.h;  // taps on the zero rows above/below the image are skipped
        }
        const float* row = rows + (n - tile.n0) * ss + (oh - tile.oh0) * g.s * rs;
        for (int64_t ow0 = 0; ow0 < g.wo; ow0 += P) {
          const int64_t np = std::min<int64_t>(P, g.wo - ow0);
          for (int q = 0; q < P; ++q) xb[q] = row + std::min<int64_t>(ow0 + q, g.wo - 1) * g.s * g.ci;
          if (pair) {
            base_block<4, 2>(xb, toff, tap_ok, wp + woff, ci0, nci, acc);
            store_block<4, 2>(acc, y, g, n, oh, ow0, np, k);
          } else {
            base_block<8, 1>(xb, toff, tap_ok, wp + woff, ci0, nci, acc);
            store_block<8, 1>(acc, y, g, n, oh, ow0, np, k);
          }
        }
      }
    }
    k += pair ? 2 : 1;
  }
}

// ------------------------------------------------------------------------------------ cond path

struct Range {
  int64_t begin, end;
};

// K dot products of one output channel's W_c row with the patches of K positions: xs[q] points at
// the first segment of position q's patch, the segments are rs floats apart; the ranges select the
// input channels read inside a 3 x C_in segment.
template <int K>
inline void dot_block(const float* const* xb, int64_t rs, const float* __restrict wrow, int64_t seglen,
                      const Range* rng, int nr, float* out) {
  v8 acc[K];
  float tail[K];
  for (int q = 0; q < K; ++q) {
    acc[q] = v8{};
    tail[q] = 0.0f;
  }
  for (int kh = 0; kh < 3; ++kh) {
    const float* xs[K];
    for (int q = 0; q < K; ++q) xs[q] = xb[q] + kh * rs;
    const float* __restrict wt = wrow + kh * seglen;
    for (int r = 0; r < nr; ++r) {
      int64_t i = rng[r].begin;
      const int64_t end = rng[r].end;
      for (; i + 8 <= end; i += 8) {
        const v8 wv = load8(wt + i);
        for (int q = 0; q < K; ++q) acc[q] += load8(xs[q] + i) * wv;
      }
      for (; i < end; ++i)
        for (int q = 0; q < K; ++q) tail[q] += xs[q][i] * wt[i];
    }
  }
  reduce<K>(acc, out);
  for (int q = 0; q < K; ++q) out[q] += tail[q];
}

inline void dot_any(int k, const float* const* xb, int64_t rs, const float* wrow, int64_t seglen, const Range* rng,
                    int nr, float* out) {
  switch (k) {
    case 1: dot_block<1>(xb, rs, wrow, seglen, rng, nr, out); break;
    case 2: dot_block<2>(xb, rs, wrow, seglen, rng, nr, out); break;
    case 3: dot_block<3>(xb, rs, wrow, seglen, rng, nr, out); break;
    case 4: dot_block<4>(xb, rs, wrow, seglen, rng, nr, out); break;
    case 5: dot_block<5>(xb, rs, wrow, seglen, rng, nr, out); break;
    case 6: dot_block<6>(xb, rs, wrow, seglen, rng, nr, out); break;
    case 7: dot_block<7>(xb, rs, wrow, seglen, rng, nr, out); break;
    default: dot_block<8>(xb, rs, wrow, seglen, rng, nr, out); break;
  }
}

struct CondArgs {
  const float* x;
  const float* yb;
  const float* thr;
  const float* wz;  // (co, 9, ci), diagonal blocks zero
  const float* wblk;  // null, or per 8-channel chunk [9][ci][8] (cond_tile_blocks)
  const float* scale;
  const float* bias;
  const float* res;  // may be null
  float* out;
  uint8_t* mask;  // may be null: (n, ho, wo, co / cg)
  const std::vector<std::vector<Range>>* ranges;  // per output group: input ranges inside a segment
  Geom g;
  int64_t cg, groups;
  bool relu;
  bool positions;  // position-major order (cond_tile_positions)
};

struct TileBuffers {
  std::vector<float> rows;     // the padded input rows of the tile
  std::vector<int64_t> off;    // per position: offset of its patch in rows
  std::vector<uint8_t> open;   // (position, gate entry) 0/1
  std::vector<int32_t> list;   // open positions of the current gate entry (open channels, position-major)
  std::vector<float> cond;     // the cond values of one position (position-major)
};

// Output rows [oh0, oh1) of sample n: (1) the padded input rows, (2) the gate bytes, then per output
// channel (3) its open positions and their dot products in blocks of 8, scattered into out (zero
// where closed), and (4) the epilogue.
// The open channels of one position, in order, into lst (room for co + 8 entries); returns how many.
// C_g = 1 with AVX2: 8 channels per compare, compacted with a permutation looked up by the 8-bit mask
// (no branch); otherwise a branch-free scalar compaction.
#if defined(__AVX2__)
struct CompactTable {
  alignas(32) int32_t idx[256][8];
  CompactTable() {
    for (int m = 0; m < 256; ++m) {
      int k = 0;
      for (int j = 0; j < 8; ++j)
        if (m & (1 << j)) idx[m][k++] = j;
      for (; k < 8; ++k) idx[m][k] = 0;
    }
  }
};
const CompactTable g_compact;
#endif

inline int64_t open_channels(const float* __restrict ybp, const float* __restrict th, int64_t co, int64_t cg,
                             int32_t* __restrict lst) {
  int64_t m = 0;
  if (cg == 1) {
    int64_t c = 0;
#if defined(__AVX2__)
    for (; c + 8 <= co; c += 8) {
      const __m256 gt = _mm256_cmp_ps(_mm256_loadu_ps(ybp + c), _mm256_loadu_ps(th + c), _CMP_GT_OQ);
      const int mask = _mm256_movemask_ps(gt);
      const __m256i perm = _mm256_load_si256(reinterpret_cast<const __m256i*>(g_compact.idx[mask]));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(lst + m), _mm256_add_epi32(perm, _mm256_set1_epi32(static_cast<int>(c))));
      m += __builtin_popcount(mask);
    }
#endif
    for (; c < co; ++c) {
      lst[m] = static_cast<int32_t>(c);
      m += ybp[c] > th[c] ? 1 : 0;
    }
    return m;
  }
  for (int64_t e = 0; e < co / cg; ++e) {
    const int64_t open = salience(ybp + e * cg, cg) > th[e] ? 1 : 0;
    for (int64_t j = 0; j < cg; ++j) lst[m + j] = static_cast<int32_t>(e * cg + j);
    m += open * cg;
  }
  return m;
}

// out row p = relu?(a * (Y_base + cond) + b + residual); cond from a buffer, or out's own row (each
// element is read before it is written, so cv may alias it: no __restrict on cv)
inline void epilogue_row(const CondArgs& a, int64_t p, const float* cv) {
  const int64_t co = a.g.co;
  const float* __restrict sc = a.scale;
  const float* __restrict bi = a.bias;
  const float* __restrict ybp = a.yb + p * co;
  float* __restrict op = a.out + p * co;
  const float* __restrict rp = a.res != nullptr ? a.res + p * co : nullptr;
  if (rp != nullptr && a.relu) {
#pragma omp simd
    for (int64_t c = 0; c < co; ++c) {
      const float v = sc[c] * (ybp[c] + cv[c]) + bi[c] + rp[c];
      op[c] = v < 0.0f ? 0.0f : v;
    }
  } else if (rp != nullptr) {
#pragma omp simd
    for (int64_t c = 0; c < co; ++c) op[c] = sc[c] * (ybp[c] + cv[c]) + bi[c] + rp[c];
  } else if (a.relu) {
#pragma omp simd
    for (int64_t c = 0; c < co; ++c) {
      const float v = sc[c] * (ybp[c] + cv[c]) + bi[c];
      op[c] = v < 0.0f ? 0.0f : v;
    }
  } else {
#pragma omp simd
    for (int64_t c = 0; c < co; ++c) op[c] = sc[c] * (ybp[c] + cv[c]) + bi[c];
  }
}

// the epilogue of positions [p0, p1) whose cond values are in out
inline void epilogue(const CondArgs& a, int64_t p0, int64_t p1) {
  for (int64_t p = p0; p < p1; ++p) epilogue_row(a, p, a.out + p * a.g.co);
}

// K dot products of one position's patch with the W_c rows of K output channels: one input vector
// load per K FMAs (position-major order, for layers with few output channels).
template <int K>
inline void dot_rows(const float* xb, int64_t rs, const float* const* wr, int64_t seglen, const Range* rng, int nr,
                     float* out) {
  v8 acc[K];
  float tail[K];
  for (int k = 0; k < K; ++k) {
    acc[k] = v8{};
    tail[k] = 0.0f;
  }
  for (int kh = 0; kh < 3; ++kh) {
    const float* __restrict xs = xb + kh * rs;
    const int64_t wo = kh * seglen;
    for (int r = 0; r < nr; ++r) {
      int64_t i = rng[r].begin;
      const int64_t end = rng[r].end;
      for (; i + 8 <= end; i += 8) {
        const v8 xv = load8(xs + i);
        for (int k = 0; k < K; ++k) acc[k] += xv * load8(wr[k] + wo + i);
      }
      for (; i < end; ++i)
        for (int k = 0; k < K; ++k) tail[k] += xs[i] * wr[k][wo + i];
    }
  }
  reduce<K>(acc, out);
  for (int k = 0; k < K; ++k) out[k] += tail[k];
}

inline void dot_rows_any(int k, const float* xb, int64_t rs, const float* const* wr, int64_t seglen, const Range* rng,
                         int nr, float* out) {
  switch (k) {
    case 1: dot_rows<1>(xb, rs, wr, seglen, rng, nr, out); break;
    case 2: dot_rows<2>(xb, rs, wr, seglen, rng, nr, out); break;
    case 3: dot_rows<3>(xb, rs, wr, seglen, rng, nr, out); break;
    case 4: dot_rows<4>(xb, rs, wr, seglen, rng, nr, out); break;
    case 5: dot_rows<5>(xb, rs, wr, seglen, rng, nr, out); break;
    case 6: dot_rows<6>(xb, rs, wr, seglen, rng, nr, out); break;
    case 7: dot_rows<7>(xb, rs, wr, seglen, rng, nr, out); break;
    default: dot_rows<8>(xb, rs, wr, seglen, rng, nr, out); break;
  }
}

// Position-major order (few output channels): per position, the list of its open channels (a
// branch-free compaction of the gate test), then dot products of its patch with up to 8 open
// channels' W_c rows at a time (all input channels, diagonal weights zero), then the epilogue of
// the position's output row while it is hot.
int64_t cond_tile_positions(const CondArgs& a, const Tile& tile, TileBuffers& b) {
  const Geom& g = a.g;
  const int64_t ne = g.co / a.cg, seglen = 3 * g.ci;
  int64_t rs = 0, ss = 0;
  const float* rows = fill_rows(a.x, g, tile, b.rows, &rs, &ss);
  b.list.resize(g.co + 8);
  b.cond.resize(g.co);
  int32_t* __restrict lst = b.list.data();
  float* __restrict cv = b.cond.data();
  const Range full{0, seglen};
  const float* wr[8];
  float vals[8];
  int64_t total = 0;
  for (int64_t n = tile.n0; n < tile.n1; ++n) {
  const float* __restrict th = a.thr + n * ne;
  for (int64_t oh = tile.oh0; oh < tile.oh1; ++oh) {
    const float* xrow = rows + (n - tile.n0) * ss + (oh - tile.oh0) * g.s * rs;
    for (int64_t ow = 0; ow < g.wo; ++ow) {
      const int64_t p = (n * g.ho + oh) * g.wo + ow;
      const float* __restrict ybp = a.yb + p * g.co;
      const int64_t m = open_channels(ybp, th, g.co, a.cg, lst);
      if (a.mask != nullptr) {
        uint8_t* mk = a.mask + p * ne;
        std::memset(mk, 0, ne);
        for (int64_t i = 0; i < m; i += a.cg) mk[lst[i] / a.cg] = 1;
      }
      total += m;
      std::memset(cv, 0, g.co * sizeof(float));
      const float* xb = xrow + ow * g.s * g.ci;
      for (int64_t i = 0; i < m; i += 8) {
        const int k = static_cast<int>(std::min<int64_t>(8, m - i));
        for (int j = 0; j < k; ++j) wr[j] = a.wz + static_cast<int64_t>(lst[i + j]) * 9 * g.ci;
        dot_rows_any(k, xb, rs, wr, seglen, &full, 1, vals);
        for (int j = 0; j < k; ++j) cv[lst[i + j]] = vals[j];
      }
      epilogue_row(a, p, cv);
    }
  }
  }
  return total;
}

// The padded input rows of a tile and, per tile position, the offset of its patch in them (b.off).
const float* tile_rows(const CondArgs& a, const Tile& tile, TileBuffers& b, int64_t* rs, int64_t* ss) {
  const Geom& g = a.g;
  const float* rows = fill_rows(a.x, g, tile, b.rows, rs, ss);
  b.off.resize((tile.n1 - tile.n0) * tile.rows() * g.wo);
  for (int64_t s = 0, q = 0; s < tile.n1 - tile.n0; ++s)
    for (int64_t r = 0; r < tile.rows(); ++r)
      for (int64_t ow = 0; ow < g.wo; ++ow, ++q) b.off[q] = s * *ss + r * g.s * *rs + ow * g.s * g.ci;
  return rows;
}

// The gate bytes of a tile, (position, entry) in b.open (and the mask output): position by position,
// a contiguous row of Y_base against the sample's thresholds.
void tile_gates(const CondArgs& a, const Tile& tile, TileBuffers& b) {
  const Geom& g = a.g;
  const int64_t per_sample = tile.rows() * g.wo, tp = (tile.n1 - tile.n0) * per_sample;
  const int64_t p0 = (tile.n0 * g.ho + tile.oh0) * g.wo, ne = g.co / a.cg;
  b.open.resize(tp * ne);
  for (int64_t q = 0; q < tp; ++q) {
    const float* __restrict th = a.thr + (tile.n0 + q / per_sample) * ne;
    const float* __restrict ybp = a.yb + (p0 + q) * g.co;
    uint8_t* __restrict oq = b.open.data() + q * ne;
    if (a.cg == 1) {
#pragma omp simd
      for (int64_t e = 0; e < ne; ++e) oq[e] = ybp[e] > th[e] ? 1 : 0;
    } else {
      for (int64_t e = 0; e < ne; ++e) oq[e] = salience(ybp + e * a.cg, a.cg) > th[e] ? 1 : 0;
    }
  }
  if (a.mask != nullptr) std::memcpy(a.mask + p0 * ne, b.open.data(), tp * ne);
}

int64_t cond_tile(const CondArgs& a, const Tile& tile, TileBuffers& b) {
  const Geom& g = a.g;
  const int64_t per_sample = tile.rows() * g.wo;  // positions of one sample in the tile
  const int64_t p0 = (tile.n0 * g.ho + tile.oh0) * g.wo, tp = (tile.n1 - tile.n0) * per_sample;
  const int64_t ne = g.co / a.cg, seglen = 3 * g.ci;
  int64_t t_prev = g_profile ? now_ns() : 0;
  auto lap = [&](int i) {
    if (!g_profile) return;
    const int64_t t = now_ns();
    g_phase_ns[i].fetch_add(t - t_prev);
    t_prev = t;
  };
  int64_t rs = 0, ss = 0;
  const float* rows = tile_rows(a, tile, b, &rs, &ss);
  lap(0);
  tile_gates(a, tile, b);  // (2)
  std::memset(a.out + p0 * g.co, 0, tp * g.co * sizeof(float));
  lap(1);
  b.list.resize(tp);
  const int64_t cog = g.co / a.groups;
  const float* xb[8];
  float vals[8];
  int64_t total = 0, m = 0;
  int32_t* __restrict lst = b.list.data();
  for (int64_t c = 0; c < g.co; ++c) {
    if (c % a.cg == 0) {  // (3) the open positions of gate entry c / C_g, without branches
      m = 0;
      const uint8_t* __restrict oe = b.open.data() + c / a.cg;
      for (int64_t q = 0; q < tp; ++q) {
        lst[m] = static_cast<int32_t>(q);
        m += oe[q * ne];
      }
    }
    if (m == 0) continue;
    total += m;
    const std::vector<Range>& rg = (*a.ranges)[c / cog];
    const float* wrow = a.wz + c * 9 * g.ci;
    float* oc = a.out + p0 * g.co + c;
    for (int64_t i = 0; i < m; i += 8) {
      const int k = static_cast<int>(std::min<int64_t>(8, m - i));
      for (int j = 0; j < k; ++j) xb[j] = rows + b.off[lst[i + j]];
      dot_any(k, xb, rs, wrow, seglen, rg.data(), static_cast<int>(rg.size()), vals);
      for (int j = 0; j < k; ++j) oc[static_cast<int64_t>(lst[i + j]) * g.co] = vals[j];
    }
  }
  lap(2);
  epilogue(a, p0, p0 + tp);  // (4)
  lap(3);
  return total;
}

// ------------------------------------------------------------------ cond path, structured masks

// P open positions x V chunks of 8 output channels of one gate entry (C_g a multiple of 8): an
// outer product per input channel (V weight loads, P broadcasts, P x V FMAs), the GEMM micro-kernel
// form of base_block over a list of gathered positions. xb[q]: position q's tap (0, 0) in the
// padded rows; wk: V x [9][C_in][8] (the entry's W_c chunks); rng: the input channels read (all but
// the entry's own group, whose weights belong to the base path).
template <int P, int V>
inline void cond_block(const float* const* xb, const int64_t* toff, const float* wk, int64_t ci, const Range* rng,
                       int nr, v8* acc) {
  for (int j = 0; j < P * V; ++j) acc[j] = v8{};
  const int64_t vstride = 9 * ci * 8;
  for (int t = 0; t < 9; ++t) {
    const float* __restrict w = wk + t * ci * 8;
    const float* xs[P];
    for (int q = 0; q < P; ++q) xs[q] = xb[q] + toff[t];
    for (int r = 0; r < nr; ++r) {
      for (int64_t i = rng[r].begin; i < rng[r].end; ++i) {
        v8 wv[V];
        for (int v = 0; v < V; ++v) wv[v] = load8(w + v * vstride + i * 8);
        for (int q = 0; q < P; ++q) {
          const v8 xv = splat(xs[q][i]);
          for (int v = 0; v < V; ++v) acc[q * V + v] += xv * wv[v];
        }
      }
    }
  }
}

// cond_block for k <= P positions, then the k x V results into their output rows (dst[q]).
template <int P, int V>
inline void cond_store(int k, const float* const* xb, const int64_t* toff, const float* wk, int64_t ci,
                       const Range* rng, int nr, float* const* dst) {
  v8 acc[P * V];
  switch (k) {  // the tail block computes only its k positions
#define CDG_COND_CASE(K) \
  case K: if constexpr (K <= P) cond_block<K, V>(xb, toff, wk, ci, rng, nr, acc); break;
    CDG_COND_CASE(1) CDG_COND_CASE(2) CDG_COND_CASE(3) CDG_COND_CASE(4) CDG_COND_CASE(5) CDG_COND_CASE(6)
    CDG_COND_CASE(7) CDG_COND_CASE(8) CDG_COND_CASE(9) CDG_COND_CASE(10) CDG_COND_CASE(11)
#undef CDG_COND_CASE
    default: cond_block<P, V>(xb, toff, wk, ci, rng, nr, acc); break;
  }
  for (int q = 0; q < k; ++q)
    for (int v = 0; v < V; ++v) store8(dst[q] + 8 * v, acc[q * V + v]);
}

// Block order (C_g a multiple of 8): per gate entry, its open positions in the tile, in blocks of 6
// positions x 16 channels (or 12 x 8): all of an open entry's channels in whole vectors.
int64_t cond_tile_blocks(const CondArgs& a, const Tile& tile, TileBuffers& b) {
  constexpr int P2 = 6, P1 = 12;  // 12 accumulators either way (AVX2 has 16 vector registers)
  const Geom& g = a.g;
  const int64_t per_sample = tile.rows() * g.wo;
  const int64_t p0 = (tile.n0 * g.ho + tile.oh0) * g.wo, tp = (tile.n1 - tile.n0) * per_sample;
  const int64_t ne = g.co / a.cg, nv = a.cg / 8, cog = g.co / a.groups, cig = g.ci / a.groups;
  int64_t rs = 0, ss = 0;
  const float* rows = tile_rows(a, tile, b, &rs, &ss);
  tile_gates(a, tile, b);
  int64_t toff[9];
  for (int t = 0; t < 9; ++t) toff[t] = (t / 3) * rs + (t % 3) * g.ci;
  b.list.resize(tp);
  int32_t* __restrict lst = b.list.data();
  float* out0 = a.out + p0 * g.co;
  std::memset(out0, 0, tp * g.co * sizeof(float));  // Y_cond = 0 where the gate is closed
  const float* xb[P1];
  float* dst[P1];
  int64_t total = 0;
  for (int64_t e = 0; e < ne; ++e) {
    int64_t m = 0;
    const uint8_t* __restrict oe = b.open.data() + e;
    for (int64_t q = 0; q < tp; ++q) {
      lst[m] = static_cast<int32_t>(q);
      m += oe[q * ne];
    }
    if (m == 0) continue;
    total += m * a.cg;
    const int64_t o = e * a.cg / cog;  // the entry's output group: its own input group is skipped
    const Range rng[2] = {{0, o * cig}, {(o + 1) * cig, g.ci}};
    for (int64_t v0 = 0; v0 < nv; v0 += 2) {
      const bool two = v0 + 1 < nv;
      const int P = two ? P2 : P1;
      const float* wk = a.wblk + (e * nv + v0) * 9 * g.ci * 8;
      for (int64_t i = 0; i < m; i += P) {
        const int k = static_cast<int>(std::min<int64_t>(P, m - i));
        for (int q = 0; q < k; ++q) {
          xb[q] = rows + b.off[lst[i + q]];
          dst[q] = out0 + static_cast<int64_t>(lst[i + q]) * g.co + e * a.cg + 8 * v0;
        }
        if (two)
          cond_store<P2, 2>(k, xb, toff, wk, g.ci, rng, 2, dst);
        else
          cond_store<P1, 1>(k, xb, toff, wk, g.ci, rng, 2, dst);
      }
    }
  }
  epilogue(a, p0, p0 + tp);
  return total;
}

// Input ranges inside a 3 x C_in segment that output group o reads in the conditional path: every
// input channel but group o's own where C_in / G is a multiple of 8 (aligned vectors), else all
// (the diagonal weights are zero).
std::vector<std::vector<Range>> segment_ranges(int64_t ci, int64_t groups) {
  const int64_t cig = ci / groups;
  std::vector<std::vector<Range>> out(groups);
  for (int64_t o = 0; o < groups; ++o) {
    std::vector<Range>& v = out[o];
    if (cig % 8 != 0) {
      v.push_back({0, 3 * ci});
      continue;
    }
    for (int64_t kw = 0; kw < 3; ++kw) {
      const Range parts[2] = {{kw * ci, kw * ci + o * cig}, {kw * ci + (o + 1) * cig, (kw + 1) * ci}};
      for (const Range& p : parts) {
        if (p.end <= p.begin) continue;
        if (!v.empty() && v.back().end == p.begin)
          v.back().end = p.end;
        else
          v.push_back(p);
      }
    }
  }
  return out;
}

void check(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "sparse_conv: ", name, " must be on the CPU");
  TORCH_CHECK(t.scalar_type() == torch::kFloat32, "sparse_conv: ", name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), "sparse_conv: ", name, " must be contiguous");
}

// Runs fn(tile) over the tiles of plan_tiles, in parallel.
template <typename F>
void for_tiles(const Geom& g, int64_t budget, const F& fn) {
  const std::vector<Tile> tiles = plan_tiles(g, budget);
  at::parallel_for(0, static_cast<int64_t>(tiles.size()), 1, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) fn(tiles[t]);
  });
}

}  // namespace

// x: (N, H, W, C_in) contiguous; wpack: per 8-lane chunk of output channels, [9][nci][8];
// meta: (n_chunks, 3) int64 = (first input channel, input channels, offset into wpack).
torch::Tensor base_conv(torch::Tensor x, torch::Tensor wpack, torch::Tensor meta, int64_t co, int64_t stride,
                        int64_t tile_bytes) {
  check(x, "x");
  check(wpack, "wpack");
  TORCH_CHECK(meta.scalar_type() == torch::kInt64 && meta.is_contiguous() && meta.dim() == 2 && meta.size(1) == 3,
              "sparse_conv.base_conv: meta must be a contiguous (chunks, 3) int64 tensor");
  TORCH_CHECK(x.dim() == 4, "sparse_conv.base_conv: x must be N x H x W x C");
  Geom g{x.size(0), x.size(1), x.size(2), x.size(3), 0, 0, co, stride};
  g.ho = (g.h - 1) / stride + 1;
  g.wo = (g.w - 1) / stride + 1;
  const int64_t nk = meta.size(0);
  TORCH_CHECK(nk == (co + 7) / 8, "sparse_conv.base_conv: ", nk, " chunks for ", co, " output channels");
  auto y = torch::empty({g.n, g.ho, g.wo, co}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = wpack.data_ptr<float>();
  const int64_t* mp = meta.data_ptr<int64_t>();
  float* yp = y.data_ptr<float>();
  for_tiles(g, tile_bytes, [&](const Tile& tile) {
    thread_local std::vector<float> buf;
    base_tile(xp, wp, mp, nk, yp, g, tile, buf);
  });
  g_calls_base.fetch_add(1);
  return y;
}

// y_base: (N, H, W, C); tau: (C / C_g,). Returns thr: (N, C / C_g), M = [S > thr].
torch::Tensor thresholds(torch::Tensor y_base, torch::Tensor tau, int64_t cg, double eps) {
  check(y_base, "y_base");
  check(tau, "tau");
  const int64_t n = y_base.size(0), hw = y_base.size(1) * y_base.size(2), c = y_base.size(3);
  TORCH_CHECK(cg >= 1 && c % cg == 0 && tau.numel() == c / cg, "sparse_conv.thresholds: bad C_g or tau size");
  const int64_t ne = c / cg;
  auto thr = torch::empty({n, ne}, y_base.options());
  const float* yp = y_base.data_ptr<float>();
  const float* tp = tau.data_ptr<float>();
  float* op = thr.data_ptr<float>();
  at::parallel_for(0, n, 1, [&](int64_t b, int64_t e) {
    std::vector<double> sum(ne), sq(ne);
    std::vector<float> srow(ne);
    for (int64_t i = b; i < e; ++i) {
      std::fill(sum.begin(), sum.end(), 0.0);
      std::fill(sq.begin(), sq.end(), 0.0);
      const float* base = yp + i * hw * c;
      for (int64_t q = 0; q < hw; ++q) {
        const float* row = base + q * c;
        const float* s = row;
        if (cg > 1) {
          for (int64_t j = 0; j < ne; ++j) srow[j] = salience(row + j * cg, cg);
          s = srow.data();
        }
#pragma omp simd
        for (int64_t j = 0; j < ne; ++j) {
          const double v = s[j];
          sum[j] += v;
          sq[j] += v * v;
        }
      }
      for (int64_t j = 0; j < ne; ++j) {
        const double mu = sum[j] / hw;
        const double var = std::max(sq[j] / hw - mu * mu, 0.0);
        op[i * ne + j] = static_cast<float>(mu + static_cast<double>(tp[j]) * std::sqrt(var + eps));
      }
    }
  });
  g_calls_thresholds.fetch_add(1);
  return thr;
}

// The conditional path at open entries + epilogue. x: (N, H, W, C_in); y_base: (N, Ho, Wo, C_out);
// thr: (N, C_out / C_g); wz: (C_out, 9, C_in) with the diagonal blocks zero; scale, bias: (C_out,);
// residual: (N, Ho, Wo, C_out) or an empty tensor. Returns out, mask ((N, Ho, Wo, C_out / C_g) uint8,
// empty unless want_mask), and the number of open (position, channel) entries as a 0-d int64 tensor.
std::vector<torch::Tensor> cond(torch::Tensor x, torch::Tensor y_base, torch::Tensor thr, torch::Tensor wz,
                                torch::Tensor scale, torch::Tensor bias, torch::Tensor residual, bool relu,
                                int64_t stride, int64_t cg, int64_t groups, bool want_mask, int64_t tile_bytes,
                                int64_t order, torch::Tensor wblk) {
  for (auto* p : {&x, &y_base, &thr, &wz, &scale, &bias}) check(*p, "input");
  const bool has_res = residual.numel() > 0;
  if (has_res) check(residual, "residual");
  CondArgs a{};
  a.g = Geom{x.size(0), x.size(1), x.size(2), x.size(3), y_base.size(1), y_base.size(2), y_base.size(3), stride};
  a.cg = cg;
  a.groups = groups;
  a.relu = relu;
  const Geom& g = a.g;
  // order: 1 channel-major, 2 position-major, 3 blocks (C_g a multiple of 8), 0 automatic (blocks where
  // the packed weights are given, else position-major for few output channels)
  a.positions = order == 2 || (order == 0 && g.co <= POSITION_MAJOR_MAX_CO);
  TORCH_CHECK(g.ho == (g.h - 1) / stride + 1 && g.wo == (g.w - 1) / stride + 1 && y_base.size(0) == g.n,
              "sparse_conv.cond: y_base shape does not match x and stride");
  TORCH_CHECK(wz.numel() == g.co * 9 * g.ci, "sparse_conv.cond: wz must be C_out x 9 x C_in");
  TORCH_CHECK(g.co % groups == 0 && g.ci % groups == 0 && (g.co / groups) % cg == 0,
              "sparse_conv.cond: channels not divisible by G / C_g");
  TORCH_CHECK(thr.numel() == g.n * (g.co / cg) && scale.numel() == g.co && bias.numel() == g.co,
              "sparse_conv.cond: thr/scale/bias sizes");
  if (has_res) TORCH_CHECK(residual.sizes() == y_base.sizes(), "sparse_conv.cond: residual shape");
  auto out = torch::empty_like(y_base);
  torch::Tensor mask = want_mask ? torch::empty({g.n, g.ho, g.wo, g.co / cg}, x.options().dtype(torch::kUInt8))
                                 : torch::empty({0}, x.options().dtype(torch::kUInt8));
  a.x = x.data_ptr<float>();
  a.yb = y_base.data_ptr<float>();
  a.thr = thr.data_ptr<float>();
  a.wz = wz.data_ptr<float>();
  // order 3 (or 0 with C_g a multiple of 8 and the packed weights given): block order
  const bool blocks = wblk.numel() > 0 && cg % 8 == 0 && (order == 3 || order == 0);
  if (blocks) {
    check(wblk, "wblk");
    TORCH_CHECK(wblk.numel() == g.co * 9 * g.ci, "sparse_conv.cond: wblk must hold C_out x 9 x C_in floats");
  }
  a.wblk = blocks ? wblk.data_ptr<float>() : nullptr;
  a.scale = scale.data_ptr<float>();
  a.bias = bias.data_ptr<float>();
  a.res = has_res ? residual.data_ptr<float>() : nullptr;
  a.out = out.data_ptr<float>();
  a.mask = want_mask ? mask.data_ptr<uint8_t>() : nullptr;
  const auto ranges = segment_ranges(g.ci, groups);
  a.ranges = &ranges;
  std::atomic<int64_t> total{0};
  for_tiles(g, tile_bytes, [&](const Tile& tile) {
    thread_local TileBuffers b;
    total.fetch_add(blocks ? cond_tile_blocks(a, tile, b)
                           : a.positions ? cond_tile_positions(a, tile, b) : cond_tile(a, tile, b));
  });
  g_calls_cond.fetch_add(1);
  if (blocks) g_calls_blocks.fetch_add(1);
  return {out, mask, torch::tensor(total.load(), x.options().dtype(torch::kInt64))};
}

// Eq. 3 with a dense conditional path (layers where the sparse kernel loses, see engine.py):
// out = relu?(a * (Y_base + M * Y_cond) + b + residual), M = [S > thr]; all (N, Ho, Wo, C) contiguous.
// Returns out, mask (empty unless want_mask) and the number of open entries.
std::vector<torch::Tensor> combine(torch::Tensor y_base, torch::Tensor y_cond, torch::Tensor thr, torch::Tensor scale,
                                   torch::Tensor bias, torch::Tensor residual, bool relu, int64_t cg, bool want_mask) {
  for (auto* p : {&y_base, &y_cond, &thr, &scale, &bias}) check(*p, "input");
  const bool has_res = residual.numel() > 0;
  if (has_res) check(residual, "residual");
  TORCH_CHECK(y_cond.sizes() == y_base.sizes() && (!has_res || residual.sizes() == y_base.sizes()),
              "sparse_conv.combine: shapes differ");
  const int64_t n = y_base.size(0), hw = y_base.size(1) * y_base.size(2), co = y_base.size(3), ne = co / cg;
  TORCH_CHECK(co % cg == 0 && thr.numel() == n * ne && scale.numel() == co && bias.numel() == co,
              "sparse_conv.combine: thr/scale/bias sizes");
  auto out = torch::empty_like(y_base);
  torch::Tensor mask = want_mask ? torch::empty({n, y_base.size(1), y_base.size(2), ne}, y_base.options().dtype(torch::kUInt8))
                                 : torch::empty({0}, y_base.options().dtype(torch::kUInt8));
  const float *yb = y_base.data_ptr<float>(), *yc = y_cond.data_ptr<float>(), *tp = thr.data_ptr<float>();
  const float *sc = scale.data_ptr<float>(), *bi = bias.data_ptr<float>();
  const float* rp = has_res ? residual.data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
  uint8_t* mp = want_mask ? mask.data_ptr<uint8_t>() : nullptr;
  std::atomic<int64_t> total{0};
  at::parallel_for(0, n * hw, 256, [&](int64_t b, int64_t e) {
    std::vector<float> m(co);
    int64_t count = 0;
    for (int64_t p = b; p < e; ++p) {
      const float* th = tp + (p / hw) * ne;
      const float* ybp = yb + p * co;
      for (int64_t k = 0; k < ne; ++k) {
        const float open = salience(ybp + k * cg, cg) > th[k] ? 1.0f : 0.0f;
        for (int64_t j = 0; j < cg; ++j) m[k * cg + j] = open;
        if (mp != nullptr) mp[p * ne + k] = static_cast<uint8_t>(open);
        count += static_cast<int64_t>(open) * cg;
      }
      const float* ycp = yc + p * co;
      float* o = op + p * co;
      const float* r = rp != nullptr ? rp + p * co : nullptr;
#pragma omp simd
      for (int64_t c = 0; c < co; ++c) {
        float v = sc[c] * (ybp[c] + m[c] * ycp[c]) + bi[c];
        if (r != nullptr) v += r[c];
        o[c] = relu && v < 0.0f ? 0.0f : v;
      }
    }
    total.fetch_add(count);
  });
  g_calls_combine.fetch_add(1);
  return {out, mask, torch::tensor(total.load(), y_base.options().dtype(torch::kInt64))};
}

void set_profile(bool on) {
  g_profile = on;
  for (auto& v : g_phase_ns) v.store(0);
}

std::vector<int64_t> phase_ns() {
  return {g_phase_ns[0].load(), g_phase_ns[1].load(), g_phase_ns[2].load(), g_phase_ns[3].load()};
}

std::vector<int64_t> calls() {
  return {g_calls_base.load(), g_calls_thresholds.load(), g_calls_cond.load(), g_calls_combine.load(),
          g_calls_blocks.load()};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("base_conv", &base_conv, "CDG sparse inference: base path (grouped 3x3 conv, channels-last float32)");
  m.def("thresholds", &thresholds, "CDG sparse inference: per-sample gate thresholds");
  m.def("cond", &cond, "CDG sparse inference: conditional path at open entries + BN/residual/ReLU epilogue");
  m.def("combine", &combine, "CDG sparse inference: Eq. 3 with a dense conditional path + epilogue");
  m.def("set_profile", &set_profile, "time the phases of cond (input rows, gate, lists + dot products, epilogue)");
  m.def("phase_ns", &phase_ns, "ns per cond phase since set_profile(True)");
  m.def("calls", &calls, "calls of (base_conv, thresholds, cond, combine, cond in block order) made in this process");
}
