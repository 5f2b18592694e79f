/* One call per DGL site and image batch: gate, Top-r and gathers of DynaSegFormer's inference form.
 *
 * Why C: in PyTorch each site's plan is ~15 small operators (layer norm, two tiny GEMVs, top-k, offsets, five
 * gathers, scalings), each a few microseconds of dispatch that, inside a real forward pass, runs with cold caches:
 * 16 sites of SegFormer-B0 cost 4-7 ms, more than the pruning saves at 30 %. Here the same arithmetic runs in one
 * plain loop nest. Built on first use by edgeseg/models/dgl_native.py; without a C compiler the PyTorch path runs.
 *
 * Semantics (must match dynamic.py's folded gate and top_r):
 *   x_hat = LN(pooled_sum / N)  (no affine; biased variance; eps)
 *   G     = W2 relu(W1 x_hat + b1) + b2                                   (n gate logits per image)
 *   per group of n / groups entries: the `keep` largest with their values, then the next `width - keep` with
 *   value 0 (padding slots); slot order within a group is unspecified, real slots first.
 * Each segment then copies, for its range of slots, row `index - offset` of its source into consecutive rows of
 * its destination, times the slot's gate value (scale 1), its support (scale 2: 1 real, 0 padding) or 1 (scale 0).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

typedef struct {
    const float *src; /* (rows, row) contiguous */
    float *dst;       /* (batch, count, row) contiguous */
    int64_t row;      /* floats per row */
    int64_t first;    /* first slot of the image's slots this segment gathers */
    int64_t count;    /* number of slots */
    int64_t offset;   /* subtracted from the slot's index */
    int32_t scale;    /* 0 none, 1 gate value, 2 support */
} dgl_segment;

typedef struct {
    const float *w1, *b1, *w2, *b2; /* (hidden, C), (hidden), (n, hidden), (n) */
    int64_t channels, hidden, n;
    double eps;
    int64_t groups, keep, width; /* keep / width slots per group */
    float *values;               /* (batch, groups * width) */
    int64_t *index;              /* (batch, groups * width) */
    const dgl_segment *segments;
    int64_t n_segments;
} dgl_site;

/* Move the k largest of v[idx[lo..hi)] to idx[lo..lo+k) (quickselect, descending). */
static void select_top(const float *v, int32_t *idx, int64_t lo, int64_t hi, int64_t k) {
    while (hi - lo > 1 && k > 0 && k < hi - lo) {
        int64_t mid = lo + (hi - lo) / 2;
        float pivot = v[idx[mid]];
        int64_t i = lo, j = hi - 1;
        while (i <= j) {
            while (v[idx[i]] > pivot) i++;
            while (v[idx[j]] < pivot) j--;
            if (i <= j) {
                int32_t t = idx[i]; idx[i] = idx[j]; idx[j] = t;
                i++; j--;
            }
        }
        /* [lo, j] >= pivot >= [i, hi) and (j, i) == pivot */
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

int dgl_plan(const dgl_site *s, const float *pooled_sum, int64_t batch, int64_t tokens) {
    const int64_t C = s->channels, H = s->hidden, n = s->n;
    const int64_t per_group = n / s->groups, slots = s->groups * s->width;
    float *buf = malloc(sizeof(float) * (size_t)(C + H + n));
    int32_t *order = malloc(sizeof(int32_t) * (size_t)n);
    if (!buf || !order) {
        free(buf); free(order);
        return 1;
    }
    float *x = buf, *h = buf + C, *g = buf + C + H;
    for (int64_t b = 0; b < batch; b++) {
        const float *p = pooled_sum + b * C;
        double mean = 0.0, var = 0.0;
        for (int64_t c = 0; c < C; c++) mean += p[c];
        mean /= (double)C * (double)tokens;
        for (int64_t c = 0; c < C; c++) {
            double d = p[c] / (double)tokens - mean;
            var += d * d;
        }
        const double rstd = 1.0 / sqrt(var / (double)C + s->eps);
        for (int64_t c = 0; c < C; c++) x[c] = (float)((p[c] / (double)tokens - mean) * rstd);
        for (int64_t j = 0; j < H; j++) {
            const float *w = s->w1 + j * C;
            float acc = s->b1[j];
            for (int64_t c = 0; c < C; c++) acc += w[c] * x[c];
            h[j] = acc > 0.0f ? acc : 0.0f;
        }
        for (int64_t i = 0; i < n; i++) {
            const float *w = s->w2 + i * H;
            float acc = s->b2[i];
            for (int64_t j = 0; j < H; j++) acc += w[j] * h[j];
            g[i] = acc;
            order[i] = (int32_t)i;
        }
        float *values = s->values + b * slots;
        int64_t *index = s->index + b * slots;
        for (int64_t grp = 0; grp < s->groups; grp++) {
            const int64_t lo = grp * per_group;
            select_top(g, order, lo, lo + per_group, s->width);
            select_top(g, order, lo, lo + s->width, s->keep);
            for (int64_t j = 0; j < s->width; j++) {
                index[grp * s->width + j] = order[lo + j];
                values[grp * s->width + j] = j < s->keep ? g[order[lo + j]] : 0.0f;
            }
        }
        for (int64_t k = 0; k < s->n_segments; k++) {
            const dgl_segment *seg = s->segments + k;
            const int64_t row = seg->row;
            float *dst = seg->dst + b * seg->count * row;
            for (int64_t j = 0; j < seg->count; j++) {
                const int64_t slot = seg->first + j;
                const float *src = seg->src + (index[slot] - seg->offset) * row;
                float *out = dst + j * row;
                if (seg->scale == 0) {
                    for (int64_t c = 0; c < row; c++) out[c] = src[c];
                } else {
                    const float m = seg->scale == 1 ? values[slot] : (float)(slot % s->width < s->keep);
                    for (int64_t c = 0; c < row; c++) out[c] = src[c] * m;
                }
            }
        }
    }
    free(buf);
    free(order);
    return 0;
}
