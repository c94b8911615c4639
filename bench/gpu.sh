#!/usr/bin/env bash
# Issue 3's GPU case: the two CLM cases in the GPU shape (GPT-2 small's 12 x 768 blocks, seq 1024,
# batch 16, bf16), lmforge and Trainer side by side on a lent H100/H200; MFU against the measured
# and the datasheet bf16 peak.
#   here, with the package registries:   bash bench/gpu.sh fetch
#       -> .whl/: what the GPU image (torch, transformers, peft, tokenizers) lacks, and Brown
#   there, through the device tool with carry [".whl"]:   bash bench/gpu.sh run
#       -> $OUT/gpu-latest.json (also bench/results/gpu-latest.json there)
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
fetch)
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
        pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
        datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
    cp ../shared/data/brown.jsonl.gz .whl/ 2>/dev/null || echo "no ../shared/data/brown.jsonl.gz: the bench uses the excerpt"
    du -sh .whl ;;
run)
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD/src LMFORGE_BENCH_GPU=1 PYTHONUNBUFFERED=1
    if [ -f .whl/brown.jsonl.gz ]; then export LMFORGE_BENCH_CORPUS=$PWD/.whl/brown.jsonl.gz; fi
    nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv
    python3 bench/run.py --cases clm_pretrain_defaults,clm_pretrain_equal --repeats 2 --steps 30
    cp bench/results/gpu-latest.json "${OUT:-/tmp}/" ;;
*)
    echo "usage: bash bench/gpu.sh fetch|run" >&2
    exit 2 ;;
esac
