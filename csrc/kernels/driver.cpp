#include "driver.h"

#include <dlfcn.h>

#include <cstdlib>
#include <mutex>

namespace pidrt::cuda {

namespace {

struct LoadResult {
    Driver api{};
    std::string error;  // empty once loaded
};

template <typename F>
bool bind(void* lib, char const* name, F& fn, std::string& error) {
    fn = reinterpret_cast<F>(dlsym(lib, name));
    if (fn == nullptr && error.empty()) error = std::string("the CUDA driver has no ") + name;
    return fn != nullptr;
}

LoadResult load() {
    LoadResult out;
    // PIDRT_CUDA_DRIVER names another driver file (tests use it to check the no-driver path
    // on a machine that has one).
    char const* path = std::getenv("PIDRT_CUDA_DRIVER");
    if (path == nullptr || *path == '\0') path = "libcuda.so.1";
    void* lib = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (lib == nullptr) {
        char const* why = dlerror();
        out.error = std::string("no CUDA driver: cannot load ") + path + " (" + (why ? why : "unknown reason") +
                    "); pidrt_kernels launches need an NVIDIA GPU and its driver";
        return out;
    }
    Driver& d = out.api;
    std::string& e = out.error;
    bind(lib, "cuInit", d.cuInit, e);
    bind(lib, "cuDriverGetVersion", d.cuDriverGetVersion, e);
    bind(lib, "cuGetErrorString", d.cuGetErrorString, e);
    bind(lib, "cuCtxGetCurrent", d.cuCtxGetCurrent, e);
    bind(lib, "cuCtxGetDevice", d.cuCtxGetDevice, e);
    bind(lib, "cuDeviceGetAttribute", d.cuDeviceGetAttribute, e);
    bind(lib, "cuModuleLoadData", d.cuModuleLoadData, e);
    bind(lib, "cuModuleGetFunction", d.cuModuleGetFunction, e);
    bind(lib, "cuFuncSetAttribute", d.cuFuncSetAttribute, e);
    bind(lib, "cuLaunchKernel", d.cuLaunchKernel, e);
    if (!e.empty()) {
        e = "no usable CUDA driver in " + std::string(path) + ": " + e;
        return out;
    }
    d.cuCtxGetId = reinterpret_cast<decltype(d.cuCtxGetId)>(dlsym(lib, "cuCtxGetId"));  // optional
    CUresult result = d.cuInit(0);
    if (result != CUDA_SUCCESS) e = "no CUDA driver: " + d.describe("cuInit", result);
    return out;  // the library stays loaded for the life of the process
}

}  // namespace

std::string Driver::describe(char const* call, CUresult result) const {
    char const* text = nullptr;
    if (cuGetErrorString == nullptr || cuGetErrorString(result, &text) != CUDA_SUCCESS || text == nullptr)
        text = "unknown error";
    return std::string(call) + " failed: CUDA error " + std::to_string(result) + " (" + text + ")";
}

Driver const* driver(std::string& error) {
    static std::once_flag once;
    static LoadResult loaded;
    std::call_once(once, [] { loaded = load(); });
    if (!loaded.error.empty()) {
        error = loaded.error;
        return nullptr;
    }
    return &loaded.api;
}

}  // namespace pidrt::cuda
