#!/usr/bin/env bash
# Runs the same workloads against deltasync and etcd on this machine, RUNS
# times each with fresh servers and stores, and prints medians side by side.
#
#   scripts/bench-vs-etcd.sh                 # every workload, 3 runs (~30 min)
#   RUNS=5 WORKLOADS="push1 pull" scripts/bench-vs-etcd.sh
#   WORKLOADS=subscribe SUB_RATE=100 scripts/bench-vs-etcd.sh   # below saturation
#   RUNS=3 WORKLOADS="h2ping h2push1 h2push100" scripts/bench-vs-etcd.sh   # the h2load view
#
# Workloads: ping (64 clients calling grpc.health.v1 Check: the ceiling for
# any unary call on this machine), push1 (64 clients, 1 mutation/push), push100 (16 clients, 100
# mutations/push), pull (DOCS documents from 0 in pages of 1000), catchup
# (DOCS documents on one Subscribe/Watch from the start), subscribe
# (1000 subscribers, 1000 writes/s), soak (SOAK_STREAMS idle streams: server
# memory per stream, then exactly-once delivery to all of them), and the
# h2load view of ping, push1 and push100 (h2ping h2push1 h2push100; see
# scripts/bench-h2load.sh).
# Needs root or sudo the first time: installs etcd-server (and protoc, which
# the etcd client crate's build needs) from Debian's packages.
set -euo pipefail
cd "$(dirname "$0")/.."

RUNS=${RUNS:-3}
WORKLOADS=${WORKLOADS:-"h2ping h2push1 h2push100 ping push1 push100 pull catchup subscribe soak"}
DURATION=${DURATION:-10s}
DOCS=${DOCS:-1000000}
SOAK_STREAMS=${SOAK_STREAMS:-10000}

PACKAGES="etcd:etcd-server"
# shellcheck source=scripts/bench-lib.sh
. scripts/bench-lib.sh
# shellcheck source=scripts/bench-h2load.sh
. scripts/bench-h2load.sh

start_deltasync() {
  local port; port=$(free_port)
  "${DELTASYNC_BIN:-./target/release/deltasync}" --listen "127.0.0.1:$port" --data-dir "$work/ds-$1" --durability fsync > "$work/ds-$1.log" 2>&1 &
  ds_pid=$!; pids+=("$ds_pid"); ds_url="http://127.0.0.1:$port"; wait_port "$port"
}
start_etcd() {
  local port peer; port=$(free_port); peer=$(free_port)
  # etcd fsyncs its WAL before acknowledging, like deltasync's default.
  etcd --name bench --data-dir "$work/etcd-$1" --quota-backend-bytes 8589934592 \
    --listen-client-urls "http://127.0.0.1:$port" --advertise-client-urls "http://127.0.0.1:$port" \
    --listen-peer-urls "http://127.0.0.1:$peer" --initial-advertise-peer-urls "http://127.0.0.1:$peer" \
    --initial-cluster "bench=http://127.0.0.1:$peer" > "$work/etcd-$1.log" 2>&1 &
  etcd_pid=$!; pids+=("$etcd_pid"); etcd_url="http://127.0.0.1:$port"; wait_port "$port"
}
stop() { kill "$1" 2> /dev/null || true; wait "$1" 2> /dev/null || true; }

args_for() {
  case $1 in
    ping) echo "ping --clients 64 --duration $DURATION" ;;
    push1) echo "push --clients 64 --batch 1 --body 256 --duration $DURATION" ;;
    push100) echo "push --clients 16 --batch 100 --body 256 --duration $DURATION" ;;
    pull) echo "pull --docs $DOCS --page 1000 --body 256" ;;
    catchup) echo "catchup --docs $DOCS --body 256" ;;
    subscribe) echo "subscribe --subscribers 1000 --rate ${SUB_RATE:-1000} --body 256 --duration $DURATION --connections 10" ;;
    soak) echo "soak --streams $SOAK_STREAMS --connections 100 --writes 100" ;;
    *) echo "unknown workload $1" >&2; exit 1 ;;
  esac
}

for run in $(seq 1 "$RUNS"); do
  for w in $WORKLOADS; do
    for target in deltasync etcd; do
      id="$w-$target-$run"
      if [ "$target" = deltasync ]; then start_deltasync "$id"; url=$ds_url; pid=$ds_pid; else start_etcd "$id"; url=$etcd_url; pid=$etcd_pid; fi
      echo "== run $run/$RUNS: $w on $target" >&2
      if [[ $w == h2* ]]; then
        if line=$(h2_run "$w" "$target" "$url"); then
          echo "run=$run name=$w $line" | tee -a "$results" >&2
        else
          echo "run=$run name=$w RESULT target=$target failed=1" | tee -a "$results" >&2
        fi
        stop "$pid"
        continue
      fi
      # shellcheck disable=SC2046
      if line=$("$bench" --target "$target" --endpoint "$url" --server-pid "$pid" $(args_for "$w") | grep '^RESULT'); then
        echo "run=$run name=$w $line" | tee -a "$results" >&2
      else
        echo "run=$run name=$w RESULT target=$target failed=1" | tee -a "$results" >&2
      fi
      stop "$pid"
    done
  done
done

echo
echo "Machine: $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB; $(etcd --version | head -1); runs: $RUNS (medians)"
python3 - "$results" << 'PY'
import re, statistics, sys
from collections import defaultdict
rows = defaultdict(lambda: defaultdict(list))
for line in open(sys.argv[1]):
    kv = dict(re.findall(r"(\w+)=(\S+)", line))
    if kv.get("failed"):
        continue
    target = kv["target"].lower()
    for k, v in kv.items():
        try:
            rows[(kv["name"], target)][k].append(float(v))
        except ValueError:
            pass
metrics = {
    "h2ping": [("calls_per_s", "h2load: checks/s (ceiling)", True), ("p99_us", "p99 µs", False)],
    "h2push1": [("calls_per_s", "h2load: pushes/s", True), ("p99_us", "p99 µs", False)],
    "h2push100": [("docs_per_s", "h2load: docs/s", True), ("p99_us", "p99 µs", False)],
    "ping": [("calls_per_s", "health checks/s (ceiling)", True), ("p99_us", "p99 µs", False)],
    "push1": [("requests_per_s", "pushes/s", True), ("p99_us", "p99 µs", False)],
    "push100": [("docs_per_s", "docs/s", True), ("p99_us", "p99 µs", False)],
    "pull": [("docs_per_s", "docs/s", True)],
    "catchup": [("docs_per_s", "docs/s on one stream from 0", True)],
    "subscribe": [("p50_us", "p50 µs", False), ("p99_us", "p99 µs", False), ("server_rss_kb", "server RSS kB", False)],
    "soak": [("kb_per_stream", "server kB per idle stream", False), ("p99_us", "p99 µs", False)],
}
print(f"{'workload':<10} {'metric':<28} {'deltasync':>12} {'etcd':>12} {'ratio':>8}")
for name, ms in metrics.items():
    for key, label, higher in ms:
        d = rows[(name, "deltasync")].get(key)
        e = rows[(name, "etcd")].get(key)
        if not d and not e:
            continue
        dm = statistics.median(d) if d else float("nan")
        em = statistics.median(e) if e else float("nan")
        ratio = (dm / em if higher else em / dm) if d and e and dm and em else float("nan")
        print(f"{name:<10} {label:<28} {dm:>12.1f} {em:>12.1f} {ratio:>7.2f}x")
# The same server's push1 against its own no-op ceiling.
for client, push, ping, key in [("h2load", "h2push1", "h2ping", "calls_per_s"), ("bench", "push1", "ping", None)]:
    for target in ("deltasync", "etcd"):
        p = rows[(push, target)].get(key or "requests_per_s")
        c = rows[(ping, target)].get("calls_per_s")
        if p and c:
            print(f"{target}: push1 at {100 * statistics.median(p) / statistics.median(c):.0f}% of its own no-op call rate ({client})")
print("ratio: how many times better deltasync is (throughput: ds/etcd; latency and memory: etcd/ds)")
PY
