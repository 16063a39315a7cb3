// Build-time check of driver.h against a real cuda.h (the one Triton's wheel carries): the
// declarations pidrt_kernels uses instead of the CUDA headers must agree with the driver's. An
// object file of static_asserts only, linked into nothing.
#include <cuda.h>

#include <type_traits>

#include "driver.h"

namespace c = pidrt::cuda;

// Same ABI: as many parameters, each (and the result) of the same size and pointer-ness. The
// types themselves differ by design (int for enums, pidrt's own opaque handle structs).
template <typename A, typename B>
struct same_abi : std::false_type {};
template <typename RA, typename... A, typename RB, typename... B>
struct same_abi<RA (*)(A...), RB (*)(B...)>
    : std::integral_constant<bool, sizeof...(A) == sizeof...(B) && sizeof(RA) == sizeof(RB) &&
                                       ((sizeof(A) == sizeof(B) &&
                                         std::is_pointer<A>::value == std::is_pointer<B>::value) && ...)> {};

#define PIDRT_SAME_ABI(fn) static_assert(same_abi<decltype(c::Driver::fn), decltype(&::fn)>::value, #fn)
PIDRT_SAME_ABI(cuInit);
PIDRT_SAME_ABI(cuDriverGetVersion);
PIDRT_SAME_ABI(cuGetErrorString);
PIDRT_SAME_ABI(cuCtxGetCurrent);
PIDRT_SAME_ABI(cuCtxGetDevice);
PIDRT_SAME_ABI(cuDeviceGetAttribute);
PIDRT_SAME_ABI(cuModuleLoadData);
PIDRT_SAME_ABI(cuModuleGetFunction);
PIDRT_SAME_ABI(cuFuncSetAttribute);
PIDRT_SAME_ABI(cuLaunchKernel);
PIDRT_SAME_ABI(cuCtxGetId);

static_assert(CUDA_SUCCESS == c::CUDA_SUCCESS, "CUDA_SUCCESS");
static_assert(std::is_same<CUdevice, c::CUdevice>::value, "CUdevice");
static_assert(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR == c::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR &&
                  CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR == c::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR,
              "compute capability attributes");
static_assert(CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES == c::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
              "dynamic shared memory attribute");
