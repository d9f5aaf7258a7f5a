/* TensorRT IPluginV3 "MatMulNBits" v1: com.microsoft MatMulNBits (4-bit, zero points optional) on awq-edge's kernels.
 *
 * Thin glue only: shapes, formats and fields for TensorRT, and calls into the kernels' C ABI
 * (awq_edge_kernels.h), which holds every CUDA detail. Uses only interfaces present in TensorRT 10.3
 * (JetPack 6) and newer, and no TensorRT library symbol: it links against the kernels and the CUDA runtime only.
 *
 * Inputs, in ONNX order: A fp16 [..., K]; B [N, n_blocks, block_size/2] bytes; scales fp16 (N * n_blocks values,
 * any shape); zero points bytes [N * ceil(n_blocks/2)] if present; bias fp16 [N] if present. Output: fp16 [..., N].
 * "Bytes" arrive as int8 from TensorRT-RTX's importer and as int32, one byte value each, from the ONNX fallback
 * import of TensorRT 10.x, which widens uint8 initializers; such tensor weights are packed on the first enqueue.
 * `awq-edge build` instead moves them into the node's attributes ("weights", "scales", "zero_points"), which
 * the fallback import hands to the creator as fields: they are packed once at build time and serialized packed,
 * and the inputs are A (and bias).
 */
#ifndef AWQ_EDGE_MATMUL_NBITS_PLUGIN_H
#define AWQ_EDGE_MATMUL_NBITS_PLUGIN_H

#include <NvInferRuntime.h>

#include <cstdint>
#include <memory>
#include <vector>

namespace awq_edge
{

//! The node's attributes, resolved: what the plugin needs and what it serializes.
struct MatMulNBitsParams
{
    int32_t K{0};
    int32_t N{0};
    int32_t bits{4};
    int32_t blockSize{0};
    //! -1 until known: ONNX fallback imports pass no flag, so the input count decides.
    int32_t hasZeroPoints{-1};
    int32_t hasBias{0};
    //! The weights in the kernels' layout, when they came as fields (awq-edge build moves them there) and were
    //! packed at build time; then A (and bias) are the only inputs. Shared by clones, never changed.
    std::shared_ptr<std::vector<uint8_t> const> packed;
};

class MatMulNBitsPlugin : public nvinfer1::IPluginV3,
                          public nvinfer1::IPluginV3OneCore,
                          public nvinfer1::IPluginV3OneBuild,
                          public nvinfer1::IPluginV3OneRuntime
{
public:
    explicit MatMulNBitsPlugin(MatMulNBitsParams const& params);
    ~MatMulNBitsPlugin() override;
    MatMulNBitsPlugin(MatMulNBitsPlugin const&) = delete;
    MatMulNBitsPlugin& operator=(MatMulNBitsPlugin const&) = delete;

    // IPluginV3
    nvinfer1::IPluginCapability* getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept override;
    nvinfer1::IPluginV3* clone() noexcept override;

    // IPluginV3OneCore
    char const* getPluginName() const noexcept override;
    char const* getPluginVersion() const noexcept override;
    char const* getPluginNamespace() const noexcept override;

    // IPluginV3OneBuild
    int32_t configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept override;
    int32_t getOutputDataTypes(nvinfer1::DataType* outputTypes, int32_t nbOutputs,
        nvinfer1::DataType const* inputTypes, int32_t nbInputs) const noexcept override;
    int32_t getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs, nvinfer1::DimsExprs const* shapeInputs,
        int32_t nbShapeInputs, nvinfer1::DimsExprs* outputs, int32_t nbOutputs,
        nvinfer1::IExprBuilder& exprBuilder) noexcept override;
    bool supportsFormatCombination(int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
        int32_t nbOutputs) noexcept override;
    int32_t getNbOutputs() const noexcept override;
    size_t getWorkspaceSize(nvinfer1::DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* outputs, int32_t nbOutputs) const noexcept override;

    // IPluginV3OneRuntime
    int32_t onShapeChange(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs, nvinfer1::PluginTensorDesc const* out,
        int32_t nbOutputs) noexcept override;
    int32_t enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const* outputDesc,
        void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept override;
    nvinfer1::IPluginV3* attachToContext(nvinfer1::IPluginResourceContext* context) noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldsToSerialize() noexcept override;

private:
    bool resolveInputs(int32_t nbInputs) noexcept;
    bool ensurePacked(nvinfer1::PluginTensorDesc const* inputDesc, void const* const* inputs, cudaStream_t stream) noexcept;

    MatMulNBitsParams mParams;
    std::vector<nvinfer1::PluginField> mSerialized;
    nvinfer1::PluginFieldCollection mSerializedCollection{};
    //! Weights in the kernels' layout, made from the constant inputs on this instance's first enqueue.
    void* mPacked{nullptr};
};

class MatMulNBitsPluginCreator : public nvinfer1::IPluginCreatorV3One
{
public:
    MatMulNBitsPluginCreator();
    nvinfer1::IPluginV3* createPlugin(
        char const* name, nvinfer1::PluginFieldCollection const* fc, nvinfer1::TensorRTPhase phase) noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldNames() noexcept override;
    char const* getPluginName() const noexcept override;
    char const* getPluginVersion() const noexcept override;
    char const* getPluginNamespace() const noexcept override;

private:
    std::vector<nvinfer1::PluginField> mFields;
    nvinfer1::PluginFieldCollection mFieldCollection{};
};

} // namespace awq_edge

#endif // AWQ_EDGE_MATMUL_NBITS_PLUGIN_H
