/* GroupNorm (+ ReLU) of channels-last bf16 tensors on the CPU, forward and backward, fused.
 *
 * Loaded by vertstudy/model/kernels.py (compiled on first use with the system C compiler,
 * -O3 -march=native, cached per source, compiler and CPU). One thread.
 *
 * A tensor is B samples of N x C "rows" (channels-last: the C channels of a voxel are adjacent),
 * bf16 stored as uint16 (the top half of a float32). Channels c are in groups of C / G adjacent
 * channels. Per sample and group: mu = E[x], r = 1 / sqrt(Var[x] + eps) (biased variance
 * E[x^2] - mu^2, clamped at 0; sums accumulated in float32 over blocks of rows and in float64
 * across blocks). Output y = x * w_c r + (b_c - mu w_c r), then max(y, 0) if relu, rounded to
 * bf16 (nearest even). Backward, with g = dy (times y > 0 if relu) and M = N * C / G values per
 * group: dx = r w_c g - (r / M) sum_g(w g) - (r^3 / M) (x - mu) sum_g(w g (x - mu)),
 * dw_c += r sum(g (x - mu)), db_c += sum(g).
 *
 * Every loop over a sample runs over its N * C values flat, in chunks of T = C * m values
 * (T a multiple of 16, about 512), against per-position coefficient tables of length T
 * (position t holds channel t % C): plain elementwise loops the compiler vectorizes, whatever C.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define CHUNKS_PER_FLUSH 64 /* float32 partial sums cover at most 64 chunks before going to float64 */

static inline float bf16_to_f32(uint16_t v) {
    union { uint32_t u; float f; } t;
    t.u = (uint32_t)v << 16;
    return t.f;
}

static inline uint16_t f32_to_bf16(float f) {
    union { uint32_t u; float f; } t;
    t.f = f;
    uint32_t u = t.u;
    uint32_t rounded = u + 0x7fffu + ((u >> 16) & 1u);
    uint32_t nan = u | 0x00400000u;
    return (uint16_t)((((u & 0x7fffffffu) > 0x7f800000u) ? nan : rounded) >> 16);
}

static int64_t chunk_length(int64_t C) {
    int64_t m = 512 / C;
    if (m < 1) m = 1;
    while ((C * m) % 16) m++;
    return C * m;
}

/* Per-channel sums over one sample: s1[c] = sum x, s2[c] = sum x^2 (float64). */
static void channel_sums(const uint16_t *x, int64_t N, int64_t C, int64_t T, float *a1, float *a2, double *s1,
                         double *s2) {
    int64_t total = N * C, full = total / T, j = 0;
    memset(s1, 0, sizeof(double) * C);
    memset(s2, 0, sizeof(double) * C);
    for (int64_t k0 = 0; k0 < full; k0 += CHUNKS_PER_FLUSH) {
        int64_t k1 = k0 + CHUNKS_PER_FLUSH < full ? k0 + CHUNKS_PER_FLUSH : full;
        memset(a1, 0, sizeof(float) * T);
        memset(a2, 0, sizeof(float) * T);
        for (int64_t k = k0; k < k1; k++) {
            const uint16_t *xp = x + k * T;
            for (int64_t t = 0; t < T; t++) {
                float v = bf16_to_f32(xp[t]);
                a1[t] += v;
                a2[t] += v * v;
            }
        }
        for (int64_t t = 0; t < T; t++) {
            s1[t % C] += a1[t];
            s2[t % C] += a2[t];
        }
    }
    for (j = full * T; j < total; j++) {
        float v = bf16_to_f32(x[j]);
        s1[j % C] += v;
        s2[j % C] += (double)v * v;
    }
}

/* out[j] = bf16(max?(x[j] * A[j % C] + H[j % C])) over one sample, tables tiled to length T. */
static void affine(const uint16_t *x, uint16_t *out, int64_t N, int64_t C, int64_t T, const float *A,
                   const float *H, int relu) {
    int64_t total = N * C, full = total / T;
    for (int64_t k = 0; k < full; k++) {
        const uint16_t *xp = x + k * T;
        uint16_t *op = out + k * T;
        if (relu) {
            for (int64_t t = 0; t < T; t++) {
                float v = bf16_to_f32(xp[t]) * A[t] + H[t];
                op[t] = f32_to_bf16(v > 0.0f ? v : 0.0f);
            }
        } else {
            for (int64_t t = 0; t < T; t++) op[t] = f32_to_bf16(bf16_to_f32(xp[t]) * A[t] + H[t]);
        }
    }
    for (int64_t j = full * T; j < total; j++) {
        float v = bf16_to_f32(x[j]) * A[j % C] + H[j % C];
        out[j] = f32_to_bf16(relu && !(v > 0.0f) ? 0.0f : v);
    }
}

static void tile(const float *per_channel, float *table, int64_t C, int64_t T) {
    for (int64_t t = 0; t < T; t++) table[t] = per_channel[t % C];
}

/* Returns 0, or -1 if memory ran out. mean, rstd: (B, G) float32 out. */
int vs_group_norm_forward(const uint16_t *x, const float *w, const float *b, uint16_t *y, float *mean, float *rstd,
                          int64_t B, int64_t N, int64_t C, int64_t G, double eps, int relu) {
    int64_t T = chunk_length(C), per = C / G;
    double M = (double)N * per;
    float *buf = malloc(sizeof(float) * (4 * T + 2 * C));
    double *s = malloc(sizeof(double) * 2 * C);
    if (!buf || !s) {
        free(buf);
        free(s);
        return -1;
    }
    float *a1 = buf, *a2 = buf + T, *A = buf + 2 * T, *H = buf + 3 * T, *ac = buf + 4 * T, *hc = ac + C;
    for (int64_t i = 0; i < B; i++) {
        const uint16_t *xi = x + i * N * C;
        channel_sums(xi, N, C, T, a1, a2, s, s + C);
        for (int64_t g = 0; g < G; g++) {
            double t1 = 0, t2 = 0;
            for (int64_t c = g * per; c < (g + 1) * per; c++) {
                t1 += s[c];
                t2 += s[C + c];
            }
            double mu = t1 / M, var = t2 / M - mu * mu;
            if (var < 0) var = 0;
            float r = (float)(1.0 / sqrt(var + eps));
            mean[i * G + g] = (float)mu;
            rstd[i * G + g] = r;
            for (int64_t c = g * per; c < (g + 1) * per; c++) {
                ac[c] = w[c] * r;
                hc[c] = b[c] - (float)mu * ac[c];
            }
        }
        tile(ac, A, C, T);
        tile(hc, H, C, T);
        affine(xi, y + i * N * C, N, C, T, A, H, relu);
    }
    free(buf);
    free(s);
    return 0;
}

/* y: the forward's output (its sign masks the gradient) if relu, else unused (may be NULL).
 * dw, db: (C) float32, overwritten with the sums over the batch. Returns 0, or -1 if memory ran out. */
int vs_group_norm_backward(const uint16_t *dy, const uint16_t *x, const uint16_t *y, const float *w,
                           const float *mean, const float *rstd, uint16_t *dx, float *dw, float *db, int64_t B,
                           int64_t N, int64_t C, int64_t G, int relu) {
    int64_t T = chunk_length(C), per = C / G, total = N * C, full = total / T;
    double M = (double)N * per;
    float *buf = malloc(sizeof(float) * (5 * T + 3 * C));
    double *s = malloc(sizeof(double) * 4 * C);
    if (!buf || !s) {
        free(buf);
        free(s);
        return -1;
    }
    float *a1 = buf, *a2 = buf + T, *A = buf + 2 * T, *D = buf + 3 * T, *E = buf + 4 * T;
    float *ac = buf + 5 * T, *dc = ac + C, *ec = dc + C;
    double *sg = s, *sgx = s + C, *dwd = s + 2 * C, *dbd = s + 3 * C;
    memset(dwd, 0, sizeof(double) * 2 * C);
    for (int64_t i = 0; i < B; i++) {
        const uint16_t *dyi = dy + i * total, *xi = x + i * total, *yi = relu ? y + i * total : NULL;
        uint16_t *dxi = dx + i * total;
        /* pass 1: sums of g and g x per channel */
        memset(sg, 0, sizeof(double) * 2 * C);
        for (int64_t k0 = 0; k0 < full; k0 += CHUNKS_PER_FLUSH) {
            int64_t k1 = k0 + CHUNKS_PER_FLUSH < full ? k0 + CHUNKS_PER_FLUSH : full;
            memset(a1, 0, sizeof(float) * 2 * T);
            for (int64_t k = k0; k < k1; k++) {
                const uint16_t *dp = dyi + k * T, *xp = xi + k * T;
                if (relu) {
                    const uint16_t *yp = yi + k * T;
                    for (int64_t t = 0; t < T; t++) {
                        float g = bf16_to_f32(yp[t]) > 0.0f ? bf16_to_f32(dp[t]) : 0.0f;
                        a1[t] += g;
                        a2[t] += g * bf16_to_f32(xp[t]);
                    }
                } else {
                    for (int64_t t = 0; t < T; t++) {
                        float g = bf16_to_f32(dp[t]);
                        a1[t] += g;
                        a2[t] += g * bf16_to_f32(xp[t]);
                    }
                }
            }
            for (int64_t t = 0; t < T; t++) {
                sg[t % C] += a1[t];
                sgx[t % C] += a2[t];
            }
        }
        for (int64_t j = full * T; j < total; j++) {
            float g = (relu && !(bf16_to_f32(yi[j]) > 0.0f)) ? 0.0f : bf16_to_f32(dyi[j]);
            sg[j % C] += g;
            sgx[j % C] += (double)g * bf16_to_f32(xi[j]);
        }
        /* coefficients */
        for (int64_t g = 0; g < G; g++) {
            double mu = mean[i * G + g], r = rstd[i * G + g], p = 0, q = 0;
            for (int64_t c = g * per; c < (g + 1) * per; c++) {
                double centred = sgx[c] - mu * sg[c]; /* sum g (x - mu) */
                dwd[c] += r * centred;
                dbd[c] += sg[c];
                p += w[c] * sg[c];
                q += w[c] * centred;
            }
            double d = -r * r * r * q / M, e = -r * p / M;
            for (int64_t c = g * per; c < (g + 1) * per; c++) {
                ac[c] = (float)(r * w[c]);
                dc[c] = (float)d;
                ec[c] = (float)(e - mu * d);
            }
        }
        tile(ac, A, C, T);
        tile(dc, D, C, T);
        tile(ec, E, C, T);
        /* pass 2: dx = A g + D x + E */
        for (int64_t k = 0; k < full; k++) {
            const uint16_t *dp = dyi + k * T, *xp = xi + k * T;
            uint16_t *op = dxi + k * T;
            if (relu) {
                const uint16_t *yp = yi + k * T;
                for (int64_t t = 0; t < T; t++) {
                    float g = bf16_to_f32(yp[t]) > 0.0f ? bf16_to_f32(dp[t]) : 0.0f;
                    op[t] = f32_to_bf16(A[t] * g + D[t] * bf16_to_f32(xp[t]) + E[t]);
                }
            } else {
                for (int64_t t = 0; t < T; t++)
                    op[t] = f32_to_bf16(A[t] * bf16_to_f32(dp[t]) + D[t] * bf16_to_f32(xp[t]) + E[t]);
            }
        }
        for (int64_t j = full * T; j < total; j++) {
            float g = (relu && !(bf16_to_f32(yi[j]) > 0.0f)) ? 0.0f : bf16_to_f32(dyi[j]);
            int64_t c = j % C;
            dxi[j] = f32_to_bf16(ac[c] * g + dc[c] * bf16_to_f32(xi[j]) + ec[c]);
        }
    }
    for (int64_t c = 0; c < C; c++) {
        dw[c] = (float)dwd[c];
        db[c] = (float)dbd[c];
    }
    free(buf);
    free(s);
    return 0;
}
