/* Inference for a Llama 2 model in one C file: reads the .bin files export.py writes (versions 0, 1 and 2)
   and llama2.c's own, and generates text. The file is memory-mapped and checked against its header; where
   Linux offers transparent huge pages the weights are then read into them, else used from the mapping.

     make run       portable build          ./run model.bin -z tok.bin -i "Once upon a time"
     make runfast   tuned for this CPU      ./run model.bin -z tok.bin -m instruct -i "Write a story..."
     make runomp    tuned, OpenMP threads   OMP_NUM_THREADS=2 ./run model.bin -z tok.bin -t 0.8 -p 0.9

   Every build computes the same floats in the same order (no -ffast-math, no FMA contraction, fixed-width
   vector lanes), so greedy output is identical across them. */

#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#if defined(__AVX2__) || defined(__AVX512VNNI__)
#include <immintrin.h>
#endif
#ifdef _OPENMP  /* split the loop after it over the threads when the int `big` says the work is worth it */
#define PARALLEL_FOR_IF_BIG _Pragma("omp parallel for schedule(static) if(big)")
#else
#define PARALLEL_FOR_IF_BIG
#endif
#define BIG_WORK 16384  /* multiply-adds below which waking the threads costs more than it saves */

#define MAGIC 0x616b3432u  /* "ak42": versions 1 and 2 */
#define FLAG_EOS 1u         /* the model was trained with EOS ending each story */
#define FLAG_STRIP_SPACES 2u  /* its tokenizer drops leading, trailing and repeated spaces */
#define FLAG_NO_DUMMY_PREFIX 4u  /* its tokenizer does not prepend a space */

static void die(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fputs("error: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    exit(2);
}

static const char *plural(long long n) { return n == 1 ? "" : "s"; }

static void *xcalloc(size_t n, size_t size) {
    void *p = n && size ? calloc(n, size) : NULL;
    if (n && size && !p) die("out of memory allocating %zu x %zu bytes", n, size);
    return p;
}

static void *xrealloc(void *p, size_t size) {
    p = realloc(p, size ? size : 1);
    if (!p) die("out of memory allocating %zu bytes", size);
    return p;
}

/* The size of the regular file open as fd; anything else (a folder, a pipe) is an error naming path. */
static size_t regular_file_size(int fd, const char *path) {
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) die("%s is not a regular file", path);
    return (size_t)st.st_size;
}

/* ------------------------------------------------------------------------------------------ vector kernels */

/* Eight float lanes; GCC and Clang lower them to AVX, to pairs of SSE registers or to scalars, with the
   same arithmetic in each lane, which is what keeps every build's results bit-identical. */
#pragma GCC diagnostic ignored "-Wpsabi"  /* static functions only: no ABI is exposed */
typedef float v8f __attribute__((vector_size(32)));

static inline v8f load8(const float *p) { v8f v; memcpy(&v, p, sizeof v); return v; }
static inline float hsum8(const v8f *v) {
    const float *a = (const float *)v;
    return ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]));
}

/* Batch-1 decoding streams every weight once per token. On an Intel Xeon VM the hardware prefetchers alone held
   it to 50-80% of the read bandwidth, so the weight loops also ask for the line PREFETCH_AHEAD bytes on. A
   prefetch never faults, and the address is formed as an integer, so reading ahead past a matrix is harmless. */
#ifndef PREFETCH_AHEAD
#define PREFETCH_AHEAD 4096
#endif
static inline void prefetch_ahead(const void *p) { __builtin_prefetch((const void *)((uintptr_t)p + PREFETCH_AHEAD)); }

/* Four accumulators hide the latency of the adds; one row at a time keeps the weights one sequential stream
   (interleaving rows measured slower). */
static inline float dot(const float *a, const float *b, int n) {
    v8f a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
    int j = 0;
    for (; j + 32 <= n; j += 32) {
        prefetch_ahead(a + j);
        prefetch_ahead(a + j + 16);
        a0 += load8(a + j) * load8(b + j);
        a1 += load8(a + j + 8) * load8(b + j + 8);
        a2 += load8(a + j + 16) * load8(b + j + 16);
        a3 += load8(a + j + 24) * load8(b + j + 24);
    }
    for (; j + 8 <= n; j += 8) a0 += load8(a + j) * load8(b + j);
    v8f acc = (a0 + a1) + (a2 + a3);
    float s = hsum8(&acc);
    for (; j < n; j++) s += a[j] * b[j];
    return s;
}

static void rows_f32(float *out, const float *w, const float *x, int n, int nrows) {
    for (int r = 0; r < nrows; r++) out[r] = dot(w + (size_t)r * n, x, n);
}

typedef struct {  /* an activation vector quantised to int8 in groups, as Q8_0 weights are */
    int8_t *q;
    float *s;
} QVec;

static void quantize(QVec *out, const float *x, int n, int gs) {
    for (int g = 0; g < n / gs; g++) {
        float wmax = 0.0f;
        int finite = 1;
        for (int k = 0; k < gs; k++) wmax = fmaxf(wmax, fabsf(x[g * gs + k])), finite &= isfinite(x[g * gs + k]);
        /* NaN or infinity (weights of a diverged run) must reach the logits, where they are reported, not turn
           into int8 values (converting them is undefined): a NaN scale and zero values carry them there */
        float scale = finite ? wmax / 127.0f : NAN;
        out->s[g] = scale;
        for (int k = 0; k < gs; k++) {
            float v = scale > 0.0f ? roundf(x[g * gs + k] / scale) : 0.0f;
            out->q[g * gs + k] = (int8_t)(v > -127.0f ? (v < 127.0f ? v : 127.0f) : -127.0f);  /* rounding */
        }
    }
}

/* Q8_0 rows, groups of a multiple of 32: each group's integer products are summed exactly into 16 lanes (the
   product at offset j of a group goes to lane (j / 4) % 16, the layout of a 512-bit VNNI dot product), and each
   lane adds its sum times the two scales into its own float; groups of 32 reach only the first 8 lanes. One
   horizontal sum per row, not per group, so the weights keep streaming; every build (VNNI, AVX2, portable)
   computes the same floats in the same order. Other group sizes take no vector path in any build. */
enum { QLANES = 16 };

/* The lanes' sum in a fixed tree; lanes from `reached` on hold +0 and are skipped (adding +0 changes nothing). */
static float sum_lanes(float *acc, int reached) {
    for (int width = QLANES / 2; width > 0; width /= 2)
        for (int l = 0; l < width && l + width < reached; l++) acc[l] += acc[l + width];
    return acc[0];
}

/* The portable build's lanes: 4 consecutive products per lane; a constant count lets the compiler vectorize it. */
static inline void add_to_lanes(int32_t *lane, const int8_t *x, const int8_t *w, int lanes) {
    for (int l = 0; l < lanes; l++)
        lane[l] += x[4 * l] * w[4 * l] + x[4 * l + 1] * w[4 * l + 1] + x[4 * l + 2] * w[4 * l + 2]
                   + x[4 * l + 3] * w[4 * l + 3];
}

static void rows_q8(float *out, const int8_t *wq, const float *ws, const QVec *x, int n, int gs, int nrows) {
    int ng = n / gs, reached = gs >= 64 ? QLANES : 8;
    for (int r = 0; r < nrows; r++) {
        const int8_t *w = wq + (size_t)r * n;
        const float *s = ws + (size_t)r * ng;
        float acc[QLANES] = {0};
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
        if (gs % 64 == 0) {
            __m512 facc = _mm512_setzero_ps();
            for (int g = 0; g < ng; g++) {
                __m512i isum = _mm512_setzero_si512();
                for (int j = g * gs; j < (g + 1) * gs; j += 64) {
                    __m512i xv = _mm512_loadu_si512((const void *)(x->q + j));
                    __m512i wv = _mm512_loadu_si512((const void *)(w + j));
                    prefetch_ahead(w + j);
                    /* dpbusd multiplies unsigned by signed: x's sign moves onto w */
                    __m512i sw = _mm512_mask_sub_epi8(wv, _mm512_movepi8_mask(xv), _mm512_setzero_si512(), wv);
                    isum = _mm512_dpbusd_epi32(isum, _mm512_abs_epi8(xv), sw);
                }
                __m512 scale = _mm512_set1_ps(s[g] * x->s[g]);
                facc = _mm512_add_ps(facc, _mm512_mul_ps(_mm512_cvtepi32_ps(isum), scale));
            }
            _mm512_storeu_ps(acc, facc);
            out[r] = sum_lanes(acc, reached);
            continue;
        }
#endif
#if defined(__AVX2__)
        if (gs % 32 == 0) {  /* lanes 0-7 from the first 32 bytes of every 64, lanes 8-15 from the second */
            const __m256i ones = _mm256_set1_epi16(1);
            __m256 lo = _mm256_setzero_ps(), hi = _mm256_setzero_ps();
            for (int g = 0; g < ng; g++) {
                __m256i isum[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()};
                for (int j = g * gs, half = 0; j < (g + 1) * gs; j += 32, half ^= 1) {
                    __m256i xv = _mm256_loadu_si256((const __m256i *)(x->q + j));
                    __m256i wv = _mm256_loadu_si256((const __m256i *)(w + j));
                    if (!half) prefetch_ahead(w + j);
                    /* maddubs multiplies unsigned by signed; |x| <= 127 keeps its 16-bit pair sums exact */
                    __m256i p16 = _mm256_maddubs_epi16(_mm256_sign_epi8(xv, xv), _mm256_sign_epi8(wv, xv));
                    isum[half] = _mm256_add_epi32(isum[half], _mm256_madd_epi16(p16, ones));
                }
                __m256 scale = _mm256_set1_ps(s[g] * x->s[g]);
                lo = _mm256_add_ps(lo, _mm256_mul_ps(_mm256_cvtepi32_ps(isum[0]), scale));
                if (reached > 8) hi = _mm256_add_ps(hi, _mm256_mul_ps(_mm256_cvtepi32_ps(isum[1]), scale));
            }
            _mm256_storeu_ps(acc, lo);
            _mm256_storeu_ps(acc + 8, hi);
            out[r] = sum_lanes(acc, reached);
            continue;
        }
#endif
        if (gs % 32) {  /* the 260K shape's groups of 4, say: one running sum */
            float val = 0.0f;
            for (int g = 0; g < ng; g++) {
                int32_t isum = 0;
                for (int j = g * gs; j < (g + 1) * gs; j++) isum += (int32_t)x->q[j] * (int32_t)w[j];
                val += (float)isum * (s[g] * x->s[g]);
            }
            out[r] = val;
            continue;
        }
        for (int g = 0; g < ng; g++) {
            int32_t lane[QLANES] = {0};
            int j = g * gs, end = (g + 1) * gs;
            for (; j + 4 * QLANES <= end; j += 4 * QLANES) add_to_lanes(lane, x->q + j, w + j, QLANES);
            if (j < end) add_to_lanes(lane, x->q + j, w + j, 8);  /* a group's last 32 bytes: 32, 96, 160... */
            float scale = s[g] * x->s[g];
            for (int l = 0; l < reached; l++) acc[l] += (float)lane[l] * scale;
        }
        out[r] = sum_lanes(acc, reached);
    }
}

/* e^x within about 2 ulp (x clamped to [-87, 88]): round(x / ln 2) powers of two times a polynomial. The
   scalar and the 8-lane versions do the same operations, so every build gets the same bits. The clamps are
   written so that NaN (from a corrupt model file) becomes -87: converting NaN to an integer is undefined. */
static inline float exp1(float x) {
    x = x > -87.0f ? x : -87.0f;
    x = x < 88.0f ? x : 88.0f;
    float n = (x * 1.44269504f + 12582912.0f) - 12582912.0f;  /* round to nearest: 1.5 * 2^23 */
    float r = (x - n * 0.693145751953125f) - n * 1.428606765330187e-6f;  /* ln 2 in two parts */
    float p = 1.0f + r * (1.0f + r * (0.5f + r * (1.0f / 6 + r * (1.0f / 24 + r * (1.0f / 120 + r * (1.0f / 720))))));
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

typedef int32_t v8i __attribute__((vector_size(32)));

static inline v8f splat(float a) { return (v8f){a, a, a, a, a, a, a, a}; }
#define SELECT8(mask, a, b) ((v8f)(((v8i)(a) & (mask)) | ((v8i)(b) & ~(mask))))  /* mask ? a : b, per lane */

static inline v8f exp8(const v8f *px) {  /* vectors go by pointer: by value, the portable build's ABI differs */
    v8f x = *px;
    x = SELECT8(x > splat(-87.0f), x, splat(-87.0f));
    x = SELECT8(x < splat(88.0f), x, splat(88.0f));
    v8f n = (x * 1.44269504f + 12582912.0f) - 12582912.0f;
    v8f r = (x - n * 0.693145751953125f) - n * 1.428606765330187e-6f;
    v8f p = 1.0f + r * (1.0f + r * (0.5f + r * (1.0f / 6 + r * (1.0f / 24 + r * (1.0f / 120 + r * (1.0f / 720))))));
    v8i bits = (__builtin_convertvector(n, v8i) + 127) << 23;
    return p * (v8f)bits;
}

static float max_of(const float *x, int n) {
    float m = x[0];
    int i = 0;
    if (n >= 8) {
        v8f acc = load8(x);
        for (i = 8; i + 8 <= n; i += 8) {
            v8f v = load8(x + i);
            acc = SELECT8(v > acc, v, acc);
        }
        const float *a = (const float *)&acc;
        for (int k = 0; k < 8; k++) m = a[k] > m ? a[k] : m;
    }
    for (; i < n; i++) m = x[i] > m ? x[i] : m;
    return m;
}

static void softmax(float *x, int n) {
    float max = max_of(x, n), sum;
    v8f acc = {0};
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        v8f shifted = load8(x + i) - max, e = exp8(&shifted);
        memcpy(x + i, &e, sizeof e);
        acc += e;
    }
    sum = hsum8(&acc);
    for (; i < n; i++) sum += x[i] = exp1(x[i] - max);
    float inv = 1.0f / sum;
    for (i = 0; i < n; i++) x[i] *= inv;
}

/* SwiGLU's gate: h = silu(h) * g = h / (1 + e^-h) * g. */
static void swiglu(float *h, const float *g, int n) {
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        v8f v = load8(h + i), minus = -v, out = v / (1.0f + exp8(&minus)) * load8(g + i);
        memcpy(h + i, &out, sizeof out);
    }
    for (; i < n; i++) h[i] = h[i] / (1.0f + exp1(-h[i])) * g[i];
}

static void rmsnorm(float *out, const float *x, const float *w, int n, float eps) {
    float rstd = 1.0f / sqrtf(dot(x, x, n) / n + eps);
    for (int i = 0; i < n; i++) out[i] = (x[i] * rstd) * w[i];
}

/* ------------------------------------------------------------------------------------------ model */

typedef struct {
    int dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len;
} Config;

enum { F32, Q8 };

typedef struct {  /* a rows x cols weight matrix, fp32 or Q8_0 (int8 with one scale per group of each row) */
    int type, rows, cols;
    const float *f;
    const int8_t *q;
    const float *s;
} Matrix;

typedef struct {
    const float *rms_att, *rms_ffn;
    Matrix wq, wk, wv, wo, w1, w2, w3;
} Layer;

typedef struct {
    Config c;
    int version, group_size, head_size, kv_dim;
    unsigned flags;
    float norm_eps;
    uint32_t tokenizer_crc;  /* CRC-32 of the tokenizer .bin the model was exported with; 0 = not recorded */
    Layer *layers;
    const float *rms_final;
    Matrix emb, wcls;
    float *rope_cos, *rope_sin;  /* (seq_len, head_size/2), as model.rope_tables computes them */
    void *map;  /* the file, memory-mapped; or NULL once copied into huge pages */
    size_t map_size;
    void *copy;
    void **owned;  /* buffers made at load time: realigned scales, dequantised straddling tensors */
    int n_owned;
} Model;

typedef struct {  /* a bounds-checked walk over the mapped file; past the end it only counts */
    const unsigned char *base;
    size_t off, size;
} Cursor;

static const void *take(Cursor *cur, size_t nbytes) {
    const void *p = cur->off + nbytes <= cur->size ? cur->base + cur->off : NULL;
    cur->off += nbytes;
    return p;
}

static void *own(Model *m, size_t n, size_t size) {
    void *p = xcalloc(n, size);
    m->owned = xrealloc(m->owned, (m->n_owned + 1) * sizeof(void *));
    m->owned[m->n_owned++] = p;
    return p;
}

static Matrix f32_matrix(Cursor *cur, int rows, int cols) {
    Matrix w = {F32, rows, cols, take(cur, (size_t)rows * cols * sizeof(float)), NULL, NULL};
    return w;
}

/* A Q8_0 tensor as llama2.c lays it out: the int8 values, then one fp32 scale per group of the flattened
   tensor. Groups that run across rows (llama2.c's export when group_size does not divide the row length)
   are dequantised to fp32 once loading is done; scales that the int8 bytes left unaligned are copied. */
static Matrix q8_matrix(Cursor *cur, int rows, int cols, int gs) {
    size_t n = (size_t)rows * cols;
    Matrix w = {Q8, rows, cols, NULL, take(cur, n), take(cur, n / gs * sizeof(float))};
    return w;
}

static void fix_q8(Model *m, Matrix *w) {
    if (w->type != Q8) return;
    size_t n = (size_t)w->rows * w->cols, gs = m->group_size;
    if (w->cols % gs) {
        float *f = own(m, n, sizeof(float));
        float scale;
        for (size_t i = 0; i < n; i++) {
            memcpy(&scale, (const char *)w->s + i / gs * sizeof(float), sizeof scale);
            f[i] = w->q[i] * scale;
        }
        w->type = F32, w->f = f;
    } else if ((uintptr_t)w->s % sizeof(float)) {
        float *s = own(m, n / gs, sizeof(float));
        memcpy(s, w->s, n / gs * sizeof(float));
        w->s = s;
    }
}

static void check_config(const Config *c, const char *path) {
    const int LIMIT = 1 << 20;  /* far above any model this program can hold, and keeps size sums in 64 bits */
    if (c->dim <= 0 || c->hidden_dim <= 0 || c->n_layers <= 0 || c->n_heads <= 0 || c->n_kv_heads <= 0 ||
        c->vocab_size <= 0 || c->seq_len <= 0 || c->dim > LIMIT || c->hidden_dim > LIMIT || c->n_layers > 4096 ||
        c->vocab_size > 16 * LIMIT || c->seq_len > LIMIT)
        die("%s: header shapes are out of range (dim %d, hidden %d, layers %d, heads %d, kv heads %d, vocab %d, "
            "seq_len %d); is it a model .bin written by export.py?", path, c->dim, c->hidden_dim, c->n_layers,
            c->n_heads, c->n_kv_heads, c->vocab_size, c->seq_len);
    if (c->dim % c->n_heads || c->n_heads % c->n_kv_heads || (c->dim / c->n_heads) % 2)
        die("%s: inconsistent header: dim %d, %d heads, %d kv heads (need heads | dim, kv heads | heads, "
            "even head size)", path, c->dim, c->n_heads, c->n_kv_heads);
    if (c->vocab_size < 3) die("%s: vocabulary of %d tokens is too small (BOS and EOS are ids 1 and 2)", path, c->vocab_size);
}

/* Point the weights of m into the file image at b (size bytes, header already read): false if the sizes
   the header implies do not add up to the file's, with the expected size in *expected. */
static int map_weights(Model *m, const unsigned char *b, size_t size, size_t header, int shared, size_t *expected) {
    const Config *c = &m->c;
    int L = c->n_layers, dim = c->dim, hid = c->hidden_dim, gs = m->group_size;
    Cursor cur = {b, header, size};
    const float *rms_att, *rms_ffn = NULL;
    if (m->version == 0) {
        m->emb = f32_matrix(&cur, c->vocab_size, dim);
        rms_att = take(&cur, (size_t)L * dim * sizeof(float));
    } else {
        rms_att = take(&cur, (size_t)L * dim * sizeof(float));
        rms_ffn = take(&cur, (size_t)L * dim * sizeof(float));
        m->rms_final = take(&cur, (size_t)dim * sizeof(float));
        m->emb = m->version == 1 ? f32_matrix(&cur, c->vocab_size, dim) : q8_matrix(&cur, c->vocab_size, dim, gs);
    }
    /* the per-layer matrices come kind by kind: every layer's wq, then every layer's wk, ... */
    size_t kinds[7] = {offsetof(Layer, wq), offsetof(Layer, wk), offsetof(Layer, wv), offsetof(Layer, wo),
                       offsetof(Layer, w1), offsetof(Layer, w2), offsetof(Layer, w3)};
    int shape[7][2] = {{dim, dim}, {m->kv_dim, dim}, {m->kv_dim, dim}, {dim, dim}, {hid, dim}, {dim, hid}, {hid, dim}};
    for (int k = 0; k < 7; k++) {
        if (m->version == 0 && k == 4) rms_ffn = take(&cur, (size_t)L * dim * sizeof(float));
        for (int l = 0; l < L; l++) {
            Matrix *w = (Matrix *)((char *)&m->layers[l] + kinds[k]);
            *w = m->version == 2 ? q8_matrix(&cur, shape[k][0], shape[k][1], gs)
                                 : f32_matrix(&cur, shape[k][0], shape[k][1]);
        }
    }
    if (m->version == 0) {
        m->rms_final = take(&cur, (size_t)dim * sizeof(float));
        take(&cur, (size_t)c->seq_len * m->head_size * sizeof(float));  /* RoPE tables; we compute our own */
    }
    if (shared) m->wcls = m->emb;
    else m->wcls = m->version == 2 ? q8_matrix(&cur, c->vocab_size, dim, gs) : f32_matrix(&cur, c->vocab_size, dim);
    *expected = cur.off;
    if (cur.off != size) return 0;
    for (int l = 0; l < L; l++) {
        m->layers[l].rms_att = rms_att + (size_t)l * dim;
        m->layers[l].rms_ffn = rms_ffn + (size_t)l * dim;
    }
    return 1;
}

/* Batch-1 decoding reads every weight once per token; on 4 KB pages that is a TLB miss every 4 KB. Where the
   kernel offers transparent huge pages, a copy of the file in 2 MB pages is faster (+24% measured on the 15M
   shape); NULL where it is not available, or the model would take over half the memory. */
static void *huge_page_copy(int fd, size_t size) {
#if defined(MADV_HUGEPAGE)
    size_t huge = (size_t)2 << 20, cap = (size + huge - 1) / huge * huge;
    long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
    if (pages <= 0 || page <= 0 || cap > (size_t)pages * (size_t)page / 2) return NULL;
    char *copy = aligned_alloc(huge, cap);
    if (!copy) return NULL;
    if (madvise(copy, cap, MADV_HUGEPAGE) != 0) { free(copy); return NULL; }
    for (size_t off = 0; off < size;) {  /* read(), not a copy of the mapping: no page faults on the file */
        ssize_t n = pread(fd, copy + off, size - off < huge * 32 ? size - off : huge * 32, (off_t)off);
        if (n <= 0) { free(copy); return NULL; }
        off += (size_t)n;
    }
    return copy;
#else
    (void)fd, (void)size;
    return NULL;
#endif
}

static void load_model(Model *m, const char *path) {
    memset(m, 0, sizeof *m);
    int fd = open(path, O_RDONLY);
    if (fd < 0) die("cannot open model %s", path);
    size_t size = regular_file_size(fd, path);
    if (size < 7 * sizeof(int)) die("%s has %zu bytes: too small to be a model", path, size);
    void *map = mmap(NULL, size, PROT_READ, MAP_PRIVATE, fd, 0);
    if (map == MAP_FAILED) die("cannot memory-map %s", path);
    m->map = map, m->map_size = size;
    const unsigned char *b = map;
    uint32_t magic;
    memcpy(&magic, b, 4);
    int shared = 1, gs = 0;
    size_t header;
    m->norm_eps = 1e-5f;
    if (magic == MAGIC) {
        if (size < 256) die("%s has %zu bytes: shorter than its 256-byte header", path, size);
        memcpy(&m->version, b + 4, 4);
        if (m->version != 1 && m->version != 2)
            die("%s is model format version %d; this run.c reads versions 0, 1 and 2", path, m->version);
        memcpy(&m->c, b + 8, sizeof(Config));
        shared = b[36];
        if (shared > 1) die("%s: corrupt header (shared-classifier byte is %d)", path, shared);
        if (m->version == 2) {
            memcpy(&gs, b + 37, 4);
            if (gs <= 0 || gs > (1 << 16)) die("%s: corrupt header (group size %d)", path, gs);
        }
        memcpy(&m->flags, b + 64, 4);
        float eps;
        memcpy(&eps, b + 68, 4);
        if (eps != 0.0f) {
            if (!(eps > 0.0f && eps < 1.0f)) die("%s: corrupt header (norm_eps %g)", path, eps);
            m->norm_eps = eps;
        }
        memcpy(&m->tokenizer_crc, b + 72, 4);
        header = 256;
    } else {  /* version 0, llama2.c's legacy layout: seven ints, a negative vocab meaning an unshared classifier */
        m->version = 0;
        memcpy(&m->c, b, sizeof(Config));
        if (m->c.vocab_size < 0 && m->c.vocab_size > -(1 << 30)) shared = 0, m->c.vocab_size = -m->c.vocab_size;
        header = 7 * sizeof(int);
    }
    Config *c = &m->c;
    check_config(c, path);
    m->head_size = c->dim / c->n_heads;
    m->kv_dim = c->n_kv_heads * m->head_size;
    m->group_size = gs;
    if (m->version == 2) {
        size_t numels[] = {(size_t)c->vocab_size * c->dim, (size_t)c->dim * c->dim, (size_t)m->kv_dim * c->dim,
                           (size_t)c->hidden_dim * c->dim};
        for (int i = 0; i < 4; i++)
            if (numels[i] % gs)
                die("%s: group size %d does not divide a tensor of %zu values; the file is corrupt", path, gs, numels[i]);
    }
    m->layers = xcalloc(c->n_layers, sizeof(Layer));
    size_t expected;
    if (!map_weights(m, b, size, header, shared, &expected))
        die("%s has %zu bytes but its header (version %d, dim %d, hidden %d, %d layers, vocab %d, seq_len %d) "
            "describes %zu; the file is truncated or not what the header says", path, size, m->version, c->dim,
            c->hidden_dim, c->n_layers, c->vocab_size, c->seq_len, expected);
    void *copy = huge_page_copy(fd, size);
    close(fd);
    if (copy) {
        munmap(map, size);
        m->map = NULL, m->copy = copy;
        map_weights(m, copy, size, header, shared, &expected);
    }
    for (int l = 0; l < c->n_layers; l++) {
        Layer *ly = &m->layers[l];
        Matrix *ws[] = {&ly->wq, &ly->wk, &ly->wv, &ly->wo, &ly->w1, &ly->w2, &ly->w3};
        for (int k = 0; k < 7; k++) fix_q8(m, ws[k]);
    }
    fix_q8(m, &m->emb);
    if (shared) m->wcls = m->emb;
    else fix_q8(m, &m->wcls);
    int half = m->head_size / 2;
    m->rope_cos = xcalloc((size_t)c->seq_len * half, sizeof(float));
    m->rope_sin = xcalloc((size_t)c->seq_len * half, sizeof(float));
    for (int i = 0; i < half; i++) {
        float freq = 1.0f / powf(10000.0f, (float)(2 * i) / (float)m->head_size);
        for (int p = 0; p < c->seq_len; p++) {
            float angle = (float)p * freq;
            m->rope_cos[(size_t)p * half + i] = cosf(angle);
            m->rope_sin[(size_t)p * half + i] = sinf(angle);
        }
    }
}

static void free_model(Model *m) {
    for (int i = 0; i < m->n_owned; i++) free(m->owned[i]);
    free(m->owned);
    free(m->layers);
    free(m->rope_cos);
    free(m->rope_sin);
    if (m->map) munmap(m->map, m->map_size);
    free(m->copy);
}

/* ------------------------------------------------------------------------------------------ forward pass */

typedef struct {
    float *x, *xb, *xb2, *hb, *hb2, *q, *k, *v, *att, *logits;
    float *key_cache, *value_cache;  /* (layer, kv head, position, head_size): a head's keys lie contiguous */
    QVec xq;  /* the current matmul input, quantised, for Q8 weights */
} RunState;

static void alloc_state(RunState *s, const Model *m) {
    const Config *c = &m->c;
    int widest = c->dim > c->hidden_dim ? c->dim : c->hidden_dim;
    s->x = xcalloc(c->dim, sizeof(float));
    s->xb = xcalloc(c->dim, sizeof(float));
    s->xb2 = xcalloc(c->dim, sizeof(float));
    s->hb = xcalloc(c->hidden_dim, sizeof(float));
    s->hb2 = xcalloc(c->hidden_dim, sizeof(float));
    s->q = xcalloc(c->dim, sizeof(float));
    s->k = xcalloc(m->kv_dim, sizeof(float));
    s->v = xcalloc(m->kv_dim, sizeof(float));
    s->att = xcalloc((size_t)c->n_heads * c->seq_len, sizeof(float));
    s->logits = xcalloc(c->vocab_size, sizeof(float));
    s->key_cache = xcalloc((size_t)c->n_layers * c->seq_len * m->kv_dim, sizeof(float));
    s->value_cache = xcalloc((size_t)c->n_layers * c->seq_len * m->kv_dim, sizeof(float));
    s->xq.q = xcalloc(widest, 1);
    s->xq.s = xcalloc(widest, sizeof(float));
}

static void free_state(RunState *s) {
    void *ps[] = {s->x, s->xb, s->xb2, s->hb, s->hb2, s->q, s->k, s->v, s->att, s->logits, s->key_cache,
                  s->value_cache, s->xq.q, s->xq.s};
    for (size_t i = 0; i < sizeof ps / sizeof *ps; i++) free(ps[i]);
}

typedef struct { const Matrix *w; float *out; } Job;

/* out = w @ x for up to three matrices sharing the input x, in one parallel loop over blocks of rows. */
static void matmul(const Job *jobs, int n_jobs, const float *x, RunState *s, int gs) {
    enum { BLOCK = 4 };
    int first_block[4] = {0};
    for (int j = 0; j < n_jobs; j++) first_block[j + 1] = first_block[j] + (jobs[j].w->rows + BLOCK - 1) / BLOCK;
    int any_q8 = 0;
    for (int j = 0; j < n_jobs; j++) any_q8 |= jobs[j].w->type == Q8;
    if (any_q8) quantize(&s->xq, x, jobs[0].w->cols, gs);
    const QVec *xq = &s->xq;
    int total = first_block[n_jobs], big = (long long)total * BLOCK * jobs[0].w->cols >= BIG_WORK;
    (void)big;
    PARALLEL_FOR_IF_BIG
    for (int blk = 0; blk < total; blk++) {
        int j = 0;
        while (blk >= first_block[j + 1]) j++;
        const Matrix *w = jobs[j].w;
        int r0 = (blk - first_block[j]) * BLOCK;
        int nrows = w->rows - r0 < BLOCK ? w->rows - r0 : BLOCK;
        if (w->type == F32) rows_f32(jobs[j].out + r0, w->f + (size_t)r0 * w->cols, x, w->cols, nrows);
        else rows_q8(jobs[j].out + r0, w->q + (size_t)r0 * w->cols, w->s + (size_t)r0 * (w->cols / gs), xq,
                     w->cols, gs, nrows);
    }
}

/* out = sum over t of weight[t] * rows[t] (n rows of width w), summed in order of t; 32 columns at a time are
   kept in registers while the rows stream past, rather than read and written back for every row. */
static void weighted_sum(float *out, const float *weight, const float *rows, int n, int w) {
    int i = 0;
    for (; i + 32 <= w; i += 32) {
        v8f a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
        for (int t = 0; t < n; t++) {
            const float *r = rows + (size_t)t * w + i;
            v8f wt = splat(weight[t]);
            a0 += wt * load8(r), a1 += wt * load8(r + 8), a2 += wt * load8(r + 16), a3 += wt * load8(r + 24);
        }
        memcpy(out + i, &a0, sizeof a0), memcpy(out + i + 8, &a1, sizeof a1);
        memcpy(out + i + 16, &a2, sizeof a2), memcpy(out + i + 24, &a3, sizeof a3);
    }
    for (; i + 8 <= w; i += 8) {
        v8f a0 = {0};
        for (int t = 0; t < n; t++) a0 += splat(weight[t]) * load8(rows + (size_t)t * w + i);
        memcpy(out + i, &a0, sizeof a0);
    }
    for (; i < w; i++) {
        float a = 0;
        for (int t = 0; t < n; t++) a += weight[t] * rows[(size_t)t * w + i];
        out[i] = a;
    }
}

static void rope(float *v, int n, int head_size, const float *cos_row, const float *sin_row) {
    for (int i = 0; i < n; i += 2) {
        int f = (i % head_size) / 2;
        float v0 = v[i], v1 = v[i + 1];
        v[i] = v0 * cos_row[f] - v1 * sin_row[f];
        v[i + 1] = v0 * sin_row[f] + v1 * cos_row[f];
    }
}

static void embed(const Model *m, int token, float *x) {
    const Matrix *e = &m->emb;
    size_t off = (size_t)token * e->cols;
    if (e->type == F32) memcpy(x, e->f + off, e->cols * sizeof(float));
    else for (int i = 0; i < e->cols; i++) x[i] = e->q[off + i] * e->s[(off + i) / m->group_size];
}

/* Run token at pos through the model, filling the KV cache; the logits of the next token (NULL without
   want_logits: a prompt token whose successor is known needs no classifier). */
static float *forward(const Model *m, RunState *s, int token, int pos, int want_logits) {
    const Config *c = &m->c;
    int dim = c->dim, hs = m->head_size, kv_dim = m->kv_dim, gs = m->group_size, half = hs / 2;
    int kv_mul = c->n_heads / c->n_kv_heads;
    embed(m, token, s->x);
    for (int l = 0; l < c->n_layers; l++) {
        const Layer *ly = &m->layers[l];
        rmsnorm(s->xb, s->x, ly->rms_att, dim, m->norm_eps);
        Job qkv[3] = {{&ly->wq, s->q}, {&ly->wk, s->k}, {&ly->wv, s->v}};
        matmul(qkv, 3, s->xb, s, gs);
        rope(s->q, dim, hs, m->rope_cos + (size_t)pos * half, m->rope_sin + (size_t)pos * half);
        rope(s->k, kv_dim, hs, m->rope_cos + (size_t)pos * half, m->rope_sin + (size_t)pos * half);
        size_t head_stride = (size_t)c->seq_len * hs, layer_off = (size_t)l * c->n_kv_heads * head_stride;
        for (int g = 0; g < c->n_kv_heads; g++) {
            size_t at = layer_off + g * head_stride + (size_t)pos * hs;
            memcpy(s->key_cache + at, s->k + g * hs, hs * sizeof(float));
            memcpy(s->value_cache + at, s->v + g * hs, hs * sizeof(float));
        }
        float inv_sqrt = 1.0f / sqrtf((float)hs);
        int n_heads = c->n_heads, big = n_heads * (pos + 1) * hs >= BIG_WORK;
        (void)big;
        PARALLEL_FOR_IF_BIG
        for (int h = 0; h < n_heads; h++) {
            const float *qh = s->q + h * hs;
            size_t kv_off = layer_off + (h / kv_mul) * head_stride;
            const float *keys = s->key_cache + kv_off, *values = s->value_cache + kv_off;
            float *att = s->att + (size_t)h * c->seq_len;
            /* keys first: dot reads ahead of its first argument, here the keys streaming past */
            for (int t = 0; t <= pos; t++) att[t] = dot(keys + (size_t)t * hs, qh, hs) * inv_sqrt;
            softmax(att, pos + 1);
            weighted_sum(s->xb + h * hs, att, values, pos + 1, hs);
        }
        Job wo = {&ly->wo, s->xb2};
        matmul(&wo, 1, s->xb, s, gs);
        for (int i = 0; i < dim; i++) s->x[i] += s->xb2[i];
        rmsnorm(s->xb, s->x, ly->rms_ffn, dim, m->norm_eps);
        Job w13[2] = {{&ly->w1, s->hb}, {&ly->w3, s->hb2}};
        matmul(w13, 2, s->xb, s, gs);
        swiglu(s->hb, s->hb2, c->hidden_dim);
        Job w2 = {&ly->w2, s->xb};
        matmul(&w2, 1, s->hb, s, gs);
        for (int i = 0; i < dim; i++) s->x[i] += s->xb[i];
    }
    if (!want_logits) return NULL;
    rmsnorm(s->x, s->x, m->rms_final, dim, m->norm_eps);
    Job cls = {&m->wcls, s->logits};
    matmul(&cls, 1, s->x, s, gs);
    return s->logits;
}

/* ------------------------------------------------------------------------------------------ tokenizer */

typedef struct {
    int bos, eos, unk, has_bytes;
    char **piece;  /* NUL-terminated copies */
    int *len;
    float *score;
    int *sorted;  /* ids of the pieces text can merge into, sorted by bytes, for lookup */
    int n_sorted;
    int byte_id[256];
    int strip_spaces, dummy_prefix;
    char *blob;
} Tokenizer;

static const Tokenizer *sort_ctx;

static int cmp_bytes(const char *a, int na, const char *b, int nb) {
    int c = memcmp(a, b, na < nb ? na : nb);
    return c ? c : (na > nb) - (na < nb);
}

static int cmp_ids(const void *a, const void *b) {
    int x = *(const int *)a, y = *(const int *)b;
    return cmp_bytes(sort_ctx->piece[x], sort_ctx->len[x], sort_ctx->piece[y], sort_ctx->len[y]);
}

static int lookup(const Tokenizer *t, const char *s, int n) {
    int lo = 0, hi = t->n_sorted;
    while (lo < hi) {
        int mid = (lo + hi) / 2, id = t->sorted[mid];
        int c = cmp_bytes(t->piece[id], t->len[id], s, n);
        if (c == 0) return id;
        if (c < 0) lo = mid + 1;
        else hi = mid;
    }
    return -1;
}

static int byte_piece(const char *p, int n) {  /* "<0xAB>" -> 0xAB, else -1 */
    if (n != 6 || memcmp(p, "<0x", 3) || p[5] != '>' || !isxdigit((unsigned char)p[3]) || !isxdigit((unsigned char)p[4]))
        return -1;
    return (int)strtol((char[]){p[3], p[4], 0}, NULL, 16);
}

static uint32_t crc32_of(const unsigned char *p, size_t n) {  /* zlib's CRC-32, bit by bit */
    uint32_t c = 0xFFFFFFFFu;
    while (n--) {
        c ^= *p++;
        for (int k = 0; k < 8; k++) c = (c >> 1) ^ (0xEDB88320u & (0u - (c & 1u)));
    }
    return ~c;
}

static void load_tokenizer(Tokenizer *t, const char *path, const Model *m, const char *model_path) {
    int vocab_size = m->c.vocab_size;
    memset(t, 0, sizeof *t);
    FILE *f = fopen(path, "rb");
    if (!f) die("cannot open tokenizer %s (make it with: python tokenizer.py --tokenizer-model=PATH.model)", path);
    size_t size = regular_file_size(fileno(f), path);
    unsigned char *data = xrealloc(NULL, size);
    if (fread(data, 1, size, f) != size) die("cannot read %s", path);
    fclose(f);
    if (size < 4) die("%s is not a tokenizer .bin (%zu bytes)", path, size);
    uint32_t max_len;
    memcpy(&max_len, data, 4);
    /* count the entries first: the file does not store its size, and a wrong vocabulary must be an error */
    size_t off = 4, count = 0;
    while (off < size) {
        int32_t n;
        if (size - off < 8) die("%s is truncated or not a tokenizer .bin (entry %zu is cut short)", path, count);
        memcpy(&n, data + off + 4, 4);
        if (n < 0 || (uint32_t)n > max_len)
            die("%s is corrupt: token %zu has length %d (longest allowed %u)", path, count, n, max_len);
        if ((size_t)n > size - off - 8) die("%s is truncated: token %zu is cut short", path, count);
        off += 8 + (size_t)n;
        count++;
    }
    if (count != (size_t)vocab_size)
        die("tokenizer %s has %zu tokens but the model has %d; use the tokenizer the model was trained with",
            path, count, vocab_size);
    if (m->tokenizer_crc && crc32_of(data, size) != m->tokenizer_crc)
        die("tokenizer %s is not the one %s was exported with (same %d tokens, other pieces or scores); use the "
            "tokenizer the model was trained with", path, model_path, vocab_size);
    t->piece = xcalloc(vocab_size, sizeof(char *));
    t->len = xcalloc(vocab_size, sizeof(int));
    t->score = xcalloc(vocab_size, sizeof(float));
    t->sorted = xcalloc(vocab_size, sizeof(int));
    t->blob = xcalloc(size, 1);  /* pieces plus their terminators fit in the file's own size */
    t->bos = 1, t->eos = 2, t->unk = 0;
    for (int i = 0; i < 256; i++) t->byte_id[i] = -1;
    char *dst = t->blob;
    off = 4;
    for (int i = 0; i < vocab_size; i++) {
        memcpy(&t->score[i], data + off, 4);
        memcpy(&t->len[i], data + off + 4, 4);
        memcpy(dst, data + off + 8, t->len[i]);
        dst[t->len[i]] = 0;
        t->piece[i] = dst;
        dst += t->len[i] + 1;
        off += 8 + t->len[i];
    }
    free(data);
    for (int i = 0; i < vocab_size; i++) {
        const char *p = t->piece[i];
        int b = byte_piece(p, t->len[i]);
        if (b >= 0) { t->byte_id[b] = i, t->has_bytes = 1; continue; }
        if (!strcmp(p, "\n<s>\n")) { t->bos = i; continue; }
        if (!strcmp(p, "\n</s>\n")) { t->eos = i; continue; }
        if (!strcmp(p, "<unk>")) { t->unk = i; continue; }
        if (t->len[i] > 0) t->sorted[t->n_sorted++] = i;
    }
    sort_ctx = t;
    qsort(t->sorted, t->n_sorted, sizeof(int), cmp_ids);
}

static void free_tokenizer(Tokenizer *t) {
    free(t->piece), free(t->len), free(t->score), free(t->sorted), free(t->blob);
}

typedef struct { float score; int start, left, right, left_len, right_len, id; } Pair;

static int pair_before(const Pair *a, const Pair *b) {  /* higher score first, then leftmost: sentencepiece's order */
    return a->score > b->score || (a->score == b->score && a->start < b->start);
}

static void heap_push(Pair *h, int *n, Pair p) {
    int i = (*n)++;
    while (i > 0 && pair_before(&p, &h[(i - 1) / 2])) h[i] = h[(i - 1) / 2], i = (i - 1) / 2;
    h[i] = p;
}

static Pair heap_pop(Pair *h, int *n) {
    Pair top = h[0], last = h[--*n];
    int i = 0;
    for (;;) {
        int c = 2 * i + 1;
        if (c >= *n) break;
        if (c + 1 < *n && pair_before(&h[c + 1], &h[c])) c++;
        if (!pair_before(&h[c], &last)) break;
        h[i] = h[c], i = c;
    }
    if (*n > 0) h[i] = last;
    return top;
}

/* Sentencepiece's BPE encoding of text: normalise spaces as the model's tokenizer does, split into UTF-8
   characters, merge the best-scoring adjacent pair until none is a piece, and spell out unknown characters
   as byte tokens. Returns the number of ids written to *out (allocated). */
static int encode(const Tokenizer *t, const char *text, int bos, int eos, int **out) {
    /* sentencepiece's normaliser: with remove_extra_whitespaces it drops leading spaces and repeats of a
       space, then every trailing space mark (the dummy prefix and U+2581 included); U+2581 in the text is
       itself a space mark, which we spell ' ' like the pieces of the .bin */
    size_t n = strlen(text), src = 0, m = 0;
    char *norm = xcalloc(n + 2, 1);
    if (n > 0) {  /* empty text gets no dummy prefix either */
        if (t->strip_spaces) while (text[src] == ' ') src++;
        if (t->dummy_prefix) norm[m++] = ' ';
        int prev_space = t->strip_spaces;
        for (; src < n; src++) {
            const unsigned char *c = (const unsigned char *)text + src;
            if (t->strip_spaces && prev_space && c[0] == ' ') continue;
            prev_space = c[0] == ' ';
            if (src + 2 < n && c[0] == 0xE2 && c[1] == 0x96 && c[2] == 0x81) norm[m++] = ' ', src += 2;
            else norm[m++] = (char)c[0];
        }
        if (t->strip_spaces) while (m > 0 && norm[m - 1] == ' ') m--;
    }
    int *start = xcalloc(m + 1, sizeof(int)), *len = xcalloc(m + 1, sizeof(int)), *id = xcalloc(m + 1, sizeof(int));
    int *prev = xcalloc(m + 1, sizeof(int)), *next = xcalloc(m + 1, sizeof(int));
    int ns = 0;
    for (size_t i = 0; i < m;) {
        unsigned char c = (unsigned char)norm[i];
        int cl = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 1;
        if (i + cl > m) cl = 1;
        for (int k = 1; k < cl; k++)
            if (((unsigned char)norm[i + k] >> 6) != 2) { cl = 1; break; }  /* invalid UTF-8: one byte */
        start[ns] = (int)i, len[ns] = cl, id[ns] = lookup(t, norm + i, cl);
        prev[ns] = ns - 1, next[ns] = ns + 1;
        ns++, i += cl;
    }
    Pair *heap = xcalloc(3 * (size_t)ns + 1, sizeof(Pair));
    int nh = 0;
#define TRY_PAIR(a, b)                                                                      \
    do {                                                                                    \
        if ((a) >= 0 && (b) < ns) {                                                         \
            int pid = lookup(t, norm + start[a], len[a] + len[b]);                           \
            if (pid >= 0)                                                                   \
                heap_push(heap, &nh, (Pair){t->score[pid], start[a], a, b, len[a], len[b], pid}); \
        }                                                                                   \
    } while (0)
    for (int i = 0; i + 1 < ns; i++) TRY_PAIR(i, i + 1);
    while (nh > 0) {
        Pair p = heap_pop(heap, &nh);
        int a = p.left, b = p.right;
        if (len[a] != p.left_len || len[b] != p.right_len || next[a] != b) continue;  /* stale */
        len[a] += len[b], id[a] = p.id, len[b] = 0;
        next[a] = next[b];
        if (next[b] < ns) prev[next[b]] = a;
        TRY_PAIR(prev[a], a);
        TRY_PAIR(a, next[a]);
    }
#undef TRY_PAIR
    int *ids = xcalloc(m + 3, sizeof(int)), k = 0;  /* at most one id per byte, plus BOS and EOS */
    if (bos) ids[k++] = t->bos;
    for (int i = 0; i < ns; i = next[i]) {
        if (id[i] >= 0) ids[k++] = id[i];
        else if (!t->has_bytes) ids[k++] = t->unk;
        else for (int j = 0; j < len[i]; j++) {
            int bid = t->byte_id[(unsigned char)norm[start[i] + j]];
            ids[k++] = bid >= 0 ? bid : t->unk;
        }
    }
    if (eos) ids[k++] = t->eos;
    free(norm), free(start), free(len), free(id), free(prev), free(next), free(heap);
    *out = ids;
    return k;
}

/* The text of token after prev, as sentencepiece would print it: no space right after BOS, raw bytes for
   byte tokens (so multi-byte characters come out whole), and no stray control characters. */
static void print_token(const Tokenizer *t, int prev, int token) {
    const char *p = t->piece[token];
    int n = t->len[token];
    if (prev == t->bos && n > 0 && p[0] == ' ') p++, n--;
    int b = byte_piece(p, n);
    char byte = (char)b;
    if (b >= 0) {
        if (b < 0x80 && !isprint(b) && !isspace(b)) return;
        p = &byte, n = 1;
    }
    if (fwrite(p, 1, n, stdout) != (size_t)n || fflush(stdout) != 0)  /* a full disk, or a closed pipe */
        die("cannot write the output (%s)", strerror(errno));
}

/* ------------------------------------------------------------------------------------------ sampling */

typedef struct { float p; int i; } ProbIndex;

typedef struct {
    float temperature, topp;
    unsigned long long rng;
    ProbIndex *cand;  /* top-p candidates to sort when there are few (64 at most) */
} Sampler;

static unsigned int random_u32(unsigned long long *state) {  /* xorshift64*, as llama2.c */
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    return (unsigned int)((*state * 0x2545F4914F6CDD1Dull) >> 32);
}

static float random_f32(unsigned long long *state) { return (random_u32(state) >> 8) / 16777216.0f; }

static int argmax(const float *x, int n) {
    int best = 0;
    for (int i = 1; i < n; i++) if (x[i] > x[best]) best = i;
    return best;
}

static int cmp_prob_desc(const void *a, const void *b) {
    float x = ((const ProbIndex *)a)->p, y = ((const ProbIndex *)b)->p;
    return (x < y) - (x > y);
}

static float mass_at_least(const float *p, int n, float threshold) {  /* sum of the p[i] >= threshold */
    v8f a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}, zero = {0};
    int i = 0;
    for (; i + 32 <= n; i += 32) {  /* four accumulators hide the latency of the adds */
        v8f v0 = load8(p + i), v1 = load8(p + i + 8), v2 = load8(p + i + 16), v3 = load8(p + i + 24);
        a0 += SELECT8(v0 >= threshold, v0, zero);
        a1 += SELECT8(v1 >= threshold, v1, zero);
        a2 += SELECT8(v2 >= threshold, v2, zero);
        a3 += SELECT8(v3 >= threshold, v3, zero);
    }
    v8f acc = (a0 + a1) + (a2 + a3);
    float sum = hsum8(&acc);
    for (; i < n; i++) sum += p[i] >= threshold ? p[i] : 0.0f;
    return sum;
}

static float bits_to_float(uint32_t b) { float f; memcpy(&f, &b, sizeof f); return f; }
static uint32_t float_to_bits(float f) { uint32_t b; memcpy(&b, &f, sizeof b); return b; }

/* Top-p: draw from the most probable tokens whose mass first exceeds topp. Tokens below
   (1 - topp) / (n - 1) cannot be among them (together they hold less than 1 - topp). Usually a handful is
   left, sorted as llama2.c does. A flat distribution leaves thousands; instead of sorting them, bisection on
   the bits of a positive float (ordered like the floats) finds the threshold probability, one branch-free
   pass over the probabilities per step, and the draw takes every token at or above it. Such thresholds lie
   above the cutoff, so those passes need no list of candidates: copying one out cost more than they did. */
static int sample_topp(const float *probs, int n, float topp, Sampler *s, float coin) {
    const float cutoff = (1.0f - topp) / (n - 1);
    int m = 0;
    for (int i = 0; i < n; i++) m += probs[i] >= cutoff;
    if (m == 0) return argmax(probs, n);
    if (m <= 64) {
        ProbIndex *c = s->cand;
        for (int i = 0, k = 0; k < m; i++)
            if (probs[i] >= cutoff) c[k].p = probs[i], c[k++].i = i;
        qsort(c, m, sizeof(ProbIndex), cmp_prob_desc);
        float cumulative = 0.0f;
        int last = m - 1;
        for (int k = 0; k < m; k++) {
            cumulative += c[k].p;
            if (cumulative > topp) { last = k; break; }
        }
        float r = coin * cumulative, cdf = 0.0f;
        for (int k = 0; k <= last; k++) {
            cdf += c[k].p;
            if (r < cdf) return c[k].i;
        }
        return c[last].i;  /* rounding */
    }
    uint32_t lo = float_to_bits(cutoff), hi = float_to_bits(max_of(probs, n)) + 1;  /* mass(>= lo) > topp >= mass(>= hi) */
    while (hi - lo > 1) {
        uint32_t mid = lo + (hi - lo) / 2;
        if (mass_at_least(probs, n, bits_to_float(mid)) > topp) lo = mid;
        else hi = mid;
    }
    float threshold = bits_to_float(lo), r = coin * mass_at_least(probs, n, threshold), cdf = 0.0f;
    int k = 0, last = 0;
    for (; k + 64 <= n; k += 64) {  /* skip whole blocks below the coin */
        float block = mass_at_least(probs + k, 64, threshold);
        if (r < cdf + block) break;
        cdf += block;
    }
    for (; k < n; k++) {
        if (probs[k] < threshold) continue;
        cdf += probs[k], last = k;
        if (r < cdf) return k;
    }
    return last;  /* rounding */
}

/* Multinomial draw: find the block of 64 holding the coin, then the token within it. */
static int sample_mult(const float *probs, int n, float coin) {
    float cdf = 0.0f;
    int i = 0;
    for (; i + 64 <= n; i += 64) {
        v8f acc = {0};
        for (int k = 0; k < 64; k += 8) acc += load8(probs + i + k);
        float block = hsum8(&acc);
        if (coin < cdf + block) break;
        cdf += block;
    }
    for (; i < n; i++) {
        cdf += probs[i];
        if (coin < cdf) return i;
    }
    return n - 1;  /* rounding */
}

static int sample(Sampler *s, float *logits, int n) {
    if (s->temperature == 0.0f) return argmax(logits, n);
    /* shifted so the largest is 0 first: divided by a tiny temperature, logits would overflow to inf and NaN */
    float top = max_of(logits, n);
    for (int i = 0; i < n; i++) logits[i] = (logits[i] - top) / s->temperature;
    softmax(logits, n);
    float coin = random_f32(&s->rng);
    if (s->topp > 0.0f && s->topp < 1.0f) return sample_topp(logits, n, s->topp, s, coin);
    return sample_mult(logits, n, coin);
}

/* ------------------------------------------------------------------------------------------ generation */

typedef struct {
    const Model *m;
    RunState *s;
    const Tokenizer *t;
    Sampler *sampler;
    FILE *log;  /* -l: per step, int32 pos, token, next, then the fp32 logits */
    float *log_buf;
} Session;

/* -s 0: a seed from the clock's nanoseconds, so runs started within the same second differ (llama2.c's time(NULL)
   gives them one seed); never 0, which xorshift cannot leave. */
static unsigned long long time_seed(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return ((unsigned long long)ts.tv_sec * 1000000000ull + (unsigned long long)ts.tv_nsec) | 1;
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static int all_finite(const float *x, int n) {
    for (int i = 0; i < n; i++) if (!isfinite(x[i])) return 0;
    return 1;
}

/* Forward token at pos and choose the next one: forced (a prompt token) or sampled. */
static int step(Session *z, int token, int pos, int forced) {
    float *logits = forward(z->m, z->s, token, pos, forced < 0 || z->log);
    int vocab = z->m->c.vocab_size;
    if (logits && !all_finite(logits, vocab))
        die("the logits at position %d are not finite: the model's weights hold NaN or infinity (a training run "
            "that diverged, or a damaged file)", pos);
    if (z->log) memcpy(z->log_buf, logits, vocab * sizeof(float));
    int next = forced >= 0 ? forced : sample(z->sampler, logits, vocab);
    if (z->log) {
        int32_t rec[3] = {pos, token, next};
        if (fwrite(rec, sizeof rec, 1, z->log) != 1 || fwrite(z->log_buf, sizeof(float), vocab, z->log) != (size_t)vocab)
            die("cannot write the logits file");
    }
    return next;
}

/* Run prompt then sample until steps positions, BOS, or (with stop_eos) EOS. With echo, the prompt is
   printed too (llama2.c's generate); without, only the new text. */
static void generate(Session *z, const int *prompt, int n_prompt, int steps, int echo, int stop_eos) {
    int token = prompt[0], pos = 0;
    double start = 0.0;
    while (pos < steps) {
        int next = step(z, token, pos, pos < n_prompt - 1 ? prompt[pos + 1] : -1);
        pos++;
        int sampled = pos >= n_prompt;
        if (sampled && (next == z->t->bos || (stop_eos && next == z->t->eos))) break;
        if (echo || sampled) print_token(z->t, token, next);
        token = next;
        if (start == 0.0) start = now_s();
    }
    printf("\n");
    if (pos > 1) fprintf(stderr, "achieved tok/s: %f\n", (pos - 1) / (now_s() - start));
}

static char *read_line(const char *guide) {
    printf("%s", guide);
    fflush(stdout);
    char *line = NULL;
    size_t cap = 0;
    ssize_t n = getline(&line, &cap, stdin);
    if (n < 0) { free(line); return NULL; }
    if (n > 0 && line[n - 1] == '\n') line[n - 1] = 0;
    return line;
}

/* Llama 2 chat: [INST] (<<SYS>> system <</SYS>>) user [/INST], turns read from stdin after the first. */
static void chat(Session *z, const char *cli_user, const char *cli_system, int steps) {
    const Tokenizer *t = z->t;
    int *prompt = NULL, n_prompt = 0, user_idx = 0, user_turn = 1, next = 0, pos = 0;
    while (pos < steps) {
        if (user_turn) {
            char *system = NULL, *user;
            if (pos == 0) system = cli_system ? strdup(cli_system) : read_line("Enter system prompt (optional): ");
            user = pos == 0 && cli_user ? strdup(cli_user) : read_line("User: ");
            if (!user) { free(system); break; }
            size_t size = strlen(user) + (system ? strlen(system) : 0) + 64;
            char *text = xcalloc(size, 1);
            if (system && system[0]) snprintf(text, size, "[INST] <<SYS>>\n%s\n<</SYS>>\n\n%s [/INST]", system, user);
            else snprintf(text, size, "[INST] %s [/INST]", user);
            free(system), free(user), free(prompt);
            n_prompt = encode(t, text, 1, 0, &prompt);
            free(text);
            if (pos + n_prompt >= steps) {
                if (pos == 0 && steps < z->m->c.seq_len)
                    die("the prompt (%d token%s) fills the -n %d positions, leaving no room to answer; shorten it or "
                        "raise -n (at most %d)", n_prompt, plural(n_prompt), steps, z->m->c.seq_len);
                if (pos == 0)
                    die("the prompt (%d token%s) fills the model's context of %d; shorten it", n_prompt,
                        plural(n_prompt), steps);
                fprintf(stderr, "the conversation has reached the context of %d tokens\n", steps);
                break;
            }
            user_idx = 0, user_turn = 0;
            printf("Assistant: ");
            fflush(stdout);
        }
        int token = user_idx < n_prompt ? prompt[user_idx++] : next;
        int answered = token == t->eos;  /* the answer's EOS goes into the cache; the user speaks next */
        if (answered) user_turn = 1;
        next = step(z, token, pos, user_idx < n_prompt ? prompt[user_idx] : -1);  /* a prompt token needs no draw */
        pos++;
        if (answered) continue;  /* what the model would say after its EOS is not shown (llama2.c prints it) */
        if (user_idx >= n_prompt && next != t->eos) print_token(t, token, next);
        if (next == t->eos) printf("\n");
    }
    printf("\n");
    free(prompt);
}

/* ------------------------------------------------------------------------------------------ main */

static void usage(FILE *f) {
    fprintf(f,
            "Usage:   run <model.bin> [options]\n"
            "Example: run model.bin -z tokenizer.bin -n 256 -i \"Once upon a time\"\n"
            "Options:\n"
            "  -t <float>  temperature in [0, inf), default 1.0; 0 = greedy\n"
            "  -p <float>  p in top-p (nucleus) sampling in [0, 1], default 0.9; 0 or 1 = off\n"
            "  -s <int>    random seed, default 0 = from the time\n"
            "  -n <int>    positions to run (prompt included), default 256 (instruct: the context); 0 = the context\n"
            "  -i <string> input prompt (instruct: the instruction)\n"
            "  -z <string> tokenizer .bin, default tokenizer.bin\n"
            "  -m <string> mode: generate|instruct|chat|encode, default generate\n"
            "  -y <string> system prompt in chat mode\n"
            "  -l <string> write every step's logits to this file (debugging)\n");
}

static float parse_float(const char *s, char flag, float lo, float hi) {
    char *end;
    float v = strtof(s, &end);
    if (*s == 0 || *end != 0 || !isfinite(v) || v < lo || v > hi)
        die("-%c expects a number in [%g, %g], got '%s'", flag, lo, hi, s);
    return v;
}

static long long parse_int(const char *s, char flag, long long lo, long long hi) {
    char *end;
    errno = 0;
    long long v = strtoll(s, &end, 10);
    if (*s == 0 || isspace((unsigned char)*s) || *end != 0 || errno == ERANGE || v < lo || v > hi)
        die("-%c expects an integer in [%lld, %lld], got '%s'", flag, lo, hi, s);
    return v;
}

/* The bytes of the whitespace character (Python's str.isspace(), UTF-8) that s[0..n) is, or 0. Every such
   character is below U+3000, so three bytes at most. */
static int space_bytes(const unsigned char *s, size_t n) {
    uint32_t c;
    if (n == 1 && s[0] < 0x80) c = s[0];
    else if (n == 2 && (s[0] & 0xe0) == 0xc0 && (s[1] & 0xc0) == 0x80) c = (s[0] & 0x1fu) << 6 | (s[1] & 0x3fu);
    else if (n == 3 && (s[0] & 0xf0) == 0xe0 && (s[1] & 0xc0) == 0x80 && (s[2] & 0xc0) == 0x80)
        c = (s[0] & 0x0fu) << 12 | (s[1] & 0x3fu) << 6 | (s[2] & 0x3fu);
    else return 0;
    if ((n == 2 && c < 0x80) || (n == 3 && c < 0x800)) return 0;  /* an overlong form is not UTF-8: bytes kept */
    int space = (c >= 0x09 && c <= 0x0d) || (c >= 0x1c && c <= 0x20) || c == 0x85 || c == 0xa0 || c == 0x1680 ||
                (c >= 0x2000 && c <= 0x200a) || c == 0x2028 || c == 0x2029 || c == 0x202f || c == 0x205f ||
                c == 0x3000;
    return space ? (int)n : 0;
}

/* A copy without leading and trailing whitespace, as Python's strip(), which tokenizer.instruct_prompt uses. */
static char *strip(const char *text) {
    const unsigned char *s = (const unsigned char *)text;
    size_t n = strlen(text);
    for (int moved = 1; moved;) {
        moved = 0;
        for (size_t k = 1; k <= 3 && !moved; k++)
            if (n >= k && space_bytes(s, k)) s += k, n -= k, moved = 1;
        for (size_t k = 1; k <= 3 && !moved; k++)
            if (n >= k && space_bytes(s + n - k, k)) n -= k, moved = 1;
    }
    char *out = xcalloc(n + 1, 1);
    memcpy(out, s, n);
    return out;
}

int main(int argc, char **argv) {
    if (argc >= 2 && !strcmp(argv[1], "-h")) { usage(stdout); return 0; }
    if (argc < 2) { usage(stderr); return 2; }
    const char *model_path = argv[1], *tokenizer_path = "tokenizer.bin", *prompt = NULL, *mode = "generate";
    const char *system_prompt = NULL, *log_path = NULL;
    float temperature = 1.0f, topp = 0.9f;
    unsigned long long seed = 0;
    long long steps = -1;
    if (model_path[0] == '-') die("the first argument must be the model .bin, got option %s (see run -h)", model_path);
    for (int i = 2; i < argc; i += 2) {
        const char *flag = argv[i];
        if (!strcmp(flag, "-h")) { usage(stdout); return 0; }
        if (flag[0] != '-' || strlen(flag) != 2) die("expected an option like -t, got '%s' (see run -h)", flag);
        if (!strchr("tpsnizmyl", flag[1])) die("unknown option %s (see run -h)", flag);
        if (i + 1 >= argc) die("option %s needs a value", flag);
        const char *val = argv[i + 1];
        switch (flag[1]) {
            case 't': temperature = parse_float(val, 't', 0.0f, 1e6f); break;
            case 'p': topp = parse_float(val, 'p', 0.0f, 1.0f); break;
            case 's': seed = (unsigned long long)parse_int(val, 's', 0, (long long)(~0ull >> 1)); break;
            case 'n': steps = parse_int(val, 'n', 0, 1 << 30); break;
            case 'i': prompt = val; break;
            case 'z': tokenizer_path = val; break;
            case 'm': mode = val; break;
            case 'y': system_prompt = val; break;
            case 'l': log_path = val; break;
        }
    }
    int is_gen = !strcmp(mode, "generate"), is_instruct = !strcmp(mode, "instruct"), is_chat = !strcmp(mode, "chat");
    int is_encode = !strcmp(mode, "encode");
    if (!is_gen && !is_instruct && !is_chat && !is_encode)
        die("unknown mode '%s'; choose generate, instruct, chat or encode", mode);
    if (system_prompt && !is_chat) die("-y (system prompt) is only used with -m chat");
    if (is_instruct) {
        char *instruction = strip(prompt ? prompt : "");
        int empty = !instruction[0];
        free(instruction);
        if (empty) die("-m instruct needs the instruction: -i \"Write a story ...\"");
    }

    Model model;
    load_model(&model, model_path);
    Tokenizer tok;
    load_tokenizer(&tok, tokenizer_path, &model, model_path);
    tok.strip_spaces = (model.flags & FLAG_STRIP_SPACES) != 0;
    tok.dummy_prefix = !(model.flags & FLAG_NO_DUMMY_PREFIX);
    int seq_len = model.c.seq_len;
    if (steps > seq_len)
        die("-n %lld is beyond the model's context of %d tokens; use at most %d (0 = the context)", steps, seq_len, seq_len);
    if (steps <= 0) steps = steps == 0 || is_instruct ? seq_len : (seq_len < 256 ? seq_len : 256);

    int *tokens = NULL, n_tokens = 0;
    if (is_instruct) {
        char *text = strip(prompt);
        const char *suffix = " Possible story:";
        size_t n = strlen(text), ns = strlen(suffix);
        if (n < ns - 1 || strcmp(text + n - (ns - 1), suffix + 1)) {
            text = xrealloc(text, n + ns + 1);
            memcpy(text + n, suffix, ns + 1);
        }
        n_tokens = encode(&tok, text, 0, 0, &tokens);
        free(text);
        tokens = xrealloc(tokens, (n_tokens + 1) * sizeof(int));
        tokens[n_tokens++] = tok.bos;
    } else if (!is_chat) {
        n_tokens = encode(&tok, prompt ? prompt : "", 1, 0, &tokens);
    }
    if (is_encode) {
        for (int i = 0; i < n_tokens; i++) printf(i ? " %d" : "%d", tokens[i]);
        printf("\n");
    } else {
        if (!is_chat && n_tokens >= seq_len)
            die("the prompt (%d token%s) fills the model's context of %d; shorten it", n_tokens, plural(n_tokens),
                seq_len);
        if (!is_chat && n_tokens >= steps)
            die("the prompt (%d token%s) fills the -n %lld positions, leaving no room to generate; raise -n (at most "
                "%d)", n_tokens, plural(n_tokens), steps, seq_len);
        RunState state;
        alloc_state(&state, &model);
        Sampler sampler = {temperature, topp, seed ? seed : time_seed(), xcalloc(64, sizeof(ProbIndex))};
        Session z = {&model, &state, &tok, &sampler, NULL, NULL};
        if (log_path) {
            z.log = fopen(log_path, "wb");
            if (!z.log) die("cannot write the logits file %s", log_path);
            z.log_buf = xcalloc(model.c.vocab_size, sizeof(float));
        }
        /* a v0 file cannot say whether the model knows EOS; one that never saw it gives it ~0 probability */
        int stop_eos = model.version == 0 || (model.flags & FLAG_EOS) || is_instruct;
        if (is_chat) chat(&z, prompt, system_prompt, (int)steps);
        else generate(&z, tokens, n_tokens, (int)steps, is_gen, stop_eos);
        if (z.log && fclose(z.log) != 0) die("cannot write the logits file %s", log_path);
        free(z.log_buf);
        free(sampler.cand);
        free_state(&state);
    }
    free(tokens);
    free_tokenizer(&tok);
    free_model(&model);
    if (fflush(stdout) != 0 || ferror(stdout)) die("cannot write the output (%s)", strerror(errno));
    return 0;
}
