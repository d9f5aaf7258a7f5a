// MatMulNBits IPluginV3 glue: TensorRT's questions answered from the node's fields, the work done by the kernels.
#include "matmul_nbits_plugin.h"

#include "awq_edge_kernels.h"

#include <cuda_runtime_api.h>

#include <climits>
#include <cstring>
#include <mutex>
#include <string>

using namespace nvinfer1;

namespace awq_edge
{
namespace
{
constexpr char const* kNAME = "MatMulNBits";
constexpr char const* kVERSION = "1";
constexpr char const* kNAMESPACE = "";
constexpr int32_t kINPUT_A = 0;
constexpr int32_t kINPUT_B = 1;
constexpr int32_t kINPUT_SCALES = 2;
constexpr int32_t kINPUT_ZERO_POINTS = 3;

std::mutex gLoggerMutex;
ILoggerFinder* gLoggerFinder{nullptr};

void logError(std::string const& message) noexcept
{
    std::lock_guard<std::mutex> lock(gLoggerMutex);
    ILogger* logger = gLoggerFinder != nullptr ? gLoggerFinder->findLogger() : nullptr;
    if (logger != nullptr)
    {
        logger->log(ILogger::Severity::kERROR, ("MatMulNBits plugin: " + message).c_str());
    }
}

//! Rows of the matrix product: every dim of A but the last (K).
int64_t rowsOf(Dims const& dims) noexcept
{
    int64_t rows = 1;
    for (int32_t i = 0; i + 1 < dims.nbDims; ++i)
    {
        rows *= dims.d[i];
    }
    return rows;
}

//! Weight and zero-point inputs: bytes, or int32 holding one byte each, which is what onnx-tensorrt makes of
//! uint8 initializers (WeightsContext: "Cast UINT8 weights to INT32").
bool isByteValues(DataType type) noexcept
{
    return type == DataType::kINT8 || type == DataType::kUINT8 || type == DataType::kINT32;
}

//! Device bytes of an input: itself, or its int32 values narrowed into `scratch` (the low byte of each,
//! little-endian, by one strided copy).
uint8_t const* bytesOf(PluginTensorDesc const& desc, void const* data, size_t count, void*& scratch,
    cudaStream_t stream) noexcept
{
    if (desc.type != DataType::kINT32)
    {
        return static_cast<uint8_t const*>(data);
    }
    if (cudaMalloc(&scratch, count) != cudaSuccess
        || cudaMemcpy2DAsync(scratch, 1, data, sizeof(int32_t), 1, count, cudaMemcpyDeviceToDevice, stream)
            != cudaSuccess)
    {
        return nullptr;
    }
    return static_cast<uint8_t const*>(scratch);
}

//! ONNX fallback imports pass no zero-point flag: then a fourth input is the zero points.
int32_t zeroPointsFor(MatMulNBitsParams const& p, int32_t nbInputs) noexcept
{
    return p.hasZeroPoints >= 0 ? p.hasZeroPoints : static_cast<int32_t>(nbInputs > kINPUT_ZERO_POINTS);
}
//! Weights handed over as fields (host memory, at build time): checked, packed on the GPU, and brought back,
//! so the engine stores them in the kernels' layout. Null on failure, with the reason logged.
std::shared_ptr<std::vector<uint8_t> const> packFields(MatMulNBitsParams const& p, PluginField const& weights,
    PluginField const* scales, PluginField const* zeroPoints, std::string const& node) noexcept
{
    size_t const blocks = (p.K + p.blockSize - 1) / p.blockSize;
    size_t const bBytes = static_cast<size_t>(p.N) * blocks * (p.blockSize / 2);
    size_t const nScales = static_cast<size_t>(p.N) * blocks;
    size_t const zpBytes = static_cast<size_t>(p.N) * ((blocks + 1) / 2);
    if (static_cast<size_t>(weights.length) != bBytes || scales == nullptr
        || static_cast<size_t>(scales->length) != nScales
        || (zeroPoints != nullptr && static_cast<size_t>(zeroPoints->length) != zpBytes))
    {
        logError(node + ": weights, scales or zero_points fields do not match K, N and block_size");
        return nullptr;
    }
    size_t const bytes = awqe_packed_weight_bytes(p.N, p.K, p.blockSize);
    auto packed = std::make_shared<std::vector<uint8_t>>(bytes);
    void* dB = nullptr;
    void* dScales = nullptr;
    void* dZp = nullptr;
    void* dPacked = nullptr;
    bool ok = cudaMalloc(&dB, bBytes) == cudaSuccess && cudaMalloc(&dScales, nScales * 2) == cudaSuccess
        && cudaMalloc(&dPacked, bytes) == cudaSuccess
        && (zeroPoints == nullptr || cudaMalloc(&dZp, zpBytes) == cudaSuccess)
        && cudaMemcpy(dB, weights.data, bBytes, cudaMemcpyHostToDevice) == cudaSuccess
        && cudaMemcpy(dScales, scales->data, nScales * 2, cudaMemcpyHostToDevice) == cudaSuccess
        && (zeroPoints == nullptr || cudaMemcpy(dZp, zeroPoints->data, zpBytes, cudaMemcpyHostToDevice) == cudaSuccess);
    if (!ok)
    {
        logError(node + ": copying the weights to the GPU for packing failed");
    }
    else
    {
        awqe_status const status = awqe_repack_matmul_nbits(static_cast<uint8_t const*>(dB), dScales,
            static_cast<uint8_t const*>(dZp), p.N, p.K, p.blockSize, dPacked, nullptr);
        ok = status == AWQE_OK
            && cudaMemcpy(packed->data(), dPacked, bytes, cudaMemcpyDeviceToHost) == cudaSuccess;
        if (!ok)
        {
            logError(node + ": packing failed: " + awqe_status_string(status) + ": " + awqe_last_error());
        }
    }
    cudaFree(dB);
    cudaFree(dScales);
    cudaFree(dZp);
    cudaFree(dPacked);
    return ok ? packed : nullptr;
}
} // namespace

MatMulNBitsPlugin::MatMulNBitsPlugin(MatMulNBitsParams const& params)
    : mParams(params)
{
}

MatMulNBitsPlugin::~MatMulNBitsPlugin()
{
    if (mPacked != nullptr)
    {
        cudaFree(mPacked);
    }
}

IPluginCapability* MatMulNBitsPlugin::getCapabilityInterface(PluginCapabilityType type) noexcept
{
    switch (type)
    {
    case PluginCapabilityType::kCORE: return static_cast<IPluginV3OneCore*>(this);
    case PluginCapabilityType::kBUILD: return static_cast<IPluginV3OneBuild*>(this);
    case PluginCapabilityType::kRUNTIME: return static_cast<IPluginV3OneRuntime*>(this);
    }
    return nullptr;
}

IPluginV3* MatMulNBitsPlugin::clone() noexcept
{
    // Each clone packs its own copy: TensorRT may run clones on different contexts and streams.
    return new (std::nothrow) MatMulNBitsPlugin(mParams);
}

char const* MatMulNBitsPlugin::getPluginName() const noexcept
{
    return kNAME;
}

char const* MatMulNBitsPlugin::getPluginVersion() const noexcept
{
    return kVERSION;
}

char const* MatMulNBitsPlugin::getPluginNamespace() const noexcept
{
    return kNAMESPACE;
}

bool MatMulNBitsPlugin::resolveInputs(int32_t nbInputs) noexcept
{
    if (mParams.packed)
    {
        if (nbInputs != 1 + mParams.hasBias)
        {
            logError("expected " + std::to_string(1 + mParams.hasBias) + " inputs (A" + (mParams.hasBias ? ", bias" : "")
                + ") with weights given as fields, got " + std::to_string(nbInputs));
            return false;
        }
        return true;
    }
    int32_t const zeroPoints = zeroPointsFor(mParams, nbInputs);
    int32_t const expected = 3 + zeroPoints + mParams.hasBias;
    if (nbInputs != expected)
    {
        logError("expected " + std::to_string(expected) + " inputs (A, B, scales" + (zeroPoints ? ", zero_points" : "")
            + (mParams.hasBias ? ", bias" : "") + "), got " + std::to_string(nbInputs)
            + "; g_idx is not supported");
        return false;
    }
    mParams.hasZeroPoints = zeroPoints;
    return true;
}

int32_t MatMulNBitsPlugin::configurePlugin(
    DynamicPluginTensorDesc const* in, int32_t nbInputs, DynamicPluginTensorDesc const*, int32_t) noexcept
{
    if (!resolveInputs(nbInputs))
    {
        return -1;
    }
    Dims const& a = in[kINPUT_A].desc.dims;
    if (a.nbDims < 1 || (a.d[a.nbDims - 1] != -1 && a.d[a.nbDims - 1] != mParams.K))
    {
        logError("the last dim of A is not K = " + std::to_string(mParams.K));
        return -1;
    }
    return 0;
}

int32_t MatMulNBitsPlugin::getOutputDataTypes(
    DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes, int32_t) const noexcept
{
    if (nbOutputs != 1)
    {
        return -1;
    }
    outputTypes[0] = inputTypes[kINPUT_A];
    return 0;
}

int32_t MatMulNBitsPlugin::getOutputShapes(DimsExprs const* inputs, int32_t nbInputs, DimsExprs const*, int32_t,
    DimsExprs* outputs, int32_t nbOutputs, IExprBuilder& exprBuilder) noexcept
{
    if (nbInputs < 3 || nbOutputs != 1 || inputs[kINPUT_A].nbDims < 1)
    {
        return -1;
    }
    outputs[0] = inputs[kINPUT_A];
    outputs[0].d[outputs[0].nbDims - 1] = exprBuilder.constant(mParams.N);
    return 0;
}

bool MatMulNBitsPlugin::supportsFormatCombination(
    int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs, int32_t) noexcept
{
    PluginTensorDesc const& desc = inOut[pos].desc;
    if (desc.format != TensorFormat::kLINEAR)
    {
        return false;
    }
    // The kernels take fp16 activations, scales and bias, and the weights and zero points as byte values.
    int32_t const zeroPoints = zeroPointsFor(mParams, nbInputs);
    if (!mParams.packed && (pos == kINPUT_B || (zeroPoints && pos == kINPUT_ZERO_POINTS)))
    {
        return isByteValues(desc.type);
    }
    return desc.type == DataType::kHALF;
}

int32_t MatMulNBitsPlugin::getNbOutputs() const noexcept
{
    return 1;
}

size_t MatMulNBitsPlugin::getWorkspaceSize(
    DynamicPluginTensorDesc const* inputs, int32_t, DynamicPluginTensorDesc const*, int32_t) const noexcept
{
    int64_t const rows = rowsOf(inputs[kINPUT_A].max);
    return awqe_workspace_bytes(static_cast<int>(rows > INT_MAX ? INT_MAX : rows), mParams.N, mParams.K,
        mParams.blockSize);
}

int32_t MatMulNBitsPlugin::onShapeChange(
    PluginTensorDesc const* in, int32_t nbInputs, PluginTensorDesc const*, int32_t) noexcept
{
    if (!resolveInputs(nbInputs))
    {
        return -1;
    }
    Dims const& a = in[kINPUT_A].dims;
    return (a.nbDims >= 1 && a.d[a.nbDims - 1] == mParams.K) ? 0 : -1;
}

bool MatMulNBitsPlugin::ensurePacked(
    PluginTensorDesc const* inputDesc, void const* const* inputs, cudaStream_t stream) noexcept
{
    if (mPacked != nullptr)
    {
        return true;
    }
    if (mParams.packed)
    {
        size_t const bytes = mParams.packed->size();
        if (cudaMalloc(&mPacked, bytes) != cudaSuccess
            || cudaMemcpyAsync(mPacked, mParams.packed->data(), bytes, cudaMemcpyHostToDevice, stream) != cudaSuccess)
        {
            logError("uploading " + std::to_string(bytes) + " bytes of packed weights failed");
            cudaFree(mPacked);
            mPacked = nullptr;
            return false;
        }
        return true;
    }
    // B, scales and zero points are engine constants, so packing them once per instance is exact.
    size_t const blocks = (mParams.K + mParams.blockSize - 1) / mParams.blockSize;
    size_t const bBytes = static_cast<size_t>(mParams.N) * blocks * (mParams.blockSize / 2);
    size_t const zpBytes = static_cast<size_t>(mParams.N) * ((blocks + 1) / 2);
    void* scratchB = nullptr;
    void* scratchZp = nullptr;
    uint8_t const* b = bytesOf(inputDesc[kINPUT_B], inputs[kINPUT_B], bBytes, scratchB, stream);
    uint8_t const* zp = mParams.hasZeroPoints
        ? bytesOf(inputDesc[kINPUT_ZERO_POINTS], inputs[kINPUT_ZERO_POINTS], zpBytes, scratchZp, stream)
        : nullptr;
    bool ok = b != nullptr && (zp != nullptr || !mParams.hasZeroPoints);
    if (!ok)
    {
        logError("narrowing int32 weights to bytes failed");
    }
    size_t const bytes = awqe_packed_weight_bytes(mParams.N, mParams.K, mParams.blockSize);
    if (ok && cudaMalloc(&mPacked, bytes) != cudaSuccess)
    {
        mPacked = nullptr;
        ok = false;
        logError("cudaMalloc of " + std::to_string(bytes) + " bytes for the packed weights failed");
    }
    if (ok)
    {
        awqe_status const status = awqe_repack_matmul_nbits(
            b, inputs[kINPUT_SCALES], zp, mParams.N, mParams.K, mParams.blockSize, mPacked, stream);
        if (status != AWQE_OK)
        {
            logError(std::string("repack failed: ") + awqe_status_string(status) + ": " + awqe_last_error());
            cudaFree(mPacked);
            mPacked = nullptr;
            ok = false;
        }
    }
    if (scratchB != nullptr || scratchZp != nullptr)
    {
        cudaStreamSynchronize(stream); // the repack reads the scratch bytes
        cudaFree(scratchB);
        cudaFree(scratchZp);
    }
    return ok;
}

int32_t MatMulNBitsPlugin::enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const*,
    void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept
{
    int64_t const rows = rowsOf(inputDesc[kINPUT_A].dims);
    if (rows == 0)
    {
        return 0;
    }
    if (rows > INT_MAX || !ensurePacked(inputDesc, inputs, stream))
    {
        return -1;
    }
    int const m = static_cast<int>(rows);
    int32_t const biasInput = mParams.packed ? 1 : kINPUT_SCALES + 1 + mParams.hasZeroPoints;
    void const* bias = mParams.hasBias ? inputs[biasInput] : nullptr;
    awqe_status const status = awqe_gemm_f16(inputs[kINPUT_A], mPacked, bias, outputs[0], m, mParams.N, mParams.K,
        mParams.blockSize, workspace, awqe_workspace_bytes(m, mParams.N, mParams.K, mParams.blockSize), stream);
    if (status != AWQE_OK)
    {
        logError(std::string("gemm failed: ") + awqe_status_string(status) + ": " + awqe_last_error());
        return -1;
    }
    return 0;
}

IPluginV3* MatMulNBitsPlugin::attachToContext(IPluginResourceContext*) noexcept
{
    return clone();
}

PluginFieldCollection const* MatMulNBitsPlugin::getFieldsToSerialize() noexcept
{
    mSerialized = {
        PluginField("K", &mParams.K, PluginFieldType::kINT32, 1),
        PluginField("N", &mParams.N, PluginFieldType::kINT32, 1),
        PluginField("bits", &mParams.bits, PluginFieldType::kINT32, 1),
        PluginField("block_size", &mParams.blockSize, PluginFieldType::kINT32, 1),
        PluginField("has_zero_points", &mParams.hasZeroPoints, PluginFieldType::kINT32, 1),
        PluginField("has_bias", &mParams.hasBias, PluginFieldType::kINT32, 1),
    };
    if (mParams.packed)
    {
        mSerialized.emplace_back("packed", mParams.packed->data(), PluginFieldType::kINT8,
            static_cast<int32_t>(mParams.packed->size()));
    }
    mSerializedCollection.nbFields = static_cast<int32_t>(mSerialized.size());
    mSerializedCollection.fields = mSerialized.data();
    return &mSerializedCollection;
}

MatMulNBitsPluginCreator::MatMulNBitsPluginCreator()
{
    // The ONNX fallback importer copies exactly these attributes of the node into fields.
    for (char const* name : {"K", "N", "bits", "block_size", "accuracy_level", "has_bias"})
    {
        mFields.emplace_back(name, nullptr, PluginFieldType::kINT32, 1);
    }
    mFields.emplace_back("weights", nullptr, PluginFieldType::kINT8, 0);
    mFields.emplace_back("scales", nullptr, PluginFieldType::kFLOAT16, 0);
    mFields.emplace_back("zero_points", nullptr, PluginFieldType::kINT8, 0);
    mFieldCollection.nbFields = static_cast<int32_t>(mFields.size());
    mFieldCollection.fields = mFields.data();
}

IPluginV3* MatMulNBitsPluginCreator::createPlugin(
    char const* name, PluginFieldCollection const* fc, TensorRTPhase) noexcept
{
    MatMulNBitsParams p;
    int32_t isUint4 = 1;
    PluginField const* weights = nullptr;
    PluginField const* scales = nullptr;
    PluginField const* zeroPoints = nullptr;
    PluginField const* packed = nullptr;
    // Names from the ONNX attributes (K, N), from TensorRT-RTX's importer (k, n, has_zeros, is_uint4),
    // and from getFieldsToSerialize (has_zero_points, packed); accuracy_level is accepted and unused.
    for (int32_t i = 0; fc != nullptr && i < fc->nbFields; ++i)
    {
        PluginField const& f = fc->fields[i];
        if (f.data == nullptr || f.length < 1)
        {
            continue;
        }
        std::string const key = f.name;
        if (f.type != PluginFieldType::kINT32)
        {
            PluginFieldType const want = key == "scales" ? PluginFieldType::kFLOAT16 : PluginFieldType::kINT8;
            PluginField const** slot = key == "weights" ? &weights
                : key == "scales"                       ? &scales
                : key == "zero_points"                  ? &zeroPoints
                : key == "packed"                       ? &packed
                                                        : nullptr;
            if (slot != nullptr && f.type == want)
            {
                *slot = &f;
            }
            continue;
        }
        int32_t const v = *static_cast<int32_t const*>(f.data);
        if (key == "K" || key == "k") p.K = v;
        else if (key == "N" || key == "n") p.N = v;
        else if (key == "bits") p.bits = v;
        else if (key == "block_size") p.blockSize = v;
        else if (key == "has_zero_points" || key == "has_zeros") p.hasZeroPoints = v;
        else if (key == "has_bias") p.hasBias = v;
        else if (key == "is_uint4") isUint4 = v;
    }
    std::string const node = name != nullptr ? name : "?";
    if (p.bits != 4 || isUint4 != 1)
    {
        logError(node + ": only unsigned 4-bit weights are supported (bits = " + std::to_string(p.bits) + ")");
        return nullptr;
    }
    size_t const packedBytes = awqe_packed_weight_bytes(p.N, p.K, p.blockSize);
    if (packedBytes == 0)
    {
        logError(node + ": unsupported sizes K = " + std::to_string(p.K) + ", N = " + std::to_string(p.N)
            + ", block_size = " + std::to_string(p.blockSize));
        return nullptr;
    }
    if (packed != nullptr)
    {
        if (static_cast<size_t>(packed->length) != packedBytes)
        {
            logError(node + ": serialized packed weights have the wrong size");
            return nullptr;
        }
        auto const* bytes = static_cast<uint8_t const*>(packed->data);
        p.packed = std::make_shared<std::vector<uint8_t> const>(bytes, bytes + packedBytes);
    }
    else if (weights != nullptr)
    {
        p.packed = packFields(p, *weights, scales, zeroPoints, node);
        if (!p.packed)
        {
            return nullptr;
        }
    }
    return new (std::nothrow) MatMulNBitsPlugin(p);
}

PluginFieldCollection const* MatMulNBitsPluginCreator::getFieldNames() noexcept
{
    return &mFieldCollection;
}

char const* MatMulNBitsPluginCreator::getPluginName() const noexcept
{
    return kNAME;
}

char const* MatMulNBitsPluginCreator::getPluginVersion() const noexcept
{
    return kVERSION;
}

char const* MatMulNBitsPluginCreator::getPluginNamespace() const noexcept
{
    return kNAMESPACE;
}

} // namespace awq_edge

// The two entry points IPluginRegistry::loadLibrary (trt.get_plugin_registry().load_library) looks up.
extern "C" __attribute__((visibility("default"))) void setLoggerFinder(ILoggerFinder* finder)
{
    std::lock_guard<std::mutex> lock(awq_edge::gLoggerMutex);
    awq_edge::gLoggerFinder = finder;
}

extern "C" __attribute__((visibility("default"))) IPluginCreatorInterface* const* getCreators(int32_t& nbCreators)
{
    static awq_edge::MatMulNBitsPluginCreator creator;
    static IPluginCreatorInterface* const creators[] = {&creator};
    nbCreators = 1;
    return creators;
}
