# Shared by the benchmark scripts (sourced, not run): installs what the
# bench build needs, builds it, and gives a work directory, cleanup of
# started servers, free ports and waiting for a port to open.
# PACKAGES: Debian packages to install if their commands are missing
# (set by the caller before sourcing, as "command:package ...").

sudo_if_needed() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
missing=()
for pair in ${PACKAGES:-} protoc:protobuf-compiler; do
  command -v "${pair%%:*}" > /dev/null || missing+=("${pair#*:}")
done
if [ "${#missing[@]}" -gt 0 ]; then
  sudo_if_needed apt-get update -qq
  sudo_if_needed apt-get install -y -qq "${missing[@]}" > /dev/null
fi
cargo build --release --features bench --quiet
bench=./target/release/deltasync-bench
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill -9 "$p" 2> /dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
results="$work/results.txt"
: > "$results"

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 1 200); do (exec 3<> "/dev/tcp/127.0.0.1/$1") 2> /dev/null && return 0; sleep 0.05; done; echo "port $1 never opened" >&2; return 1; }
