// Shared by the C++ and CUDA builds: the HVD_HD qualifier and build identification macros.
#pragma once

#if defined(__CUDACC__)
#define HVD_HD __host__ __device__ __forceinline__
#else
#define HVD_HD inline
#endif

#ifndef HVD_LB_OPENMP
#define HVD_LB_OPENMP 0
#endif
#ifndef HVD_LB_COMPILER
#define HVD_LB_COMPILER "unknown"
#endif
