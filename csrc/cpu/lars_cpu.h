// CPU multi-tensor LARS kernels (lars_cpu.cpp), bound in module.cpp.
//
// All arguments are addresses (0 = absent) and counts; the table format is in lars_math.h. Work is
// split over the chunks of all tensors together (OpenMP, static schedule); every reduction writes
// one partial per chunk and adds the partials in chunk order, so results do not depend on the
// number of threads.
#pragma once

#include <cstdint>

namespace hvdlb {

// Norm pass. Per chunk: w^2 into w_part[c] (kNormW), g^2 and w g into g_part[2c], g_part[2c+1]
// (kNormG, kNormWG). Then per tensor, in chunk order: w_sq[t] (kNormW or kSumW: from w_part as it
// is), g_sq[t], wg[t] (each only when its pointer is not null); *flag = 1 if any of these sums is
// not finite, else 0.
void lars_norms_cpu(const int64_t* table, int64_t n, int64_t nch, int32_t mode, float* w_part,
                    float* g_part, float* w_sq, float* g_sq, float* wg, int32_t* flag, int threads);

// Update pass. ratios[t] = the trust ratio from (w_sq, g_sq, wg) and the tensor's group. When
// check_sums, *flag is first set from the finiteness of the sums; the update is applied unless
// (*flag != 0 and skip_nonfinite). If w_part is given it receives the per-chunk sums of squares of
// the weights as they are after the call (updated or not): the next norm pass may use kSumW.
void lars_update_cpu(const int64_t* table, int64_t n, int64_t nch, const void* groups,
                     int64_t ngroups, const float* w_sq, const float* g_sq, const float* wg,
                     float* ratios, int32_t* flag, bool check_sums, bool skip_nonfinite,
                     float* w_part, int threads);

}  // namespace hvdlb
