#!/usr/bin/env bash
# (a2)'s federation under (c2)'s DP-SGD: usage pilot2.sh "name --set ..." ...
cd /work/main
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
export FLWR_HOME=$(mktemp -d)
BASE=(--set 'data.dataset="tweets"' --set 'data.partitioner="dirichlet"' --set data.dirichlet_alpha=0.2
 --set data.min_partition_size=1 --set federation.clients=10 --set federation.clients_per_round=10
 --set federation.rounds=10 --set train.local_steps=4 --set train.batch_size=16 --set train.head_lr=0.008 --set 'model.pooling="mean"'
 --set 'model.target_modules=["layer.4.attention.self.value", "layer.5.attention.self.value"]'
 --set privacy.enabled=true --set privacy.epsilon=8.0 --set privacy.delta=1e-5 --set eval.every=2
 --set 'simulation.engine="inprocess"' --set data.validation_size=1000 --set 'eval.split="validation"')
for spec in "$@"; do eval "set -- $spec"; name=$1; shift
  [ -f runs/dpnoisy/$name/summary.json ] && continue
  /usr/bin/time -f "$name wall %e s" -a -o runs/dpnoisy/times.txt .venv/bin/fedpeft simulate --out runs/dpnoisy/$name "${BASE[@]}" "$@" > runs/dpnoisy/$name.log 2>&1
done
