// CUDA kernels of hvd-largebatch (multi-tensor LARS lives here).
#include <cuda_runtime.h>

#include "common.h"
