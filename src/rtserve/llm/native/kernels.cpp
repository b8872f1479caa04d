// rtserve's CPU kernels for decoding a few sequences at a time (see native/__init__.py for how this
// file is built and loaded, and docs/architecture.md for when the engine uses it).
//
// - rtserve::linear: y = x @ W.T (+ b) for rows x, W float32 or float16, or int8 with a float32 scale
//   per output row (or per group along K), as the checkpoint stores it (N, K) or in panels of 16
//   outputs; or int4 in panels with group scales. Each weight is read once for all rows of x, so the
//   memory traffic of a step is the weights' bytes: the whole cost of decoding one sequence.
//   Activations stay float32 (int8 / int4 weights are widened in registers), so a quantized layer
//   differs from its dequantized float32 reference by rounding only.
// - rtserve::decode_layer: one Llama-family decoder layer for a decode-only step (one new token per
//   sequence), in one call: RMSNorm, the fused qkv product, optional q/k norms, rotary embedding,
//   the K/V write into the paged cache, attention that reads the cache in place through each
//   sequence's block table (no gather), the output product and residual, RMSNorm, the gate/up
//   product, SiLU x up, the down product and residual. About 150 PyTorch operations a layer become
//   one call, which is what decoding one sequence on a CPU spends most of its non-matmul time on.
//
// Vector code is chosen at compile time (the library is built on the machine that runs it, with
// -march=native): AVX-512, AVX2 + FMA, or portable scalar code. Work is split across PyTorch's own
// intra-op threads (at::parallel_for).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

// loops over a tile's rows, panels and vectors (compile-time bounds) unrolled whole, so the sums stay in
// registers: a loop GCC left rolled kept its sums in an array on the stack
#define UNROLL _Pragma("GCC unroll 32")

// ---------------------------------------------------------------------------------------------
// A vector of W floats: the few operations the kernels need, for each instruction set.
#if defined(__AVX512F__)
constexpr int W = 16;
using vec = __m512;
inline vec vzero() { return _mm512_setzero_ps(); }
inline vec vload(const float* p) { return _mm512_loadu_ps(p); }
inline vec vload(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
inline vec vload(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline vec vfma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
inline vec vadd(vec a, vec b) { return _mm512_add_ps(a, b); }
inline vec vsub(vec a, vec b) { return _mm512_sub_ps(a, b); }
// 16 bytes of two nibbles each -> their low and high nibbles as floats (0..15): each byte widened
// to an int32 lane straight from memory, then the low nibble masked and the high one shifted down
inline void load_nibbles(const uint8_t* p, vec* lo, vec* hi) {
  const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  lo[0] = _mm512_cvtepi32_ps(_mm512_and_si512(b, _mm512_set1_epi32(0x0F)));
  hi[0] = _mm512_cvtepi32_ps(_mm512_srli_epi32(b, 4));
}
inline float vsum(vec v) { return _mm512_reduce_add_ps(v); }
inline vec vset(float f) { return _mm512_set1_ps(f); }
inline void vstore(float* p, vec v) { _mm512_storeu_ps(p, v); }
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
constexpr int W = 8;
using vec = __m256;
inline vec vzero() { return _mm256_setzero_ps(); }
inline vec vload(const float* p) { return _mm256_loadu_ps(p); }
inline vec vload(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
inline vec vload(const c10::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
inline vec vfma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
inline vec vadd(vec a, vec b) { return _mm256_add_ps(a, b); }
inline vec vsub(vec a, vec b) { return _mm256_sub_ps(a, b); }
inline void load_nibbles(const uint8_t* p, vec* lo, vec* hi) {
  UNROLL for (int v = 0; v < 2; ++v) {
    const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8 * v)));
    lo[v] = _mm256_cvtepi32_ps(_mm256_and_si256(b, _mm256_set1_epi32(0x0F)));
    hi[v] = _mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4));
  }
}
inline vec vset(float f) { return _mm256_set1_ps(f); }
inline void vstore(float* p, vec v) { _mm256_storeu_ps(p, v); }
inline float vsum(vec v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#else
constexpr int W = 1;
using vec = float;
inline vec vzero() { return 0.f; }
inline vec vload(const float* p) { return *p; }
inline vec vload(const int8_t* p) { return static_cast<float>(*p); }
inline vec vload(const c10::Half* p) { return static_cast<float>(*p); }
inline vec vfma(vec a, vec b, vec c) { return a * b + c; }
inline vec vadd(vec a, vec b) { return a + b; }
inline vec vsub(vec a, vec b) { return a - b; }
inline void load_nibbles(const uint8_t* p, vec* lo, vec* hi) {
  for (int j = 0; j < 16; ++j) lo[j] = static_cast<float>(p[j] & 0x0F), hi[j] = static_cast<float>(p[j] >> 4);
}
inline vec vset(float f) { return f; }
inline float vsum(vec v) { return v; }
inline void vstore(float* p, vec v) { *p = v; }
#endif

const char* isa() {
#if defined(__AVX512F__)
  return "avx512";
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
  return "avx2";
#else
  return "scalar";
#endif
}

// ---------------------------------------------------------------------------------------------
// Dot products of one weight row with rows of x.

template <typename T>
inline float dot1(const T* w, const float* x, int64_t k) {
  vec a0 = vzero(), a1 = vzero(), a2 = vzero(), a3 = vzero();
  int64_t i = 0;
  for (; i + 4 * W <= k; i += 4 * W) {
    a0 = vfma(vload(w + i), vload(x + i), a0);
    a1 = vfma(vload(w + i + W), vload(x + i + W), a1);
    a2 = vfma(vload(w + i + 2 * W), vload(x + i + 2 * W), a2);
    a3 = vfma(vload(w + i + 3 * W), vload(x + i + 3 * W), a3);
  }
  for (; i + W <= k; i += W) a0 = vfma(vload(w + i), vload(x + i), a0);
  float s = vsum(vadd(vadd(a0, a1), vadd(a2, a3)));
  for (; i < k; ++i) s += static_cast<float>(w[i]) * x[i];
  return s;
}

// up to 4 rows of x against one weight row, the weight loaded once
template <typename T, int R>
inline void dotR(const T* w, const float* x, int64_t ldx, int64_t k, float* out) {
  vec a[R][2];
  UNROLL for (int r = 0; r < R; ++r) a[r][0] = a[r][1] = vzero();
  int64_t i = 0;
  for (; i + 2 * W <= k; i += 2 * W) {
    vec w0 = vload(w + i), w1 = vload(w + i + W);
    UNROLL for (int r = 0; r < R; ++r) {
      a[r][0] = vfma(w0, vload(x + r * ldx + i), a[r][0]);
      a[r][1] = vfma(w1, vload(x + r * ldx + i + W), a[r][1]);
    }
  }
  UNROLL for (int r = 0; r < R; ++r) {
    float s = vsum(vadd(a[r][0], a[r][1]));
    for (int64_t j = i; j < k; ++j) s += static_cast<float>(w[j]) * x[r * ldx + j];
    out[r] = s;
  }
}

// one int8 weight row in groups of g (a multiple of W), each with its own scale, against one row of x
inline float dot_groups(const int8_t* w, const float* s, const float* x, int64_t k, int64_t g) {
  vec a0 = vzero(), a1 = vzero();
  int64_t i = 0, gi = 0;
  for (; i + 2 * g <= k; i += 2 * g, gi += 2) {
    vec t0 = vzero(), t1 = vzero();
    for (int64_t j = 0; j < g; j += W) {
      t0 = vfma(vload(w + i + j), vload(x + i + j), t0);
      t1 = vfma(vload(w + i + g + j), vload(x + i + g + j), t1);
    }
    a0 = vfma(t0, vset(s[gi]), a0);
    a1 = vfma(t1, vset(s[gi + 1]), a1);
  }
  for (; i < k; i += g, ++gi) {
    vec t = vzero();
    for (int64_t j = 0; j < g; j += W) t = vfma(vload(w + i + j), vload(x + i + j), t);
    a0 = vfma(t, vset(s[gi]), a0);
  }
  return vsum(vadd(a0, a1));
}

void gemm_groups(const float* x, int64_t m, const int8_t* w, const float* scale, int64_t group, const float* bias,
                 float* y, int64_t n, int64_t k) {
  const int64_t grain = std::max<int64_t>(4, 8192 / std::max<int64_t>(k, 1));
  const int64_t ng = k / group;
  at::parallel_for(0, n, grain, [&](int64_t n0, int64_t n1) {
    for (int64_t j = n0; j < n1; ++j)
      for (int64_t r = 0; r < m; ++r)  // the row stays in L1 between rows of x
        y[r * n + j] = dot_groups(w + j * k, scale + j * ng, x + r * k, k, group) + (bias ? bias[j] : 0.f);
  });
}

// y (M, N) = x (M, K) @ w (N, K).T, times scale[n] when given, plus bias[n] when given
template <typename T>
void gemm_rows(const float* x, int64_t m, const T* w, const float* scale, const float* bias, float* y,
               int64_t n, int64_t k) {
  // at least ~32 KB of weight per task: smaller ones cost more in scheduling than they stream
  const int64_t grain = std::max<int64_t>(4, 8192 / std::max<int64_t>(k, 1));
  at::parallel_for(0, n, grain, [&](int64_t n0, int64_t n1) {
    float acc[4];
    for (int64_t j = n0; j < n1; ++j) {
      const T* wj = w + j * k;
      const float s = scale ? scale[j] : 1.f, b = bias ? bias[j] : 0.f;
      if (m == 1) {
        y[j] = dot1(wj, x, k) * s + b;
        continue;
      }
      int64_t r = 0;
      for (; r + 4 <= m; r += 4) {
        dotR<T, 4>(wj, x + r * k, k, k, acc);
        for (int t = 0; t < 4; ++t) y[(r + t) * n + j] = acc[t] * s + b;
      }
      switch (m - r) {
        case 3: dotR<T, 3>(wj, x + r * k, k, k, acc); break;
        case 2: dotR<T, 2>(wj, x + r * k, k, k, acc); break;
        case 1: acc[0] = dot1(wj, x + r * k, k); break;
        default: break;
      }
      for (int64_t t = 0; t < m - r; ++t) y[(r + t) * n + j] = acc[t] * s + b;
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Products with a weight in panels: (N / 16, K, 16), each panel the 16 outputs' weights side by side
// for every k (``pack_panels`` in native/__init__.py makes it from (N, K)). A tile of MR rows of x
// times PP panels keeps MR x PP x 16 sums in registers; each step along K loads PP x 16 weights and
// broadcasts MR values of x, so a batch is limited by the multiply-adds, not by loads (the plain
// layout's dot products load a vector of x per multiply-add).

constexpr int64_t PANEL = 16;
constexpr int NV = PANEL / W;  // vectors a panel row
#if defined(__AVX512F__)
constexpr int MR = 8, PP = 2;
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
constexpr int MR = 6, PP = 1;
#else
constexpr int MR = 1, PP = 1;
#endif

// Float tiles of two rows or more prefetch their panel this far ahead: with a few rows the products
// are neither bound by memory nor by multiply-adds, and the hardware prefetcher alone left 3-6 rows
// over the 34M model's layers (68 MB of float32 panels) at 1.7-2x the time of one row; with it
// 1.2-1.3x (2-core AVX2 EPYC; 512 to 2,048 bytes ahead helped less, 16 KB hurt). One row reads 4
// panels at a time and ran no faster with it; int8 and int4 panels, whose widening costs more
// instructions a byte, ran 0-5% slower with it (from L3 and from memory alike), so they go without.
constexpr int64_t PREFETCH_BYTES = 4096;
template <typename T, int R, int P>
inline void panel_tile(const float* x, int64_t k, const T* w, int64_t pstride, const float* scale, const float* bias,
                       float* y, int64_t n) {
  vec acc[R][P][NV];
  UNROLL for (int r = 0; r < R; ++r)
    UNROLL for (int p = 0; p < P; ++p)
      UNROLL for (int v = 0; v < NV; ++v) acc[r][p][v] = vzero();
  for (int64_t kk = 0; kk < k; ++kk) {
    // one panel's weights at a time: R x P x NV sums, NV weights and a broadcast live at once (all
    // P panels' weights first took 17 registers at R = 1, P = 4 on AVX2, and a sum went through the
    // stack every step)
    UNROLL for (int p = 0; p < P; ++p) {
      vec b[NV];
      if constexpr (R >= 2 && sizeof(T) == 4)
        __builtin_prefetch(reinterpret_cast<const char*>(w + p * pstride + kk * PANEL) + PREFETCH_BYTES);
      if constexpr (R >= 2 && sizeof(T) == 2)
        if (kk % 2 == 0) __builtin_prefetch(reinterpret_cast<const char*>(w + p * pstride + kk * PANEL) + PREFETCH_BYTES);
      UNROLL for (int v = 0; v < NV; ++v) b[v] = vload(w + p * pstride + kk * PANEL + v * W);
      UNROLL for (int r = 0; r < R; ++r) {
        const vec a = vset(x[r * k + kk]);
        UNROLL for (int v = 0; v < NV; ++v) acc[r][p][v] = vfma(a, b[v], acc[r][p][v]);
      }
    }
  }
  UNROLL for (int p = 0; p < P; ++p)
    UNROLL for (int v = 0; v < NV; ++v) {
      const int64_t c = p * PANEL + v * W;
      const vec s = scale ? vload(scale + c) : vset(1.f), bb = bias ? vload(bias + c) : vzero();
      UNROLL for (int r = 0; r < R; ++r) vstore(y + r * n + c, vfma(acc[r][p][v], s, bb));
    }
}

template <typename T, int P>
inline void panel_rows(const float* x, int64_t m, int64_t k, const T* w, int64_t pstride, const float* scale,
                       const float* bias, float* y, int64_t n) {
  int64_t r = 0;
  for (; r + MR <= m; r += MR) panel_tile<T, MR, P>(x + r * k, k, w, pstride, scale, bias, y + r * n, n);
  switch (m - r) {  // the rest of the rows, fewer than MR
#define RTSERVE_TAIL(R) \
  case R: if constexpr (R < MR) panel_tile<T, R, P>(x + r * k, k, w, pstride, scale, bias, y + r * n, n); break;
    RTSERVE_TAIL(1) RTSERVE_TAIL(2) RTSERVE_TAIL(3) RTSERVE_TAIL(4) RTSERVE_TAIL(5) RTSERVE_TAIL(6) RTSERVE_TAIL(7)
#undef RTSERVE_TAIL
    default: break;
  }
}

// y (M, N) = x (M, K) @ W.T with W in panels (N / 16, K, 16), times scale[n], plus bias[n] when given
template <typename T>
void gemm_panels(const float* x, int64_t m, const T* w, const float* scale, const float* bias, float* y, int64_t n,
                 int64_t k) {
  const int64_t panels = n / PANEL, pstride = k * PANEL;
  if (m <= 2 && panels % 4 == 0) {  // few rows: 4 panels at a time, for enough independent sums
    at::parallel_for(0, panels / 4, std::max<int64_t>(1, 2048 / std::max<int64_t>(k, 1)), [&](int64_t g0, int64_t g1) {
      for (int64_t g = g0; g < g1; ++g) {
        const int64_t c0 = g * 4 * PANEL;
        const float* s = scale ? scale + c0 : nullptr;
        const float* b = bias ? bias + c0 : nullptr;
        if (m == 1) {
          panel_tile<T, 1, 4>(x, k, w + g * 4 * pstride, pstride, s, b, y + c0, n);
          continue;
        }
        for (int h = 0; h < 2; ++h)  // two rows: 2 panels at a time (2 x 4 x 2 sums overflow AVX2's registers)
          panel_tile<T, 2, 2>(x, k, w + (g * 4 + 2 * h) * pstride, pstride, s ? s + 2 * h * PANEL : nullptr,
                              b ? b + 2 * h * PANEL : nullptr, y + c0 + 2 * h * PANEL, n);
      }
    });
    return;
  }
  const int64_t groups = (panels + PP - 1) / PP;
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(k * PP, 1));
  constexpr int64_t RB = 10 * MR;  // rows of x a pass over the panels (a prompt's rows stay in L2)
  at::parallel_for(0, groups, grain, [&](int64_t g0, int64_t g1) {
    for (int64_t r0 = 0; r0 < m; r0 += RB) {
      const int64_t mb = std::min(RB, m - r0);
      const float* xb = x + r0 * k;
      float* yb = y + r0 * n;
      for (int64_t g = g0; g < g1; ++g) {
        const int64_t p0 = g * PP, c0 = p0 * PANEL;
        const float* s = scale ? scale + c0 : nullptr;
        const float* b = bias ? bias + c0 : nullptr;
        if (p0 + PP <= panels)
          panel_rows<T, PP>(xb, mb, k, w + p0 * pstride, pstride, s, b, yb + c0, n);
        else
          for (int64_t p = p0; p < panels; ++p)
            panel_rows<T, 1>(xb, mb, k, w + p * pstride, pstride, scale ? scale + p * PANEL : nullptr,
                             bias ? bias + p * PANEL : nullptr, yb + p * PANEL, n);
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// int8 weights in panels of k pairs, (N / 16, K / 2, 32): element [p, i, 2 j + t] is output 16 p + j
// at k = 2 i + t (AVX2 builds, and AVX-512 builds with VNNI). Each row of x becomes int16 with a
// scale for each 128 values (15 bits: a product differs from float32 activations' by ~3e-5 of the
// chunk's largest value, as intmm-x2's two int8 rows do), and one instruction multiplies pairs into int32
// sums: AVX2's vpmaddwd (+ vpaddd) 16 products into 8 sums, AVX-512 VNNI's vpdpwssd 32 into 16,
// against three instructions (widen, convert, multiply-add) for 8 or 16 products in float32.
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define RTSERVE_PAIRS 1
using ivec = __m512i;
constexpr int NVI = 1;        // int32 vectors of sums a panel (16 outputs)
constexpr int PMR = 8, PPP = 2;  // a tile of rows x panels: 16 sums, 2 weight vectors, a broadcast
constexpr bool PAIRS_DEFAULT = true;  // 2-core Zen 4: 0.4-0.75x the float-widened panels' time at 1-64 rows
inline ivec izero() { return _mm512_setzero_si512(); }
inline void load_pairs(const int8_t* b, ivec* out) {
  out[0] = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b)));
}
inline ivec iset(int32_t v) { return _mm512_set1_epi32(v); }
// in place through asm: with the intrinsic GCC copied each tile's sums between registers (and some
// through the stack) every step
inline ivec idot(ivec acc, ivec w, ivec x) {
  asm("vpdpwssd %2, %1, %0" : "+v"(acc) : "v"(w), "v"(x));
  return acc;
}
inline void add_sums(float* f, ivec a, float s) {
  _mm512_storeu_ps(f, _mm512_fmadd_ps(_mm512_cvtepi32_ps(a), _mm512_set1_ps(s), _mm512_loadu_ps(f)));
}
// the largest magnitude of x's vectors from *i on (NaN when one is NaN), and 16 values x * inv
// rounded to int16 (saturating; round to nearest)
inline float abs_max(const float* x, int64_t k, int64_t* i) {
  __m512 m = _mm512_setzero_ps();
  __mmask16 nan = 0;
  for (; *i + 16 <= k; *i += 16) {
    const __m512 v = _mm512_loadu_ps(x + *i);
    nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    m = _mm512_max_ps(m, _mm512_abs_ps(v));
  }
  return nan ? NAN : _mm512_reduce_max_ps(m);
}
inline void round16(const float* x, float inv, int16_t* q) {
  const __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x), _mm512_set1_ps(inv)));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(q), _mm512_cvtsepi32_epi16(v));
}
#elif defined(__AVX2__) && !defined(__AVX512F__)
#define RTSERVE_PAIRS 1
using ivec = __m256i;
constexpr int NVI = 2;
constexpr int PMR = 4, PPP = 1;
// vpmaddwd issues once a cycle on the 2-core AVX2 EPYC, as many products as the float multiply-adds:
// 12% faster decoding at 1 sequence, 15% slower at 16 and 64, so opt-in there
constexpr bool PAIRS_DEFAULT = false;
inline ivec izero() { return _mm256_setzero_si256(); }
inline void load_pairs(const int8_t* b, ivec* out) {
  out[0] = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b)));
  out[1] = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + PANEL)));
}
inline ivec iset(int32_t v) { return _mm256_set1_epi32(v); }
inline ivec idot(ivec acc, ivec w, ivec x) { return _mm256_add_epi32(acc, _mm256_madd_epi16(w, x)); }
inline void add_sums(float* f, ivec a, float s) {
  _mm256_storeu_ps(f, _mm256_fmadd_ps(_mm256_cvtepi32_ps(a), _mm256_set1_ps(s), _mm256_loadu_ps(f)));
}
inline float abs_max(const float* x, int64_t k, int64_t* i) {
  __m256 m = _mm256_setzero_ps(), nan = _mm256_setzero_ps();
  const __m256 sign = _mm256_set1_ps(-0.f);
  for (; *i + 8 <= k; *i += 8) {
    const __m256 v = _mm256_loadu_ps(x + *i);
    nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    m = _mm256_max_ps(m, _mm256_andnot_ps(sign, v));
  }
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  return _mm256_movemask_ps(nan) ? NAN : _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
}
inline void round16(const float* x, float inv, int16_t* q) {
  const __m256 s = _mm256_set1_ps(inv);
  const __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x), s));
  const __m256i b = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + 8), s));
  const __m256i p = _mm256_permute4x64_epi64(_mm256_packs_epi32(a, b), 0xD8);  // packs works per 128-bit lane
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(q), p);
}
#endif

#if defined(RTSERVE_PAIRS)
constexpr bool PAIRS = true;
// k pairs summed in int32 before float (|sum| < 256 * 2 * 127 * 32767 < 2^31 allows 256); each row of x
// has a scale a chunk, so a large value costs precision in its own 128 values only
constexpr int64_t PAIR_CHUNK = 64;

template <int R, int P>
inline void pair_tile(const int32_t* x, int64_t kh, const float* xs, int64_t nc, const int8_t* w, int64_t pstride,
                      const float* scale, const float* bias, float* y, int64_t n) {
  alignas(64) float fa[R][P][PANEL] = {};  // the totals, touched once a chunk
  for (int64_t c0 = 0, ci = 0; c0 < kh; c0 += PAIR_CHUNK, ++ci) {
    const int64_t c1 = std::min(kh, c0 + PAIR_CHUNK);
    ivec acc[R][P][NVI];
    UNROLL for (int r = 0; r < R; ++r)
      UNROLL for (int p = 0; p < P; ++p)
        UNROLL for (int v = 0; v < NVI; ++v) acc[r][p][v] = izero();
    for (int64_t i = c0; i < c1; ++i) {
      ivec b[P][NVI];
      UNROLL for (int p = 0; p < P; ++p) load_pairs(w + p * pstride + i * 2 * PANEL, b[p]);
      UNROLL for (int r = 0; r < R; ++r) {
        const ivec xp = iset(x[r * kh + i]);
        UNROLL for (int p = 0; p < P; ++p)
          UNROLL for (int v = 0; v < NVI; ++v) acc[r][p][v] = idot(acc[r][p][v], b[p][v], xp);
      }
    }
    UNROLL for (int r = 0; r < R; ++r)
      UNROLL for (int p = 0; p < P; ++p)
        UNROLL for (int v = 0; v < NVI; ++v) add_sums(fa[r][p] + v * (PANEL / NVI), acc[r][p][v], xs[r * nc + ci]);
  }
  UNROLL for (int r = 0; r < R; ++r)
    UNROLL for (int p = 0; p < P; ++p)
      for (int j = 0; j < PANEL; ++j) {
        const int64_t c = p * PANEL + j;
        y[r * n + c] = fa[r][p][j] * scale[c] + (bias ? bias[c] : 0.f);
      }
}

template <int P>
inline void pair_rows(const int32_t* x, int64_t m, int64_t kh, const float* xs, int64_t nc, const int8_t* w,
                      int64_t pstride, const float* scale, const float* bias, float* y, int64_t n) {
  int64_t r = 0;
  for (; r + PMR <= m; r += PMR)
    pair_tile<PMR, P>(x + r * kh, kh, xs + r * nc, nc, w, pstride, scale, bias, y + r * n, n);
  switch (m - r) {  // the rest of the rows, fewer than PMR
#define RTSERVE_TAIL(R)                                                                                   \
  case R:                                                                                                 \
    if constexpr (R < PMR) pair_tile<R, P>(x + r * kh, kh, xs + r * nc, nc, w, pstride, scale, bias, y + r * n, n); \
    break;
    RTSERVE_TAIL(1) RTSERVE_TAIL(2) RTSERVE_TAIL(3) RTSERVE_TAIL(4) RTSERVE_TAIL(5) RTSERVE_TAIL(6) RTSERVE_TAIL(7)
#undef RTSERVE_TAIL
    default: break;
  }
}

// rows of x as int16, two to an int32 (k even), with a scale for each chunk of 2 x PAIR_CHUNK values
// (its largest magnitude / 32767), in vectors: the scalar loop took ~1 ns a value, 90 us for 64 x 1408
void quantize_pairs(const float* x, int64_t m, int64_t k, int32_t* xq, float* xs) {
  const int64_t nc = (k / 2 + PAIR_CHUNK - 1) / PAIR_CHUNK;
  for (int64_t r = 0; r < m; ++r)
    for (int64_t ci = 0; ci < nc; ++ci) {
      const int64_t i0 = ci * 2 * PAIR_CHUNK, i1 = std::min(k, i0 + 2 * PAIR_CHUNK);
      const float* xr = x + r * k + i0;
      int64_t i = 0;
      float amax = abs_max(xr, i1 - i0, &i);
      for (; i < i1 - i0; ++i) amax = std::isnan(xr[i]) ? xr[i] : std::max(amax, std::fabs(xr[i]));
      // a NaN or infinite value makes the chunk's scale NaN or infinite: every product of the row is
      // then NaN or infinite, as with float32 activations (int16 would have made it a finite number)
      const float sc = std::isnan(amax) || amax > 0.f ? amax / 32767.f : 1.f, inv = 1.f / sc;
      xs[r * nc + ci] = sc;
      auto* q = reinterpret_cast<int16_t*>(xq + r * (k / 2)) + i0;
      for (i = 0; i + 16 <= i1 - i0; i += 16) round16(xr + i, inv, q + i);
      for (; i < i1 - i0; ++i) q[i] = static_cast<int16_t>(std::lrint(xr[i] * inv));
    }
}

// y (M, N) = x (M, K) @ W.T for int8 W in panels of k pairs, times scale[n], plus bias[n] when given
void gemm_pairs(const float* x, int64_t m, const int8_t* w, const float* scale, const float* bias, float* y,
                int64_t n, int64_t k) {
  const int64_t kh = k / 2, panels = n / PANEL, pstride = kh * 2 * PANEL, nc = (kh + PAIR_CHUNK - 1) / PAIR_CHUNK;
  std::vector<int32_t> xq(m * kh);
  std::vector<float> xsv(m * nc);
  quantize_pairs(x, m, k, xq.data(), xsv.data());
  const int32_t* xp = xq.data();
  const float* xs = xsv.data();
  if (m <= 2 && panels % 4 == 0) {  // few rows: 4 panels at a time
    at::parallel_for(0, panels / 4, std::max<int64_t>(1, 2048 / std::max<int64_t>(k, 1)), [&](int64_t g0, int64_t g1) {
      for (int64_t g = g0; g < g1; ++g) {
        const int64_t c0 = g * 4 * PANEL;
        const float* b = bias ? bias + c0 : nullptr;
        if (m == 1) pair_tile<1, 4>(xp, kh, xs, nc, w + g * 4 * pstride, pstride, scale + c0, b, y + c0, n);
        else pair_tile<2, 4>(xp, kh, xs, nc, w + g * 4 * pstride, pstride, scale + c0, b, y + c0, n);
      }
    });
    return;
  }
  constexpr int64_t RB = 12 * PMR;  // rows of x a pass over the panels
  const int64_t groups = (panels + PPP - 1) / PPP;
  at::parallel_for(0, groups, std::max<int64_t>(1, 4096 / std::max<int64_t>(k * PPP, 1)), [&](int64_t g0, int64_t g1) {
    for (int64_t r0 = 0; r0 < m; r0 += RB) {
      const int64_t mb = std::min(RB, m - r0);
      const int32_t* xr = xp + r0 * kh;
      const float* sr = xs + r0 * nc;
      for (int64_t g = g0; g < g1; ++g) {
        const int64_t p0 = g * PPP, c0 = p0 * PANEL;
        if (p0 + PPP <= panels)
          pair_rows<PPP>(xr, mb, kh, sr, nc, w + p0 * pstride, pstride, scale + c0, bias ? bias + c0 : nullptr,
                         y + r0 * n + c0, n);
        else
          for (int64_t p = p0; p < panels; ++p)
            pair_rows<1>(xr, mb, kh, sr, nc, w + p * pstride, pstride, scale + p * PANEL,
                         bias ? bias + p * PANEL : nullptr, y + r0 * n + p * PANEL, n);
      }
    }
  });
}
#else
constexpr bool PAIRS = false, PAIRS_DEFAULT = false;
void gemm_pairs(const float*, int64_t, const int8_t*, const float*, const float*, float*, int64_t, int64_t) {
  TORCH_CHECK(false, "rtserve::linear: int8 panels of k pairs need an AVX2 or AVX-512 VNNI build");
}
#endif

// ---------------------------------------------------------------------------------------------
// int4 weights in panels of k pairs, uint8 (N / 16, K / 2, 16): byte [p, i, j] holds output 16 p + j
// at k = 2 i (low nibble) and k = 2 i + 1 (high nibble), each as u = q + 8 (q in [-8, 7]); float32
// scales per group of g along K in panels too, (N / 16, K / g, 16). Activations stay float32: a
// group's sum over x * u is taken in registers, 8 * (the group's sum of x) subtracted once (so
// x * (u - 8) = x * q), and the group's scales applied then. Half the bytes of int8 a weight (plus
// 4 / g for the scales): batch-1 decode streams about 0.56 bytes a weight at g = 64.

template <int R, int P>
inline void int4_tile(const float* x, int64_t k, const uint8_t* w, int64_t pstride, const float* s, int64_t sstride,
                      int64_t g, const float* xoff, int64_t ng, const float* bias, float* y, int64_t n) {
  // the running totals in memory (touched once a group), the group's sums t in registers
  alignas(64) float acc[R][P][PANEL] = {};
  for (int64_t gi = 0; gi < ng; ++gi) {
    vec t[R][P][NV];
    UNROLL for (int r = 0; r < R; ++r)
      UNROLL for (int p = 0; p < P; ++p)
        UNROLL for (int v = 0; v < NV; ++v) t[r][p][v] = vzero();
    for (int64_t kk = gi * g; kk < (gi + 1) * g; kk += 2) {
      UNROLL for (int p = 0; p < P; ++p) {  // k = kk from the low nibbles, kk + 1 from the high ones
        vec lo[NV], hi[NV];
        load_nibbles(w + p * pstride + kk / 2 * PANEL, lo, hi);
        UNROLL for (int r = 0; r < R; ++r) {
          const vec a0 = vset(x[r * k + kk]), a1 = vset(x[r * k + kk + 1]);
          UNROLL for (int v = 0; v < NV; ++v) t[r][p][v] = vfma(a1, hi[v], vfma(a0, lo[v], t[r][p][v]));
        }
      }
    }
    UNROLL for (int r = 0; r < R; ++r) {
      const vec off = vset(xoff[r * ng + gi]);
      UNROLL for (int p = 0; p < P; ++p)
        UNROLL for (int v = 0; v < NV; ++v) {
          float* a = acc[r][p] + v * W;
          vstore(a, vfma(vsub(t[r][p][v], off), vload(s + p * sstride + gi * PANEL + v * W), vload(a)));
        }
    }
  }
  UNROLL for (int r = 0; r < R; ++r)
    UNROLL for (int p = 0; p < P; ++p)
      UNROLL for (int v = 0; v < NV; ++v) {
        const int64_t c = p * PANEL + v * W;
        const vec a = vload(acc[r][p] + v * W);
        vstore(y + r * n + c, bias ? vadd(a, vload(bias + c)) : a);
      }
}

// one int4 panel as float32 (K, 16), each weight u * s - 8 * s = (u - 8) * s with s its group's scale
// (the dequantized value, up to one float32 rounding)
inline void int4_panel_to_float(const uint8_t* w, const float* s, int64_t k, int64_t g, float* out) {
  for (int64_t g0 = 0; g0 < k; g0 += g) {
    vec sc[NV], off[NV];
    UNROLL for (int v = 0; v < NV; ++v) sc[v] = vload(s + g0 / g * PANEL + v * W), off[v] = vfma(sc[v], vset(-8.f), vzero());
    for (int64_t kk = g0; kk < g0 + g; kk += 2) {
      vec lo[NV], hi[NV];
      load_nibbles(w + kk / 2 * PANEL, lo, hi);
      UNROLL for (int v = 0; v < NV; ++v) {
        vstore(out + kk * PANEL + v * W, vfma(lo[v], sc[v], off[v]));
        vstore(out + (kk + 1) * PANEL + v * W, vfma(hi[v], sc[v], off[v]));
      }
    }
  }
}

// the float32 panel product on one widened int4 panel, not inlined into gemm_int4: there the compiler
// kept some tiles' sums on the stack (a store and load a multiply-add: 3 rows ran 2x slower than 5)
__attribute__((noinline)) void float_panel_rows(const float* x, int64_t m, int64_t k, const float* panel,
                                                const float* bias, float* y, int64_t n) {
  panel_rows<float, 1>(x, m, k, panel, k * PANEL, nullptr, bias, y, n);
}

// int4 products of more than INT4_TILE_ROWS rows where pairs are the build's default (AVX-512 VNNI):
// PPP panels at a time widened once a call to int16 pairs (q = u - 8 at k = 2 i and 2 i + 1 side by
// side, as in the int8 pairs), multiplied with x in int16 (a scale each PAIR_CHUNK pairs) by vpdpwssd;
// each run of pairs that is in one group and one chunk of x goes to float32 times the group's scales
// and the chunk's. Needs g / 2 to divide PAIR_CHUNK or be a multiple of it (else the float32 widening).
#if defined(RTSERVE_PAIRS) && defined(__AVX512F__)
inline bool int4_pairs_fit(int64_t gh) { return PAIRS_DEFAULT && (PAIR_CHUNK % gh == 0 || gh % PAIR_CHUNK == 0); }

// up to 8 rows: the nibbles read straight into pairs in registers (no widened copy): 16 bytes -> 16
// dwords u_lo | u_hi << 16 (u = q + 8, 0..15) in three instructions; the offset, 8 x the group's sum of
// the row's int16 values, is taken off the int32 sums once a run
inline __m512i nibble_pairs(const uint8_t* p) {
  const __m512i d = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm512_ternarylogic_epi32(d, _mm512_slli_epi32(d, 12), _mm512_set1_epi32(0x000F000F), 0xA8);  // (a | b) & c
}

// one int4 panel as int16 pairs (K / 2, 32): q = u - 8 in each 16-bit half
inline void int4_panel_to_pairs(const uint8_t* w, int64_t kh, int16_t* out) {
  for (int64_t i = 0; i < kh; ++i)
    _mm512_storeu_si512(out + i * 2 * PANEL, _mm512_sub_epi16(nibble_pairs(w + i * PANEL), _mm512_set1_epi16(8)));
}

// R rows x P panels of int4 pairs: NIB, the nibbles from the uint8 panels (pstride bytes apart) into
// pairs in registers and the offset taken off; else int16 pairs widened ahead (P panels side by side)
template <int R, int P, bool NIB>
inline void int4_pair_tile(const int32_t* x, int64_t kh, const float* xs, const int32_t* xsum, int64_t nc,
                           const void* w, int64_t pstride, const float* s, int64_t sstride, int64_t gh,
                           const float* bias, float* y, int64_t n) {
  const int64_t seg = std::min(gh, PAIR_CHUNK), nseg = kh / seg;
  alignas(64) float fa[R][P][PANEL] = {};  // the totals, touched once a run (in registers they spilled the sums)
  for (int64_t c0 = 0, si = 0; c0 < kh; c0 += seg, ++si) {
    __m512i acc[R][P];
    UNROLL for (int r = 0; r < R; ++r)
      UNROLL for (int p = 0; p < P; ++p) acc[r][p] = _mm512_setzero_si512();
    for (int64_t i = c0; i < c0 + seg; ++i) {
      __m512i b[P];
      UNROLL for (int p = 0; p < P; ++p) {
        if constexpr (NIB) b[p] = nibble_pairs(static_cast<const uint8_t*>(w) + p * pstride + i * PANEL);
        else b[p] = _mm512_loadu_si512(static_cast<const int16_t*>(w) + (p * kh + i) * 2 * PANEL);
      }
      UNROLL for (int r = 0; r < R; ++r) {
        const __m512i xp = _mm512_set1_epi32(x[r * kh + i]);
        UNROLL for (int p = 0; p < P; ++p) acc[r][p] = idot(acc[r][p], b[p], xp);
      }
    }
    const int64_t gi = c0 / gh, ci = c0 / PAIR_CHUNK;
    UNROLL for (int p = 0; p < P; ++p) {
      const __m512 sg = _mm512_loadu_ps(s + p * sstride + gi * PANEL);
      UNROLL for (int r = 0; r < R; ++r) {
        __m512i a = acc[r][p];
        if constexpr (NIB) a = _mm512_sub_epi32(a, _mm512_set1_epi32(8 * xsum[r * nseg + si]));
        _mm512_store_ps(fa[r][p], _mm512_fmadd_ps(_mm512_cvtepi32_ps(a), _mm512_mul_ps(sg, _mm512_set1_ps(xs[r * nc + ci])),
                                                  _mm512_load_ps(fa[r][p])));
      }
    }
  }
  UNROLL for (int r = 0; r < R; ++r)
    UNROLL for (int p = 0; p < P; ++p)
      _mm512_storeu_ps(y + r * n + p * PANEL, bias ? _mm512_add_ps(_mm512_load_ps(fa[r][p]), _mm512_loadu_ps(bias + p * PANEL))
                                                   : _mm512_load_ps(fa[r][p]));
}

template <int P>
void int4_pair_rows(const int32_t* x, int64_t m, int64_t kh, const float* xs, int64_t nc, const int16_t* w,
                    const float* s, int64_t sstride, int64_t gh, const float* bias, float* y, int64_t n) {
  int64_t r = 0;
  for (; r + PMR <= m; r += PMR)
    int4_pair_tile<PMR, P, false>(x + r * kh, kh, xs + r * nc, nullptr, nc, w, 0, s, sstride, gh, bias, y + r * n, n);
  switch (m - r) {  // the rest of the rows, fewer than PMR
#define RTSERVE_TAIL(R)                                                                                    \
  case R:                                                                                                  \
    if constexpr (R < PMR)                                                                                \
      int4_pair_tile<R, P, false>(x + r * kh, kh, xs + r * nc, nullptr, nc, w, 0, s, sstride, gh, bias, y + r * n, n); \
    break;
    RTSERVE_TAIL(1) RTSERVE_TAIL(2) RTSERVE_TAIL(3) RTSERVE_TAIL(4) RTSERVE_TAIL(5) RTSERVE_TAIL(6) RTSERVE_TAIL(7)
#undef RTSERVE_TAIL
    default: break;
  }
}

void gemm_int4_pairs(const float* x, int64_t m, const uint8_t* w, const float* scale, int64_t ng, const float* bias,
                     float* y, int64_t n, int64_t k) {
  const int64_t kh = k / 2, panels = n / PANEL, pstride = kh * PANEL, sstride = ng * PANEL, gh = kh / ng;
  const int64_t nc = (kh + PAIR_CHUNK - 1) / PAIR_CHUNK, groups = (panels + PPP - 1) / PPP;
  std::vector<int32_t> xq(m * kh);
  std::vector<float> xsv(m * nc);
  quantize_pairs(x, m, k, xq.data(), xsv.data());
  constexpr int64_t RB = 12 * PMR;  // rows of x a pass over the widened panels
  at::parallel_for(0, groups, 1, [&](int64_t g0, int64_t g1) {
    std::vector<int16_t> buf(PPP * kh * 2 * PANEL);
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t p0 = g * PPP, np = std::min<int64_t>(PPP, panels - p0), c0 = p0 * PANEL;
      for (int64_t q = 0; q < np; ++q) int4_panel_to_pairs(w + (p0 + q) * pstride, kh, buf.data() + q * kh * 2 * PANEL);
      const float* sp = scale + p0 * sstride;
      const float* b = bias ? bias + c0 : nullptr;
      for (int64_t r0 = 0; r0 < m; r0 += RB) {
        const int64_t mb = std::min(RB, m - r0);
        if (np == PPP)
          int4_pair_rows<PPP>(xq.data() + r0 * kh, mb, kh, xsv.data() + r0 * nc, nc, buf.data(), sp, sstride, gh, b,
                              y + r0 * n + c0, n);
        else
          for (int64_t q = 0; q < np; ++q)
            int4_pair_rows<1>(xq.data() + r0 * kh, mb, kh, xsv.data() + r0 * nc, nc, buf.data() + q * kh * 2 * PANEL,
                              sp + q * sstride, sstride, gh, b ? b + q * PANEL : nullptr, y + r0 * n + c0 + q * PANEL, n);
      }
    }
  });
}

template <int P>
void int4_nibble_rows(const int32_t* x, int64_t m, int64_t kh, const float* xs, const int32_t* xsum, int64_t nc,
                      const uint8_t* w, int64_t pstride, const float* s, int64_t sstride, int64_t gh,
                      const float* bias, float* y, int64_t n) {
  switch (m) {
#define RTSERVE_ROWS(R) \
  case R: int4_pair_tile<R, P, true>(x, kh, xs, xsum, nc, w, pstride, s, sstride, gh, bias, y, n); break;
    RTSERVE_ROWS(1) RTSERVE_ROWS(2) RTSERVE_ROWS(3) RTSERVE_ROWS(4) RTSERVE_ROWS(5) RTSERVE_ROWS(6) RTSERVE_ROWS(7)
    RTSERVE_ROWS(8)
#undef RTSERVE_ROWS
    default: TORCH_CHECK(false, "int4_nibble_rows: 1 to 8 rows");
  }
}

// y (M <= 8, N) = x @ W.T for int4 W in panels (as gemm_int4), nibbles into pairs in registers
void gemm_int4_nibble_pairs(const float* x, int64_t m, const uint8_t* w, const float* scale, int64_t ng,
                            const float* bias, float* y, int64_t n, int64_t k) {
  const int64_t kh = k / 2, panels = n / PANEL, pstride = kh * PANEL, sstride = ng * PANEL, gh = kh / ng;
  const int64_t nc = (kh + PAIR_CHUNK - 1) / PAIR_CHUNK, seg = std::min(gh, PAIR_CHUNK), nseg = kh / seg;
  std::vector<int32_t> xq(m * kh), xsum(m * nseg);
  std::vector<float> xsv(m * nc);
  quantize_pairs(x, m, k, xq.data(), xsv.data());
  for (int64_t r = 0; r < m; ++r) {  // each run's sum of the row's int16 values (the nibbles' offset)
    const int16_t* q = reinterpret_cast<const int16_t*>(xq.data() + r * kh);
    for (int64_t si = 0; si < nseg; ++si) {
      int32_t t = 0;
      for (int64_t i = si * seg * 2; i < (si + 1) * seg * 2; ++i) t += q[i];
      xsum[r * nseg + si] = t;
    }
  }
  const int64_t P = (m == 1 && panels % 4 == 0) ? 4 : (m <= 4 && panels % 2 == 0) ? 2 : 1;
  at::parallel_for(0, panels / P, std::max<int64_t>(1, 2048 / std::max<int64_t>(k * P, 1)), [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t p0 = g * P, c0 = p0 * PANEL;
      const uint8_t* wp = w + p0 * pstride;
      const float* sp = scale + p0 * sstride;
      const float* b = bias ? bias + c0 : nullptr;
      if (P == 4) int4_nibble_rows<4>(xq.data(), m, kh, xsv.data(), xsum.data(), nc, wp, pstride, sp, sstride, gh, b, y + c0, n);
      else if (P == 2) int4_nibble_rows<2>(xq.data(), m, kh, xsv.data(), xsum.data(), nc, wp, pstride, sp, sstride, gh, b, y + c0, n);
      else int4_nibble_rows<1>(xq.data(), m, kh, xsv.data(), xsum.data(), nc, wp, pstride, sp, sstride, gh, b, y + c0, n);
    }
  });
}
#else
inline bool int4_pairs_fit(int64_t) { return false; }
void gemm_int4_pairs(const float*, int64_t, const uint8_t*, const float*, int64_t, const float*, float*, int64_t,
                     int64_t) {}
void gemm_int4_nibble_pairs(const float*, int64_t, const uint8_t*, const float*, int64_t, const float*, float*,
                            int64_t, int64_t) {}
#endif

// y (M, N) = x (M, K) @ W.T for int4 W in panels with group scales (above), plus bias[n] when given.
// Up to INT4_TILE_ROWS rows read the nibbles straight into the sums, in tiles of up to 4 rows; more rows
// widen each panel to float32 once (16 x K values, in L1 / L2) and run the float32 panel product on it,
// so the unpacking is paid once a call, not once a row (2-core AVX2 EPYC, a 1536 x 512 weight: 3 rows
// 40 us against 71 widened, 8 rows 93 against 114, 12 rows even at 133).
constexpr int64_t INT4_TILE_ROWS = 8;
void gemm_int4(const float* x, int64_t m, const uint8_t* w, const float* scale, int64_t ng, const float* bias,
               float* y, int64_t n, int64_t k) {
  const int64_t panels = n / PANEL, pstride = k / 2 * PANEL, sstride = ng * PANEL, g = k / ng;
  if (int4_pairs_fit(g / 2)) {  // AVX-512 VNNI: 0.6-0.75x the float32 tiles' time at 1-8 rows, 0.6-0.7x above
    if (m > INT4_TILE_ROWS) gemm_int4_pairs(x, m, w, scale, ng, bias, y, n, k);
    else gemm_int4_nibble_pairs(x, m, w, scale, ng, bias, y, n, k);
    return;
  }
  std::vector<float> xoff;  // 8 x each group's sum of x, row by row (the nibble tiles' offset)
  if (m <= INT4_TILE_ROWS) {
    xoff.resize(m * ng);
    for (int64_t r = 0; r < m; ++r)
      for (int64_t gi = 0; gi < ng; ++gi) {
        float t = 0.f;
        for (int64_t i = gi * g; i < (gi + 1) * g; ++i) t += x[r * k + i];
        xoff[r * ng + gi] = 8.f * t;
      }
  }
  const float* xo = xoff.data();
  if (m <= 2 && panels % 4 == 0) {  // few rows: 4 panels at a time, for enough independent sums
    at::parallel_for(0, panels / 4, std::max<int64_t>(1, 4096 / std::max<int64_t>(k, 1)), [&](int64_t g0, int64_t g1) {
      for (int64_t q = g0; q < g1; ++q) {
        const int64_t c0 = q * 4 * PANEL;
        const uint8_t* wq = w + q * 4 * pstride;
        const float* sq = scale + q * 4 * sstride;
        const float* b = bias ? bias + c0 : nullptr;
        if (m == 1) {
          int4_tile<1, 4>(x, k, wq, pstride, sq, sstride, g, xo, ng, b, y + c0, n);
          continue;
        }
        for (int h = 0; h < 2; ++h)  // two rows: 2 panels at a time, as gemm_panels
          int4_tile<2, 2>(x, k, wq + 2 * h * pstride, pstride, sq + 2 * h * sstride, sstride, g, xo, ng,
                          b ? b + 2 * h * PANEL : nullptr, y + c0 + 2 * h * PANEL, n);
      }
    });
    return;
  }
  if (m <= INT4_TILE_ROWS) {  // a few rows: the nibble tiles, a panel at a time
    at::parallel_for(0, panels, std::max<int64_t>(1, 2048 / std::max<int64_t>(k, 1)), [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        const uint8_t* wp = w + p * pstride;
        const float* sp = scale + p * sstride;
        const float* b = bias ? bias + p * PANEL : nullptr;
        for (int64_t r = 0; r < m; r += 4) {  // tiles of up to 4 rows (4 x 2 sums, 4 nibble vectors)
          float* yr = y + r * n + p * PANEL;
          const float *xr = x + r * k, *xor_ = xo + r * ng;
          switch (std::min<int64_t>(4, m - r)) {
            case 4: int4_tile<4, 1>(xr, k, wp, pstride, sp, sstride, g, xor_, ng, b, yr, n); break;
            case 3: int4_tile<3, 1>(xr, k, wp, pstride, sp, sstride, g, xor_, ng, b, yr, n); break;
            case 2: int4_tile<2, 1>(xr, k, wp, pstride, sp, sstride, g, xor_, ng, b, yr, n); break;
            default: int4_tile<1, 1>(xr, k, wp, pstride, sp, sstride, g, xor_, ng, b, yr, n); break;
          }
        }
      }
    });
    return;
  }
  constexpr int64_t RB = 10 * MR;  // rows of x a pass over a panel
  at::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
    std::vector<float> buf(k * PANEL + 16);  // at a 64-byte boundary: no vector load splits a cache line
    float* panel = buf.data() + (16 - reinterpret_cast<uintptr_t>(buf.data()) / sizeof(float) % 16) % 16;
    for (int64_t p = p0; p < p1; ++p) {
      int4_panel_to_float(w + p * pstride, scale + p * sstride, k, g, panel);
      const float* b = bias ? bias + p * PANEL : nullptr;
      for (int64_t r0 = 0; r0 < m; r0 += RB)
        float_panel_rows(x + r0 * k, std::min(RB, m - r0), k, panel, b, y + r0 * n + p * PANEL, n);
    }
  });
}

// which layout a weight is in: (N, K), panels (N / 16, K, 16), int8 panels of k pairs (N / 16, K / 2, 32),
// or int4 panels of k pairs (uint8 (N / 16, K / 2, 16))
inline bool is_pairs(const at::Tensor& w) { return w.dim() == 3 && w.size(2) == 2 * PANEL; }
inline bool is_int4(const at::Tensor& w) { return w.scalar_type() == at::kByte; }
// a weight's (out, in) features
inline int64_t out_features(const at::Tensor& w) { return w.dim() == 3 ? w.size(0) * PANEL : w.size(0); }
inline int64_t in_features(const at::Tensor& w) { return is_pairs(w) || is_int4(w) ? 2 * w.size(1) : w.size(1); }

void check_linear(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& scale,
                  const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "rtserve::linear: CPU tensors only");
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2 && x.is_contiguous(), "rtserve::linear: x must be contiguous float32 (M, K)");
  if (is_int4(w)) {
    TORCH_CHECK(w.dim() == 3 && w.size(2) == PANEL && w.is_contiguous() && in_features(w) == x.size(1),
                "rtserve::linear: an int4 weight must be contiguous uint8 (N / 16, K / 2, 16), K matching x");
    const int64_t k = in_features(w);
    TORCH_CHECK(scale && scale->scalar_type() == at::kFloat && scale->is_contiguous() && scale->dim() == 3 &&
                    scale->size(0) == w.size(0) && scale->size(2) == PANEL && scale->size(1) >= 1 &&
                    k % scale->size(1) == 0 && (k / scale->size(1)) % 2 == 0,
                "rtserve::linear: an int4 weight needs float32 group scales (N / 16, K / g, 16), g even");
    if (bias) TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->numel() == out_features(w) && bias->is_contiguous(),
                          "rtserve::linear: bias must be contiguous float32 (N,)");
    return;
  }
  TORCH_CHECK((w.dim() == 2 || (w.dim() == 3 && (w.size(2) == PANEL || (PAIRS && is_pairs(w) && w.scalar_type() == at::kChar)))) &&
                  w.is_contiguous() && in_features(w) == x.size(1),
              "rtserve::linear: w must be contiguous (N, K), or (N / 16, K, 16) in panels",
              PAIRS ? ", or int8 (N / 16, K / 2, 32) in panels of k pairs" : "");
  const int64_t n = out_features(w);
  if (w.dim() == 3)
    TORCH_CHECK(!scale || (scale->dim() == 1 && scale->scalar_type() == at::kFloat && scale->is_contiguous() &&
                           scale->size(0) == n),
                "rtserve::linear: a weight in panels takes float32 scales (N,), one per output row");
  if (w.scalar_type() == at::kChar) {
    TORCH_CHECK(scale && scale->scalar_type() == at::kFloat && scale->is_contiguous() && scale->size(0) == n &&
                    (scale->dim() == 1 || (scale->dim() == 2 && w.size(1) % scale->size(1) == 0 &&
                                           (w.size(1) / scale->size(1)) % W == 0)),
                "rtserve::linear: an int8 weight needs float32 scales, (N,) one per output row or (N, K / g) in "
                "groups of g along K (g a multiple of ", W, ")");
  } else {
    TORCH_CHECK(w.scalar_type() == at::kFloat || w.scalar_type() == at::kHalf,
                "rtserve::linear: w must be float32, float16, int8 or uint8 (int4 panels)");
  }
  if (bias) TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->numel() == n && bias->is_contiguous(),
                        "rtserve::linear: bias must be contiguous float32 (N,)");
}

void linear_into(const float* x, int64_t m, const at::Tensor& w, const c10::optional<at::Tensor>& scale,
                 const c10::optional<at::Tensor>& bias, float* y) {
  const int64_t n = out_features(w), k = in_features(w);
  const float* b = bias ? bias->data_ptr<float>() : nullptr;
  if (m == 0) return;  // the few-row tiles would read and write two rows
  if (is_int4(w)) {
    gemm_int4(x, m, w.data_ptr<uint8_t>(), scale->data_ptr<float>(), scale->size(1), b, y, n, k);
  } else if (is_pairs(w)) {
    gemm_pairs(x, m, w.data_ptr<int8_t>(), scale->data_ptr<float>(), b, y, n, k);
  } else if (w.dim() == 3) {
    const float* s = scale ? scale->data_ptr<float>() : nullptr;
    if (w.scalar_type() == at::kChar)
      gemm_panels<int8_t>(x, m, w.data_ptr<int8_t>(), s, b, y, n, k);
    else if (w.scalar_type() == at::kHalf)
      gemm_panels<c10::Half>(x, m, w.data_ptr<c10::Half>(), s, b, y, n, k);
    else
      gemm_panels<float>(x, m, w.data_ptr<float>(), s, b, y, n, k);
  } else if (w.scalar_type() == at::kChar && scale->dim() == 2)
    gemm_groups(x, m, w.data_ptr<int8_t>(), scale->data_ptr<float>(), k / scale->size(1), b, y, n, k);
  else if (w.scalar_type() == at::kChar)
    gemm_rows<int8_t>(x, m, w.data_ptr<int8_t>(), scale->data_ptr<float>(), b, y, n, k);
  else if (w.scalar_type() == at::kHalf)
    gemm_rows<c10::Half>(x, m, w.data_ptr<c10::Half>(), nullptr, b, y, n, k);
  else
    gemm_rows<float>(x, m, w.data_ptr<float>(), nullptr, b, y, n, k);
}

at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& scale,
                  const c10::optional<at::Tensor>& bias) {
  check_linear(x, w, scale, bias);
  at::Tensor y = at::empty({x.size(0), out_features(w)}, x.options());
  linear_into(x.data_ptr<float>(), x.size(0), w, scale, bias, y.data_ptr<float>());
  return y;
}

// ---------------------------------------------------------------------------------------------
// The pieces of a decoder layer, on (M, H) rows.

void rms_norm_rows(const float* x, const float* w, float* y, int64_t m, int64_t h, double eps) {
  for (int64_t r = 0; r < m; ++r) {
    const float* xr = x + r * h;
    float ss = 0.f;
    for (int64_t i = 0; i < h; ++i) ss += xr[i] * xr[i];
    const float inv = 1.f / std::sqrt(ss / static_cast<float>(h) + static_cast<float>(eps));
    for (int64_t i = 0; i < h; ++i) y[r * h + i] = xr[i] * inv * w[i];
  }
}

// rotary embedding on one head in place, halves not interleaved: x * cos + (x2, x1) * signed_sin
inline void rotate(float* x, const float* cos, const float* ssin, int64_t d) {
  const int64_t half = d / 2;
  for (int64_t i = 0; i < half; ++i) {
    const float a = x[i], b = x[i + half];
    x[i] = a * cos[i] + b * ssin[i];
    x[i + half] = b * cos[i + half] + a * ssin[i + half];
  }
}

// out = sum over the context of p[t] * inv * V[t], for heads of ND vectors: the sums stay in registers
template <int ND>
void attend_values(const float* p, float inv, const float* vc, const int64_t* blocks, int64_t ctx, int64_t kvh,
                   int64_t hkv, int64_t bs, float* out) {
  constexpr int64_t d = ND * W;
  vec acc[ND];
  UNROLL for (int i = 0; i < ND; ++i) acc[i] = vzero();
  for (int64_t t0 = 0, b = 0; t0 < ctx; t0 += bs, ++b) {
    const float* vb = vc + (blocks[b] * hkv + kvh) * bs * d;
    const int64_t nt = std::min(bs, ctx - t0);
    for (int64_t j = 0; j < nt; ++j) {
      const vec pt = vset(p[t0 + j] * inv);
      UNROLL for (int i = 0; i < ND; ++i) acc[i] = vfma(pt, vload(vb + j * d + i * W), acc[i]);
    }
  }
  UNROLL for (int i = 0; i < ND; ++i) vstore(out + i * W, acc[i]);
}

// attention of one query head of one sequence over its cached context, read through the block table
void attend(const float* q, const float* kc, const float* vc, const int64_t* blocks, int64_t ctx, int64_t kvh,
            int64_t hkv, int64_t bs, int64_t d, float scale, float* out, std::vector<float>& p) {
  p.resize(ctx);
  float mx = -INFINITY;
  // block by block through the table: no division a position
  for (int64_t t0 = 0, b = 0; t0 < ctx; t0 += bs, ++b) {
    const float* kb = kc + (blocks[b] * hkv + kvh) * bs * d;
    const int64_t nt = std::min(bs, ctx - t0);
    for (int64_t j = 0; j < nt; ++j) {
      const float sc = dot1(kb + j * d, q, d) * scale;
      p[t0 + j] = sc;
      mx = std::max(mx, sc);
    }
  }
  float sum = 0.f;
  for (int64_t t = 0; t < ctx; ++t) sum += (p[t] = std::exp(p[t] - mx));
  const float inv = 1.f / sum;
  if (d % W == 0) {  // the common head sizes: the output row in registers across the context
    switch (d / W) {
      case 4: return attend_values<4>(p.data(), inv, vc, blocks, ctx, kvh, hkv, bs, out);
      case 8: return attend_values<8>(p.data(), inv, vc, blocks, ctx, kvh, hkv, bs, out);
      case 16: return attend_values<16>(p.data(), inv, vc, blocks, ctx, kvh, hkv, bs, out);
      default: break;
    }
  }
  for (int64_t i = 0; i < d; ++i) out[i] = 0.f;
  for (int64_t t0 = 0, b = 0; t0 < ctx; t0 += bs, ++b) {
    const float* vb = vc + (blocks[b] * hkv + kvh) * bs * d;
    const int64_t nt = std::min(bs, ctx - t0);
    for (int64_t j = 0; j < nt; ++j) {
      const float pt = p[t0 + j] * inv;
      const float* v = vb + j * d;
      for (int64_t i = 0; i < d; ++i) out[i] += pt * v[i];
    }
  }
}

// every sequence's context: 1 <= length <= its table's capacity, and each block it reads in the cache
void check_contexts(const char* op, const int64_t* bt, int64_t nblk, const int64_t* lens, int64_t m, int64_t bs,
                    int64_t nb) {
  for (int64_t r = 0; r < m; ++r) {
    TORCH_CHECK(lens[r] >= 1 && lens[r] <= nblk * bs, op, ": context length out of range");
    for (int64_t b = 0; b < (lens[r] + bs - 1) / bs; ++b)
      TORCH_CHECK(bt[r * nblk + b] >= 0 && bt[r * nblk + b] < nb, op, ": block out of range");
  }
}

// attention of each of m rows' nh query heads (row r's at q + r * q_stride), in parallel, into out
// (row r's at out + r * o_stride)
void attend_rows(const float* q, int64_t q_stride, const float* kc, const float* vc, const int64_t* bt, int64_t nblk,
                 const int64_t* lens, int64_t m, int64_t nh, int64_t nkv, int64_t bs, int64_t d, float scale, float* out,
                 int64_t o_stride) {
  const int64_t group = nh / nkv;
  at::parallel_for(0, m * nh, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> p;
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t r = i / nh, hd = i % nh;
      attend(q + r * q_stride + hd * d, kc, vc, bt + r * nblk, lens[r], hd / group, nkv, bs, d, scale,
             out + r * o_stride + hd * d, p);
    }
  });
}

struct Lin {  // a linear layer's tensors as the op receives them
  const at::Tensor& w;
  const c10::optional<at::Tensor>& scale;
  const c10::optional<at::Tensor>& bias;
};

void check_lin(const char* name, const Lin& l, int64_t n, int64_t k) {
  TORCH_CHECK((l.w.dim() == 2 || l.w.dim() == 3) && out_features(l.w) == n && in_features(l.w) == k && l.w.is_contiguous(),
              "rtserve::decode_layer: ", name, " must be a contiguous (", n, ", ", k, ") weight");
  at::Tensor x = at::empty({1, k}, at::kFloat);
  check_linear(x, l.w, l.scale, l.bias);
}

}  // namespace

// x: (M, H) hidden rows, one new token of each of M sequences; returns the layer's output rows.
// rope: (M, 2, D) cos and signed sin of each row's position. kv_cache: (2, blocks, Hkv, block_size, D).
// blocks: (M, B) int64 cache blocks of each context in order; context_lens: (M,) int64, the new
// token included; slots: (M,) int64 cache slot (block * block_size + offset) of the new token.
at::Tensor decode_layer(const at::Tensor& x, const at::Tensor& ln1, const at::Tensor& qkv_w,
                        const c10::optional<at::Tensor>& qkv_s, const c10::optional<at::Tensor>& qkv_b,
                        const c10::optional<at::Tensor>& q_norm, const c10::optional<at::Tensor>& k_norm,
                        const at::Tensor& o_w, const c10::optional<at::Tensor>& o_s, const at::Tensor& ln2,
                        const at::Tensor& gu_w, const c10::optional<at::Tensor>& gu_s, const at::Tensor& down_w,
                        const c10::optional<at::Tensor>& down_s, const at::Tensor& rope, at::Tensor kv_cache,
                        const at::Tensor& blocks, const at::Tensor& context_lens, const at::Tensor& slots,
                        int64_t nh, int64_t nkv, double eps, double scale) {
  const c10::optional<at::Tensor> none;
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2 && x.is_contiguous(), "rtserve::decode_layer: x must be contiguous float32 (M, H)");
  TORCH_CHECK(kv_cache.scalar_type() == at::kFloat && kv_cache.dim() == 5 && kv_cache.is_contiguous() && kv_cache.size(0) == 2,
              "rtserve::decode_layer: kv_cache must be contiguous float32 (2, blocks, Hkv, block_size, D)");
  const int64_t m = x.size(0), h = x.size(1), nb = kv_cache.size(1), bs = kv_cache.size(3), d = kv_cache.size(4);
  TORCH_CHECK(kv_cache.size(2) == nkv && nkv > 0 && nh % nkv == 0, "rtserve::decode_layer: head counts do not match the cache");
  TORCH_CHECK(rope.scalar_type() == at::kFloat && rope.is_contiguous() && rope.numel() == m * 2 * d, "rtserve::decode_layer: rope must be (M, 2, D)");
  TORCH_CHECK(blocks.scalar_type() == at::kLong && blocks.dim() == 2 && blocks.size(0) == m && blocks.is_contiguous(),
              "rtserve::decode_layer: blocks must be contiguous int64 (M, B)");
  TORCH_CHECK(context_lens.scalar_type() == at::kLong && context_lens.numel() == m && slots.scalar_type() == at::kLong && slots.numel() == m,
              "rtserve::decode_layer: context_lens and slots must be int64 (M,)");
  TORCH_CHECK(ln1.numel() == h && ln2.numel() == h && ln1.scalar_type() == at::kFloat && ln2.scalar_type() == at::kFloat,
              "rtserve::decode_layer: norm weights must be float32 (H,)");
  const int64_t nq = nh * d, nk = nkv * d, inter = in_features(down_w);
  const Lin qkv{qkv_w, qkv_s, qkv_b}, o{o_w, o_s, none}, gu{gu_w, gu_s, none}, down{down_w, down_s, none};
  check_lin("qkv", qkv, nq + 2 * nk, h);
  check_lin("o", o, h, nq);
  check_lin("gate_up", gu, 2 * inter, h);
  check_lin("down", down, h, inter);
  const int64_t nblk = blocks.size(1);
  const int64_t* bt = blocks.data_ptr<int64_t>();
  const int64_t* lens = context_lens.data_ptr<int64_t>();
  const int64_t* sl = slots.data_ptr<int64_t>();
  check_contexts("rtserve::decode_layer", bt, nblk, lens, m, bs, nb);
  for (int64_t r = 0; r < m; ++r)
    TORCH_CHECK(sl[r] >= 0 && sl[r] < nb * bs, "rtserve::decode_layer: slot out of range");
  const float* qn = q_norm ? q_norm->data_ptr<float>() : nullptr;
  const float* kn = k_norm ? k_norm->data_ptr<float>() : nullptr;

  at::Tensor out = x.clone();
  std::vector<float> hbuf(m * h), qkvb(m * (nq + 2 * nk)), att(m * nq), gub(m * 2 * inter), act(m * inter), proj(m * h);
  float* y = out.data_ptr<float>();
  float* kc = kv_cache.data_ptr<float>();
  float* vc = kc + nb * nkv * bs * d;
  const float* rp = rope.data_ptr<float>();

  rms_norm_rows(y, ln1.data_ptr<float>(), hbuf.data(), m, h, eps);
  linear_into(hbuf.data(), m, qkv.w, qkv.scale, qkv.bias, qkvb.data());
  for (int64_t r = 0; r < m; ++r) {
    float* row = qkvb.data() + r * (nq + 2 * nk);
    const float *cs = rp + r * 2 * d, *sn = cs + d;
    for (int64_t hd = 0; hd < nh + nkv; ++hd) {
      float* v = row + hd * d;
      const float* nw = hd < nh ? qn : kn;
      if (nw) rms_norm_rows(v, nw, v, 1, d, eps);
      rotate(v, cs, sn, d);
    }
    const int64_t blk = sl[r] / bs, off = sl[r] % bs;
    for (int64_t g = 0; g < nkv; ++g) {
      const int64_t dst = ((blk * nkv + g) * bs + off) * d;
      std::copy(row + nq + g * d, row + nq + (g + 1) * d, kc + dst);
      std::copy(row + nq + nk + g * d, row + nq + nk + (g + 1) * d, vc + dst);
    }
  }
  attend_rows(qkvb.data(), nq + 2 * nk, kc, vc, bt, nblk, lens, m, nh, nkv, bs, d, static_cast<float>(scale),
              att.data(), nq);
  linear_into(att.data(), m, o.w, o.scale, o.bias, proj.data());
  for (int64_t i = 0; i < m * h; ++i) y[i] += proj[i];
  rms_norm_rows(y, ln2.data_ptr<float>(), hbuf.data(), m, h, eps);
  linear_into(hbuf.data(), m, gu.w, gu.scale, gu.bias, gub.data());
  for (int64_t r = 0; r < m; ++r)
    for (int64_t i = 0; i < inter; ++i) {
      const float g = gub[r * 2 * inter + i];
      act[r * inter + i] = g / (1.f + std::exp(-g)) * gub[r * 2 * inter + inter + i];
    }
  linear_into(act.data(), m, down.w, down.scale, down.bias, proj.data());
  for (int64_t i = 0; i < m * h; ++i) y[i] += proj[i];
  return out;
}

// Every layer of a decode step in one call: ``layers`` holds 13 entries a layer, in decode_layer's
// order (ln1, qkv_w, qkv_s, qkv_b, q_norm, k_norm, o_w, o_s, ln2, gu_w, gu_s, down_w, down_s; None
// where a layer has no such tensor), ``caches`` one KV cache a layer.
at::Tensor decode_layers(const at::Tensor& x, const c10::List<c10::optional<at::Tensor>>& layers,
                         const std::vector<at::Tensor>& caches, const at::Tensor& rope, const at::Tensor& blocks,
                         const at::Tensor& context_lens, const at::Tensor& slots, int64_t nh, int64_t nkv, double eps,
                         double scale) {
  constexpr int64_t per = 13;
  TORCH_CHECK(static_cast<int64_t>(layers.size()) == per * static_cast<int64_t>(caches.size()),
              "rtserve::decode_layers: 13 tensors a layer and one cache a layer");
  std::vector<c10::optional<at::Tensor>> t(layers.begin(), layers.end());
  for (int64_t i = 0; i < static_cast<int64_t>(caches.size()); ++i)
    for (int64_t j : {0, 1, 6, 8, 9, 11})
      TORCH_CHECK(t[i * per + j].has_value(), "rtserve::decode_layers: layer ", i, " lacks a required tensor");
  at::Tensor y = x;
  for (int64_t i = 0; i < static_cast<int64_t>(caches.size()); ++i) {
    const auto* l = t.data() + i * per;
    y = decode_layer(y, *l[0], *l[1], l[2], l[3], l[4], l[5], *l[6], l[7], *l[8], *l[9], l[10], *l[11], l[12], rope,
                     caches[i], blocks, context_lens, slots, nh, nkv, eps, scale);
  }
  return y;
}

// The k largest logits of each row recomputed with ``exact`` (V, H) float32 or float16: a quantized
// head's approximate logits rank the vocabulary, the exact weights settle the top of it.
void rescore_top(const float* x, int64_t r, int64_t h, const at::Tensor& exact, int64_t k, at::Tensor& logits) {
  const int64_t v = logits.size(1);
  TORCH_CHECK(exact.dim() == 2 && exact.size(0) == v && exact.size(1) == h && exact.is_contiguous() &&
                  (exact.scalar_type() == at::kFloat || exact.scalar_type() == at::kHalf),
              "rtserve::decode_logits: head_exact must be contiguous float32 or float16 (V, H)");
  TORCH_CHECK(k >= 1 && k <= std::min<int64_t>(v, 64), "rtserve::decode_logits: exact_top_k must be in [1, min(V, 64)]");
  std::vector<int64_t> top(k);
  for (int64_t i = 0; i < r; ++i) {
    float* l = logits.data_ptr<float>() + i * v;
    int64_t n = 0;  // top[0..n) sorted by descending logit
    for (int64_t j = 0; j < v; ++j) {
      if (n == k && !(l[j] > l[top[k - 1]])) continue;
      int64_t p = n < k ? n++ : k - 1;
      while (p > 0 && l[j] > l[top[p - 1]]) { top[p] = top[p - 1]; --p; }
      top[p] = j;
    }
    for (int64_t t = 0; t < n; ++t)
      l[top[t]] = exact.scalar_type() == at::kHalf ? dot1(exact.data_ptr<c10::Half>() + top[t] * h, x + i * h, h)
                                                   : dot1(exact.data_ptr<float>() + top[t] * h, x + i * h, h);
  }
}

// decode_layers, then the final RMSNorm and the LM head for the rows ``logits_index``: a decode
// step's forward from embeddings to logits in one call. head_w: (V, H) float32 or float16.
at::Tensor decode_logits(const at::Tensor& x, const c10::List<c10::optional<at::Tensor>>& layers,
                         const std::vector<at::Tensor>& caches, const at::Tensor& rope, const at::Tensor& blocks,
                         const at::Tensor& context_lens, const at::Tensor& slots, int64_t nh, int64_t nkv, double eps,
                         double scale, const at::Tensor& logits_index, const at::Tensor& norm, const at::Tensor& head_w,
                         const c10::optional<at::Tensor>& head_s, const c10::optional<at::Tensor>& head_exact,
                         int64_t exact_top_k) {
  at::Tensor y = decode_layers(x, layers, caches, rope, blocks, context_lens, slots, nh, nkv, eps, scale);
  const int64_t h = y.size(1);
  TORCH_CHECK(logits_index.scalar_type() == at::kLong && logits_index.dim() == 1, "rtserve::decode_logits: logits_index must be int64 (R,)");
  TORCH_CHECK(norm.scalar_type() == at::kFloat && norm.numel() == h, "rtserve::decode_logits: norm must be float32 (H,)");
  const int64_t r = logits_index.numel();
  const int64_t* li = logits_index.data_ptr<int64_t>();
  std::vector<float> rows(r * h);
  for (int64_t i = 0; i < r; ++i) {
    TORCH_CHECK(li[i] >= 0 && li[i] < y.size(0), "rtserve::decode_logits: logits_index out of range");
    rms_norm_rows(y.data_ptr<float>() + li[i] * h, norm.data_ptr<float>(), rows.data() + i * h, 1, h, eps);
  }
  at::Tensor xr = at::empty({0, h}, y.options());
  check_linear(xr, head_w, head_s, c10::nullopt);
  at::Tensor out = at::empty({r, out_features(head_w)}, y.options());
  linear_into(rows.data(), r, head_w, head_s, c10::nullopt, out.data_ptr<float>());
  if (head_exact) rescore_top(rows.data(), r, h, *head_exact, exact_top_k, out);
  return out;
}

// Decode attention on the PyTorch path: q (S, Hq, D), one query per sequence, over each context in
// the paged cache (2, blocks, Hkv, block_size, D), read in place through blocks (S, B) int64 up to
// context_lens (S,) int64. Returns (S, Hq, D).
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& kv_cache, const at::Tensor& blocks,
                            const at::Tensor& context_lens, double scale) {
  TORCH_CHECK(q.scalar_type() == at::kFloat && q.dim() == 3 && q.is_contiguous(), "rtserve::decode_attention: q must be contiguous float32 (S, Hq, D)");
  TORCH_CHECK(kv_cache.scalar_type() == at::kFloat && kv_cache.dim() == 5 && kv_cache.is_contiguous() && kv_cache.size(0) == 2 &&
                  kv_cache.size(4) == q.size(2) && q.size(1) % kv_cache.size(2) == 0,
              "rtserve::decode_attention: kv_cache must be contiguous float32 (2, blocks, Hkv, block_size, D) matching q");
  const int64_t s = q.size(0), nh = q.size(1), d = q.size(2), nb = kv_cache.size(1), nkv = kv_cache.size(2), bs = kv_cache.size(3);
  TORCH_CHECK(blocks.scalar_type() == at::kLong && blocks.dim() == 2 && blocks.size(0) == s && blocks.is_contiguous() &&
                  context_lens.scalar_type() == at::kLong && context_lens.numel() == s && context_lens.is_contiguous(),
              "rtserve::decode_attention: blocks (S, B) and context_lens (S,) must be contiguous int64");
  const int64_t nblk = blocks.size(1);
  const int64_t* bt = blocks.data_ptr<int64_t>();
  const int64_t* lens = context_lens.data_ptr<int64_t>();
  check_contexts("rtserve::decode_attention", bt, nblk, lens, s, bs, nb);
  at::Tensor out = at::empty_like(q);
  const float* kc = kv_cache.data_ptr<float>();
  attend_rows(q.data_ptr<float>(), nh * d, kc, kc + nb * nkv * bs * d, bt, nblk, lens, s, nh, nkv, bs, d,
              static_cast<float>(scale), out.data_ptr<float>(), nh * d);
  return out;
}

std::string native_isa() { return isa(); }
bool native_int8_pairs() { return PAIRS; }
bool native_int8_pairs_default() { return PAIRS_DEFAULT; }

TORCH_LIBRARY(rtserve, m) {
  m.def("linear(Tensor x, Tensor w, Tensor? scale, Tensor? bias) -> Tensor");
  m.def("decode_layer(Tensor x, Tensor ln1, Tensor qkv_w, Tensor? qkv_s, Tensor? qkv_b, Tensor? q_norm, "
        "Tensor? k_norm, Tensor o_w, Tensor? o_s, Tensor ln2, Tensor gu_w, Tensor? gu_s, Tensor down_w, "
        "Tensor? down_s, Tensor rope, Tensor(a!) kv_cache, Tensor blocks, Tensor context_lens, Tensor slots, "
        "int nh, int nkv, float eps, float scale) -> Tensor");
  m.def("decode_layers(Tensor x, Tensor?[] layers, Tensor(a!)[] caches, Tensor rope, Tensor blocks, "
        "Tensor context_lens, Tensor slots, int nh, int nkv, float eps, float scale) -> Tensor");
  m.def("decode_logits(Tensor x, Tensor?[] layers, Tensor(a!)[] caches, Tensor rope, Tensor blocks, "
        "Tensor context_lens, Tensor slots, int nh, int nkv, float eps, float scale, Tensor logits_index, "
        "Tensor norm, Tensor head_w, Tensor? head_s=None, Tensor? head_exact=None, int exact_top_k=8) -> Tensor");
  m.def("decode_attention(Tensor q, Tensor kv_cache, Tensor blocks, Tensor context_lens, float scale) -> Tensor");
  m.def("isa() -> str", &native_isa);
  m.def("int8_pairs() -> bool", &native_int8_pairs);
  m.def("int8_pairs_default() -> bool", &native_int8_pairs_default);
}

TORCH_LIBRARY_IMPL(rtserve, CPU, m) {
  m.impl("linear", linear);
  m.impl("decode_layer", decode_layer);
  m.impl("decode_attention", decode_attention);
  m.impl("decode_layers", decode_layers);
  m.impl("decode_logits", decode_logits);
}
