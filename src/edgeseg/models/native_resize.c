/* Bilinear resizing in one pass over its output: upsampling added into an accumulator, for SegFormer's additive
 * decoder (edgeseg.models.segformer), and the labels of resized logits (edgeseg.engine.inference, below).
 *
 * Resize-and-add. Why C: the decoder sums the 1/8, 1/16 and 1/32 maps, each projected to E channels and resized to
 * the 1/4 grid. In PyTorch each resize writes an E-channel map at 1/4 resolution that the sum then reads back (three
 * 16 MB maps for B0 at 512²): memory traffic, not arithmetic. Here each output pixel's E channels are read, get the
 * four-tap interpolation of every map added, and are written once.
 *
 * Semantics: F.interpolate(mode="bilinear", align_corners=False) without scale factors, per axis: source coordinate
 * (dst + 0.5) * in / out - 0.5, clamped at 0; taps floor(src) and the next one (clamped to the last row/column);
 * weights 1 - frac and frac. All maps channels-last and contiguous: acc (batch, rows, W, C) holds output rows
 * row0 .. row0 + rows - 1 of the H x W grid; each source is (batch, h, w, C).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "native_dispatch.h"

typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

#define MAX_SOURCES 8 /* maps one call adds (native.py passes no more) */

typedef struct {
    const float *src; /* (batch, h, w, C) contiguous */
    int64_t h, w;
} resize_source;

static void taps(int64_t dst, int64_t in, int64_t out, int64_t *i0, int64_t *i1, float *w0, float *w1) {
    const float src = (float)in / (float)out * ((float)dst + 0.5f) - 0.5f;
    const float clamped = src < 0.0f ? 0.0f : src;
    const int64_t i = (int64_t)clamped;
    *i0 = i;
    *i1 = i + (i < in - 1);
    *w1 = clamped - (float)i;
    *w0 = 1.0f - *w1;
}

/* One output pixel: o[0..C) += the four taps of every source, weighted (tap[4 s + i], w[4 s + i]), then, with
 * `relu`, max(o, 0) — eight channels at a time, each read and written once whatever the number of sources. */
DISPATCHED
static void blend(float *o, const float *const *tap, const float *w, int64_t n_sources, int64_t C, int relu) {
    int64_t k = 0;
    for (; k + 8 <= C; k += 8) {
        v8f vo, v;
        __builtin_memcpy(&vo, o + k, sizeof vo);
        for (int64_t i = 0; i < 4 * n_sources; i++) {
            __builtin_memcpy(&v, tap[i] + k, sizeof v);
            vo += w[i] * v;
        }
        if (relu) { /* lanes below 0 cleared; NaN stays NaN, as in torch.relu */
            const v8f zero = {0};
            vo = (v8f)(~(vo < zero) & (v8i)vo);
        }
        __builtin_memcpy(o + k, &vo, sizeof vo);
    }
    for (; k < C; k++) {
        float acc = o[k];
        for (int64_t i = 0; i < 4 * n_sources; i++) acc += w[i] * tap[i][k];
        o[k] = relu && acc < 0.0f ? 0.0f : acc;
    }
}

typedef struct {
    int64_t x0, x1;
    float w0, w1;
} column_taps;

/* Output rows split over `threads` threads (PyTorch's OpenMP threads) once there are enough floats: on one thread a
 * band of B0's decoder at 512² (16 rows of 128 pixels, 256 channels) took 0.45 ms while the other core idled. Each
 * source's column taps are the same for every row: worked out once per call. Returns 1 when out of memory. */
int resize_add(float *acc, int64_t batch, int64_t rows, int64_t row0, int64_t H, int64_t W, int64_t C,
               const resize_source *sources, int64_t n_sources, int relu, int threads) {
    column_taps *columns = malloc(sizeof(column_taps) * (size_t)(n_sources * W + 1));
    if (columns == NULL)
        return 1;
    for (int64_t s = 0; s < n_sources; s++)
        for (int64_t x = 0; x < W; x++) {
            column_taps *t = &columns[s * W + x];
            taps(x, sources[s].w, W, &t->x0, &t->x1, &t->w0, &t->w1);
        }
#ifdef _OPENMP
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1 && batch * rows * W * C >= 32768)
#endif
    for (int64_t nr = 0; nr < batch * rows; nr++) {
        const int64_t n = nr / rows, r = nr % rows;
        const float *top[MAX_SOURCES], *bottom[MAX_SOURCES], *tap[4 * MAX_SOURCES];
        float wy[2 * MAX_SOURCES], w[4 * MAX_SOURCES];
        for (int64_t s = 0; s < n_sources; s++) {
            const resize_source *S = &sources[s];
            int64_t y0, y1;
            taps(row0 + r, S->h, H, &y0, &y1, &wy[2 * s], &wy[2 * s + 1]);
            const float *image = S->src + n * S->h * S->w * C;
            top[s] = image + y0 * S->w * C;
            bottom[s] = image + y1 * S->w * C;
        }
        float *out_row = acc + nr * W * C;
        for (int64_t x = 0; x < W; x++) {
            for (int64_t s = 0; s < n_sources; s++) {
                const column_taps *t = &columns[s * W + x];
                tap[4 * s] = top[s] + t->x0 * C, w[4 * s] = wy[2 * s] * t->w0;
                tap[4 * s + 1] = top[s] + t->x1 * C, w[4 * s + 1] = wy[2 * s] * t->w1;
                tap[4 * s + 2] = bottom[s] + t->x0 * C, w[4 * s + 2] = wy[2 * s + 1] * t->w0;
                tap[4 * s + 3] = bottom[s] + t->x1 * C, w[4 * s + 3] = wy[2 * s + 1] * t->w1;
            }
            blend(out_row + x * C, tap, w, n_sources, C, relu);
        }
    }
    free(columns);
    return 0;
}

/* Labels of resized logits: argmax over K classes of logits (batch, h, w, K) (classes contiguous, pixels and images
 * at any stride: a padded classifier's logits are a view) resized bilinearly to H1 x W1 and then to H2 x W2 (mmseg's
 * test protocol: to the network input, then to the image; H1 x W1 == H2 x W2 is one resize).
 *
 * Why: at 150 classes the resized logits of a 512 x 683 image are 210 MB that the argmax reads once; writing and
 * reading them takes longer than the network (SegFormer-B0 fused). Both resizes are linear and separable, so each
 * output pixel is a weighted sum of at most 4 x 4 input pixels, rows and columns weighted independently: a row of
 * the output blends its input rows once, then each pixel its columns, and the K sums are compared there. Ties go
 * to the lowest class, as torch.argmax; the sums round differently from two PyTorch resizes (~1e-7 relative), so a
 * label may differ where two classes are that close.
 */
#define MAX_TAPS 4
typedef struct {
    int64_t n, src[MAX_TAPS];
    float w[MAX_TAPS];
} axis_taps;

static void add_tap(axis_taps *t, int64_t src, float w) {
    for (int64_t i = 0; i < t->n; i++)
        if (t->src[i] == src) {
            t->w[i] += w;
            return;
        }
    t->src[t->n] = src;
    t->w[t->n++] = w;
}

/* Output index j of in -> mid -> out along one axis (mid == out: in -> out), as weights on input indices. */
static void compose(int64_t j, int64_t in, int64_t mid, int64_t out, axis_taps *t) {
    int64_t m[2] = {j, j};
    float u[2] = {1.0f, 0.0f};
    if (mid != out)
        taps(j, mid, out, &m[0], &m[1], &u[0], &u[1]);
    t->n = 0;
    for (int a = 0; a < 2; a++) {
        if (u[a] == 0.0f) continue;
        int64_t i0, i1;
        float v0, v1;
        taps(m[a], in, mid, &i0, &i1, &v0, &v1);
        add_tap(t, i0, u[a] * v0);
        add_tap(t, i1, u[a] * v1);
    }
}

/* dst[0..K) (=|+=) w * src[0..K) */
DISPATCHED
static void scaled(float *dst, const float *src, float w, int64_t K, int add) {
    if (add)
        for (int64_t k = 0; k < K; k++) dst[k] += w * src[k];
    else
        for (int64_t k = 0; k < K; k++) dst[k] = w * src[k];
}

/* argmax over k of sum_t w[t] * rows[t][k], k < K, n <= MAX_TAPS rows: eight classes at a time, each lane keeping
 * its first maximum, then the lanes' maxima (ties: the lowest class), then the classes after the last eight. */
DISPATCHED
static int64_t blend_argmax(const float *const *rows, const float *w, int64_t n, int64_t K) {
    float best = -INFINITY;
    int64_t arg = 0, k = 0;
    if (K >= 8) {
        v8f m;
        v8i at = {0, 1, 2, 3, 4, 5, 6, 7}, index = at;
        for (; k + 8 <= K; k += 8) {
            v8f a, x;
            __builtin_memcpy(&a, rows[0] + k, sizeof a);
            a *= w[0];
            for (int64_t t = 1; t < n; t++) {
                __builtin_memcpy(&x, rows[t] + k, sizeof x);
                a += w[t] * x;
            }
            if (k == 0) {
                m = a;
            } else {
                const v8i greater = a > m;
                m = (v8f)((greater & (v8i)a) | (~greater & (v8i)m));
                index = (greater & at) | (~greater & index);
            }
            at += 8;
        }
        best = m[0], arg = index[0];
        for (int i = 1; i < 8; i++)
            if (m[i] > best || (m[i] == best && index[i] < arg)) best = m[i], arg = index[i];
    }
    for (; k < K; k++) {
        float a = 0.0f;
        for (int64_t t = 0; t < n; t++) a += w[t] * rows[t][k];
        if (a > best || k == 0) best = a, arg = k;
    }
    return arg;
}

/* Output rows [first, last) of the batch (row r: image r / H2, row r % H2); rows: w * K floats of scratch. */
static void label_rows(const float *logits, const int64_t *stride, int64_t h, int64_t w, int64_t K, int64_t H1,
                       int64_t H2, int64_t W2, const axis_taps *cols, int64_t first, int64_t last, float *rows,
                       int64_t *labels) {
    for (int64_t r = first; r < last; r++) {
        const int64_t n = r / H2, y = r % H2;
        axis_taps t;
        compose(y, h, H1, H2, &t);
        for (int64_t x = 0; x < w; x++) /* this output row's input rows, blended: w pixels of K */
            for (int64_t a = 0; a < t.n; a++)
                scaled(rows + x * K, logits + n * stride[0] + t.src[a] * stride[1] + x * stride[2], t.w[a], K, a > 0);
        for (int64_t x = 0; x < W2; x++) {
            const axis_taps *c = cols + x;
            const float *taps_rows[MAX_TAPS];
            for (int64_t a = 0; a < c->n; a++) taps_rows[a] = rows + c->src[a] * K;
            labels[r * W2 + x] = blend_argmax(taps_rows, c->w, c->n, K);
        }
    }
}

/* Returns 0, or 1 if scratch memory ran out. */
/* stride: image, row and pixel strides of logits, in floats. */
int resize_argmax(const float *logits, const int64_t *stride, int64_t batch, int64_t h, int64_t w, int64_t K,
                  int64_t H1, int64_t W1,
                  int64_t H2, int64_t W2, int64_t *labels, int threads) {
    const int64_t rows = batch * H2;
    if (threads < 1) threads = 1;
    if (threads > rows) threads = (int)rows;
    axis_taps *cols = malloc(sizeof(axis_taps) * (size_t)W2);
    float *scratch = malloc(sizeof(float) * (size_t)(w * K * threads));
    if (cols == NULL || scratch == NULL) {
        free(cols);
        free(scratch);
        return 1;
    }
    for (int64_t x = 0; x < W2; x++) compose(x, w, W1, W2, cols + x);
#ifdef _OPENMP
#pragma omp parallel num_threads(threads)
    {
        const int64_t n = omp_get_num_threads(), id = omp_get_thread_num();
        label_rows(logits, stride, h, w, K, H1, H2, W2, cols, rows * id / n, rows * (id + 1) / n,
                   scratch + w * K * id, labels);
    }
#else
    label_rows(logits, stride, h, w, K, H1, H2, W2, cols, 0, rows, scratch, labels);
#endif
    free(cols);
    free(scratch);
    return 0;
}
