#!/usr/bin/env bash
# The GPU measurements of issue 15 (time budgets), prepared for a session that is lent a GPU for ~15 minutes.
#
#   bash benchmarks/gpu_session.sh prepare          # here, on the CPU machine: fills .gpu-carry/ (git-ignored)
#   bash benchmarks/gpu_session.sh smoke            # here: every stage on the CPU at toy sizes (~6 min)
#   # on the device, carry .gpu-carry, each stage one call (under 10 minutes each):
#   bash benchmarks/gpu_session.sh throughput       # unet_throughput (ldm-fashion, batch 64 and 1024), SD v1
#                                                   # training step (sd_train_step) and sampling step (sd_unet)
#   bash benchmarks/gpu_session.sh ttq              # time_to_quality --device cuda --minutes 3
#
# The device has torch (CUDA), transformers, safetensors, numpy, Pillow, PyYAML, click and tqdm but not
# diffusers (the peer) and no Fashion-MNIST: both travel in .gpu-carry/. Results land in benchmarks/results/
# (the *_cuda files) and are copied to $OUT, which the device tool brings back.
set -euo pipefail
cd "$(dirname "$0")/.."
CARRY=.gpu-carry
stage=${1:?usage: gpu_session.sh prepare|smoke|throughput|ttq}

setup() {  # diffusers beside the device's own packages, the data folder for every DataConfig
  local t
  t=$(mktemp -d)
  pip install -q --no-deps --target "$t" "$CARRY"/wheels/*.whl
  export PYTHONPATH="$t:$PWD/src" LATENTDIFF_FASHION_MNIST_DIR="$PWD/$CARRY/fashion-mnist"
  python -c "import torch, diffusers; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'diffusers', diffusers.__version__)"
}

bring_back() {  # the device tool returns what is under $OUT
  mkdir -p "${OUT:-/tmp/gpu-out}"
  cp benchmarks/results/*_cuda*.md benchmarks/results/*_cuda*.json "${OUT:-/tmp/gpu-out}/" 2>/dev/null || true
  cp benchmarks/results/sd_unet_gpu.* "${OUT:-/tmp/gpu-out}/" 2>/dev/null || true
}

case "$stage" in
  prepare)
    mkdir -p "$CARRY/wheels" "$CARRY/fashion-mnist"
    grep -qx "/$CARRY/" .git/info/exclude 2>/dev/null || echo "/$CARRY/" >> .git/info/exclude
    pip download -q --no-deps -d "$CARRY/wheels" diffusers==0.42.1 importlib_metadata zipp
    cp /usr/share/datasets/fashion-mnist/*-ubyte.gz "$CARRY/fashion-mnist/"
    du -sh "$CARRY"
    ;;
  smoke)  # the same commands on the CPU, small: catches a broken flag before device minutes are spent
    export LATENTDIFF_FASHION_MNIST_DIR="$PWD/$CARRY/fashion-mnist"
    keep=$(mktemp -d)  # unet_throughput writes its CPU results file: put the real one back afterwards
    cp benchmarks/results/unet_throughput_ldm-fashion.* "$keep/"
    python benchmarks/unet_throughput.py --preset ldm-fashion --device cpu --batch 8 --iters 1 --rounds 1
    cp "$keep"/* benchmarks/results/
    python benchmarks/sd_train_step.py --device cpu --channels 32 --size 16 --batch 2 --steps 1 --rounds 1 \
      --out "$keep/sd_train_step"
    python benchmarks/time_to_quality.py --device cpu --minutes 2 --n-eval 64 --tag smoke \
      --work "$keep/ttq" --extra data.limit=2048
    rm -f benchmarks/results/time_to_quality_cpu_smoke.*
    ;;
  throughput)
    trap bring_back EXIT  # what finished comes back even if a later command fails
    setup
    python benchmarks/unet_throughput.py --preset ldm-fashion --device cuda --batch 64 --iters 20 --rounds 5
    cp benchmarks/results/unet_throughput_ldm-fashion_cuda.md benchmarks/results/unet_throughput_ldm-fashion_b64_cuda.md
    python benchmarks/unet_throughput.py --preset ldm-fashion --device cuda --batch 1024 --iters 20 --rounds 5
    timeout 180 python benchmarks/sd_train_step.py --device cuda --batch 8 || echo "sd_train_step: stopped"
    timeout 120 python benchmarks/sd_unet.py --device cuda --precision fp16 bf16 --ref-precision fp16 --out sd_unet_gpu \
      || echo "sd_unet: stopped (timeout or error)"
    ;;
  ttq)
    trap bring_back EXIT
    setup
    python benchmarks/time_to_quality.py --device cuda --minutes 3 --n-eval 2000 --work "$(mktemp -d)"  # a rerun starts clean
    ;;
  *)
    echo "unknown stage $stage: prepare|smoke|throughput|ttq" >&2
    exit 2
    ;;
esac
