#!/usr/bin/env bash
# Run the benchmarks of docs/performance.md; each prints a table and writes JSON to bench-results/.
#   ./scripts/bench.sh                       # solver, export, eval, memory, cpu (about an hour on 2 CPU cores)
#   ./scripts/bench.sh solver eval           # just those; also gptq, stream, and speed (SPEED_ARTIFACTS="a.gguf b.gguf")
# The solver bench runs at full Llama-3.1-8B shapes when CUDA is present, at 1/8 scale on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
python=.venv/bin/python
results=bench-results
mkdir -p "$results"
benches=("$@")
[ ${#benches[@]} -eq 0 ] && benches=(solver export eval memory cpu)
for bench in "${benches[@]}"; do
    case "$bench" in
        solver) "$python" bench/bench_solver.py --json "$results/solver.json" ;;
        export) "$python" bench/bench_export.py --json "$results/export.json" ;;
        # A short calibration: it only shapes the importance matrix, not the speed being measured.
        eval) "$python" bench/bench_eval_throughput.py --export-args "--calib-samples 8 --seq-len 512" \
            --json "$results/eval_throughput.json" ;;
        memory) "$python" bench/bench_prune_memory.py --json "$results/prune_memory.json" ;;
        # A whole streamed export of random bf16 Llamas of 3 and 18 layers: peak host memory against depth.
        stream) "$python" bench/bench_stream_memory.py --json "$results/stream_memory.json"
            "$python" bench/bench_stream_prune.py --device cpu --small --layers 4 --samples 16 --seq-len 512 \
                --json "$results/stream_prune_cpu.json" ;;
        cpu) "$python" bench/bench_cpu_buffers.py --json "$results/cpu_buffers.json" ;;
        # srcr's GPTQ vs llama.cpp on a briefly trained (never quantized) Llama, and the joint pass's cost.
        gptq) "$python" bench/bench_gptq.py --json "$results/gptq_quality.json"
            "$python" bench/bench_gptq.py --cost --json "$results/gptq_cost.json" ;;
        # Runtime speed of artifacts against the first: pass the files, e.g. SPEED_ARTIFACTS="dense.gguf pruned.gguf".
        speed) # shellcheck disable=SC2086
            "$python" bench/bench_runtime_speed.py ${SPEED_ARTIFACTS:?set SPEED_ARTIFACTS to the files to time} \
            --json "$results/runtime_speed.json" ;;
        *) echo "unknown bench '$bench': choose from solver export eval memory cpu gptq stream speed" >&2; exit 2 ;;
    esac
done
