/* Bilinear upsampling added into an accumulator, for SegFormer's additive decoder (edgeseg.models.segformer).
 *
 * Why C: the decoder sums the 1/8, 1/16 and 1/32 maps, each projected to E channels and resized to the 1/4 grid.
 * In PyTorch each resize writes an E-channel map at 1/4 resolution that the sum then reads back (three 16 MB maps
 * for B0 at 512²): memory traffic, not arithmetic. Here each output pixel's E channels are read, get the four-tap
 * interpolation of every map added, and are written once.
 *
 * Semantics: F.interpolate(mode="bilinear", align_corners=False) without scale factors, per axis: source coordinate
 * (dst + 0.5) * in / out - 0.5, clamped at 0; taps floor(src) and the next one (clamped to the last row/column);
 * weights 1 - frac and frac. All maps channels-last and contiguous: acc (batch, rows, W, C) holds output rows
 * row0 .. row0 + rows - 1 of the H x W grid; each source is (batch, h, w, C).
 */
#include <stdint.h>

#include "native_dispatch.h"

typedef float v8f __attribute__((vector_size(32)));

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

/* One output pixel: o[0..C) += w00 a + w01 b + w10 c + w11 d, eight channels at a time, then the rest. */
DISPATCHED
static void blend(float *o, const float *a, const float *b, const float *c, const float *d, int64_t C,
                  float w00, float w01, float w10, float w11) {
    int64_t k = 0;
    for (; k + 8 <= C; k += 8) {
        v8f va, vb, vc, vd, vo;
        __builtin_memcpy(&va, a + k, sizeof va);
        __builtin_memcpy(&vb, b + k, sizeof vb);
        __builtin_memcpy(&vc, c + k, sizeof vc);
        __builtin_memcpy(&vd, d + k, sizeof vd);
        __builtin_memcpy(&vo, o + k, sizeof vo);
        vo += w00 * va + w01 * vb + w10 * vc + w11 * vd;
        __builtin_memcpy(o + k, &vo, sizeof vo);
    }
    for (; k < C; k++)
        o[k] += w00 * a[k] + w01 * b[k] + w10 * c[k] + w11 * d[k];
}

void resize_add(float *acc, int64_t batch, int64_t rows, int64_t row0, int64_t H, int64_t W, int64_t C,
                const resize_source *sources, int64_t n_sources) {
    for (int64_t n = 0; n < batch; n++)
        for (int64_t r = 0; r < rows; r++) {
            float *out_row = acc + (n * rows + r) * W * C;
            for (int64_t s = 0; s < n_sources; s++) {
                const resize_source *S = &sources[s];
                int64_t y0, y1, x0, x1;
                float wy0, wy1, wx0, wx1;
                taps(row0 + r, S->h, H, &y0, &y1, &wy0, &wy1);
                const float *image = S->src + n * S->h * S->w * C;
                const float *top = image + y0 * S->w * C, *bottom = image + y1 * S->w * C;
                for (int64_t x = 0; x < W; x++) {
                    taps(x, S->w, W, &x0, &x1, &wx0, &wx1);
                    blend(out_row + x * C, top + x0 * C, top + x1 * C, bottom + x0 * C, bottom + x1 * C, C,
                          wy0 * wx0, wy0 * wx1, wy1 * wx0, wy1 * wx1);
                }
            }
        }
}
