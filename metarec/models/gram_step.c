/* MeLU's closed-form local update for a block of tasks, each on its own support rows only.

   Why this exists: the batched form in gram.py pads every task of a block to the block's longest
   support and runs each step as a dozen whole-block kernels, so a third of its products are
   padding and most of its time is spent outside the products (elementwise passes and launches).
   Here every task runs unpadded, one task per thread at a time, and a step's elementwise work is
   done while its rows are in cache. Same function as gram.gram_adapt_predict's support loop for
   a network of two hidden layers and a one-unit output with every layer adapted (the Python side
   checks those conditions and otherwise keeps the batched form); the tests compare both.

   A task's state: zs (support pre-activations of layer 0, [n, H0]), W1 [H1, H0], b1 [H1],
   w2 [H1], b2. One SGD step on the masked support MSE (scale = 2 / n):
       a0 = relu(zs); a1 = relu(a0 W1^T + b1); out = a1 w2 + b2; e2 = (out - y) * scale
       e1 = (e2 w2^T) * [a1 > 0];  w2 -= lr e2^T a1; b2 -= lr sum e2
       e0 = (e1 W1) * [a0 > 0];    W1 -= lr e1^T a0; b1 -= lr colsum e1
       zs -= lr K e0 (not after the last step); acc += lr e0
   Second order (save != NULL) also stores every step's zs, a1, e0, e1, e2 and the weights
   before the step, in the padded layout gram_reverse.py reads (padding rows are left as given).

   Determinism: each task is computed by one thread in a fixed order, so the numbers do not
   depend on the thread count. Build: cc -O3 -march=native -fopenmp -shared -fPIC (native.py). */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef float v16 __attribute__((vector_size(64)));

static inline v16 ld(const float *p) { v16 v; memcpy(&v, p, sizeof v); return v; }
static inline void st(float *p, v16 v) { memcpy(p, &v, sizeof v); }

/* C[R x 16V] = (C if accumulate) + alpha * A[R x k] B[k x 16V]; A(r, p) = A[r * sai + p * sap],
   B row-major with leading dimension ldb. R <= 4 and V <= 4 accumulators stay in registers. */
static inline __attribute__((always_inline)) void tile(const int R, const int V, int k, float alpha,
                                                       const float *A, long sai, long sap, const float *B,
                                                       long ldb, float *C, long ldc, int accumulate) {
    v16 c[4][4];
    for (int r = 0; r < R; r++)
        for (int v = 0; v < V; v++) c[r][v] = (v16){0};
    for (int p = 0; p < k; p++) {
        v16 b[4];
        for (int v = 0; v < V; v++) b[v] = ld(B + p * ldb + 16 * v);
        for (int r = 0; r < R; r++) {
            float a = A[r * sai + p * sap];
            for (int v = 0; v < V; v++) c[r][v] += a * b[v];
        }
    }
    for (int r = 0; r < R; r++)
        for (int v = 0; v < V; v++) {
            v16 o = alpha * c[r][v];
            if (accumulate) o = ld(C + r * ldc + 16 * v) + o;
            st(C + r * ldc + 16 * v, o);
        }
}

/* The main tile, 4 rows x 64 columns, with its 16 accumulators named: GCC spills one of an array's. */
static inline __attribute__((always_inline)) void tile44(int k, float alpha, const float *A, long sai, long sap,
                                                         const float *B, long ldb, float *C, long ldc,
                                                         int accumulate) {
    v16 c00 = {0}, c01 = {0}, c02 = {0}, c03 = {0}, c10 = {0}, c11 = {0}, c12 = {0}, c13 = {0};
    v16 c20 = {0}, c21 = {0}, c22 = {0}, c23 = {0}, c30 = {0}, c31 = {0}, c32 = {0}, c33 = {0};
    const float *a0 = A, *a1 = A + sai, *a2 = A + 2 * sai, *a3 = A + 3 * sai;
    for (int p = 0; p < k; p++) {
        const float *bp = B + p * ldb;
        const v16 b0 = ld(bp), b1 = ld(bp + 16), b2 = ld(bp + 32), b3 = ld(bp + 48);
        float x = a0[p * sap];
        c00 += x * b0; c01 += x * b1; c02 += x * b2; c03 += x * b3;
        x = a1[p * sap];
        c10 += x * b0; c11 += x * b1; c12 += x * b2; c13 += x * b3;
        x = a2[p * sap];
        c20 += x * b0; c21 += x * b1; c22 += x * b2; c23 += x * b3;
        x = a3[p * sap];
        c30 += x * b0; c31 += x * b1; c32 += x * b2; c33 += x * b3;
    }
    const v16 out[16] = {c00, c01, c02, c03, c10, c11, c12, c13, c20, c21, c22, c23, c30, c31, c32, c33};
    for (int r = 0; r < 4; r++)
        for (int v = 0; v < 4; v++) {
            v16 o = alpha * out[4 * r + v];
            if (accumulate) o = ld(C + r * ldc + 16 * v) + o;
            st(C + r * ldc + 16 * v, o);
        }
}

#define ROWS(V)                                                                                         \
    do {                                                                                                \
        int i = 0;                                                                                      \
        for (; i + 4 <= m; i += 4)                                                                      \
            if (V == 4) tile44(k, alpha, A + i * sai, sai, sap, B + j, ldb, C + i * ldc + j, ldc, accumulate); \
            else tile(4, V, k, alpha, A + i * sai, sai, sap, B + j, ldb, C + i * ldc + j, ldc, accumulate); \
        for (; i < m; i++)                                                                              \
            tile(1, V, k, alpha, A + i * sai, sai, sap, B + j, ldb, C + i * ldc + j, ldc, accumulate);   \
    } while (0)

/* C[m x n] = (C if accumulate) + alpha * A[m x k] B[k x n]; n a multiple of 16. */
static void gemm(int m, int n, int k, float alpha, const float *A, long sai, long sap, const float *B, long ldb,
                 float *C, long ldc, int accumulate) {
    int j = 0;
    for (; j + 64 <= n; j += 64) ROWS(4);
    switch ((n - j) / 16) {
        case 3: ROWS(3); break;
        case 2: ROWS(2); break;
        case 1: ROWS(1); break;
        default: break;
    }
}


typedef int v16i __attribute__((vector_size(64)));

/* The elementwise passes, written on whole vectors (every length is a multiple of 16). */
static inline v16 keep_positive(v16 value, v16 gate) {       /* value where gate > 0, else 0 */
    return (v16)((v16i)value & (gate > (v16){0}));
}

static void relu_into(float *restrict out, const float *restrict in, long len) {
    for (long i = 0; i < len; i += 16) st(out + i, keep_positive(ld(in + i), ld(in + i)));
}

static void mask_where_positive(float *restrict g, const float *restrict gate, long len) {
    for (long i = 0; i < len; i += 16) st(g + i, keep_positive(ld(g + i), ld(gate + i)));
}

static void axpy(float *restrict y, float alpha, const float *restrict x, long len) {
    for (long i = 0; i < len; i += 16) st(y + i, ld(y + i) + alpha * ld(x + i));
}

static float lane_sum(v16 v) {
    float s = 0.0f;
    for (int l = 0; l < 16; l++) s += v[l];
    return s;
}

/* b += alpha * (column sums of g [n x h]) */
static void add_col_sums(float *restrict b, float alpha, const float *restrict g, int n, int h) {
    for (int c = 0; c < h; c += 16) {
        v16 s = {0};
        for (int i = 0; i < n; i++) s += ld(g + (long)i * h + c);
        st(b + c, ld(b + c) + alpha * s);
    }
}

/* out [cols x rows, leading dimension ldo] = in [rows x cols]^T */
static void transpose(float *restrict out, long ldo, const float *restrict in, int rows, int cols) {
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < cols; c++) out[(long)c * ldo + r] = in[(long)r * cols + c];
}

/* Layer 1's activation in place (a1 = relu(a1 + b1)), the output, its loss gradient
   e2 = (out - y) * scale, and e1 = (e2 w2^T) * [a1 > 0]. */
static void layer2(int n, int h, float *restrict a1, const float *restrict b1, const float *restrict w2, float b2,
                   const float *restrict y, float scale, float *restrict e2, float *restrict e1) {
    for (int i = 0; i < n; i++) {
        float *row = a1 + (long)i * h;
        v16 s = {0};
        for (int c = 0; c < h; c += 16) {
            v16 r = ld(row + c) + ld(b1 + c);
            r = keep_positive(r, r);
            st(row + c, r);
            s += r * ld(w2 + c);
        }
        const float e = -(y[i] * scale) + (lane_sum(s) + b2) * scale;
        e2[i] = e;
        for (int c = 0; c < h; c += 16) st(e1 + (long)i * h + c, keep_positive(e * ld(w2 + c), ld(row + c)));
    }
}

/* Task indices, longest support first. */
static int *longest_first(const int32_t *counts, int B) {
    int *order = malloc(sizeof(int) * (B > 0 ? B : 1));
    if (!order) return NULL;
    for (int i = 0; i < B; i++) order[i] = i;
    for (int i = 1; i < B; i++) {                       /* insertion sort: B is a few dozen */
        int o = order[i], j = i;
        while (j > 0 && counts[order[j - 1]] < counts[o]) { order[j] = order[j - 1]; j--; }
        order[j] = o;
    }
    return order;
}

/* Runs task(problem, b, scratch) for every task b, longest support first (so that the dynamic
   schedule ends with short tasks), one task per thread at a time, each thread with its own scratch
   of per_thread floats. Returns 0, or 1 when memory could not be allocated. */
typedef void (*TaskFn)(const void *problem, int b, float *scratch);

static int run_tasks(const int32_t *counts, int B, int threads, long per_thread, TaskFn task, const void *problem) {
    int *order = longest_first(counts, B);
    if (!order) return 1;
    int failed = 0;
#pragma omp parallel num_threads(threads > 0 ? threads : 1) reduction(| : failed)
    {
        float *scratch = malloc(sizeof(float) * per_thread);
        if (!scratch) failed = 1;
#pragma omp for schedule(dynamic, 1)
        for (int i = 0; i < B; i++)
            if (scratch) task(problem, order[i], scratch);
        free(scratch);
    }
    free(order);
    return failed;
}

typedef struct {
    int B, S, H0, H1, steps;
    float lr;
    const int32_t *counts;
    float *zs;
    const float *K, *ys, *W1, *b1, *w2, *b2;
    float *W1o, *b1o, *w2o, *b2o, *acc;
    float *s_zs, *s_a1, *s_e0, *s_e1, *s_e2, *s_W1, *s_w2;
} Problem;

/* Scratch for one thread: a0 [S, H0], W1^T [H0, H1] and, for first order, a1, e1 [S, H1],
   e0 [S, H0], e2 [S]. */
static void one_task(const Problem *P, int b, float *scratch) {
    const int S = P->S, H0 = P->H0, H1 = P->H1, n = P->counts[b];
    const long rows0 = (long)S * H0, rows1 = (long)S * H1, step_stride = (long)P->B;
    const float lr = P->lr;
    float *W1 = P->W1o + (long)b * H1 * H0, *b1 = P->b1o + (long)b * H1, *w2 = P->w2o + (long)b * H1;
    float *b2 = P->b2o + b;
    memcpy(W1, P->W1, sizeof(float) * H1 * H0);
    memcpy(b1, P->b1, sizeof(float) * H1);
    memcpy(w2, P->w2, sizeof(float) * H1);
    *b2 = P->b2[0];
    float *a0 = scratch, *W1T = a0 + rows0, *a1 = W1T + (long)H0 * H1, *e1 = a1 + rows1, *e0 = e1 + rows1;
    float *e2 = e0 + rows0;
    const int second = P->s_zs != NULL;
    float *z = second ? P->s_zs + (long)b * rows0 : P->zs + (long)b * rows0;
    if (second) memcpy(z, P->zs + (long)b * rows0, sizeof(float) * n * H0);
    const float *K = P->K + (long)b * S * S, *y = P->ys + (long)b * S;
    float *acc = P->acc + (long)b * rows0;
    const float scale = n > 0 ? 2.0f / (float)n : 0.0f;
    for (int t = 0; t < P->steps; t++) {
        if (second) {                                   /* this step's slots in the saved arrays */
            long at = (long)t * step_stride + b;
            a1 = P->s_a1 + at * rows1;
            e1 = P->s_e1 + at * rows1;
            e0 = P->s_e0 + at * rows0;
            e2 = P->s_e2 + at * S;
            memcpy(P->s_W1 + at * H1 * H0, W1, sizeof(float) * H1 * H0);
            memcpy(P->s_w2 + at * H1, w2, sizeof(float) * H1);
        }
        relu_into(a0, z, (long)n * H0);
        transpose(W1T, H1, W1, H1, H0);
        gemm(n, H1, H0, 1.0f, a0, H0, 1, W1T, H1, a1, H1, 0);
        layer2(n, H1, a1, b1, w2, *b2, y, scale, e2, e1);
        float sum_e2 = 0.0f;
        for (int i = 0; i < n; i++) sum_e2 += e2[i];
        gemm(1, H1, n, -lr, e2, 0, 1, a1, H1, w2, H1, 1);             /* w2 -= lr e2^T a1, after its use */
        *b2 -= lr * sum_e2;
        gemm(n, H0, H1, 1.0f, e1, H1, 1, W1, H0, e0, H0, 0);           /* back through the old W1 */
        gemm(H1, H0, n, -lr, e1, 1, H1, a0, H0, W1, H0, 1);            /* W1 -= lr e1^T a0 */
        add_col_sums(b1, -lr, e1, n, H1);
        mask_where_positive(e0, a0, (long)n * H0);
        if (t < P->steps - 1) {
            float *next = z;
            if (second) {
                next = P->s_zs + ((long)(t + 1) * step_stride + b) * rows0;
                memcpy(next, z, sizeof(float) * n * H0);
            }
            gemm(n, H0, n, -lr, K, S, 1, e0, H0, next, H0, 1);          /* zs -= lr K e0 */
            z = next;
        }
        axpy(acc, lr, e0, (long)n * H0);
    }
}

static void forward_task(const void *problem, int b, float *scratch) { one_task(problem, b, scratch); }

/* Returns 0, or 1 when a thread's scratch could not be allocated. */
int metarec_gram_local_update(int B, int S, int H0, int H1, int steps, float lr, int threads,
                              const int32_t *counts, float *zs, const float *K, const float *ys,
                              const float *W1, const float *b1, const float *w2, const float *b2,
                              float *W1o, float *b1o, float *w2o, float *b2o, float *acc,
                              float *s_zs, float *s_a1, float *s_e0, float *s_e1, float *s_e2, float *s_W1,
                              float *s_w2) {
    Problem P = {B, S, H0, H1, steps, lr, counts, zs, K, ys, W1, b1, w2, b2, W1o, b1o, w2o, b2o, acc,
                 s_zs, s_a1, s_e0, s_e1, s_e2, s_W1, s_w2};
    const long per_thread = 2L * S * H0 + (long)H0 * H1 + 2L * S * H1 + S + 64;
    return run_tasks(counts, B, threads, per_thread, forward_task, &P);
}

/* ------------------------------------------------------------------------------------------------
   The reverse pass of the second-order local update (gram_reverse.py's per-step loop), per task.
   Inputs: the saved state of every step (as metarec_gram_local_update wrote it), K, g_acc (lr
   times the adjoint of acc), and the adjoints of the adapted W1, b1, w2, b2 from the query side.
   Outputs: those adjoints carried back to the shared initial weights (in place), the adjoint of
   the initial zs, g_zs [B, S, H0], and of K, g_k [B, S, S16] (columns past S16 >= S are zero). */

static float dot(const float *restrict x, const float *restrict y, int h) {
    v16 s = {0};
    for (int c = 0; c < h; c += 16) s += ld(x + c) * ld(y + c);
    return lane_sum(s);
}

typedef struct {
    int B, S, S16, H0, H1, steps;
    float lr;
    const int32_t *counts;
    const float *K, *s_zs, *s_a1, *s_e0, *s_e1, *s_e2, *s_W1, *s_w2, *g_acc;
    float *gW1, *gb1, *gw2, *gb2, *g_zs, *g_k;
} Reverse;

static void one_task_reverse(const Reverse *P, int b, float *scratch) {
    const int S = P->S, S16 = P->S16, H0 = P->H0, H1 = P->H1, n = P->counts[b];
    const long rows0 = (long)S * H0, rows1 = (long)S * H1;
    const float lr = P->lr, scale = n > 0 ? 2.0f / (float)n : 0.0f;
    const int n16 = (n + 15) / 16 * 16;
    float *a0 = scratch, *ge = a0 + rows0, *ga0 = ge + rows0, *gh0 = ga0 + rows0, *ge1 = gh0 + rows0;
    float *g1 = ge1 + rows1, *W1T = g1 + rows1, *gW1T = W1T + (long)H0 * H1, *e0T = gW1T + (long)H0 * H1;
    float *ge2 = e0T + (long)H0 * S16, *gw2_old = ge2 + S;
    float *gW1 = P->gW1 + (long)b * H1 * H0, *gb1 = P->gb1 + (long)b * H1, *gw2 = P->gw2 + (long)b * H1;
    float *gb2 = P->gb2 + b, *gzs = P->g_zs + (long)b * rows0, *gk = P->g_k + (long)b * S * S16;
    const float *K = P->K + (long)b * S * S, *g_acc = P->g_acc + (long)b * rows0;
    memset(e0T, 0, sizeof(float) * H0 * S16);          /* columns n.. stay zero: g_k's padding */
    for (int t = P->steps - 1; t >= 0; t--) {
        const long at = (long)t * P->B + b;
        const float *zs = P->s_zs + at * rows0, *a1 = P->s_a1 + at * rows1, *e0 = P->s_e0 + at * rows0;
        const float *e1 = P->s_e1 + at * rows1, *e2 = P->s_e2 + at * S, *W1 = P->s_W1 + at * H1 * H0;
        const float *w2 = P->s_w2 + at * H1;
        relu_into(a0, zs, (long)n * H0);
        memcpy(ge, g_acc, sizeof(float) * n * H0);     /* adjoint of e0: from acc ... */
        if (t < P->steps - 1) {                         /* ... and from zs' = zs - lr K e0 */
            gemm(n, H0, n, -lr, K, S, 1, gzs, H0, ge, H0, 1);
            transpose(e0T, S16, e0, n, H0);
            gemm(n, n16, H0, -lr, gzs, H0, 1, e0T, S16, gk, S16, 1);    /* g_k -= lr g_zs e0^T */
        }
        /* the delta chain, reversed: layer 1 (e0 = (e1 W1) * [a0 > 0]; W1' = W1 - lr e1^T a0) */
        mask_where_positive(ge, a0, (long)n * H0);    /* now the adjoint of e1 W1 */
        transpose(W1T, H1, W1, H1, H0);
        transpose(gW1T, H1, gW1, H1, H0);
        gemm(n, H1, H0, 1.0f, ge, H0, 1, W1T, H1, ge1, H1, 0);
        gemm(n, H1, H0, -lr, a0, H0, 1, gW1T, H1, ge1, H1, 1);
        for (int i = 0; i < n; i++)
            for (int c = 0; c < H1; c += 16) st(ge1 + (long)i * H1 + c, ld(ge1 + (long)i * H1 + c) - lr * ld(gb1 + c));
        gemm(n, H0, H1, 1.0f, e1, H1, 1, gW1, H0, ga0, H0, 0);          /* (times -lr below) */
        gemm(H1, H0, n, 1.0f, e1, 1, H1, ge, H0, gW1, H0, 1);
        /* layer 2 (e1 = (e2 w2^T) * [a1 > 0]; w2' = w2 - lr e2^T a1; b2' = b2 - lr sum e2) */
        mask_where_positive(ge1, a1, (long)n * H1);
        memcpy(gw2_old, gw2, sizeof(float) * H1);
        for (int i = 0; i < n; i++)
            ge2[i] = dot(ge1 + (long)i * H1, w2, H1) - lr * dot(a1 + (long)i * H1, gw2_old, H1) - lr * *gb2;
        gemm(1, H1, n, 1.0f, e2, 0, 1, ge1, H1, gw2, H1, 1);
        /* the support forward, reversed: e2 = (out - y) * scale, out = a1 w2 + b2, a1 = relu(a0 W1^T + b1) */
        float sum_g = 0.0f;
        for (int i = 0; i < n; i++) {
            ge2[i] *= scale;
            sum_g += ge2[i];
        }
        gemm(1, H1, n, 1.0f, ge2, 0, 1, a1, H1, gw2, H1, 1);
        *gb2 += sum_g;
        for (int i = 0; i < n; i++) {
            const float *row = a1 + (long)i * H1;
            for (int c = 0; c < H1; c += 16)
                st(g1 + (long)i * H1 + c,
                   keep_positive(ge2[i] * ld(w2 + c) - lr * (e2[i] * ld(gw2_old + c)), ld(row + c)));
        }
        gemm(H1, H0, n, 1.0f, g1, 1, H1, a0, H0, gW1, H0, 1);
        add_col_sums(gb1, 1.0f, g1, n, H1);
        gemm(n, H0, H1, 1.0f, g1, H1, 1, W1, H0, gh0, H0, 0);
        axpy(gh0, -lr, ga0, (long)n * H0);
        mask_where_positive(gh0, a0, (long)n * H0);
        axpy(gzs, 1.0f, gh0, (long)n * H0);
    }
}

static void reverse_task(const void *problem, int b, float *scratch) { one_task_reverse(problem, b, scratch); }

int metarec_gram_local_update_reverse(int B, int S, int S16, int H0, int H1, int steps, float lr, int threads,
                                      const int32_t *counts, const float *K, const float *s_zs, const float *s_a1,
                                      const float *s_e0, const float *s_e1, const float *s_e2, const float *s_W1,
                                      const float *s_w2, const float *g_acc, float *gW1, float *gb1, float *gw2,
                                      float *gb2, float *g_zs, float *g_k) {
    Reverse P = {B, S, S16, H0, H1, steps, lr, counts, K, s_zs, s_a1, s_e0, s_e1, s_e2, s_W1, s_w2, g_acc,
                 gW1, gb1, gw2, gb2, g_zs, g_k};
    const long per_thread = 4L * S * H0 + 2L * S * H1 + 2L * H0 * H1 + (long)H0 * S16 + S + H1 + 64;
    return run_tasks(counts, B, threads, per_thread, reverse_task, &P);
}
