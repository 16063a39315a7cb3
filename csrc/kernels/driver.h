// The CUDA driver API, loaded at run time with dlopen: pidrt_kernels links no CUDA library and
// builds without a CUDA toolkit. Only the few types, constants and entry points the launcher
// uses are declared here; they are the driver's stable C ABI (cuda.h, unchanged since CUDA 4.0
// for these). Triton's wheel carries a cuda.h (triton/backends/nvidia/include); when CMake finds
// it, driver_abi_check.cpp compares these declarations with it at build time.
#pragma once

#include <cstdint>
#include <string>

namespace pidrt::cuda {

using CUresult = int;
using CUdevice = int;
using CUcontext = struct CUctx_st*;
using CUmodule = struct CUmod_st*;
using CUfunction = struct CUfunc_st*;
using CUstream = struct CUstream_st*;

constexpr CUresult CUDA_SUCCESS = 0;
constexpr int CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR = 75;
constexpr int CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR = 76;
constexpr int CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8;
constexpr int kDefaultSharedLimit = 48 * 1024;  // more needs the attribute above (opt-in)

struct Driver {
    CUresult (*cuInit)(unsigned int);
    CUresult (*cuDriverGetVersion)(int*);
    CUresult (*cuGetErrorString)(CUresult, char const**);
    CUresult (*cuCtxGetCurrent)(CUcontext*);
    CUresult (*cuCtxGetDevice)(CUdevice*);
    CUresult (*cuDeviceGetAttribute)(int*, int, CUdevice);
    CUresult (*cuModuleLoadData)(CUmodule*, void const*);
    CUresult (*cuModuleGetFunction)(CUfunction*, CUmodule, char const*);
    CUresult (*cuFuncSetAttribute)(CUfunction, int, int);
    CUresult (*cuLaunchKernel)(CUfunction, unsigned int, unsigned int, unsigned int, unsigned int, unsigned int,
                               unsigned int, unsigned int, CUstream, void**, void**);
    // CUDA >= 12.0: a context's unique id (a destroyed context's address may be reused). May be null.
    CUresult (*cuCtxGetId)(CUcontext, unsigned long long*);

    // "cuLaunchKernel failed: CUDA_ERROR_...: message" for a failed call.
    std::string describe(char const* call, CUresult result) const;
};

// The loaded, initialised driver (once per process), or null with the reason in `error`.
Driver const* driver(std::string& error);

}  // namespace pidrt::cuda
