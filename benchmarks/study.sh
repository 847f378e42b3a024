#!/usr/bin/env bash
# The "bag of tricks" ablation: one run per trick, then one --compare table of them all.
#
#   bash benchmarks/study.sh                  # on data/: the default recipe (ImageNet ResNet-18, 256 px, batch 256)
#   bash benchmarks/study.sh --demo --amp     # a CPU-sized version on the generated demo data
#   RUNS="baseline cosine mixup" bash benchmarks/study.sh --epochs 20
#   SEEDS="1 2 3" bash benchmarks/study.sh --demo --amp   # each run with --seed 1, 2 and 3: study_<run>_s<seed>
#
# Flags given to the script go to every run, after the run's own (so the last one given wins);
# a --checkpoint_dir (or --checkpoint-dir, --output) among them is where the table looks too. The first three runs build the
# schedule up: a constant LR, + linear warmup, + cosine decay (= the default recipe); each later
# run adds one trick to the default recipe. EMA_DECAY and MODEL choose the EMA's decay (it
# averages about the last 1 / (1 - D) steps: 0.998 suits the Intel data's ~900 steps in 20
# epochs, a demo run wants ~0.9) and the other architecture. SEEDS runs each trick once per seed,
# so --compare can group the seeds of a trick and put a t-interval on its difference from the first.
set -euo pipefail
cd "$(dirname "$0")/.."
EMA_DECAY=${EMA_DECAY:-0.998}
MODEL=${MODEL:-resnet50}
ALL="baseline warmup cosine smoothing mixup cutmix randaugment ema model"
RUNS=${RUNS:-$ALL}
SEEDS=${SEEDS:-}

trick() {  # the flags of one run
    case $1 in
        baseline)    echo "--warmup_epochs 0 --lr_schedule constant" ;;
        warmup)      echo "--lr_schedule constant" ;;
        cosine)      echo "" ;;
        smoothing)   echo "--label_smoothing 0.1" ;;
        mixup)       echo "--mixup_alpha 0.2" ;;
        cutmix)      echo "--cutmix_alpha 1.0" ;;
        randaugment) echo "--auto_augment randaugment" ;;
        ema)         echo "--ema_decay $EMA_DECAY" ;;
        model)       echo "--model $MODEL" ;;
        *)           return 1 ;;
    esac
}
for run in $RUNS; do  # every name is checked before anything trains
    trick "$run" > /dev/null || { echo "unknown run $run; the runs: $ALL" >&2; exit 2; }
done
compare_dir=()
args=("$@")
for i in "${!args[@]}"; do
    case ${args[$i]} in
        --checkpoint_dir|--checkpoint-dir|--output) compare_dir=(--checkpoint_dir "${args[$((i + 1))]}") ;;
        --checkpoint_dir=*|--checkpoint-dir=*|--output=*) compare_dir=("--checkpoint_dir=${args[$i]#*=}") ;;
        --seed|--seed=*) if [ -n "$SEEDS" ]; then echo "SEEDS gives the seeds; drop --seed" >&2; exit 2; fi ;;
    esac
done
seen=""
for seed in $SEEDS; do
    case $seed in ''|*[!0-9]*) echo "SEEDS takes whole numbers, got $seed" >&2; exit 2 ;; esac
    case " $seen " in *" $seed "*) echo "SEEDS names $seed twice; name each seed once" >&2; exit 2 ;; esac
    seen="$seen $seed"
done

names=()
for run in $RUNS; do
    for seed in ${SEEDS:-none}; do
        name="study_$run" seed_flags=()
        if [ "$seed" != none ]; then name="study_${run}_s$seed" seed_flags=(--seed "$seed"); fi
        # shellcheck disable=SC2046  # (a trick is several words)
        python main.py --checkpoint_name "$name" --overwrite --no_progress "${seed_flags[@]}" $(trick "$run") "$@"
        names+=("$name")
    done
done
python main.py --compare "${names[@]}" "${compare_dir[@]}"
