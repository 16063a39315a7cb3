// The C ABI of pidrt_kernels (pidrt/kernels.h): argument checks, variant lookup and the launch
// in the kernels' plugin order (inputs, int32 scalars, output, null scratch pointers), with the
// grids of the Launch plans in pidrt/kernels/few_token.py and dual_kv.py.
#include <algorithm>
#include <climits>
#include <cstdint>
#include <string>
#include <vector>

#include "driver.h"
#include "modules.h"
#include "pidrt/kernels.h"
#include "table.h"

namespace pidrt {
namespace {

thread_local std::string gLastError;

int fail(int status, std::string message) {
    gLastError = std::move(message);
    return status;
}

char const* dtype_name(int dtype) {
    switch (dtype) {
        case PIDRT_FLOAT32: return "float32";
        case PIDRT_FLOAT16: return "float16";
        case PIDRT_BFLOAT16: return "bfloat16";
        default: return nullptr;
    }
}

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

int32_t next_pow2(int32_t x) {
    int32_t p = 1;
    while (p < x) p *= 2;
    return p;
}

// The first entry of the variant with these compile-time parameters (any architecture), or
// null with a message listing what the library has for this kernel and dtype.
Entry const* find(Kind kind, int dtype, int32_t hp, int32_t np, int32_t head_dim, std::string const& wanted,
                  std::string& error) {
    std::vector<std::string> have;  // labels, once each (one entry per architecture)
    for (int32_t i = 0; i < kEntryCount; ++i) {
        Entry const& e = kEntries[i];
        if (e.kind != kind || e.info.dtype != dtype) continue;
        if (e.info.heads_padded == hp && e.info.tokens_padded == np && e.info.head_dim == head_dim) return &e;
        if (std::find(have.begin(), have.end(), e.info.label) == have.end()) have.emplace_back(e.info.label);
    }
    std::string listed = have.empty() ? "none for this dtype" : have[0];
    for (size_t i = 1; i < have.size(); ++i) listed += ", " + have[i];
    error = "no " + wanted + " kernel in this build (" + kBuildInfo + "); it has: " + listed +
            ". Rebuild with the presets, dtypes or variants that need it "
            "(-DPIDRT_KERNEL_PRESETS, -DPIDRT_KERNEL_DTYPES, -DPIDRT_KERNEL_VARIANTS)";
    return nullptr;
}

int few_token_variant(int dtype, int32_t heads, int32_t n_tokens, Entry const*& out) {
    if (dtype_name(dtype) == nullptr) return fail(PIDRT_ERR_INVALID_ARGUMENT, "unknown dtype " + std::to_string(dtype));
    if (heads < 1 || n_tokens < 1)
        return fail(PIDRT_ERR_INVALID_ARGUMENT, "few_token: heads and n_tokens must be >= 1");
    if (heads > 256 || n_tokens > 256)
        return fail(PIDRT_ERR_NO_KERNEL, "few_token: heads * n_tokens is more than one score tile (256) holds");
    // The score tile of pidrt/kernels/few_token.py (_score_tile): powers of two, HP*NP >= 16 for tl.dot.
    int32_t np = next_pow2(n_tokens), hp = next_pow2(heads);
    while (int64_t(hp) * np < 16) hp *= 2;
    std::string wanted = std::string("few_token ") + dtype_name(dtype) + " heads=" + std::to_string(heads) +
                         " n_tokens=" + std::to_string(n_tokens) + " (score tile " + std::to_string(hp) + "x" +
                         std::to_string(np) + ")";
    if (int64_t(hp) * np > 256) return fail(PIDRT_ERR_NO_KERNEL, wanted + ": more than one score tile (256) holds");
    std::string error;
    out = find(Kind::few_token, dtype, hp, np, 0, wanted, error);
    return out ? PIDRT_OK : fail(PIDRT_ERR_NO_KERNEL, error);
}

int dual_kv_variant(int dtype, int32_t head_dim, Entry const*& out) {
    if (dtype_name(dtype) == nullptr) return fail(PIDRT_ERR_INVALID_ARGUMENT, "unknown dtype " + std::to_string(dtype));
    if (head_dim < 1) return fail(PIDRT_ERR_INVALID_ARGUMENT, "dual_kv: head_dim must be >= 1");
    std::string error;
    out = find(Kind::dual_kv, dtype, 0, 0, head_dim,
               std::string("dual_kv ") + dtype_name(dtype) + " head_dim=" + std::to_string(head_dim), error);
    return out ? PIDRT_OK : fail(PIDRT_ERR_NO_KERNEL, error);
}

// The kernel's parameters in order; int32 values are range-checked by name.
class Params {
public:
    void pointer(void const* p) { add(&(ptrs_[nptrs_++] = p)); }
    void i32(char const* name, int64_t value) {
        if ((value < INT32_MIN || value > INT32_MAX) && bad_.empty())
            bad_ = std::string(name) + " = " + std::to_string(value) + " does not fit int32";
        add(&(ints_[nints_++] = int32_t(value)));
    }
    // Null for the trailing scratch pointers Triton appends (zero-sized for these kernels).
    bool finish(int32_t count) {
        while (n_ < count && nptrs_ < kMax) pointer(nullptr);
        return n_ == count;
    }
    void** data() { return params_; }
    std::string const& overflow() const { return bad_; }

private:
    static constexpr int kMax = 48;
    void add(void* slot) { params_[n_++] = slot; }
    void const* ptrs_[kMax] = {};
    int32_t ints_[kMax] = {};
    void* params_[2 * kMax] = {};
    int nptrs_ = 0, nints_ = 0, n_ = 0;
    std::string bad_;
};

int launch(Entry const& variant, Params& params, int64_t gx, int64_t gy, int64_t gz, void* stream) {
    if (!params.overflow().empty())
        return fail(PIDRT_ERR_INVALID_ARGUMENT, std::string(variant.info.label) + ": " + params.overflow());
    if (gx > INT32_MAX || gy > 65535 || gz > 65535)
        return fail(PIDRT_ERR_INVALID_ARGUMENT, std::string(variant.info.label) + ": launch grid (" +
                                                    std::to_string(gx) + ", " + std::to_string(gy) + ", " +
                                                    std::to_string(gz) + ") exceeds CUDA's limits");
    std::string error;
    cuda::Driver const* d = cuda::driver(error);
    if (d == nullptr) return fail(PIDRT_ERR_NO_DRIVER, error);
    Loaded k{};
    int status = load_for_current_context(variant, *d, k, error);
    if (status != PIDRT_OK) return fail(status, error);
    if (!params.finish(k.entry->num_params))
        return fail(PIDRT_ERR_INVALID_ARGUMENT, std::string(k.entry->info.label) + ": the kernel takes " +
                                                    std::to_string(k.entry->num_params) + " parameters");
    cuda::CUresult r = d->cuLaunchKernel(k.function, unsigned(gx), unsigned(gy), unsigned(gz),
                                         unsigned(k.entry->info.num_warps * 32), 1, 1,
                                         unsigned(k.entry->info.shared_bytes), static_cast<cuda::CUstream>(stream),
                                         params.data(), nullptr);
    if (r != cuda::CUDA_SUCCESS)
        return fail(PIDRT_ERR_CUDA, d->describe("cuLaunchKernel", r) + " for " + k.entry->info.label);
    return PIDRT_OK;
}

bool any_null(std::initializer_list<void const*> pointers) {
    for (void const* p : pointers)
        if (p == nullptr) return true;
    return false;
}

}  // namespace
}  // namespace pidrt

using namespace pidrt;

extern "C" {

void pidrt_few_token_contiguous(pidrt_few_token_args* a) {
    if (a == nullptr) return;
    int64_t hn = int64_t(a->heads) * a->n_tokens;
    a->base_strides = {int64_t(a->tokens) * a->c_out, a->c_out};
    a->x_strides = {int64_t(a->tokens) * a->c_in, a->c_in};
    a->a_strides = {a->c_in * hn, hn};
    a->b_strides = {hn * a->c_out, a->c_out};
    a->out_strides = a->base_strides;
    a->bias_batch_stride = a->c_out;
}

void pidrt_dual_kv_contiguous(pidrt_dual_kv_args* a) {
    if (a == nullptr) return;
    int64_t c = int64_t(a->heads) * a->head_dim;
    a->q_strides = {a->tokens * c, c, a->head_dim};
    a->k1_strides = a->v1_strides = {a->kv1_tokens * c, c, a->head_dim};
    a->k2_strides = a->v2_strides = {a->kv2_tokens * c, c, a->head_dim};
    a->out_strides = a->q_strides;
}

int pidrt_few_token_supported(pidrt_dtype dtype, int32_t heads, int32_t n_tokens) {
    Entry const* e = nullptr;
    return few_token_variant(dtype, heads, n_tokens, e);
}

int pidrt_dual_kv_supported(pidrt_dtype dtype, int32_t head_dim) {
    Entry const* e = nullptr;
    return dual_kv_variant(dtype, head_dim, e);
}

int pidrt_few_token(pidrt_few_token_args const* a, void* stream) {
    if (a == nullptr) return fail(PIDRT_ERR_INVALID_ARGUMENT, "few_token: args is NULL");
    if (a->batch < 0 || a->tokens < 0 || a->c_in < 1 || a->c_out < 1)
        return fail(PIDRT_ERR_INVALID_ARGUMENT, "few_token: batch and tokens must be >= 0, c_in and c_out >= 1");
    Entry const* variant = nullptr;
    if (int status = few_token_variant(a->dtype, a->heads, a->n_tokens, variant)) return status;
    if (any_null({a->base, a->x, a->a, a->b, a->bias, a->scale, a->out}))
        return fail(PIDRT_ERR_INVALID_ARGUMENT, "few_token: a tensor pointer is NULL");
    if (a->batch == 0 || a->tokens == 0) return PIDRT_OK;  // nothing to write
    int64_t chunks = cdiv(a->c_out, variant->block_cols);
    int64_t per_program = chunks < variant->chunks_cap ? chunks : variant->chunks_cap;
    Params p;
    for (void const* t : {a->base, a->x, a->a, a->b, a->bias, a->scale}) p.pointer(t);
    p.i32("N", a->tokens), p.i32("C_in", a->c_in), p.i32("C_out", a->c_out), p.i32("n_tok", a->n_tokens);
    p.i32("H", a->heads), p.i32("chunks_per_prog", per_program);
    p.i32("base batch stride", a->base_strides.batch), p.i32("base row stride", a->base_strides.row);
    p.i32("x batch stride", a->x_strides.batch), p.i32("x row stride", a->x_strides.row);
    p.i32("a batch stride", a->a_strides.batch), p.i32("a row stride", a->a_strides.row);
    p.i32("b batch stride", a->b_strides.batch), p.i32("b row stride", a->b_strides.row);
    p.i32("bias batch stride", a->bias_batch_stride);
    p.i32("out batch stride", a->out_strides.batch), p.i32("out row stride", a->out_strides.row);
    p.pointer(a->out);
    return launch(*variant, p, cdiv(a->tokens, variant->block_rows), cdiv(chunks, per_program), a->batch, stream);
}

int pidrt_dual_kv(pidrt_dual_kv_args const* a, void* stream) {
    if (a == nullptr) return fail(PIDRT_ERR_INVALID_ARGUMENT, "dual_kv: args is NULL");
    if (a->batch < 0 || a->tokens < 0 || a->heads < 1 || a->kv1_tokens < 1 || a->kv2_tokens < 1)
        return fail(PIDRT_ERR_INVALID_ARGUMENT,
                    "dual_kv: batch and tokens must be >= 0, heads and both KV lengths >= 1");
    Entry const* variant = nullptr;
    if (int status = dual_kv_variant(a->dtype, a->head_dim, variant)) return status;
    if (any_null({a->q, a->k1, a->v1, a->k2, a->v2, a->sigma, a->out}))
        return fail(PIDRT_ERR_INVALID_ARGUMENT, "dual_kv: a tensor pointer is NULL");
    if (a->batch == 0 || a->tokens == 0) return PIDRT_OK;
    Params p;
    for (void const* t : {a->q, a->k1, a->v1, a->k2, a->v2, a->sigma}) p.pointer(t);
    struct Named { char const* name; pidrt_strides3 const& s; };
    for (Named t : {Named{"q", a->q_strides}, Named{"k1", a->k1_strides}, Named{"v1", a->v1_strides},
                    Named{"k2", a->k2_strides}, Named{"v2", a->v2_strides}, Named{"out", a->out_strides}}) {
        std::string n = t.name;  // the kernel takes (batch, head, token) strides
        p.i32((n + " batch stride").c_str(), t.s.batch);
        p.i32((n + " head stride").c_str(), t.s.head);
        p.i32((n + " row stride").c_str(), t.s.row);
    }
    p.i32("H", a->heads), p.i32("N", a->tokens), p.i32("M1", a->kv1_tokens), p.i32("M2", a->kv2_tokens);
    p.i32("D", a->head_dim);
    p.pointer(a->out);
    return launch(*variant, p, cdiv(a->tokens, variant->block_rows), int64_t(a->batch) * a->heads, 1, stream);
}

int32_t pidrt_kernel_count(void) { return kEntryCount; }

pidrt_kernel_info const* pidrt_kernel_at(int32_t index) {
    return index >= 0 && index < kEntryCount ? &kEntries[index].info : nullptr;
}

int32_t pidrt_abi_version(void) { return PIDRT_KERNELS_ABI_VERSION; }

char const* pidrt_build_info(void) { return kBuildInfo; }

int pidrt_driver_check(void) {
    std::string error;
    return cuda::driver(error) ? PIDRT_OK : fail(PIDRT_ERR_NO_DRIVER, error);
}

char const* pidrt_last_error(void) { return gLastError.c_str(); }

}  // extern "C"
