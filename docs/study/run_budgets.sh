#!/usr/bin/env bash
# The label-budget study of docs/study/, from nothing to report.md: DATA and OUT are folders to create (or to
# continue: rerunning continues, finished runs are skipped, a partly trained one resumes from its checkpoint).
#   usage: docs/study/run_budgets.sh DATA OUT
set -euo pipefail
DATA=$1 OUT=$2
[ -e "$DATA/dataset.json" ] || seg data synth "$DATA" --labeled 8 --unlabeled 24 --test 8 --seed 0
seg study --experiments study-pcrl-vnet,study-contrastive-vnet,study-scratch-vnet --data "$DATA" --out "$OUT" \
    --seeds 0,1,2 --pretrain-seeds 0 --labels 1,2,4 --val-cases 4 --jobs 2
