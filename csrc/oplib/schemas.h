// The schemas of the dtop:: ops, one per op: defined by the op library (dtop_ops.cpp) and, in
// the CUDA emulator's build of the CUDA implementations, under the namespace dtop_emulated.
// Sizes are SymInt, so that a batch or image size left dynamic in torch.export stays symbolic.
#pragma once

#include <torch/csrc/stable/library.h>

namespace dtop_oplib {

inline void define_schemas(torch::stable::detail::StableLibrary& m) {
  m.def("gather(Tensor x2d, Tensor indices, Tensor cu_seqlens, SymInt seq_len) -> Tensor");
  m.def("scatter(Tensor packed, Tensor indices, Tensor cu_seqlens, Tensor? base, SymInt seq_len, "
        "bool add) -> Tensor");
  m.def("layer_norm(Tensor x2d, Tensor weight, Tensor bias, Tensor indices, Tensor cu_seqlens, "
        "SymInt seq_len, float eps, bool gather_rows) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("varlen_attention(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, "
        "Tensor cu_seqlens_k, SymInt max_seqlen_q, SymInt max_seqlen_k, float scale, "
        "bool return_logits) -> (Tensor, Tensor, Tensor)");
  m.def("packed_linear(Tensor x2d, Tensor weight, Tensor? bias, Tensor? residual, Tensor? base, "
        "Tensor indices, Tensor cu_seqlens, SymInt seq_len, int act, bool gather_rows, "
        "bool save_pre) -> (Tensor, Tensor)");
  m.def("select(Tensor class_logits, Tensor mask_logits, Tensor indices, Tensor cu_seqlens, "
        "SymInt seq_len, SymInt max_seqlen, float threshold, int top_k) -> (Tensor, Tensor, Tensor)");
}

}  // namespace dtop_oplib
