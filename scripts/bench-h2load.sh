# The h2load view of the unary workloads (sourced by bench-vs-etcd.sh, not
# run): h2load, a lean C HTTP/2 client, sends the same pre-encoded gRPC
# request over and over, so the server is the bottleneck rather than the
# bench client (which shares the two cores with it).
#
# Workloads (each against deltasync and etcd in turn):
#   h2ping     64 connections calling grpc.health.v1 Check: the no-op
#              ceiling of each server
#   h2push1    64 connections, a Push of 1 put / an etcd Put
#   h2push100  16 connections, a Push of 100 puts / an etcd Txn of 100 Puts
#
# Every request is the same bytes, so every push1 writes the same document
# (a "hot document": each push makes a new version of it) and every push100
# the same 100 documents; etcd gets the same keys. The bench client's push
# workloads write distinct documents and stay the second view.
#
# h2load counts a call as succeeded on HTTP 200, which gRPC errors also
# answer with (the status is in the trailers). So h2load sends a fixed
# number of calls (-n), and afterwards the server must have applied exactly
# that many writes: deltasync's head seq (one seq per put) and etcd's
# revision (one per Put or Txn) are checked, and a mismatch fails the run.
#
# Knobs: H2_CALLS (calls per push1/ping run, default 200000), H2_BATCHES
# (calls per push100 run, default 4000).

H2_CALLS=${H2_CALLS:-200000}
H2_BATCHES=${H2_BATCHES:-4000}
command -v h2load > /dev/null || {
  sudo_if_needed apt-get update -qq
  sudo_if_needed apt-get install -y -qq nghttp2-client > /dev/null
}

# The request bodies, hand-encoded protobuf in gRPC's framing (a 5-byte
# prefix: not compressed, big-endian length). The document is the bench
# client's: {"v": 256 characters}.
h2_bodies() {
  python3 - "$1" << 'PY'
import struct, sys
def varint(n):
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | 0x80 if n else b)
        if not n:
            return bytes(out)
def field(tag, payload):  # length-delimited
    return varint(tag << 3 | 2) + varint(len(payload)) + payload
def frame(msg):
    return b"\0" + struct.pack(">I", len(msg)) + msg
raw = b"x" * 256
# google.protobuf.Struct: map entry (key 1, Value 2 {string_value 3}).
body = field(1, field(1, b"v") + field(2, field(3, raw)))
# deltasync.v1.Mutation: collection 2, id 3, put 5; PushRequest.mutations 2.
push = lambda ids: b"".join(field(2, field(2, b"bench") + field(3, i.encode()) + field(5, body)) for i in ids)
# etcdserverpb.PutRequest: key 1, value 2; TxnRequest.success 2 of RequestOp.request_put 2.
put = lambda k: field(1, b"bench/" + k.encode()) + field(2, raw)
txn = lambda ks: b"".join(field(2, field(2, put(k))) for k in ks)
ids = ["hot-%03d" % i for i in range(100)]
for name, msg in [("push1", push(ids[:1])), ("push100", push(ids)), ("put1", put(ids[0])),
                  ("txn100", txn(ids)), ("check", b"")]:
    open(f"{sys.argv[1]}/{name}.bin", "wb").write(frame(msg))
PY
}

# Writes applied so far: deltasync's head seq, etcd's revision minus the
# initial one.
h2_applied() {
  if [ "$1" = deltasync ]; then
    ./target/release/deltasync status --endpoints "$2" -w json | python3 -c 'import json,sys; print(int(json.load(sys.stdin).get("head", 0)))'
  else
    curl -s -X POST "$2/v3/kv/range" -d '{"key":"AA=="}' | python3 -c 'import json,sys; print(int(json.load(sys.stdin)["header"]["revision"]) - 1)'
  fi
}

# h2_run WORKLOAD TARGET URL: one h2load run; prints a RESULT line.
h2_run() {
  local w=$1 target=$2 url=$3 path body conns calls per_call
  [ -f "$work/check.bin" ] || h2_bodies "$work"
  case "$w/$target" in
    h2ping/*) path=/grpc.health.v1.Health/Check body=check conns=64 calls=$H2_CALLS per_call=0 ;;
    h2push1/deltasync) path=/deltasync.v1.SyncService/Push body=push1 conns=64 calls=$H2_CALLS per_call=1 ;;
    h2push1/etcd) path=/etcdserverpb.KV/Put body=put1 conns=64 calls=$H2_CALLS per_call=1 ;;
    h2push100/deltasync) path=/deltasync.v1.SyncService/Push body=push100 conns=16 calls=$H2_BATCHES per_call=100 ;;
    # One revision per Txn, however many Puts it holds.
    h2push100/etcd) path=/etcdserverpb.KV/Txn body=txn100 conns=16 calls=$H2_BATCHES per_call=1 ;;
    *) echo "unknown h2load workload $w" >&2; return 1 ;;
  esac
  local before out log="$work/h2-$w-$target.log"
  before=$(h2_applied "$target" "$url") || return 1
  out=$(h2load -n "$calls" -c "$conns" -m 1 -t 1 -H 'content-type: application/grpc' -H 'te: trailers' \
    -d "$work/$body.bin" --log-file "$log" "$url$path")
  local secs ok applied
  secs=$(sed -n 's/^finished in \([0-9.]*\)\(m\?s\),.*/\1 \2/p' <<< "$out" | awk '{print ($2 == "ms") ? $1 / 1000 : $1}')
  ok=$(sed -n 's/^requests: .* \([0-9]*\) succeeded.*/\1/p' <<< "$out")
  applied=$(h2_applied "$target" "$url") || return 1
  applied=$((applied - before))
  if [ "$ok" != "$calls" ] || [ "$applied" != $((calls * per_call)) ]; then
    echo "h2load $w on $target: $ok of $calls succeeded, $applied writes applied (want $((calls * per_call)))" >&2
    return 1
  fi
  # Per-call latency from h2load's log (third column: µs to the response's end).
  local p50 p99
  read -r p50 p99 < <(cut -f3 "$log" | sort -n | awk '{v[NR] = $1} END {print v[int(NR * 0.5)], v[int(NR * 0.99)]}')
  awk -v t="$target" -v c="$calls" -v s="$secs" -v d="$per_call" -v p50="$p50" -v p99="$p99" -v w="$w" 'BEGIN {
    docs = (w == "h2push100") ? 100 : 1
    printf "RESULT target=%s client=h2load calls=%d secs=%.3f calls_per_s=%.1f docs_per_s=%.1f p50_us=%d p99_us=%d\n", t, c, s, c / s, c * docs / s, p50, p99 }'
}
