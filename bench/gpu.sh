#!/usr/bin/env bash
# Issue 3's GPU case: the two CLM cases in the GPU shape (GPT-2 small's 12 x 768 blocks, seq 1024,
# batch 16, bf16), lmforge and Trainer side by side on a lent H100/H200; MFU against the measured
# and the datasheet bf16 peak; lmforge's compile modes once each. Also the test suite on CUDA.
#   here, with the package registries:   bash bench/gpu.sh fetch
#       -> .whl/: what the GPU image (torch, transformers, tokenizers) lacks or has in another version, and Brown
#   there, through the device tool with carry [".whl"], one command:
#       bash bench/gpu.sh install; bash bench/gpu.sh run; bash bench/gpu.sh tests [seconds [tests...]]
#       -> $OUT/gpu-latest.json (also bench/results/gpu-latest.json there), $OUT/bench.log, $OUT/tests.log
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp}
case "${1:-}" in
fetch)
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
        pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
        datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 peft==0.21.2 trl==1.16.0
    cp ../shared/data/brown.jsonl.gz .whl/ 2>/dev/null || echo "no ../shared/data/brown.jsonl.gz: the bench uses the excerpt"
    du -sh .whl ;;
install)
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv
    python3 -c "import torch, transformers, peft, trl, tokenizers, pyarrow
print({m.__name__: m.__version__ for m in (torch, transformers, peft, trl, tokenizers, pyarrow)})" ;;
run)
    export LMFORGE_BENCH_GPU=1
    if [ -f .whl/brown.jsonl.gz ]; then export LMFORGE_BENCH_CORPUS=$PWD/.whl/brown.jsonl.gz; fi
    export BENCH_RUN=$(date +%Y-%m-%dT%H%M%S)
    timeout 420 python3 bench/run.py --cases clm_pretrain_defaults,clm_pretrain_equal --repeats 2 --steps 30 2>&1 | tee "$OUT/bench.log"
    python3 bench/results.py finish --gpu
    cp bench/results/gpu-latest.json "$OUT/" ;;
tests)
    # the suite (or the given tests) with CUDA visible, so training picks the GPU; one GPU, so not the
    # 2-process DDP tests
    limit=${2:-300}; shift 2 || shift
    timeout "$limit" python3 -m pytest -q -rf --ignore=tests/test_distributed.py -p no:cacheprovider \
        -W ignore::DeprecationWarning "${@:-tests}" 2>&1 | tee "$OUT/tests.log" ;;
*)
    echo "usage: bash bench/gpu.sh fetch|install|run|tests [seconds [tests...]]" >&2
    exit 2 ;;
esac
