#!/usr/bin/env bash
# One device call for the decode work (bench/NOTES.md): build the kernel library once per variant, run the GPU
# tests on the default build, then bench/decode.py with each library, one after the other in the same call.
# Usage on the GPU machine, from the repository root:
#   OUT=dir [BUILDS="default= register=-DAWQE_REGISTER_STREAM"] bash bench/device_decode.sh
# (a build of several flags separates them with commas: "mb3b24=-DAWQE_MIN_BLOCKS=3,-DAWQE_WARP_BUDGET=24")
# KERNEL_SHAPES="4096x4096,22016x4096": also bench/kernels.py on those shapes with each library (kernels_NAME.json),
# before the decode runs; MODELS="" runs no decode (the r12 probe builds give wrong results, so only their times).
# BUILD_ROOT (default /tmp): where each build's folder awqe-NAME goes.
# TEST_BUILDS="bulk": also the kernel and CUDA runtime tests (tests/test_kernels.py, tests/test_runtime_cuda.py) and
# bench/kernels.py's tests on one shape with each named build's library (tests_NAME.txt).
# PLACEMENT=1: also a -DAWQE_PROBE_PLACEMENT build (awqe-probe) and bench/placement.py with it (placement.json; its
# options in PLACEMENT_ARGS), after the kernel shapes and before the decode runs. PROBES="spread=-DAWQE_SPREAD": also
# the probe with each named build's flags (awqe-probe-NAME, placement-NAME.json), with or without PLACEMENT=1.
set -uo pipefail
OUT=${OUT:?set OUT to a results folder}
ARCH=${ARCH:-90-real}
BUILD_ROOT=${BUILD_ROOT:-/tmp}
BUILDS=${BUILDS:-"default= register=-DAWQE_REGISTER_STREAM"}
MODELS=${MODELS-llama2-7b,llama3-8b}
for b in $BUILDS ${PROBES:-}; do  # each NAME=FLAGS (FLAGS may be empty), NAME a plain word: it names a folder and files
  [[ $b =~ ^[A-Za-z0-9_]+= ]] ||
    { echo "BUILDS/PROBES entry '$b' is not NAME=FLAGS (e.g. spread=-DAWQE_SPREAD, default=): fix the entry"; exit 2; }
done
for name in ${TEST_BUILDS:-}; do
  [[ " $BUILDS " == *" $name="* ]] || { echo "TEST_BUILDS names '$name', which BUILDS does not build: add it there"; exit 2; }
done
[ -e awq_edge/export ] || ln -sfn ../export awq_edge/export  # the source tree layout pip install maps
[ -e awq_edge/device_profiles ] || ln -sfn ../devices awq_edge/device_profiles
export PYTHONPATH=$PWD
ALL=$BUILDS
PROBE_BUILDS=""  # name=flags of each probe build: awqe-NAME, placement results under its name
[ "${PLACEMENT:-0}" = 1 ] && PROBE_BUILDS="probe=-DAWQE_PROBE_PLACEMENT"
for b in ${PROBES:-}; do PROBE_BUILDS="$PROBE_BUILDS probe-${b%%=*}=-DAWQE_PROBE_PLACEMENT,${b#*=}"; done
ALL="$ALL $PROBE_BUILDS"
for b in $ALL; do
  name=${b%%=*} flags=${b#*=} flags=${flags//,/ }
  rm -f "$BUILD_ROOT/awqe-$name/libawq_edge_kernels.so"  # a library left by an earlier build is not this one
  ( cmake -S plugins -B "$BUILD_ROOT/awqe-$name" -DCMAKE_CUDA_ARCHITECTURES=$ARCH "-DCMAKE_CUDA_FLAGS=$flags" \
      >/dev/null && cmake --build "$BUILD_ROOT/awqe-$name" -j 8 2>&1 | grep -iE "error|spill" ) &
done
wait
for b in $ALL; do
  [ -f "$BUILD_ROOT/awqe-${b%%=*}/libawq_edge_kernels.so" ] || { echo "build ${b%%=*} failed"; exit 1; }
done
export AWQ_EDGE_KERNELS_LIB=$BUILD_ROOT/awqe-default/libawq_edge_kernels.so
if [ "${TESTS:-1}" = 1 ]; then
  python -m pytest -q -x tests/test_kernels.py tests/test_runtime_cuda.py > "$OUT/tests.txt" 2>&1
  status=$?
  tail -4 "$OUT/tests.txt"
  [ $status = 0 ] || { echo "GPU tests failed: no benchmark"; exit 1; }
fi
for name in ${TEST_BUILDS:-}; do
  AWQ_EDGE_KERNELS_LIB=$BUILD_ROOT/awqe-$name/libawq_edge_kernels.so python -m pytest -q -x tests/test_kernels.py \
    tests/test_runtime_cuda.py tests/test_bench_kernels.py::test_the_benchmark_checks_and_times_a_shape_end_to_end \
    > "$OUT/tests_$name.txt" 2>&1 ||
    { echo "kernel or CUDA runtime tests failed with the $name build"; tail -4 "$OUT/tests_$name.txt"; exit 1; }
  echo "== kernel and CUDA runtime tests, $name build: $(tail -1 "$OUT/tests_$name.txt")"
done
if [ "${SANITIZE:-0}" = 1 ]; then
  timeout 240 /usr/local/cuda/bin/compute-sanitizer --tool memcheck --error-exitcode 9 python -m pytest -q -x \
    tests/test_kernels.py tests/test_runtime_cuda.py -k "float64 or warp_split or attention or folded" 2>&1 |
    tail -4 | tee "$OUT/memcheck.txt"
fi
if [ -n "${KERNEL_SHAPES:-}" ]; then
  for b in $BUILDS; do
    name=${b%%=*} flags=${b#*=} flags=${flags//,/ }
    AWQ_EDGE_KERNELS_LIB=$BUILD_ROOT/awqe-$name/libawq_edge_kernels.so python -P bench/kernels.py \
      --shapes "$KERNEL_SHAPES" --label "$name build: CMAKE_CUDA_FLAGS='$flags'" --out "$OUT/kernels_$name.json" \
      > "$OUT/kernels_$name.log" 2>&1 ||
      { echo "bench/kernels.py failed with the $name build"; tail -3 "$OUT/kernels_$name.log"; exit 1; }
    echo "== kernels, $name build"; grep -A80 "N x K" "$OUT/kernels_$name.log" | grep -E "^ *[0-9]+x[0-9]+ +1 "
  done
fi
for b in $PROBE_BUILDS; do
  name=${b%%=*} flags=${b#*=} flags=${flags//,/ }
  file=placement${name#probe}  # probe -> placement, probe-spread -> placement-spread
  AWQ_EDGE_KERNELS_LIB=$BUILD_ROOT/awqe-$name/libawq_edge_kernels.so python -P bench/placement.py ${PLACEMENT_ARGS:-} \
    --label "$name build: CMAKE_CUDA_FLAGS='$flags'" --out "$OUT/$file.json" \
    > "$OUT/$file.log" 2>&1 || { echo "bench/placement.py failed with the $name build"; tail -3 "$OUT/$file.log"; exit 1; }
  cat "$OUT/$file.log"
done
[ -n "$MODELS" ] || exit 0
for b in $BUILDS; do
  name=${b%%=*} flags=${b#*=} flags=${flags//,/ }
  AWQ_EDGE_KERNELS_LIB=$BUILD_ROOT/awqe-$name/libawq_edge_kernels.so python -P bench/decode.py --models "$MODELS" \
    --variants ${VARIANTS:-ours,ours_unfolded} ${BENCH_ARGS:---breakdown} --out "$OUT/decode_$name.json" \
    --label "$name build: CMAKE_CUDA_FLAGS='$flags'" 2>&1 | grep -v Warning | grep -v '^ ' | grep -v '^[{}]'
done
