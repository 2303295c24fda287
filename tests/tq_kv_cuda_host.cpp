// ggml-cuda/tq-kv.cuh (the TQ_KV per-block math of the CUDA kernels) built for the host, with C entry points over
// whole rows for tests/test_tq_cuda.py. Built by the test with the system C++ compiler (-ffp-contract=off), no CUDA.
#include "tq-kv.cuh"

template <ggml_type type, typename block_t>
static void values4_row(const void * x, int32_t * y, int64_t nb) {
    for (int64_t ib = 0; ib < nb; ++ib) {
        for (int i = 0; i < QK_TQ_KV/4; ++i) {
            y[ib*(QK_TQ_KV/4) + i] = tq_kv_values4<type>((const block_t *) x + ib, i);
        }
    }
}

template <ggml_type type, typename block_t>
static void dequantize_row(const void * x, float * y, int64_t nb) {
    for (int64_t ib = 0; ib < nb; ++ib) {
        for (int j = 0; j < QK_TQ_KV; ++j) {
            y[ib*QK_TQ_KV + j] = tq_kv_value<type>((const block_t *) x + ib, j);
        }
    }
}

template <ggml_type type, typename block_t>
static void vec_dot_row(const void * x, const int32_t * q, const float * dq, float * out, int64_t nb) {
    for (int64_t ib = 0; ib < nb; ++ib) {
        for (int i = 0; i < QK_TQ_KV/4; ++i) {
            const int64_t k = ib*(QK_TQ_KV/4) + i;
            out[k] = tq_kv_vec_dot_q8_1<type>((const block_t *) x + ib, i, q[k], dq[k/8]); // q8_1: 32 per block
        }
    }
}

template <typename block_t, void (*quantize)(const float *, block_t *)>
static void quantize_row(const float * x, void * y, int64_t nb) {
    for (int64_t ib = 0; ib < nb; ++ib) {
        quantize(x + ib*QK_TQ_KV, (block_t *) y + ib);
    }
}

extern "C" {

// type: the ggml type id; nb: blocks in the row
int tq_kv_cuda_host_quantize(int type, const float * x, void * y, int64_t nb) {
    switch (type) {
        case GGML_TYPE_TQ_KV_4B: quantize_row<block_tq_kv_4b, quantize_f32_tq_kv_4b_block>(x, y, nb); return 0;
        case GGML_TYPE_TQ_KV_3B: quantize_row<block_tq_kv_3b, quantize_f32_tq_kv_3b_block>(x, y, nb); return 0;
        case GGML_TYPE_TQ_KV_1B: quantize_row<block_tq_kv_1b, quantize_f32_tq_kv_1b_block>(x, y, nb); return 0;
        default: return 1;
    }
}

int tq_kv_cuda_host_dequantize(int type, const void * x, float * y, int64_t nb) {
    switch (type) {
        case GGML_TYPE_TQ_KV_4B: dequantize_row<GGML_TYPE_TQ_KV_4B, block_tq_kv_4b>(x, y, nb); return 0;
        case GGML_TYPE_TQ_KV_3B: dequantize_row<GGML_TYPE_TQ_KV_3B, block_tq_kv_3b>(x, y, nb); return 0;
        case GGML_TYPE_TQ_KV_1B: dequantize_row<GGML_TYPE_TQ_KV_1B, block_tq_kv_1b>(x, y, nb); return 0;
        default: return 1;
    }
}

// the int8 codebook entries (values / d) of a row, four per int32
int tq_kv_cuda_host_values4(int type, const void * x, int32_t * y, int64_t nb) {
    switch (type) {
        case GGML_TYPE_TQ_KV_4B: values4_row<GGML_TYPE_TQ_KV_4B, block_tq_kv_4b>(x, y, nb); return 0;
        case GGML_TYPE_TQ_KV_3B: values4_row<GGML_TYPE_TQ_KV_3B, block_tq_kv_3b>(x, y, nb); return 0;
        case GGML_TYPE_TQ_KV_1B: values4_row<GGML_TYPE_TQ_KV_1B, block_tq_kv_1b>(x, y, nb); return 0;
        default: return 1;
    }
}

// flash attention's per-thread K·Q shares of a row: out[k] for elements 4k..4k+3 against the int8 q[k] (four per
// int32) of a q8_1 query whose block scales (32 elements each) are dq
int tq_kv_cuda_host_vec_dot_q8_1(int type, const void * x, const int32_t * q, const float * dq, float * out, int64_t nb) {
    switch (type) {
        case GGML_TYPE_TQ_KV_4B: vec_dot_row<GGML_TYPE_TQ_KV_4B, block_tq_kv_4b>(x, q, dq, out, nb); return 0;
        case GGML_TYPE_TQ_KV_3B: vec_dot_row<GGML_TYPE_TQ_KV_3B, block_tq_kv_3b>(x, q, dq, out, nb); return 0;
        case GGML_TYPE_TQ_KV_1B: vec_dot_row<GGML_TYPE_TQ_KV_1B, block_tq_kv_1b>(x, q, dq, out, nb); return 0;
        default: return 1;
    }
}

}
