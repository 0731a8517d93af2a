#!/usr/bin/env bash
# GPU figures in one short run, for a machine with a CUDA GPU and PyTorch 2.11 but no Rust: the
# binaries are built on a CPU machine (same x86-64, same libtorch version) and run against the
# GPU machine's torch. Prints the device, then
#   1. the train-step bench on CUDA (PBG settings at batches of 1k/16k/64k; its user-model group
#      runs on the CPU only), criterion medians in positive edges/s;
#   2. offline training on the MovieLens-100k split at PyTorch-BigGraph's settings
#      (benches/pbg_parity.sh, twhin-stream side only) on the GPU at several batch sizes, with the
#      filtered MRR of each.
#
# Prepare on the CPU machine (binaries stripped; the bench binary is criterion's):
#   cargo build --release && cargo bench --bench train_step --no-run
#   mkdir -p .gpu && strip -o .gpu/twhin-stream target/release/twhin-stream
#   strip -o .gpu/train_step "$(ls -t target/release/deps/train_step-* | grep -v '\.d$' | head -1)"
# then run `bash benches/gpu.sh` there with .gpu and data/datasets beside the working tree.
#
# Environment: BIN, BENCH (the two binaries, default .gpu/…), BATCHES ("1000 16000 65536"),
# EPOCHS (twhin-stream's, 160 as chosen on the valid split for the CPU figures), DEVICE (cuda),
# OUT (a folder for the logs; default a mktemp -d). Both binaries read config/ and data/ from
# this checkout (the working directory this script moves to).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.gpu/twhin-stream}
BENCH=${BENCH:-.gpu/train_step}
BATCHES=${BATCHES:-"1000 16000 65536"}
EPOCHS=${EPOCHS:-160}
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
say() { printf '[gpu] %s\n' "$*" >&2; }

TORCH_LIB=$(python3 -c 'import torch, os; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
export LD_LIBRARY_PATH="$TORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
DEVICE=${DEVICE:-cuda}
python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available() and torch.cuda.get_device_name(0))'
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
export TWHIN_TORCH__DEVICE=$DEVICE TWHIN_LOG__LEVEL=warn

say "train-step bench on CUDA"
"$BENCH" --bench '^train_step/Cuda' --warm-up-time 1 --measurement-time 4 --noplot \
  2>&1 | tee "$OUT/train_step.log" | grep -E '^train_step|thrpt:'

say "offline training on the MovieLens-100k split, PBG settings, $EPOCHS epochs"
for batch in $BATCHES; do
  TWHIN_TRAIN__BATCH_SIZE=$batch TWHIN_TRAIN__OFFLINE_WORKERS=1 SKIP_PBG=1 PYTHON=python3 \
    BIN="$BIN" CONFIG_TWHIN=config/pbg-settings.toml EPOCHS_TWHIN=$EPOCHS WORK="$OUT/parity-$batch" \
    bash benches/pbg_parity.sh 2>&1 | tee "$OUT/parity-$batch.log" | grep -E '"side"|twhin-stream'
done
