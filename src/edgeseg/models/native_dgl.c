/* One call per DGL site and image batch: gate, Top-r and gathers of a fused DGL site (edgeseg.models.dynamic).
 *
 * Why C: in PyTorch each site's plan is ~15 small operators (layer norm, two tiny GEMVs, top-k, offsets, five
 * gathers, scalings), each a few microseconds of dispatch that, inside a real forward pass, runs with cold caches:
 * the 16 sites of SegFormer-B0 cost 4-7 ms, more than half of what 30 % sparsity saves. Here the same arithmetic
 * runs in one loop nest. Built on first use by edgeseg/models/native.py; without a C compiler PyTorch plans.
 *
 * Semantics (must match dynamic.py's FoldedGate and top_r):
 *   x_hat = LN(mean of the input's tokens)  (no affine, biased variance, eps; pooled here, not by the caller)
 *   G     = W2 relu(W1 x_hat + b1) + b2                          (n gate logits per image)
 *   each selection takes `groups` slices of `per_group` logits from G[start:]; per slice the `keep` largest with
 *   their values, then the next `width - keep` with value 0 (padding slots). Slots are numbered selection by
 *   selection, group by group; within a group the real slots come first, then the padding ones, each in ascending
 *   index order (top_r's order differs; the order only permutes the summation). A slot's index is the logit's
 *   position in G.
 * Each output buffer holds, per image, its parts one after another; a part copies, for its range of slots, row
 * `index - offset` of its source, times the slot's gate value (scale 1), its support (scale 2: 1 real, 0 padding)
 * or 1 (scale 0).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "native_dispatch.h"

typedef struct {
    int64_t start, groups, per_group, keep, width;
} dgl_selection;

typedef struct {
    const float *src; /* (rows, row) contiguous */
    int64_t first;    /* first slot */
    int64_t count;    /* slots */
    int64_t offset;   /* source row = index - offset */
    int32_t scale;    /* 0 none, 1 gate value, 2 support */
} dgl_part;

typedef struct {
    float *dst;   /* (batch, rows, row) contiguous */
    int64_t row;  /* floats per row */
    int64_t rows; /* rows per image: the parts' counts summed */
    const dgl_part *parts;
    int64_t n_parts;
} dgl_output;

typedef struct {
    const float *w1, *b1, *w2, *b2; /* (hidden, C), (hidden), (n, hidden), (n) */
    int64_t channels, hidden, n;
    double eps;
    const dgl_selection *selections;
    int64_t n_selections;
    int64_t slots;    /* per image: groups * width summed over selections */
    float *values;    /* (batch, slots) */
    int64_t *index;   /* (batch, slots) */
    const dgl_output *outputs;
    int64_t n_outputs;
} dgl_site;

/* Whether entry a ranks above entry b: the larger value, or of equal values the lower index — the order of
 * top_r in PyTorch (a stable descending sort, NaN above every number) and of ONNX's TopK, so every path keeps the
 * same neurons even where gate values tie (a fresh gate predicts 1 for every neuron). */
static inline int ranks_above(const float *v, int32_t a, int32_t b) {
    const int na = v[a] != v[a], nb = v[b] != v[b];
    if (na || nb)
        return na && (!nb || a < b);
    return v[a] > v[b] || (v[a] == v[b] && a < b);
}

/* Move the k highest-ranked of v[idx[lo..hi)] to idx[lo..lo+k) (quickselect; distinct ranks, so the pivot is the
 * only entry neither scan passes). */
static void select_top(const float *v, int32_t *idx, int64_t lo, int64_t hi, int64_t k) {
    while (hi - lo > 1 && k > 0 && k < hi - lo) {
        const int32_t pivot = idx[lo + (hi - lo) / 2];
        int64_t i = lo, j = hi - 1;
        while (i <= j) {
            while (ranks_above(v, idx[i], pivot)) i++;
            while (ranks_above(v, pivot, idx[j])) j--;
            if (i <= j) {
                int32_t t = idx[i];
                idx[i] = idx[j];
                idx[j] = t;
                i++;
                j--;
            }
        }
        /* now [lo, j] rank at or above the pivot, [i, hi) at or below, and whatever lies between is the pivot */
        if (k <= j - lo + 1) {
            hi = j + 1;
        } else if (k >= i - lo) {
            k -= i - lo;
            lo = i;
        } else {
            return;
        }
    }
}

/* Per-channel sums of tokens [n_begin, n_end) of one image, element (n, c) at x[n * sn + c * sc]. Float partial sums
 * over runs of TOKEN_RUN tokens (vectorised over channels when they are contiguous) are added in double: the sum of
 * 16384 tokens keeps float32's precision, as torch.sum's cascade does. */
#define TOKEN_RUN 32
DISPATCHED
static void token_sums(const float *x, int64_t n_begin, int64_t n_end, int64_t sn, int64_t sc, int64_t C,
                       double *sum, float *run) {
    for (int64_t c = 0; c < C; c++) sum[c] = 0.0;
    for (int64_t n0 = n_begin; n0 < n_end; n0 += TOKEN_RUN) {
        const int64_t n1 = n0 + TOKEN_RUN < n_end ? n0 + TOKEN_RUN : n_end;
        if (sc == 1) {
            for (int64_t c = 0; c < C; c++) run[c] = 0.0f;
            for (int64_t n = n0; n < n1; n++) {
                const float *row = x + n * sn;
                for (int64_t c = 0; c < C; c++) run[c] += row[c];
            }
            for (int64_t c = 0; c < C; c++) sum[c] += run[c];
        } else {
            for (int64_t c = 0; c < C; c++) {
                const float *col = x + c * sc;
                float acc = 0.0f;
                for (int64_t n = n0; n < n1; n++) acc += col[n * sn];
                sum[c] += acc;
            }
        }
    }
}

/* Below this many floats, a site's pooling or gathers run on one thread: a parallel region costs microseconds. */
#define PARALLEL_MIN 32768

/* token_sums over all tokens, the runs split over `threads` threads, the threads' sums added in thread order
 * (partial: threads * C doubles; run: C floats, for one thread). Each thread accumulates in buffers on its own
 * stack: neighbouring threads' running sums in one allocation share cache lines, which made two threads 3x slower
 * than one. */
static void pooled_sums(const float *x, int64_t tokens, int64_t sn, int64_t sc, int64_t C, double *sum,
                        double *partial, float *run, int threads) {
    const int64_t runs = (tokens + TOKEN_RUN - 1) / TOKEN_RUN;
    if (threads > runs) threads = (int)runs;
    if (threads <= 1 || tokens * C < PARALLEL_MIN) {
        token_sums(x, 0, tokens, sn, sc, C, sum, run);
        return;
    }
#ifdef _OPENMP
#pragma omp parallel num_threads(threads)
    {
        const int64_t t = omp_get_thread_num(), n = omp_get_num_threads();
        const int64_t n0 = runs * t / n * TOKEN_RUN, n1 = runs * (t + 1) / n * TOKEN_RUN;
        double own_sum[C];
        float own_run[C];
        token_sums(x, n0, n1 < tokens ? n1 : tokens, sn, sc, C, own_sum, own_run);
        for (int64_t c = 0; c < C; c++) partial[t * C + c] = own_sum[c];
    }
    for (int64_t c = 0; c < C; c++) sum[c] = 0.0;
    for (int t = 0; t < threads; t++)
        for (int64_t c = 0; c < C; c++) sum[c] += partial[t * C + c];
#else
    (void)partial;
    token_sums(x, 0, tokens, sn, sc, C, sum, run);
#endif
}

typedef float v8f __attribute__((vector_size(32)));

/* a · b over n floats, eight lanes at a time: the gate MLP's rows are short (16-256), and a scalar sum is one chain
 * of dependent additions (the 16 gate MLPs of a B0 forward: 0.15 ms that way). */
DISPATCHED
static float dot(const float *a, const float *b, int64_t n) {
    v8f acc0 = {0}, acc1 = {0}, va, vb;
    int64_t c = 0;
    for (; c + 16 <= n; c += 16) {
        __builtin_memcpy(&va, a + c, sizeof va);
        __builtin_memcpy(&vb, b + c, sizeof vb);
        acc0 += va * vb;
        __builtin_memcpy(&va, a + c + 8, sizeof va);
        __builtin_memcpy(&vb, b + c + 8, sizeof vb);
        acc1 += va * vb;
    }
    for (; c + 8 <= n; c += 8) {
        __builtin_memcpy(&va, a + c, sizeof va);
        __builtin_memcpy(&vb, b + c, sizeof vb);
        acc0 += va * vb;
    }
    acc0 += acc1;
    float sum = ((acc0[0] + acc0[1]) + (acc0[2] + acc0[3])) + ((acc0[4] + acc0[5]) + (acc0[6] + acc0[7]));
    for (; c < n; c++) sum += a[c] * b[c];
    return sum;
}

static void gate_logits(const dgl_site *s, const double *pooled_sum, int64_t tokens, float *x, float *h, float *g) {
    const int64_t C = s->channels, H = s->hidden;
    double mean = 0.0, var = 0.0;
    for (int64_t c = 0; c < C; c++) mean += pooled_sum[c];
    mean /= (double)C * (double)tokens;
    for (int64_t c = 0; c < C; c++) {
        const double d = pooled_sum[c] / (double)tokens - mean;
        var += d * d;
    }
    const double rstd = 1.0 / sqrt(var / (double)C + s->eps);
    for (int64_t c = 0; c < C; c++) x[c] = (float)((pooled_sum[c] / (double)tokens - mean) * rstd);
    for (int64_t j = 0; j < H; j++) {
        const float acc = s->b1[j] + dot(s->w1 + j * C, x, C);
        h[j] = acc > 0.0f ? acc : 0.0f;
    }
    for (int64_t i = 0; i < s->n; i++) g[i] = s->b2[i] + dot(s->w2 + i * H, h, H);
}

/* Image b's gathered outputs: each part's rows, split over `threads` threads where there are enough floats. */
static void gather(const dgl_site *s, int64_t b, const int64_t *index, const float *values, const float *support,
                   int threads) {
    int64_t floats = 0;
    for (int64_t o = 0; o < s->n_outputs; o++) floats += s->outputs[o].rows * s->outputs[o].row;
#ifdef _OPENMP
#pragma omp parallel num_threads(threads) if (threads > 1 && floats >= PARALLEL_MIN)
#endif
    for (int64_t o = 0; o < s->n_outputs; o++) {
        const dgl_output *out = s->outputs + o;
        const int64_t row = out->row;
        float *dst = out->dst + b * out->rows * row;
        for (int64_t p = 0; p < out->n_parts; p++) {
            const dgl_part *part = out->parts + p;
#ifdef _OPENMP
#pragma omp for schedule(static) nowait
#endif
            for (int64_t j = part->first; j < part->first + part->count; j++) {
                const float *src = part->src + (index[j] - part->offset) * row;
                float *d = dst + (j - part->first) * row;
                if (part->scale == 0) {
                    memcpy(d, src, sizeof(float) * (size_t)row);
                } else {
                    const float m = part->scale == 1 ? values[j] : support[j];
                    for (int64_t c = 0; c < row; c++) d[c] = src[c] * m;
                }
            }
            dst += part->count * row;
        }
    }
    (void)floats, (void)threads;
}

/* The site's plan for a batch of inputs: image b's token (n) channel (c) at x[b * sb + n * sn + c * sc]; pooling and
 * gathers on up to `threads` threads (PyTorch's OpenMP threads, as in native_attention.c). */
int dgl_plan(const dgl_site *s, const float *input, int64_t batch, int64_t tokens, int64_t sb, int64_t sn,
             int64_t sc, int threads) {
    if (threads < 1) threads = 1;
    double *pooled_sum = malloc(sizeof(double) * (size_t)((1 + threads) * s->channels));
    float *buf = malloc(sizeof(float) * (size_t)(2 * s->channels + s->hidden + s->n + s->slots));
    int32_t *order = malloc(sizeof(int32_t) * (size_t)s->n);
    unsigned char *mark = malloc((size_t)s->n);
    if (!pooled_sum || !buf || !order || !mark) {
        free(pooled_sum);
        free(buf);
        free(order);
        free(mark);
        return 1;
    }
    float *x = buf, *h = x + s->channels, *g = h + s->hidden, *support = g + s->n, *run = support + s->slots;
    for (int64_t b = 0; b < batch; b++) {
        pooled_sums(input + b * sb, tokens, sn, sc, s->channels, pooled_sum, pooled_sum + s->channels, run, threads);
        gate_logits(s, pooled_sum, tokens, x, h, g);
        float *values = s->values + b * s->slots;
        int64_t *index = s->index + b * s->slots;
        int64_t slot = 0;
        for (int64_t k = 0; k < s->n_selections; k++) {
            const dgl_selection *sel = s->selections + k;
            for (int64_t grp = 0; grp < sel->groups; grp++) {
                const int64_t lo = sel->start + grp * sel->per_group;
                for (int64_t i = 0; i < sel->per_group; i++) order[lo + i] = (int32_t)(lo + i);
                select_top(g, order, lo, lo + sel->per_group, sel->width);
                select_top(g, order, lo, lo + sel->width, sel->keep);
                /* Emit the real slots, then the padding ones, each in ascending index order: the gathers then
                 * walk their sources forwards, which the hardware prefetcher streams (SegFormer-B0 at 30 %: the
                 * stage-4 gathers 1.3x faster than in selection order, the whole forward 1 % in an A/B run). */
                for (int64_t j = 0; j < sel->per_group; j++) mark[j] = 0;
                for (int64_t j = 0; j < sel->width; j++) mark[order[lo + j] - lo] = j < sel->keep ? 1 : 2;
                for (unsigned char kind = 1; kind <= 2; kind++) {
                    for (int64_t j = 0; j < sel->per_group; j++) {
                        if (mark[j] != kind) continue;
                        index[slot] = lo + j;
                        values[slot] = kind == 1 ? g[lo + j] : 0.0f;
                        support[slot] = (float)(kind == 1);
                        slot++;
                    }
                }
            }
        }
        gather(s, b, index, values, support, threads);
    }
    free(pooled_sum);
    free(buf);
    free(order);
    free(mark);
    return 0;
}
