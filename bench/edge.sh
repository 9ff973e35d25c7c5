#!/usr/bin/env bash
# Issue 11's measurements in one sitting, then the plots: bench/expert (formats x precisions,
# weights cached and streamed from memory, read bandwidth), peak RSS of `hypermoe run` per format
# on a 138 MB bf16 one-block Mixtral-like checkpoint, and the PyTorch GLU expert if python3-torch
# is installed. Not part of the build, the tests or CI.
# Usage: bash bench/edge.sh [BUILD_DIR [NAME]]: the results in bench/results (bench/results/NAME),
# the plots docs/edge_time.svg and docs/edge_memory.svg (docs/edge_time_NAME.svg, ...). Name a
# sitting on another kind of CPU, so that each kind keeps its figures (e.g. avx2).
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:-build}
name=${2:-}
out=bench/results${name:+/$name}
mkdir -p "$out"
export OMP_NUM_THREADS=2
# The CPU, for the plots' titles: its model and the instruction sets the kernels choose among.
cpuinfo() { sed -n "s/^$1[[:space:]]*: //p" /proc/cpuinfo | head -1; } # the first CPU's field
model="$(cpuinfo 'model name'), family $(cpuinfo 'cpu family') model $(cpuinfo model)"
isa=$(cpuinfo flags | tr ' ' '\n' | grep -x -E 'avx2|avx512f|avx512_vnni|avx512_bf16|amx_int8|amx_bf16' | tr '\n' ' ')
printf '{"cpu": "%s", "flags": "%s", "threads": %s}\n' "$model" "${isa% }" "$OMP_NUM_THREADS" > "$out/machine.json"
"$build/bench/expert/expert_bench" --benchmark_min_time=0.3 \
  --benchmark_filter='BM_ReadBandwidth|BM_GluRotating|BM_GluExpert_onednn/d:1024|BM_RawMatmul_Glu/d:1024' \
  --benchmark_out="$out/expert.json" --benchmark_out_format=json
ck=$(mktemp -d)
trap 'rm -rf "$ck"' EXIT
"$build/bench/load/write_edge_checkpoint" "$ck"
echo "{" > "$out/rss.json"
first=1
for w in f32 bf16 q8_0 q4_0 mxfp4 q4_k; do
  for p in exact fast; do
    if [ "$p" = fast ] && [ "$w" = f32 ]; then continue; fi
    kb=$( { /usr/bin/time -f "%M" "$build/examples/hypermoe" run --model "$ck" --input "$ck/input.safetensors" \
            --output "$ck/y.safetensors" --weights "$w" --precision "$p" >/dev/null; } 2>&1 | tail -1)
    echo "run --weights $w --precision $p: peak RSS $kb KiB"
    [ $first = 1 ] || echo "," >> "$out/rss.json"
    first=0
    printf '"%s/%s": %s' "$w" "$p" "$kb" >> "$out/rss.json"
  done
done
for w in q8_0 q4_0; do # the same block from a GGUF file, its blocks used as stored
  kb=$( { /usr/bin/time -f "%M" "$build/examples/hypermoe" run --model "$ck/$w.gguf" --input "$ck/input.safetensors" \
          --output "$ck/y.safetensors" >/dev/null; } 2>&1 | tail -1)
  echo "run --model $w.gguf: peak RSS $kb KiB"
  printf ',\n"gguf %s/exact": %s' "$w" "$kb" >> "$out/rss.json"
done
echo "}" >> "$out/rss.json"
# Debian's PyTorch multiplies f32 through the libblas.so.3 chosen by update-alternatives: with the
# reference BLAS its f32 expert was 4-22x slower than with OpenBLAS (T = 1 to 64, Zen 3) (apt install libopenblas0-pthread).
export OPENBLAS_NUM_THREADS=$OMP_NUM_THREADS
if /usr/bin/python3 -c "import torch" 2>/dev/null; then
  /usr/bin/python3 bench/peers/pytorch_moe.py --expert "$out/peers.json"
fi
/usr/bin/python3 bench/plot_edge.py "$out" docs $name
