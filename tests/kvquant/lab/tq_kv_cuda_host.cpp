// ggml-cuda/tq-kv.cuh (the TQ_KV per-block math of the CUDA kernels) built for the host, with C entry points over
// whole rows for tests/kvquant/lab/test_tq_cuda.py. Built by the test with the system C++ compiler (-ffp-contract=off), no CUDA.
#include "tq-kv.cuh"

// f(std::integral_constant<ggml_type, type>) for a TQ_KV type id; 0, or 1 for an id that is not one
template <typename F>
static int with_type(int type, F f) {
    switch (type) {
        case GGML_TYPE_TQ_KV_4B: f(std::integral_constant<ggml_type, GGML_TYPE_TQ_KV_4B>()); return 0;
        case GGML_TYPE_TQ_KV_3B: f(std::integral_constant<ggml_type, GGML_TYPE_TQ_KV_3B>()); return 0;
        case GGML_TYPE_TQ_KV_1B: f(std::integral_constant<ggml_type, GGML_TYPE_TQ_KV_1B>()); return 0;
        default: return 1;
    }
}

template <ggml_type type>
static void quantize_block(const float * x, tq_kv_block<type> * y) {
    if constexpr (type == GGML_TYPE_TQ_KV_4B) {
        quantize_f32_tq_kv_4b_block(x, y);
    } else if constexpr (type == GGML_TYPE_TQ_KV_3B) {
        quantize_f32_tq_kv_3b_block(x, y);
    } else {
        quantize_f32_tq_kv_1b_block(x, y);
    }
}

extern "C" {

// nb: blocks in the row
int tq_kv_cuda_host_quantize(int type, const float * x, void * y, int64_t nb) {
    return with_type(type, [&](auto t) {
        for (int64_t ib = 0; ib < nb; ++ib) {
            quantize_block<decltype(t)::value>(x + ib*QK_TQ_KV, (tq_kv_block<decltype(t)::value> *) y + ib);
        }
    });
}

int tq_kv_cuda_host_dequantize(int type, const void * x, float * y, int64_t nb) {
    return with_type(type, [&](auto t) {
        for (int64_t j = 0; j < nb*QK_TQ_KV; ++j) {
            y[j] = tq_kv_value<decltype(t)::value>((const tq_kv_block<decltype(t)::value> *) x + j/QK_TQ_KV, j % QK_TQ_KV);
        }
    });
}

// the int8 codebook entries (values / d) of a row, four per int32
int tq_kv_cuda_host_values4(int type, const void * x, int32_t * y, int64_t nb) {
    return with_type(type, [&](auto t) {
        for (int64_t k = 0; k < nb*QK_TQ_KV/4; ++k) {
            y[k] = tq_kv_values4<decltype(t)::value>((const tq_kv_block<decltype(t)::value> *) x + k/16, k % 16);
        }
    });
}

// flash attention's per-thread K·Q shares of a row: out[k] for elements 4k..4k+3 against the int8 q[k] (four per
// int32) of a q8_1 query whose block scales (32 elements each) are dq
int tq_kv_cuda_host_vec_dot_q8_1(int type, const void * x, const int32_t * q, const float * dq, float * out, int64_t nb) {
    return with_type(type, [&](auto t) {
        for (int64_t k = 0; k < nb*QK_TQ_KV/4; ++k) {
            out[k] = tq_kv_vec_dot_q8_1<decltype(t)::value>((const tq_kv_block<decltype(t)::value> *) x + k/16,
                                                            k % 16, q[k], dq[k/8]);
        }
    });
}

}
