/* Shared by the native kernels: DISPATCHED marks a hot loop to be built twice where the toolchain can choose at load
 * time (x86-64 with glibc's ifunc): the CPU then runs the AVX2 build if it has AVX2, the baseline one otherwise. */
#ifndef EDGESEG_NATIVE_DISPATCH_H
#define EDGESEG_NATIVE_DISPATCH_H
#if defined(__x86_64__) && defined(__GLIBC__) && \
    (defined(__clang__) ? __clang_major__ >= 14 : defined(__GNUC__) && __GNUC__ >= 6)
#define DISPATCHED __attribute__((target_clones("avx2", "default")))
#else
#define DISPATCHED
#endif
#endif
