/* One block of LANES queries of one head: the body of native_attention.c, included there once per vector width.
 * Before including, define LANES (floats per vector), SUFFIX (appended to the function names) and TARGET (the
 * function attribute that lets the compiler use that width, or nothing).
 *
 * The queries of the block sit in the lanes of a vector: the scores of one key for LANES queries are one vector,
 * built from the key's channels by broadcast multiply-adds, and the output channels of those queries are vectors
 * built the same way from the values. Both products then cost one vector operation per key and channel: they shrink
 * with the head width a channel at a time, and the softmax's max and sum over the keys are lane-wise.
 */
#define CAT_(a, b) a##b
#define CAT(a, b) CAT_(a, b)
#define VEC CAT(vec, SUFFIX)
#define IVEC CAT(ivec, SUFFIX)

typedef float VEC __attribute__((vector_size(4 * LANES)));
typedef int32_t IVEC __attribute__((vector_size(4 * LANES)));

TARGET static inline VEC CAT(vmax, SUFFIX)(VEC a, VEC b) {
    const IVEC m = a > b;
    return (VEC)((m & (IVEC)a) | (~m & (IVEC)b));
}

/* exp(x) for x <= 0 (Cephes' expf): x = n ln2 + r with |r| <= ln2 / 2, a degree-7 polynomial for exp(r), n added to
 * the exponent bits. Below -87.3 the result would be subnormal; the input is clamped there (exp = 1.2e-38, nothing
 * next to the maximum's exp(0) = 1). */
TARGET static inline VEC CAT(vexp, SUFFIX)(VEC x) {
    const VEC zero = {0};
    x = CAT(vmax, SUFFIX)(x, zero - 87.33654f);
    const VEC t = x * 1.44269504088896341f + 12582912.0f; /* 1.5 * 2^23: rounds x / ln2 to an integer in t's bits */
    const VEC n = t - 12582912.0f;
    VEC r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    VEC p = r * 1.9875691500e-4f + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * (r * r) + r + 1.0f;
    return (VEC)((IVEC)p + (((IVEC)t - 0x4B400000) << 23));
}

/* nq <= LANES queries (rows qs apart) against M keys and values (rows ks, vs apart) of one head; writes nq output
 * rows (os apart) of dv channels. qT (dq vectors) and S (M vectors) are scratch. */
TARGET static void CAT(attend_block, SUFFIX)(const float *q, int64_t qs, const float *k, int64_t ks, const float *v,
                                            int64_t vs, float *o, int64_t os, int64_t nq, int64_t M, int64_t dq,
                                            int64_t dv, float scale, VEC *qT, VEC *S) {
    for (int64_t c = 0; c < dq; c++) {
        VEC t = {0};
        for (int64_t i = 0; i < nq; i++)
            t[i] = q[i * qs + c] * scale;
        qT[c] = t;
    }
    /* scores, eight keys at a time (eight independent multiply-add chains), and their running maximum */
    VEC mx = {0};
    mx -= 3.0e38f;
    int64_t j = 0;
    for (; j + 8 <= M; j += 8) {
        const float *kj = k + j * ks;
        VEC s0 = {0}, s1 = {0}, s2 = {0}, s3 = {0}, s4 = {0}, s5 = {0}, s6 = {0}, s7 = {0};
        for (int64_t c = 0; c < dq; c++) {
            const VEC qc = qT[c];
            s0 += kj[c] * qc;
            s1 += kj[ks + c] * qc;
            s2 += kj[2 * ks + c] * qc;
            s3 += kj[3 * ks + c] * qc;
            s4 += kj[4 * ks + c] * qc;
            s5 += kj[5 * ks + c] * qc;
            s6 += kj[6 * ks + c] * qc;
            s7 += kj[7 * ks + c] * qc;
        }
        S[j] = s0, S[j + 1] = s1, S[j + 2] = s2, S[j + 3] = s3;
        S[j + 4] = s4, S[j + 5] = s5, S[j + 6] = s6, S[j + 7] = s7;
        mx = CAT(vmax, SUFFIX)(mx, CAT(vmax, SUFFIX)(CAT(vmax, SUFFIX)(CAT(vmax, SUFFIX)(s0, s1),
                                                                       CAT(vmax, SUFFIX)(s2, s3)),
                                                     CAT(vmax, SUFFIX)(CAT(vmax, SUFFIX)(s4, s5),
                                                                       CAT(vmax, SUFFIX)(s6, s7))));
    }
    for (; j < M; j++) {
        VEC s = {0};
        for (int64_t c = 0; c < dq; c++)
            s += k[j * ks + c] * qT[c];
        S[j] = s;
        mx = CAT(vmax, SUFFIX)(mx, s);
    }
    VEC sum = {0};
    for (j = 0; j < M; j++) {
        const VEC p = CAT(vexp, SUFFIX)(S[j] - mx);
        S[j] = p;
        sum += p;
    }
    const VEC inv = 1.0f / sum;
    /* outputs, eight channels at a time over all keys */
    int64_t c0 = 0;
    for (; c0 + 8 <= dv; c0 += 8) {
        VEC o0 = {0}, o1 = {0}, o2 = {0}, o3 = {0}, o4 = {0}, o5 = {0}, o6 = {0}, o7 = {0};
        const float *vj = v + c0;
        for (j = 0; j < M; j++, vj += vs) {
            const VEC p = S[j];
            o0 += vj[0] * p;
            o1 += vj[1] * p;
            o2 += vj[2] * p;
            o3 += vj[3] * p;
            o4 += vj[4] * p;
            o5 += vj[5] * p;
            o6 += vj[6] * p;
            o7 += vj[7] * p;
        }
        o0 *= inv, o1 *= inv, o2 *= inv, o3 *= inv, o4 *= inv, o5 *= inv, o6 *= inv, o7 *= inv;
        for (int64_t i = 0; i < nq; i++) {
            float *oi = o + i * os + c0;
            oi[0] = o0[i], oi[1] = o1[i], oi[2] = o2[i], oi[3] = o3[i];
            oi[4] = o4[i], oi[5] = o5[i], oi[6] = o6[i], oi[7] = o7[i];
        }
    }
    for (; c0 < dv; c0++) {
        VEC oc = {0};
        for (j = 0; j < M; j++)
            oc += v[j * vs + c0] * S[j];
        oc *= inv;
        for (int64_t i = 0; i < nq; i++)
            o[i * os + c0] = oc[i];
    }
}

/* All blocks of the heads and images in [first, last) of the task list (images × heads × query blocks). */
TARGET static int CAT(attend_tasks, SUFFIX)(const attention_args *a, int64_t first, int64_t last) {
    const int64_t blocks = (a->N + LANES - 1) / LANES;
    char *scratch = malloc(sizeof(VEC) * (size_t)(a->dq + a->M + 1));
    if (scratch == NULL)
        return 1;
    VEC *qT = (VEC *)(((uintptr_t)scratch + sizeof(VEC) - 1) & ~(uintptr_t)(sizeof(VEC) - 1));
    VEC *S = qT + a->dq;
    for (int64_t t = first; t < last; t++) {
        const int64_t b = t / (a->heads * blocks), h = t / blocks % a->heads, n0 = t % blocks * LANES;
        const int64_t nq = a->N - n0 < LANES ? a->N - n0 : LANES;
        CAT(attend_block, SUFFIX)(a->q + b * a->q_stride[0] + n0 * a->q_stride[1] + h * a->q_stride[2],
                                  a->q_stride[1], a->k + b * a->k_stride[0] + h * a->k_stride[2], a->k_stride[1],
                                  a->v + b * a->v_stride[0] + h * a->v_stride[2], a->v_stride[1],
                                  a->out + b * a->out_stride[0] + n0 * a->out_stride[1] + h * a->out_stride[2],
                                  a->out_stride[1], nq, a->M, a->dq, a->dv, a->scale, qT, S);
    }
    free(scratch);
    return 0;
}

#undef VEC
#undef IVEC
