// Drives the MatMulNBits plugin through its TensorRT interfaces the way TensorRT calls them (create, configure,
// attach, shape change, enqueue), without TensorRT, and checks its output against a CPU dequantise-and-multiply.
// Exit 0 when every case matches. Usage: awq_edge_trt_plugin_check (needs a CUDA GPU).
#include <NvInferRuntime.h>

#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

using namespace nvinfer1;

extern "C" IPluginCreatorInterface* const* getCreators(int32_t& nbCreators);
extern "C" void setLoggerFinder(ILoggerFinder* finder);

namespace
{
class StderrLogger : public ILogger
{
    void log(Severity, AsciiChar const* msg) noexcept override
    {
        std::fprintf(stderr, "%s\n", msg);
    }
};

class Finder : public ILoggerFinder
{
public:
    ILogger* findLogger() override
    {
        return &mLogger;
    }

private:
    StderrLogger mLogger;
};

#define CHECK_CUDA(call)                                                                                              \
    do                                                                                                                 \
    {                                                                                                                  \
        cudaError_t e_ = (call);                                                                                       \
        if (e_ != cudaSuccess)                                                                                         \
        {                                                                                                              \
            std::fprintf(stderr, "%s: %s\n", #call, cudaGetErrorString(e_));                                           \
            std::exit(2);                                                                                              \
        }                                                                                                              \
    } while (0)

template <typename T>
void* toDevice(std::vector<T> const& host)
{
    if (host.empty())
        return nullptr;
    void* ptr = nullptr;
    CHECK_CUDA(cudaMalloc(&ptr, host.size() * sizeof(T) + 16));
    CHECK_CUDA(cudaMemcpy(ptr, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice));
    return ptr;
}

Dims dims2(int64_t a, int64_t b)
{
    Dims d{};
    d.nbDims = 2;
    d.d[0] = a;
    d.d[1] = b;
    return d;
}

struct Case
{
    int K, N, blockSize, zeroPoints, bias;
    bool widened; // B and zero points as int32, one byte value each, as onnx-tensorrt imports uint8 initializers
    bool asFields; // weights as creator fields, packed at build time, as `awq-edge build` hands them over
    std::vector<int> rows; // M for successive enqueues on one attached plugin
};

//! One plugin instance, several M on it: the first enqueue packs, later ones reuse the packed weights.
bool runCase(IPluginCreatorV3One& creator, Case const& c, std::mt19937& rng)
{
    int const nb = (c.K + c.blockSize - 1) / c.blockSize;
    int const zpBytes = (nb + 1) / 2;
    std::uniform_int_distribution<int> byte(0, 255);
    std::uniform_real_distribution<float> unit(-1.f, 1.f);
    std::vector<uint8_t> B(static_cast<size_t>(c.N) * nb * (c.blockSize / 2));
    std::vector<uint8_t> zp(static_cast<size_t>(c.N) * zpBytes);
    std::vector<__half> scales(static_cast<size_t>(c.N) * nb), bias(c.N);
    for (auto& b : B) b = static_cast<uint8_t>(byte(rng));
    for (auto& z : zp) z = static_cast<uint8_t>(byte(rng));
    for (auto& s : scales) s = __float2half(0.01f + 0.02f * std::fabs(unit(rng)));
    for (auto& b : bias) b = __float2half(unit(rng));

    // W [N, K] from the MatMulNBits layout: low nibble first along K, zero point 8 when absent.
    std::vector<float> W(static_cast<size_t>(c.N) * c.K);
    for (int n = 0; n < c.N; ++n)
        for (int k = 0; k < c.K; ++k)
        {
            int const blk = k / c.blockSize, in = k % c.blockSize;
            uint8_t const packed = B[(static_cast<size_t>(n) * nb + blk) * (c.blockSize / 2) + in / 2];
            int const q = (in % 2) ? packed >> 4 : packed & 0xF;
            uint8_t const zbyte = zp[static_cast<size_t>(n) * zpBytes + blk / 2];
            int const z = c.zeroPoints ? ((blk % 2) ? zbyte >> 4 : zbyte & 0xF) : 8;
            W[static_cast<size_t>(n) * c.K + k] = (q - z) * __half2float(scales[static_cast<size_t>(n) * nb + blk]);
        }

    std::vector<PluginField> fields{PluginField("K", &c.K, PluginFieldType::kINT32, 1),
        PluginField("N", &c.N, PluginFieldType::kINT32, 1),
        PluginField("block_size", &c.blockSize, PluginFieldType::kINT32, 1)};
    int const bits = 4;
    fields.emplace_back("bits", &bits, PluginFieldType::kINT32, 1);
    if (c.asFields)
    {
        fields.emplace_back("weights", B.data(), PluginFieldType::kINT8, static_cast<int32_t>(B.size()));
        fields.emplace_back("scales", scales.data(), PluginFieldType::kFLOAT16, static_cast<int32_t>(scales.size()));
        if (c.zeroPoints)
            fields.emplace_back("zero_points", zp.data(), PluginFieldType::kINT8, static_cast<int32_t>(zp.size()));
        fields.emplace_back("has_bias", &c.bias, PluginFieldType::kINT32, 1);
    }
    else if (c.bias) // only TensorRT-RTX's importer passes flags; the ONNX fallback path infers zero points
    {
        fields.emplace_back("has_zeros", &c.zeroPoints, PluginFieldType::kINT32, 1);
        fields.emplace_back("has_bias", &c.bias, PluginFieldType::kINT32, 1);
    }
    PluginFieldCollection fc{static_cast<int32_t>(fields.size()), fields.data()};
    IPluginV3* built = creator.createPlugin("check", &fc, TensorRTPhase::kBUILD);
    if (built == nullptr)
        return false;
    int const nbInputs = c.asFields ? 1 + c.bias : 3 + c.zeroPoints + c.bias;
    int const maxRows = 64;

    std::vector<DynamicPluginTensorDesc> in(nbInputs), out(1);
    in[0].desc.dims = dims2(-1, c.K);
    in[0].desc.type = DataType::kHALF;
    in[0].max = dims2(maxRows, c.K);
    DataType const byteType = c.widened ? DataType::kINT32 : DataType::kUINT8;
    for (int i = 1; i < nbInputs; ++i)
        in[i].desc.type = (!c.asFields && (i == 1 || (c.zeroPoints && i == 3))) ? byteType : DataType::kHALF;
    auto* build = static_cast<IPluginV3OneBuild*>(built->getCapabilityInterface(PluginCapabilityType::kBUILD));
    if (build->configurePlugin(in.data(), nbInputs, out.data(), 1) != 0)
        return false;
    size_t const workspaceBytes = build->getWorkspaceSize(in.data(), nbInputs, out.data(), 1);

    auto* builtRuntime = static_cast<IPluginV3OneRuntime*>(built->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
    // The engine holds the serialized fields; the runtime plugin is made from them, as at deserialization.
    IPluginV3* runtimePlugin = creator.createPlugin("check", builtRuntime->getFieldsToSerialize(), TensorRTPhase::kRUNTIME);
    IPluginV3* attached = static_cast<IPluginV3OneRuntime*>(
        runtimePlugin->getCapabilityInterface(PluginCapabilityType::kRUNTIME))->attachToContext(nullptr);
    auto* runtime = static_cast<IPluginV3OneRuntime*>(attached->getCapabilityInterface(PluginCapabilityType::kRUNTIME));

    std::vector<int32_t> wideB(B.begin(), B.end()), wideZp(zp.begin(), zp.end());
    std::vector<void*> inputs{nullptr};
    if (!c.asFields)
    {
        inputs.push_back(c.widened ? toDevice(wideB) : toDevice(B));
        inputs.push_back(toDevice(scales));
        if (c.zeroPoints)
            inputs.push_back(c.widened ? toDevice(wideZp) : toDevice(zp));
    }
    if (c.bias)
        inputs.push_back(toDevice(bias));
    void* workspace = nullptr;
    CHECK_CUDA(cudaMalloc(&workspace, workspaceBytes + 16));
    cudaStream_t stream;
    CHECK_CUDA(cudaStreamCreate(&stream));

    bool ok = true;
    for (int m : c.rows)
    {
        std::vector<__half> A(static_cast<size_t>(m) * c.K);
        for (auto& a : A) a = __float2half(unit(rng));
        inputs[0] = toDevice(A);
        void* y = nullptr;
        CHECK_CUDA(cudaMalloc(&y, static_cast<size_t>(m) * c.N * sizeof(__half) + 16));
        std::vector<PluginTensorDesc> desc(nbInputs), outDesc(1);
        for (int i = 0; i < nbInputs; ++i)
            desc[i].type = in[i].desc.type;
        desc[0].dims = dims2(m, c.K);
        outDesc[0].dims = dims2(m, c.N);
        if (runtime->onShapeChange(desc.data(), nbInputs, outDesc.data(), 1) != 0
            || runtime->enqueue(desc.data(), outDesc.data(), inputs.data(), &y, workspace, stream) != 0)
            return false;
        CHECK_CUDA(cudaStreamSynchronize(stream));
        std::vector<__half> got(static_cast<size_t>(m) * c.N);
        CHECK_CUDA(cudaMemcpy(got.data(), y, got.size() * sizeof(__half), cudaMemcpyDeviceToHost));
        double worst = 0, scale = 0;
        for (int r = 0; r < m; ++r)
            for (int n = 0; n < c.N; ++n)
            {
                double ref = c.bias ? __half2float(bias[n]) : 0.0;
                for (int k = 0; k < c.K; ++k)
                    ref += __half2float(A[static_cast<size_t>(r) * c.K + k]) * W[static_cast<size_t>(n) * c.K + k];
                worst = std::max(worst, std::fabs(ref - __half2float(got[static_cast<size_t>(r) * c.N + n])));
                scale = std::max(scale, std::fabs(ref));
            }
        bool const pass = worst <= 2e-3 * scale + 2e-3;
        std::printf("K=%d N=%d block=%d zero_points=%d bias=%d %s M=%d: max |err| %.3g of max |y| %.3g %s\n", c.K,
            c.N, c.blockSize, c.zeroPoints, c.bias, c.asFields ? "fields" : c.widened ? "int32" : "bytes", m, worst,
            scale, pass ? "ok" : "MISMATCH");
        ok = ok && pass;
        cudaFree(y);
        cudaFree(inputs[0]);
    }
    for (size_t i = 1; i < inputs.size(); ++i)
        cudaFree(inputs[i]);
    cudaFree(workspace);
    cudaStreamDestroy(stream);
    delete attached;
    delete runtimePlugin;
    delete built;
    return ok;
}
} // namespace

int main()
{
    static Finder finder;
    setLoggerFinder(&finder);
    int32_t nbCreators = 0;
    IPluginCreatorInterface* const* creators = getCreators(nbCreators);
    if (nbCreators != 1 || std::string(creators[0]->getInterfaceInfo().kind) != "PLUGIN CREATOR_V3ONE")
    {
        std::fprintf(stderr, "expected one IPluginCreatorV3One\n");
        return 1;
    }
    auto& creator = *static_cast<IPluginCreatorV3One*>(creators[0]);
    std::printf("creator %s v%s\n", creator.getPluginName(), creator.getPluginVersion());
    std::mt19937 rng(0);
    // SmolLM2's q_proj (K=576 = 9 blocks of 64, an odd count), its down_proj, group 128, the RTX flags path,
    // the int32-widened weights of TensorRT's ONNX fallback import, and weights as fields packed at build time.
    std::vector<Case> cases{{576, 576, 64, 1, 0, false, false, {1, 5, 16, 37, 64}},
        {1536, 576, 64, 1, 0, false, false, {1, 17}}, {576, 1536, 64, 0, 0, false, false, {1, 33}},
        {1024, 256, 128, 1, 0, false, false, {1, 64}}, {576, 192, 32, 1, 1, false, false, {3, 20}},
        {576, 576, 64, 1, 0, true, false, {1, 40}}, {576, 192, 64, 0, 0, true, false, {7}},
        {576, 576, 64, 1, 0, false, true, {1, 16, 50}}, {1536, 576, 64, 0, 0, false, true, {2}},
        {576, 192, 32, 1, 1, false, true, {1, 9}}};
    bool ok = true;
    for (Case const& c : cases)
        ok = runCase(creator, c, rng) && ok;
    std::printf(ok ? "all cases match\n" : "FAILED\n");
    return ok ? 0 : 1;
}
