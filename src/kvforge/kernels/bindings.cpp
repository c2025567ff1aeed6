#include "ops.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("q4_dequantize", &q4_dequantize, "a Q4_1 weight as float32 [N, K]");
  module.def("q8_dequantize", &q8_dequantize, "a Q8_0 weight as float32 [N, K]");
  module.def("q4_linear", &q4_linear, "x @ dequant(Q4_1 weight).T, float32");
  module.def("q8_linear", &q8_linear, "x @ dequant(Q8_0 weight).T, float32");
  module.def("rms_norm", &rms_norm, "RMSNorm of rows, after an optional in-place residual add",
             pybind11::arg("x"), pybind11::arg("weight"), pybind11::arg("eps"),
             pybind11::arg("residual") = pybind11::none());
  module.def("silu_mul", &silu_mul, "silu(gate) * up of [T, 2I] rows");
  module.def("rope_store", &rope_store, "RoPE on q and k in place; k and v to their cache slots");
  module.def("decode_attention", &decode_attention, "attention of one query token a sequence");
}
