#!/usr/bin/env bash
# The miniature reproduction (paper section 5 and Figure 6) on the built-in synthetic data:
#   1. the ablation ladder cls -> registers -> avg -> learned -> llip, 3 seeds each;
#   2. llip's number of mixture tokens K; 3. llip's temperature tau (seed 0).
# Every run has the same budget (steps, batch, data, the seed's init and data order); each
# writes runs/<study>/<name>/ (log.jsonl with the final evaluation, config.json, ckpt.pt).
#
#     bash runs/ablation.sh                       # 21 runs, then the tables and plots (~45 min on 2 cores)
#     JOBS=1 STEPS=100 bash runs/ablation.sh      # fewer steps, one run at a time
#     SWEEP_SEEDS="0 1 2" bash runs/ablation.sh   # the sweeps with 3 seeds too
#
# Runs are independent processes, JOBS at a time with one thread each (small models use
# two cores better that way). A finished run is not redone and a killed one resumes from its
# last checkpoint, so the script can be stopped and started again.
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${STEPS:-600}
BATCH=${BATCH:-64}
JOBS=${JOBS:-2}
SEEDS=${SEEDS:-"0 1 2"}
SWEEP_SEEDS=${SWEEP_SEEDS:-"0"}
common="--steps=$STEPS --batch_size=$BATCH --save_every=250 --keep=1 --log_every=25 --workers=1 --resume=auto"

jobs_file=$(mktemp)
for seed in $SEEDS; do
    for pool in cls registers avg learned llip; do
        echo "runs/ablation/pool=$pool,seed=$seed --pool=$pool --seed=$seed"
    done
done > "$jobs_file"
for seed in $SWEEP_SEEDS; do
    for k in 1 4 64; do      # K = 16 (the tiny preset's) is the ablation's llip run
        echo "runs/k_sweep/K=$k,seed=$seed --pool=llip --num_mixture=$k --seed=$seed"
    done
    for tau in 1 10 20; do   # tau = 5 (the tiny preset's) is the ablation's llip run
        echo "runs/tau_sweep/tau=$tau,seed=$seed --pool=llip --tau=$tau --seed=$seed"
    done
done >> "$jobs_file"

python -c "import synthetic; synthetic.make_synthetic('data/synthetic')"   # once, before the parallel runs
# shellcheck disable=SC2086
xargs -P "$JOBS" -L 1 bash -c 'out=$0; mkdir -p "$out"; echo "start $out";
    OMP_NUM_THREADS=1 python train.py --out_dir="$out" '"$common"' "$@" > "$out/stdout.txt" 2>&1 \
        && echo "done  $out" || echo "FAILED $out (see $out/stdout.txt)"' < "$jobs_file"
rm -f "$jobs_file"

python analysis.py ablation runs/ablation/*/ --out=runs/ablation.png --table=runs/ablation.md
python analysis.py sweep runs/k_sweep/*/ runs/ablation/pool=llip,*/ --by=num_mixture --out=runs/k_sweep.png --table=runs/k_sweep.md
python analysis.py sweep runs/tau_sweep/*/ runs/ablation/pool=llip,*/ --by=tau --out=runs/tau_sweep.png --table=runs/tau_sweep.md
python analysis.py curves runs/ablation/*,seed=0/ --out=runs/curves.png
python analysis.py spectrum runs/ablation/pool=cls,seed=0 runs/ablation/pool=avg,seed=0 runs/ablation/pool=llip,seed=0 \
    --features=values --out=runs/spectrum.png
python analysis.py mixing runs/ablation/pool=llip,seed=0 --index=0 --out=runs/mixing.png
python analysis.py attention runs/ablation/pool=llip,seed=0 --index=0 --out=runs/attention.png
