#!/usr/bin/env bash
# The mesh on one machine, no cloud account (`make demo`):
#   - a local CA in Istio's `cacerts` layout (openssl, EC P-256): krun mints each workload's
#     certificate from it (CA_ADDR=file:///dir), the clients get theirs from openssl;
#   - workload A (SPIFFE ID .../sa/echo) and workload B (.../sa/caller): samples/local/app.py,
#     each under krun with the builtin data plane;
#   - hgate, routing the mesh name echo.demo to krun A's tunnel port.
# Then three paths, each shown hop by hop with the time since the request started (read from
# the log lines of each hop):
#   (a) mesh client (openssl s_client, mTLS, SNI outbound_.8080_._.echo.demo.svc.cluster.local)
#       -> hgate -> HBONE -> krun A's tunnel port -> mTLS terminated by krun A -> app A;
#   (b) app B's request (curl through krun B's outbound proxy) -> HBONE over mTLS -> krun A's
#       HBONE port -> app A, with the SPIFFE IDs each side verified;
#   (c) a client whose certificate is not from the mesh CA: refused by krun A.
# Then it drains everything in order and checks each exit code.
#
# Settings: CARGO_TARGET_DIR (where the binaries are; default target/), KRUN_DEMO_NO_BUILD=1
# (use the binaries already built there). Needs openssl, curl and python3.
set -euo pipefail
cd "$(dirname "$0")/../.."
repo=$PWD
target=${CARGO_TARGET_DIR:-$repo/target}
case $target in /*) ;; *) target=$repo/$target ;; esac

if [ "${KRUN_DEMO_NO_BUILD:-}" != 1 ]; then
  echo "== building krun and hgate (cargo build; the first build compiles every dependency and takes minutes)"
  cargo build -p krun -p hgate --bins
fi
krun=$target/debug/krun
hgate=$target/debug/hgate
for need in "$krun" "$hgate"; do
  [ -x "$need" ] || { echo "demo: $need is missing: build it (cargo build -p krun -p hgate) or point CARGO_TARGET_DIR at your build" >&2; exit 1; }
done
for tool in openssl curl python3; do
  command -v "$tool" >/dev/null || { echo "demo: $tool is needed; install it (Debian: apt-get install $tool)" >&2; exit 1; }
done

demo_start=$(date +%s%N)
work=$(mktemp -d "${TMPDIR:-/tmp}/krun-demo.XXXXXX")
declare -A pid_of=()
# On any exit: SIGTERM to what is still running (krun then stops its app), SIGKILL to what
# has not exited 10 s later, then the temporary directory goes.
cleanup() {
  local code=$? pid left deadline=$((SECONDS + 10))
  for pid in "${pid_of[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  while :; do
    left=()
    for pid in "${pid_of[@]}"; do
      if kill -0 "$pid" 2>/dev/null; then left+=("$pid"); fi
    done
    [ "${#left[@]}" -gt 0 ] && [ "$SECONDS" -lt "$deadline" ] || break
    sleep 0.05
  done
  for pid in "${left[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
  exit "$code"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

fail() {
  echo "demo FAILED: $1" >&2
  for log in "$work"/*.log; do
    [ -e "$log" ] || continue
    echo "---- $(basename "$log")" >&2
    cat "$log" >&2
  done
  exit 1
}

# wait_for NAME PATTERN: waits until $work/NAME.log has a line matching PATTERN (grep -E) and
# prints it; fails the demo, showing the logs, if NAME exits first or after 20 seconds.
wait_for() {
  local log=$work/$1.log deadline=$((SECONDS + 20))
  until grep -E -m1 -- "$2" "$log" 2>/dev/null; do
    kill -0 "${pid_of[$1]}" 2>/dev/null || fail "$1 exited before logging '$2'"
    [ "$SECONDS" -lt "$deadline" ] || fail "no line matching '$2' in $1.log within 20 s"
    sleep 0.05
  done
}

# Nanoseconds since the epoch of a log line's leading RFC 3339 timestamp.
stamp_ns() { date -d "${1%% *}" +%s%N; }

# hop LOG FROM PATTERN LABEL: notes the first line of $work/LOG.log after line FROM matching
# PATTERN (grep -E) as a hop of the current path; fails the demo if there is none.
hop() {
  local line
  line=$(tail -n "+$(($2 + 1))" "$work/$1.log" | grep -E -m1 -- "$3") ||
    fail "hop '$4' did not happen (no '$3' in $1.log)"
  hop_rows+=("$(stamp_ns "$line") $4|${line#* }")
}

# show_hops T0: the hops noted since the last call, in time order, each with the time since T0.
show_hops() {
  printf '%s\n' "${hop_rows[@]}" | sort -n | while read -r ns rest; do
    awk -v d="$(((ns - $1) / 1000))" -v l="${rest%%|*}" -v s="${rest#*|}" \
      'BEGIN { printf "  %+8.1f ms  %-36s %s\n", d / 1000, l, s }'
  done
  hop_rows=()
}
hop_rows=()

lines() { wc -l <"$work/$1.log"; }
ms_since() { echo "$((($(date +%s%N) - $1) / 1000000)) ms"; }

# ---------------------------------------------------------------------------------------------
echo "== local CA (Istio cacerts layout, EC P-256) in $work/ca"
ca=$work/ca
mkdir -p "$ca"
ec_key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }
ec_key "$ca/root-key.pem"
openssl req -x509 -new -key "$ca/root-key.pem" -out "$ca/root-cert.pem" -days 1 \
  -subj "/O=krun demo/CN=krun demo root CA" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign"
# sign KEY_IN CSR_SUBJECT OUT EXTENSIONS [CA_CERT CA_KEY]: a certificate for KEY_IN.
sign() {
  openssl req -new -key "$1" -subj "$2" -out "$3.csr"
  openssl x509 -req -in "$3.csr" -CA "${5:-$ca/ca-cert.pem}" -CAkey "${6:-$ca/ca-key.pem}" \
    -set_serial "0x$(openssl rand -hex 8)" -days 1 -out "$3" -extfile <(printf '%b' "$4") 2>/dev/null
  rm -f "$3.csr"
}
ec_key "$ca/ca-key.pem"
sign "$ca/ca-key.pem" "/O=krun demo/CN=krun demo intermediate CA" "$ca/ca-cert.pem" \
  'basicConstraints=critical,CA:TRUE,pathlen:0\nkeyUsage=critical,keyCertSign,cRLSign\n' \
  "$ca/root-cert.pem" "$ca/root-key.pem"
cat "$ca/ca-cert.pem" "$ca/root-cert.pem" >"$ca/cert-chain.pem"
rm "$ca/root-key.pem" # krun needs only the intermediate's key, as istiod does
ls "$ca" | sed 's/^/   /'

leaf_ext() { printf 'basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth,serverAuth\nsubjectAltName=critical,URI:%s\n' "$1"; }
client_id=spiffe://cluster.local/ns/demo/sa/client
ec_key "$work/client-key.pem"
sign "$work/client-key.pem" "/O=krun demo" "$work/client-cert.pem" "$(leaf_ext "$client_id")"
echo "   mesh client certificate: $client_id (signed by the mesh CA)"
# The outsider claims the same SPIFFE ID, under a CA the mesh does not trust.
ec_key "$work/outsider-ca-key.pem"
openssl req -x509 -new -key "$work/outsider-ca-key.pem" -out "$work/outsider-ca.pem" -days 1 \
  -subj "/O=not the mesh/CN=some other CA" -addext "basicConstraints=critical,CA:TRUE"
ec_key "$work/outsider-key.pem"
sign "$work/outsider-key.pem" "/O=not the mesh" "$work/outsider-cert.pem" "$(leaf_ext "$client_id")" \
  "$work/outsider-ca.pem" "$work/outsider-ca-key.pem"
echo "   outsider certificate: $client_id too, but signed by another CA"

# ---------------------------------------------------------------------------------------------
read -r app_a hbone_a tunnel_a app_b outbound_b sni admin < <(python3 -c '
import socket
socks = [socket.socket() for _ in range(7)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))')

# start NAME COMMAND...: runs COMMAND in the background, output in $work/NAME.log.
start() {
  local name=$1
  shift
  "$@" >"$work/$name.log" 2>&1 &
  pid_of[$name]=$!
}

# A clean environment for each process, so settings from the caller's shell do not leak in:
# text logs, no traffic capture (this is the host's network namespace, shared with everything
# else on the machine), debug lines for the hops the demo shows.
base_env=(env -i "PATH=$PATH" "HOME=${HOME:-/}" KRUN_LOG_FORMAT=text HGATE_LOG_FORMAT=text
  ISTIO_META_INTERCEPTION_MODE=NONE
  "RUST_LOG=info,hbone::server=debug,krun::dataplane::inbound=debug,krun::dataplane::route=debug")
# workload X SERVICE_ACCOUNT APP_PORT READY_LINE SETTING...: krun-X (x in lower case) with app
# X on APP_PORT under it, minting the identity .../sa/SERVICE_ACCOUNT from the local CA; waits
# for READY_LINE in its log. Admin endpoints on free ports: two krun share this host.
workload() {
  local name=krun-${1,,} t line
  t=$(date +%s%N)
  mkdir -p "$work/$name"
  start "$name" "${base_env[@]}" CA_ADDR="file://$ca" TRUST_DOMAIN=cluster.local \
    WORKLOAD_NAMESPACE=demo WORKLOAD_SERVICE_ACCOUNT="$2" MESH_BASE_DIR="$work/$name" \
    KRUN_DATAPLANE=builtin KRUN_DRAIN_TIMEOUT=5s KRUN_ADMIN_ADDR=127.0.0.1:0 PORT_http="$3" "${@:5}" \
    "$krun" -- python3 "$repo/samples/local/app.py" "$1" "$3"
  line=$(wait_for "$name" 'workload certificate minted')
  echo "   ${line#* }"
  wait_for "$name" "$4" >/dev/null
  echo "   ready in $(ms_since "$t")"
}

echo "== krun A: app A on 127.0.0.1:$app_a, HBONE port $hbone_a, tunnel port $tunnel_a"
workload A echo "$app_a" 'tunnel port open' KRUN_HBONE_PORT="$hbone_a" \
  KRUN_TUNNEL_PORT="$tunnel_a" KRUN_OUTBOUND_ADDR=127.0.0.1:0

echo "== krun B: app B on 127.0.0.1:$app_b, outbound proxy 127.0.0.1:$outbound_b (127.0.0.0/8 is the mesh here)"
workload B caller "$app_b" 'phase="app-ready"' KRUN_HBONE_PORT=0 KRUN_TUNNEL_PORT=0 \
  KRUN_OUTBOUND_ADDR="127.0.0.1:$outbound_b" KRUN_MESH_CIDRS=127.0.0.0/8 \
  KRUN_HBONE_PEER_PORT="$hbone_a" KRUN_PEER_IDENTITIES=127.0.0.1=spiffe://cluster.local/ns/demo/sa/echo

echo "== hgate: SNI listener 127.0.0.1:$sni; route echo.demo -> http://127.0.0.1:$tunnel_a/_hbone/15003"
t=$(date +%s%N)
echo "echo.demo: http://127.0.0.1:$tunnel_a/_hbone/15003" >"$work/routes.yaml"
start hgate "${base_env[@]}" HGATE_SNI_ADDR="127.0.0.1:$sni" HGATE_ADMIN_ADDR="127.0.0.1:$admin" \
  HGATE_ISTIOD_ADDR=off HGATE_KUBE=off HGATE_ID_TOKENS=none HGATE_ROUTES="$work/routes.yaml" \
  "$hgate"
wait_for hgate 'hgate ready' >/dev/null
echo "   ready in $(ms_since "$t")"

# ---------------------------------------------------------------------------------------------
sni_name=outbound_.8080_._.echo.demo.svc.cluster.local
# s_client CERT KEY: an HTTP GET through hgate with SNI $sni_name, mTLS with CERT, verifying
# the server against the mesh root; prints what came back.
s_client() {
  printf 'GET / HTTP/1.0\r\n\r\n' | timeout 15 openssl s_client -quiet -connect "127.0.0.1:$sni" \
    -servername "$sni_name" -cert "$1" -key "$2" -CAfile "$ca/root-cert.pem" \
    -cert_chain "$ca/ca-cert.pem" -verify_return_error 2>&1 || true
}

echo
echo "== (a) mesh client -> hgate -> HBONE -> krun A -> mTLS terminated -> app A"
from_a=$(lines krun-a) from_g=$(lines hgate)
t0=$(date +%s%N)
reply=$(s_client "$work/client-cert.pem" "$work/client-key.pem")
took=$(ms_since "$t0")
grep -q 'hello from A' <<<"$reply" || fail "(a) the mesh client got no answer from app A: $reply"
hop krun-a "$from_a" 'tunnel open' 'krun A tunnel port: HBONE stream'
hop krun-a "$from_a" 'mesh mTLS terminated' 'krun A: mTLS terminated, client is'
hop krun-a "$from_a" 'app A: .*GET' 'app A: request'
hop hgate "$from_g" 'connection finished' 'hgate: SNI in, HBONE out, closed'
show_hops "$t0"
echo "  client got: $(grep 'hello from' <<<"$reply") in $took"
echo "ok (a) mesh client reached app A through hgate and krun A as $client_id"

echo
echo "== (b) app B -> krun B outbound -> HBONE over mTLS -> krun A's HBONE port -> app A"
from_a=$(lines krun-a) from_b=$(lines krun-b)
t0=$(date +%s%N)
reply=$(curl -sS --max-time 15 --proxy "http://127.0.0.1:$outbound_b" "http://127.0.0.1:$app_a/" 2>&1) ||
  fail "(b) app B's request through krun B failed: $reply"
took=$(ms_since "$t0")
grep -q 'hello from A' <<<"$reply" || fail "(b) app B got no answer from app A: $reply"
hop krun-a "$from_a" 'tunnel open.*sa/caller' 'krun A HBONE port: mTLS, caller is'
hop krun-b "$from_b" 'outbound HBONE tunnel open' 'krun B: tunnel up, krun A proved'
hop krun-a "$from_a" 'app A: .*GET' 'app A: request'
show_hops "$t0"
echo "  app B got: $reply in $took"
echo "ok (b) app B (spiffe://cluster.local/ns/demo/sa/caller) reached app A (spiffe://cluster.local/ns/demo/sa/echo) over HBONE"

echo
echo "== (c) a client whose certificate is not from the mesh CA"
from_a=$(lines krun-a) from_g=$(lines hgate)
t0=$(date +%s%N)
reply=$(s_client "$work/outsider-cert.pem" "$work/outsider-key.pem")
if grep -q 'hello from' <<<"$reply"; then fail "(c) the outsider reached the app: $reply"; fi
hop krun-a "$from_a" 'mesh mTLS handshake failed' 'krun A: mTLS refused'
hop hgate "$from_g" 'connection finished' 'hgate: connection closed'
show_hops "$t0"
if tail -n "+$((from_a + 1))" "$work/krun-a.log" | grep -q 'app A: .*GET'; then
  fail "(c) app A saw a request from the outsider"
fi
echo "  client got: $(grep -m1 -iE 'alert|error' <<<"$reply" || echo 'the connection closed, no answer')"
echo "ok (c) a client without a mesh certificate was refused; app A never saw it"

# ---------------------------------------------------------------------------------------------
echo
echo "== drain, in order: krun B (app B first), then krun A, then hgate"
# stop NAME EXPECTED: SIGTERM, wait, check the exit code, show the drain's log lines.
stop() {
  local pid=${pid_of[$1]} code=0 t from
  t=$(date +%s%N) from=$(lines "$1")
  kill -TERM "$pid"
  wait "$pid" || code=$?
  unset "pid_of[$1]"
  [ "$code" = "$2" ] || fail "$1 exited with $code, expected $2"
  tail -n "+$((from + 1))" "$work/$1.log" |
    grep -E 'draining|listener closed|exited|stopped|drained' | sed 's/^[^ ]* */     /' || true
  echo "   $1 exited with $code after $(ms_since "$t")"
}
stop krun-b 0
stop krun-a 0
stop hgate 0
echo
echo "demo done in $(ms_since "$demo_start"): the three paths succeeded, everything drained"
