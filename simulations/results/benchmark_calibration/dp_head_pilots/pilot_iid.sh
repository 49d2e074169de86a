#!/usr/bin/env bash
# usage: pilot.sh BATCH STEPS name "--set ..." ...
cd /work/main
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
export FLWR_HOME=$(mktemp -d)
B=$1; S=$2; shift 2
BASE=(--set 'data.dataset="tweets"' --set 'data.partitioner="iid"'
 --set federation.clients=2 --set federation.clients_per_round=2
 --set federation.rounds=3 --set train.local_steps=$S --set train.batch_size=$B --set train.head_lr=0.008 --set 'model.pooling="mean"'
 --set 'model.target_modules=["layer.4.attention.self.value", "layer.5.attention.self.value"]'
 --set privacy.enabled=true --set privacy.epsilon=8.0 --set privacy.delta=1e-5
 --set 'simulation.engine="inprocess"' --set data.validation_size=1000 --set 'eval.split="validation"')
for spec in "$@"; do eval "set -- $spec"; name=$1; shift
  [ -f runs/dpnoisy/$name/summary.json ] && continue
  /usr/bin/time -f "$name wall %e s" -a -o runs/dpnoisy/times.txt .venv/bin/fedpeft simulate --out runs/dpnoisy/$name "${BASE[@]}" "$@" > runs/dpnoisy/$name.log 2>&1
done
