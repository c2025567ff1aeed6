// kvforge's CPU kernels (AVX-512), bound to Python in bindings.cpp.
#pragma once

#include <torch/extension.h>

// qlinear.cpp: weight-only int4/int8 matmuls
torch::Tensor q4_linear(torch::Tensor x, torch::Tensor qs, torch::Tensor d, torch::Tensor m);
torch::Tensor q8_linear(torch::Tensor x, torch::Tensor qs, torch::Tensor d);
torch::Tensor q4_dequantize(torch::Tensor qs, torch::Tensor d, torch::Tensor m);
torch::Tensor q8_dequantize(torch::Tensor qs, torch::Tensor d);

// layer_ops.cpp: a decoder layer's small operations, and decode attention
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps,
                       c10::optional<torch::Tensor> residual);
torch::Tensor silu_mul(torch::Tensor gate_up);
void rope_store(torch::Tensor qkv, torch::Tensor cos, torch::Tensor sin, int64_t H,
                torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor slots);
torch::Tensor decode_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                               torch::Tensor tables, torch::Tensor lens, double scale,
                               int64_t window);
