#!/usr/bin/env bash
# A three-agent cluster on one machine, started piece by piece as on a real LAN.
# Needs mosquitto (make test installs it) and `make install`.
set -euo pipefail
BROKER=${BROKER:-mqtt://127.0.0.1:1883}
HR=${HR:-.venv/bin/homering}
mosquitto -p 1883 >/dev/null 2>&1 &
trap 'kill $(jobs -p) 2>/dev/null' EXIT
sleep 0.5
for i in 0 1 2; do $HR agent --broker "$BROKER" --name "dev$i" & done
$HR controller --broker "$BROKER" --model smollm2 --agents 3 &
$HR chat --broker "$BROKER"
