/* The record fake_libcuda.c keeps of the last launch (read by tests/kernels/test_native.py through
 * ctypes and by trt_plugin_harness.cpp). */
#ifndef PIDRT_FAKE_LIBCUDA_H
#define PIDRT_FAKE_LIBCUDA_H

#include <stdint.h>

#define MAX_PARAMS 64

typedef struct fake_launch {
    uint32_t grid[3], block[3], shared;
    void* stream;
    int32_t num_params;        /* slots up to the first NULL one (pidrt_kernels zero-fills the rest) */
    uint64_t as_u64[MAX_PARAMS];  /* each parameter read as 8 bytes (pointers) ... */
    int32_t as_i32[MAX_PARAMS];   /* ... and as 4 bytes (int32 scalars) */
    char function[128];
    uint64_t module_bytes_seen;   /* the ELF magic of the last cubin, as 8 bytes */
    int32_t shared_attribute;     /* the last dynamic shared memory opt-in, 0 if none */
    int32_t launches;
} fake_launch;

#ifdef __cplusplus
extern "C" {
#endif
const fake_launch* fake_last_launch(void);
#ifdef __cplusplus
}
#endif

#endif
