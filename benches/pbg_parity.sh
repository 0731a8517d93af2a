#!/usr/bin/env bash
# Offline parity with PyTorch-BigGraph 1.0 on a seeded random 90/5/5 split of the MovieLens-100k
# graph (ratings as rated_high/rated_low plus the knowledge graph, every node in one type), both
# trained on the same split files in one run, both ranked against all entities, both sides,
# filtered by train+valid+test (PBG's ties pessimistic, as it reports them; twhin-stream's
# realistic). Prints one JSON line per side and a table.
#
#   bash benches/pbg_parity.sh
#
# Environment (all optional):
#   DATASETS_DIR   folder holding recbole's ml-100k/ (default data/datasets, made by .ci/setup)
#   WORK           scratch folder (default a fresh mktemp -d; the split is WORK/split)
#   SEED           split seed (0); LIMIT: keep only the first N shuffled triples (0: all)
#   EPOCHS         PBG's epochs (80); EPOCHS_TWHIN: twhin-stream's (config/pbg-parity.toml's
#                  choice, 10); PBG_* settings as benches/pbg_parity.py documents
#   CONFIG_TWHIN   twhin-stream's settings (config/pbg-parity.toml)
#   SPLIT          valid or test: which split twhin-stream's figure is on (test; settings are
#                  chosen with SPLIT=valid)
#   SKIP_PBG=1     twhin-stream only; BIN: the twhin-stream binary (else cargo build --release)
#   PYTHON         the venv's python (default: this checkout's .venv/bin/python, made by .ci/setup)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DATASETS_DIR=${DATASETS_DIR:-data/datasets}
WORK=${WORK:-$(mktemp -d)}
SEED=${SEED:-0}
LIMIT=${LIMIT:-0}
CONFIG_TWHIN=${CONFIG_TWHIN:-config/pbg-parity.toml}
EPOCHS_TWHIN=${EPOCHS_TWHIN:-10}
SPLIT=${SPLIT:-test}
export PBG_EPOCHS=${EPOCHS:-${PBG_EPOCHS:-80}}
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
[ -x "$PYTHON" ] || { echo "[pbg-parity] no python at $PYTHON: run bash .ci/setup, or set PYTHON" >&2; exit 1; }
say() { printf '[pbg-parity] %s\n' "$*" >&2; }

# --- PBG 1.0 in the venv (adds attrs, h5py and itself) -------------------------------------------
if [ -z "${SKIP_PBG:-}" ] && ! "$PYTHON" -c 'import torchbiggraph' 2>/dev/null; then
  say "installing torchbiggraph==1.0.0 into $(dirname "$(dirname "$PYTHON")")"
  "$(dirname "$PYTHON")/pip" install --quiet --disable-pip-version-check torchbiggraph==1.0.0
fi

# --- the split ------------------------------------------------------------------------------------
mkdir -p "$WORK"
DATA="$WORK/split"
"$PYTHON" benches/pbg_parity.py split "$DATASETS_DIR/ml-100k" "$DATA" --seed "$SEED" --limit "$LIMIT" \
  > "$WORK/split.json"
say "split: $(cat "$WORK/split.json")"

# --- PBG ------------------------------------------------------------------------------------------
PBG='{}'
if [ -z "${SKIP_PBG:-}" ]; then
  say "PBG: $PBG_EPOCHS epochs"
  PBG=$("$PYTHON" benches/pbg_parity.py pbg "$DATA" "$WORK/pbg" 2> "$WORK/pbg.log" | tail -n1) \
    || { tail -n 30 "$WORK/pbg.log" >&2; exit 1; }
  echo "{\"side\":\"pbg\",$(echo "$PBG" | sed 's/^{//')"
fi

# --- twhin-stream ---------------------------------------------------------------------------------
if [ -z "${BIN:-}" ]; then
  cargo build --release --quiet
  BIN="${CARGO_TARGET_DIR:-target}/release/twhin-stream"
fi
export TWHIN_STORAGE__PATH="$WORK/twhin/store" TWHIN_LOG__LEVEL=${TWHIN_LOG__LEVEL:-warn}
say "twhin-stream: $EPOCHS_TWHIN epochs, $CONFIG_TWHIN"
TRAIN=$("$BIN" --config "$CONFIG_TWHIN" train --data "$DATA" --epochs "$EPOCHS_TWHIN" --json)
EVAL=$("$BIN" --config "$CONFIG_TWHIN" eval --data "$DATA" --split "$SPLIT" --json)
echo "{\"side\":\"twhin-stream\",\"train\":$TRAIN,\"eval\":$EVAL}"

"$PYTHON" - "$PBG" "$TRAIN" "$EVAL" "$SPLIT" <<'PY'
import json, sys
pbg, train, ev, split = json.loads(sys.argv[1]), json.loads(sys.argv[2]), json.loads(sys.argv[3]), sys.argv[4]
print(f"{'':<14}{'MRR':>8}{'Hits@10':>9}{'train s':>9}   (filtered, all entities, both sides)")
if pbg:
    print(f"{'PBG 1.0':<14}{pbg['mrr']:>8.3f}{pbg['hits@10']:>9.3f}{pbg['train_seconds']:>9.1f}   test, {pbg['epochs']} epochs")
print(f"{'twhin-stream':<14}{ev['mrr']:>8.3f}{ev['hits@10']:>9.3f}{train['seconds']:>9.1f}   {split}, {train['epochs']} epochs")
PY
