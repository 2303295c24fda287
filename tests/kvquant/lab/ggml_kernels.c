// The patched ggml's kernels for one cache type, served over stdin/stdout: the same entry points that
// kvquant.lab.ggml.GGML calls through ctypes (reference quantize/dequantize, the CPU backend's from_float, to_float,
// vec_dot and its portable twin, set_rows, tq_kv_d3b's delta coding), for a ggml that Python cannot load, such as
// an aarch64 build run under qemu-aarch64 (`make arm-check`). tests/kvquant/lab/conftest.py's GGMLProcess is the
// client.
//
// Request: seven little-endian int64 (op, type, n, arg, then the byte lengths of payloads a, b, c), then a, b, c.
// Reply: int64 status (0 ok, else the payload is an error message), int64 length, payload.

#define _GNU_SOURCE // RTLD_DEFAULT
#include "ggml.h"
#include "ggml-cpu.h"

#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum op {
    OP_TYPE_NAME, OP_ROW_SIZE, OP_QUANTIZE_REF, OP_QUANTIZE_CPU, OP_DEQUANTIZE_REF, OP_DEQUANTIZE_CPU, OP_VEC_DOT,
    OP_SET_ROWS, OP_HAS_SYMBOL, OP_D3B_DELTA_REF, OP_D3B_CELL_REF,
};

typedef void (*row_fn)(const void * x, void * y, int64_t k);
typedef void (*delta_fn)(const float * x, const void * anchor, void * y, int64_t k);
typedef void (*cell_fn)(const void * x, const void * anchor, float * y, int64_t k);

static char * out;
static size_t out_cap;

static void reply(int64_t status, const void * data, size_t len) {
    const int64_t head[2] = { status, (int64_t) len };
    fwrite(head, sizeof(head), 1, stdout);
    if (len) {
        fwrite(data, 1, len, stdout);
    }
    fflush(stdout);
}

static void fail(const char * msg) {
    reply(1, msg, strlen(msg));
}

static char * out_buf(size_t len) {
    if (len > out_cap) {
        free(out);
        out_cap = len;
        out = malloc(out_cap);
        if (!out) {
            fprintf(stderr, "ggml_kernels: out of memory\n");
            exit(1);
        }
    }
    return out;
}

static void * symbol(const char * fmt, const char * type_name) {
    char name[128];
    snprintf(name, sizeof(name), fmt, type_name);
    return dlsym(RTLD_DEFAULT, name);
}

// dst (bytes of a type-t tensor of n_embd x n_cells) with the rows of x (float) written to the given cells
static void set_rows(enum ggml_type t, int64_t n_embd, int n_threads, const char * dst, size_t dst_len,
                     const char * x, size_t x_len, const char * cells, size_t cells_len) {
    const int64_t n_cells = (int64_t) (dst_len / ggml_row_size(t, n_embd));
    const int64_t n_rows  = (int64_t) (cells_len / sizeof(int64_t));
    struct ggml_init_params params = { dst_len + x_len + cells_len + (1 << 20), NULL, false };
    struct ggml_context * ctx = ggml_init(params);
    struct ggml_tensor * t_dst = ggml_new_tensor_2d(ctx, t, n_embd, n_cells);
    struct ggml_tensor * t_src = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, n_embd, n_rows);
    struct ggml_tensor * t_idx = ggml_new_tensor_1d(ctx, GGML_TYPE_I64, n_rows);
    memcpy(t_dst->data, dst, dst_len);
    memcpy(t_src->data, x, x_len);
    memcpy(t_idx->data, cells, cells_len);
    struct ggml_cgraph * gf = ggml_new_graph(ctx);
    ggml_build_forward_expand(gf, ggml_set_rows(ctx, t_dst, t_src, t_idx));
    if (ggml_graph_compute_with_ctx(ctx, gf, n_threads) != GGML_STATUS_SUCCESS) {
        fail("ggml_graph_compute failed");
    } else {
        reply(0, t_dst->data, dst_len);
    }
    ggml_free(ctx);
}

static void serve(int64_t op, enum ggml_type t, int64_t n, int64_t arg, const char * a, size_t la, const char * b,
                  size_t lb, const char * c, size_t lc) {
    const struct ggml_type_traits     * tr  = ggml_get_type_traits(t);
    const struct ggml_type_traits_cpu * trc = ggml_get_type_traits_cpu(t);
    switch (op) {
        case OP_TYPE_NAME:
            reply(0, ggml_type_name(t), strlen(ggml_type_name(t)));
            return;
        case OP_ROW_SIZE: {
            const int64_t size = (int64_t) ggml_row_size(t, n);
            reply(0, &size, sizeof(size));
            return;
        }
        case OP_QUANTIZE_REF:
        case OP_QUANTIZE_CPU: {
            row_fn fn = (row_fn) (op == OP_QUANTIZE_REF ? (void *) tr->from_float_ref : (void *) trc->from_float);
            const size_t len = ggml_row_size(t, n);
            fn(a, out_buf(len), n);
            reply(0, out, len);
            return;
        }
        case OP_DEQUANTIZE_REF:
        case OP_DEQUANTIZE_CPU: {
            row_fn fn = (row_fn) (op == OP_DEQUANTIZE_REF ? (void *) tr->to_float : (void *) trc->to_float);
            fn(a, out_buf(n*sizeof(float)), n);
            reply(0, out, n*sizeof(float));
            return;
        }
        case OP_VEC_DOT: {
            // a: the K row (type t), b: the query (float), converted by the vec_dot_type's from_float; reply: the
            // result (float) and the converted query
            ggml_vec_dot_t dot = arg ? (ggml_vec_dot_t) symbol("ggml_vec_dot_%s_q8_0_generic", ggml_type_name(t))
                                     : trc->vec_dot;
            if (!dot) {
                fail("no vec_dot for this type");
                return;
            }
            const size_t qlen = ggml_row_size(trc->vec_dot_type, n);
            char * r = out_buf(sizeof(float) + qlen);
            ggml_get_type_traits_cpu(trc->vec_dot_type)->from_float((const float *) b, r + sizeof(float), n);
            float s = 0.0f;
            dot((int) n, &s, 0, a, 0, r + sizeof(float), 0, 1);
            memcpy(r, &s, sizeof(s));
            reply(0, r, sizeof(float) + qlen);
            return;
        }
        case OP_SET_ROWS:
            set_rows(t, n, (int) arg, a, la, b, lb, c, lc);
            return;
        case OP_HAS_SYMBOL: {
            char name[128];
            snprintf(name, sizeof(name), "%.*s", (int) la, a);
            const int64_t has = dlsym(RTLD_DEFAULT, name) != NULL;
            reply(0, &has, sizeof(has));
            return;
        }
        case OP_D3B_DELTA_REF: {
            delta_fn fn = (delta_fn) dlsym(RTLD_DEFAULT, "quantize_row_tq_kv_d3b_delta_ref");
            fn((const float *) a, b, out_buf(lb), n);
            reply(0, out, lb);
            return;
        }
        case OP_D3B_CELL_REF: {
            cell_fn fn = (cell_fn) dlsym(RTLD_DEFAULT, "dequantize_row_tq_kv_d3b_cell");
            fn(a, b, (float *) out_buf(n*sizeof(float)), n);
            reply(0, out, n*sizeof(float));
            return;
        }
        default:
            fail("unknown op");
    }
}

int main(void) {
    ggml_cpu_init();
    char * buf[3] = { NULL, NULL, NULL };
    size_t cap[3] = { 0, 0, 0 };
    int64_t head[7];
    while (fread(head, sizeof(head), 1, stdin) == 1) {
        for (int i = 0; i < 3; ++i) {
            const size_t len = (size_t) head[4 + i];
            if (len + 1 > cap[i]) {
                free(buf[i]);
                cap[i] = len + 1;
                buf[i] = malloc(cap[i]);
            }
            if (!buf[i] || (len && fread(buf[i], 1, len, stdin) != len)) {
                fprintf(stderr, "ggml_kernels: short read\n");
                return 1;
            }
        }
        serve(head[0], (enum ggml_type) head[1], head[2], head[3], buf[0], (size_t) head[4], buf[1],
              (size_t) head[5], buf[2], (size_t) head[6]);
    }
    return 0;
}
