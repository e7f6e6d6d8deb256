// CUDA kernels (contracts in kfac_ext.h), launched on the current stream of the tensors' device. Indexing is 64-bit
// throughout; grids stride over rows so that any size fits the launch limits.
#include "kfac_ext.h"

#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>

namespace kfac_ext {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kTile = 32;  // mirror: 32 x 32 tiles, kTile x kRows threads
constexpr int kRows = 8;
constexpr int64_t kMaxGridY = 65535;

unsigned int blocks_for(int64_t n, int threads = kThreads) {
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min<int64_t>((n + threads - 1) / threads, 1 << 30)));
}

unsigned int grid_rows(int64_t rows) { return static_cast<unsigned int>(std::max<int64_t>(1, std::min(rows, kMaxGridY))); }

__host__ __device__ inline int64_t packed_off(int64_t i, int64_t d) { return i * d - i * (i - 1) / 2; }

// Tile (ib, jb), jb <= ib, of the lower triangle <- transpose of tile (jb, ib) of the upper one, through shared memory
// so that both the read and the write are coalesced.
template <typename T>
__global__ void mirror_kernel(T* p, int64_t d, int64_t s0, int64_t s1) {
  __shared__ T tile[kTile][kTile + 1];
  const int64_t ib = blockIdx.y, jb = blockIdx.x;
  if (jb > ib) return;
  for (int r = threadIdx.y; r < kTile; r += kRows) {
    const int64_t i = jb * kTile + r, j = ib * kTile + threadIdx.x;  // upper source element (i, j)
    if (i < d && j < d) tile[r][threadIdx.x] = p[i * s0 + j * s1];
  }
  __syncthreads();
  for (int r = threadIdx.y; r < kTile; r += kRows) {
    const int64_t i = ib * kTile + r, j = jb * kTile + threadIdx.x;  // lower destination element (i, j)
    if (i < d && j < i) p[i * s0 + j * s1] = tile[threadIdx.x][r];
  }
}

template <typename T>
__global__ void pack_tile_kernel(const T* tile, int64_t rows, int64_t i0, int64_t d, T* dst, T alpha, T beta) {
  const int64_t width = d - i0;
  for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
    const int64_t i = i0 + r;
    const int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (k >= d - i) continue;
    T* out = dst + packed_off(i, d) + k;
    const T value = alpha * tile[r * width + r + k];
    *out = beta == T(0) ? value : beta * *out + value;
  }
}

template <typename T>
__global__ void pack_matrix_kernel(const T* m, int64_t d, int64_t s0, int64_t s1, T scale, T* dst) {
  for (int64_t i = blockIdx.y; i < d; i += gridDim.y) {
    const int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (k < d - i) dst[packed_off(i, d) + k] = scale * m[i * s0 + (i + k) * s1];
  }
}

template <typename T>
__global__ void unpack_rows_kernel(const T* src, int64_t d, T* out) {
  for (int64_t i = blockIdx.y; i < d; i += gridDim.y) {
    const int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (k < d - i) out[i * d + i + k] = src[packed_off(i, d) + k];
  }
}

template <typename T>
__global__ void eigen_scale_kernel(const T* v, int64_t vs0, int64_t vs1, const T* d_g, const T* d_a, T damping,
                                   int64_t m, int64_t n, T* out, T* acc, int64_t as0, int64_t as1) {
  const int64_t total = m * n, step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total; idx += step) {
    const int64_t i = idx / n, j = idx - i * n;
    const T x = v[i * vs0 + j * vs1];
    out[idx] = x / (d_g[i] * d_a[j] + damping);
    if (acc != nullptr) acc[i * as0 + j * as1] += x * x;
  }
}

}  // namespace

void mirror_upper(const at::Tensor& m) {
  const int64_t d = m.size(0);
  if (d < 2) return;
  const c10::cuda::OptionalCUDAGuard guard(m.device());
  const auto tiles = static_cast<unsigned int>((d + kTile - 1) / kTile);
  AT_DISPATCH_FLOATING_TYPES(m.scalar_type(), "kfac_ext::mirror_upper", [&] {
    mirror_kernel<scalar_t><<<dim3(tiles, tiles), dim3(kTile, kRows), 0, c10::cuda::getCurrentCUDAStream()>>>(
        m.data_ptr<scalar_t>(), d, m.stride(0), m.stride(1));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void pack_tile_rows(const at::Tensor& tile, int64_t i0, int64_t d, const at::Tensor& buffer, int64_t offset,
                    double alpha, double beta) {
  const c10::cuda::OptionalCUDAGuard guard(tile.device());
  const int64_t rows = tile.size(0);
  AT_DISPATCH_FLOATING_TYPES(tile.scalar_type(), "kfac_ext::pack_tile_rows", [&] {
    pack_tile_kernel<scalar_t><<<dim3(blocks_for(d - i0), grid_rows(rows)), kThreads, 0,
                                 c10::cuda::getCurrentCUDAStream()>>>(
        tile.data_ptr<scalar_t>(), rows, i0, d, buffer.data_ptr<scalar_t>() + offset, static_cast<scalar_t>(alpha),
        static_cast<scalar_t>(beta));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void pack_many(const std::vector<at::Tensor>& mats, const std::vector<PackedSlot>& slots, const at::Tensor& buffer) {
  const c10::cuda::OptionalCUDAGuard guard(buffer.device());
  AT_DISPATCH_FLOATING_TYPES(buffer.scalar_type(), "kfac_ext::pack_many", [&] {
    for (size_t k = 0; k < mats.size(); ++k) {
      const int64_t d = slots[k].dim;
      if (d == 0) continue;
      pack_matrix_kernel<scalar_t><<<dim3(blocks_for(d), grid_rows(d)), kThreads, 0,
                                     c10::cuda::getCurrentCUDAStream()>>>(
          mats[k].data_ptr<scalar_t>(), d, mats[k].stride(0), mats[k].stride(1),
          static_cast<scalar_t>(slots[k].scale), buffer.data_ptr<scalar_t>() + slots[k].offset);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

void unpack_many(const at::Tensor& flat, const std::vector<PackedSlot>& slots, const std::vector<at::Tensor>& outs) {
  const c10::cuda::OptionalCUDAGuard guard(flat.device());
  AT_DISPATCH_FLOATING_TYPES(flat.scalar_type(), "kfac_ext::unpack_many", [&] {
    for (size_t k = 0; k < outs.size(); ++k) {
      const int64_t d = slots[k].dim;
      if (d == 0) continue;
      unpack_rows_kernel<scalar_t><<<dim3(blocks_for(d), grid_rows(d)), kThreads, 0,
                                     c10::cuda::getCurrentCUDAStream()>>>(
          flat.data_ptr<scalar_t>() + slots[k].offset, d, outs[k].data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      mirror_upper(outs[k]);
    }
  });
}

void eigen_scale(const at::Tensor& v, const at::Tensor& d_g, const at::Tensor& d_a, double damping,
                 const at::Tensor& out, const at::Tensor& acc) {
  const c10::cuda::OptionalCUDAGuard guard(v.device());
  const int64_t m = v.size(0), n = v.size(1);
  const bool accumulate = acc.defined();
  AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "kfac_ext::eigen_scale", [&] {
    eigen_scale_kernel<scalar_t><<<std::min<unsigned int>(blocks_for(m * n), 65535u * 8u), kThreads, 0,
                                   c10::cuda::getCurrentCUDAStream()>>>(
        v.data_ptr<scalar_t>(), v.stride(0), v.stride(1), d_g.data_ptr<scalar_t>(), d_a.data_ptr<scalar_t>(),
        static_cast<scalar_t>(damping), m, n, out.data_ptr<scalar_t>(),
        accumulate ? acc.data_ptr<scalar_t>() : nullptr, accumulate ? acc.stride(0) : 0,
        accumulate ? acc.stride(1) : 0);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace cuda
}  // namespace kfac_ext
