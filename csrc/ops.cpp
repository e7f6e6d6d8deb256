// Operator layer: input validation, the blocked symmetric rank-k update, and registration as torch.ops.kfac_ext.*.
//
// sym_outer*: S = X^T X (X: N x d) is computed one row block [i0, i1) at a time as X[:, i0:i1]^T X[:, i0:d] (a
// plain at::mm / addmm, i.e. the platform BLAS), so only the tiles on or above the diagonal are multiplied: with
// b row blocks that is (b + 1) / (2b) of the flops of a full product. The lower triangle is then mirrored (full
// matrix) or never formed (packed output), so results are exactly symmetric.
#include "kfac_ext.h"

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <torch/library.h>

#include <string>
#include <vector>

namespace kfac_ext {
namespace {

enum class Dev { CPU, CUDA };

Dev device_of(const at::Tensor& t, const char* op) {
  if (t.device().is_cpu()) return Dev::CPU;
#ifdef KFAC_WITH_CUDA
  if (t.device().is_cuda()) return Dev::CUDA;
#endif
  TORCH_CHECK(!t.device().is_cuda(), op, ": this build of the kfac extension has no CUDA kernels (it was compiled "
              "without CUDA); rebuild it on a machine with CUDA, or use the PyTorch fallback");
  TORCH_CHECK(false, op, ": unsupported device ", t.device(), " (CPU and CUDA only)");
}

#ifdef KFAC_WITH_CUDA
#define KFAC_KERNEL(dev, fn, ...) ((dev) == Dev::CUDA ? cuda::fn(__VA_ARGS__) : cpu::fn(__VA_ARGS__))
#else
#define KFAC_KERNEL(dev, fn, ...) ((void)(dev), cpu::fn(__VA_ARGS__))
#endif

void check_float(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is undefined");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, op, ": ", name,
              " must be float32 or float64, got ", t.scalar_type());
}

void check_like(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name, const char* ref_name) {
  check_float(t, op, name);
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(), " but ", ref_name,
              " has dtype ", ref.scalar_type());
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but ", ref_name, " is on ",
              ref.device());
}

// "[a, b]", formatted here: streaming an IntArrayRef into TORCH_CHECK crashed one torch 2.11 + CUDA 13 build.
std::string shape_of(const at::Tensor& t) {
  std::string s = "[";
  for (int64_t i = 0; i < t.dim(); ++i) s += (i ? ", " : "") + std::to_string(t.size(i));
  return s + "]";
}

void check_dim(const at::Tensor& t, int64_t dim, const char* op, const char* name) {
  TORCH_CHECK(t.dim() == dim, op, ": ", name, " must be ", dim, "-D, got shape ", shape_of(t));
}

void check_writable(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(at::has_internal_overlap(t) != at::MemOverlap::Yes, op, ": ", name,
              " has overlapping memory (e.g. an expanded tensor) and cannot be written in place");
}

// A flat output buffer that receives `needed` elements from `offset` on.
void check_buffer(const at::Tensor& buffer, int64_t offset, int64_t needed, const char* op) {
  check_dim(buffer, 1, op, "buffer");
  TORCH_CHECK(buffer.is_contiguous(), op, ": buffer must be contiguous");
  TORCH_CHECK(offset >= 0, op, ": offset must be >= 0, got ", offset);
  TORCH_CHECK(offset + needed <= buffer.numel(), op, ": buffer too small: ", needed, " elements needed at offset ",
              offset, " but the buffer has ", buffer.numel());
}

// The rows of x, in a layout BLAS reads without a copy (x itself unless neither dimension has unit stride).
at::Tensor gemm_operand(const at::Tensor& x, const char* op) {
  check_float(x, op, "x");
  check_dim(x, 2, op, "x");
  device_of(x, op);
  return (x.stride(0) == 1 || x.stride(1) == 1) ? x : x.contiguous();
}

// Row-block height: about 8 blocks on CPU (flops (b + 1) / 2b of a full product, BLAS calls still large), fewer
// and larger blocks on CUDA, where each call costs a launch.
int64_t block_size(int64_t d, int64_t block, Dev dev) {
  if (block > 0) return block;
  const int64_t blocks = dev == Dev::CUDA ? 4 : 8, minimum = dev == Dev::CUDA ? 512 : 64;
  return std::max<int64_t>(minimum, ((d + blocks - 1) / blocks + 31) / 32 * 32);
}

// out[i, j] = beta * out[i, j] + alpha * (x^T x)[i, j] for i <= j (beta == 0 ignores out's contents).
void upper_rank_k_(at::Tensor& out, const at::Tensor& x, double alpha, double beta, int64_t block) {
  const int64_t d = x.size(1);
  for (int64_t i0 = 0; i0 < d; i0 += block) {
    const int64_t i1 = std::min(d, i0 + block);
    auto dst = out.slice(0, i0, i1).slice(1, i0, d);
    dst.addmm_(x.slice(1, i0, i1).t(), x.slice(1, i0, d), beta, alpha);
  }
}

// ---- operators -------------------------------------------------------------------------------------------------

void sym_outer_update_(at::Tensor out, const at::Tensor& x_in, double alpha, double beta, int64_t block) {
  constexpr const char* op = "sym_outer_update";
  const auto x = gemm_operand(x_in, op);
  check_like(out, x, op, "out", "x");
  const int64_t d = x.size(1);
  TORCH_CHECK(out.dim() == 2 && out.size(0) == d && out.size(1) == d, op, ": out must be ", d, " x ", d,
              " (x has ", d, " columns), got shape ", shape_of(out));
  check_writable(out, op, "out");
  if (d == 0) return;
  const Dev dev = device_of(x, op);
  upper_rank_k_(out, x, alpha, beta, block_size(d, block, dev));
  KFAC_KERNEL(dev, mirror_upper, out);
}

at::Tensor sym_outer(const at::Tensor& x, double alpha, int64_t block) {
  check_float(x, "sym_outer_update", "x");
  check_dim(x, 2, "sym_outer_update", "x");
  auto out = at::empty({x.size(1), x.size(1)}, x.options().memory_format(at::MemoryFormat::Contiguous));
  sym_outer_update_(out, x, alpha, 0.0, block);
  return out;
}

void sym_outer_pack_(at::Tensor buffer, int64_t offset, const at::Tensor& x_in, double alpha, double beta,
                     int64_t block) {
  constexpr const char* op = "sym_outer_pack";
  const auto x = gemm_operand(x_in, op);
  check_like(buffer, x, op, "buffer", "x");
  const int64_t d = x.size(1);
  check_buffer(buffer, offset, packed_size(d), op);
  if (d == 0) return;
  const Dev dev = device_of(x, op);
  block = std::min(d, block_size(d, block, dev));
  auto scratch = at::empty({block * d}, x.options());
  for (int64_t i0 = 0; i0 < d; i0 += block) {
    const int64_t rows = std::min(d, i0 + block) - i0, width = d - i0;
    auto tile = scratch.narrow(0, 0, rows * width).view({rows, width});
    at::mm_out(tile, x.slice(1, i0, i0 + rows).t(), x.slice(1, i0, d));
    KFAC_KERNEL(dev, pack_tile_rows, tile, i0, d, buffer, offset, alpha, beta);
  }
}

void pack_symmetric_many_(at::Tensor buffer, int64_t offset, at::TensorList mats, at::ArrayRef<double> scales) {
  constexpr const char* op = "pack_symmetric_many";
  check_float(buffer, op, "buffer");
  TORCH_CHECK(scales.empty() || scales.size() == mats.size(), op, ": got ", scales.size(), " scales for ",
              mats.size(), " matrices");
  std::vector<PackedSlot> slots;
  slots.reserve(mats.size());
  int64_t total = 0;
  for (size_t k = 0; k < mats.size(); ++k) {
    const auto& m = mats[k];
    const std::string name = "matrix " + std::to_string(k);
    check_like(m, buffer, op, name.c_str(), "buffer");
    TORCH_CHECK(m.dim() == 2 && m.size(0) == m.size(1), op, ": ", name, " must be square, got shape ", shape_of(m));
    slots.push_back({m.size(0), offset + total, scales.empty() ? 1.0 : scales[k]});
    total += packed_size(m.size(0));
  }
  check_buffer(buffer, offset, total, op);
  if (total == 0) return;
  KFAC_KERNEL(device_of(buffer, op), pack_many, mats.vec(), slots, buffer);
}

std::vector<at::Tensor> unpack_symmetric_many(const at::Tensor& flat_in, int64_t offset, at::IntArrayRef dims) {
  constexpr const char* op = "unpack_symmetric_many";
  check_float(flat_in, op, "flat");
  check_dim(flat_in, 1, op, "flat");
  const auto flat = flat_in.contiguous();
  TORCH_CHECK(offset >= 0, op, ": offset must be >= 0, got ", offset);
  std::vector<PackedSlot> slots;
  std::vector<at::Tensor> outs;
  int64_t total = 0;
  for (const int64_t d : dims) {
    TORCH_CHECK(d >= 0, op, ": dims must be >= 0, got ", d);
    slots.push_back({d, offset + total, 1.0});
    outs.push_back(at::empty({d, d}, flat.options()));
    total += packed_size(d);
  }
  TORCH_CHECK(offset + total <= flat.numel(), op, ": flat too small: dims need ", total, " elements at offset ",
              offset, " but flat has ", flat.numel());
  if (total > 0) KFAC_KERNEL(device_of(flat, op), unpack_many, flat, slots, outs);
  return outs;
}

at::Tensor eigen_scale_impl(const at::Tensor& v, const at::Tensor& d_g_in, const at::Tensor& d_a_in, double damping,
                            const at::Tensor& acc) {
  constexpr const char* op = "eigen_scale";
  check_float(v, op, "v");
  check_dim(v, 2, op, "v");
  check_like(d_g_in, v, op, "d_g", "v");
  check_like(d_a_in, v, op, "d_a", "v");
  TORCH_CHECK(d_g_in.dim() == 1 && d_g_in.size(0) == v.size(0), op, ": d_g must have shape (", v.size(0),
              ",) to match v of shape ", shape_of(v), ", got ", shape_of(d_g_in));
  TORCH_CHECK(d_a_in.dim() == 1 && d_a_in.size(0) == v.size(1), op, ": d_a must have shape (", v.size(1),
              ",) to match v of shape ", shape_of(v), ", got ", shape_of(d_a_in));
  if (acc.defined()) {
    check_like(acc, v, op, "acc", "v");
    TORCH_CHECK(acc.sizes() == v.sizes(), op, ": acc must have the shape of v ", shape_of(v), ", got ", shape_of(acc));
    check_writable(acc, op, "acc");
  }
  const Dev dev = device_of(v, op);
  auto out = at::empty(v.sizes(), v.options().memory_format(at::MemoryFormat::Contiguous));
  if (v.numel() == 0) return out;
  KFAC_KERNEL(dev, eigen_scale, v, d_g_in.contiguous(), d_a_in.contiguous(), damping, out, acc);
  return out;
}

at::Tensor eigen_scale(const at::Tensor& v, const at::Tensor& d_g, const at::Tensor& d_a, double damping) {
  return eigen_scale_impl(v, d_g, d_a, damping, at::Tensor());
}

at::Tensor eigen_scale_acc_(const at::Tensor& v, const at::Tensor& d_g, const at::Tensor& d_a, double damping,
                            at::Tensor acc) {
  return eigen_scale_impl(v, d_g, d_a, damping, acc);
}

std::string build_info() {
  std::string info = "cuda=";
#ifdef KFAC_WITH_CUDA
  info += "yes";
#else
  info += "no";
#endif
  info += " openmp=";
#ifdef _OPENMP
  info += "yes";
#else
  info += "no";
#endif
  return info;
}

}  // namespace
}  // namespace kfac_ext

TORCH_LIBRARY(kfac_ext, m) {
  m.def("sym_outer(Tensor x, float alpha, int block) -> Tensor");
  m.def("sym_outer_update_(Tensor(a!) out, Tensor x, float alpha, float beta, int block) -> ()");
  m.def("sym_outer_pack_(Tensor(a!) buffer, int offset, Tensor x, float alpha, float beta, int block) -> ()");
  m.def("pack_symmetric_many_(Tensor(a!) buffer, int offset, Tensor[] mats, float[] scales) -> ()");
  m.def("unpack_symmetric_many(Tensor flat, int offset, int[] dims) -> Tensor[]");
  m.def("eigen_scale(Tensor v, Tensor d_g, Tensor d_a, float damping) -> Tensor");
  m.def("eigen_scale_acc_(Tensor v, Tensor d_g, Tensor d_a, float damping, Tensor(a!) acc) -> Tensor");
  m.def("build_info() -> str", &kfac_ext::build_info);
}

// One kernel per operator for every backend: the operators pick the device kernels themselves (and raise a clear
// error for devices this build has no kernels for).
TORCH_LIBRARY_IMPL(kfac_ext, CompositeExplicitAutograd, m) {
  m.impl("sym_outer", &kfac_ext::sym_outer);
  m.impl("sym_outer_update_", &kfac_ext::sym_outer_update_);
  m.impl("sym_outer_pack_", &kfac_ext::sym_outer_pack_);
  m.impl("pack_symmetric_many_", &kfac_ext::pack_symmetric_many_);
  m.impl("unpack_symmetric_many", &kfac_ext::unpack_symmetric_many);
  m.impl("eigen_scale", &kfac_ext::eigen_scale);
  m.impl("eigen_scale_acc_", &kfac_ext::eigen_scale_acc_);
}
