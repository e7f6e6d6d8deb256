// CPU kernels (contracts in kfac_ext.h). Memory-bound loops parallelised with at::parallel_for, so they follow
// torch.set_num_threads; inner loops are unit-stride where the layout allows, for the compiler to vectorise.
#include "kfac_ext.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>

namespace kfac_ext {
namespace cpu {
namespace {

constexpr int64_t kGrain = 32768;  // elements per task below which a loop stays on one thread
constexpr int64_t kTile = 64;      // mirror tile edge (a float64 tile is 32 KiB)

int64_t rows_per_task(int64_t row_length) { return std::max<int64_t>(1, kGrain / std::max<int64_t>(1, row_length)); }

// Lower-triangular tile k (row-major over tiles (ib, jb), jb <= ib) -> ib.
int64_t tile_row(int64_t k) {
  auto ib = static_cast<int64_t>((std::sqrt(8.0 * static_cast<double>(k) + 1.0) - 1.0) / 2.0);
  while (ib * (ib + 1) / 2 > k) --ib;
  while ((ib + 1) * (ib + 2) / 2 <= k) ++ib;
  return ib;
}

template <typename T>
void mirror_impl(T* p, int64_t d, int64_t s0, int64_t s1) {
  const int64_t nt = (d + kTile - 1) / kTile;
  const int64_t tiles = nt * (nt + 1) / 2;
  at::parallel_for(0, tiles, std::max<int64_t>(1, kGrain / (kTile * kTile)), [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const int64_t ib = tile_row(k), jb = k - ib * (ib + 1) / 2;
      const int64_t i_end = std::min(d, (ib + 1) * kTile);
      for (int64_t i = ib * kTile; i < i_end; ++i) {
        const int64_t j_end = std::min(i, (jb + 1) * kTile);
        for (int64_t j = jb * kTile; j < j_end; ++j) p[i * s0 + j * s1] = p[j * s0 + i * s1];
      }
    }
  });
}

// dst[k] = beta * dst[k] + alpha * src[k * stride], k < n; beta == 0 never reads dst.
template <typename T>
inline void scaled_copy(T* dst, const T* src, int64_t n, int64_t stride, T alpha, T beta) {
  if (stride == 1) {
    if (beta == T(0)) {
      for (int64_t k = 0; k < n; ++k) dst[k] = alpha * src[k];
    } else {
      for (int64_t k = 0; k < n; ++k) dst[k] = beta * dst[k] + alpha * src[k];
    }
  } else {
    for (int64_t k = 0; k < n; ++k) dst[k] = beta == T(0) ? alpha * src[k * stride] : beta * dst[k] + alpha * src[k * stride];
  }
}

// Rows of several matrices as one index space: global row g belongs to matrix k with starts[k] <= g < starts[k+1].
std::vector<int64_t> row_starts(const std::vector<PackedSlot>& slots) {
  std::vector<int64_t> starts(slots.size() + 1, 0);
  for (size_t k = 0; k < slots.size(); ++k) starts[k + 1] = starts[k] + slots[k].dim;
  return starts;
}

template <typename F>
void for_each_row(const std::vector<PackedSlot>& slots, const F& body) {
  const auto starts = row_starts(slots);
  const int64_t rows = starts.back();
  if (rows == 0) return;
  int64_t elements = 0;
  for (const auto& s : slots) elements += packed_size(s.dim);
  at::parallel_for(0, rows, rows_per_task(elements / rows), [&](int64_t begin, int64_t end) {
    auto k = static_cast<size_t>(std::upper_bound(starts.begin(), starts.end(), begin) - starts.begin() - 1);
    for (int64_t g = begin; g < end; ++g) {
      while (g >= starts[k + 1]) ++k;
      body(k, g - starts[k]);
    }
  });
}

}  // namespace

void mirror_upper(const at::Tensor& m) {
  AT_DISPATCH_FLOATING_TYPES(m.scalar_type(), "kfac_ext::mirror_upper", [&] {
    mirror_impl<scalar_t>(m.data_ptr<scalar_t>(), m.size(0), m.stride(0), m.stride(1));
  });
}

void pack_tile_rows(const at::Tensor& tile, int64_t i0, int64_t d, const at::Tensor& buffer, int64_t offset,
                    double alpha, double beta) {
  const int64_t rows = tile.size(0), width = d - i0;
  AT_DISPATCH_FLOATING_TYPES(tile.scalar_type(), "kfac_ext::pack_tile_rows", [&] {
    const scalar_t* src = tile.data_ptr<scalar_t>();
    scalar_t* dst = buffer.data_ptr<scalar_t>() + offset;
    const auto a = static_cast<scalar_t>(alpha), b = static_cast<scalar_t>(beta);
    at::parallel_for(0, rows, rows_per_task(width), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t i = i0 + r;
        scaled_copy(dst + packed_offset(i, d), src + r * width + r, d - i, 1, a, b);
      }
    });
  });
}

void pack_many(const std::vector<at::Tensor>& mats, const std::vector<PackedSlot>& slots, const at::Tensor& buffer) {
  AT_DISPATCH_FLOATING_TYPES(buffer.scalar_type(), "kfac_ext::pack_many", [&] {
    scalar_t* dst = buffer.data_ptr<scalar_t>();
    std::vector<const scalar_t*> src(mats.size());
    for (size_t k = 0; k < mats.size(); ++k) src[k] = mats[k].data_ptr<scalar_t>();
    for_each_row(slots, [&](size_t k, int64_t i) {
      const int64_t d = slots[k].dim, s0 = mats[k].stride(0), s1 = mats[k].stride(1);
      scaled_copy(dst + slots[k].offset + packed_offset(i, d), src[k] + i * s0 + i * s1, d - i, s1,
                  static_cast<scalar_t>(slots[k].scale), scalar_t(0));
    });
  });
}

void unpack_many(const at::Tensor& flat, const std::vector<PackedSlot>& slots, const std::vector<at::Tensor>& outs) {
  AT_DISPATCH_FLOATING_TYPES(flat.scalar_type(), "kfac_ext::unpack_many", [&] {
    const scalar_t* src = flat.data_ptr<scalar_t>();
    std::vector<scalar_t*> dst(outs.size());
    for (size_t k = 0; k < outs.size(); ++k) dst[k] = outs[k].data_ptr<scalar_t>();
    for_each_row(slots, [&](size_t k, int64_t i) {
      const int64_t d = slots[k].dim;
      std::copy_n(src + slots[k].offset + packed_offset(i, d), d - i, dst[k] + i * d + i);
    });
  });
  for (const auto& m : outs) mirror_upper(m);
}

void eigen_scale(const at::Tensor& v, const at::Tensor& d_g, const at::Tensor& d_a, double damping,
                 const at::Tensor& out, const at::Tensor& acc) {
  const int64_t m = v.size(0), n = v.size(1);
  const bool accumulate = acc.defined();
  AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "kfac_ext::eigen_scale", [&] {
    const scalar_t* pv = v.data_ptr<scalar_t>();
    const scalar_t* pg = d_g.data_ptr<scalar_t>();
    const scalar_t* pa = d_a.data_ptr<scalar_t>();
    scalar_t* po = out.data_ptr<scalar_t>();
    scalar_t* pacc = accumulate ? acc.data_ptr<scalar_t>() : nullptr;
    const int64_t vs0 = v.stride(0), vs1 = v.stride(1);
    const int64_t as0 = accumulate ? acc.stride(0) : 0, as1 = accumulate ? acc.stride(1) : 0;
    const auto damp = static_cast<scalar_t>(damping);
    at::parallel_for(0, m, rows_per_task(n), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const scalar_t g = pg[i];
        const scalar_t* vr = pv + i * vs0;
        scalar_t* orow = po + i * n;
        if (vs1 == 1) {
          for (int64_t j = 0; j < n; ++j) orow[j] = vr[j] / (g * pa[j] + damp);
        } else {
          for (int64_t j = 0; j < n; ++j) orow[j] = vr[j * vs1] / (g * pa[j] + damp);
        }
        if (accumulate) {
          scalar_t* ar = pacc + i * as0;
          if (vs1 == 1 && as1 == 1) {
            for (int64_t j = 0; j < n; ++j) ar[j] += vr[j] * vr[j];
          } else {
            for (int64_t j = 0; j < n; ++j) ar[j * as1] += vr[j * vs1] * vr[j * vs1];
          }
        }
      }
    });
  });
}

}  // namespace cpu
}  // namespace kfac_ext
