#!/usr/bin/env bash
# One call on a GPU machine: install, then the named phases, each under a time limit; everything
# they write is packed into $OUT/results.tgz (one file: the device tool brings back only a few).
#
#   bash tools/device_run.sh COMMIT [PHASE ...]       (default: every phase, in this order)
#
# Phases:
#   tests    kernel_tests, then ep_tests
#   kernel_tests  forward_tests (the single-GPU kernels, bf16 Hugging Face checks), then backward_tests
#   training_8192  bench/training.py at 8192 tokens, Qwen3 and OLMoE, against Liger-Kernel (autotuned) and _grouped_mm
#   backward_rest  the backward tests after the size and tile sweeps, the CUDA-graph training step first
#   wgrad_tune     the weight-gradient configs only (bench/diagnostics/backward_gemms.py), every shape, --write-table
#   training_large bench/training.py at 4096 / 8192 / 16384 tokens, DeepSeek-V3, Mixtral, GPT-OSS: ours, _grouped_mm, transformers
#                  (Liger-Kernel autotunes on a shape's first call: one shape a call, with training_liger)
#   training_tokens  bench/training.py at 4096 and 16384 tokens, Qwen3 and OLMoE: ours, Liger-Kernel, _grouped_mm, transformers
#                  (Liger's autotuning keys on the shape, not the token count: the carried cache serves)
#   training_ours_all  bench/training.py, ours only: every shape at 8192 tokens, then Mixtral and DeepSeek-V3 at 16384
#   training_liger bench/training.py at 8192 tokens against Liger-Kernel (autotuned), shapes $COMET_TRAINING_SHAPES
#                  (default OLMoE-1B-7B DeepSeek-V3)
#   training_16384 bench/training.py at 16384 tokens, Mixtral and DeepSeek-V3, ours only (the TFLOP/s targets)
#   backward_tune_dsv3  the backward sweep for DeepSeek-V3 at 8192 tokens only
#   dw1_tune       dW1 gathered vs presorted x (bench/diagnostics/backward_gemms.py --dw1-presort --write-table),
#                  shapes $COMET_DW1_SHAPES (default every shape), 8192 tokens
#   wgrad_probe    bench/experiments/padded_wgrad_probe.py: dW1 over presorted x per load path, size and tile, vs an fp32 oracle
#   backward_tune bench/diagnostics/backward_gemms.py --write-table: the backward kernels' configs, every shape
#   training bench/training.py: forward + backward against Liger-Kernel (wheel in .whl/), _grouped_mm, transformers
#   training_ours  bench/training.py at 8192 tokens, Qwen3 and OLMoE: ours, ours_recompute, _grouped_mm
#   hf_training  bench/hf_training.py: 50 steps of a small Qwen3-MoE, patched and not
#   ep_tests      EP tests on 2 ranks (nccl), CUDA-graph replay
#   single   bench/single_gpu.py, all shapes, 128 / 4096 / 16384 tokens (eager and CUDA-graph rows)
#   gemms    bench/diagnostics/expert_gemms.py, Mixtral 16384 and DeepSeek-V3 16384
#   kernels  kernels_1, then kernels_2: bench/diagnostics/ep_kernels.py on 1 and 2 ranks (GPU time per kernel of an EP call)
#   leads    bench/diagnostics/ep_kernels.py on 2 ranks, every shape: the fused GEMM1 with the model's lead experts and others
#   overlap  bench/experiments/overlap_probe.py on 2 ranks: SM pushes and copy-engine copies beside GEMM1
#   host     bench/diagnostics/host_overhead.py: host time of eager calls at 128 tokens, profiled
#   ep       bench/ep.py on 2 ranks, every shape and token count, --write-table
#   ep_graphs  bench/ep.py --graphs on 2 ranks: every row timed as CUDA-graph replays (GPU time), --write-table
#   ep_sweep bench/ep.py --graphs on 2 ranks: few pushing programs (2, 4, 8) for both fused splits, --write-table
#   stress   tests/ep_stress.py, 1000 calls on 2 ranks
#   profile  python -m comet profile on a 2-layer Qwen3-30B-A3B-shape model, 1 GPU and expert-parallel on 2
#   ep4      with 4 GPUs: bench/ep.py on 4 ranks, every shape, --write-table
#   ep4_stress  with 4 GPUs: 300 stress calls on 4 ranks
#   ep4_tests  with 4 GPUs: the 4-rank nccl tests
# A Megatron-Core wheel in .whl/ (see bench/README.md) is installed first when present. Carry
# .whl (the wheels) and .device_cache (Liger-Kernel's autotuned configs) with the call.
# Several instances can share one machine, each on its own GPUs (CUDA_VISIBLE_DEVICES): give each
# its own COMET_TORCHRUN_PORT and OUT, install once first and set COMET_SKIP_INSTALL=1 for them.
set -u
COMMIT=${1:?usage: bash tools/device_run.sh COMMIT [PHASE ...]}
shift
PHASES=${*:-tests single host gemms kernels ep ep_graphs stress profile ep4 ep4_stress ep4_tests}
export COMET_GIT_COMMIT=$COMMIT NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
RES=/tmp/comet-results
mkdir -p "$RES"
# Autotuned kernels (Liger-Kernel's) keep their choice in Triton's cache: a carried
# .device_cache/liger_autotune.tgz from an earlier run spares the minutes of timing every candidate
# per shape; the run's choices come back as $OUT/liger_autotune.tgz (copy it there for the next run).
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/triton-cache} TRITON_CACHE_AUTOTUNING=1
mkdir -p "$TRITON_CACHE_DIR"
[ -f .device_cache/liger_autotune.tgz ] && tar xzf .device_cache/liger_autotune.tgz -C "$TRITON_CACHE_DIR"
pack() {
  tar czf "${OUT:-/tmp}/results.tgz" -C /tmp comet-results
  (cd "$TRITON_CACHE_DIR" && find . -name "*.autotune.json" | tar czf "${OUT:-/tmp}/liger_autotune.tgz" -T -)
}
trap pack EXIT
if [ -z "${COMET_SKIP_INSTALL:-}" ]; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  fi
  python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || echo "!!! pip install -e . failed"
fi
[ -d /tmp/site ] && export PYTHONPATH=/tmp/site
TORCHRUN="torchrun --master-port ${COMET_TORCHRUN_PORT:-29500}"
GPUS=$(python3 -c "import torch; print(torch.cuda.device_count())")
START=$(date +%s)

# phase NAME LIMIT_S OUTDIR COMMAND...: run it with $OUT pointing into the results, say how it ended
phase() {
  local name=$1 limit=$2 dir=$RES/$3
  shift 3
  mkdir -p "$dir"
  echo "== $name (at $(( $(date +%s) - START )) s, limit $limit s)"
  OUT=$dir timeout -k 10 "$limit" "$@" > "$dir/$name.txt" 2>&1
  echo "   rc=$?"
  grep -E "passed|failed|MISMATCH|ERROR|mismatches" "$dir/$name.txt" | tail -3
}

run_phases() {
for p in "$@"; do
  case $p in
    tests) run_phases kernel_tests ep_tests ;;
    kernel_tests) run_phases forward_tests backward_tests ;;
    forward_tests)
      phase forward_tests 240 tests python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_hf_bf16_gpu.py ;;
    backward_rest)
      phase backward_rest 200 tests python3 -m pytest -q -p no:cacheprovider \
        tests/test_backward.py::test_cuda_graph_training_step_replays_without_host_sync tests/test_backward.py \
        -k "not test_gradients_of_every_variant and not test_token_and_expert_counts and not test_wide_down_dgrad_tiles" ;;
    backward_tests)  # four processes side by side: compiling the many variants dominates
      local i=0
      for part in "every_variant" "token_and_expert_counts" "wide_down_dgrad or cuda_graph or compiled" \
          "not every_variant and not token_and_expert_counts and not wide_down_dgrad and not cuda_graph and not compiled"; do
        i=$((i + 1))
        phase backward_tests_$i 280 tests python3 -m pytest -q -p no:cacheprovider tests/test_backward.py -k "$part" &
      done
      wait ;;
    wgrad_tune)
      phase wgrad_tune 240 training python3 -m bench.diagnostics.backward_gemms --write-table --descriptors on \
        --dgrad-configs --shapes Qwen3-30B-A3B OLMoE-1B-7B Mixtral-8x7B DeepSeek-V3 GPT-OSS-20B --tokens 8192
      cp scheduler/tables/backward_*.json "$RES/training/" 2>/dev/null ;;
    training_large)
      phase training_large 560 training python3 -m bench.training --quick --tokens 4096 8192 16384 \
        --shapes DeepSeek-V3 Mixtral-8x7B GPT-OSS-20B --impls ours grouped_mm hf ;;
    training_tokens)
      phase training_tokens 400 training python3 -m bench.training --quick --tokens 4096 16384 \
        --shapes Qwen3-30B-A3B OLMoE-1B-7B --impls ours liger grouped_mm hf ;;
    training_ours_all)
      phase training_ours_all 200 training python3 -m bench.training --quick --profile --tokens 8192 --impls ours
      phase training_16384 150 training python3 -m bench.training --quick --tokens 16384 \
        --shapes Mixtral-8x7B DeepSeek-V3 --impls ours ;;
    dw1_tune)
      phase dw1_tune 200 training python3 -m bench.diagnostics.backward_gemms --dw1-presort --write-table \
        --descriptors on --shapes ${COMET_DW1_SHAPES:-Qwen3-30B-A3B OLMoE-1B-7B Mixtral-8x7B DeepSeek-V3 GPT-OSS-20B} \
        --tokens 8192 --dw1-configs 128x256x64-g1w8s3 256x128x64-g1w8s3 256x128x32-g1w8s6
      cp scheduler/tables/backward_*.json bench/results/backward_dw1_presort.csv "$RES/training/" 2>/dev/null ;;
    wgrad_probe)
      phase wgrad_probe 200 training python3 -m bench.experiments.padded_wgrad_probe
      cp bench/results/padded_wgrad_probe.csv "$RES/training/" 2>/dev/null ;;
    backward_tune)
      phase backward_gemms 330 training python3 -m bench.diagnostics.backward_gemms --write-table \
        --shapes Qwen3-30B-A3B OLMoE-1B-7B Mixtral-8x7B DeepSeek-V3 GPT-OSS-20B --tokens 8192
      cp scheduler/tables/backward_*.json "$RES/training/" 2>/dev/null ;;
    training)
      phase training 560 training python3 -m bench.training --quick --profile ;;
    training_8192)
      phase training_8192 330 training python3 -m bench.training --quick --profile --tokens 8192 \
        --shapes Qwen3-30B-A3B OLMoE-1B-7B --impls ours ours_recompute liger grouped_mm ;;
    training_liger)
      phase training_liger 520 training python3 -m bench.training --quick --tokens 8192 \
        --shapes ${COMET_TRAINING_SHAPES:-OLMoE-1B-7B DeepSeek-V3} --impls ours liger ;;
    training_16384)
      phase training_16384 200 training python3 -m bench.training --quick --tokens 16384 \
        --shapes Mixtral-8x7B DeepSeek-V3 --impls ours ;;
    backward_tune_dsv3)
      phase backward_gemms_dsv3 250 training python3 -m bench.diagnostics.backward_gemms --write-table \
        --shapes DeepSeek-V3 --tokens 8192
      cp scheduler/tables/backward_*.json "$RES/training/" 2>/dev/null ;;
    training_ours)
      phase training_ours 200 training python3 -m bench.training --quick --profile --tokens 8192 \
        --shapes Qwen3-30B-A3B OLMoE-1B-7B --impls ours ours_recompute grouped_mm ;;
    hf_training)
      phase hf_training 300 training python3 -m bench.hf_training ;;
    ep_tests)
      phase ep_tests 480 tests python3 -m pytest -v -p no:cacheprovider tests/test_ep_ranks.py tests/test_ep_training.py tests/test_comm.py -k "nccl and not four" ;;
    single)
      phase single_gpu 420 single python3 -m bench.single_gpu --quick --tokens 128 4096 16384 ;;
    gemms)
      phase expert_gemms 300 gemms python3 -m bench.diagnostics.expert_gemms --runs Mixtral-8x7B:16384 DeepSeek-V3:16384 ;;
    kernels) run_phases kernels_1 kernels_2 ;;
    host)
      phase host_overhead 120 host python3 -m bench.diagnostics.host_overhead --shapes OLMoE-1B-7B Qwen3-30B-A3B Mixtral-8x7B ;;
    kernels_1)
      phase ep_kernels_1 120 kernels $TORCHRUN --nproc-per-node 1 -m bench.diagnostics.ep_kernels --shapes Qwen3-30B-A3B Mixtral-8x7B --n-comm 0 8 ;;
    kernels_2)
      phase ep_kernels_2 150 kernels $TORCHRUN --nproc-per-node 2 -m bench.diagnostics.ep_kernels --shapes Qwen3-30B-A3B Mixtral-8x7B --n-comm 0 8 16 8:0 ;;
    leads)
      phase ep_kernels_leads 200 kernels $TORCHRUN --nproc-per-node 2 -m bench.diagnostics.ep_kernels \
        --shapes Qwen3-30B-A3B OLMoE-1B-7B Mixtral-8x7B DeepSeek-V3 --n-comm 0 8:0 8 --leads model 1.0 0.5 ;;
    overlap)
      phase overlap_probe 200 overlap $TORCHRUN --nproc-per-node 2 -m bench.experiments.overlap_probe ;;
    ep)
      phase ep2 480 ep $TORCHRUN --nproc-per-node 2 -m bench.ep --n-comm 8 16 --write-table
      cp scheduler/tables/ep_*.json "$RES/ep/" 2>/dev/null ;;
    ep_graphs)
      phase ep2_graphs 240 ep $TORCHRUN --nproc-per-node 2 -m bench.ep --quick --graphs --tokens 8192 --n-comm 8 16 \
        --impls ours ours_auto ours_fused ours_fused_dispatch comm_only compute_only --write-table
      cp scheduler/tables/ep_*.json "$RES/ep/" 2>/dev/null ;;
    ep_sweep)
      phase ep2_sweep 240 ep $TORCHRUN --nproc-per-node 2 -m bench.ep --quick --graphs --tokens 8192 --n-comm 2 4 8 \
        --shapes Qwen3-30B-A3B OLMoE-1B-7B --impls ours ours_fused ours_fused_dispatch --write-table
      cp scheduler/tables/ep_*.json "$RES/ep/" 2>/dev/null ;;
    stress)
      phase ep_stress 200 stress $TORCHRUN --nproc-per-node 2 -m tests.ep_stress --calls 1000 ;;
    profile)
      phase profile_1 200 profile python3 -m comet profile --model qwen3-30b-a3b-shape --layers 2 --tokens 8192 \
        --out "$RES/profile/qwen3"
      phase profile_ep2 200 profile $TORCHRUN --nproc-per-node 2 -m comet profile --model qwen3-30b-a3b-shape \
        --layers 2 --tokens 8192 --ep 2 --out "$RES/profile/qwen3_ep2" ;;
    ep4)
      if [ "$GPUS" -ge 4 ]; then
        phase ep4 240 ep4 $TORCHRUN --nproc-per-node 4 -m bench.ep --quick --tokens 8192 --n-comm 8 16 --write-table
        cp scheduler/tables/ep_*.json "$RES/ep4/" 2>/dev/null
      else
        echo "== ep4: skipped, $GPUS GPUs"
      fi ;;
    ep4_stress)
      if [ "$GPUS" -ge 4 ]; then
        phase ep4_stress 120 ep4 $TORCHRUN --nproc-per-node 4 -m tests.ep_stress --calls 300
      else
        echo "== ep4_stress: skipped, $GPUS GPUs"
      fi ;;
    ep4_tests)
      if [ "$GPUS" -ge 4 ]; then
        phase ep4_tests 300 ep4 python3 -m pytest -v -p no:cacheprovider tests/test_ep_ranks.py -k "nccl and (four or dispatch)"
      else
        echo "== ep4_tests: skipped, $GPUS GPUs"
      fi ;;
    *) echo "!!! unknown phase $p" ;;
  esac
done
}

run_phases $PHASES
echo "== done at $(( $(date +%s) - START )) s"
