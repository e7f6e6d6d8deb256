// Fused K-FAC factor kernels: declarations shared by the operator layer (ops.cpp) and the device kernels.
//
// Conventions (identical to kfac/comm.py):
//   * a symmetric d x d matrix S is "packed" as its upper triangle, diagonal included, row-major, i.e. in the
//     order of torch.triu_indices(d, d); row i starts at packed_offset(i, d) = i*d - i*(i-1)/2 and holds
//     S[i, i], S[i, i+1], ..., S[i, d-1];
//   * all kernels take float32 or float64 tensors; every Tensor argument has been validated by ops.cpp (dtype,
//     device, shape, and contiguity where a raw pointer walks it) before a kernel sees it.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

namespace kfac_ext {

// Start of row i of a packed d x d upper triangle.
inline int64_t packed_offset(int64_t i, int64_t d) { return i * d - i * (i - 1) / 2; }

// Number of elements of a packed d x d upper triangle.
inline int64_t packed_size(int64_t d) { return d * (d + 1) / 2; }

// One matrix of a pack/unpack batch: where its packed triangle starts in the flat buffer.
struct PackedSlot {
  int64_t dim;
  int64_t offset;  // element offset into the flat buffer
  double scale;    // pack: multiplier applied to every element (unpack: unused)
};

// Device kernels. Each namespace (cpu, cuda) implements the same five contracts.
namespace cpu {
// m[i, j] = m[j, i] for every i > j (m: square, any strides).
void mirror_upper(const at::Tensor& m);

// Rows [i0, i0 + tile.size(0)) of a packed d x d triangle, from a contiguous tile of width d - i0 whose local
// column c is global column i0 + c: buffer[offset + packed_offset(i) + k] = beta * (same) + alpha * tile[i - i0,
// i - i0 + k] for k < d - i. beta == 0 overwrites (the old contents are never read).
void pack_tile_rows(const at::Tensor& tile, int64_t i0, int64_t d, const at::Tensor& buffer, int64_t offset,
                    double alpha, double beta);

// buffer[slots[k].offset + packed index of (i, j)] = slots[k].scale * mats[k][i, j] for i <= j (mats: any strides).
void pack_many(const std::vector<at::Tensor>& mats, const std::vector<PackedSlot>& slots, const at::Tensor& buffer);

// outs[k] (contiguous d x d) = the symmetric matrix whose packed triangle starts at flat[slots[k].offset].
void unpack_many(const at::Tensor& flat, const std::vector<PackedSlot>& slots, const std::vector<at::Tensor>& outs);

// out[i, j] = v[i, j] / (d_g[i] * d_a[j] + damping) (out contiguous; v any strides; d_g, d_a contiguous); when acc
// is defined, also acc[i, j] += v[i, j]^2 (acc any strides).
void eigen_scale(const at::Tensor& v, const at::Tensor& d_g, const at::Tensor& d_a, double damping,
                 const at::Tensor& out, const at::Tensor& acc);
}  // namespace cpu

#ifdef KFAC_WITH_CUDA
namespace cuda {  // same contracts as cpu::, on the tensors' CUDA device and current stream
void mirror_upper(const at::Tensor& m);
void pack_tile_rows(const at::Tensor& tile, int64_t i0, int64_t d, const at::Tensor& buffer, int64_t offset,
                    double alpha, double beta);
void pack_many(const std::vector<at::Tensor>& mats, const std::vector<PackedSlot>& slots, const at::Tensor& buffer);
void unpack_many(const at::Tensor& flat, const std::vector<PackedSlot>& slots, const std::vector<at::Tensor>& outs);
void eigen_scale(const at::Tensor& v, const at::Tensor& d_g, const at::Tensor& d_a, double damping,
                 const at::Tensor& out, const at::Tensor& acc);
}  // namespace cuda
#endif

}  // namespace kfac_ext
