// Minimal C++ app: load an `awq-edge build` engine (and its plugin) and greedily generate from prompt token ids.
//
//   trt_generate ENGINE_DIR/model.engine PLUGIN.so|- MAX_NEW_TOKENS EOS_ID ID [ID ...]
//
// Token ids in, token ids out: tokenize and detokenize with the tokenizer in the ONNX folder, e.g.
//   python3 -c "from transformers import AutoTokenizer as T; print(*T.from_pretrained('ONNX_DIR')('Hi')['input_ids'])"
// Optimisation profile 0 is prefill and 1 is decode, in the order manifest.json lists them.
#include <NvInferRuntime.h>

#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <memory>
#include <string>
#include <utility>
#include <vector>

using namespace nvinfer1;

namespace
{
class Logger : public ILogger
{
    void log(Severity severity, AsciiChar const* msg) noexcept override
    {
        if (severity <= Severity::kWARNING)
            std::fprintf(stderr, "[TensorRT] %s\n", msg);
    }
} gLogger;

[[noreturn]] void fail(std::string const& message)
{
    std::fprintf(stderr, "trt_generate: error: %s\n", message.c_str());
    std::exit(2);
}

void check(cudaError_t err, char const* what)
{
    if (err != cudaSuccess)
        fail(std::string(what) + ": " + cudaGetErrorString(err));
}

void* deviceAlloc(size_t bytes)
{
    void* p = nullptr;
    check(cudaMalloc(&p, bytes), "cudaMalloc");
    return p;
}

constexpr int32_t kPREFILL = 0;
constexpr int32_t kDECODE = 1;
} // namespace

int main(int argc, char** argv)
{
    if (argc < 6)
        fail("usage: trt_generate ENGINE PLUGIN.so|- MAX_NEW_TOKENS EOS_ID ID [ID ...]");
    std::string const plugin = argv[2];
    int const maxNew = std::atoi(argv[3]);
    int64_t const eos = std::atoll(argv[4]);
    std::vector<int64_t> prompt;
    for (int i = 5; i < argc; ++i)
        prompt.push_back(std::atoll(argv[i]));

    std::unique_ptr<IRuntime> runtime{createInferRuntime(gLogger)};
    // The plugin must be registered before the engine that uses it is deserialized.
    if (plugin != "-" && runtime->getPluginRegistry().loadLibrary(plugin.c_str()) == nullptr)
        fail("cannot load plugin library " + plugin);
    std::ifstream file(argv[1], std::ios::binary);
    std::vector<char> plan((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
    if (plan.empty())
        fail(std::string("cannot read engine ") + argv[1]);
    std::unique_ptr<ICudaEngine> engine{runtime->deserializeCudaEngine(plan.data(), plan.size())};
    if (!engine)
        fail("TensorRT could not deserialize the engine (built for another GPU or TensorRT version?)");
    std::unique_ptr<IExecutionContext> context{engine->createExecutionContext()};

    // The cache layout comes from the engine's own inputs: past_key_values.{i}.key [batch, kv_heads, past, head_dim].
    int layers = 0;
    while (engine->getTensorIOMode(("past_key_values." + std::to_string(layers) + ".key").c_str()) == TensorIOMode::kINPUT)
        ++layers;
    Dims const kvDims = engine->getTensorShape("past_key_values.0.key");
    Dims const logitDims = engine->getTensorShape("logits");
    int64_t const kvHeads = kvDims.d[1], headDim = kvDims.d[3], vocab = logitDims.d[2];
    int64_t const maxSeq = engine->getProfileShape("past_key_values.0.key", kDECODE, OptProfileSelector::kMAX).d[2] + 1;
    int64_t const maxChunk = engine->getProfileShape("input_ids", kPREFILL, OptProfileSelector::kMAX).d[1];
    bool const hasPositions = engine->getTensorIOMode("position_ids") == TensorIOMode::kINPUT;
    if (layers == 0 || static_cast<int64_t>(prompt.size()) > maxChunk
        || static_cast<int64_t>(prompt.size()) + maxNew > maxSeq)
        fail("the prompt must fit one prefill chunk (" + std::to_string(maxChunk) + " tokens) and the context ("
            + std::to_string(maxSeq) + ")");

    // Two buffers per cache tensor: step t reads the past from one and writes the present into the other.
    // [1, heads, total, dim] contiguous is exactly the next step's [1, heads, past, dim], so they just swap.
    size_t const kvBytes = static_cast<size_t>(kvHeads * maxSeq * headDim) * sizeof(__half);
    std::vector<std::pair<void*, void*>> cache(2 * layers);
    for (auto& c : cache)
        c = {deviceAlloc(kvBytes), deviceAlloc(kvBytes)};
    auto* ids = static_cast<int64_t*>(deviceAlloc(maxSeq * sizeof(int64_t)));
    auto* positions = static_cast<int64_t*>(deviceAlloc(maxSeq * sizeof(int64_t)));
    auto* mask = static_cast<int64_t*>(deviceAlloc(maxSeq * sizeof(int64_t)));
    auto* logits = static_cast<__half*>(deviceAlloc(maxChunk * vocab * sizeof(__half)));
    std::vector<int64_t> ones(maxSeq, 1);
    check(cudaMemcpy(mask, ones.data(), maxSeq * sizeof(int64_t), cudaMemcpyHostToDevice), "mask");
    cudaStream_t stream;
    check(cudaStreamCreate(&stream), "stream");

    std::vector<int64_t> tokens = prompt;
    std::vector<int64_t> step = prompt;
    int32_t profile = -1;
    std::vector<__half> last(vocab);
    for (int produced = 0; produced < maxNew; ++produced)
    {
        int64_t const n = step.size(), past = tokens.size() - n, total = tokens.size();
        int32_t const want = n == 1 ? kDECODE : kPREFILL;
        if (want != profile && !context->setOptimizationProfileAsync(want, stream))
            fail("cannot select optimisation profile " + std::to_string(want));
        profile = want;
        std::vector<int64_t> pos(n);
        for (int64_t i = 0; i < n; ++i)
            pos[i] = past + i;
        check(cudaMemcpyAsync(ids, step.data(), n * sizeof(int64_t), cudaMemcpyHostToDevice, stream), "ids");
        check(cudaMemcpyAsync(positions, pos.data(), n * sizeof(int64_t), cudaMemcpyHostToDevice, stream), "pos");
        context->setInputShape("input_ids", Dims2{1, n});
        context->setTensorAddress("input_ids", ids);
        context->setInputShape("attention_mask", Dims2{1, total});
        context->setTensorAddress("attention_mask", mask);
        if (hasPositions)
        {
            context->setInputShape("position_ids", Dims2{1, n});
            context->setTensorAddress("position_ids", positions);
        }
        for (int i = 0; i < 2 * layers; ++i)
        {
            std::string const suffix = std::to_string(i / 2) + (i % 2 ? ".value" : ".key");
            context->setInputShape(("past_key_values." + suffix).c_str(), Dims4{1, kvHeads, past, headDim});
            context->setTensorAddress(("past_key_values." + suffix).c_str(), cache[i].first);
            context->setTensorAddress(("present." + suffix).c_str(), cache[i].second);
        }
        context->setTensorAddress("logits", logits);
        if (!context->enqueueV3(stream))
            fail("enqueueV3 failed");
        check(cudaMemcpyAsync(last.data(), logits + (n - 1) * vocab, vocab * sizeof(__half), cudaMemcpyDeviceToHost,
                  stream), "logits");
        check(cudaStreamSynchronize(stream), "run");
        for (auto& c : cache)
            std::swap(c.first, c.second);

        int64_t best = 0;
        for (int64_t v = 1; v < vocab; ++v)
            if (__half2float(last[v]) > __half2float(last[best]))
                best = v;
        if (best == eos)
            break;
        std::printf("%lld ", static_cast<long long>(best));
        std::fflush(stdout);
        tokens.push_back(best);
        step.assign(1, best);
    }
    std::printf("\n");
    for (auto& c : cache)
    {
        cudaFree(c.first);
        cudaFree(c.second);
    }
    cudaFree(ids);
    cudaFree(positions);
    cudaFree(mask);
    cudaFree(logits);
    cudaStreamDestroy(stream);
    return 0;
}
