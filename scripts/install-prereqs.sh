#!/usr/bin/env bash
# Installs what the tests and benchmarks need on a fresh Debian machine, idempotently:
# nothing is installed when it is already there. Needs root (CI runs as root) for apt-get.
set -euo pipefail

need_apt=()
command -v unshare >/dev/null || need_apt+=(util-linux)
command -v setpriv >/dev/null || need_apt+=(util-linux)
command -v ip >/dev/null || need_apt+=(iproute2)
# The capture tests install real rules in network namespaces.
command -v iptables-restore >/dev/null || need_apt+=(iptables)
command -v python3 >/dev/null || need_apt+=(python3)
command -v curl >/dev/null || need_apt+=(curl)
command -v sha256sum >/dev/null || need_apt+=(coreutils)
# The identity tests make CA keys the way Istio's tooling does (RSA 4096, SEC1 EC).
command -v openssl >/dev/null || need_apt+=(openssl)
command -v tini >/dev/null || [ -x /usr/bin/tini ] || need_apt+=(tini)

if [ ${#need_apt[@]} -gt 0 ]; then
  echo "installing Debian packages: ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need_apt[@]}"
fi

# The independent HTTP/2 implementation the HBONE tests talk to.
# (pip where Python has it; Debian's package where Python is Debian's own.)
python3 -c 'import h2' 2>/dev/null \
  || python3 -m pip install --quiet --root-user-action=ignore h2 \
  || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-h2; }

# gRPC's own xDS bootstrap validation, which checks the proxyless bootstrap krun writes.
python3 -c 'import grpc' 2>/dev/null \
  || python3 -m pip install --quiet --root-user-action=ignore grpcio \
  || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-grpcio; }

for component in rustfmt clippy; do
  rustup component list --installed 2>/dev/null | grep -q "^$component" || rustup component add "$component"
done
