// Runs pidrt_trt_plugins' code as TensorRT would call it, without TensorRT: only its public headers
// are needed (the plugin code calls nothing in libnvinfer but getPluginRegistry, stubbed here). It
// gets the creators through the loadLibrary entry point, creates each plugin from the fields the
// ONNX parser passes (plus the `aot` one it ignores), asks the build-phase questions, configures
// with dynamic batch and token dims, and enqueues on fake device pointers; pidrt_kernels then
// launches through the recording stand-in driver (PIDRT_CUDA_DRIVER=libfakecuda.so). Prints one
// JSON object per line for tests/kernels/test_native.py.
#include <NvInferRuntime.h>
#include <dlfcn.h>

#include <cstdio>
#include <string>

#include "fake_libcuda.h"
#include "pidrt/trt_plugins.h"

using namespace nvinfer1;

extern "C" IPluginRegistry* getPluginRegistry() noexcept { return nullptr; }

namespace {

struct Logger : ILogger {
    void log(Severity, AsciiChar const* msg) noexcept override { std::printf("{\"log\": \"%s\"}\n", msg); }
} gLogger;

struct Finder : ILoggerFinder {
    ILogger* findLogger() override { return &gLogger; }
} gFinder;

Dims dims(std::initializer_list<int64_t> d) {
    Dims out{};
    out.nbDims = int32_t(d.size());
    int32_t i = 0;
    for (int64_t v : d) out.d[i++] = v;
    return out;
}

// One plugin through build and run: `shapes` are the 6 inputs' dims at run time. configurePlugin
// sees the batch dims and the token dims of the first `token_inputs` inputs as -1, as an engine
// with dynamic shapes does.
void run(IPluginCreatorV3One* creator, int32_t attribute, int32_t token_inputs, std::initializer_list<Dims> shapes,
         DataType type, fake_launch const* (*record)()) {
    int32_t aot = 1;
    PluginField fields[] = {PluginField("aot", &aot, PluginFieldType::kINT32, 1),
                            PluginField(creator->getFieldNames()->fields[0].name, &attribute, PluginFieldType::kINT32, 1)};
    PluginFieldCollection fc{2, fields};
    IPluginV3* plugin = creator->createPlugin("node", &fc, TensorRTPhase::kBUILD);
    if (plugin == nullptr) {
        std::printf("{\"created\": false}\n");
        return;
    }
    auto* core = static_cast<IPluginV3OneCore*>(plugin->getCapabilityInterface(PluginCapabilityType::kCORE));
    auto* build = static_cast<IPluginV3OneBuild*>(plugin->getCapabilityInterface(PluginCapabilityType::kBUILD));
    auto* runtime = static_cast<IPluginV3OneRuntime*>(plugin->getCapabilityInterface(PluginCapabilityType::kRUNTIME));

    DynamicPluginTensorDesc io[7]{};
    PluginTensorDesc run_desc[7]{};
    int32_t i = 0;
    for (Dims const& d : shapes) {
        run_desc[i].dims = d;
        run_desc[i].type = type;
        run_desc[i].format = TensorFormat::kLINEAR;
        io[i].desc = run_desc[i];
        io[i].desc.dims.d[0] = -1;  // batch
        if (i < token_inputs) io[i].desc.dims.d[1] = -1;
        ++i;
    }
    run_desc[6] = run_desc[0];
    io[6] = io[0];
    std::string supports;
    for (DataType t : {DataType::kFLOAT, DataType::kHALF, DataType::kBF16, DataType::kINT32}) {
        io[0].desc.type = t;
        supports += build->supportsFormatCombination(0, io, 6, 1) ? "1" : "0";
    }
    io[0].desc.type = type;
    io[1].desc.type = type == DataType::kHALF ? DataType::kFLOAT : DataType::kHALF;
    bool mixed = build->supportsFormatCombination(1, io, 6, 1);
    io[1].desc.type = type;
    DataType out_type{};
    DataType in_types[6] = {type, type, type, type, type, type};
    build->getOutputDataTypes(&out_type, 1, in_types, 6);
    int32_t configured = build->configurePlugin(io, 6, io + 6, 1);
    int32_t shape_change = runtime->onShapeChange(run_desc, 6, run_desc + 6, 1);
    void const* inputs[6];
    for (int32_t k = 0; k < 6; ++k) inputs[k] = reinterpret_cast<void const*>(uintptr_t(0x1000 * (k + 1)));
    void* outputs[1] = {reinterpret_cast<void*>(uintptr_t(0x7000))};
    int32_t enqueued = runtime->enqueue(run_desc, run_desc + 6, inputs, outputs, nullptr, nullptr);
    PluginFieldCollection const* saved = runtime->getFieldsToSerialize();
    std::printf("{\"name\": \"%s\", \"version\": \"%s\", \"namespace\": \"%s\", \"supports_f32_f16_bf16_i32\": \"%s\", "
                "\"mixed_dtypes\": %d, \"same_out_type\": %d, \"configured\": %d, \"shape_change\": %d, "
                "\"enqueued\": %d, \"saved\": \"%s=%d\"",
                core->getPluginName(), core->getPluginVersion(), core->getPluginNamespace(), supports.c_str(),
                mixed, out_type == type, configured, shape_change, enqueued, saved->fields[0].name,
                *static_cast<int32_t const*>(saved->fields[0].data));
    fake_launch const* got = record();
    std::printf(", \"grid\": [%u, %u, %u], \"block\": %u, \"params\": [", got->grid[0], got->grid[1], got->grid[2],
                got->block[0]);
    for (int32_t k = 0; k < got->num_params; ++k)
        std::printf(k ? ", [%llu, %d]" : "[%llu, %d]", (unsigned long long)got->as_u64[k], got->as_i32[k]);
    std::printf("]}\n");
    IPluginV3* attached = runtime->attachToContext(nullptr);
    delete attached;
    delete plugin;
}

}  // namespace

int main(int argc, char** argv) {
    if (argc != 2) return 2;
    void* fake = dlopen(argv[1], RTLD_NOW);  // the driver pidrt_kernels loads (same file: same record)
    auto record = reinterpret_cast<fake_launch const* (*)()>(dlsym(fake, "fake_last_launch"));
    if (record == nullptr) return 3;
    setLoggerFinder(&gFinder);
    int32_t count = 0;
    IPluginCreatorInterface* const* creators = getCreators(count);
    auto* few_token = static_cast<IPluginCreatorV3One*>(creators[0]);
    auto* dual_kv = static_cast<IPluginCreatorV3One*>(creators[1]);
    std::printf("{\"creators\": %d, \"kinds\": [\"%s\", \"%s\"], \"fields\": [\"%s\", \"%s\"]}\n", count,
                creators[0]->getInterfaceInfo().kind, creators[1]->getInterfaceInfo().kind,
                few_token->getFieldNames()->fields[0].name, dual_kv->getFieldNames()->fields[0].name);
    // few_token: base [B,N,C_out], x [B,N,C_in], a [B,C_in,H*n], b [B,H*n,C_out], bias [B,C_out], scale [B]
    run(few_token, 12, 2, {dims({2, 37, 300}), dims({2, 37, 48}), dims({2, 48, 96}), dims({2, 96, 300}), dims({2, 300}),
                           dims({2})}, DataType::kHALF, record);
    // dual_kv: q [B,N,C], k/v [B,M,C], k2/v2 [B,M2,C], sigma [B]
    run(dual_kv, 2, 5, {dims({2, 37, 16}), dims({2, 37, 16}), dims({2, 37, 16}), dims({2, 19, 16}), dims({2, 19, 16}),
                     dims({2})}, DataType::kHALF, record);
    // A head dim the library was not built for: refused at configure time, with the reason logged.
    run(dual_kv, 4, 5, {dims({2, 37, 16}), dims({2, 37, 16}), dims({2, 37, 16}), dims({2, 19, 16}), dims({2, 19, 16}),
                     dims({2})}, DataType::kHALF, record);
    // The identity tensors of another batch size than base: refused once the shapes are known.
    run(few_token, 12, 2, {dims({2, 37, 300}), dims({2, 37, 48}), dims({1, 48, 96}), dims({2, 96, 300}), dims({2, 300}),
                           dims({2})}, DataType::kHALF, record);
    return 0;
}
