#!/usr/bin/env bash
# The GPU figures of the fast track and the CIFAR-10 table, in one call of a lent device
# machine (15 minutes of device time per task, 10 per command: see README, "GPU figures").
#
#   make device-kit        # here, once: the wheels the device lacks (.whl/) and the data (.device/)
#   run(command="bash scripts/device_check.sh", carry=[".whl", ".device"], timeout_s=600)
#
# Stages, each under its own time limit, everything written under $OUT as it finishes (a
# killed stage still leaves the others' files):
#   1. bench_frontier: fastnet full width, train=fast, on the whole CIFAR-10 folder, 10 and
#      16 epochs: clean accuracy against wall time (issue 15: >= 94% in <= 10 s per model).
#   2. bench_train --epoch-time: PreAct-ResNet18's standard epoch on the 50,000 images.
#   3. the fast-track table: BadNets, Blend, WaNet x undefended and the eleven baselines,
#      fastnet full width, defense-major (every defense's three cells before the next), until
#      DEADLINE_S; what finished comes back as sweeps.tgz (metrics.json, logs, tables).
# Variables: DEADLINE_S (default 530 s after the start, for the table), DEVICE (cuda),
# FRONTIER_POINTS, FRONTIER_ARGS (e.g. --max-train 2000), TRAIN_ARGS (Hydra overrides of
# bench_train), EXTRA (Hydra overrides of the table's cells), DEFENSES, ATTACKS: small values
# try the whole script on a CPU (tried so, 2026-12-02: every stage ran; PreAct's full epoch
# ran past its 120 s limit on one CPU thread, as it must).
set -u
T0=$(date +%s)
OUT=${OUT:-/tmp/device_out}
mkdir -p "$OUT"
DEVICE=${DEVICE:-cuda}
DEADLINE_S=${DEADLINE_S:-530}
EXTRA=${EXTRA:-}
FRONTIER_ARGS=${FRONTIER_ARGS:-}
TRAIN_ARGS=${TRAIN_ARGS:-}
FRONTIER_POINTS=${FRONTIER_POINTS:-64,256,256:10 64,256,256:16}
DEFENSES=${DEFENSES:-undefended,clp,ft,fp,nad,anp,i_bau,ac,ss,strip,nc,abl}
ATTACKS=${ATTACKS:-badnets,blend,wanet}
WORK=${WORK:-/tmp/device_check}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
log() { echo "[device_check $(($(date +%s) - T0)) s] $*" | tee -a "$OUT/stages.log"; }
left() { echo $((DEADLINE_S - ($(date +%s) - T0))); }

# 0. The Python packages the device image lacks, and the data.
if ! "$PY" -c "import hydra, omegaconf, mlxtend" 2>/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || { log "wheel install failed"; exit 1; }
    export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
mkdir -p "$WORK/cifar10" "$WORK/cache" "$WORK/out"
if [ ! -d "$WORK/cifar10/train" ]; then
    tar xzf .device/cifar10-jpeg.tar.gz -C "$WORK/cifar10" || { log "no .device/cifar10-jpeg.tar.gz"; exit 1; }
fi
export BENCH_CACHE_DIR=$WORK/cache BENCH_OUTPUT_DIR=$WORK/out
{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 || true
    "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())"
    nproc
} > "$OUT/env.txt" 2>&1
log "set-up done"

# 1. Accuracy against time of the fast track on the real folder.
# shellcheck disable=SC2086
timeout 150 "$PY" scripts/bench_frontier.py --root "$WORK/cifar10" --device "$DEVICE" \
    --points $FRONTIER_POINTS --out "$OUT/fast_frontier_gpu.json" $FRONTIER_ARGS > "$OUT/frontier.log" 2>&1
log "frontier: exit $?"

# 2. PreAct-ResNet18's standard epoch (BackdoorBench's recipe, batch 128) on the whole folder.
# shellcheck disable=SC2086
timeout 120 "$PY" scripts/bench_train.py --dataset imagefolder --models preact_resnet18 \
    --images 4096 --epochs 2 --rounds 1 --workers 0 --device "$DEVICE" --epoch-time \
    --out "$OUT/train_throughput_gpu.json" "dataset.root=$WORK/cifar10" $TRAIN_ARGS > "$OUT/train.log" 2>&1
log "standard epoch: exit $?"

# 3. The fast-track CIFAR-10 table, defense-major, until the deadline.
T=$(left)
if [ "$T" -gt 30 ]; then
    # shellcheck disable=SC2086
    timeout "$T" "$PY" -m benchmark.run -m "defense=$DEFENSES" "attack=$ATTACKS" \
        dataset=imagefolder "dataset.root=$WORK/cifar10" model=fastnet train=fast seed=0 \
        logger=none progress=false "device=$DEVICE" $EXTRA > "$OUT/table.log" 2>&1
    log "table: exit $? ($(find "$WORK/out" -name metrics.json | wc -l) records)"
fi
(cd "$WORK/out" && find . \( -name metrics.json -o -name '*.log' -o -path '*/tables/*' \) -print0 |
    tar czf "$OUT/sweeps.tgz" --null -T -) 2>> "$OUT/stages.log"
log "packed"
