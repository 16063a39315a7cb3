// pidrt's kernels as TensorRT IPluginV3 plugins, on top of pidrt_kernels. The node contracts are
// those `pidrt export --trt-plugins` writes (pidrt/export/plugin_nodes.py): name, version "1",
// namespace "pidrt", one int attribute, six inputs and one output of one float dtype.
#pragma once

#include <NvInferRuntime.h>

#include <cstdint>
#include <string>

namespace pidrt::trt {

enum class Op : int32_t { few_token = 0, dual_kv = 1 };

constexpr char kNamespace[] = "pidrt";
constexpr char kVersion[] = "1";
constexpr int32_t kInputs = 6;

char const* op_name(Op op);
char const* attribute_name(Op op);  // few_token: n_tokens, dual_kv: heads

// Logs through the logger TensorRT handed over (setLoggerFinder / initPidrtPlugins), if any.
void log_error(std::string const& message);

class Plugin final : public nvinfer1::IPluginV3,
                     public nvinfer1::IPluginV3OneCore,
                     public nvinfer1::IPluginV3OneBuild,
                     public nvinfer1::IPluginV3OneRuntime {
public:
    Plugin(Op op, int32_t attribute);

    // IPluginV3
    nvinfer1::IPluginCapability* getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept override;
    nvinfer1::IPluginV3* clone() noexcept override;

    // IPluginV3OneCore
    char const* getPluginName() const noexcept override { return op_name(op_); }
    char const* getPluginVersion() const noexcept override { return kVersion; }
    char const* getPluginNamespace() const noexcept override { return kNamespace; }

    // IPluginV3OneBuild
    int32_t getNbOutputs() const noexcept override { return 1; }
    int32_t getOutputDataTypes(nvinfer1::DataType* outputTypes, int32_t nbOutputs,
                               nvinfer1::DataType const* inputTypes, int32_t nbInputs) const noexcept override;
    int32_t getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs, nvinfer1::DimsExprs const* shapeInputs,
                            int32_t nbShapeInputs, nvinfer1::DimsExprs* outputs, int32_t nbOutputs,
                            nvinfer1::IExprBuilder& exprBuilder) noexcept override;
    bool supportsFormatCombination(int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
                                   int32_t nbOutputs) noexcept override;
    int32_t configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
                            nvinfer1::DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept override;

    // IPluginV3OneRuntime
    int32_t onShapeChange(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs, nvinfer1::PluginTensorDesc const* out,
                          int32_t nbOutputs) noexcept override;
    int32_t enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const* outputDesc,
                    void const* const* inputs, void* const* outputs, void* workspace,
                    cudaStream_t stream) noexcept override;
    nvinfer1::IPluginV3* attachToContext(nvinfer1::IPluginResourceContext* context) noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldsToSerialize() noexcept override;

private:
    // 0, or a non-zero status after logging why these shapes and dtype cannot run.
    int32_t check(nvinfer1::Dims const* dims, int32_t nbInputs, nvinfer1::DataType type) const noexcept;

    Op op_;
    int32_t attribute_;
    nvinfer1::PluginField field_;
    nvinfer1::PluginFieldCollection fields_;
};

class Creator final : public nvinfer1::IPluginCreatorV3One {
public:
    explicit Creator(Op op);

    nvinfer1::IPluginV3* createPlugin(char const* name, nvinfer1::PluginFieldCollection const* fc,
                                      nvinfer1::TensorRTPhase phase) noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldNames() noexcept override { return &fields_; }
    char const* getPluginName() const noexcept override { return op_name(op_); }
    char const* getPluginVersion() const noexcept override { return kVersion; }
    char const* getPluginNamespace() const noexcept override { return kNamespace; }

private:
    Op op_;
    nvinfer1::PluginField field_;
    nvinfer1::PluginFieldCollection fields_;
};

}  // namespace pidrt::trt
