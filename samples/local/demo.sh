#!/usr/bin/env bash
# Local demo (no cloud account): krun supervises a sample app with a sidecar, showing ordered
# start (sidecar ready -> app started -> app ready) and ordered drain on SIGTERM.
set -euo pipefail
cd "$(dirname "$0")/../.."

echo "== building krun (cargo build -p krun; the first build compiles every dependency and takes minutes)"
cargo build -p krun
krun=target/debug/krun

echo "== starting: krun -- python3 -m http.server 18080 (with the cache sidecar of samples/local/processes.yaml)"
KRUN_PROCESSES=samples/local/processes.yaml PORT_http=18080 KRUN_DRAIN_TIMEOUT=5s \
  "$krun" -- python3 -m http.server 18080 --bind 127.0.0.1 &
pid=$!

# Wait until the app answers (krun only reports it ready once it accepts on PORT_http).
curl -s --retry 100 --retry-delay 0 --retry-connrefused -o /dev/null http://127.0.0.1:18080/
echo "== the app answers: $(curl -s -o /dev/null -w 'HTTP %{http_code}' http://127.0.0.1:18080/)"

echo "== sending SIGTERM to krun (pid $pid): the app stops first, then the sidecar"
kill -TERM "$pid"
set +e
wait "$pid"
code=$?
set -e
echo "== krun exited with $code (the app's status: 128+15 because http.server dies of SIGTERM)"
