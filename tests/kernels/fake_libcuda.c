/* A stand-in CUDA driver for CPU tests of pidrt_kernels (tests/kernels/test_native.py): it
 * implements the entry points the library loads, hands out one fake context, and records the
 * last module load and kernel launch instead of running anything. Loaded through
 * PIDRT_CUDA_DRIVER; the test reads the record through fake_last_launch().
 * FAKE_CUDA_ARCH (e.g. "80") sets the device's compute capability (default 90);
 * FAKE_CUDA_NO_CONTEXT=1 makes no context current. */
#include "fake_libcuda.h"

#include <stdlib.h>
#include <string.h>

static fake_launch last;
static int context_token;
static int module_token;

const fake_launch* fake_last_launch(void) { return &last; }

int cuInit(unsigned int flags) { (void)flags; return 0; }
int cuDriverGetVersion(int* v) { *v = 13000; return 0; }
int cuGetErrorString(int e, const char** s) { (void)e; *s = "fake error"; return 0; }

int cuCtxGetCurrent(void** ctx) {
    const char* none = getenv("FAKE_CUDA_NO_CONTEXT");
    *ctx = (none && *none == '1') ? NULL : &context_token;
    return 0;
}

int cuCtxGetDevice(int* device) { *device = 0; return 0; }

int cuDeviceGetAttribute(int* value, int attribute, int device) {
    const char* env = getenv("FAKE_CUDA_ARCH");
    int arch = env ? atoi(env) : 90;
    (void)device;
    if (attribute == 75) *value = arch / 10;
    else if (attribute == 76) *value = arch % 10;
    else return 1;
    return 0;
}

int cuModuleLoadData(void** module, const void* image) {
    memcpy(&last.module_bytes_seen, image, 8);
    *module = &module_token;
    return 0;
}

int cuModuleGetFunction(void** function, void* module, const char* name) {
    (void)module;
    strncpy(last.function, name, sizeof last.function - 1);
    *function = last.function;
    return 0;
}

int cuFuncSetAttribute(void* function, int attribute, int value) {
    (void)function;
    if (attribute == 8) last.shared_attribute = value;
    return 0;
}

int cuLaunchKernel(void* f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                   unsigned shared, void* stream, void** params, void** extra) {
    (void)f; (void)extra;
    last.grid[0] = gx, last.grid[1] = gy, last.grid[2] = gz;
    last.block[0] = bx, last.block[1] = by, last.block[2] = bz;
    last.shared = shared;
    last.stream = stream;
    last.num_params = 0;
    for (int32_t i = 0; i < MAX_PARAMS && params[i] != NULL; ++i, ++last.num_params) {
        memcpy(&last.as_i32[i], params[i], 4);
        memcpy(&last.as_u64[i], params[i], 8);
    }
    last.launches += 1;
    return 0;
}
