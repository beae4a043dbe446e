#!/usr/bin/env bash
# Replication benchmarks on this machine: a primary and two replicas, all
# fsyncing, fresh stores each round, RUNS rounds, medians printed.
#
#   scripts/bench-replication.sh                  # 3 rounds, 10 s each
#   RUNS=5 DURATION=20s scripts/bench-replication.sh
#
# replicate: 16 clients push 100 mutations per request to the primary (the
#   push100 load), as fast as it answers; the primary's Status, polled
#   every millisecond, tells when each replica acknowledged what: replica
#   apply rate and lag from the primary's answer to the replica having
#   durably applied it (p50/p99).
# replicate_paced: the same load held at PACED_RATE documents/s (20000),
#   below what three servers and the load generator saturate on this
#   machine's cores: replication's own lag.
# sync: 64 clients push 1 mutation (push1) to a primary followed by one
#   replica, with --sync-replicas 0 and 1 alternating: what waiting for a
#   replica's durable ack costs in throughput and p99.
set -euo pipefail
cd "$(dirname "$0")/.."

RUNS=${RUNS:-3}
DURATION=${DURATION:-10s}
PACED_RATE=${PACED_RATE:-20000}
# shellcheck source=scripts/bench-lib.sh
. scripts/bench-lib.sh
bin=./target/release/deltasync
# start NAME [flags...]: sets url and pid.
start() {
  local name=$1 port; shift; port=$(free_port)
  "$bin" --listen "127.0.0.1:$port" --data-dir "$work/$name" "$@" > "$work/$name.log" 2>&1 &
  pid=$!; pids+=("$pid"); url="http://127.0.0.1:$port"; wait_port "$port"
}
stop_all() { for p in "${pids[@]}"; do kill "$p" 2> /dev/null || true; wait "$p" 2> /dev/null || true; done; pids=(); }
record() { echo "run=$1 name=$2 $3" | tee -a "$results" >&2; }

for run in $(seq 1 "$RUNS"); do
  for rate in 0 "$PACED_RATE"; do
    name=replicate; [ "$rate" = 0 ] || name=replicate_paced
    echo "== round $run/$RUNS: $name" >&2
    start "p-$run-$rate"; primary=$url; ppid=$pid
    start "r1-$run-$rate" --replicate-from "$primary"; r1=$url
    start "r2-$run-$rate" --replicate-from "$primary"; r2=$url
    line=$("$bench" --endpoint "$primary" --server-pid "$ppid" replicate --replicas "$r1,$r2" \
      --clients 16 --batch 100 --duration "$DURATION" --rate "$rate" | grep '^RESULT')
    record "$run" "$name" "$line"
    stop_all
  done
  for sync in 0 1; do
    echo "== round $run/$RUNS: push1 with --sync-replicas $sync" >&2
    start "s$sync-p-$run" --sync-replicas "$sync"; primary=$url; ppid=$pid
    start "s$sync-r-$run" --replicate-from "$primary"
    line=$("$bench" --endpoint "$primary" --server-pid "$ppid" push --clients 64 --batch 1 \
      --body 256 --duration "$DURATION" --tracked | grep '^RESULT')
    record "$run" "sync$sync" "$line"
    stop_all
  done
done

echo
echo "Machine: $(nproc) cores; runs: $RUNS (medians)"
python3 - "$results" << 'PY'
import re, statistics, sys
from collections import defaultdict
rows = defaultdict(lambda: defaultdict(list))
for line in open(sys.argv[1]):
    kv = dict(re.findall(r"(\w+)=(\S+)", line))
    for k, v in kv.items():
        for i, part in enumerate(v.split(",")):
            try:
                rows[kv["name"]][k if "," not in v else f"{k}[{i}]"].append(float(part))
            except ValueError:
                pass
med = lambda name, key: statistics.median(rows[name][key]) if rows[name].get(key) else float("nan")
for name, title in [("replicate", "replicate (push100 load, closed loop), 2 replicas:"),
                    ("replicate_paced", "replicate_paced (push100 load paced), 2 replicas:")]:
    print(title)
    print(f"  primary            {med(name, 'docs_per_s'):>10.0f} docs/s")
    for i in range(2):
        print(f"  replica {i + 1} applied {med(name, f'replica_seqs_per_s[{i}]'):>10.0f} seqs/s")
    print(f"  lag p50            {med(name, 'lag_p50_us') / 1000:>10.1f} ms")
    print(f"  lag p99            {med(name, 'lag_p99_us') / 1000:>10.1f} ms  (goal: under 50 ms)")
    print(f"  drained after load {med(name, 'drain_ms'):>10.0f} ms")
a, s = med("sync0", "requests_per_s"), med("sync1", "requests_per_s")
print("push1, 64 clients, one replica attached:")
print(f"  --sync-replicas 0  {a:>10.0f} pushes/s, p99 {med('sync0', 'p99_us') / 1000:.1f} ms")
print(f"  --sync-replicas 1  {s:>10.0f} pushes/s, p99 {med('sync1', 'p99_us') / 1000:.1f} ms")
print(f"  cost of sync       {100 * (1 - s / a):>10.1f} % of throughput  (goal: at most 30 %)")
PY
