// Helpers shared by the op library's CPU (dtop_ops.cpp) and CUDA (dtop_ops_cuda.cpp)
// implementations: the stable ABI's tensor calls in the shapes those files use, and the checks of
// a token set's layout (dtype, rank) that both make before reading or launching anything.
#pragma once

#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>

#include <cstdint>
#include <vector>

#define DTOP_CHECK(cond, ...) STD_TORCH_CHECK(cond, "dtop::", __VA_ARGS__)

namespace dtop_oplib {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;
using Sizes = std::vector<int64_t>;

inline Tensor contig(const Tensor& t) {
  return t.is_contiguous() ? t : torch::stable::contiguous(t);
}

inline Tensor new_empty(const Tensor& like, Sizes size, ScalarType dt) {
  return torch::stable::new_empty(
      like, torch::headeronly::IntHeaderOnlyArrayRef(size.data(), size.size()), dt);
}

inline Tensor new_zeros(const Tensor& like, Sizes size, ScalarType dt) {
  return torch::stable::new_zeros(
      like, torch::headeronly::IntHeaderOnlyArrayRef(size.data(), size.size()), dt);
}

// int32 offsets [B + 1] (cu_seqlens, cu_seqlens_q, cu_seqlens_k).
inline void check_offsets(const Tensor& cu, const char* op, const char* name) {
  DTOP_CHECK(cu.scalar_type() == ScalarType::Int && cu.dim() == 1 && cu.size(0) >= 1, op, ": ",
             name, " must be int32 [B + 1]");
}

// A token set: indices int32 [capacity], cu_seqlens int32 [B + 1], seq_len N > 0.
inline void check_token_set(const Tensor& indices, const Tensor& cu_seqlens, int64_t seq_len,
                            const char* op) {
  DTOP_CHECK(indices.scalar_type() == ScalarType::Int && cu_seqlens.scalar_type() ==
             ScalarType::Int, op, ": indices and cu_seqlens must be int32");
  DTOP_CHECK(indices.dim() == 1 && cu_seqlens.dim() == 1 && cu_seqlens.size(0) >= 1, op,
             ": indices must be 1-D [capacity] and cu_seqlens 1-D [B + 1]");
  DTOP_CHECK(seq_len > 0, op, ": seq_len must be positive; got ", seq_len);
}

}  // namespace dtop_oplib
