#include "modules.h"

#include <mutex>
#include <vector>

namespace pidrt {

namespace {

struct Cached {
    unsigned long long context;  // cuCtxGetId where the driver has it, else the context's address
    Entry const* variant;
    Loaded loaded;
};

std::mutex gMutex;
std::vector<Cached> gCache;  // few entries (variants x contexts): a linear search is enough

bool same_variant(Entry const& a, Entry const& b) {
    return a.kind == b.kind && a.info.dtype == b.info.dtype && a.info.heads_padded == b.info.heads_padded &&
           a.info.tokens_padded == b.info.tokens_padded && a.info.head_dim == b.info.head_dim;
}

// A cubin runs on its own architecture; one built for sm_8x also runs on a later sm_8y. The
// "a" targets Triton uses from sm_90 on (sm_90a) run only on exactly that architecture.
Entry const* pick(Entry const& variant, int arch, std::string& built) {
    Entry const* best = nullptr;
    for (int32_t i = 0; i < kEntryCount; ++i) {
        Entry const& e = kEntries[i];
        if (!same_variant(e, variant)) continue;
        built += (built.empty() ? "sm_" : ", sm_") + std::to_string(e.info.arch);
        bool runs = e.info.arch == arch ||
                    (e.info.arch < 90 && arch < 90 && e.info.arch / 10 == arch / 10 && e.info.arch < arch);
        if (runs && (best == nullptr || e.info.arch > best->info.arch)) best = &e;
    }
    return best;
}

}  // namespace

int load_for_current_context(Entry const& variant, cuda::Driver const& d, Loaded& out, std::string& error) {
    cuda::CUcontext context = nullptr;
    cuda::CUresult r = d.cuCtxGetCurrent(&context);
    if (r != cuda::CUDA_SUCCESS) {
        error = d.describe("cuCtxGetCurrent", r);
        return PIDRT_ERR_CUDA;
    }
    if (context == nullptr) {
        error = "no CUDA context is current on this thread: make one current first (any CUDA runtime call "
                "does, e.g. cudaSetDevice or cudaFree(0))";
        return PIDRT_ERR_CUDA;
    }
    unsigned long long key = 0;
    if (d.cuCtxGetId == nullptr || d.cuCtxGetId(context, &key) != cuda::CUDA_SUCCESS)
        key = reinterpret_cast<unsigned long long>(context);

    std::lock_guard<std::mutex> lock(gMutex);
    for (Cached const& c : gCache) {
        if (c.context == key && c.variant == &variant) {
            out = c.loaded;
            return PIDRT_OK;
        }
    }
    cuda::CUdevice device = 0;
    int major = 0, minor = 0;
    if ((r = d.cuCtxGetDevice(&device)) != cuda::CUDA_SUCCESS ||
        (r = d.cuDeviceGetAttribute(&major, cuda::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, device)) ||
        (r = d.cuDeviceGetAttribute(&minor, cuda::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, device))) {
        error = d.describe("reading the current device's compute capability", r);
        return PIDRT_ERR_CUDA;
    }
    int arch = major * 10 + minor;
    std::string built;
    Entry const* entry = pick(variant, arch, built);
    if (entry == nullptr) {
        error = std::string(variant.info.label) + " is built for " + built + ", not for this GPU (sm_" +
                std::to_string(arch) + "): rebuild with -DPIDRT_CUDA_ARCHS=" + std::to_string(arch);
        return PIDRT_ERR_NO_KERNEL;
    }
    cuda::CUmodule module = nullptr;
    cuda::CUfunction function = nullptr;
    if ((r = d.cuModuleLoadData(&module, entry->cubin)) != cuda::CUDA_SUCCESS) {
        error = d.describe("cuModuleLoadData", r) + " for " + entry->info.label;
        return PIDRT_ERR_CUDA;
    }
    if ((r = d.cuModuleGetFunction(&function, module, entry->function)) != cuda::CUDA_SUCCESS) {
        error = d.describe("cuModuleGetFunction", r) + " for " + entry->function;
        return PIDRT_ERR_CUDA;
    }
    if (entry->info.shared_bytes > cuda::kDefaultSharedLimit &&
        (r = d.cuFuncSetAttribute(function, cuda::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                                  entry->info.shared_bytes)) != cuda::CUDA_SUCCESS) {
        error = d.describe("cuFuncSetAttribute (dynamic shared memory)", r) + " for " + entry->info.label + " (" +
                std::to_string(entry->info.shared_bytes) + " bytes)";
        return PIDRT_ERR_CUDA;
    }
    out = Loaded{entry, function};
    gCache.push_back(Cached{key, &variant, out});  // modules stay loaded for the context's life
    return PIDRT_OK;
}

}  // namespace pidrt
