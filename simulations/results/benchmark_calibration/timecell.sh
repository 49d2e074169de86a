#!/usr/bin/env bash
# time one cell: name, then --set args
cd "$(dirname "$0")/../../.."
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
export FLWR_HOME=$(mktemp -d)
OUT=simulations/results/benchmark_calibration
name=$1; shift
l0=$(cut -d' ' -f1 /proc/loadavg)
/usr/bin/time -f "$name wall %e s (load at start $l0)" -a -o $OUT/times.txt .venv/bin/fedpeft simulate --out runs/calib/$name "$@" > runs/calib/$name.log 2>&1
