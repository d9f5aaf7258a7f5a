#!/usr/bin/env bash
# Gemma-3-270M end to end on the GPU machine, in one device call: its GGUF converted to a float safetensors folder
# (awq_edge.quantizer.source.convert_gguf, as `awq-edge quantize gemma3-270m` does once), quantised by the CLI at its
# defaults on the GPU, the checkpoint's (and the float model's) WikiText-2 test perplexity, then bench/decode.py:
# greedy parity of the CUDA backend against transformers (bf16 and fp32) and decode speed against transformers
# eager fp16 and bf16. Each step's output goes to $OUT/<step>.txt; a failing step does not stop the later ones.
# Usage on the GPU machine, from the repository root (a few minutes on an H200):
#   OUT=dir GGUF=/path/gemma-3-270m-q4_k_m.gguf WT=/path/wikitext-2 \
#     AWQ_EDGE_KERNELS_LIB=/path/libawq_edge_kernels.so bash bench/device_gemma.sh
# Optional: WORK (scratch folder, default /tmp/awqe-gemma3), FLOAT and CKPT (the float and quantised folders,
# default $WORK/gemma3-270m-f16 and -awq; a FLOAT already converted is kept, and GGUF is then not needed),
# DECODE_ARGS (default: --new 128 --repeats 3),
# STEP_TIMEOUT (seconds per step, default 300); for a dry run on a CPU: DEVICE=cpu QUANT_ARGS="--method rtn"
# EVAL_ARGS="--max-tokens 8192" (decode.py then stops at once: it needs a GPU).
set -uo pipefail
OUT=${OUT:?set OUT to a results folder}
GGUF=${GGUF:-}
WT=${WT:?set WT to the folder holding WikiText-2 test.txt}
export AWQ_EDGE_KERNELS_LIB=${AWQ_EDGE_KERNELS_LIB:?set AWQ_EDGE_KERNELS_LIB to the built kernel library}
WORK=${WORK:-/tmp/awqe-gemma3}
FLOAT=${FLOAT:-$WORK/gemma3-270m-f16}
CKPT=${CKPT:-$WORK/gemma3-270m-awq}
[ -f "$FLOAT/config.json" ] || [ -n "$GGUF" ] || { echo "set GGUF to the Gemma-3-270M .gguf file"; exit 2; }
mkdir -p "$OUT" "$WORK"
[ -e awq_edge/export ] || ln -sfn ../export awq_edge/export  # the source tree layout pip install maps
[ -e awq_edge/device_profiles ] || ln -sfn ../devices awq_edge/device_profiles
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # keep what is already there (the gguf package)
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
FAILED=""

step() {  # step NAME COMMAND...: run it, its stdout and stderr to the screen and $OUT/NAME.txt
  local name=$1 t=$SECONDS rc
  shift
  echo "== $name: $*" | tee "$OUT/$name.txt"
  timeout "${STEP_TIMEOUT:-300}" "$@" 2>&1 | tee -a "$OUT/$name.txt"
  rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc after $((SECONDS - t)) s" | tee -a "$OUT/$name.txt"
  [ "$rc" = 0 ] || FAILED="$FAILED $name"
  return "$rc"
}

step env bash -c 'nvidia-smi -L; python -c "import sys, torch, transformers, gguf; print(sys.version.split()[0],
  torch.__version__, torch.version.cuda, transformers.__version__, gguf.__file__)"; ls -l "$@"' env "$WT" ${GGUF:+"$GGUF"}

# The converter writes a temporary folder beside FLOAT and renames it into place: FLOAT is whole or absent.
if [ -f "$FLOAT/config.json" ]; then
  echo "== convert: $FLOAT exists, kept" | tee "$OUT/convert.txt"
else
  step convert python -P -c 'import sys
from pathlib import Path
from awq_edge.quantizer.source import convert_gguf
gguf = Path(sys.argv[1]).resolve()
convert_gguf(gguf.parent, gguf.name, Path(sys.argv[2]))
print("wrote", sys.argv[2])' "$GGUF" "$FLOAT"
fi

DEVICE=${DEVICE:-cuda}
# shellcheck disable=SC2086  # QUANT_ARGS, EVAL_ARGS and DECODE_ARGS are lists of options
step quantize python -m awq_edge.cli quantize "$FLOAT" -o "$CKPT" --device "$DEVICE" ${QUANT_ARGS:-}
# shellcheck disable=SC2086
step eval_awq python -m awq_edge.cli eval "$CKPT" --text "$WT/test.txt" --device "$DEVICE" --json ${EVAL_ARGS:-}
# shellcheck disable=SC2086
step eval_float python -m awq_edge.cli eval "$FLOAT" --text "$WT/test.txt" --device "$DEVICE" --json ${EVAL_ARGS:-}
# shellcheck disable=SC2086
step decode python -P bench/decode.py --models gemma3-270m --real "gemma3-270m=$CKPT,$FLOAT" --variants ours,hf \
  ${DECODE_ARGS:---new 128 --repeats 3} --out "$OUT/decode_gemma3.json" \
  --label "Gemma-3-270M, CLI-default AWQ checkpoint"

echo "failed steps:${FAILED:- none}" | tee "$OUT/summary.txt"
[ -z "$FAILED" ]
