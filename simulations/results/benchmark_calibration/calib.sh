#!/usr/bin/env bash
# calibration runs: tweets, MiniLM-L6, centralised-like (1 client, iid)
cd "$(dirname "$0")/../../.."
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
export FLWR_HOME=$(mktemp -d)
OUT=simulations/results/benchmark_calibration
BASE=(--set 'data.dataset="tweets"' --set 'data.partitioner="iid"' --set federation.clients=1
      --set federation.clients_per_round=1 --set federation.rounds=10 --set train.local_steps=30
      --set 'simulation.engine="inprocess"' --set eval.every=2)
run() {  # name, extra sets...
  name=$1; shift
  [ -f runs/calib/$name/summary.json ] && return
  echo "== $name $(date -u +%T) load $(cut -d' ' -f1 /proc/loadavg)" >> $OUT/log.txt
  /usr/bin/time -f "$name wall %e s" -a -o $OUT/times.txt .venv/bin/fedpeft simulate --out runs/calib/$name "${BASE[@]}" "$@" > runs/calib/$name.log 2>&1
  echo "   end $(date -u +%T) load $(cut -d' ' -f1 /proc/loadavg)" >> $OUT/log.txt
}
mkdir -p runs/calib
for spec in "$@"; do eval "run $spec"; done
