#!/usr/bin/env bash
# The DP-SGD pilots with the task head held equal (README beside this file):
#   pilot.sh iid  "NAME --set k=v ..." ...   (c)'s 2 iid clients, Poisson batch 16, 3 rounds x 24 steps
#   pilot.sh skew "NAME --set k=v ..." ...   (a2)'s Dirichlet(0.2) over 10 clients, batch 16, 10 x 4 steps
# Each NAME runs once into runs/dpnoisy/NAME (skipped when finished), scored on the validation split.
cd "$(dirname "$0")/../../../.."
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
export FLWR_HOME=$(mktemp -d)
COMMON=(--set 'data.dataset="tweets"' --set train.batch_size=16 --set train.head_lr=0.008
 --set 'model.pooling="mean"'
 --set 'model.target_modules=["layer.4.attention.self.value", "layer.5.attention.self.value"]'
 --set privacy.enabled=true --set privacy.epsilon=8.0 --set privacy.delta=1e-5
 --set 'simulation.engine="inprocess"' --set data.validation_size=1000 --set 'eval.split="validation"')
case $1 in
  iid) SETTING=(--set 'data.partitioner="iid"' --set federation.clients=2
        --set federation.clients_per_round=2 --set federation.rounds=3 --set train.local_steps=24) ;;
  skew) SETTING=(--set 'data.partitioner="dirichlet"' --set data.dirichlet_alpha=0.2
        --set data.min_partition_size=1 --set federation.clients=10
        --set federation.clients_per_round=10 --set federation.rounds=10
        --set train.local_steps=4 --set eval.every=2) ;;
  *) echo "usage: $0 iid|skew \"NAME --set k=v ...\" ..." >&2; exit 2 ;;
esac
shift
mkdir -p runs/dpnoisy
for spec in "$@"; do eval "set -- $spec"; name=$1; shift
  [ -f runs/dpnoisy/$name/summary.json ] && continue
  /usr/bin/time -f "$name wall %e s" -a -o runs/dpnoisy/times.txt .venv/bin/fedpeft simulate \
    --out runs/dpnoisy/$name "${COMMON[@]}" "${SETTING[@]}" "$@" > runs/dpnoisy/$name.log 2>&1
done
