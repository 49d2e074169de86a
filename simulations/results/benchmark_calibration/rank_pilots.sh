#!/usr/bin/env bash
# The mixed-rank pilots after (b5) (each folder's README): 20 Newsgroups, BERT pooler, alpha 32,
# ranks 2:0.5,16:0.5, iid, every client every round, 10 rounds, scored on the 1,000-post
# validation split.
#   rank_pilots.sh silo "NAME --set k=v ..." ...  4 clients x 20 local steps (ranks_silo_pilots/)
#   rank_pilots.sh b5   "NAME --set k=v ..." ...  (b5)'s 10 clients x 4 steps (lr_schedule_pilots/)
# Each NAME runs once into runs/rankpilot/NAME or runs/lrpilot/NAME (skipped when finished).
cd "$(dirname "$0")/../../.."
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
export FLWR_HOME=$(mktemp -d)
case $1 in
  silo) OUT=runs/rankpilot; SETTING=(--set federation.clients=4 --set federation.clients_per_round=4
        --set train.local_steps=20) ;;
  b5) OUT=runs/lrpilot; SETTING=(--set federation.clients=10 --set federation.clients_per_round=10
        --set train.local_steps=4) ;;
  *) echo "usage: $0 silo|b5 \"NAME --set k=v ...\" ..." >&2; exit 2 ;;
esac
shift
COMMON=(--set 'data.dataset="newsgroups"' --set 'data.partitioner="iid"' --set federation.rounds=10
 --set model.rank=16 --set model.alpha=32 --set 'federation.rank_mix="2:0.5,16:0.5"'
 --set eval.every=2 --set 'simulation.engine="inprocess"'
 --set data.validation_size=1000 --set 'eval.split="validation"')
mkdir -p $OUT
for spec in "$@"; do eval "set -- $spec"; name=$1; shift
  [ -f $OUT/$name/summary.json ] && continue
  /usr/bin/time -f "$name wall %e s" -a -o $OUT/times.txt .venv/bin/fedpeft simulate \
    --out $OUT/$name "${COMMON[@]}" "${SETTING[@]}" "$@" > $OUT/$name.log 2>&1
done
