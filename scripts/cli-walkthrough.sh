#!/usr/bin/env bash
# A walk-through of the deltasync CLI against a fresh server: put, get,
# patch, push, pull, watch (bounded), status, conflict, snapshot save and
# restore, all with -w json, each output checked and echoed to stderr (with
# `tee -a`: a plain `tee /dev/stderr` truncates a log file that stderr is
# redirected to). Builds nothing: the binary is $DELTASYNC_BIN, else
# target/release/deltasync. Exits non-zero on the first mismatch.
set -euo pipefail

BIN=${DELTASYNC_BIN:-target/release/deltasync}
[ -x "$BIN" ] || { echo "no binary at $BIN (cargo build --release, or set DELTASYNC_BIN)" >&2; exit 1; }
DIR=$(mktemp -d)
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$BIN" --listen "127.0.0.1:$PORT" --data-dir "$DIR/store" 2>"$DIR/server.log" &
SERVER=$!
trap 'kill "$SERVER" 2>/dev/null; wait "$SERVER" 2>/dev/null; rm -rf "$DIR"' EXIT

export DELTASYNC_ENDPOINTS="http://127.0.0.1:$PORT"
ds() { "$BIN" "$@" -w json; }
# check 'python expression over d (the JSON lines as a list)' < output
check() {
  python3 -c '
import json, sys
d = [json.loads(l) for l in sys.stdin if l.strip()]
if not eval(sys.argv[1]):
    sys.exit("mismatch: %s\n  got: %s" % (sys.argv[1], json.dumps(d)))' "$1"
}

# Wait (bounded) for the server to answer.
for _ in $(seq 100); do ds status >/dev/null 2>&1 && break; sleep 0.1; done
ds status >/dev/null

echo "== put"
ds put todos milk '{"title": "Buy milk", "done": false}' | tee -a /dev/stderr |
  check 'd[0]["outcome"] == "OUTCOME_APPLIED" and d[0]["document"]["version"] == "1"'

echo "== get"
ds get todos milk | tee -a /dev/stderr |
  check 'd[0]["body"] == {"title": "Buy milk", "done": False} and d[0]["seq"] == "1"'

echo "== patch against version 1"
ds patch todos milk '{"done": true}' --base-version 1 | tee -a /dev/stderr |
  check 'd[0]["document"]["version"] == "2" and d[0]["document"]["body"]["done"] is True'

echo "== a stale patch of the same field conflicts (exit 3)"
set +e
ds patch todos milk '{"done": "later"}' --base-version 1 >"$DIR/conflict.json"
code=$?
set -e
[ "$code" = 3 ] || { echo "expected exit 3, got $code" >&2; exit 1; }
check 'd[0]["outcome"] == "OUTCOME_CONFLICT" and d[0]["conflictingFields"] == ["done"]' <"$DIR/conflict.json"

echo "== push JSON lines from stdin"
printf '%s\n' \
  '{"collection": "todos", "id": "bread", "put": {"title": "Bread"}}' \
  '{"collection": "notes", "id": "n1", "put": {"text": "hello"}, "baseVersion": "0"}' \
  '{"collection": "todos", "id": "milk", "delete": {}}' |
  ds push -f - | tee -a /dev/stderr |
  check 'len(d) == 3 and all(r["outcome"] == "OUTCOME_APPLIED" for r in d)'

echo "== pull everything, then one collection"
ds pull | tee -a /dev/stderr |
  check '[x["id"] for x in d] == ["bread", "n1", "milk"] and d[2]["deleted"] is True'
ds pull --collection notes | check '[x["id"] for x in d] == ["n1"]'

echo "== watch from 0, bounded to 3 documents"
timeout 10 "$BIN" watch --since 0 --count 3 -w json | tee -a /dev/stderr |
  check '[x["seq"] for x in d] == ["3", "4", "5"]'

echo "== status"
ds status | tee -a /dev/stderr |
  check 'd[0]["role"] == "ROLE_PRIMARY" and d[0]["head"] == "5"'

echo "== snapshot save while serving, restore into a new data dir"
"$BIN" snapshot save "$DIR/backup.snap" | tee -a /dev/stderr |
  check 'd[0]["checkpoint"] == "5"'
"$BIN" snapshot restore "$DIR/backup.snap" --data-dir "$DIR/restored" | tee -a /dev/stderr |
  check 'd[0]["checkpoint"] == "5"'
[ -d "$DIR/restored" ] || { echo "no restored data dir" >&2; exit 1; }

echo "walk-through OK"
