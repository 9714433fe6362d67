/* llmos native products: y = x . W^T straight from GGUF blocks, fp32 activations, fp32 results.
 *
 * Built at first load by drivers/model/native.py with the machine's compiler (-O3 -march=native) and
 * loaded with ctypes; when there is no compiler, or the build or its self-test fails, llmos runs
 * torch's kernels instead. Nothing here allocates per call or keeps model state.
 *
 * Weights are read in the file's own blocks (Q4_0, Q4_1, Q8_0; F32 and F16 rows too), so a matrix held this way costs its
 * file bytes and no more. Each block is expanded to exact fp32 weights in registers (d*q, d*(q-8),
 * d*q+m: the products are exact in fp32, a single rounding where gguf-py rounds once), then dotted
 * with up to TILE activation rows, so at one row the loop is bound by memory and at a few rows each
 * block is expanded once for all of them.
 *
 * Beside the products, the small ops of a decode step that cost torch several kernel launches each:
 * the residual add with the RMS norm after it, rotary embedding with the K/V write into the pool, decode attention read from the pool's
 * blocks where they lie, and the feed-forward's silu(gate) * up.
 *
 * Threads: torch's own OpenMP team (see split), work split by output rows.
 */
#define _GNU_SOURCE
#include <immintrin.h>
#include <math.h>
#include <stdlib.h>
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define ABI 2
#define TILE 4                 /* activation rows dotted per pass over a weight row */
#define MAX_PARTS 8

enum { T_F32 = 0, T_F16 = 1, T_Q4_0 = 2, T_Q4_1 = 3, T_Q8_0 = 8 };   /* GGML type numbers */

static int block_bytes(int type) {
    switch (type) {                /* F32 and F16 in "blocks" of 32 weights, as the loops take them */
    case T_F32: return 128;
    case T_F16: return 64;
    case T_Q4_0: return 18;
    case T_Q4_1: return 20;
    case T_Q8_0: return 34;
    default: return 0;
    }
}

static inline float f16(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return _cvtsh_ss(h);
}

/* ------------------------------------------------------------------------------------ row products */
/* One weight row (nb blocks) against r <= TILE activation rows x[j*ldx ...]; results to out[j]. */

#if defined(__AVX512F__)
#define VEC 16
typedef __m512 vf;
#define vzero() _mm512_setzero_ps()
#define vset(a) _mm512_set1_ps(a)
#define vload(p) _mm512_loadu_ps(p)
#define vstore(p, a) _mm512_storeu_ps(p, a)
#define vfma(a, b, c) _mm512_fmadd_ps(a, b, c)
#define vmul(a, b) _mm512_mul_ps(a, b)
#define vadd(a, b) _mm512_add_ps(a, b)
#define vsum(a) _mm512_reduce_add_ps(a)
/* 16 bytes -> 16 floats */
static inline vf u8x16(__m128i b) { return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(b)); }
static inline vf i8x16(const uint8_t *p) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p))); }
/* a block of 32 weights as two (or four, AVX2) vectors */
#define HALVES 2
static inline void nibbles(const uint8_t *qs, vf *w) {
    __m128i b = _mm_loadu_si128((const __m128i *)qs), m = _mm_set1_epi8(0x0F);
    w[0] = u8x16(_mm_and_si128(b, m));
    w[1] = u8x16(_mm_and_si128(_mm_srli_epi16(b, 4), m));
}
static inline void bytes(const uint8_t *qs, vf *w) { w[0] = i8x16(qs); w[1] = i8x16(qs + 16); }
static inline vf halfs(const uint8_t *p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p)); }
#elif defined(__AVX2__) && defined(__FMA__)
#define VEC 8
typedef __m256 vf;
#define vzero() _mm256_setzero_ps()
#define vset(a) _mm256_set1_ps(a)
#define vload(p) _mm256_loadu_ps(p)
#define vstore(p, a) _mm256_storeu_ps(p, a)
#define vfma(a, b, c) _mm256_fmadd_ps(a, b, c)
#define vmul(a, b) _mm256_mul_ps(a, b)
#define vadd(a, b) _mm256_add_ps(a, b)
static inline float vsum(__m256 a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
static inline vf u8x8(__m128i b) { return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b)); }
#define HALVES 4
static inline void nibbles(const uint8_t *qs, vf *w) {
    __m128i b = _mm_loadu_si128((const __m128i *)qs), m = _mm_set1_epi8(0x0F);
    __m128i lo = _mm_and_si128(b, m), hi = _mm_and_si128(_mm_srli_epi16(b, 4), m);
    w[0] = u8x8(lo);
    w[1] = u8x8(_mm_srli_si128(lo, 8));
    w[2] = u8x8(hi);
    w[3] = u8x8(_mm_srli_si128(hi, 8));
}
static inline void bytes(const uint8_t *qs, vf *w) {
    for (int h = 0; h < 4; h++)
        w[h] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(qs + 8 * h))));
}
static inline vf halfs(const uint8_t *p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)); }
#endif

#ifdef VEC
#define NATIVE_SIMD 1
/* Q8_0 at one row, the output projection's case: scale once per block after the block's dot */
static float q8_0_dot1(const uint8_t *w, int nb, const float *x) {
    vf acc0 = vzero(), acc1 = vzero();
    for (int b = 0; b + 1 < nb; b += 2, w += 68, x += 64) {
        vf q[HALVES], p[HALVES];
        bytes(w + 2, q);
        bytes(w + 36, p);
        vf t0 = vzero(), t1 = vzero();
        for (int h = 0; h < HALVES; h++) {
            t0 = vfma(q[h], vload(x + h * VEC), t0);
            t1 = vfma(p[h], vload(x + 32 + h * VEC), t1);
        }
        acc0 = vfma(vset(f16(w)), t0, acc0);
        acc1 = vfma(vset(f16(w + 34)), t1, acc1);
    }
    if (nb & 1) {
        vf q[HALVES], t0 = vzero();
        bytes(w + 2, q);
        for (int h = 0; h < HALVES; h++) t0 = vfma(q[h], vload(x + h * VEC), t0);
        acc0 = vfma(vset(f16(w)), t0, acc0);
    }
    return vsum(vadd(acc0, acc1));
}

/* One block's 32 weights as exact fp32: d*q (Q8_0), d*(q-8) (Q4_0), d*q+m (Q4_1), or as they are
 * (F32, F16: the lean engine runs files of those too) */
static inline void expand_block(int type, const uint8_t *w, vf *q) {
    if (type == T_F32) {
        for (int h = 0; h < HALVES; h++) q[h] = vload((const float *)w + h * VEC);
        return;
    }
    if (type == T_F16) {
        for (int h = 0; h < HALVES; h++) q[h] = halfs(w + h * VEC * 2);
        return;
    }
    const float d = f16(w);
    if (type == T_Q8_0) {
        bytes(w + 2, q);
        for (int h = 0; h < HALVES; h++) q[h] = vmul(q[h], vset(d));
    } else if (type == T_Q4_0) {
        nibbles(w + 2, q);
        for (int h = 0; h < HALVES; h++) q[h] = vfma(q[h], vset(d), vset(-8.0f * d));
    } else {
        nibbles(w + 4, q);
        for (int h = 0; h < HALVES; h++) q[h] = vfma(q[h], vset(d), vset(f16(w + 2)));
    }
}

/* A weight row expanded to fp32 once, for products of many activation rows (prefill) */
static void expand_row(int type, const uint8_t *w, int nb, float *restrict dst) {
    const int bs = block_bytes(type);
    for (int b = 0; b < nb; b++, w += bs) {
        vf q[HALVES];
        expand_block(type, w, q);
        for (int h = 0; h < HALVES; h++) vstore(dst + b * 32 + h * VEC, q[h]);
    }
}

static void expanded_dots(const float *restrict wf, int K, const float *x, int ldx, int r, float *out) {
    vf acc[TILE];
    for (int j = 0; j < r; j++) acc[j] = vzero();
    for (int k = 0; k < K; k += VEC) {
        vf wv = vload(wf + k);
        for (int j = 0; j < r; j++) acc[j] = vfma(wv, vload(x + (long)j * ldx + k), acc[j]);
    }
    for (int j = 0; j < r; j++) out[j] = vsum(acc[j]);
}
#define HAVE_EXPAND 1

static void row_dot(int type, const uint8_t *w, int nb, const float *x, int ldx, int r, float *out) {
    if (r == 1 && type == T_Q8_0) {
        out[0] = q8_0_dot1(w, nb, x);
        return;
    }
    vf acc[TILE][2];
    for (int j = 0; j < r; j++) acc[j][0] = acc[j][1] = vzero();
    const int bs = block_bytes(type);
    for (int b = 0; b < nb; b++, w += bs) {
        vf q[HALVES];
        expand_block(type, w, q);
        const float *xb = x + b * 32;
        for (int j = 0; j < r; j++)
            for (int h = 0; h < HALVES; h++)
                acc[j][h & 1] = vfma(q[h], vload(xb + j * ldx + h * VEC), acc[j][h & 1]);
    }
    for (int j = 0; j < r; j++) out[j] = vsum(vadd(acc[j][0], acc[j][1]));
}
#else
#define NATIVE_SIMD 0
static void row_dot(int type, const uint8_t *w, int nb, const float *x, int ldx, int r, float *out) {
    const int bs = block_bytes(type);
    for (int j = 0; j < r; j++) out[j] = 0.0f;
    for (int b = 0; b < nb; b++, w += bs) {
        float d = type > T_F16 ? f16(w) : 0.0f, q[32];
        if (type == T_F32) {
            memcpy(q, w, sizeof q);
        } else if (type == T_F16) {
            for (int i = 0; i < 32; i++) q[i] = f16(w + 2 * i);
        } else if (type == T_Q8_0) {
            for (int i = 0; i < 32; i++) q[i] = d * (float)(int8_t)w[2 + i];
        } else {
            const uint8_t *qs = w + (type == T_Q4_0 ? 2 : 4);
            float m = type == T_Q4_0 ? -8.0f * d : f16(w + 2);
            for (int i = 0; i < 16; i++) {
                q[i] = d * (float)(qs[i] & 15) + m;
                q[i + 16] = d * (float)(qs[i] >> 4) + m;
            }
        }
        for (int j = 0; j < r; j++) {
            float s = 0.0f;
            for (int i = 0; i < 32; i++) s += q[i] * x[j * ldx + b * 32 + i];
            out[j] += s;
        }
    }
}
#endif

/* ------------------------------------------------------------------------------------------- jobs */

struct job {
    int nparts, K, R, ldy;
    int types[MAX_PARTS], rows[MAX_PARTS];
    const uint8_t *w[MAX_PARTS];
    const float *x;
    float *y;
    long total;
};

#ifdef HAVE_EXPAND
static _Thread_local float *scratch;      /* one expanded weight row, per thread */
static _Thread_local int scratch_len;

static int ensure_scratch(int K) {
    if (scratch_len >= K) return 1;
    free(scratch);
    scratch = malloc(sizeof(float) * (size_t)K);
    scratch_len = scratch ? K : 0;
    return scratch != NULL;
}
#endif

static int run_rows(const struct job *jb, long first, long last) {
    const int nb = jb->K / 32;
    long base = 0;
    for (int p = 0; p < jb->nparts; base += jb->rows[p], p++) {
        long lo = first > base ? first : base, hi = last < base + jb->rows[p] ? last : base + jb->rows[p];
        if (lo >= hi) continue;
        const long stride = (long)nb * block_bytes(jb->types[p]);
        for (long n = lo; n < hi; n++) {
            const uint8_t *w = jb->w[p] + (n - base) * stride;
#ifdef HAVE_EXPAND
            if (jb->R > TILE) {                 /* expand the row once, then dot it with every row */
                if (!ensure_scratch(jb->K)) return -2;
                expand_row(jb->types[p], w, nb, scratch);
            }
#endif
            for (int j = 0; j < jb->R; j += TILE) {
                int r = jb->R - j < TILE ? jb->R - j : TILE;
                float out[TILE];
#ifdef HAVE_EXPAND
                if (jb->R > TILE)
                    expanded_dots(scratch, jb->K, jb->x + (long)j * jb->K, jb->K, r, out);
                else
#endif
                    row_dot(jb->types[p], w, nb, jb->x + (long)j * jb->K, jb->K, r, out);
                for (int i = 0; i < r; i++) jb->y[(long)(j + i) * jb->ldy + n] = out[i];
            }
        }
    }
    return 0;
}

/* --------------------------------------------------------------------------------------- threads */
/* OpenMP, linked against the libgomp torch has already loaded (the same soname): our products run on
 * torch's own worker threads, so the two never spin against each other for the machine's cores, and
 * torch.set_num_threads sets ours too. Built without OpenMP, the products run on the caller alone. */

static int split(const struct job *jb) {
    int failed = 0;
    long groups = (jb->total + 15) / 16;      /* shares of whole 16-row groups: no shared lines of y */
#ifdef _OPENMP
    int n = omp_get_max_threads();
    if ((long)jb->total * jb->K * jb->R < (1L << 16)) n = 1;   /* not worth a fork */
#pragma omp parallel num_threads(n)
    {
        int i = omp_get_thread_num(), t = omp_get_num_threads();
        long first = groups * i / t * 16, last = groups * (i + 1) / t * 16;
        if (last > jb->total) last = jb->total;
        if (first < last && run_rows(jb, first, last)) {
#pragma omp atomic write
            failed = -2;
        }
    }
#else
    failed = run_rows(jb, 0, groups * 16 > jb->total ? jb->total : groups * 16);
#endif
    return failed;
}

int llmos_abi(void) { return ABI; }

/* SIMD width in bits of the build (512, 256), 0 for the scalar fallback */
int llmos_simd(void) {
#ifdef VEC
    return VEC * 32;
#else
    return 0;
#endif
}

/* Threads the products use: torch's OpenMP team size, or 1 without OpenMP. */
int llmos_threads(void) {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

/* y[r*ldy + n] = sum_k x[r*K + k] * W[n, k] for the parts stacked along n. Returns 0, or -1 for a bad
 * argument (an unknown type, K not a multiple of 32, too many parts), -2 out of memory. */
int llmos_gemm(int nparts, const int *types, const void *const *w, const int *rows, int K,
               const float *x, int R, float *y, int ldy) {
    if (nparts < 1 || nparts > MAX_PARTS || K % 32 || R < 1) return -1;
    struct job jb = {.nparts = nparts, .K = K, .R = R, .ldy = ldy, .x = x, .y = y, .total = 0};
    for (int p = 0; p < nparts; p++) {
        if (!block_bytes(types[p]) || rows[p] < 0) return -1;
        jb.types[p] = types[p];
        jb.rows[p] = rows[p];
        jb.w[p] = w[p];
        jb.total += rows[p];
    }
    return split(&jb);
}

/* ------------------------------------------------------------------------------ the small ops of a step */

enum { KV_F32 = 0, KV_BF16 = 1, KV_F16 = 2 };

/* e^x to ~2 ulp, in arithmetic the compiler vectorises (libm's expf is vectorised only under
 * -ffast-math): x = n ln2 + r, |r| <= ln2 / 2, e^r by its degree-7 Taylor-like minimax polynomial,
 * 2^n put in the exponent bits. Inputs are clamped to [-87, 88], where float neither under- nor
 * overflows; softmax's shifted scores and silu's -x stay far inside in practice. */
static inline float exp_vec(float x) {
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    const float n = floorf(x * 1.44269504f + 0.5f);
    const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const uint32_t bits = (uint32_t)((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, 4);
    return p * scale;
}

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline void kv_row(const void *base, long at, int kind, int D, float *restrict out) {
    if (kind == KV_F32) {
        memcpy(out, (const float *)base + at, sizeof(float) * D);
    } else if (kind == KV_BF16) {
        const uint16_t *restrict src = (const uint16_t *)base + at;
#pragma omp simd
        for (int d = 0; d < D; d++) out[d] = bf16_to_f32(src[d]);
    } else {
        const uint16_t *restrict src = (const uint16_t *)base + at;
        for (int d = 0; d < D; d++) out[d] = _cvtsh_ss(src[d]);
    }
}

#ifdef VEC
/* VEC values of a pool row as fp32, straight into a register */
static inline vf kv_vec(const void *base, long at, int kind) {
#if VEC == 16
    if (kind == KV_F32) return _mm512_loadu_ps((const float *)base + at);
    __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)base + at));
    if (kind == KV_BF16) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    return _mm512_cvtph_ps(h);
#else
    if (kind == KV_F32) return _mm256_loadu_ps((const float *)base + at);
    __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)base + at));
    if (kind == KV_BF16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    return _mm256_cvtph_ps(h);
#endif
}
#define ATTEND_REGS 8          /* a head of up to 8 * VEC values is held in registers */
#endif

/* Decode attention over the paged KV pool, one query token per sequence: for sequence n and query
 * head h (sharing kv head h / G), softmax(scale * q . k_p) over positions p < lengths[n], times v_p.
 * k and v are one layer's pool halves [blocks, block_size, KVH, D]; tables[n * max_blocks + i] is the
 * block holding positions i*block_size ...; q and out are [nd, H, D] fp32. The keys are read where
 * they lie, so no gathered copy is made. Returns 0, -1 for a bad argument, -2 out of memory. */
int llmos_attend(const float *q, int nd, int H, int KVH, int D, const void *k, const void *v, int kind,
                 int block_size, const int64_t *tables, int max_blocks, const int32_t *lengths, float scale,
                 float *out) {
    if (nd < 1 || KVH < 1 || H % KVH || H / KVH > 8 || D < 1 || D > 512 || block_size < 1 || kind < 0 || kind > 2)
        return -1;
    const int G = H / KVH;
    int longest = 0;
    for (int n = 0; n < nd; n++) {
        if (lengths[n] < 1 || lengths[n] > (long)max_blocks * block_size) return -1;
        if (lengths[n] > longest) longest = lengths[n];
    }
    const int tasks = nd * KVH;
    int threads = 1;
#ifdef _OPENMP
    if ((long)longest * tasks * D >= (1L << 15)) threads = omp_get_max_threads();
#endif
    float *buffer = malloc(sizeof(float) * (size_t)threads * G * longest);   /* scores, per thread */
    if (!buffer) return -2;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(threads)
#endif
    for (int task = 0; task < tasks; task++) {
        const int n = task / KVH, kvh = task % KVH, len = lengths[n];
#ifdef _OPENMP
        float *restrict scores = buffer + (size_t)omp_get_thread_num() * G * longest;
#else
        float *restrict scores = buffer;
#endif
        float row_[512], acc_[8 * 512];
        float *restrict row = row_;
        const float *qn = q + ((long)n * H + (long)kvh * G) * D;
#ifdef VEC
        const int regs = D % VEC == 0 && D / VEC <= ATTEND_REGS ? D / VEC : 0;
#else
        const int regs = 0;
        (void)regs;
#endif
        for (int p = 0; p < len; p++) {
            long at = ((tables[(long)n * max_blocks + p / block_size] * block_size + p % block_size) * KVH + kvh) * D;
#ifdef VEC
            if (regs) {                         /* the key in registers, dotted with each query head */
                vf kr[ATTEND_REGS];
                for (int c = 0; c < regs; c++) kr[c] = kv_vec(k, at + c * VEC, kind);
                for (int g = 0; g < G; g++) {
                    vf a0 = vzero(), a1 = vzero();
                    int c = 0;
                    for (; c + 1 < regs; c += 2) {
                        a0 = vfma(kr[c], vload(qn + g * D + c * VEC), a0);
                        a1 = vfma(kr[c + 1], vload(qn + g * D + (c + 1) * VEC), a1);
                    }
                    if (c < regs) a0 = vfma(kr[c], vload(qn + g * D + c * VEC), a0);
                    scores[(long)g * longest + p] = vsum(vadd(a0, a1)) * scale;
                }
                continue;
            }
#endif
            kv_row(k, at, kind, D, row);
            for (int g = 0; g < G; g++) {
                const float *restrict qg = qn + g * D;
                float s = 0.0f;
#pragma omp simd reduction(+ : s)
                for (int d = 0; d < D; d++) s += qg[d] * row[d];
                scores[(long)g * longest + p] = s * scale;
            }
        }
        float total[8];
        for (int g = 0; g < G; g++) {
            float *restrict sg = scores + (long)g * longest;
            float m = sg[0];
            for (int p = 1; p < len; p++) m = sg[p] > m ? sg[p] : m;
            float t = 0.0f;
#pragma omp simd reduction(+ : t)
            for (int p = 0; p < len; p++) {
                sg[p] = exp_vec(sg[p] - m);
                t += sg[p];
            }
            total[g] = t;
        }
        for (int x = 0; x < G * D; x++) acc_[x] = 0.0f;
        for (int p = 0; p < len; p++) {
            long at = ((tables[(long)n * max_blocks + p / block_size] * block_size + p % block_size) * KVH + kvh) * D;
#ifdef VEC
            if (regs) {
                vf vr[ATTEND_REGS];
                for (int c = 0; c < regs; c++) vr[c] = kv_vec(v, at + c * VEC, kind);
                for (int g = 0; g < G; g++) {
                    const vf wgt = vset(scores[(long)g * longest + p]);
                    float *a = acc_ + g * D;
                    for (int c = 0; c < regs; c++) vstore(a + c * VEC, vfma(wgt, vr[c], vload(a + c * VEC)));
                }
                continue;
            }
#endif
            kv_row(v, at, kind, D, row);
            for (int g = 0; g < G; g++) {
                const float wgt = scores[(long)g * longest + p];
                float *a = acc_ + g * D;
                for (int d = 0; d < D; d++) a[d] += wgt * row[d];
            }
        }
        float *o = out + ((long)n * H + (long)kvh * G) * D;
        for (int g = 0; g < G; g++)
            for (int d = 0; d < D; d++) o[g * D + d] = acc_[g * D + d] / total[g];
    }
    free(buffer);
    return 0;
}

static inline float load_act(const void *base, long at, int kind) {
    if (kind == KV_F32) return ((const float *)base)[at];
    uint32_t u = (uint32_t)((const uint16_t *)base)[at] << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* fp32 -> bf16, rounding to nearest, ties to even (as torch); a NaN stays a (quiet) NaN */
static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    const uint32_t rounded = u + 0x7fffu + ((u >> 16) & 1u), quiet = u | 0x00400000u;
    return (uint16_t)(((u & 0x7fffffffu) > 0x7f800000u ? quiet : rounded) >> 16);
}

static inline void store_kv(void *base, long at, int kind, float f) {
    if (kind == KV_F32) {
        ((float *)base)[at] = f;
    } else if (kind == KV_BF16) {
        ((uint16_t *)base)[at] = f32_to_bf16(f);
    } else {
        ((uint16_t *)base)[at] = _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    }
}

/* The attention's inputs of T tokens in one call: qkv [T, ld] (fp32 or bf16; q heads, then k, then v,
 * each D wide) -> q rotated into q_out [T, H, D] fp32; k rotated and v as they are written to the
 * pool's rows slots[t] (k, v: [rows, KVH, D] of kv_kind). rope [T, D/2, 2] holds each token's
 * (cos, sin) per adjacent pair, which rotates (x0, x1) to (x0 c - x1 s, x0 s + x1 c). */
int llmos_rope_store(const void *qkv, int in_kind, int T, int H, int KVH, int D, long ld, const float *rope,
                     void *k, void *v, int kv_kind, const int64_t *slots, float *q_out) {
    if (T < 1 || H < 1 || KVH < 1 || D < 2 || D % 2 || (in_kind != KV_F32 && in_kind != KV_BF16)
        || kv_kind < 0 || kv_kind > 2 || ld < (long)(H + 2 * KVH) * D) return -1;
    for (int t = 0; t < T; t++) {
        const long row = (long)t * ld;
        const float *cs = rope + (long)t * D;
        for (int h = 0; h < H + KVH; h++) {
            const long src = row + (long)h * D;
            const long dst = h < H ? ((long)t * H + h) * D : (slots[t] * KVH + (h - H)) * D;
            for (int i = 0; i < D / 2; i++) {
                float x0 = load_act(qkv, src + 2 * i, in_kind), x1 = load_act(qkv, src + 2 * i + 1, in_kind);
                float c = cs[2 * i], s = cs[2 * i + 1];
                float y0 = x0 * c - x1 * s, y1 = x0 * s + x1 * c;
                if (h < H) {
                    q_out[dst + 2 * i] = y0;
                    q_out[dst + 2 * i + 1] = y1;
                } else {
                    store_kv(k, dst + 2 * i, kv_kind, y0);
                    store_kv(k, dst + 2 * i + 1, kv_kind, y1);
                }
            }
        }
        for (int h = 0; h < KVH; h++) {
            const long src = row + (long)(H + KVH + h) * D, dst = (slots[t] * KVH + h) * D;
            for (int d = 0; d < D; d++) store_kv(v, dst + d, kv_kind, load_act(qkv, src + d, in_kind));
        }
    }
    return 0;
}

/* The feed-forward's gate: out[t, f] = silu(gu[t, f]) * gu[t, F + f], gu fp32 or bf16, out fp32 or bf16. */
int llmos_silu_mul(const void *gu, int in_kind, int T, int F, void *out, int out_kind) {
    if (T < 1 || F < 1 || (in_kind != KV_F32 && in_kind != KV_BF16) || (out_kind != KV_F32 && out_kind != KV_BF16))
        return -1;
    float row[4096];
    for (int t = 0; t < T; t++)
        for (int f0 = 0; f0 < F; f0 += 4096) {
            const int n = F - f0 < 4096 ? F - f0 : 4096;
            const long g0 = (long)t * 2 * F + f0, u0 = g0 + F;
            if (in_kind == KV_F32) {
                const float *gp = (const float *)gu + g0, *up = (const float *)gu + u0;
#pragma omp simd
                for (int f = 0; f < n; f++) row[f] = gp[f] / (1.0f + exp_vec(-gp[f])) * up[f];
            } else {
                const uint16_t *gp = (const uint16_t *)gu + g0, *up = (const uint16_t *)gu + u0;
#pragma omp simd
                for (int f = 0; f < n; f++) {
                    float g = bf16_to_f32(gp[f]), u = bf16_to_f32(up[f]);
                    row[f] = g / (1.0f + exp_vec(-g)) * u;
                }
            }
            if (out_kind == KV_F32) {
                memcpy((float *)out + (long)t * F + f0, row, sizeof(float) * n);
            } else {
                uint16_t *o = (uint16_t *)out + (long)t * F + f0;
#pragma omp simd
                for (int f = 0; f < n; f++) o[f] = f32_to_bf16(row[f]);
            }
        }
    return 0;
}

/* The residual stream's step and the next norm in one call: x[r] += y[r] (y fp32 or bf16; none when
 * y is NULL), then out[r] = x[r] / sqrt(mean(x[r]^2) + eps) * w (torch's rms_norm), out in fp32 or
 * bf16 (what the next product's kernel takes). x and w are fp32. */
int llmos_rms_norm(float *restrict x, const void *y, int y_kind, const float *restrict w, int R, int K, float eps,
                   void *out, int out_kind) {
    if (R < 1 || K < 1 || (y && y_kind != KV_F32 && y_kind != KV_BF16) || (out_kind != KV_F32 && out_kind != KV_BF16))
        return -1;
    for (int r = 0; r < R; r++) {
        float *restrict xr = x + (long)r * K;
        if (y && y_kind == KV_F32) {
            const float *restrict yr = (const float *)y + (long)r * K;
#pragma omp simd
            for (int k = 0; k < K; k++) xr[k] += yr[k];
        } else if (y) {
            const uint16_t *restrict yr = (const uint16_t *)y + (long)r * K;
#pragma omp simd
            for (int k = 0; k < K; k++) xr[k] += bf16_to_f32(yr[k]);
        }
        float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
        for (int k = 0; k < K; k++) ss += xr[k] * xr[k];
        const float inv = 1.0f / sqrtf(ss / (float)K + eps);
        if (out_kind == KV_F32) {
            float *restrict o = (float *)out + (long)r * K;
#pragma omp simd
            for (int k = 0; k < K; k++) o[k] = xr[k] * inv * w[k];
        } else {
            uint16_t *restrict o = (uint16_t *)out + (long)r * K;
#pragma omp simd
            for (int k = 0; k < K; k++) o[k] = f32_to_bf16(xr[k] * inv * w[k]);
        }
    }
    return 0;
}
