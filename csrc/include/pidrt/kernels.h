/* pidrt_kernels: pidrt's identity-branch Triton kernels, compiled ahead of time, behind a C ABI.
 *
 * The library embeds one cubin per kernel variant, GPU architecture and dtype (chosen when it is
 * built: -DPIDRT_CUDA_ARCHS, -DPIDRT_KERNEL_DTYPES, -DPIDRT_KERNEL_PRESETS) and launches them
 * through the CUDA driver API, which it loads at run time (libcuda.so.1, or the file named by the
 * environment variable PIDRT_CUDA_DRIVER). It links no CUDA library, needs no CUDA toolkit and
 * no Python, and loads on a machine without a GPU (the launches then fail with
 * PIDRT_ERR_NO_DRIVER). Cubins need no PTX JIT, so the driver's PTX ISA limit does not apply.
 *
 * Conventions for both launch functions:
 * - Pointers are CUDA device addresses; every tensor holds `dtype` elements (scale and sigma too).
 * - Strides are in elements. Each tensor's last dimension (channels) must be contiguous; the
 *   other strides are given per tensor and may be 0 (broadcast, e.g. one identity for the batch).
 *   Every stride, count and grid extent must fit int32 (the kernels take int32 arguments and
 *   compute batch offsets in 64 bits).
 * - `stream` is a CUstream / cudaStream_t (NULL: the legacy default stream). The launch is
 *   asynchronous; the function returns once it is queued.
 * - A CUDA context must be current on the calling thread (any CUDA runtime call makes the device's
 *   primary context current). Modules are loaded once per context, on first use: launch each
 *   kernel once before capturing it into a CUDA graph (loading a module is not a stream operation).
 * - The return value is a pidrt_status; on failure pidrt_last_error() says why, in words.
 * - Thread-safe.
 */
#ifndef PIDRT_KERNELS_H
#define PIDRT_KERNELS_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#define PIDRT_API __declspec(dllexport)
#else
#define PIDRT_API __attribute__((visibility("default")))
#endif

/* Bumped whenever a struct or signature below changes: loaders check it before use. */
#define PIDRT_KERNELS_ABI_VERSION 1

typedef enum pidrt_dtype { PIDRT_FLOAT32 = 0, PIDRT_FLOAT16 = 1, PIDRT_BFLOAT16 = 2 } pidrt_dtype;

typedef enum pidrt_status {
    PIDRT_OK = 0,
    PIDRT_ERR_INVALID_ARGUMENT = 1, /* a null pointer, a bad shape or stride, a value past int32 */
    PIDRT_ERR_NO_KERNEL = 2,        /* no variant for this dtype / shape / GPU architecture was built */
    PIDRT_ERR_NO_DRIVER = 3,        /* the CUDA driver library cannot be loaded or initialised */
    PIDRT_ERR_CUDA = 4              /* a CUDA driver call failed (no current context, launch error) */
} pidrt_status;

typedef struct pidrt_strides2 { int64_t batch, row; } pidrt_strides2;
typedef struct pidrt_strides3 { int64_t batch, row, head; } pidrt_strides3;

/* Few-token branch (SCA, IP-Adapter; the TensorRT plugin pidrt::few_token):
 *   out = base + scale[b] * (softmax per head(x a[b]) b[b] + bias[b])
 * base [B, N, C_out], x [B, N, C_in], a [B, C_in, H*n], b [B, H*n, C_out], bias [B, C_out],
 * scale [B] (contiguous), out [B, N, C_out] (may be base itself). Head h owns columns
 * h*n .. h*n+n-1 of a and rows of b. A batch element whose scale is 0 gets base, copied.
 * "row" strides: base, x, out over tokens; a over C_in; b over H*n. Variants: one per padded
 * score tile (heads and n_tokens rounded up to powers of two, see pidrt_few_token_supported). */
typedef struct pidrt_few_token_args {
    pidrt_dtype dtype;
    int32_t batch, tokens, c_in, c_out, heads, n_tokens;
    const void *base, *x, *a, *b, *bias, *scale;
    void *out;
    pidrt_strides2 base_strides, x_strides, a_strides, b_strides, out_strides;
    int64_t bias_batch_stride;
} pidrt_few_token_args;

/* Dual-KV attention (Inv-Adapter EAA; the TensorRT plugin pidrt::dual_kv):
 *   out = softmax(q k1^T / sqrt(d)) v1 + sigma[b] * softmax(q k2^T / sqrt(d)) v2, per head
 * q and out [B, N, H, d] (any batch / token / head strides, e.g. [B, N, H*d] with head stride d,
 * or [B, H, N, d]), k1/v1 [B, M1, H, d], k2/v2 [B, M2, H, d], sigma [B] (contiguous). A batch
 * element whose sigma is 0 skips the second attention. Variants: one per head dim d. */
typedef struct pidrt_dual_kv_args {
    pidrt_dtype dtype;
    int32_t batch, tokens, kv1_tokens, kv2_tokens, heads, head_dim;
    const void *q, *k1, *v1, *k2, *v2, *sigma;
    void *out;
    pidrt_strides3 q_strides, k1_strides, v1_strides, k2_strides, v2_strides, out_strides;
} pidrt_dual_kv_args;

/* The strides of contiguous tensors of the shapes in `args` (the TensorRT plugins' layout:
 * dual_kv as [B, N, H*d]). */
PIDRT_API void pidrt_few_token_contiguous(pidrt_few_token_args* args);
PIDRT_API void pidrt_dual_kv_contiguous(pidrt_dual_kv_args* args);

PIDRT_API int pidrt_few_token(const pidrt_few_token_args* args, void* stream);
PIDRT_API int pidrt_dual_kv(const pidrt_dual_kv_args* args, void* stream);

/* Whether a variant was built for these parameters (any architecture); needs no driver. */
PIDRT_API int pidrt_few_token_supported(pidrt_dtype dtype, int32_t heads, int32_t n_tokens);
PIDRT_API int pidrt_dual_kv_supported(pidrt_dtype dtype, int32_t head_dim);

/* What the library holds: one entry per embedded cubin. */
typedef struct pidrt_kernel_info {
    const char* kernel;     /* "few_token" or "dual_kv" */
    const char* label;      /* as `pidrt kernels` names the variant, e.g. "dual_kv d=40" */
    int32_t arch;           /* compute capability major*10+minor; >= 90 built for sm_<arch>a */
    pidrt_dtype dtype;
    int32_t heads_padded;   /* few_token: the score tile's heads (HP) ... */
    int32_t tokens_padded;  /* ... and tokens per head (NP); 0 for dual_kv */
    int32_t head_dim;       /* dual_kv: d; 0 for few_token */
    int32_t num_warps;
    int32_t shared_bytes;   /* dynamic shared memory of a launch */
    size_t cubin_bytes;
} pidrt_kernel_info;

PIDRT_API int32_t pidrt_kernel_count(void);
PIDRT_API const pidrt_kernel_info* pidrt_kernel_at(int32_t index); /* NULL out of range */

PIDRT_API int32_t pidrt_abi_version(void); /* PIDRT_KERNELS_ABI_VERSION of the library */
/* How the library was built, e.g. "pidrt 0.1.0; triton 3.9.0; presets sd15; archs 90; dtypes float16". */
PIDRT_API const char* pidrt_build_info(void);

/* Load and initialise the CUDA driver: PIDRT_OK, or PIDRT_ERR_NO_DRIVER and the reason. */
PIDRT_API int pidrt_driver_check(void);

/* The message of the calling thread's last failed call ("" if none). */
PIDRT_API const char* pidrt_last_error(void);

#ifdef __cplusplus
}
#endif

#endif /* PIDRT_KERNELS_H */
