#!/usr/bin/env bash
# Installs what the tests and benchmarks need on a fresh Debian machine, idempotently:
# nothing is installed when it is already there, and every install is announced (what, from
# where) before it starts. Needs root (CI runs as root) for apt-get.
#   Debian packages   apt-get, the list below
#   Python packages   pip, tests/requirements.txt, into the project's virtual environment .venv/
#                     (the tests run .venv/bin/python3; the system's Python is left alone)
#   Rust components   rustup (rustfmt, clippy); cargo-fuzz is announced and installed by
#                     scripts/fuzz.sh
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"

need_apt=()
command -v unshare >/dev/null || need_apt+=(util-linux)
command -v setpriv >/dev/null || need_apt+=(util-linux)
command -v ip >/dev/null || need_apt+=(iproute2)
# The capture tests install real rules in network namespaces.
command -v iptables-restore >/dev/null || need_apt+=(iptables)
command -v python3 >/dev/null || need_apt+=(python3)
command -v curl >/dev/null || need_apt+=(curl)
# The Cloud Run discovery tests query krun's DNS server with dig.
command -v dig >/dev/null || need_apt+=(dnsutils)
command -v sha256sum >/dev/null || need_apt+=(coreutils)
# The identity tests make CA keys the way Istio's tooling does (RSA 4096, SEC1 EC).
command -v openssl >/dev/null || need_apt+=(openssl)
command -v tini >/dev/null || [ -x /usr/bin/tini ] || need_apt+=(tini)
# The container image tests build FROM scratch offline (golden-image/build-local.sh).
command -v buildah >/dev/null || need_apt+=(buildah)
command -v strip >/dev/null || need_apt+=(binutils)
# The project's Python virtual environment.
python3 -c 'import venv, ensurepip' 2>/dev/null || need_apt+=(python3-venv)

if [ ${#need_apt[@]} -gt 0 ]; then
  echo "installing Debian packages with apt-get: ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need_apt[@]}"
fi

venv="$root/.venv"
if ! "$venv/bin/python3" -c 'import sys' 2>/dev/null; then
  echo "creating the project's Python virtual environment: python3 -m venv $venv"
  python3 -m venv "$venv"
fi
# Offline check first: with --no-index pip succeeds only when everything is already there.
if ! "$venv/bin/python3" -m pip install --quiet --disable-pip-version-check --no-index \
    -r "$root/tests/requirements.txt" >/dev/null 2>&1; then
  echo "installing Python packages into $venv from PyPI: $(grep -v '^#' "$root/tests/requirements.txt" | xargs)"
  "$venv/bin/python3" -m pip install --quiet --disable-pip-version-check -r "$root/tests/requirements.txt"
fi

for component in rustfmt clippy; do
  if ! rustup component list --installed 2>/dev/null | grep -q "^$component"; then
    echo "installing Rust component $component (rustup component add)"
    rustup component add "$component"
  fi
done
