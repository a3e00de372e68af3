#!/usr/bin/env bash
# Copies the canonical alert rules and dashboard from ops/ into the Helm chart, which
# must carry its own copies (a packaged chart cannot reach outside its directory).
# tests/test_deploy.py fails while the copies differ.
set -euo pipefail
cd "$(dirname "$0")/../.."
chart=helm/moshimoshi/files
mkdir -p "$chart/prometheus" "$chart/grafana"
cp ops/prometheus/alerts.yaml "$chart/prometheus/alerts.yaml"
cp ops/grafana/moshimoshi.json "$chart/grafana/moshimoshi.json"
echo "synced ops/prometheus/alerts.yaml and ops/grafana/moshimoshi.json into $chart"
