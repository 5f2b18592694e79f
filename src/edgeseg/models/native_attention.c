/* Softmax attention softmax(Q Kᵀ · scale) V for SegFormer's efficient self-attention (edgeseg.models.segformer), in
 * its fused form and in DynaSegFormer's, where the gates narrow every head to its kept channels.
 *
 * Why C: PyTorch's fused CPU attention vectorises its P·V product along the head width, so a head of 17 to 32
 * channels costs about what a 32-channel one does (measured at B0's stage 1, 16384 queries × 256 keys: 5.3 ms at 32
 * channels, 4.8 at 24, 3.8 at 16, two threads); a DGL that keeps 24 of 32 channels saved a tenth of the attention.
 * Here the queries are the vector lanes (native_attention_block.h): both products cost one vector operation per
 * key and channel, so the time falls with the kept width (3.6, 2.9, 2.1 ms), and the softmax statistics are
 * lane-wise. The output is written in token order, (B, N, heads, dv): the layout the output projection reads, with
 * no transpose copy after it.
 *
 * Threads: the (image, head, query block) tasks are split over OpenMP threads, as many as PyTorch uses (the caller
 * passes torch.get_num_threads()); linked against the libgomp PyTorch has loaded, they are PyTorch's own threads.
 * Built without OpenMP, attention_threaded() says so and the caller keeps PyTorch's attention unless one thread runs.
 */
#include <stdint.h>
#include <stdlib.h>
#ifdef _OPENMP
#include <omp.h>
#endif

typedef struct {
    const float *q, *k, *v; /* (B, N | M, heads, dq | dv) at the strides below, channels contiguous */
    float *out;             /* (B, N, heads, dv) at out_stride */
    int64_t q_stride[3], k_stride[3], v_stride[3], out_stride[3]; /* image, token, head */
    int64_t batch, heads, N, M, dq, dv;
    float scale;
} attention_args;

/* Multiply-adds fused: GCC keeps them apart in ISO C mode (-std=c99), clang fuses them within an expression. */
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("fp-contract=fast")
#endif

#if defined(__x86_64__) && (defined(__clang__) ? __clang_major__ >= 14 : defined(__GNUC__) && __GNUC__ >= 6)
#define LANES 16
#define SUFFIX _avx512
#define TARGET __attribute__((target("avx512f")))
#include "native_attention_block.h"
#undef LANES
#undef SUFFIX
#undef TARGET
#define LANES 8
#define SUFFIX _avx2
#define TARGET __attribute__((target("avx2,fma")))
#include "native_attention_block.h"
#undef LANES
#undef SUFFIX
#undef TARGET
#define X86_DISPATCH 1
#endif
#define LANES 4
#define SUFFIX _base
#define TARGET
#include "native_attention_block.h"

int attention_threaded(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

static int attend_range(const attention_args *a, int64_t first, int64_t last, int path) {
#ifdef X86_DISPATCH
    if (path == 2)
        return attend_tasks_avx512(a, first, last);
    if (path == 1)
        return attend_tasks_avx2(a, first, last);
#endif
    (void)path;
    return attend_tasks_base(a, first, last);
}

/* Widest vector path this CPU runs: 2 AVX-512, 1 AVX2 + FMA, 0 the baseline. */
int attention_widest(void) {
#ifdef X86_DISPATCH
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f"))
        return 2;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
        return 1;
#endif
    return 0;
}

/* path: one attention_widest() allows (the tests run each). Returns 0, or 1 if scratch memory ran out. */
int attention(const attention_args *a, int threads, int path) {
    const int64_t lanes = path == 2 ? 16 : path == 1 ? 8 : 4;
    const int64_t tasks = a->batch * a->heads * ((a->N + lanes - 1) / lanes);
    int failed = 0;
#ifdef _OPENMP
    if (threads > tasks)
        threads = (int)tasks;
#pragma omp parallel num_threads(threads > 0 ? threads : 1) reduction(| : failed)
    {
        const int64_t n = omp_get_num_threads(), id = omp_get_thread_num();
        failed |= attend_range(a, tasks * id / n, tasks * (id + 1) / n, path);
    }
#else
    (void)threads;
    failed = attend_range(a, 0, tasks, path);
#endif
    return failed;
}
