// Choosing the embedded cubin for the current GPU and loading it once per CUDA context.
#pragma once

#include <string>

#include "driver.h"
#include "table.h"

namespace pidrt {

struct Loaded {
    Entry const* entry;  // the variant as built for this GPU's architecture
    cuda::CUfunction function;
};

// The first entry of the variant (any architecture) -> that variant's kernel for the GPU of the
// calling thread's current context. Returns a pidrt_status; on failure `error` says why.
int load_for_current_context(Entry const& variant, cuda::Driver const& driver, Loaded& out, std::string& error);

}  // namespace pidrt
