#!/usr/bin/env bash
# Copy each calibration run's small outputs (config, metrics, summary, console log) from
# runs/calib/<name>/ into simulations/results/benchmark_calibration/outputs/<name>.*
cd "$(dirname "$0")/../../.."
OUT=simulations/results/benchmark_calibration/outputs
mkdir -p $OUT
for d in runs/calib/*/; do
  name=$(basename "$d"); [ "$name" = old ] && continue
  [ -f "$d/summary.json" ] || continue
  cp "$d/config.toml" "$OUT/$name.config.toml"; cp "$d/metrics.jsonl" "$OUT/$name.metrics.jsonl"
  cp "$d/summary.json" "$OUT/$name.summary.json"; cp "runs/calib/$name.log" "$OUT/$name.log"
done
