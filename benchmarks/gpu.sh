#!/usr/bin/env bash
# Issue 11's checks on a GPU machine, in one run (docs/benchmarks.md, "Runtime on a GPU"): the CUDA
# tests (the fused kernel's bits, its gradient, both modes), the runtime table on the GPU, then
# the BERT-base encoder in lean mode under torch.compile (ResNet-50 compiles for over 170 s). Each step has its own time limit, so a slow step
# costs its own figures only. Logs go to $OUT (the device tool's folder) or the current folder.
#
#     bash benchmarks/gpu.sh
set -u
out=${OUT:-.}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi -L
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_runtime.py tests/test_hashing.py 2>&1 | tail -30 | tee "$out/tests.log"
timeout 180 python3 benchmarks/runtime.py --device cuda --rounds 20 2>&1 | tee "$out/runtime.log"
timeout 100 python3 benchmarks/runtime.py --device cuda --rounds 20 --compiled --models "BERT-base encoder" --no-load 2>&1 | tee "$out/compiled.log"
