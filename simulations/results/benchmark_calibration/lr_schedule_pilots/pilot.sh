#!/usr/bin/env bash
# Does a cosine learning-rate schedule steady (b5)? (README beside this file.) (b5)'s setting:
# 20 Newsgroups, BERT pooler, alpha 32, ranks 2:0.5,16:0.5, iid over 10 clients, all 10 every
# round, 10 rounds x 4 local steps of batch 16, scored on the 1,000-post validation split.
#   pilot.sh "NAME --set k=v ..." ...
# Each NAME runs once into runs/lrpilot/NAME (skipped when finished).
cd "$(dirname "$0")/../../../.."
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
export FLWR_HOME=$(mktemp -d)
COMMON=(--set 'data.dataset="newsgroups"' --set 'data.partitioner="iid"'
 --set federation.clients=10 --set federation.clients_per_round=10 --set federation.rounds=10
 --set train.local_steps=4 --set model.rank=16 --set model.alpha=32
 --set 'federation.rank_mix="2:0.5,16:0.5"' --set eval.every=2 --set 'simulation.engine="inprocess"'
 --set data.validation_size=1000 --set 'eval.split="validation"')
mkdir -p runs/lrpilot
for spec in "$@"; do eval "set -- $spec"; name=$1; shift
  [ -f runs/lrpilot/$name/summary.json ] && continue
  /usr/bin/time -f "$name wall %e s" -a -o runs/lrpilot/times.txt .venv/bin/fedpeft simulate \
    --out runs/lrpilot/$name "${COMMON[@]}" "$@" > runs/lrpilot/$name.log 2>&1
done
