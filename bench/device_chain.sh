#!/usr/bin/env bash
# The GPU session's steps, one device call each while the machine stays warm.
# The real models (and the onnxruntime GPU wheels, see unbundle) travel as parts in .mc/p (at most 64 MiB a call,
# the whole tree counted): each call moves its part to /tmp/parts.
# Usage on the GPU machine, from the repository root: OUT=dir bash bench/device_chain.sh STEP...
#   setup     install the carried gguf wheel, build the kernel library
#   tests     the GPU tests: kernels, CUDA runtime (every family), the quantiser's CLI on the GPU
#   scale8b   bench/quantize_scale.py at Llama-3-8B shapes, alone on the GPU (its time is a figure)
#   smollm2   join and convert SmolLM2; the CLI row of quantize_scale; quality matrices side by side
#   gemma3    join and convert Gemma-3-270M; its quality matrices, decode parity and speed, its GPU test
#   final     SmolLM2's GPTQ-dampening and calibration-domain rows beside Gemma-3's rows, decode and tests
#   probe     the layer loop's steps (time, where the GPU peak is) on a 4-layer Llama-3-8B, for awq and awq-gptq
#   defaults  RTN / AWQ / AWQ+GPTQ / GPTQ at g64 and g128, 128 and 16 samples, both models side by side; the CLI
#             at its defaults on SmolLM2 (quantize -> eval); the GPU tests
#   onnxgpu   onnxruntime-gpu and onnxruntime-genai-cuda (from the bundle.* parts, see unbundle): the ONNX CUDA
#             tests, then bench/onnx_gpu.py on SmolLM2 (CLI defaults, against the peer's int4 CUDA build) and
#             bench/ort_host_costs.py on its default export
#   orttests  onnxgpu's tests alone
#   onnxgpu_shapes  bench/onnx_gpu.py at the Llama-2-7B and Llama-3-8B shapes (random weights; ONNX_SHAPES,
#             ONNX_SHAPE_ROWS, ONNX_REPEATS)
#   gpuinstall  docs/onnxruntime-gpu.md's `pip install -e '.[gpu]'` as written (offline, into the image's Python:
#             last, it replaces the image's onnxruntime), then the installed CLI and awq_edge.load with --provider cuda
#             on an fp16 export of onnxgpu's checkpoint
#   families  Gemma-3-270M (real) converted and quantised at the CLI's defaults, its perplexity and the float
#             model's, beside the GPU tests; then, alone on the GPU, bench/decode.py on every family's shape and the
#             real Gemma-3-270M (parity, speed), and bench/kernels.py (issue 22)
#   shapes    bench/decode.py on every family's shape (random weights; ours and torch int4, the breakdown) and
#             bench/kernels.py on their linear shapes, alone on the GPU
#   h200      issue 22's decode_h200.json and kernels_h200.json (every family's shape, the kernel shapes)
#   h200hf    bench/decode.py: ours beside transformers fp16 at the Llama-2-7B and Llama-3-8B shapes
#   sampling  the CUDA tests, then bench/decode.py's GPU sampling against host sampling and bench/kernels.py on
#             every family's linear shapes
#   status    what the background steps have written so far
# A step can run in the background across calls (the machine stays warm while calls follow within 30 s):
#   setsid nohup env OUT=/tmp/bg bash bench/device_chain.sh scale8b > /tmp/bg.log 2>&1 < /dev/null &
# Results are written to /tmp/results and returned packed as OUT/results.tgz (a device call returns at most 8 files).
set -uo pipefail
RETURN=${OUT:?set OUT to a results folder}
mkdir -p "$RETURN"
OUT=/tmp/results  # kept across the calls of one session; only OUT/results.tgz is returned (a call returns 8 files)
mkdir -p /tmp/parts /tmp/g "$OUT"
mv .mc/p/* /tmp/parts/ 2>/dev/null
[ -e awq_edge/export ] || ln -sfn ../export awq_edge/export  # the source tree layout pip install maps
[ -e awq_edge/device_profiles ] || ln -sfn ../devices awq_edge/device_profiles
export PYTHONPATH=$PWD:/tmp/site AWQ_EDGE_CACHE=/tmp/cache AWQ_EDGE_WIKITEXT=$PWD/.mc/wt
export AWQ_EDGE_KERNELS_LIB=/tmp/awqe/libawq_edge_kernels.so OMP_NUM_THREADS=2 TOKENIZERS_PARALLELISM=false
WT=$PWD/.mc/wt
# Every linear of bench/decode.py's family shapes, N x K (qkv, o, gate/up, down): Qwen2.5-7B, Qwen3-8B, Phi-3-mini,
# Llama-3.2-1B, Gemma-3-4B, Gemma-2-9B, Gemma-3-270M
FAMILY_GEMVS=4608x3584,3584x3584,37888x3584,3584x18944,6144x4096,4096x4096,24576x4096,4096x12288,9216x3072,\
3072x3072,16384x3072,3072x8192,3072x2048,2048x2048,16384x2048,2048x8192,4096x2560,2560x2048,20480x2560,2560x10240,\
8192x3584,3584x4096,28672x3584,3584x14336,1536x640,640x1024,4096x640,640x2048

# convert NAME GGUF_NAME [TOKENIZER_DIR]: join /tmp/parts/NAME.* and write $AWQ_EDGE_CACHE/NAME-f16. The device's
# transformers 5.17 rebuilds Gemma-3's GGUF tokenizer wrongly (check_converted_tokenizer refuses it), so Gemma's
# travels as the folder a 5.24 conversion wrote (.mc/gtok, tokenizer.json gzipped).
convert() {
  [ -f "$AWQ_EDGE_CACHE/$1-f16/config.json" ] && return 0
  local tok=None
  if [ -n "${3:-}" ]; then
    mkdir -p /tmp/tok-$1 && cp "$3"/tokenizer_config.json /tmp/tok-$1/ && gunzip -c "$3"/tokenizer.json.gz > /tmp/tok-$1/tokenizer.json
    tok="AutoTokenizer.from_pretrained('/tmp/tok-$1')"
  fi
  cat /tmp/parts/"$1".* > "/tmp/g/$2" && python -c "
from pathlib import Path; from transformers import AutoTokenizer
from awq_edge.quantizer.source import convert_gguf as c, cache_root
c(Path('/tmp/g'), '$2', cache_root() / '$1-f16', tokenizer=$tok)" 2>&1 | grep -v Warn | tail -3
}

# family_shapes TAG LABEL KERNEL_LABEL GEMVS [VARIANTS]: bench/decode.py on every family's shape (VARIANTS, default
# ours and torch int4; the breakdown) into decode_TAG.json, then bench/kernels.py on GEMVS into kernels_TAG.json,
# alone on the GPU
family_shapes() {
  python -P bench/decode.py --models llama2-7b,llama3-8b,llama3.2-1b,qwen2.5-7b,qwen3-8b,phi3-mini,gemma3-4b,gemma2-9b \
    --variants "${5:-ours,torch_int4}" --breakdown --out "$OUT/decode_$1.json" --label "$2" > "$OUT/decode_$1.log" 2>&1
  grep -E "^[a-z0-9.-]+ (ours|torch_int4|hf[a-z0-9_]*) " "$OUT/decode_$1.log" | cut -c1-90
  python -P bench/kernels.py --label "$3" --out "$OUT/kernels_$1.json" --shapes "$4" > "$OUT/kernels_$1.log" 2>&1
  grep -A60 "N x K" "$OUT/kernels_$1.log" | grep -E "^ *[0-9]+x[0-9]+ +1 "
}

# unbundle: /tmp/parts/bundle.* (one call's part each) joined: a tar of the onnxruntime-genai-cuda wheel, the
# onnxruntime-gpu wheel's files as ortgpu.tar.xz (xz: a fifth smaller than the wheel's zip) and, last, SmolLM2's GGUF
# as smollm2-135m.gguf.xz (onnxgpu_shapes needs no GGUF, so the last part can stay behind); both wheels go to
# /tmp/site (ahead of the image's CPU onnxruntime on PYTHONPATH). Made with
#   tar -cf bundle.tar -C DIR onnxruntime_genai_cuda-0.18.0-cp312-cp312-manylinux_2_28_x86_64.whl ortgpu.tar.xz \
#     smollm2-135m.gguf.xz  then  head -c 57500000 (the first call also carries .mc and .whl) and split -b 63500000
#   (later calls carry only .mc/p)
unbundle() {
  local n; n=$(ls /tmp/parts/bundle.* 2>/dev/null | wc -l)
  [ "$n" = "$(cat /tmp/bundle/.parts 2>/dev/null)" ] && return 0  # no part came since the last complete unpacking
  mkdir -p /tmp/bundle && cat /tmp/parts/bundle.* | tar -x -C /tmp/bundle 2>/dev/null  # without the last part: no
  if [ ! -f /tmp/site/.ortgpu-ok ]; then                                                 # GGUF, the wheels whole
    rm -rf /tmp/ortgpu && mkdir -p /tmp/ortgpu &&
      python -c "import tarfile; tarfile.open('/tmp/bundle/ortgpu.tar.xz').extractall('/tmp/ortgpu', filter='data')" 2>/dev/null ||
      { echo "the onnxruntime-gpu wheel is not whole yet ($n parts)"; return 1; }
    mkdir -p /tmp/site && rm -rf /tmp/site/onnxruntime /tmp/site/onnxruntime_gpu-*.dist-info &&  # /tmp/ortgpu
      cp -r /tmp/ortgpu/. /tmp/site/ && touch /tmp/site/.ortgpu-ok || return 1  # stays as the wheel had it: gpuinstall
  fi
  [ -d /tmp/site/onnxruntime_genai ] ||
    pip install -q --no-index --no-deps --upgrade --target /tmp/site /tmp/bundle/onnxruntime_genai_cuda-*.whl 2>&1 |
      grep -v WARN
  [ -d /tmp/site/onnxruntime_genai ] || { echo "onnxruntime-genai-cuda did not install"; return 1; }
  python -c "import lzma, shutil; shutil.copyfileobj(lzma.open('/tmp/bundle/smollm2-135m.gguf.xz'), open('/tmp/parts/smollm2-135m.00', 'wb'))" 2>/dev/null ||
    { rm -f /tmp/parts/smollm2-135m.00; echo "no SmolLM2 in the bundle yet (its last part has not come)"; }
  echo "$n" > /tmp/bundle/.parts
}

# gpu_tests: the GPU tests (kernels, CUDA runtime, the quantiser's CLI, GPTQ's Triton loop, the decode benchmark's
# variants, the CLI's bad input on a GPU machine, the layout, quality.py and layer_costs.py on the GPU) into
# $OUT/tests.txt
gpu_tests() {
  python -m pytest -q -ra tests/test_kernels.py tests/test_runtime_cuda.py tests/test_quantize_pipeline.py \
    tests/test_quantize.py tests/test_api.py tests/test_gptq.py tests/test_bench_decode.py tests/test_bad_input.py \
    tests/test_layout.py tests/test_runtime_ort_cuda.py tests/test_bench_onnx_gpu.py tests/test_bench_kernels.py \
    tests/test_runtime.py tests/test_bench_quality.py tests/test_bench_scripts.py -k "not whole_readme" \
    > "$OUT/tests.txt" 2>&1
}

# rows MODEL TAG ROWS [quality.py options...]: one quality.py process in the background
rows() {
  local model=$1 tag=$2 r=$3
  shift 3
  python -P bench/quality.py --model "$model" --device cuda --wikitext "$WT" --rows "$r" "$@" \
    --out "$OUT/quality_$tag" > "$OUT/quality_$tag.log" 2>&1 &
  PIDS+=($!)
}

# quality MODEL TAG: the matrix, one process per variant, side by side on the GPU, then one merged table
quality() {
  local model=$1 tag=$2 pids=() files=()
  local rows=("rtn:4:64,rtn:4:128,gptq:4:64:mixed:128:damp0.01,gptq:4:128:mixed:128:damp0.01")
  for v in noduo+noseq duo+noseq noduo+seq duo+seq; do
    rows+=("awq:4:64:mixed:128:$v,awq:4:128:mixed:128:$v,awq:4:64:mixed:16:$v,awq:4:128:mixed:16:$v")
  done
  for k in "${!rows[@]}"; do
    python -P bench/quality.py --model "$model" --device cuda --wikitext "$WT" --rows "${rows[$k]}" \
      --out "$OUT/quality_${tag}_$k" > "$OUT/quality_${tag}_$k.log" 2>&1 &
    pids+=($!) files+=("$OUT/quality_${tag}_$k.json")
  done
  for p in "${pids[@]}"; do wait "$p"; done
  python -P bench/quality.py --merge "${files[@]}" --out "$OUT/quality_$tag" > /dev/null && head -30 "$OUT/quality_$tag.md"
}

for step in "$@"; do
  echo "== $step $(date +%T)"
  case $step in
    setup)
      pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>&1 | tail -2
      cmake -S plugins -B /tmp/awqe -DCMAKE_CUDA_ARCHITECTURES=90-real > /dev/null &&
        cmake --build /tmp/awqe -j 16 2>&1 | grep -iE "error" ; ls -la "$AWQ_EDGE_KERNELS_LIB" ;;
    tests)
      gpu_tests
      tail -15 "$OUT/tests.txt" ;;
    scale8b)
      python -P bench/quantize_scale.py --models llama3-8b --tokenizer .mc/tok --work /tmp/scale \
        --out "$OUT/quantize_scale_8b.json" 2>&1 | grep -v Warn | tail -12 ;;
    smollm2)
      convert smollm2-135m SmolLM2-135M-Instruct.Q4_1.gguf
      python -P bench/quantize_scale.py --models "" --smollm2 "$AWQ_EDGE_CACHE/smollm2-135m-f16" --wikitext "$WT" \
        --tokenizer .mc/tok --work /tmp/scale --out "$OUT/quantize_scale_smollm2.json" > "$OUT/scale_smollm2.log" 2>&1 &
      cli=$!
      python -P bench/quality.py --model smollm2-135m --device cuda --wikitext "$WT" --grid-noise 0.25 \
        --rows "rtn:4:64,rtn:4:128,awq:4:64:mixed:128:noduo+noseq,awq:4:128:mixed:128:noduo+noseq,gptq:4:64:mixed:128:damp0.01,gptq:4:128:mixed:128:damp0.01,awq:4:128:mixed:128:duo+seq" \
        --out "$OUT/quality_smollm2_noise" > "$OUT/quality_smollm2_noise.log" 2>&1 &
      noise=$!
      quality smollm2-135m smollm2
      wait $cli; tail -3 "$OUT/scale_smollm2.log"
      wait $noise; head -14 "$OUT/quality_smollm2_noise.md" ;;
    gemma3)
      convert gemma3-270m gemma-3-270m-q4_k_m.gguf .mc/gtok
      python -m pytest -q -ra tests/test_export_gemma3.py tests/test_export_tokenizer.py -k "cuda or gemma" \
        > "$OUT/tests_gemma3.txt" 2>&1 &
      t=$!
      quality gemma3-270m gemma3
      wait $t; tail -5 "$OUT/tests_gemma3.txt" ;;
    final)
      convert smollm2-135m SmolLM2-135M-Instruct.Q4_1.gguf
      convert gemma3-270m gemma-3-270m-q4_k_m.gguf .mc/gtok
      PIDS=()
      rows smollm2-135m smollm2_gptq "gptq:4:64:mixed:128:damp0.1,gptq:4:128:mixed:128:damp0.1"
      rows smollm2-135m smollm2_awqgptq "awq-gptq:4:64:mixed:128:damp0.1,awq-gptq:4:128:mixed:128:damp0.1"
      rows smollm2-135m smollm2_domain "gptq:4:128:wikitext2-valid:128:damp0.01,awq:4:128:wikitext2-valid:128"
      rows gemma3-270m gemma3_0 "rtn:4:64,rtn:4:128,gptq:4:64:mixed:128:damp0.01,gptq:4:128:mixed:128:damp0.01"
      rows gemma3-270m gemma3_1 "awq:4:64:mixed:128,awq:4:64:mixed:16"
      rows gemma3-270m gemma3_2 "awq:4:128:mixed:128,awq:4:128:mixed:16"
      rows gemma3-270m gemma3_3 "gptq:4:64:mixed:128:damp0.1,gptq:4:128:mixed:128:damp0.1"
      rows gemma3-270m gemma3_4 "awq:4:64:mixed:128:duo+seq,awq:4:128:mixed:128:duo+seq"
      rows gemma3-270m gemma3_noise "rtn:4:64,rtn:4:128,awq:4:64:mixed:128,awq:4:128:mixed:128" --grid-noise 0.25
      FLOAT=$AWQ_EDGE_CACHE/gemma3-270m-f16 WORK=/tmp/awqe-gemma3 WT=$WT OUT=$OUT/gemma3_e2e \
        DECODE_ARGS="--new 128 --repeats 3" bash bench/device_gemma.sh > "$OUT/gemma3_e2e.log" 2>&1 &
      PIDS+=($!)
      python -m pytest -q -ra tests/test_export_gemma3.py -k cuda > "$OUT/tests_gemma3.txt" 2>&1 &
      PIDS+=($!)
      for p in "${PIDS[@]}"; do wait "$p"; done
      python -P bench/quality.py --merge "$OUT"/quality_gemma3_[0-4].json --out "$OUT/quality_gemma3" > /dev/null
      for f in "$OUT"/quality_*.md; do echo "-- $f"; sed -n '5,20p' "$f" | grep '^|'; done
      tail -3 "$OUT/tests_gemma3.txt"; tail -12 "$OUT/gemma3_e2e.log" ;;
    probe)
      for m in awq awq-gptq; do
        python -P bench/quantize_scale.py --models llama3-8b --layers 4 --tokenizer .mc/tok --work /tmp/probe \
          --quantize-args "--method $m" --out "$OUT/probe_$m.json" > /dev/null 2>&1
        grep -h "layer loop\|summary" /tmp/probe/*.log
      done
      python -m pytest -q tests/test_gptq.py > "$OUT/tests_gptq.txt" 2>&1; tail -2 "$OUT/tests_gptq.txt" ;;
    defaults)
      convert smollm2-135m SmolLM2-135M-Instruct.Q4_1.gguf
      convert gemma3-270m gemma-3-270m-q4_k_m.gguf .mc/gtok
      PIDS=()
      python -P bench/quantize_scale.py --models "" --smollm2 "$AWQ_EDGE_CACHE/smollm2-135m-f16" --wikitext "$WT" \
        --tokenizer .mc/tok --work /tmp/scale --out "$OUT/quantize_scale_smollm2.json" > "$OUT/scale_smollm2.log" 2>&1 &
      PIDS+=($!)
      for m in smollm2-135m gemma3-270m; do
        t=${m%%-*}
        rows "$m" ${t}_0 "rtn:4:64,rtn:4:128"
        for g in 64 128; do
          rows "$m" ${t}_awq$g "awq:4:$g:mixed:128,awq:4:$g:mixed:16"
          rows "$m" ${t}_awqgptq$g "awq-gptq:4:$g:mixed:128,awq-gptq:4:$g:mixed:16"
          rows "$m" ${t}_gptq$g "gptq:4:$g:mixed:128,gptq:4:$g:mixed:16"
        done
      done
      gpu_tests &
      PIDS+=($!)
      for p in "${PIDS[@]}"; do wait "$p"; done
      for t in smollm2 gemma3; do
        python -P bench/quality.py --merge "$OUT"/quality_${t}_{0,awq64,awq128,awqgptq64,awqgptq128,gptq64,gptq128}.json \
          --out "$OUT/quality_defaults_$t" > /dev/null
        sed -n '5,30p' "$OUT/quality_defaults_$t.md" | grep '^|'
      done
      tail -3 "$OUT/scale_smollm2.log"; tail -8 "$OUT/tests.txt" ;;
    orttests|onnxgpu)
      unbundle || exit 1
      python -c "import onnxruntime as o; o.preload_dlls(); print(o.__version__, o.get_available_providers())"
      convert smollm2-135m SmolLM2-135M-Instruct.Q4_1.gguf
      python -m pytest -q -ra tests/test_runtime_ort_cuda.py tests/test_bench_onnx_gpu.py > "$OUT/tests_ort_cuda.txt" 2>&1
      tail -12 "$OUT/tests_ort_cuda.txt"
      [ "$step" = orttests ] && continue
      [ -f /tmp/ck_smollm2/config.json ] || python -m awq_edge.cli quantize smollm2-135m -o /tmp/ck_smollm2 \
        > "$OUT/quantize_smollm2.log" 2>&1; tail -c 300 "$OUT/quantize_smollm2.log"
      python -P bench/onnx_gpu.py --quant-dir /tmp/ck_smollm2 --hf-dir "$AWQ_EDGE_CACHE/smollm2-135m-f16" \
        --rows ${ONNX_ROWS:-ours_default,ours_float_act,ours_float_logits,ours_head4,peer,cuda_backend,genai_graph,ab} --work /tmp/og --wikitext "$WT" \
        --out "$OUT/onnx_gpu_smollm2" > "$OUT/onnx_gpu_smollm2.log" 2>&1
      tail -24 "$OUT/onnx_gpu_smollm2.log"
      python -P bench/ort_host_costs.py --folder /tmp/og/ours_default --provider cuda --out "$OUT/ort_host_costs_cuda" \
        > "$OUT/ort_host_costs_cuda.log" 2>&1; tail -12 "$OUT/ort_host_costs_cuda.log" ;;
    onnxgpu_shapes)
      unbundle || exit 1
      # Llama-3-8B took 12 minutes on an H100 (2026-12-07: the random fp16 model, three RTN quantisations, exports
      # of 136-157 s each, the builder's 84 s, then 2 rounds of 8 rows); plan 10-12 minutes a shape
      # (the layer-format rows ours_sym and ours_sym32 ran at 8B on 2026-12-07; with them and cuda_backend beside
      # these, 13 sessions at 8B would not fit an 80 GB GPU)
      rows=${ONNX_SHAPE_ROWS:-ours_default,ours_head4,peer,genai_graph}
      for m in ${ONNX_SHAPES:-llama2-7b llama3-8b}; do
        python -P bench/onnx_gpu.py --shape $m --rows $rows \
          --repeats ${ONNX_REPEATS:-2} \
          --work /tmp/og_$m \
          --out "$OUT/onnx_gpu_$m" > "$OUT/onnx_gpu_$m.log" 2>&1; tail -12 "$OUT/onnx_gpu_$m.log"
        rm -rf /tmp/og_$m
      done ;;
    gpuinstall)
      # docs/onnxruntime-gpu.md's install as written, into the image's Python (a venv over it sees none of its
      # packages), so run it last: it replaces the image's CPU onnxruntime. No network here:
      # pip reads the onnxruntime-gpu wheel, re-zipped from the bundle's files, and setuptools from a folder), then
      # the installed `awq-edge export --dtype fp16` of SmolLM2's checkpoint (onnxgpu's, else quantised here at the
      # CLI's defaults from the bundle's GGUF, without onnxgpu's benchmark), `generate --provider cuda` and
      # awq_edge.load on it
      [ "$step" = "${*: -1}" ] || { echo "gpuinstall replaces the image's onnxruntime: make it the last step"; exit 2; }
      unbundle || exit 1
      if [ ! -f /tmp/ck_smollm2/config.json ]; then
        [ -f /tmp/parts/smollm2-135m.00 ] || [ -f "$AWQ_EDGE_CACHE/smollm2-135m-f16/config.json" ] ||
          { echo "no SmolLM2: carry the bundle's last part (its GGUF), or run the onnxgpu step first"; exit 1; }
        convert smollm2-135m SmolLM2-135M-Instruct.Q4_1.gguf
        python -m awq_edge.cli quantize smollm2-135m -o /tmp/ck_smollm2 > "$OUT/quantize_smollm2.log" 2>&1 ||
          { echo "quantize failed"; tail -3 "$OUT/quantize_smollm2.log"; exit 1; }
      fi
      rm -rf /tmp/wh && mkdir -p /tmp/wh && cp .whl/build/*.whl .whl/*.whl /tmp/wh/
      [ -d /tmp/ortgpu/onnxruntime ] ||
        { echo "no /tmp/ortgpu (unbundle's copy of the wheel's files): rm /tmp/site/.ortgpu-ok and rerun"; exit 1; }
      (cd /tmp/ortgpu && python -m zipfile -c /tmp/wh/onnxruntime_gpu-1.31.1-cp312-cp312-manylinux_2_28_x86_64.whl *)
      (unset PYTHONPATH; export PIP_NO_INDEX=1 PIP_FIND_LINKS=/tmp/wh PIP_ROOT_USER_ACTION=ignore PATH="$(python -c 'import sysconfig; print(sysconfig.get_path("scripts"))'):$PATH"
       set -ex
       python -m pip install -q -e '.[gpu]' 2>&1 | tail -3
       python -m pip uninstall -y onnxruntime 2>&1 | tail -2 && python -m pip install -q --force-reinstall --no-deps onnxruntime-gpu 2>&1 | tail -2
       python -c "import onnxruntime as o, awq_edge; print(o.__file__, o.__version__, o.get_available_providers(), awq_edge.__file__)"
       awq-edge export /tmp/ck_smollm2 -o /tmp/gx --dtype fp16 2>&1 | tail -4
       awq-edge generate /tmp/gx --provider cuda --prompt "The capital of France is" --max-new-tokens 16
       python -c "import awq_edge; m = awq_edge.load('/tmp/gx', provider='cuda'); print(type(m).__name__, repr(m.generate('Water boils at', max_new_tokens=12)))"
      ) > "$OUT/gpu_install.txt" 2>&1
      rc=$?
      cut -c1-200 "$OUT/gpu_install.txt" | tail -25
      [ $rc = 0 ] || { echo "gpuinstall failed ($rc)"; exit 1; } ;;
    families)
      convert gemma3-270m gemma-3-270m-q4_k_m.gguf .mc/gtok
      gpu_tests &
      t=$!
      F=$AWQ_EDGE_CACHE/gemma3-270m-f16 C=/tmp/awqe-gemma3-awq
      [ -f "$C/config.json" ] || python -m awq_edge.cli quantize "$F" -o "$C" > "$OUT/gemma3_quantize.txt" 2>&1
      for m in "$C" "$F"; do
        python -m awq_edge.cli eval "$m" --text "$WT/test.txt" --json > "$OUT/gemma3_eval_$(basename "$m").txt" 2>&1
      done
      wait $t
      tail -5 "$OUT/tests.txt"
      python -P bench/decode.py --models llama2-7b,llama3-8b,llama3.2-1b,qwen2.5-7b,qwen3-8b,phi3-mini,gemma3-4b,gemma2-9b \
        --real "gemma3-270m=$C,$F" --variants ours,torch_int4,hf --breakdown --out "$OUT/decode_families.json" \
        --label "issue 22: every family's step on the kernels" > "$OUT/decode_families.log" 2>&1
      tail -40 "$OUT/decode_families.log"
      python -P bench/kernels.py --label families --out "$OUT/kernels_families.json" > "$OUT/kernels_families.log" 2>&1
      tail -12 "$OUT/kernels_families.log" ;;
    shapes)
      family_shapes shapes "issue 22: every family's shape (random weights) after r9" r9-family-shapes "$FAMILY_GEMVS" ;;
    h200)
      # issue 22's must-show files, with the Llama shapes in the kernels too and transformers fp16 beside ours (its
      # 10x target); the files name the GPU (an H100 only if no H200 came)
      family_shapes h200 "issue 22: every family's shape (random weights), r10 not merged" h200 \
        "4096x4096,11008x4096,4096x11008,14336x4096,4096x14336,28672x4096,$FAMILY_GEMVS" ours,torch_int4,hf ;;
    h200hf)
      # issue 22's 10x over transformers fp16, side by side with ours in one run, at the two Llama shapes
      python -P bench/decode.py --models llama2-7b,llama3-8b --variants ours,hf --out "$OUT/decode_h200_hf.json" \
        --label "issue 22: ours beside transformers fp16 (eager, static cache)" > "$OUT/decode_h200_hf.log" 2>&1
      grep -E "^[a-z0-9.-]+ (ours|hf[a-z0-9_]*) " "$OUT/decode_h200_hf.log" | cut -c1-110 ;;
    sampling)
      python -m pytest -q -ra tests/test_runtime_cuda.py tests/test_runtime.py tests/test_bench_decode.py \
        tests/test_bench_kernels.py > "$OUT/tests_sampling.txt" 2>&1
      tail -3 "$OUT/tests_sampling.txt"
      python -P bench/decode.py --models llama3-8b,qwen3-8b,llama3.2-1b,gemma3-270m --variants ours,ours_sampled \
        --out "$OUT/decode_sampling.json" --label "sampling on the GPU against host sampling" 2>&1 | grep -v Warn | tail -4
      python -P bench/kernels.py --label family-shapes --out "$OUT/kernels_family_shapes.json" --shapes "$FAMILY_GEMVS" \
        > "$OUT/kernels_family_shapes.log" 2>&1
      grep -A40 "N x K" "$OUT/kernels_family_shapes.log" | grep -E "^ *[0-9]+x[0-9]+ +1 " ;;
    status)
      for f in "$OUT"/*.log /tmp/bg.log; do [ -f "$f" ] && { echo "-- $f"; tail -c 400 "$f"; echo; }; done ;;
    *) echo "unknown step $step"; exit 2 ;;
  esac
done
tar czf "$RETURN/results.tgz" -C "$OUT" .
echo "== done $(date +%T)"
