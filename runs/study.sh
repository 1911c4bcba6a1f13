#!/usr/bin/env bash
# The miniature study (paper section 5, Figures 3, 5 and 6) on the built-in synthetic data, as
# one resumable command. Every run has the same budget (steps, batch, data, the seed's init and
# data order); only the pool and the learning rate picked for it differ.
#
#     bash runs/study.sh headline   # lr for cls and llip on val, then 5 seeds each on test (~22 min)
#     bash runs/study.sh long       # then cls, llip, avg, learned and the pressure sweeps at 2500 steps
#     bash runs/study.sh where      # then cls and llip at 2500 steps with the place also said alone
#     bash runs/study.sh figure6    # then llip's K and tau swept, cls beside (Figure 6, ~20 min)
#     bash runs/study.sh captions   # then cls and llip with 1, 2 and 4 captions an image a step
#     bash runs/study.sh            # everything: + the ladder, + the pressure sweeps (~70 min)
#     JOBS=1 STEPS=100 bash runs/study.sh headline    # a quick look, one run at a time
#
# Stages, each writing runs/study/<stage>/<run>/ (config.json, log.jsonl with the evaluation):
#   lr        each pool at each learning rate of LRS, seed 0, evaluated on the VALIDATION split;
#             report.py lr picks each pool's best into runs/study/lr.json
#   ladder    cls and llip with 5 seeds, registers, avg, learned with 3, at their own lr, on TEST
#   long      (only with `long`) cls and llip, 5 seeds, avg and learned, 3, at the default run's
#             2500 steps, at the learning rates picked above; then the pressure sweeps again at
#             2500 steps (binding is learned only by then)
#   where     (only with `where`) cls and llip, 3 seeds, 2500 steps, on data whose captions also
#             say each object's place alone ("a shape on the left"; --synthetic_captions)
#   tokens    the middle rungs against how many tokens they add: avg with K = 1 and 4, registers
#             with K = 4 (K = 16 is the ladder's; registers with K = 1 is cls), 3 seeds, at the
#             ladder's learning rates; avg with K = 1 at cls's (cls but for the path W_V, W_O);
#             and the spread of the image vectors at init (diagnose.py)
#   pressure  cls and llip, 3 seeds, with a narrower joint space (D = 32 instead of 64) and
#             with up to 5 objects per image instead of 3: does llip gain more where one vector
#             has to hold more?
#   figure6   (only with `figure6`) llip with K = 4, 8, 16, 32 mixture tokens and with tau = 1,
#             5, 20, 3 seeds, at llip's learning rate, each against cls's seeds (ladder's runs)
#   captions  (only with `captions`) cls and llip, 3 seeds, each image with C = 1, 2, 4 of its
#             captions a step (--captions_per_image): the same images seen, more captions
# Seed s of every pool sees the same data in the same order, so pools are compared pair by
# pair (report.py: mean and 95% interval of the paired difference).
#
# Runs are independent processes, JOBS at a time with one thread each (small models use two
# cores better that way). A finished run is not redone and a killed one resumes from its last
# checkpoint, so the script can be stopped and started again.
set -euo pipefail
cd "$(dirname "$0")/.."
WHAT=${1:-all}
STEPS=${STEPS:-1000}   # the default python train.py runs 2500; 1000 keeps the study within an hour
BATCH=${BATCH:-64}
JOBS=${JOBS:-2}
LRS=${LRS:-"1e-4 3e-4 1e-3"}
OUT=${OUT:-runs/study}
common="--steps=$STEPS --batch_size=$BATCH --save_every=200 --keep=1 --log_every=25 --workers=1 --resume=auto"
# what the learning rate is chosen on: every attribute's zero-shot accuracy and both retrievals
SELECT=zeroshot/shape/top1,zeroshot/color/top1,zeroshot/size/top1,zeroshot/place/top1,zeroshot/count/top1,retrieval/i2t_map,retrieval/t2i_map
# what the tables show
RETRIEVAL=retrieval/i2t_map,retrieval/t2i_map,retrieval/binding,retrieval/binding_color,retrieval/binding_size,retrieval/binding_place
ZEROSHOT=zeroshot/color/top1,zeroshot/shape/top1,zeroshot/size/top1,zeroshot/place/top1,zeroshot/count/top1
# the same, each class scored by its best prompt instead of the average of its prompts (eval.py)
BEST=${ZEROSHOT//top1/top1_best}

run_all() {   # lines of "OUT_DIR FLAGS..." on stdin; runs JOBS at a time, skips finished ones
    # shellcheck disable=SC2016
    xargs -P "$JOBS" -L 1 bash -c 'out=$0; final=$(printf "%s/ckpt_%07d.pt" "$out" '"$STEPS"')
        if [ -f "$final" ]; then echo "done  $out (already)"; exit 0; fi
        mkdir -p "$out"; echo "start $out"
        OMP_NUM_THREADS=1 python train.py --out_dir="$out" '"$common"' "$@" > "$out/stdout.txt" 2>&1 \
            && echo "done  $out" || echo "FAILED $out (see $out/stdout.txt)"'
}

lr_of() {   # the learning rate picked for a pool
    python -c "import json, sys; print(json.load(open('$OUT/lr.json'))[sys.argv[1]])" "$1"
}

choose_lr() {   # $@: pools
    for pool in "$@"; do for lr in $LRS; do
        echo "$OUT/lr/pool=$pool,lr=$lr,seed=0 --pool=$pool --lr=$lr --seed=0 --eval_split=val"
    done; done | run_all
    python -m runs.report lr "$OUT"/lr/*/ --metrics=$SELECT --out="$OUT/lr.json" --table=runs/results/lr.md
}

python -c "import synthetic; synthetic.make_synthetic('data/synthetic')"   # once, before the parallel runs

headline_tables() {   # $1: the runs' directory, $2: the tables' prefix
    for what in retrieval zeroshot zeroshot_best; do
        metrics=$RETRIEVAL; [ $what = zeroshot ] && metrics=$ZEROSHOT; [ $what = zeroshot_best ] && metrics=$BEST
        python -m runs.report ablation "$1"/pool=cls,*/ "$1"/pool=llip,*/ --baseline=cls \
            --metrics=$metrics --out=runs/results/$2_$what.png --table=runs/results/$2_$what.md
    done
}

pressure() {   # $1: where its runs go, $2: the runs with the defaults (D = 64, 1-3 objects), $3: tables' prefix
    # D first: it needs no new data; the objects arm comes last (it writes data/synthetic-5objects)
    for seed in 0 1 2; do for pool in cls llip; do
        echo "$1/pool=$pool,embed_dim=32,seed=$seed --pool=$pool --embed_dim=32 --seed=$seed --lr=$(lr_of $pool)"
    done; done | run_all
    python -c "import synthetic; synthetic.make_synthetic('data/synthetic-5objects', max_objects=5)"
    for seed in 0 1 2; do for pool in cls llip; do
        echo "$1/pool=$pool,objects=5,seed=$seed --pool=$pool --seed=$seed --lr=$(lr_of $pool)" \
             "--synthetic_objects=5 --synthetic_dir=data/synthetic-5objects"
    done; done | run_all
    for by in embed_dim synthetic_objects; do
        python -m runs.report pressure "$1"/*${by#synthetic_}=*/ "$2"/pool=cls,seed=[012]/ "$2"/pool=llip,seed=[012]/ \
            --by=$by --baseline=cls --pool=llip --metrics=retrieval/i2t_map,retrieval/t2i_map,retrieval/binding \
            --out=runs/results/$3_${by#*_}.png --table=runs/results/$3_${by#*_}.md
    done
}

if [ "$WHAT" = long ] || [ "$WHAT" = where ]; then   # the default run's budget, 2500 steps, at
    STEPS=${LONG_STEPS:-2500}  # the learning rates picked above (run the whole study first)
    common="--steps=$STEPS --batch_size=$BATCH --save_every=500 --keep=1 --log_every=50 --workers=1 --resume=auto"
fi
if [ "$WHAT" = long ]; then   # the headline again; and avg and learned: do they catch up?
    for seed in 0 1 2 3 4; do for pool in cls llip; do
        echo "$OUT/long/pool=$pool,seed=$seed --pool=$pool --seed=$seed --lr=$(lr_of $pool)"
    done; done | run_all
    for seed in 0 1 2; do for pool in avg learned; do
        echo "$OUT/long/pool=$pool,seed=$seed --pool=$pool --seed=$seed --lr=$(lr_of $pool)"
    done; done | run_all
    headline_tables "$OUT/long" long
    python -m runs.report ablation "$OUT"/long/pool={cls,avg,learned},*/ --baseline=cls \
        --metrics=$ZEROSHOT,retrieval/i2t_map,retrieval/t2i_map --out=runs/results/long_rungs.png --table=runs/results/long_rungs.md
    pressure "$OUT/long_pressure" "$OUT/long" long_pressure   # binding is learned only by 2500 steps
    exit 0
fi
if [ "$WHAT" = where ]; then   # the place also said alone ("a shape on the left"), cls and llip
    python -c "import synthetic; synthetic.make_synthetic('data/synthetic-where', captions=synthetic.CAPTION_KINDS)"
    for seed in 0 1 2; do for pool in cls llip; do
        echo "$OUT/where/pool=$pool,seed=$seed --pool=$pool --seed=$seed --lr=$(lr_of $pool)" \
             "--synthetic_captions=shape,color,place,size,where --synthetic_dir=data/synthetic-where"
    done; done | run_all
    for pool in cls llip; do   # against the same pool and seeds with the default captions
        python -m runs.report sweep "$OUT"/where/pool=$pool,*/ "$OUT"/long/pool=$pool,seed=[012]/ \
            --by=synthetic_captions --baseline=shape,color,place,size --metrics=$ZEROSHOT,retrieval/i2t_map,retrieval/t2i_map,retrieval/binding \
            --out=runs/results/where_$pool.png --table=runs/results/where_$pool.md
    done
    exit 0
fi

if [ "$WHAT" = figure6 ]; then   # the paper's Figure 6: more mixture tokens help, a large tau hurts
    for seed in 0 1 2; do
        for pool in cls llip; do   # K = 16 and tau = 5 are the tiny preset's: the ladder's runs
            echo "$OUT/ladder/pool=$pool,seed=$seed --pool=$pool --seed=$seed --lr=$(lr_of $pool)"
        done
        for k in 4 8 32; do
            echo "$OUT/figure6/pool=llip,num_mixture=$k,seed=$seed --pool=llip --num_mixture=$k" \
                 "--seed=$seed --lr=$(lr_of llip)"
        done
        for tau in 1 20; do
            echo "$OUT/figure6/pool=llip,tau=$tau,seed=$seed --pool=llip --tau=$tau --seed=$seed" \
                 "--lr=$(lr_of llip)"
        done
    done | run_all
    FIG6=$ZEROSHOT,retrieval/i2t_map,retrieval/t2i_map,retrieval/binding
    base="$OUT/ladder/pool=cls,seed=[012]/ $OUT/ladder/pool=llip,seed=[012]/"
    # shellcheck disable=SC2086
    python -m runs.report sweep $base "$OUT"/figure6/pool=llip,num_mixture=*/ --by=num_mixture \
        --baseline=16 --against=cls --metrics=$FIG6 --out=runs/results/figure6_k.png \
        --table=runs/results/figure6_k.md
    # shellcheck disable=SC2086
    python -m runs.report sweep $base "$OUT"/figure6/pool=llip,tau=*/ --by=tau --baseline=5 \
        --against=cls --metrics=$FIG6 --out=runs/results/figure6_tau.png \
        --table=runs/results/figure6_tau.md
    exit 0
fi
if [ "$WHAT" = captions ]; then   # C captions of each image in a step: same images, more captions
    for seed in 0 1 2; do for pool in cls llip; do
        echo "$OUT/ladder/pool=$pool,seed=$seed --pool=$pool --seed=$seed --lr=$(lr_of $pool)"
        for c in 2 4; do
            echo "$OUT/captions/pool=$pool,captions_per_image=$c,seed=$seed --pool=$pool" \
                 "--captions_per_image=$c --seed=$seed --lr=$(lr_of $pool)"
        done
    done; done | run_all
    for what in retrieval zeroshot; do
        metrics=$RETRIEVAL; [ $what = zeroshot ] && metrics=$ZEROSHOT
        python -m runs.report pressure "$OUT"/ladder/pool={cls,llip},seed=[012]/ "$OUT"/captions/*/ \
            --by=captions_per_image --baseline=cls --pool=llip --metrics=$metrics \
            --out=runs/results/captions_per_image_$what.png --table=runs/results/captions_per_image_$what.md
    done
    exit 0
fi

choose_lr cls llip
for seed in 0 1 2 3 4; do for pool in cls llip; do
    echo "$OUT/ladder/pool=$pool,seed=$seed --pool=$pool --seed=$seed --lr=$(lr_of $pool)"
done; done | run_all
headline_tables "$OUT/ladder" headline
[ "$WHAT" = headline ] && exit 0

choose_lr registers avg learned
for seed in 0 1 2; do for pool in registers avg learned; do
    echo "$OUT/ladder/pool=$pool,seed=$seed --pool=$pool --seed=$seed --lr=$(lr_of $pool)"
done; done | run_all

# the middle rungs with fewer tokens: is what they lose against cls the tokens that see no image?
for seed in 0 1 2; do
    for k in 1 4; do
        echo "$OUT/tokens/pool=avg,num_mixture=$k,seed=$seed --pool=avg --num_mixture=$k --seed=$seed --lr=$(lr_of avg)"
    done
    echo "$OUT/tokens/pool=registers,num_mixture=4,seed=$seed --pool=registers --num_mixture=4 --seed=$seed --lr=$(lr_of registers)"
    # one token at cls's learning rate: cls but for the image vector's path (W_V, then W_O)
    echo "$OUT/tokens/pool=avg,num_mixture=1,lr=$(lr_of cls),seed=$seed --pool=avg --num_mixture=1 --seed=$seed --lr=$(lr_of cls)"
done | run_all

pressure "$OUT/pressure" "$OUT/ladder" pressure

for what in retrieval zeroshot zeroshot_best; do
    metrics=$RETRIEVAL; [ $what = zeroshot ] && metrics=$ZEROSHOT; [ $what = zeroshot_best ] && metrics=$BEST
    python -m runs.report ablation "$OUT"/ladder/*/ --baseline=cls --metrics=$metrics \
        --out=runs/results/ablation_$what.png --table=runs/results/ablation_$what.md
done
python -m runs.report curves "$OUT"/ladder/*,seed=0/ --out=runs/results/curves.png
python analysis.py spectrum "$OUT"/ladder/pool=cls,seed=0 "$OUT"/ladder/pool=avg,seed=0 \
    "$OUT"/ladder/pool=llip,seed=0 --features=values --out=runs/results/spectrum.png
python analysis.py mixing "$OUT"/ladder/pool=llip,seed=0 --index=0 --out=runs/results/mixing.png
python analysis.py attention "$OUT"/ladder/pool=llip,seed=0 --index=0 --out=runs/results/attention.png
TOKENS=zeroshot/color/top1,zeroshot/shape/top1,zeroshot/size/top1,zeroshot/count/top1,retrieval/i2t_map,retrieval/t2i_map
python -m runs.report sweep "$OUT"/tokens/pool=avg,num_mixture=?,seed=*/ "$OUT"/ladder/pool=avg,seed=[012]/ --by=num_mixture \
    --baseline=16 --metrics=$TOKENS --out=runs/results/tokens_avg.png --table=runs/results/tokens_avg.md
python -m runs.report sweep "$OUT"/tokens/pool=registers,*/ "$OUT"/ladder/pool=registers,seed=[012]/ --by=num_mixture \
    --baseline=16 --metrics=$TOKENS --out=runs/results/tokens_registers.png --table=runs/results/tokens_registers.md
python -m runs.report ablation "$OUT"/ladder/pool=cls,seed=[012]/ "$OUT"/tokens/pool=avg,num_mixture=1,lr=*/ \
    "$OUT"/tokens/pool=registers,*/ --baseline=cls --metrics=$TOKENS --out=runs/results/tokens_path.png \
    --table=runs/results/tokens_path.md   # few tokens against cls: avg (K = 1, cls's lr), registers (K = 4)
python -m runs.report sweep "$OUT"/tokens/pool=avg,num_mixture=1,*/ --by=lr --baseline=1e-4 --metrics=$TOKENS \
    --out=runs/results/tokens_lr.png --table=runs/results/tokens_lr.md   # one-token avg at avg's lr and at cls's
python -m runs.diagnose spread "$OUT"/ladder/pool={cls,registers,avg,learned},seed=[012]/ "$OUT"/tokens/*/ \
    --table=runs/results/spread.md
python -m runs.diagnose captions "$OUT"/ladder/*,seed=0/ --out=runs/results/captions.png --table=runs/results/captions.md
python -m runs.diagnose probe "$OUT"/ladder/*,seed=0/ --table=runs/results/probe.md
