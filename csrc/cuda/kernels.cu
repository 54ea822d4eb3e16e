// CUDA kernels of hvd-largebatch: multi-tensor LARS over a tensor table (layout in lars_math.h).
//
// One thread block per chunk (at most a few thousand elements of one tensor), all chunks of all
// tensors in one launch. Reductions are deterministic: each block writes one partial sum per chunk
// (fixed per-thread order, fixed shuffle tree); a one-block kernel adds a tensor's partials in a
// fixed order. No floating-point atomics, no host synchronization.
#include <cuda_runtime.h>

#include <algorithm>
#include <stdexcept>
#include <string>

#include "common.h"
#include "cuda/lars_cuda.h"
#include "lars_math.h"

namespace hvdlb {
namespace {

constexpr int kThreads = 256;             // threads per block of the chunk kernels
constexpr int kILP = 4;                   // loads in flight per thread and array
constexpr int kStride = kThreads * kILP;  // elements per block iteration
constexpr int kWarps = kThreads / 32;
constexpr int kFinalizeThreads = 1024;    // the one-block kernels
// groups passed by value in the update's arguments: 48 x 64 bytes keeps them under the 4 KiB of
// kernel parameters that every CUDA 12 / 13 toolkit accepts
constexpr int kMaxGroupsPerLaunch = 48;

struct GroupPack {
  LarsGroup g[kMaxGroupsPerLaunch];
  int32_t base;   // group index of g[0]
  int32_t count;  // valid entries of g
};

__device__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  return v;  // valid in lane 0
}

// Sum over the block in a fixed order; valid in thread 0. Every thread of the block must call it.
__device__ float block_sum(float v, float* smem) {
  v = warp_sum(v);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // a previous call may still be reading smem
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  float r = 0.0f;
  if (warp == 0) r = warp_sum(lane < kWarps ? smem[lane] : 0.0f);
  return r;
}

template <class F>
__device__ void with_dtypes(int64_t w_dtype, int64_t g_dtype, F&& f) {
  switch (w_dtype * 3 + g_dtype) {
    case kFloat32 * 3 + kFloat32: f(float{}, float{}); break;
    case kFloat32 * 3 + kFloat16: f(float{}, Half{}); break;
    case kFloat32 * 3 + kBFloat16: f(float{}, BFloat16{}); break;
    case kFloat16 * 3 + kFloat32: f(Half{}, float{}); break;
    case kFloat16 * 3 + kFloat16: f(Half{}, Half{}); break;
    case kFloat16 * 3 + kBFloat16: f(Half{}, BFloat16{}); break;
    case kBFloat16 * 3 + kFloat32: f(BFloat16{}, float{}); break;
    case kBFloat16 * 3 + kFloat16: f(BFloat16{}, Half{}); break;
    case kBFloat16 * 3 + kBFloat16: f(BFloat16{}, BFloat16{}); break;
    default: break;  // ops.py only writes the codes above
  }
}

// This thread's share of a chunk: elements base + threadIdx.x + k * kThreads, in (base, k) order.
// Out-of-range elements count as zeros, so the order of the fmaf's is the same in every thread.
template <class TW, class TG>
__device__ void thread_norms(const TW* __restrict__ w, const TG* __restrict__ g, int len,
                             bool do_w, bool do_g, bool do_wg, float& aw, float& ag, float& awg) {
  const bool read_w = do_w || do_wg, read_g = do_g || do_wg;
  for (int base = 0; base < len; base += kStride) {
    float x[kILP], y[kILP];
#pragma unroll
    for (int k = 0; k < kILP; ++k) {
      const int i = base + static_cast<int>(threadIdx.x) + k * kThreads;
      x[k] = (read_w && i < len) ? to_float(w[i]) : 0.0f;
      y[k] = (read_g && i < len) ? to_float(g[i]) : 0.0f;
    }
#pragma unroll
    for (int k = 0; k < kILP; ++k) {
      if (do_w) aw = fmaf(x[k], x[k], aw);
      if (do_g) ag = fmaf(y[k], y[k], ag);
      if (do_wg) awg = fmaf(x[k], y[k], awg);
    }
  }
}

// The update of this thread's share of a chunk (same element order as thread_norms); with carry,
// acc accumulates the squares of the stored new weights exactly as thread_norms would.
template <bool HasBuffer, bool Nesterov, class TW, class TG>
__device__ void thread_update(TW* __restrict__ w, const TG* __restrict__ g, float* __restrict__ u,
                              int len, const LarsCoeffs c, bool carry, float& acc) {
  for (int base = 0; base < len; base += kStride) {
    float x[kILP], y[kILP], m[kILP];
#pragma unroll
    for (int k = 0; k < kILP; ++k) {
      const int i = base + static_cast<int>(threadIdx.x) + k * kThreads;
      const bool in = i < len;
      x[k] = in ? to_float(w[i]) : 0.0f;
      y[k] = in ? to_float(g[i]) : 0.0f;
      m[k] = (HasBuffer && in) ? u[i] : 0.0f;
    }
#pragma unroll
    for (int k = 0; k < kILP; ++k) {
      const int i = base + static_cast<int>(threadIdx.x) + k * kThreads;
      const bool in = i < len;
      const TW stored = from_float<TW>(lars_element<HasBuffer, Nesterov>(x[k], y[k], m[k], c));
      if (in) {
        w[i] = stored;
        if (HasBuffer) u[i] = m[k];
      }
      if (carry) {
        const float v = in ? to_float(stored) : 0.0f;
        acc = fmaf(v, v, acc);
      }
    }
  }
}

__global__ void __launch_bounds__(kThreads)
    norms_kernel(const int64_t* __restrict__ table, int64_t n, int32_t mode, float* w_part,
                 float* g_part) {
  __shared__ float smem[kWarps];
  const ChunkRow ch = chunk_rows(table, n)[blockIdx.x];
  const TensorRow row = tensor_rows(table)[ch.tensor];
  const bool do_w = mode & kNormW, do_g = mode & kNormG, do_wg = mode & kNormWG;
  const int len = static_cast<int>(ch.length);
  float aw = 0.0f, ag = 0.0f, awg = 0.0f;
  with_dtypes(row.w_dtype, row.g_dtype, [&](auto wt, auto gt) {
    using TW = decltype(wt);
    using TG = decltype(gt);
    const TW* w = reinterpret_cast<const TW*>(row.w) + ch.start;
    const TG* g = row.g ? reinterpret_cast<const TG*>(row.g) + ch.start : nullptr;
    thread_norms(w, g, len, do_w, do_g, do_wg, aw, ag, awg);
  });
  if (do_w) {
    const float s = block_sum(aw, smem);
    if (threadIdx.x == 0) w_part[blockIdx.x] = s;
  }
  if (do_g) {
    const float s = block_sum(ag, smem);
    if (threadIdx.x == 0) g_part[2 * blockIdx.x] = s;
  }
  if (do_wg) {
    const float s = block_sum(awg, smem);
    if (threadIdx.x == 0) g_part[2 * blockIdx.x + 1] = s;
  }
}

// One block: warp k adds the partials of tensors k, k + 32, ... (lane-strided, then a shuffle
// tree), writes the requested sums and the non-finite flag.
__global__ void __launch_bounds__(kFinalizeThreads)
    finalize_kernel(const int64_t* __restrict__ table, int64_t n, int64_t nch, int32_t mode,
                    const float* w_part, const float* g_part, float* w_sq, float* g_sq, float* wg,
                    int32_t* flag) {
  const bool sum_w = mode & (kNormW | kSumW), do_g = mode & kNormG, do_wg = mode & kNormWG;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, nwarps = blockDim.x / 32;
  int bad = 0;
  for (int64_t t = warp; t < n; t += nwarps) {
    const int64_t begin = tensor_rows(table)[t].chunk_begin, end = chunk_end(table, n, nch, t);
    float sw = 0.0f, sg = 0.0f, swg = 0.0f;
    for (int64_t c = begin + lane; c < end; c += 32) {
      if (sum_w) sw += w_part[c];
      if (do_g) sg += g_part[2 * c];
      if (do_wg) swg += g_part[2 * c + 1];
    }
    sw = warp_sum(sw);
    sg = warp_sum(sg);
    swg = warp_sum(swg);
    if (lane == 0) {
      if (sum_w && w_sq) w_sq[t] = canonical(sw);
      if (do_g && g_sq) g_sq[t] = canonical(sg);
      if (do_wg && wg) wg[t] = canonical(swg);
      bad |= !is_finite(sw) || !is_finite(sg) || !is_finite(swg);
    }
  }
  bad = __syncthreads_or(bad);
  if (threadIdx.x == 0 && flag) *flag = bad ? 1 : 0;
}

__global__ void __launch_bounds__(kFinalizeThreads)
    check_sums_kernel(int64_t n, const float* w_sq, const float* g_sq, const float* wg,
                      int32_t* flag) {
  int bad = 0;
  for (int64_t t = threadIdx.x; t < n; t += blockDim.x)
    bad |= !is_finite(w_sq[t]) || !is_finite(g_sq[t]) || (wg && !is_finite(wg[t]));
  bad = __syncthreads_or(bad);
  if (threadIdx.x == 0) *flag = bad ? 1 : 0;
}

__global__ void __launch_bounds__(kThreads)
    update_kernel(const int64_t* __restrict__ table, int64_t n, const GroupPack pack,
                  const float* w_sq, const float* g_sq, const float* wg, float* ratios,
                  const int32_t* flag, bool skip_nonfinite, float* w_part) {
  __shared__ float smem[kWarps];
  const ChunkRow ch = chunk_rows(table, n)[blockIdx.x];
  const TensorRow row = tensor_rows(table)[ch.tensor];
  const int64_t gi = row.group - pack.base;
  if (gi < 0 || gi >= pack.count) return;  // another launch handles this group
  const LarsGroup grp = resolved(pack.g[gi]);
  const int64_t t = ch.tensor;
  const float ratio = lars_trust_ratio(w_sq[t], g_sq[t], wg ? wg[t] : 0.0f, grp);
  if (ch.start == 0 && threadIdx.x == 0) ratios[t] = ratio;
  const bool skip = skip_nonfinite && *flag != 0;
  if (skip && !w_part) return;  // uniform over the block
  const int len = static_cast<int>(ch.length);
  const LarsCoeffs c = lars_coeffs(ratio, grp);
  const bool nesterov = (grp.flags & kNesterov) != 0;
  const bool carry = w_part != nullptr;
  float acc = 0.0f, unused_g = 0.0f, unused_wg = 0.0f;
  with_dtypes(row.w_dtype, row.g_dtype, [&](auto wt, auto gt) {
    using TW = decltype(wt);
    using TG = decltype(gt);
    TW* w = reinterpret_cast<TW*>(row.w) + ch.start;
    const TG* g = reinterpret_cast<const TG*>(row.g) + ch.start;
    float* u = row.u ? reinterpret_cast<float*>(row.u) + ch.start : nullptr;
    if (skip) {  // weights unchanged: the carried sums are those of the current weights
      thread_norms(static_cast<const TW*>(w), g, len, true, false, false, acc, unused_g, unused_wg);
    } else if (!u) {
      thread_update<false, false>(w, g, u, len, c, carry, acc);
    } else if (nesterov) {
      thread_update<true, true>(w, g, u, len, c, carry, acc);
    } else {
      thread_update<true, false>(w, g, u, len, c, carry, acc);
    }
  });
  if (carry) {
    const float s = block_sum(acc, smem);
    if (threadIdx.x == 0) w_part[blockIdx.x] = s;
  }
}

void check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("hvd_largebatch CUDA ") + what + ": " +
                             cudaGetErrorString(err));
}

// The launches go to the caller's current device, which must be `device`. Switching here would
// be wrong twice over: cudaSetDevice creates a context on a device that had none (the caller's
// previous device, when restoring it), and the caller's stream belongs to `device` anyway. The
// Python layer (lars/ops.py) makes the tensors' device current with torch's own guard first.
void require_current_device(int device) {
  int current = -1;
  if (cudaGetDevice(&current) != cudaSuccess) check_launch("cudaGetDevice");
  if (current != device)
    throw std::invalid_argument("hvd_largebatch CUDA: the tensors are on device " +
                                std::to_string(device) + " but the current device is " +
                                std::to_string(current) + "; make it current first "
                                "(torch.cuda.device(" + std::to_string(device) + "))");
}

}  // namespace

void lars_norms_cuda(int device, int64_t stream, const int64_t* table, int64_t n, int64_t nch,
                     int32_t mode, float* w_part, float* g_part, float* w_sq, float* g_sq,
                     float* wg, int32_t* flag) {
  require_current_device(device);
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  if (mode & (kNormW | kNormG | kNormWG)) {
    norms_kernel<<<static_cast<unsigned>(nch), kThreads, 0, s>>>(table, n, mode, w_part, g_part);
    check_launch("norms_kernel");
  }
  finalize_kernel<<<1, kFinalizeThreads, 0, s>>>(table, n, nch, mode, w_part, g_part, w_sq, g_sq,
                                                  wg, flag);
  check_launch("finalize_kernel");
}

void lars_update_cuda(int device, int64_t stream, const int64_t* table, int64_t n, int64_t nch,
                      const void* groups, int64_t ngroups, const float* w_sq, const float* g_sq,
                      const float* wg, float* ratios, int32_t* flag, bool check_sums,
                      bool skip_nonfinite, float* w_part) {
  require_current_device(device);
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  if (check_sums) {
    check_sums_kernel<<<1, kFinalizeThreads, 0, s>>>(n, w_sq, g_sq, wg, flag);
    check_launch("check_sums_kernel");
  }
  const LarsGroup* grp = static_cast<const LarsGroup*>(groups);
  for (int64_t base = 0; base < ngroups; base += kMaxGroupsPerLaunch) {
    GroupPack pack{};
    pack.base = static_cast<int32_t>(base);
    pack.count = static_cast<int32_t>(std::min<int64_t>(kMaxGroupsPerLaunch, ngroups - base));
    std::copy(grp + base, grp + base + pack.count, pack.g);
    update_kernel<<<static_cast<unsigned>(nch), kThreads, 0, s>>>(
        table, n, pack, w_sq, g_sq, wg, ratios, flag, skip_nonfinite, w_part);
    check_launch("update_kernel");
  }
}

}  // namespace hvdlb
