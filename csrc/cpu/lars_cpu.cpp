// CPU multi-tensor LARS: norm pass and update pass over a tensor table (see lars_cpu.h).
#include "lars_cpu.h"

#include <algorithm>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "lars_math.h"

#if HVD_LB_OPENMP
#include <omp.h>
#endif

namespace hvdlb {
namespace {

// Reductions keep kLanes independent fp32 accumulators (element i goes to lane i % kLanes, the
// lanes are added in a fixed tree at the end): the loops vectorize without -ffast-math and the
// result depends only on the data.
constexpr int kLanes = 16;
// Below this many elements a call runs on one thread (thread start-up would dominate).
constexpr int64_t kParallelMinElements = 1 << 16;
// Scheduling weight of a chunk: its elements plus this fixed cost (so empty chunks count too).
constexpr int64_t kChunkOverhead = 256;

float add_lanes(const float* acc) {
  float t[kLanes];
  for (int l = 0; l < kLanes; ++l) t[l] = acc[l];
  for (int half = kLanes / 2; half > 0; half /= 2)
    for (int l = 0; l < half; ++l) t[l] += t[l + half];
  return t[0];
}

template <class F>
void with_dtype(int64_t code, F&& f) {
  switch (code) {
    case kFloat32: f(float{}); break;
    case kFloat16: f(Half{}); break;
    case kBFloat16: f(BFloat16{}); break;
    default: break;  // validated before any parallel region
  }
}

template <class F>
void with_bool(bool b, F&& f) {
  if (b) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

// Sums over one chunk: w^2, g^2 and w g as requested (each with the same lane order, so a w^2
// computed here equals the one computed after an update).
template <bool DoW, bool DoG, bool DoWG, class TW, class TG>
void chunk_norms(const TW* __restrict w, const TG* __restrict g, int64_t len, float* out_w,
                 float* out_g, float* out_wg) {
  constexpr bool kReadW = DoW || DoWG;
  constexpr bool kReadG = DoG || DoWG;
  float aw[kLanes] = {}, ag[kLanes] = {}, awg[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= len; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      float x = 0.0f, y = 0.0f;
      if constexpr (kReadW) x = to_float(w[i + l]);
      if constexpr (kReadG) y = to_float(g[i + l]);
      if constexpr (DoW) aw[l] = fmaf(x, x, aw[l]);
      if constexpr (DoG) ag[l] = fmaf(y, y, ag[l]);
      if constexpr (DoWG) awg[l] = fmaf(x, y, awg[l]);
    }
  }
  for (int l = 0; i + l < len; ++l) {
    float x = 0.0f, y = 0.0f;
    if constexpr (kReadW) x = to_float(w[i + l]);
    if constexpr (kReadG) y = to_float(g[i + l]);
    if constexpr (DoW) aw[l] = fmaf(x, x, aw[l]);
    if constexpr (DoG) ag[l] = fmaf(y, y, ag[l]);
    if constexpr (DoWG) awg[l] = fmaf(x, y, awg[l]);
  }
  if constexpr (DoW) *out_w = add_lanes(aw);
  if constexpr (DoG) *out_g = add_lanes(ag);
  if constexpr (DoWG) *out_wg = add_lanes(awg);
}

template <bool HasBuffer, bool Nesterov, class TW, class TG>
void chunk_update(TW* __restrict w, const TG* __restrict g, float* __restrict u, int64_t len,
                  const LarsCoeffs c) {
  for (int64_t i = 0; i < len; ++i) {
    float ui = HasBuffer ? u[i] : 0.0f;
    const float wi = lars_element<HasBuffer, Nesterov>(to_float(w[i]), to_float(g[i]), ui, c);
    w[i] = from_float<TW>(wi);
    if (HasBuffer) u[i] = ui;
  }
}

float chunk_weight_sumsq(const TensorRow& row, int64_t start, int64_t len) {
  float out = 0.0f;
  with_dtype(row.w_dtype, [&](auto wt) {
    using TW = decltype(wt);
    chunk_norms<true, false, false>(reinterpret_cast<const TW*>(row.w) + start,
                                    static_cast<const float*>(nullptr), len, &out, nullptr,
                                    nullptr);
  });
  return out;
}

void check_dtypes(const TensorRow* rows, int64_t n, bool with_g) {
  for (int64_t t = 0; t < n; ++t) {
    const bool ok_w = rows[t].w_dtype >= kFloat32 && rows[t].w_dtype <= kBFloat16;
    const bool ok_g = !with_g || (rows[t].g_dtype >= kFloat32 && rows[t].g_dtype <= kBFloat16);
    if (!ok_w || !ok_g)
      throw std::invalid_argument("tensor table row " + std::to_string(t) + ": unknown dtype code");
  }
}

// Runs body(c) for every chunk, the chunks split into contiguous ranges of about equal work, one
// per thread.
template <class Body>
void for_each_chunk(const int64_t* table, int64_t n, int64_t nch, int threads, Body&& body) {
  const ChunkRow* chunks = chunk_rows(table, n);
  std::vector<int64_t> cost(static_cast<size_t>(nch) + 1, 0);
  int64_t elements = 0;
  for (int64_t c = 0; c < nch; ++c) {
    const int64_t len = chunks[c].length;
    elements += len;
    cost[c + 1] = cost[c] + len + kChunkOverhead;
  }
  int nthreads = std::max(1, threads);
  if (elements < kParallelMinElements) nthreads = 1;
  nthreads = static_cast<int>(std::min<int64_t>(nthreads, std::max<int64_t>(nch, 1)));
  auto run_range = [&](int tid, int nt) {
    const int64_t total = cost[nch];
    const int64_t lo_cost = total * tid / nt, hi_cost = total * (tid + 1) / nt;
    const int64_t lo = std::lower_bound(cost.begin(), cost.end() - 1, lo_cost) - cost.begin();
    const int64_t hi = std::lower_bound(cost.begin(), cost.end() - 1, hi_cost) - cost.begin();
    for (int64_t c = lo; c < hi; ++c) body(c);
  };
#if HVD_LB_OPENMP
  if (nthreads > 1) {
#pragma omp parallel num_threads(nthreads)
    run_range(omp_get_thread_num(), omp_get_num_threads());
    return;
  }
#endif
  run_range(0, 1);
}

}  // namespace

void lars_norms_cpu(const int64_t* table, int64_t n, int64_t nch, int32_t mode, float* w_part,
                    float* g_part, float* w_sq, float* g_sq, float* wg, int32_t* flag,
                    int threads) {
  const TensorRow* rows = tensor_rows(table);
  const ChunkRow* chunks = chunk_rows(table, n);
  const bool do_w = mode & kNormW, do_g = mode & kNormG, do_wg = mode & kNormWG;
  const bool sum_w = do_w || (mode & kSumW);
  check_dtypes(rows, n, do_g || do_wg);

  for_each_chunk(table, n, nch, threads, [&](int64_t c) {
    const ChunkRow ch = chunks[c];
    const TensorRow& row = rows[ch.tensor];
    const int64_t len = ch.length;
    float ow = 0.0f, og = 0.0f, owg = 0.0f;
    with_dtype(row.w_dtype, [&](auto wt) {
      with_dtype(row.g_dtype, [&](auto gt) {
        using TW = decltype(wt);
        using TG = decltype(gt);
        const TW* w = reinterpret_cast<const TW*>(row.w) + ch.start;
        const TG* g = reinterpret_cast<const TG*>(row.g) + ch.start;
        with_bool(do_w, [&](auto dw) {
          with_bool(do_g, [&](auto dg) {
            with_bool(do_wg, [&](auto dwg) {
              chunk_norms<decltype(dw)::value, decltype(dg)::value, decltype(dwg)::value>(
                  w, g, len, &ow, &og, &owg);
            });
          });
        });
      });
    });
    if (do_w) w_part[c] = ow;
    if (do_g) g_part[2 * c] = og;
    if (do_wg) g_part[2 * c + 1] = owg;
  });

  bool bad = false;
  for (int64_t t = 0; t < n; ++t) {
    const int64_t begin = rows[t].chunk_begin, end = chunk_end(table, n, nch, t);
    float sw = 0.0f, sg = 0.0f, swg = 0.0f;
    for (int64_t c = begin; c < end; ++c) {
      if (sum_w) sw += w_part[c];
      if (do_g) sg += g_part[2 * c];
      if (do_wg) swg += g_part[2 * c + 1];
    }
    if (sum_w && w_sq) w_sq[t] = canonical(sw);
    if (do_g && g_sq) g_sq[t] = canonical(sg);
    if (do_wg && wg) wg[t] = canonical(swg);
    bad = bad || !is_finite(sw) || !is_finite(sg) || !is_finite(swg);
  }
  if (flag) *flag = bad ? 1 : 0;
}

void lars_update_cpu(const int64_t* table, int64_t n, int64_t nch, const void* groups,
                     int64_t ngroups, const float* w_sq, const float* g_sq, const float* wg,
                     float* ratios, int32_t* flag, bool check_sums, bool skip_nonfinite,
                     float* w_part, int threads) {
  const TensorRow* rows = tensor_rows(table);
  const ChunkRow* chunks = chunk_rows(table, n);
  const LarsGroup* grp = static_cast<const LarsGroup*>(groups);
  check_dtypes(rows, n, true);
  for (int64_t t = 0; t < n; ++t) {
    const int64_t gi = rows[t].group;
    if (gi < 0 || gi >= ngroups)
      throw std::invalid_argument("tensor table row " + std::to_string(t) + ": group index " +
                                  std::to_string(gi) + " outside [0, " + std::to_string(ngroups) +
                                  ")");
    if (!wg && (grp[gi].flags & kLars) && (grp[gi].flags & kCombinedDenominator))
      throw std::invalid_argument("the combined denominator needs the <w, g> sums (wg)");
  }
  if (check_sums) {
    bool bad = false;
    for (int64_t t = 0; t < n; ++t)
      bad = bad || !is_finite(w_sq[t]) || !is_finite(g_sq[t]) || (wg && !is_finite(wg[t]));
    *flag = bad ? 1 : 0;
  }
  const bool skip = skip_nonfinite && *flag != 0;

  std::vector<LarsGroup> resolved_groups(grp, grp + ngroups);
  for (LarsGroup& gr : resolved_groups) gr = resolved(gr);
  std::vector<LarsCoeffs> coeffs(static_cast<size_t>(n));
  for (int64_t t = 0; t < n; ++t) {
    const LarsGroup& gr = resolved_groups[rows[t].group];
    const float ratio = lars_trust_ratio(w_sq[t], g_sq[t], wg ? wg[t] : 0.0f, gr);
    ratios[t] = ratio;
    coeffs[t] = lars_coeffs(ratio, gr);
  }
  if (skip && !w_part) return;

  for_each_chunk(table, n, nch, threads, [&](int64_t c) {
    const ChunkRow ch = chunks[c];
    const TensorRow& row = rows[ch.tensor];
    const int64_t len = ch.length;
    if (!skip) {
      const bool nesterov = (grp[row.group].flags & kNesterov) != 0;
      with_dtype(row.w_dtype, [&](auto wt) {
        with_dtype(row.g_dtype, [&](auto gt) {
          using TW = decltype(wt);
          using TG = decltype(gt);
          TW* w = reinterpret_cast<TW*>(row.w) + ch.start;
          const TG* g = reinterpret_cast<const TG*>(row.g) + ch.start;
          float* u = row.u ? reinterpret_cast<float*>(row.u) + ch.start : nullptr;
          with_bool(u != nullptr, [&](auto hb) {
            with_bool(nesterov, [&](auto nv) {
              chunk_update<decltype(hb)::value, decltype(nv)::value>(w, g, u, len,
                                                                     coeffs[ch.tensor]);
            });
          });
        });
      });
    }
    // The chunk is still in cache: its new sum of squares costs no extra memory traffic.
    if (w_part) w_part[c] = chunk_weight_sumsq(row, ch.start, len);
  });
}

}  // namespace hvdlb
