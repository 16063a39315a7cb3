#include "plugins.h"

#include <new>

#include "pidrt/kernels.h"

namespace pidrt::trt {

using nvinfer1::DataType;
using nvinfer1::Dims;

namespace {

bool to_pidrt(DataType type, pidrt_dtype& out) {
    switch (type) {
        case DataType::kFLOAT: out = PIDRT_FLOAT32; return true;
        case DataType::kHALF: out = PIDRT_FLOAT16; return true;
        case DataType::kBF16: out = PIDRT_BFLOAT16; return true;
        default: return false;
    }
}

// Whether pidrt_kernels holds any kernel of this dtype (the variant is checked in configurePlugin).
bool built_for(DataType type) {
    pidrt_dtype dtype;
    if (!to_pidrt(type, dtype)) return false;
    for (int32_t i = 0; i < pidrt_kernel_count(); ++i)
        if (pidrt_kernel_at(i)->dtype == dtype) return true;
    return false;
}

int32_t reject(std::string const& message, int32_t status = 1) {
    log_error(message);
    return status;
}

std::string shape(Dims const& d) {
    std::string s = "[";
    for (int32_t i = 0; i < d.nbDims; ++i) s += (i ? ", " : "") + std::to_string(d.d[i]);
    return s + "]";
}

}  // namespace

char const* op_name(Op op) { return op == Op::few_token ? "few_token" : "dual_kv"; }
char const* attribute_name(Op op) { return op == Op::few_token ? "n_tokens" : "heads"; }

Plugin::Plugin(Op op, int32_t attribute)
    : op_(op), attribute_(attribute), field_(attribute_name(op), &attribute_, nvinfer1::PluginFieldType::kINT32, 1),
      fields_{1, &field_} {}

nvinfer1::IPluginCapability* Plugin::getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept {
    switch (type) {
        case nvinfer1::PluginCapabilityType::kCORE: return static_cast<nvinfer1::IPluginV3OneCore*>(this);
        case nvinfer1::PluginCapabilityType::kBUILD: return static_cast<nvinfer1::IPluginV3OneBuild*>(this);
        case nvinfer1::PluginCapabilityType::kRUNTIME: return static_cast<nvinfer1::IPluginV3OneRuntime*>(this);
    }
    return nullptr;
}

nvinfer1::IPluginV3* Plugin::clone() noexcept { return new (std::nothrow) Plugin(op_, attribute_); }

int32_t Plugin::getOutputDataTypes(DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes,
                                   int32_t nbInputs) const noexcept {
    if (nbOutputs != 1 || nbInputs != kInputs) return 1;
    outputTypes[0] = inputTypes[0];  // out is like base (few_token) or q (dual_kv)
    return 0;
}

int32_t Plugin::getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs, nvinfer1::DimsExprs const*,
                                int32_t, nvinfer1::DimsExprs* outputs, int32_t nbOutputs,
                                nvinfer1::IExprBuilder&) noexcept {
    if (nbOutputs != 1 || nbInputs != kInputs) return 1;
    outputs[0] = inputs[0];
    return 0;
}

bool Plugin::supportsFormatCombination(int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
                                       int32_t nbOutputs) noexcept {
    if (pos < 0 || pos >= nbInputs + nbOutputs) return false;
    auto const& desc = inOut[pos].desc;
    if (desc.format != nvinfer1::TensorFormat::kLINEAR) return false;
    return pos == 0 ? built_for(desc.type) : desc.type == inOut[0].desc.type;
}

// Ranks, the channel dims that must agree, and that the library has the variant these select.
// Batch and token dims may be -1 (dynamic) here; the channel dims are the graph's constants.
int32_t Plugin::check(Dims const* d, int32_t nbInputs, DataType type) const noexcept {
    std::string where = std::string("pidrt::") + op_name(op_) + ": ";
    static constexpr int32_t kRanks[2][kInputs] = {{3, 3, 3, 3, 2, 1}, {3, 3, 3, 3, 3, 1}};
    if (nbInputs != kInputs) return reject(where + "expects 6 inputs");
    for (int32_t i = 0; i < kInputs; ++i)
        if (d[i].nbDims != kRanks[int(op_)][i])
            return reject(where + "input " + std::to_string(i) + " has shape " + shape(d[i]) + ", expected rank " +
                             std::to_string(kRanks[int(op_)][i]));
    pidrt_dtype dtype;
    if (!to_pidrt(type, dtype)) return reject(where + "takes float32, float16 or bfloat16 tensors");
    // Dims that must match where both are known (-1: dynamic, checked again with the real shapes).
    auto differ = [](int64_t a, int64_t b) { return a >= 0 && b >= 0 && a != b; };
    for (int32_t i = 1; i < kInputs; ++i)
        if (differ(d[i].d[0], d[0].d[0]))
            return reject(where + "input " + std::to_string(i) + " has shape " + shape(d[i]) + ", batch differs from " +
                          shape(d[0]));
    bool tokens_differ = op_ == Op::few_token ? differ(d[1].d[1], d[0].d[1])  // x and base
                                              : differ(d[1].d[1], d[2].d[1]) || differ(d[3].d[1], d[4].d[1]);
    if (tokens_differ) return reject(where + "token counts of paired inputs differ");
    int status;
    if (op_ == Op::few_token) {
        // base [B,N,C_out], x [B,N,C_in], a [B,C_in,H*n], b [B,H*n,C_out], bias [B,C_out]
        int64_t c_in = d[1].d[2], c_out = d[0].d[2], hn = d[2].d[2];
        if (c_in < 1 || c_out < 1 || hn < 1)
            return reject(where + "channel dims must be build-time constants");
        if (d[2].d[1] != c_in || d[3].d[1] != hn || d[3].d[2] != c_out || d[4].d[1] != c_out || hn % attribute_)
            return reject(where + "inconsistent shapes base " + shape(d[0]) + ", x " + shape(d[1]) + ", a " +
                             shape(d[2]) + ", b " + shape(d[3]) + ", bias " + shape(d[4]) + " for n_tokens=" +
                             std::to_string(attribute_));
        status = pidrt_few_token_supported(dtype, int32_t(hn / attribute_), attribute_);
    } else {
        // q [B,N,C], k/v [B,M,C], k2/v2 [B,M2,C]
        int64_t c = d[0].d[2];
        if (c < 1 || c % attribute_)
            return reject(where + "q " + shape(d[0]) + " does not split into heads=" + std::to_string(attribute_));
        for (int32_t i = 1; i < 5; ++i)
            if (d[i].d[2] != c) return reject(where + "input " + std::to_string(i) + " has " + shape(d[i]) +
                                                 ", not the " + std::to_string(c) + " channels of q");
        status = pidrt_dual_kv_supported(dtype, int32_t(c / attribute_));
    }
    if (status != PIDRT_OK) return reject(where + pidrt_last_error(), status);
    return 0;
}

int32_t Plugin::configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
                                nvinfer1::DynamicPluginTensorDesc const*, int32_t nbOutputs) noexcept {
    if (nbOutputs != 1 || nbInputs != kInputs) return 1;
    Dims dims[kInputs];
    for (int32_t i = 0; i < kInputs; ++i) dims[i] = in[i].desc.dims;
    return check(dims, nbInputs, in[0].desc.type);
}

int32_t Plugin::onShapeChange(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs,
                              nvinfer1::PluginTensorDesc const*, int32_t nbOutputs) noexcept {
    if (nbOutputs != 1 || nbInputs != kInputs) return 1;
    Dims dims[kInputs];
    for (int32_t i = 0; i < kInputs; ++i) dims[i] = in[i].dims;
    return check(dims, nbInputs, in[0].type);
}

int32_t Plugin::enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const*,
                        void const* const* inputs, void* const* outputs, void*, cudaStream_t stream) noexcept {
    pidrt_dtype dtype;
    if (!to_pidrt(inputDesc[0].type, dtype)) return 1;
    Dims const* d = nullptr;
    int status;
    if (op_ == Op::few_token) {
        d = &inputDesc[0].dims;  // base [B, N, C_out]
        pidrt_few_token_args a{};
        a.dtype = dtype;
        a.batch = int32_t(d->d[0]), a.tokens = int32_t(d->d[1]), a.c_out = int32_t(d->d[2]);
        a.c_in = int32_t(inputDesc[1].dims.d[2]);
        a.n_tokens = attribute_, a.heads = int32_t(inputDesc[2].dims.d[2] / attribute_);
        a.base = inputs[0], a.x = inputs[1], a.a = inputs[2], a.b = inputs[3], a.bias = inputs[4];
        a.scale = inputs[5], a.out = outputs[0];
        pidrt_few_token_contiguous(&a);
        status = pidrt_few_token(&a, stream);
    } else {
        d = &inputDesc[0].dims;  // q [B, N, C]
        pidrt_dual_kv_args a{};
        a.dtype = dtype;
        a.batch = int32_t(d->d[0]), a.tokens = int32_t(d->d[1]);
        a.kv1_tokens = int32_t(inputDesc[1].dims.d[1]), a.kv2_tokens = int32_t(inputDesc[3].dims.d[1]);
        a.heads = attribute_, a.head_dim = int32_t(d->d[2] / attribute_);
        a.q = inputs[0], a.k1 = inputs[1], a.v1 = inputs[2], a.k2 = inputs[3], a.v2 = inputs[4];
        a.sigma = inputs[5], a.out = outputs[0];
        pidrt_dual_kv_contiguous(&a);
        status = pidrt_dual_kv(&a, stream);
    }
    if (status != PIDRT_OK) log_error(std::string("pidrt::") + op_name(op_) + ": " + pidrt_last_error());
    return status;
}

nvinfer1::IPluginV3* Plugin::attachToContext(nvinfer1::IPluginResourceContext*) noexcept { return clone(); }

nvinfer1::PluginFieldCollection const* Plugin::getFieldsToSerialize() noexcept { return &fields_; }

Creator::Creator(Op op)
    : op_(op), field_(attribute_name(op), nullptr, nvinfer1::PluginFieldType::kINT32, 1), fields_{1, &field_} {}

nvinfer1::IPluginV3* Creator::createPlugin(char const*, nvinfer1::PluginFieldCollection const* fc,
                                           nvinfer1::TensorRTPhase) noexcept {
    std::string const wanted = attribute_name(op_);
    // Other fields (e.g. the `aot` attribute the exporter writes for tensorrt.plugin) are ignored.
    for (int32_t i = 0; fc != nullptr && i < fc->nbFields; ++i) {
        nvinfer1::PluginField const& f = fc->fields[i];
        if (f.name == nullptr || wanted != f.name) continue;
        int64_t value = 0;
        if (f.length == 1 && f.data != nullptr && f.type == nvinfer1::PluginFieldType::kINT32)
            value = *static_cast<int32_t const*>(f.data);
        else if (f.length == 1 && f.data != nullptr && f.type == nvinfer1::PluginFieldType::kINT64)
            value = *static_cast<int64_t const*>(f.data);
        if (value < 1 || value > 4096) {
            log_error(std::string("pidrt::") + op_name(op_) + ": attribute " + wanted + " must be one integer in 1..4096");
            return nullptr;
        }
        return new (std::nothrow) Plugin(op_, int32_t(value));
    }
    log_error(std::string("pidrt::") + op_name(op_) + ": missing attribute " + wanted);
    return nullptr;
}

}  // namespace pidrt::trt
