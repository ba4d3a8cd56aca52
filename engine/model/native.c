/* CPU kernels for decode steps over GGUF's own 4- and 8-bit weight blocks (see native.py).

   y[m, n] = x[m, k] @ W[n, k].T for a few rows m, with W kept as the file's blocks of 32 weights:
     q4: w = d * q + z, q in 0..15 (GGUF Q4_1; Q4_0 is z = -8 d), one float d and z per block;
     q8: w = d * q, q in -128..127 (GGUF Q8_0), one float d per block.
   Activations, products and sums stay float32: the weights are exactly the file's, so results differ from the
   float32 path only by the order of the sums. A block's 32 weights are stored in the order that makes widening
   them to floats cheap (planar: no shuffles), and converted once for all m rows.

   Built at run time by native.py with the machine's C compiler (-O3 -march=native -fopenmp); the OpenMP runtime
   is the one torch has already loaded, so the kernels share torch's thread team. */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define NATIVE_SIMD 1
#else
#define NATIVE_SIMD 0
#endif
/* AVX-512: the prefill attention kernels take 16 floats per vector (a key panel is one vector) */
#if NATIVE_SIMD && defined(__AVX512F__)
#define WIDE 1
#else
#define WIDE 0
#endif

#define QK 32  /* weights per block */
#define MAXR 4 /* activation rows computed together over one pass of the weights */
#define PANEL_ROWS 4 /* calls of more rows widen each weight row once into a panel (linear_panel) */

/* A float16 KV cache (half the bytes a decode step reads): converted on load with F16C, on AVX2 machines */
#if NATIVE_SIMD && defined(__F16C__)
#define NATIVE_F16 1
#else
#define NATIVE_F16 0
#endif

/* floats per vector of the attention kernels: 16 (AVX-512), 8 (AVX2 + FMA), 0 (no vectorised path) */
int native_simd(void) { return NATIVE_SIMD ? (WIDE ? 16 : 8) : 0; }
/* whether the decode kernels take a float16 KV cache */
int native_f16(void) { return NATIVE_F16; }

/* Planar element order inside a block (the packing in native.py must match):
   q4: 16 bytes as 4 little-endian dwords; element 8*v + lane is nibble 2*v + lane/4 of dword lane%4.
   q8: 32 bytes as 8 dwords; element 8*v + lane is byte v of dword lane. */

#if NATIVE_SIMD
static inline float hsum(__m256 v) {
  __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  a = _mm_add_ps(a, _mm_movehl_ps(a, a));
  a = _mm_add_ss(a, _mm_movehdup_ps(a));
  return _mm_cvtss_f32(a);
}

static inline float hmax(__m256 v) {
  __m128 x = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_max_ps(x, _mm_movehl_ps(x, x));
  return _mm_cvtss_f32(_mm_max_ss(x, _mm_movehdup_ps(x)));
}

static inline void widen_q4(const uint8_t *q, __m256 w[4]) {
  const __m256i v = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)q));
  const __m256i lo = _mm256_set1_epi32(0xF);
  w[0] = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srlv_epi32(v, _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4)), lo));
  w[1] = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srlv_epi32(v, _mm256_setr_epi32(8, 8, 8, 8, 12, 12, 12, 12)), lo));
  w[2] = _mm256_cvtepi32_ps(
      _mm256_and_si256(_mm256_srlv_epi32(v, _mm256_setr_epi32(16, 16, 16, 16, 20, 20, 20, 20)), lo));
  w[3] = _mm256_cvtepi32_ps(
      _mm256_and_si256(_mm256_srlv_epi32(v, _mm256_setr_epi32(24, 24, 24, 24, 28, 28, 28, 28)), lo));
}

static inline void widen_q8(const int8_t *q, __m256 w[4]) {
  const __m256i v = _mm256_loadu_si256((const __m256i *)q);
  w[0] = _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(v, 24), 24));
  w[1] = _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(v, 16), 24));
  w[2] = _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(v, 8), 24));
  w[3] = _mm256_cvtepi32_ps(_mm256_srai_epi32(v, 24));
}

static inline __m256 dot32(const __m256 w[4], const float *x) {
  __m256 p = _mm256_mul_ps(w[0], _mm256_loadu_ps(x));
  p = _mm256_fmadd_ps(w[1], _mm256_loadu_ps(x + 8), p);
  p = _mm256_fmadd_ps(w[2], _mm256_loadu_ps(x + 16), p);
  return _mm256_fmadd_ps(w[3], _mm256_loadu_ps(x + 24), p);
}

/* One weight row against r <= MAXR activation rows; s[i * nb + b] is the sum of row i's block b (q4's zeros). */
static inline __attribute__((always_inline)) void row_dot(const int kind, const uint8_t *q, const float *d, const float *z, const float *x,
                           const float *s, float *y, int64_t nb, int64_t k, int64_t n, int r) {
  __m256 acc[MAXR];
  float zs[MAXR];
  for (int i = 0; i < r; i++) {
    acc[i] = _mm256_setzero_ps();
    zs[i] = 0.f;
  }
  for (int64_t b = 0; b < nb; b++) {
    __m256 w[4];
    if (kind == 4) widen_q4(q + 16 * b, w);
    else widen_q8((const int8_t *)q + 32 * b, w);
    const __m256 db = _mm256_broadcast_ss(d + b);
    for (int i = 0; i < r; i++) {
      acc[i] = _mm256_fmadd_ps(dot32(w, x + i * k + QK * b), db, acc[i]);
      if (kind == 4) zs[i] += z[b] * s[i * nb + b];
    }
  }
  for (int i = 0; i < r; i++) y[i * n] = hsum(acc[i]) + zs[i];
}
#else
static inline float widen(int kind, const uint8_t *q, int e) {
  int v = e / 8, lane = e % 8;
  if (kind == 4) return (float)((q[4 * (lane % 4) + v] >> (4 * (lane / 4))) & 0xF);
  return (float)((const int8_t *)q)[4 * lane + v];
}

static inline __attribute__((always_inline)) void row_dot(const int kind, const uint8_t *q, const float *d, const float *z, const float *x,
                           const float *s, float *y, int64_t nb, int64_t k, int64_t n, int r) {
  const int64_t bytes = kind == 4 ? 16 : 32;
  for (int i = 0; i < r; i++) {
    float acc = 0.f;
    for (int64_t b = 0; b < nb; b++) {
      float p = 0.f;
      for (int e = 0; e < QK; e++) p += widen(kind, q + bytes * b, e) * x[i * k + QK * b + e];
      acc += p * d[b] + (kind == 4 ? z[b] * s[i * nb + b] : 0.f);
    }
    y[i * n] = acc;
  }
}
#endif

static void block_sums(const float *x, float *s, int64_t count) {
  for (int64_t b = 0; b < count; b++) {
    float t = 0.f;
    for (int e = 0; e < QK; e++) t += x[QK * b + e];
    s[b] = t;
  }
}

/* ---- calls of more rows: each weight row is widened to floats once, into a small per-thread panel, and every
   activation row reads it from L1. Tiles of PR activation rows x PN weight rows keep 12 vector sums in registers;
   each step loads PR + PN vectors for PR * PN multiply-adds, so the loop runs near the FMA units' rate. */

#define PN 4 /* weight rows per panel (panel_rows' switch spells out 1..PN) */
#define PR 3 /* activation rows per tile (and 1..PR) */
#define X_BLOCK_BYTES (128 * 1024) /* activation rows per pass over the weights: about half of L2 */

#if NATIVE_SIMD
/* panel[0..k) = weight row j as floats: w = d * q + z per block (q4), d * q (q8); exactly the file's values */
static void widen_row(int kind, const uint8_t *q, const float *d, const float *z, int64_t nb, float *panel) {
  for (int64_t b = 0; b < nb; b++) {
    __m256 w[4];
    if (kind == 4) widen_q4(q + 16 * b, w);
    else widen_q8((const int8_t *)q + 32 * b, w);
    const __m256 db = _mm256_broadcast_ss(d + b), zb = kind == 4 ? _mm256_broadcast_ss(z + b) : _mm256_setzero_ps();
    for (int v = 0; v < 4; v++) _mm256_storeu_ps(panel + QK * b + 8 * v, _mm256_fmadd_ps(w[v], db, zb));
  }
}

/* a value loaded once and used by several multiply-adds stays in a register: without this, gcc folds the load
   into each of them, and the loop runs at the load ports' rate instead of the FMA units' */
#define KEEP(v) __asm__("" : "+x"(v))

/* y[i * n + j] = x[i] . panel[j] over k for i < r, j < c */
static inline __attribute__((always_inline)) void tile(const float *x, const float *panel, float *y, int64_t k,
                                                        int64_t n, int r, int c) {
  __m256 acc[PR][PN];
  for (int i = 0; i < r; i++)
    for (int j = 0; j < c; j++) acc[i][j] = _mm256_setzero_ps();
  for (int64_t e = 0; e < k; e += 8) {
    __m256 xv[PR];
    for (int i = 0; i < r; i++) {
      xv[i] = _mm256_loadu_ps(x + i * k + e);
      KEEP(xv[i]);
    }
    for (int j = 0; j < c; j++) {
      __m256 w = _mm256_loadu_ps(panel + j * k + e);
      KEEP(w);
      for (int i = 0; i < r; i++) acc[i][j] = _mm256_fmadd_ps(xv[i], w, acc[i][j]);
    }
  }
  for (int i = 0; i < r; i++)
    for (int j = 0; j < c; j++) y[i * n + j] = hsum(acc[i][j]);
}
#else
static void widen_row(int kind, const uint8_t *q, const float *d, const float *z, int64_t nb, float *panel) {
  const int64_t bytes = kind == 4 ? 16 : 32;
  for (int64_t b = 0; b < nb; b++)
    for (int e = 0; e < QK; e++) panel[QK * b + e] = widen(kind, q + bytes * b, e) * d[b] + (kind == 4 ? z[b] : 0.f);
}

static inline void tile(const float *x, const float *panel, float *y, int64_t k, int64_t n, int r, int c) {
  for (int i = 0; i < r; i++)
    for (int j = 0; j < c; j++) {
      float acc = 0.f;
      for (int64_t e = 0; e < k; e++) acc += x[i * k + e] * panel[j * k + e];
      y[i * n + j] = acc;
    }
}
#endif

static void panel_rows(int r, const float *x, const float *panel, float *y, int64_t k, int64_t n, int c) {
  /* constant tile shapes let the compiler keep the sums in registers */
#define COLS(R)                                   \
  switch (c) {                                    \
    case 1: tile(x, panel, y, k, n, R, 1); break; \
    case 2: tile(x, panel, y, k, n, R, 2); break; \
    case 3: tile(x, panel, y, k, n, R, 3); break; \
    default: tile(x, panel, y, k, n, R, PN); break; \
  }
  if (r == 1) {
    COLS(1)
  } else if (r == 2) {
    COLS(2)
  } else {
    COLS(PR)
  }
#undef COLS
}

static int linear_panel(int kind, const uint8_t *q, const float *d, const float *z, const float *x, float *y,
                        int64_t m, int64_t n, int64_t k) {
  const int64_t nb = k / QK, row_bytes = kind == 4 ? k / 2 : k;
  /* activation rows per pass over the weights: a block of them stays in L2 while every panel reads it */
  int64_t mb = X_BLOCK_BYTES / (k * (int64_t)sizeof(float)) / PR * PR;
  if (mb < PR) mb = PR;
  int failed = 0;
#pragma omp parallel
  {
    float *panel = malloc((size_t)(PN * k) * sizeof(float));
    if (!panel) {
#pragma omp atomic write
      failed = 1;
    }
    for (int64_t m0 = 0; m0 < m; m0 += mb) {
      const int64_t m1 = m0 + mb < m ? m0 + mb : m;
#pragma omp for schedule(static)
      for (int64_t j0 = 0; j0 < n; j0 += PN) {
        if (!panel) continue;
        const int c = n - j0 < PN ? (int)(n - j0) : PN;
        for (int j = 0; j < c; j++)
          widen_row(kind, q + (j0 + j) * row_bytes, d + (j0 + j) * nb, kind == 4 ? z + (j0 + j) * nb : NULL, nb,
                    panel + j * k);
        for (int64_t i0 = m0; i0 < m1; i0 += PR) {
          const int r = m1 - i0 < PR ? (int)(m1 - i0) : PR;
          panel_rows(r, x + i0 * k, panel, y + i0 * n + j0, k, n, c);
        }
      }
    }
    free(panel);
  }
  return failed ? -1 : 0;
}

/* w [n, k] = the weights widened to floats (kinds and layouts as native_linear), for a float32 GEMM of many rows */
void native_widen(int kind, const uint8_t *q, const float *d, const float *z, int64_t n, int64_t k, float *w) {
  const int64_t nb = k / QK, row_bytes = kind == 4 ? k / 2 : k;
#pragma omp parallel for schedule(static)
  for (int64_t j = 0; j < n; j++)
    widen_row(kind, q + j * row_bytes, d + j * nb, kind == 4 ? z + j * nb : NULL, nb, w + j * k);
}

/* ---- prefill GEMMs with 8-bit activations (W4A8), as llama.cpp multiplies Q4_1 blocks: each block of 32
   activations is rounded to int8 with its own scale (dx = max |x| / 127), the products with the 4-bit weights are
   summed exactly as integers (AVX-512 VNNI: 64 multiply-adds per instruction, four times float32's), and per block
     y += d * dx * sum(q * xq) + z * sum(x)
   with the exact float sum of the block's activations for z. The weights stay exactly the file's; the activations
   carry a rounding error of at most dx / 2 each (about 1% of a GEMM's output norm on Gaussian inputs).

   Weights are packed for it once (native.py), n a multiple of 32: per panel of 16 output rows and block, 4 x 64 bytes where byte
   4 * r + u of vector j holds q[r][4j + u] (low nibble) and q[r][16 + 4j + u] (high nibble), then the panel's 16
   scales and 16 offsets per block. Activations are quantized into tiles of Q8_ROWS rows, block-major inside a tile
   ([tile][block][row][32]), so that a tile's rows sit 32 bytes apart. */

#define Q8_ROWS 6 /* activation rows per tile (q8_tile) */

#if WIDE && defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define VNNI 1
#else
#define VNNI 0
#endif

int native_vnni(void) { return VNNI; }

/* x [m, k] -> xq [ceil(m / Q8_ROWS) * Q8_ROWS, k] (tiled as above), dx and sx [m, k / 32]; rounding to nearest */
void native_quantize_rows(const float *x, int64_t m, int64_t k, int8_t *xq, float *dx, float *sx) {
  const int64_t nb = k / QK;
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < m * nb; i++) {
    const int64_t row = i / nb, b = i % nb;
    const float *xb = x + i * QK;
    int8_t *dst = xq + (((row / Q8_ROWS) * nb + b) * Q8_ROWS + row % Q8_ROWS) * QK;
#if VNNI
    const __m512 lo = _mm512_loadu_ps(xb), hi = _mm512_loadu_ps(xb + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
    const __m512 inv = _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
    _mm_storeu_si128((__m128i *)dst, _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(lo, inv))));
    _mm_storeu_si128((__m128i *)(dst + 16), _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(hi, inv))));
    sx[i] = _mm512_reduce_add_ps(_mm512_add_ps(lo, hi));
#else
    float amax = 0.f, sum = 0.f;
    for (int e = 0; e < QK; e++) {
      amax = fmaxf(amax, fabsf(xb[e]));
      sum += xb[e];
    }
    const float inv = amax > 0.f ? 127.f / amax : 0.f;
    for (int e = 0; e < QK; e++) dst[e] = (int8_t)lrintf(xb[e] * inv);
    sx[i] = sum;
#endif
    dx[i] = amax / 127.f;
  }
}

#if VNNI
/* rows (<= Q8_ROWS) activation rows x two panels (32 outputs): 12 integer and 12 float sums in registers; each
   broadcast activation dword feeds both panels */
static inline __attribute__((always_inline)) void q8_tile(const uint8_t *wp, const float *wd, const float *wz,
                                                           const int8_t *xq, const float *dx, const float *sx, float *y,
                                                           int64_t nb, int64_t n, int rows) {
  __m512 acc[2][Q8_ROWS];
  for (int p = 0; p < 2; p++)
    for (int t = 0; t < rows; t++) acc[p][t] = _mm512_setzero_ps();
  const __m512i low = _mm512_set1_epi8(0x0F);
  for (int64_t b = 0; b < nb; b++) {
    __m512i s[2][Q8_ROWS];
    for (int p = 0; p < 2; p++)
      for (int t = 0; t < rows; t++) s[p][t] = _mm512_setzero_si512();
    const int8_t *xb = xq + b * Q8_ROWS * QK;
#pragma GCC unroll 4
    for (int j = 0; j < 4; j++) {
      __m512i lo[2], hi[2];
      for (int p = 0; p < 2; p++) {
        const __m512i v = _mm512_loadu_si512(wp + (p * nb + b) * 256 + 64 * j);
        lo[p] = _mm512_and_si512(v, low);
        hi[p] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
      }
#pragma GCC unroll 6
      for (int t = 0; t < rows; t++) {
        int32_t a, c;
        memcpy(&a, xb + t * QK + 4 * j, 4);
        memcpy(&c, xb + t * QK + 16 + 4 * j, 4);
        const __m512i xa = _mm512_set1_epi32(a), xc = _mm512_set1_epi32(c);
        for (int p = 0; p < 2; p++) {
          s[p][t] = _mm512_dpbusd_epi32(s[p][t], lo[p], xa);
          s[p][t] = _mm512_dpbusd_epi32(s[p][t], hi[p], xc);
        }
      }
    }
    for (int p = 0; p < 2; p++) {
      const __m512 d = _mm512_loadu_ps(wd + (p * nb + b) * 16), z = _mm512_loadu_ps(wz + (p * nb + b) * 16);
      for (int t = 0; t < rows; t++) {
        const __m512 scale = _mm512_mul_ps(d, _mm512_set1_ps(dx[t * nb + b]));
        acc[p][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s[p][t]), scale, acc[p][t]);
        acc[p][t] = _mm512_fmadd_ps(z, _mm512_set1_ps(sx[t * nb + b]), acc[p][t]);
      }
    }
  }
  for (int p = 0; p < 2; p++)
    for (int t = 0; t < rows; t++) _mm512_storeu_ps(y + t * n + 16 * p, acc[p][t]);
}
#else
/* the same sums, one at a time (tests of the packing and the arithmetic on machines without VNNI) */
static void q8_tile(const uint8_t *wp, const float *wd, const float *wz, const int8_t *xq, const float *dx,
                    const float *sx, float *y, int64_t nb, int64_t n, int rows) {
  for (int t = 0; t < rows; t++)
    for (int r = 0; r < 32; r++) {
      const int64_t p = r / 16, lane = r % 16;
      float acc = 0.f;
      for (int64_t b = 0; b < nb; b++) {
        const uint8_t *wb = wp + (p * nb + b) * 256;
        const int8_t *xb = xq + (b * Q8_ROWS + t) * QK;
        int32_t s = 0;
        for (int j = 0; j < 4; j++)
          for (int u = 0; u < 4; u++) {
            const uint8_t byte = wb[64 * j + 4 * lane + u];
            s += (byte & 0x0F) * xb[4 * j + u] + (byte >> 4) * xb[16 + 4 * j + u];
          }
        acc = fmaf((float)s, wd[(p * nb + b) * 16 + lane] * dx[t * nb + b], acc);
        acc = fmaf(wz[(p * nb + b) * 16 + lane], sx[t * nb + b], acc);
      }
      y[t * n + r] = acc;
    }
}
#endif

/* y [m, n] = x @ W.T from native_quantize_rows' activations and the packed weights (n a multiple of 32) */
void native_linear_q8(const uint8_t *wp, const float *wd, const float *wz, const int8_t *xq, const float *dx,
                      const float *sx, float *y, int64_t m, int64_t n, int64_t k) {
  const int64_t nb = k / QK, tiles = (m + Q8_ROWS - 1) / Q8_ROWS, pairs = n / 32;
#pragma omp parallel for schedule(static)
  for (int64_t ti = 0; ti < tiles; ti++) {
    const int64_t t0 = ti * Q8_ROWS;
    const int rows = m - t0 < Q8_ROWS ? (int)(m - t0) : Q8_ROWS;
    const int8_t *xt = xq + t0 * k;
    for (int64_t p = 0; p < pairs; p++) {
      const uint8_t *w = wp + 2 * p * nb * 256;
      const float *d = wd + 2 * p * nb * 16, *z = wz + 2 * p * nb * 16;
      float *yt = y + t0 * n + 32 * p;
      if (rows == Q8_ROWS) q8_tile(w, d, z, xt, dx + t0 * nb, sx + t0 * nb, yt, nb, n, Q8_ROWS);
      else q8_tile(w, d, z, xt, dx + t0 * nb, sx + t0 * nb, yt, nb, n, rows);
    }
  }
}

/* kind 4 (q4: q is [n, k/2] bytes, z [n, k/32]) or 8 (q8: q is [n, k] bytes, z unused); d [n, k/32];
   scratch: m * k / 32 floats (q4 only). Returns 0, or -1 where memory for the panels ran out. */
int native_linear(int kind, const uint8_t *q, const float *d, const float *z, const float *x, float *y, int64_t m,
                  int64_t n, int64_t k, float *scratch) {
  if (m > PANEL_ROWS) return linear_panel(kind, q, d, z, x, y, m, n, k);
  const int64_t nb = k / QK, row_bytes = kind == 4 ? k / 2 : k;
  if (kind == 4) block_sums(x, scratch, m * nb);
#pragma omp parallel for schedule(static)
  for (int64_t j = 0; j < n; j++) {
    for (int64_t r0 = 0; r0 < m; r0 += MAXR) {
      const int r = m - r0 < MAXR ? (int)(m - r0) : MAXR;
      const uint8_t *qj = q + j * row_bytes;
      const float *dj = d + j * nb, *zj = kind == 4 ? z + j * nb : NULL;
      const float *xr = x + r0 * k, *sr = kind == 4 ? scratch + r0 * nb : NULL;
      float *yr = y + r0 * n + j;
      /* constant kinds and row counts let the compiler keep the accumulators in registers */
#define ROWS(KIND)                                                                  \
  switch (r) {                                                                      \
    case 1: row_dot(KIND, qj, dj, zj, xr, sr, yr, nb, k, n, 1); break;             \
    case 2: row_dot(KIND, qj, dj, zj, xr, sr, yr, nb, k, n, 2); break;             \
    case 3: row_dot(KIND, qj, dj, zj, xr, sr, yr, nb, k, n, 3); break;             \
    default: row_dot(KIND, qj, dj, zj, xr, sr, yr, nb, k, n, MAXR); break;         \
  }
      if (kind == 4) {
        ROWS(4)
      } else {
        ROWS(8)
      }
#undef ROWS
    }
  }
  return 0;
}

/* ------------------------------------------------------------------------------------------------------------
   A whole decode step of a Llama-family model for a few sequences, one call for all layers.

   At batch 1 the ~20 torch operators of a layer (norms, rotary, cache writes, the K/V gathers, attention,
   residuals) cost more than its matmuls: each is a dispatch, an allocation and an OpenMP fork for a few
   hundred floats. Here a layer is its five matmuls (native_linear's kernels) and plain loops between them. */

typedef struct {
  int64_t kind; /* 4 or 8 */
  const uint8_t *q;
  const float *d, *z;
  int64_t n, k;
} qweight;

typedef struct {
  const float *attn_norm, *ffn_norm;
  qweight wqkv, wo, gate, up, down;
  void *k_cache, *v_cache; /* [slots, n_kv, head_dim], float32 or (model_t.kv_half) float16 */
} layer_t;

typedef struct {
  int64_t n_layers, hidden, inter, n_heads, n_kv, head_dim;
  float eps;
  const float *rope_cos, *rope_sin; /* [context, head_dim]; the sine's first half negated (llama.py) */
  const layer_t *layers;
  int64_t kv_half; /* the KV cache holds float16 */
} model_t;

static int linear(const qweight *w, const float *x, float *y, int64_t m, float *sums) {
  return native_linear((int)w->kind, w->q, w->d, w->z, x, y, m, w->n, w->k, sums);
}

#if NATIVE_SIMD
/* e^x in float32 to a few ulp (arguments clamped to the float range): 2^n * p(r), |r| <= ln2 / 2 */
static inline __m256 exp_ps(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.3f));
  x = _mm256_min_ps(x, _mm256_set1_ps(88.3f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

#if WIDE
/* exp_ps on 16 floats */
static inline __m512 exp512(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.3f));
  x = _mm512_min_ps(x, _mm512_set1_ps(88.3f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(p, _mm512_castsi512_ps(e));
}
#endif

static inline float dot(const float *a, const float *b, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  float s = hsum(acc);
  for (; i < n; i++) s += a[i] * b[i];
  return s;
}

/* y[i] = exp(y[i] - mx) over n floats; returns their sum */
static inline float exp_shifted(float *y, int64_t n, float mx) {
  int64_t i = 0;
#if WIDE
  __m512 wide = _mm512_setzero_ps();
  const __m512 wm = _mm512_set1_ps(mx);
  for (; i + 16 <= n; i += 16) {
    const __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(y + i), wm));
    _mm512_storeu_ps(y + i, e);
    wide = _mm512_add_ps(wide, e);
  }
  float s = _mm512_reduce_add_ps(wide);
#else
  float s = 0.f;
#endif
  __m256 acc = _mm256_setzero_ps();
  const __m256 vm = _mm256_set1_ps(mx);
  for (; i + 8 <= n; i += 8) {
    const __m256 e = exp_ps(_mm256_sub_ps(_mm256_loadu_ps(y + i), vm));
    _mm256_storeu_ps(y + i, e);
    acc = _mm256_add_ps(acc, e);
  }
  s += hsum(acc);
  for (; i < n; i++) {
    y[i] = expf(y[i] - mx);
    s += y[i];
  }
  return s;
}

/* y += a * x over n floats */
static inline void axpy(float *y, float a, const float *x, int64_t n) {
  int64_t i = 0;
#if WIDE
  const __m512 wa = _mm512_set1_ps(a);
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(y + i, _mm512_fmadd_ps(wa, _mm512_loadu_ps(x + i), _mm512_loadu_ps(y + i)));
#endif
  const __m256 va = _mm256_set1_ps(a);
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
  for (; i < n; i++) y[i] += a * x[i];
}

static inline void silu_mul(float *g, const float *u, int64_t n) {
  int64_t i = 0;
#if WIDE
  for (; i + 16 <= n; i += 16) { /* as below, 16 at a time */
    const __m512 v = _mm512_loadu_ps(g + i), one16 = _mm512_set1_ps(1.f);
    const __m512 t = exp512(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(v)));
    const __m512 num = _mm512_mask_mul_ps(v, _mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_LT_OQ), v, t);
    _mm512_storeu_ps(g + i, _mm512_mul_ps(_mm512_div_ps(num, _mm512_add_ps(one16, t)), _mm512_loadu_ps(u + i)));
  }
#endif
  const __m256 one = _mm256_set1_ps(1.f), zero = _mm256_setzero_ps();
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(g + i);
    /* silu(v) = v / (1 + e^-v), with e^-|v| only (no overflow): v >= 0: v / (1 + t); v < 0: v t / (1 + t) */
    const __m256 t = exp_ps(_mm256_sub_ps(zero, _mm256_andnot_ps(_mm256_set1_ps(-0.f), v)));
    const __m256 num = _mm256_blendv_ps(v, _mm256_mul_ps(v, t), _mm256_cmp_ps(v, zero, _CMP_LT_OQ));
    _mm256_storeu_ps(g + i, _mm256_mul_ps(_mm256_div_ps(num, _mm256_add_ps(one, t)), _mm256_loadu_ps(u + i)));
  }
  for (; i < n; i++) g[i] = g[i] / (1.f + expf(-g[i])) * u[i];
}
#else
static inline float dot(const float *a, const float *b, int64_t n) {
  float s = 0.f;
  for (int64_t i = 0; i < n; i++) s += a[i] * b[i];
  return s;
}

static inline float exp_shifted(float *y, int64_t n, float mx) {
  float s = 0.f;
  for (int64_t i = 0; i < n; i++) {
    y[i] = expf(y[i] - mx);
    s += y[i];
  }
  return s;
}

static inline void axpy(float *y, float a, const float *x, int64_t n) {
  for (int64_t i = 0; i < n; i++) y[i] += a * x[i];
}

static inline void silu_mul(float *g, const float *u, int64_t n) {
  for (int64_t i = 0; i < n; i++) g[i] = g[i] / (1.f + expf(-g[i])) * u[i];
}
#endif

static void rms_norm(const float *x, const float *w, float *y, int64_t m, int64_t n, float eps) {
  for (int64_t r = 0; r < m; r++) {
    const float *xr = x + r * n;
    const float scale = 1.f / sqrtf(dot(xr, xr, n) / (float)n + eps);
    for (int64_t i = 0; i < n; i++) y[r * n + i] = xr[i] * scale * w[i];
  }
}

/* x * cos + roll(x, D/2) * sin over one head vector, in place */
static inline void rope(float *x, const float *cos, const float *sin, int64_t dim) {
  float t[512];
  const int64_t half = dim / 2;
  /* two halves without a modulo, so that the compiler vectorizes them */
  for (int64_t i = 0; i < half; i++) t[i] = x[i] * cos[i] + x[i + half] * sin[i];
  for (int64_t i = half; i < dim; i++) t[i] = x[i] * cos[i] + x[i - half] * sin[i];
  memcpy(x, t, (size_t)dim * sizeof(float));
}

/* ---- a prefill chunk's element-wise steps with rows in parallel (torch runs these on one thread per operator,
   bound by memory, for a chunk's 2,048 x 576 floats); the same arithmetic as the decode step's */

/* y [m, n] = x * w / sqrt(mean(x^2) + eps), per row */
void native_rms_norm_rows(const float *x, const float *w, float *y, int64_t m, int64_t n, float eps) {
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < m; r++) rms_norm(x + r * n, w, y + r * n, 1, n, eps);
}

/* rotary embedding in place over `heads` vectors of `dim` per row (row r at x + r * stride), cos/sin [m, dim] */
void native_rope_rows(float *x, int64_t stride, int64_t m, int64_t heads, int64_t dim, const float *cos,
                      const float *sin) {
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < m; r++)
    for (int64_t h = 0; h < heads; h++) rope(x + r * stride + h * dim, cos + r * dim, sin + r * dim, dim);
}

/* g = silu(g) * u over `count` floats */
void native_silu_mul_rows(float *g, const float *u, int64_t count) {
  const int64_t step = 4096;
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < count; i += step) silu_mul(g + i, u + i, count - i < step ? count - i : step);
}

/* structured outputs: row rows[i] of `logits` (rows `stride` floats apart) gets -inf for each token t < vocab whose
   bit (bit t % 32 of word t / 32 of bitmask row i, `words` words) is clear; tokens beyond words * 32 as well */
void native_mask_logits(float *logits, int64_t stride, const int64_t *rows, int64_t n, const int32_t *bitmask,
                        int64_t words, int64_t vocab) {
  for (int64_t i = 0; i < n; i++) {
    float *row = logits + rows[i] * stride;
    const uint32_t *bits = (const uint32_t *)(bitmask + i * words);
    for (int64_t w = 0; w < words && w * 32 < vocab; w++) {
      const uint32_t word = bits[w];
      if (word == 0xFFFFFFFFu) continue;
      const int64_t base = w * 32, end = vocab - base < 32 ? vocab - base : 32;
      for (int64_t j = 0; j < end; j++)
        if (!((word >> j) & 1u)) row[base + j] = -INFINITY;
    }
    for (int64_t t = words * 32; t < vocab; t++) row[t] = -INFINITY;
  }
}

#if NATIVE_SIMD
#define GH 3 /* query heads of one KV group computed together: each key and value row is read once for them */
#define GK 4 /* keys scored together: GH * GK independent sums hide the multiply-add latency */
#ifndef DECODE_AHEAD
#define DECODE_AHEAD 16 /* keys ahead whose rows the decode kernels prefetch (8: ~6% slower at 7K keys, 32: same) */
#endif

/* 8 elements of a KV row from element e on, as floats: float16 (half) or float32 */
static inline __m256 kv_load8(const char *row, int64_t e, int half) {
#if NATIVE_F16
  if (half) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(row + 2 * e)));
#endif
  return _mm256_loadu_ps((const float *)row + e);
}

/* s[h * stride + j] = scale * q_h . key(j) for the R <= GH query heads at q (D floats apart) and keys j < len; key j's
   row starts kstride elements of `es` bytes (4, or 2 for float16: half) per slot into k_cache */
static inline __attribute__((always_inline)) void group_scores(const float *q, const char *k_cache, const int64_t *sl,
                                                                 int64_t kstride, int64_t D, int64_t len, float scale,
                                                                 float *s, int64_t stride, int R, int half) {
  const int64_t es = half ? 2 : 4;
  int64_t j = 0;
  for (; j + GK <= len; j += GK) {
    const char *k[GK];
    for (int t = 0; t < GK; t++) k[t] = k_cache + sl[j + t] * kstride * es;
    if (j + DECODE_AHEAD + GK <= len) /* slots are scattered over the cache: fetch the rows ahead by hand */
      for (int t = 0; t < GK; t++)
        for (int64_t b = 0; b < D * es; b += 64)
          _mm_prefetch(k_cache + sl[j + DECODE_AHEAD + t] * kstride * es + b, _MM_HINT_T0);
    __m256 acc[GH][GK];
    for (int h = 0; h < R; h++)
      for (int t = 0; t < GK; t++) acc[h][t] = _mm256_setzero_ps();
    for (int64_t e = 0; e < D; e += 8) {
      __m256 kv[GK];
      for (int t = 0; t < GK; t++) kv[t] = kv_load8(k[t], e, half);
      for (int h = 0; h < R; h++) {
        const __m256 qv = _mm256_loadu_ps(q + h * D + e);
        for (int t = 0; t < GK; t++) acc[h][t] = _mm256_fmadd_ps(qv, kv[t], acc[h][t]);
      }
    }
    for (int h = 0; h < R; h++)
      for (int t = 0; t < GK; t++) s[h * stride + j + t] = hsum(acc[h][t]) * scale;
  }
  for (; j < len; j++) {
    const char *k = k_cache + sl[j] * kstride * es;
    __m256 acc[GH];
    for (int h = 0; h < R; h++) acc[h] = _mm256_setzero_ps();
    for (int64_t e = 0; e < D; e += 8) {
      const __m256 kv = kv_load8(k, e, half);
      for (int h = 0; h < R; h++) acc[h] = _mm256_fmadd_ps(_mm256_loadu_ps(q + h * D + e), kv, acc[h]);
    }
    for (int h = 0; h < R; h++) s[h * stride + j] = hsum(acc[h]) * scale;
  }
}

/* o_h = sum_j p[h * stride + j] * value(j) for the R <= GH heads (outputs D floats apart), 32 dimensions at a time:
   GH * 4 sums stay in registers over all keys */
static inline __attribute__((always_inline)) void group_values(const float *p, int64_t stride, const char *v_cache,
                                                                 const int64_t *sl, int64_t kstride, int64_t D,
                                                                 int64_t len, float *o, int R, int half) {
  const int64_t es = half ? 2 : 4;
#if WIDE
  if (D % 64 == 0) { /* 64 dimensions at a time in 16-wide registers: GH * 4 sums, one pass per 64 */
    for (int64_t e = 0; e < D; e += 64) {
      __m512 acc[GH][4];
      for (int h = 0; h < R; h++)
        for (int c = 0; c < 4; c++) acc[h][c] = _mm512_setzero_ps();
      for (int64_t j = 0; j < len; j++) {
        const char *v = v_cache + (sl[j] * kstride + e) * es;
        if (j + DECODE_AHEAD < len)
          for (int64_t b = 0; b < 64 * es; b += 64)
            _mm_prefetch(v_cache + (sl[j + DECODE_AHEAD] * kstride + e) * es + b, _MM_HINT_T0);
        __m512 vv[4];
        for (int c = 0; c < 4; c++)
#if NATIVE_F16
          vv[c] = half ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)v + c))
                       : _mm512_loadu_ps((const float *)v + 16 * c);
#else
          vv[c] = _mm512_loadu_ps((const float *)v + 16 * c);
#endif
        for (int h = 0; h < R; h++) {
          const __m512 ph = _mm512_set1_ps(p[h * stride + j]);
          for (int c = 0; c < 4; c++) acc[h][c] = _mm512_fmadd_ps(ph, vv[c], acc[h][c]);
        }
      }
      for (int h = 0; h < R; h++)
        for (int c = 0; c < 4; c++) _mm512_storeu_ps(o + h * D + e + 16 * c, acc[h][c]);
    }
    return;
  }
#endif
  for (int64_t e = 0; e < D; e += 32) {
    __m256 acc[GH][4];
    for (int h = 0; h < R; h++)
      for (int c = 0; c < 4; c++) acc[h][c] = _mm256_setzero_ps();
    for (int64_t j = 0; j < len; j++) {
      const char *v = v_cache + (sl[j] * kstride + e) * es;
      if (j + DECODE_AHEAD < len)
        for (int64_t b = 0; b < 32 * es; b += 64)
          _mm_prefetch(v_cache + (sl[j + DECODE_AHEAD] * kstride + e) * es + b, _MM_HINT_T0);
      __m256 vv[4];
      for (int c = 0; c < 4; c++) vv[c] = kv_load8(v, 8 * c, half);
      for (int h = 0; h < R; h++) {
        const __m256 ph = _mm256_broadcast_ss(p + h * stride + j);
        for (int c = 0; c < 4; c++) acc[h][c] = _mm256_fmadd_ps(ph, vv[c], acc[h][c]);
      }
    }
    for (int h = 0; h < R; h++)
      for (int c = 0; c < 4; c++) _mm256_storeu_ps(o + h * D + e + 8 * c, acc[h][c]);
  }
}

/* Keys 0 .. len of one (row, KV group) of decode_attention for D a multiple of 32, the group's query heads in runs
   of up to GH. part NULL: each head's softmax-weighted values into o. Otherwise (one chunk of a longer context)
   the weights are left unnormalized, o gets their weighted values, and part[h * 2] / part[h * 2 + 1] the chunk's
   largest score and its sum of exp(score - largest) for head h, for decode_attention to combine the chunks. */
static void group_attention(const float *q, const char *k_cache, const char *v_cache, const int64_t *sl,
                            int64_t len, int64_t kstride, int64_t D, int64_t rep, float scale, float *s,
                            int64_t stride, float *o, float *part, int half) {
  for (int64_t h0 = 0; h0 < rep; h0 += GH) {
    const int R = rep - h0 < GH ? (int)(rep - h0) : GH;
    const float *qh = q + h0 * D;
    float *sh = s + h0 * stride, *oh = o + h0 * D;
    /* constant head counts let the compiler keep the sums in registers */
    switch (R) {
      case 1: group_scores(qh, k_cache, sl, kstride, D, len, scale, sh, stride, 1, half); break;
      case 2: group_scores(qh, k_cache, sl, kstride, D, len, scale, sh, stride, 2, half); break;
      default: group_scores(qh, k_cache, sl, kstride, D, len, scale, sh, stride, GH, half); break;
    }
    for (int h = 0; h < R; h++) {
      float *row = sh + h * stride, mx = -INFINITY;
      for (int64_t j = 0; j < len; j++) mx = row[j] > mx ? row[j] : mx;
      const float sum = exp_shifted(row, len, mx);
      if (part) {
        part[(h0 + h) * 2] = mx, part[(h0 + h) * 2 + 1] = sum;
        continue;
      }
      const float inv = 1.f / sum;
      for (int64_t j = 0; j < len; j++) row[j] *= inv;
    }
    switch (R) {
      case 1: group_values(sh, stride, v_cache, sl, kstride, D, len, oh, 1, half); break;
      case 2: group_values(sh, stride, v_cache, sl, kstride, D, len, oh, 2, half); break;
      default: group_values(sh, stride, v_cache, sl, kstride, D, len, oh, GH, half); break;
    }
  }
}
#endif

/* A KV row of D elements as floats: the row itself (float32), or converted into buf (float16; D <= 512) */
static inline const float *kv_row(const char *row, int64_t D, int half, float *buf) {
#if NATIVE_F16
  if (half) {
    for (int64_t e = 0; e < D; e++) buf[e] = _cvtsh_ss(((const uint16_t *)row)[e]);
    return buf;
  }
#else
  (void)D, (void)half, (void)buf;
#endif
  return (const float *)row;
}

/* Keys per task in decode attention: a longer context's (row, KV group) runs as chunks of this many keys, in
   parallel, their softmax pieces combined after (flash-decoding). It depends on the context alone, so a row's
   result does not depend on the batch beside it or the thread count. */
#ifndef DECODE_CHUNK
#define DECODE_CHUNK 1024
#endif
static inline int64_t decode_chunks(int64_t len) { return (len + DECODE_CHUNK - 1) / DECODE_CHUNK; }

/* Attention of m single-token queries over the paged cache: row r's query heads at q + r * q_stride (nh heads of
   D floats), its keys and values at slots[r, :lens[r]] of k_cache / v_cache ([slots, nkv, D]); query head h reads
   KV head h / (nh / nkv). Out: row r's heads at out + r * o_stride. scores: m * nh * max_len floats.
   With AVX2 and D a multiple of 32, one task is a row's KV group over up to DECODE_CHUNK keys: its query heads read
   each key and value once, several keys at a time (~5x the per-head loop below at SmolLM2's shapes); tasks are
   handed out dynamically, since one long context would otherwise hold up the thread that drew it, and a long
   context is several tasks (one sequence at 7K keys had 3 tasks, one per KV group, for 2 threads: 10 GB/s of the
   machine's 29). Returns 0, or -1 where scratch memory is lacking. */
static int decode_attention(const float *q, int64_t q_stride, const void *k_cache, const void *v_cache, int64_t m,
                            int64_t nh, int64_t nkv, int64_t D, const int64_t *slots, const int64_t *lens,
                            int64_t max_len, float *out, int64_t o_stride, float *scores, int half) {
  const int64_t rep = nh / nkv, es = half ? 2 : 4;
  const float scale = 1.f / sqrtf((float)D);
  const char *kc = k_cache, *vc = v_cache;
  if (half && (!NATIVE_F16 || D > 512)) return -1;
#if NATIVE_SIMD
  if (D % 32 == 0) {
    int64_t tasks = 0, parts = 0; /* parts: chunks of rows that have more than one */
    for (int64_t r = 0; r < m; r++) {
      const int64_t chunks = decode_chunks(lens[r]);
      tasks += nkv * chunks, parts += chunks > 1 ? nkv * chunks : 0;
    }
    int64_t *task_row = malloc(sizeof(int64_t) * (size_t)tasks), *row_part = malloc(sizeof(int64_t) * (size_t)m);
    int64_t *row_task = malloc(sizeof(int64_t) * (size_t)m); /* each row's first task */
    /* per chunk task of a split row: its heads' unnormalized outputs [rep][D], then (largest, sum) per head */
    float *part = parts ? malloc(sizeof(float) * (size_t)(parts * rep * (D + 2))) : NULL;
    if (!task_row || !row_part || !row_task || (parts && !part)) {
      free(task_row), free(row_part), free(row_task), free(part);
      return -1;
    }
    for (int64_t r = 0, t = 0, pt = 0; r < m; r++) {
      const int64_t chunks = decode_chunks(lens[r]);
      row_part[r] = chunks > 1 ? pt : -1, row_task[r] = t;
      pt += chunks > 1 ? nkv * chunks : 0;
      for (int64_t i = 0; i < nkv * chunks; i++) task_row[t++] = r;
    }
#pragma omp parallel for schedule(dynamic, 1)
    for (int64_t t = 0; t < tasks; t++) {
      const int64_t r = task_row[t], chunks = decode_chunks(lens[r]);
      /* a row's tasks are consecutive, KV group major */
      const int64_t i = t - row_task[r], kv = i / chunks, c = i % chunks, hd = kv * rep, j0 = c * DECODE_CHUNK;
      const int64_t len = lens[r] - j0 < DECODE_CHUNK ? lens[r] - j0 : DECODE_CHUNK;
      float *row_scores = scores + (r * nh + hd) * max_len + j0;
      if (chunks == 1) {
        group_attention(q + r * q_stride + hd * D, kc + kv * D * es, vc + kv * D * es, slots + r * max_len, len,
                        nkv * D, D, rep, scale, row_scores, max_len, out + r * o_stride + hd * D, NULL, half);
        continue;
      }
      float *pc = part + (row_part[r] + i) * rep * (D + 2);
      group_attention(q + r * q_stride + hd * D, kc + kv * D * es, vc + kv * D * es, slots + r * max_len + j0, len,
                      nkv * D, D, rep, scale, row_scores, max_len, pc, pc + rep * D, half);
    }
    /* the split rows: per head, out = sum_c exp(m_c - M) o_c / sum_c exp(m_c - M) l_c, chunks in order */
#pragma omp parallel for schedule(static)
    for (int64_t rh = 0; rh < m * nh; rh++) {
      const int64_t r = rh / nh, hd = rh % nh, kv = hd / rep, h = hd % rep;
      const int64_t chunks = decode_chunks(lens[r]);
      if (chunks == 1) continue;
      const float *p0 = part + (row_part[r] + kv * chunks) * rep * (D + 2);
      const int64_t step = rep * (D + 2);
      float top = -INFINITY, total = 0.f;
      for (int64_t c = 0; c < chunks; c++) top = fmaxf(top, p0[c * step + rep * D + h * 2]);
      float *o = out + r * o_stride + hd * D;
      memset(o, 0, sizeof(float) * (size_t)D);
      for (int64_t c = 0; c < chunks; c++) {
        const float *pc = p0 + c * step, w = expf(pc[rep * D + h * 2] - top);
        total += w * pc[rep * D + h * 2 + 1];
        axpy(o, w, pc + h * D, D);
      }
      const float inv = 1.f / total;
      for (int64_t e = 0; e < D; e++) o[e] *= inv;
    }
    free(task_row), free(row_part), free(row_task), free(part);
    return 0;
  }
#endif
#pragma omp parallel for schedule(static)
  for (int64_t rh = 0; rh < m * nh; rh++) {
    const int64_t r = rh / nh, hd = rh % nh, kv = hd / rep, len = lens[r];
    const float *qr = q + r * q_stride + hd * D;
    const int64_t *sl = slots + r * max_len;
    float *s = scores + rh * max_len, *o = out + r * o_stride + hd * D, row[512];
    float mx = -INFINITY;
    for (int64_t j = 0; j < len; j++) {
      s[j] = dot(qr, kv_row(kc + (sl[j] * nkv + kv) * D * es, D, half, row), D) * scale;
      if (s[j] > mx) mx = s[j];
    }
    const float inv = 1.f / exp_shifted(s, len, mx);
    memset(o, 0, (size_t)D * sizeof(float));
    for (int64_t j = 0; j < len; j++) axpy(o, s[j] * inv, kv_row(vc + (sl[j] * nkv + kv) * D * es, D, half, row), D);
  }
  return 0;
}

/* decode_attention for the torch layers' decode rows (llama.py); returns -1 for shapes it does not take, -2 where
   memory for its scratch ran out */
int native_attention(const float *q, int64_t q_stride, const void *k_cache, const void *v_cache, int64_t m,
                     int64_t nh, int64_t nkv, int64_t D, const int64_t *slots, const int64_t *lens, int64_t max_len,
                     float *out, int64_t o_stride, float *scores, int half) {
  if (nkv <= 0 || nh % nkv || (half && (!NATIVE_F16 || D > 512))) return -1;
  for (int64_t r = 0; r < m; r++)
    if (lens[r] < 1 || lens[r] > max_len) return -1;
  return decode_attention(q, q_stride, k_cache, v_cache, m, nh, nkv, D, slots, lens, max_len, out, o_stride, scores,
                          half)
             ? -2
             : 0;
}

/* ------------------------------------------------------------------------------------------------------------
   Causal attention of a prefill chunk (FlashAttention's scheme on AVX2, or AVX-512 where WIDE).

   n queries at positions L - n .. L - 1 of a sequence of L keys (query i sees keys 0 .. L - n + i). A query block
   is PQ = rep x rows query vectors (at most 12) of one KV group; they meet each key once, 64 keys at a time:
   scores as 8- or 16-key vectors (keys transposed once per call into 16-key panels, so a score vector is D
   multiply-adds that broadcast query elements), an online softmax per query vector, and the output accumulated 16
   (AVX2) or 32 (AVX-512) dimensions at a time over the 64 keys. A task is up to QBLOCKS query blocks that take the
   keys in chunks of KCHUNK together (see prefill_task). On SmolLM2's heads (64 dimensions, 3 query heads per KV
   head), 2 cores: ~110 GFLOPS on an AVX2 machine at any context (scores and weighted values about 40% of the time
   each, the softmax a fifth), where torch's flash kernel runs ~35-80 GFLOPS at 128-2048 tokens and ~100-120 at
   6K-32K keys; 16-wide on an AVX-512 machine ~240 at 2-7K keys against torch's (also 16-wide there) ~160-220
   (`optimist bench cpu-attention`). */
#if NATIVE_SIMD
#define PQ 12   /* query vectors per block */
/* keys per softmax step: 128 where WIDE (7-9% over 64 at 2-7K keys: half the rescales and row maxima; 256 no
   better), 64 on AVX2; -DPKEYS=... (OPTIMIST_NATIVE_FLAGS) to try others */
#ifndef PKEYS
#define PKEYS (WIDE ? 128 : 64)
#endif

/* dst[j * stride + i] = src[i][e0 + j] for i, j < 8: an 8x8 block transposed in registers */
static const float zeros[512]; /* a padding key's row */

/* Transposed keys are stored in panels of 16 keys: [keys / 16][D][16] floats, so a score step reads one panel
   front to back (a [D][keys] layout strides by the key count, which at 2K, 4K or 6K keys maps every dimension's
   line to one L1 set). PANEL(p, e, D): where key p's dimension e lies. */
#define PANEL(p, e, D) (((p) / 16 * (D) + (e)) * 16 + (p) % 16)

static inline void transpose8(const float *const src[8], int64_t e0, float *dst, int64_t stride) {
  __m256 r[8], t[8];
  for (int i = 0; i < 8; i++) r[i] = _mm256_loadu_ps(src[i] + e0);
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    r[i] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  /* r[0..3] hold rows 0-3 and r[4..7] rows 4-7 of columns (0,4), (1,5), (2,6), (3,7) in their two halves */
  const int col[4] = {0, 1, 2, 3};
  for (int c = 0; c < 4; c++) {
    _mm256_storeu_ps(dst + col[c] * stride, _mm256_permute2f128_ps(r[c], r[c + 4], 0x20));
    _mm256_storeu_ps(dst + (col[c] + 4) * stride, _mm256_permute2f128_ps(r[c], r[c + 4], 0x31));
  }
}

/* The largest of m and x[0 .. width) (width a multiple of 16) */
static inline float block_max(const float *x, int64_t width, float m) {
#if WIDE
  __m512 top = _mm512_set1_ps(m);
  for (int64_t j = 0; j < width; j += 16) top = _mm512_max_ps(top, _mm512_loadu_ps(x + j));
  return _mm512_reduce_max_ps(top);
#else
  __m256 top = _mm256_set1_ps(m);
  for (int64_t j = 0; j < width; j += 8) top = _mm256_max_ps(top, _mm256_loadu_ps(x + j));
  return hmax(top);
#endif
}

/* x[j] = exp(x[j] - mx) over x[0 .. width) (width a multiple of 16), 0 where x[j] is -inf; returns their sum */
static inline float block_exp(float *x, int64_t width, float mx) {
#if WIDE
  const __m512 vm = _mm512_set1_ps(mx), ninf = _mm512_set1_ps(-INFINITY);
  __m512 sum = _mm512_setzero_ps();
  for (int64_t j = 0; j < width; j += 16) {
    const __m512 v = _mm512_loadu_ps(x + j);
    const __m512 e = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(v, ninf, _CMP_NEQ_UQ), exp512(_mm512_sub_ps(v, vm)));
    _mm512_storeu_ps(x + j, e);
    sum = _mm512_add_ps(sum, e);
  }
  return _mm512_reduce_add_ps(sum);
#else
  const __m256 vm = _mm256_set1_ps(mx), ninf = _mm256_set1_ps(-INFINITY);
  __m256 sum = _mm256_setzero_ps();
  for (int64_t j = 0; j < width; j += 8) {
    const __m256 v = _mm256_loadu_ps(x + j);
    const __m256 e = _mm256_andnot_ps(_mm256_cmp_ps(v, ninf, _CMP_EQ_OQ), exp_ps(_mm256_sub_ps(v, vm)));
    _mm256_storeu_ps(x + j, e);
    sum = _mm256_add_ps(sum, e);
  }
  return hsum(sum);
#endif
}

/* row[0 .. seen) (32-byte aligned) -> exp(row - its max) in place; returns 1 / their sum, the softmax's scale */
static inline float softmax_scale(float *row, int64_t seen) {
  const int64_t whole = seen / 16 * 16;
  float mx = block_max(row, whole, -INFINITY);
  for (int64_t j = whole; j < seen; j++) mx = row[j] > mx ? row[j] : mx;
  return 1.f / exp_shifted(row, seen, mx);
}

/* sc[i * stride + 16 p + t] = qb_i . key t of panel p for the PQ query vectors at qb ([PQ][D]) and the np
   consecutive 16-key panels from kp (see PANEL). sc and stride are 32-byte aligned.
   AVX-512: a panel is one vector; two panels for all PQ query vectors at a time (24 sums), 14 loads per 24
   multiply-adds. AVX2: the panel's two key vectors for half the query vectors at a time, 8 loads per 12. */
static inline __attribute__((always_inline)) void panels_scores(const float *qb, const float *kp, int64_t D,
                                                                  int64_t np, float *sc, int64_t stride) {
#if WIDE
  int64_t p = 0;
  for (; p + 2 <= np; p += 2) {
    const float *k0 = kp + p * 16 * D;
    __m512 acc[PQ][2];
    for (int i = 0; i < PQ; i++) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
    for (int64_t e = 0; e < D; e++) {
      const __m512 a = _mm512_loadu_ps(k0 + e * 16), b = _mm512_loadu_ps(k0 + (D + e) * 16);
      for (int i = 0; i < PQ; i++) {
        const __m512 qv = _mm512_set1_ps(qb[i * D + e]);
        acc[i][0] = _mm512_fmadd_ps(qv, a, acc[i][0]);
        acc[i][1] = _mm512_fmadd_ps(qv, b, acc[i][1]);
      }
    }
    for (int i = 0; i < PQ; i++) {
      _mm512_storeu_ps(sc + i * stride + p * 16, acc[i][0]);
      _mm512_storeu_ps(sc + i * stride + p * 16 + 16, acc[i][1]);
    }
  }
  if (p < np) {
    const float *k0 = kp + p * 16 * D;
    __m512 acc[PQ];
    for (int i = 0; i < PQ; i++) acc[i] = _mm512_setzero_ps();
    for (int64_t e = 0; e < D; e++) {
      const __m512 a = _mm512_loadu_ps(k0 + e * 16);
      for (int i = 0; i < PQ; i++) acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(qb[i * D + e]), a, acc[i]);
    }
    for (int i = 0; i < PQ; i++) _mm512_storeu_ps(sc + i * stride + p * 16, acc[i]);
  }
#else
  for (int64_t p = 0; p < np; p++) {
    const float *k0 = kp + p * 16 * D;
    for (int i0 = 0; i0 < PQ; i0 += PQ / 2) {
      __m256 acc[PQ / 2][2];
      for (int i = 0; i < PQ / 2; i++) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
      for (int64_t e = 0; e < D; e++) {
        const __m256 a = _mm256_load_ps(k0 + e * 16), b = _mm256_load_ps(k0 + e * 16 + 8);
        for (int i = 0; i < PQ / 2; i++) {
          const __m256 qv = _mm256_broadcast_ss(qb + (i0 + i) * D + e);
          acc[i][0] = _mm256_fmadd_ps(qv, a, acc[i][0]);
          acc[i][1] = _mm256_fmadd_ps(qv, b, acc[i][1]);
        }
      }
      for (int i = 0; i < PQ / 2; i++) {
        _mm256_store_ps(sc + (i0 + i) * stride + p * 16, acc[i][0]);
        _mm256_store_ps(sc + (i0 + i) * stride + p * 16 + 8, acc[i][1]);
      }
    }
  }
#endif
}

/* The L keys of one KV head (key j at k + j * k_stride, D floats) into 16-key panels at kt, zeros past L. Called
   inside a parallel region: the threads share the work (an omp for, with its barrier). */
static void transpose_keys(const float *k, int64_t k_stride, int64_t L, int64_t D, float *kt) {
  const int64_t lpad = (L + 15) / 16 * 16;
#pragma omp for schedule(static)
  for (int64_t j0 = 0; j0 < lpad; j0 += 8) {
    const float *src[8];
    for (int i = 0; i < 8; i++) src[i] = j0 + i < L ? k + (j0 + i) * k_stride : zeros;
    for (int64_t e0 = 0; e0 < D; e0 += 8) transpose8(src, e0, kt + PANEL(j0, e0, D), 16);
  }
}

/* The running softmax of one query block: PQ query vectors (rows x rep heads of KV group g, rows at positions
   L - n + row), the keys so far folded in. Key p: ktg holds the keys transposed (16-key panels, see PANEL),
   vg + p * v_stride its value (D floats). With keys == NULL, key p is position p and the rows see keys 0 .. their
   own; else key p is position keys[p] (ascending, nkeys of them) and a row sees those at or before it. */
typedef struct {
  float *qb, *o; /* [PQ][D]: scaled queries, unnormalized outputs (32-byte aligned) */
  float m[PQ], l[PQ];
  int64_t pos[PQ];
  int nq;
  int64_t end; /* keys 0 .. end - 1 are visible to some of its rows */
} qblock;

static void qblock_init(qblock *s, const float *q, int64_t q_stride, const int64_t *keys, int64_t nkeys, int64_t n,
                        int64_t L, int64_t rep, int64_t D, float scale, int64_t g, int64_t row0, int64_t rows) {
  s->nq = (int)(rows * rep);
  for (int i = 0; i < PQ; i++) {
    const int64_t r = i / rep, h = g * rep + i % rep;
    s->pos[i] = i < s->nq ? L - n + row0 + r : -1;
    for (int64_t e = 0; e < D; e++) s->qb[i * D + e] = i < s->nq ? q[(row0 + r) * q_stride + h * D + e] * scale : 0.f;
    s->m[i] = -INFINITY;
    s->l[i] = 0.f;
  }
  memset(s->o, 0, sizeof(float) * (size_t)(PQ * D));
  const int64_t last = L - n + row0 + rows - 1;
  s->end = last + 1;
  if (keys) /* the list's keys at or before the last row */
    for (s->end = nkeys; s->end > 0 && keys[s->end - 1] > last; s->end--) {
    }
}

#if WIDE
/* block_values' step on AVX-512: dimensions e .. e + 16 C of the PQ outputs, C vectors each */
static inline __attribute__((always_inline)) void values_wide(const float *sc, const float *vg, int64_t v_stride,
                                                                int64_t D, int64_t jn, float *o, int64_t e, int C) {
  __m512 acc[PQ][2];
  for (int i = 0; i < PQ; i++)
    for (int c = 0; c < C; c++) acc[i][c] = _mm512_loadu_ps(o + i * D + e + 16 * c);
  for (int64_t j = 0; j < jn; j++) {
    const float *vr = vg + j * v_stride + e;
    __m512 vv[2];
    for (int c = 0; c < C; c++) vv[c] = _mm512_loadu_ps(vr + 16 * c);
    for (int i = 0; i < PQ; i++) {
      const __m512 p = _mm512_set1_ps(sc[i * PKEYS + j]);
      for (int c = 0; c < C; c++) acc[i][c] = _mm512_fmadd_ps(p, vv[c], acc[i][c]);
    }
  }
  for (int i = 0; i < PQ; i++)
    for (int c = 0; c < C; c++) _mm512_storeu_ps(o + i * D + e + 16 * c, acc[i][c]);
}
#endif

/* o[i] += sum_j sc[i * PKEYS + j] * value j for the PQ query vectors (o [PQ][D], 32-byte aligned) and the jn
   values from vg (v_stride apart) */
static inline void block_values(const float *sc, const float *vg, int64_t v_stride, int64_t D, int64_t jn, float *o) {
#if WIDE
  if (D % 16 == 0) { /* 32 dimensions for all PQ query vectors at a time (24 sums), then 16 if D leaves them */
    int64_t e = 0;
    for (; e + 32 <= D; e += 32) values_wide(sc, vg, v_stride, D, jn, o, e, 2);
    if (e < D) values_wide(sc, vg, v_stride, D, jn, o, e, 1);
    return;
  }
#endif
  /* 16 dimensions for half the query vectors at a time (D a multiple of 16; else 8 for all of them) */
  if (D % 16 == 0) {
    for (int64_t e = 0; e < D; e += 16)
      for (int i0 = 0; i0 < PQ; i0 += PQ / 2) {
        __m256 acc[PQ / 2][2];
        for (int i = 0; i < PQ / 2; i++) {
          acc[i][0] = _mm256_load_ps(o + (i0 + i) * D + e);
          acc[i][1] = _mm256_load_ps(o + (i0 + i) * D + e + 8);
        }
        for (int64_t j = 0; j < jn; j++) {
          const float *vr = vg + j * v_stride + e;
          const __m256 v0 = _mm256_loadu_ps(vr), v1 = _mm256_loadu_ps(vr + 8);
          for (int i = 0; i < PQ / 2; i++) {
            const __m256 p = _mm256_broadcast_ss(sc + (i0 + i) * PKEYS + j);
            acc[i][0] = _mm256_fmadd_ps(p, v0, acc[i][0]);
            acc[i][1] = _mm256_fmadd_ps(p, v1, acc[i][1]);
          }
        }
        for (int i = 0; i < PQ / 2; i++) {
          _mm256_store_ps(o + (i0 + i) * D + e, acc[i][0]);
          _mm256_store_ps(o + (i0 + i) * D + e + 8, acc[i][1]);
        }
      }
  } else {
    for (int64_t e = 0; e < D; e += 8) {
      __m256 acc[PQ];
      for (int i = 0; i < PQ; i++) acc[i] = _mm256_load_ps(o + i * D + e);
      for (int64_t j = 0; j < jn; j++) {
        const __m256 vv = _mm256_loadu_ps(vg + j * v_stride + e);
        for (int i = 0; i < PQ; i++) acc[i] = _mm256_fmadd_ps(_mm256_broadcast_ss(sc + i * PKEYS + j), vv, acc[i]);
      }
      for (int i = 0; i < PQ; i++) _mm256_store_ps(o + i * D + e, acc[i]);
    }
  }
}

/* Folds keys j0 .. j1 - 1 (j0 a multiple of PKEYS; those past s->end skipped) into the block's softmax */
static void qblock_keys(qblock *s, const float *ktg, const float *vg, int64_t v_stride,
                        const int64_t *keys, int64_t D, int64_t j0, int64_t j1) {
  float sc[PQ * PKEYS] __attribute__((aligned(64)));
  float *o = s->o;
  if (j1 > s->end) j1 = s->end;
  for (; j0 < j1; j0 += PKEYS) {
    const int64_t jn = j1 - j0 < PKEYS ? j1 - j0 : PKEYS, np = (jn + 15) / 16, width = 16 * np;
    panels_scores(s->qb, ktg + j0 * D, D, np, sc, PKEYS);
    for (int i = 0; i < s->nq; i++) {
      float *sv = sc + i * PKEYS;
      const int64_t pos = s->pos[i];
      /* keys past the row (causal) or past the chunk (padding) get no weight */
      if (!keys)
        for (int64_t j = pos + 1 - j0 > 0 ? pos + 1 - j0 : 0; j < width; j++) sv[j] = -INFINITY;
      else
        for (int64_t j = width; j > 0 && (j > jn || keys[j0 + j - 1] > pos); j--) sv[j - 1] = -INFINITY;
      const float mx = block_max(sv, width, s->m[i]);
      const float alpha = expf(s->m[i] - mx); /* key 0 is visible to every row: mx is finite from the first step */
      s->l[i] = s->l[i] * alpha + block_exp(sv, width, mx);
      s->m[i] = mx;
      if (alpha != 1.f)
        for (int64_t e = 0; e < D; e++) o[i * D + e] *= alpha;
    }
    block_values(sc, vg + j0 * v_stride, v_stride, D, jn, o);
  }
}

#define QBLOCKS 8     /* query blocks per task */
#define KCHUNK 256    /* keys per pass over a task's query blocks */
_Static_assert(KCHUNK % PKEYS == 0, "a pass over the keys is whole softmax steps");
#define TASK_FLOATS(D) (2 * PQ * (D) * QBLOCKS) /* a task's queries and outputs */

/* per-thread task memory for `threads` threads (NULL if it cannot be had: the callers then decline the call) */
static float *task_memory(int64_t D, int threads) {
  return aligned_alloc(32, sizeof(float) * (size_t)(TASK_FLOATS(D) * threads));
}

/* Rows row0 .. row0 + nrows - 1 (nrows <= QBLOCKS * PQ / rep) in query blocks of PQ / rep rows, keys as qblock's.
   The keys go by in chunks of KCHUNK, each chunk folded into every block before the next: the chunk's transposed
   keys and values (64 KB each at D = 64) stay in this core's L2 for all the blocks, where one block at a time
   would stream every key from L3 or memory once per PQ query vectors (at 7K keys: 3.6 MB a pass). Each block sees
   its keys in the same order and steps either way, so the results do not depend on the chunking. mem: this
   thread's TASK_FLOATS(D) floats, 32-byte aligned. */
static void prefill_task(const float *q, int64_t q_stride, const float *ktg, const float *vg, int64_t v_stride,
                         const int64_t *keys, int64_t nkeys, int64_t n, int64_t L, int64_t rep, int64_t D, float scale,
                         int64_t g, int64_t row0, int64_t nrows, float *out, int64_t o_stride, float *mem) {
  const int64_t rows = PQ / rep, nb = (nrows + rows - 1) / rows;
  qblock blk[QBLOCKS];
  int64_t end = 0;
  for (int64_t b = 0; b < nb; b++) {
    blk[b].qb = mem + 2 * PQ * D * b;
    blk[b].o = blk[b].qb + PQ * D;
    const int64_t r0 = row0 + b * rows;
    const int64_t left = row0 + nrows - r0;
    qblock_init(&blk[b], q, q_stride, keys, nkeys, n, L, rep, D, scale, g, r0, left < rows ? left : rows);
    end = blk[b].end > end ? blk[b].end : end;
  }
  for (int64_t c0 = 0; c0 < end; c0 += KCHUNK)
    for (int64_t b = 0; b < nb; b++) qblock_keys(&blk[b], ktg, vg, v_stride, keys, D, c0, c0 + KCHUNK);
  for (int64_t b = 0; b < nb; b++) {
    const qblock *s = &blk[b];
    for (int i = 0; i < s->nq; i++) {
      const int64_t r = row0 + b * rows + i / rep, h = g * rep + i % rep;
      const float inv = 1.f / s->l[i];
      for (int64_t e = 0; e < D; e++) out[r * o_stride + h * D + e] = s->o[i * D + e] * inv;
    }
  }
}
#endif

/* q: n rows of nh heads x D floats (row stride q_stride); k, v: L rows of nkv heads x D floats (row strides
   k_stride, v_stride); out like q (row stride o_stride); kt: scratch of nkv * D * round_up(L, 16) floats,
   32-byte aligned.
   Returns 0, or -1 for shapes it does not take (without AVX2; D not a multiple of 8 or above 512; more than 12
   query heads per KV head; n > L). */
int native_prefill_attention(const float *q, int64_t q_stride, const float *k, int64_t k_stride, const float *v,
                             int64_t v_stride, int64_t n, int64_t L, int64_t nh, int64_t nkv, int64_t D, float *out,
                             int64_t o_stride, float *kt) {
#if NATIVE_SIMD
  if (nkv <= 0 || nh % nkv || D % 8 || D > 512 || nh / nkv > PQ || n < 1 || n > L) return -1;
  if ((uintptr_t)kt % 32) return -1; /* panels are read with aligned loads */
  const int64_t rep = nh / nkv, rows = PQ / rep, lpad = (L + 15) / 16 * 16, blocks = (n + rows - 1) / rows;
  const float scale = 1.f / sqrtf((float)D);
  /* query blocks per task: up to QBLOCKS, while every thread still gets about four tasks */
  int64_t per = nkv * blocks / (4 * omp_get_max_threads());
  per = per < 1 ? 1 : per > QBLOCKS ? QBLOCKS : per;
  const int64_t span = per * rows, tasks = (n + span - 1) / span;
  const int threads = omp_get_max_threads();
  float *mem = task_memory(D, threads);
  if (!mem) return -1;
#pragma omp parallel num_threads(threads)
  {
    for (int64_t g = 0; g < nkv; g++) transpose_keys(k + g * D, k_stride, L, D, kt + g * D * lpad);
    /* the last rows see the most keys: hand them out first */
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < nkv * tasks; t++) {
      const int64_t b = tasks - 1 - t / nkv, g = t % nkv, row0 = b * span;
      prefill_task(q, q_stride, kt + g * D * lpad, v + g * D, v_stride, NULL, 0, n, L, rep, D, scale, g, row0,
                   n - row0 < span ? n - row0 : span, out, o_stride, mem + TASK_FLOATS(D) * omp_get_thread_num());
    }
  }
  free(mem);
  return 0;
#else
  (void)q, (void)q_stride, (void)k, (void)k_stride, (void)v, (void)v_stride, (void)n, (void)L, (void)nh, (void)nkv;
  (void)D, (void)out, (void)o_stride, (void)kt;
  return -1;
#endif
}

/* Sparse prefill attention of one KV group g (the CPU path of attention/sparse/prefill.py): query rows in tiles of
   `tile` (tile t: rows t * tile .. of the chunk, at positions L - n + row), tile t visiting the keys
   keys[start[t] .. start[t] + count[t]) (positions, ascending, each before the tile's end), causally masked.
   q, k, v, out as native_prefill_attention; scratch: scratch_per_thread >= 2 * D * round_up(max count, 16) floats
   for each of `threads` threads (32-byte aligned). Returns 0, or -1 for shapes it does not take (as
   native_prefill_attention). */
int native_sparse_attention(const float *q, int64_t q_stride, const float *k, int64_t k_stride, const float *v,
                            int64_t v_stride, int64_t n, int64_t L, int64_t nh, int64_t nkv, int64_t D, float *out,
                            int64_t o_stride, int64_t g, int64_t tile, const int64_t *start, const int64_t *count,
                            const int64_t *keys, float *scratch, int64_t scratch_per_thread, int threads) {
#if NATIVE_SIMD
  if (nkv <= 0 || nh % nkv || D % 8 || D > 512 || nh / nkv > PQ || n < 1 || n > L || g < 0 || g >= nkv || tile < 1 ||
      threads < 1)
    return -1;
  const int64_t rep = nh / nkv, rows = PQ / rep, tiles = (n + tile - 1) / tile;
  const float scale = 1.f / sqrtf((float)D);
  if ((uintptr_t)scratch % 32 || scratch_per_thread % 8) return -1; /* panels are read with aligned loads */
  for (int64_t t = 0; t < tiles; t++)
    if (2 * D * ((count[t] + 15) / 16 * 16) > scratch_per_thread) return -1;
  float *mem = task_memory(D, threads);
  if (!mem) return -1;
#pragma omp parallel num_threads(threads)
  {
    float *kt = scratch + (int64_t)omp_get_thread_num() * scratch_per_thread;
    float *task = mem + TASK_FLOATS(D) * omp_get_thread_num();
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < tiles; t++) {
      const int64_t *tk = keys + start[t], nk = count[t], lpad = (nk + 15) / 16 * 16;
      /* the tile's keys transposed (panels of k[tk[p]][g], zeros past nk) and its values gathered in order:
         read many times over, they stream from this thread's cache instead of scattered rows of the chunk's */
      float *vt = kt + D * lpad;
      for (int64_t p0 = 0; p0 < lpad; p0 += 8) {
        const float *src[8];
        for (int i = 0; i < 8; i++) src[i] = p0 + i < nk ? k + tk[p0 + i] * k_stride + g * D : zeros;
        for (int64_t e0 = 0; e0 < D; e0 += 8) transpose8(src, e0, kt + PANEL(p0, e0, D), 16);
      }
      for (int64_t p = 0; p < nk; p++) memcpy(vt + p * D, v + tk[p] * v_stride + g * D, sizeof(float) * (size_t)D);
      const int64_t r1 = (t + 1) * tile < n ? (t + 1) * tile : n;
      for (int64_t row0 = t * tile; row0 < r1; row0 += QBLOCKS * rows)
        prefill_task(q, q_stride, kt, vt, D, tk, nk, n, L, rep, D, scale, g, row0,
                     r1 - row0 < QBLOCKS * rows ? r1 - row0 : QBLOCKS * rows, out, o_stride, task);
    }
  }
  free(mem);
  return 0;
#else
  (void)q, (void)q_stride, (void)k, (void)k_stride, (void)v, (void)v_stride, (void)n, (void)L, (void)nh, (void)nkv;
  (void)D, (void)out, (void)o_stride, (void)g, (void)tile, (void)start, (void)count, (void)keys, (void)scratch;
  (void)scratch_per_thread, (void)threads;
  return -1;
#endif
}

/* The keys each tile of a sparse prefill chunk visits (attention/sparse/prefill.py: key_matrix, visited_pairs and
   the key lists native_sparse_attention takes, in one pass). The chunk's rows sit at positions q_start .. q_start + n
   - 1 of L keys; tile t has rows [a, b) = [q_start + t * tile, min(q_start + (t + 1) * tile, q_start + n)) and
   visits key j < b when j is a kept column (columns[j]), lies on a kept diagonal's range for its rows (offsets[o]
   for some o in [a - j, b - 1 - j], by prefix sums), is a query-aware choice of the tile (tiles[t * L + j]; NULL:
   none) or lies in a key block kept for one of its query blocks (blocks[(r - q_start / bs) * kb + j / bs] for a
   row r of the tile, kb key blocks of bs keys a row; NULL: none). Writes the kept keys tile by tile, ascending,
   into keys (room for tiles * L), their count and first place per tile, and returns the (row, key) pairs with key
   <= row the tiles visit; -1 for arguments it does not take. */
int64_t native_tile_keys(const uint8_t *columns, const uint8_t *offsets, const uint8_t *tiles, const uint8_t *blocks,
                         int64_t query_blocks, int64_t kb, int64_t bs, int64_t L, int64_t q_start, int64_t n,
                         int64_t tile, int64_t *keys, int64_t *count, int64_t *first) {
  if (n < 1 || q_start < 0 || q_start + n != L || tile < 1 || (blocks && (bs < 1 || kb * bs < L || query_blocks < 1)))
    return -1;
  /* runs of consecutive kept offsets [run_lo, run_hi]: for rows [a, b) each covers the keys [a - hi, b - 1 - lo] */
  int64_t *run_lo = malloc(sizeof(int64_t) * (size_t)L), *run_hi = malloc(sizeof(int64_t) * (size_t)L), runs = 0;
  uint8_t *mark = malloc((size_t)L);
  if (!run_lo || !run_hi || !mark) {
    free(run_lo), free(run_hi), free(mark);
    return -1;
  }
  for (int64_t o = 0; o < L; o++)
    if (offsets[o] && (o == 0 || !offsets[o - 1])) {
      int64_t e = o;
      while (e + 1 < L && offsets[e + 1]) e++;
      run_lo[runs] = o, run_hi[runs++] = e;
    }
  const int64_t num_tiles = (n + tile - 1) / tile, qb0 = blocks ? q_start / bs : 0;
  int64_t pairs = 0, out = 0;
  for (int64_t t = 0; t < num_tiles; t++) {
    const int64_t a = q_start + t * tile, b = a + tile < L ? a + tile : L;
    memcpy(mark, columns, (size_t)b);
    if (tiles)
      for (int64_t j = 0; j < b; j++) mark[j] |= tiles[t * L + j];
    for (int64_t r = 0; r < runs; r++) {
      const int64_t lo = a - run_hi[r] > 0 ? a - run_hi[r] : 0, hi = b - 1 - run_lo[r];
      if (hi >= lo) memset(mark + lo, 1, (size_t)(hi - lo + 1));
    }
    if (blocks) { /* the kept key blocks of the tile's query blocks (rows past the last one use the last) */
      int64_t r1 = a / bs - qb0, r2 = (b - 1) / bs - qb0;
      r1 = r1 < 0 ? 0 : r1 >= query_blocks ? query_blocks - 1 : r1;
      r2 = r2 < 0 ? 0 : r2 >= query_blocks ? query_blocks - 1 : r2;
      for (int64_t r = r1; r <= r2; r++)
        for (int64_t c = 0; c * bs < b; c++)
          if (blocks[r * kb + c]) memset(mark + c * bs, 1, (size_t)((c + 1) * bs < b ? bs : b - c * bs));
    }
    first[t] = out;
    int64_t before = out; /* keys left of the tile: each seen by all b - a rows */
    for (int64_t j = 0; j < a; j++) keys[out] = j, out += mark[j];
    pairs += (out - before) * (b - a);
    for (int64_t j = a; j < b; j++) { /* a key inside the tile is seen by the rows at or after it */
      keys[out] = j, out += mark[j];
      pairs += mark[j] * (b - j);
    }
    count[t] = out - first[t];
  }
  free(run_lo), free(run_hi), free(mark);
  return pairs;
}

/* Pattern estimation's scores (attention/sparse/estimate.py: vertical_slash_scores): the causal softmax of H query
   heads' vectors at the last m of L positions over the L keys of their KV head, summed per key (vertical[h * L + j])
   and per diagonal offset o = position - key (slash[h * L + o]; slash NULL: not wanted). Query i of head h (at
   position L - m + i) is at q + h * q_head_stride + i * q_row_stride, key j at k + j * k_stride (D floats each);
   kt: scratch of D * round_up(L, 16) floats, 32-byte aligned. A task is up to PQ query vectors of one head: their
   scores against every key panel (panels_scores), then per vector the softmax and two sums into its thread's
   accumulators, the slash ones kept per diagonal d = key - i + m - 1 so that a vector's probabilities add
   contiguously (offset o is d = L - 1 - o). Tasks go to threads statically, so the sums' order is fixed. Returns
   0, or -1 for what it does not take (no AVX2, D not a multiple of 8 or above 512, m outside 1 .. L, no memory). */
int native_estimate_scores(const float *q, int64_t q_head_stride, int64_t q_row_stride, const float *k,
                           int64_t k_stride, int64_t H, int64_t m, int64_t L, int64_t D, float *vertical, float *slash,
                           float *kt) {
#if NATIVE_SIMD
  if (H < 1 || D % 8 || D > 512 || m < 1 || m > L || (uintptr_t)kt % 32) return -1;
  const int64_t lpad = (L + 15) / 16 * 16, blocks = (m + PQ - 1) / PQ, sums = slash ? 2 : 1;
  const int threads = omp_get_max_threads();
  /* per thread: the block's queries [PQ][D], its scores [PQ][lpad], then the vertical and diagonal sums [H][lpad] */
  const int64_t per = PQ * D + PQ * lpad + sums * H * lpad;
  float *mem = aligned_alloc(32, sizeof(float) * (size_t)(per * threads));
  if (!mem) return -1;
  const float scale = 1.f / sqrtf((float)D);
#pragma omp parallel num_threads(threads)
  {
    transpose_keys(k, k_stride, L, D, kt);
    float *qb = mem + per * omp_get_thread_num(), *sc = qb + PQ * D, *acc = sc + PQ * lpad;
    memset(acc, 0, sizeof(float) * (size_t)(sums * H * lpad));
#pragma omp for schedule(static)
    for (int64_t t = 0; t < H * blocks; t++) {
      const int64_t h = t / blocks, r0 = t % blocks * PQ, nq = m - r0 < PQ ? m - r0 : PQ;
      memset(qb, 0, sizeof(float) * (size_t)(PQ * D));
      for (int64_t i = 0; i < nq; i++)
        for (int64_t e = 0; e < D; e++) qb[i * D + e] = q[h * q_head_stride + (r0 + i) * q_row_stride + e] * scale;
      panels_scores(qb, kt, D, lpad / 16, sc, lpad);
      for (int64_t i = 0; i < nq; i++) {
        const int64_t r = r0 + i, seen = L - m + r + 1; /* keys 0 .. its position */
        float *row = sc + i * lpad;
        const float inv = softmax_scale(row, seen);
        axpy(acc + h * lpad, inv, row, seen);
        if (slash) axpy(acc + (H + h) * lpad + m - 1 - r, inv, row, seen);
      }
    }
  }
  for (int64_t h = 0; h < H; h++)
    for (int64_t j = 0; j < L; j++) {
      float v = 0.f, d = 0.f;
      for (int th = 0; th < threads; th++) {
        const float *acc = mem + per * th + PQ * D + PQ * lpad;
        v += acc[h * lpad + j];
        if (slash) d += acc[(H + h) * lpad + L - 1 - j];
      }
      vertical[h * L + j] = v;
      if (slash) slash[h * L + j] = d;
    }
  free(mem);
  return 0;
#else
  (void)q, (void)q_head_stride, (void)q_row_stride, (void)k, (void)k_stride, (void)H, (void)m, (void)L, (void)D;
  (void)vertical, (void)slash, (void)kt;
  return -1;
#endif
}

/* Query-aware estimation for a prefill chunk: per tile of `tile` query rows (chunk rows t * tile ..; positions
   q_start + row, keys 0 .. position), the causal softmax of its last r rows for each of H query heads of one KV group,
   summed over those rows and heads into out[t][0 .. L) (zeros right of the tile's end). q: row i of head h at
   q + h * q_head_stride + i * q_row_stride (n rows); k: L = q_start + n keys. kt: scratch as native_estimate_scores.
   A task is one tile (its own row of out); tasks go to threads dynamically (rows of different tiles see different
   key counts), the sums within a tile in a fixed order. With `thresholds`, also per tile the largest threshold
   (to 1/16 of its value: a histogram of the scores' float bits, sign, exponent and 4 mantissa bits) such that the
   scores at or above it hold at least `share` of the tile's total (a superset of the fewest largest that do).
   Returns 0, or -1 for what it does not take. */
#define SHARE_BITS 19 /* float bits below the histogram's resolution */
int native_tile_scores(const float *q, int64_t q_head_stride, int64_t q_row_stride, const float *k, int64_t k_stride,
                       int64_t H, int64_t n, int64_t q_start, int64_t D, int64_t tile, int64_t r, float *out,
                       float *kt, float share, float *thresholds) {
#if NATIVE_SIMD
  const int64_t L = q_start + n;
  if (H < 1 || D % 8 || D > 512 || n < 1 || q_start < 0 || tile < 1 || r < 1 || (uintptr_t)kt % 32) return -1;
  const int64_t lpad = (L + 15) / 16 * 16, tiles = (n + tile - 1) / tile;
  const int threads = omp_get_max_threads();
  const int64_t buckets = (int64_t)1 << (31 - SHARE_BITS);
  /* per thread: a block's queries [PQ][D], its scores [PQ][lpad], the histogram [buckets] */
  const int64_t per = PQ * D + PQ * lpad + buckets;
  float *mem = aligned_alloc(32, sizeof(float) * (size_t)(per * threads));
  if (!mem) return -1;
  const float scale = 1.f / sqrtf((float)D);
#pragma omp parallel num_threads(threads)
  {
    transpose_keys(k, k_stride, L, D, kt);
    float *qb = mem + per * omp_get_thread_num(), *sc = qb + PQ * D;
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < tiles; t++) {
      const int64_t end = (t + 1) * tile < n ? (t + 1) * tile : n;
      const int64_t first = end - r > t * tile ? end - r : t * tile, rows = end - first, vecs = H * rows;
      const int64_t ppad = (q_start + end + 15) / 16 * 16; /* the panels any of the tile's rows sees */
      float *o = out + t * L;
      memset(o, 0, sizeof(float) * (size_t)L);
      for (int64_t v0 = 0; v0 < vecs; v0 += PQ) {
        const int64_t nq = vecs - v0 < PQ ? vecs - v0 : PQ;
        memset(qb, 0, sizeof(float) * (size_t)(PQ * D));
        for (int64_t i = 0; i < nq; i++) {
          const int64_t h = (v0 + i) / rows, row = first + (v0 + i) % rows;
          for (int64_t e = 0; e < D; e++) qb[i * D + e] = q[h * q_head_stride + row * q_row_stride + e] * scale;
        }
        panels_scores(qb, kt, D, ppad / 16, sc, lpad);
        for (int64_t i = 0; i < nq; i++) {
          const int64_t seen = q_start + first + (v0 + i) % rows + 1;
          float *row = sc + i * lpad;
          axpy(o, softmax_scale(row, seen), row, seen);
        }
      }
      if (thresholds && share >= 1.f) { /* every key with any weight: a float sum stops growing before the
                                              smallest are added, so the histogram walk would drop them */
        thresholds[t] = 0.f;
      } else if (thresholds) {
        float *hist = sc + PQ * lpad, total = 0.f;
        memset(hist, 0, sizeof(float) * (size_t)buckets);
        for (int64_t j = 0; j < q_start + end; j++) {
          uint32_t bits;
          memcpy(&bits, o + j, 4);
          hist[bits >> SHARE_BITS] += o[j];
          total += o[j];
        }
        float got = 0.f;
        int64_t b = buckets - 1;
        for (; b > 0; b--) {
          got += hist[b];
          if (got >= share * total) break;
        }
        const uint32_t low = (uint32_t)b << SHARE_BITS;
        memcpy(thresholds + t, &low, 4);
      }
    }
  }
  free(mem);
  return 0;
#else
  (void)q, (void)q_head_stride, (void)q_row_stride, (void)k, (void)k_stride, (void)H, (void)n, (void)q_start, (void)D;
  (void)tile, (void)r, (void)out, (void)kt, (void)share, (void)thresholds;
  return -1;
#endif
}

/* LoRA adapters (lora.py): one adapter's update of one linear layer, y += bt^T (a x): a [r, k] (the input's side),
   bt [r, n] (B transposed, the scale folded in), float32, or float16 where lora_t.half (half the bytes to read: a
   decode step is bound by memory traffic); r = 0 where the adapter leaves the layer alone. */
typedef struct {
  const void *a, *bt;
  int64_t r;
} lora_pair;

#if NATIVE_F16
static inline float dot_h(const uint16_t *a, const float *b, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    acc = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(a + i))), _mm256_loadu_ps(b + i), acc);
  float s = hsum(acc);
  for (; i < n; i++) s += _cvtsh_ss(a[i]) * b[i];
  return s;
}

/* t[j] = row j of a (r rows of k float16) . x, four rows at a time: one load of x feeds four independent chains
   (dot_h's single chain waits on each FMA's latency); each t[j] sums as dot_h would. */
static void lora_shrink_h(const uint16_t *a, const float *x, int64_t k, int64_t r, float *t) {
  int64_t j = 0;
  for (; j + 4 <= r; j += 4) {
    const uint16_t *a0 = a + j * k, *a1 = a0 + k, *a2 = a1 + k, *a3 = a2 + k;
    __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
    int64_t i = 0;
    for (; i + 8 <= k; i += 8) {
      const __m256 xv = _mm256_loadu_ps(x + i);
      s0 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(a0 + i))), xv, s0);
      s1 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(a1 + i))), xv, s1);
      s2 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(a2 + i))), xv, s2);
      s3 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(a3 + i))), xv, s3);
    }
    float f0 = hsum(s0), f1 = hsum(s1), f2 = hsum(s2), f3 = hsum(s3);
    for (; i < k; i++) {
      f0 += _cvtsh_ss(a0[i]) * x[i], f1 += _cvtsh_ss(a1[i]) * x[i];
      f2 += _cvtsh_ss(a2[i]) * x[i], f3 += _cvtsh_ss(a3[i]) * x[i];
    }
    t[j] = f0, t[j + 1] = f1, t[j + 2] = f2, t[j + 3] = f3;
  }
  for (; j < r; j++) t[j] = dot_h(a + j * k, x, k);
}

/* y[0 .. 64) += sum over j < r of t[j] * bt[j][0 .. 64) (bt's rows n float16 apart), the 64 sums in registers
   (axpy_h per j would load and store y r times); each element sums in axpy_h's order. */
static void lora_expand64_h(float *y, const float *t, const uint16_t *bt, int64_t r, int64_t n) {
  __m256 acc[8];
  for (int q = 0; q < 8; q++) acc[q] = _mm256_loadu_ps(y + 8 * q);
  for (int64_t j = 0; j < r; j++) {
    const __m256 tj = _mm256_set1_ps(t[j]);
    const uint16_t *b = bt + j * n;
    for (int q = 0; q < 8; q++)
      acc[q] = _mm256_fmadd_ps(tj, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(b + 8 * q))), acc[q]);
  }
  for (int q = 0; q < 8; q++) _mm256_storeu_ps(y + 8 * q, acc[q]);
}

static inline void axpy_h(float *y, float a, const uint16_t *x, int64_t n) {
  const __m256 va = _mm256_set1_ps(a);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(x + i))),
                                            _mm256_loadu_ps(y + i)));
  for (; i < n; i++) y[i] += a * _cvtsh_ss(x[i]);
}
#endif

typedef struct {
  int64_t n_adapters;         /* in this step */
  const int64_t *starts;      /* [n_adapters + 1]: adapter a's rows are rows[starts[a] .. starts[a + 1]) */
  const int64_t *rows;        /* the rows with an adapter, grouped by adapter */
  const lora_pair *pairs;     /* [n_adapters][n_layers][5]: wqkv, wo, gate, up, down */
  int64_t max_rank;           /* the largest r of the pairs */
  float *t;                   /* scratch [m, max_rank] */
  int64_t half;               /* the pairs hold float16 (only where NATIVE_F16) */
} lora_t;

#define LORA_COLS 64 /* output columns per task of the second half */

/* y [m, n] += each row's adapter's update of layer l's linear layer `slot`, from its input x [m, k]. Tasks are per
   adapter, so its weights are read once per step however many rows use it (decode is bound by memory traffic):
   first per (adapter, j) the dot products of a's row j with each of its rows' x, then per (adapter, block of
   columns) the sums of t[row][j] * bt[j][block] into each of its rows, both spread over the threads. Each sum's
   terms are added in a fixed order: the same result alone or batched. */
static void lora_add(const lora_t *lo, int64_t n_layers, int64_t l, int slot, const float *x, float *y, int64_t m,
                     int64_t k, int64_t n) {
  if (!lo) return;
  const int64_t R = lo->max_rank, A = lo->n_adapters, blocks = (n + LORA_COLS - 1) / LORA_COLS;
  const int64_t quads = (R + 3) / 4; /* the first half's tasks take 4 of an adapter's rows of a */
#pragma omp parallel if (A * R * (k + n) > 32768)
  {
#pragma omp for collapse(2) schedule(static)
    for (int64_t a = 0; a < A; a++)
      for (int64_t g = 0; g < quads; g++) {
        const lora_pair *p = lo->pairs + (a * n_layers + l) * 5 + slot;
        const int64_t j0 = 4 * g, nj = p->r - j0 < 4 ? p->r - j0 : 4;
        if (nj <= 0) continue;
        for (int64_t i = lo->starts[a]; i < lo->starts[a + 1]; i++) {
          const int64_t row = lo->rows[i];
          float *t = lo->t + row * R + j0;
#if NATIVE_F16
          if (lo->half) {
            lora_shrink_h((const uint16_t *)p->a + j0 * k, x + row * k, k, nj, t);
            continue;
          }
#endif
          for (int64_t j = 0; j < nj; j++) t[j] = dot((const float *)p->a + (j0 + j) * k, x + row * k, k);
        }
      }
#pragma omp for collapse(2) schedule(static)
    for (int64_t a = 0; a < A; a++)
      for (int64_t b = 0; b < blocks; b++) {
        const lora_pair *p = lo->pairs + (a * n_layers + l) * 5 + slot;
        const int64_t c = b * LORA_COLS, w = n - c < LORA_COLS ? n - c : LORA_COLS;
        for (int64_t i = lo->starts[a]; i < lo->starts[a + 1]; i++) {
          const int64_t row = lo->rows[i];
          const float *t = lo->t + row * R;
#if NATIVE_F16
          if (lo->half && w == LORA_COLS) {
            lora_expand64_h(y + row * n + c, t, (const uint16_t *)p->bt + c, p->r, n);
            continue;
          }
          if (lo->half) {
            for (int64_t j = 0; j < p->r; j++) axpy_h(y + row * n + c, t[j], (const uint16_t *)p->bt + j * n + c, w);
            continue;
          }
#endif
          for (int64_t j = 0; j < p->r; j++) axpy(y + row * n + c, t[j], (const float *)p->bt + j * n + c, w);
        }
      }
  }
  (void)m;
}

/* lora_add for the torch layers' steps (prefill chunks and mixed steps with few rows): y [m, n] += the updates of
   layer l's linear layer `slot` for the rows of lo's adapters, from x [m, k]. */
void native_lora(const lora_t *lo, int64_t n_layers, int64_t l, int64_t slot, const float *x, float *y, int64_t m,
                 int64_t k, int64_t n) {
  lora_add(lo, n_layers, l, (int)slot, x, y, m, k, n);
}

/* floats of workspace native_decode needs for m rows attending to at most max_len keys */
int64_t native_decode_workspace(const model_t *md, int64_t m, int64_t max_len) {
  const int64_t qkv = (md->n_heads + 2 * md->n_kv) * md->head_dim;
  const int64_t widest = md->inter > md->hidden ? md->inter : md->hidden;
  return m * (md->hidden + qkv + md->n_heads * md->head_dim + 2 * md->inter + widest / QK + md->n_heads * max_len);
}

/* x [m, hidden]: the rows' embeddings in, their last hidden states out (before the final norm).
   positions [m], slot_mapping [m] (cache slot of each row's new K/V), slots [m, max_len] (each row's context
   slots, the new token's last), lens [m]. Returns 0, -1 for a shape the kernels do not take, -2 where memory ran out. */
/* cache[at .. at + n) = src (n floats), as float16 (rounded to nearest even, as torch converts) where half */
static void kv_store(void *cache, int64_t at, const float *src, int64_t n, int half) {
#if NATIVE_F16
  if (half) {
    uint16_t *dst = (uint16_t *)cache + at;
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
      _mm_storeu_si128((__m128i *)(dst + i), _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
    for (; i < n; i++) dst[i] = _cvtss_sh(src[i], _MM_FROUND_TO_NEAREST_INT);
    return;
  }
#else
  (void)half;
#endif
  memcpy((float *)cache + at, src, sizeof(float) * (size_t)n);
}

int native_decode(const model_t *md, float *x, int64_t m, const int64_t *positions, const int64_t *slot_mapping,
                  const int64_t *slots, const int64_t *lens, int64_t max_len, float *work, const lora_t *lora) {
  const int64_t H = md->hidden, I = md->inter, nh = md->n_heads, nkv = md->n_kv, D = md->head_dim;
  const int64_t qkv_n = (nh + 2 * nkv) * D;
  if (D > 512 || H % QK || I % QK || nh % nkv || (md->kv_half && !NATIVE_F16)) return -1;
  float *h = work, *qkv = h + m * H, *att = qkv + m * qkv_n, *g = att + m * nh * D, *u = g + m * I;
  float *sums = u + m * I, *scores = sums + m * ((I > H ? I : H) / QK);
  const int64_t L = md->n_layers;
  for (int64_t l = 0; l < L; l++) {
    const layer_t *ly = md->layers + l;
    rms_norm(x, ly->attn_norm, h, m, H, md->eps);
    if (linear(&ly->wqkv, h, qkv, m, sums)) return -2;
    lora_add(lora, L, l, 0, h, qkv, m, H, qkv_n);
#pragma omp parallel for schedule(static) if (m > 4)
    for (int64_t r = 0; r < m; r++) {
      float *row = qkv + r * qkv_n;
      const float *cs = md->rope_cos + positions[r] * D, *sn = md->rope_sin + positions[r] * D;
      for (int64_t hd = 0; hd < nh + nkv; hd++) rope(row + hd * D, cs, sn, D);
      kv_store(ly->k_cache, slot_mapping[r] * nkv * D, row + nh * D, nkv * D, (int)md->kv_half);
      kv_store(ly->v_cache, slot_mapping[r] * nkv * D, row + (nh + nkv) * D, nkv * D, (int)md->kv_half);
    }
    if (decode_attention(qkv, qkv_n, ly->k_cache, ly->v_cache, m, nh, nkv, D, slots, lens, max_len, att, nh * D,
                         scores, (int)md->kv_half))
      return -2;
    if (linear(&ly->wo, att, h, m, sums)) return -2;
    lora_add(lora, L, l, 1, att, h, m, nh * D, H);
    for (int64_t i = 0; i < m * H; i++) x[i] += h[i];
    rms_norm(x, ly->ffn_norm, h, m, H, md->eps);
    if (linear(&ly->gate, h, g, m, sums)) return -2;
    lora_add(lora, L, l, 2, h, g, m, H, I);
    if (linear(&ly->up, h, u, m, sums)) return -2;
    lora_add(lora, L, l, 3, h, u, m, H, I);
#pragma omp parallel for schedule(static) if (m > 4)
    for (int64_t r = 0; r < m; r++) silu_mul(g + r * I, u + r * I, I);
    if (linear(&ly->down, g, h, m, sums)) return -2;
    lora_add(lora, L, l, 4, g, h, m, I, H);
    for (int64_t i = 0; i < m * H; i++) x[i] += h[i];
  }
  return 0;
}
