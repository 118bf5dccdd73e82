#!/usr/bin/env bash
# The label-budget study as it was run for docs/study/: the same runs as the one `seg study` command at the end,
# two at a time on one thread each (a 2-core machine); each shard rewrites OUT/report.md for its runs, the last command
# writes it for all. Rerun it to continue after an interruption: finished
# runs are skipped, a partly trained one resumes from its latest checkpoint.
#   usage: docs/study/run_budgets.sh DATA OUT
set -euo pipefail
DATA=$1 OUT=$2
EXPS=(study-pcrl-vnet study-contrastive-vnet study-scratch-vnet)
mkdir -p "$OUT/logs"
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1

pretrain() {  # one shared pretraining run, where `seg study` would make it; a lock makes its fine-tunings wait
    local exp=$1 run=$OUT/$1/pretrain-seed0
    if [ -e "$run/checkpoint_latest.pt" ]; then resume=(--resume); else resume=(-e "$exp"); fi
    flock "$OUT/$exp.lock" seg run pretrain "${resume[@]}" --data "$DATA" --out "$run"
}
budgets() {  # one experiment at one fine-tuning seed: budgets 1, 2 and 4
    flock "$OUT/$1.lock" true
    seg study --experiments "$1" --data "$DATA" --out "$OUT" --seeds "$2" --pretrain-seeds 0 --labels 1,2,4 --val-cases 2
}
export -f pretrain budgets; export DATA OUT

{
    echo "pretrain study-pcrl-vnet"
    echo "pretrain study-contrastive-vnet"
    for seed in 0 1 2; do for exp in study-scratch-vnet study-contrastive-vnet study-pcrl-vnet; do
        echo "budgets $exp $seed"; done; done
} | xargs -P 2 -I{} bash -c '{} > "$OUT/logs/$(echo {} | tr " " -).log" 2>&1'

seg study --experiments "$(IFS=,; echo "${EXPS[*]}")" --data "$DATA" --out "$OUT" --seeds 0,1,2 --pretrain-seeds 0 \
    --labels 1,2,4 --val-cases 2
