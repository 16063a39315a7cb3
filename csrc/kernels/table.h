// The embedded kernel table: what pidrt.kernels.embed writes (kernels_generated.cpp) and the
// launcher reads. Internal to pidrt_kernels.
#pragma once

#include <cstddef>
#include <cstdint>

#include "pidrt/kernels.h"

namespace pidrt {

enum class Kind : int32_t { few_token = 0, dual_kv = 1 };

// The kernels' runtime parameters in the order the launcher fills them (inputs, int32 scalars,
// output; the Launch plans of pidrt/kernels). The generated table asserts that the compiled
// kernels have exactly these, so a changed kernel signature fails the build, not a launch.
constexpr char kFewTokenParams[] =
    "Base,X,A,Bm,OB,Scale,N,C_in,C_out,n_tok,H,chunks_per_prog,sbsb,sbsn,sxb,sxn,sab,sak,sbb,sbj,sobb,sob,son,Out";
constexpr char kDualKvParams[] =
    "Q,K1,V1,K2,V2,Sigma,sqb,sqh,sqn,sk1b,sk1h,sk1n,sv1b,sv1h,sv1n,sk2b,sk2h,sk2n,sv2b,sv2h,sv2n,"
    "sob,soh,son,H,N,M1,M2,D,Out";

constexpr bool same_text(char const* a, char const* b) {
    return *a == *b && (*a == '\0' || same_text(a + 1, b + 1));
}

struct Entry {
    Kind kind;
    pidrt_kernel_info info;     // what pidrt_kernel_at reports
    int32_t block_rows;         // few_token BLOCK_N, dual_kv BLOCK_M: tokens per program
    int32_t block_cols;         // few_token BLOCK_C (output columns per chunk); 0 for dual_kv
    int32_t chunks_cap;         // few_token: most output chunks one program streams; 0 for dual_kv
    int32_t num_params;         // the compiled entry's parameters: the runtime ones, then null scratch pointers
    char const* function;       // the cubin's kernel name
    char const* cubin;          // info.cubin_bytes long
};

extern Entry const kEntries[];
extern int32_t const kEntryCount;
extern char const kBuildInfo[];

}  // namespace pidrt
