/* Read bandwidth of this machine: threads (OMP_NUM_THREADS) each sum their half of a buffer far larger than
   the caches, in 2 MB pages where available, as run.c's matmuls stream weights. Prints the best and the
   median of the passes, in GB/s.

     cc -O3 -march=native -fopenmp bench/bandwidth.c -o bandwidth && OMP_NUM_THREADS=2 ./bandwidth [MiB] [passes] */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

typedef float v8f __attribute__((vector_size(32)));

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv) {
    size_t mib = argc > 1 ? strtoul(argv[1], NULL, 10) : 1024;
    int passes = argc > 2 ? atoi(argv[2]) : 10;
    if (mib < 64 || passes < 1 || passes > 1000) { fprintf(stderr, "usage: bandwidth [MiB >= 64] [passes]\n"); return 2; }
    size_t n = mib << 20 >> 5;  /* v8f values, a multiple of 4096 */
    v8f *buf = aligned_alloc((size_t)2 << 20, n * sizeof(v8f));
    if (!buf) { fprintf(stderr, "cannot allocate %zu MiB\n", mib); return 2; }
#ifdef MADV_HUGEPAGE
    madvise(buf, n * sizeof(v8f), MADV_HUGEPAGE);  /* as run.c's weights: no TLB misses in the way */
#endif
    #pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; i++) buf[i] = (v8f){1, 2, 3, 4, 5, 6, 7, 8} * (float)(i & 7);
    double *rate = calloc(passes, sizeof(double)), total = 0;
    for (int p = 0; p < passes; p++) {
        double t = now();
        float sum = 0;
        #pragma omp parallel for schedule(static) reduction(+:sum)
        for (size_t chunk = 0; chunk < n / 4096; chunk++) {  /* 128 KiB each, four independent accumulators */
            const v8f *p = buf + chunk * 4096;
            v8f a = {0}, b = {0}, c = {0}, d = {0};
            for (int i = 0; i < 4096; i += 4) a += p[i], b += p[i + 1], c += p[i + 2], d += p[i + 3];
            v8f s = (a + b) + (c + d);
            sum += s[0] + s[1] + s[2] + s[3] + s[4] + s[5] + s[6] + s[7];
        }
        rate[p] = n * sizeof(v8f) / (now() - t) / 1e9;
        total += sum;
    }
    qsort(rate, passes, sizeof(double), cmp);
    printf("read bandwidth: best %.1f GB/s, median %.1f GB/s (%d passes over %zu MiB; checksum %g)\n",
           rate[passes - 1], rate[passes / 2], passes, mib, total);
    free(rate);
    free(buf);
    return 0;
}
