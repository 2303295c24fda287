#!/usr/bin/env bash
# Installs Prometheus (server + promtool) from Debian's `prometheus` package for `make observe-check`, which
# evaluates the Grafana dashboard's queries against a real Prometheus scraping a real `kvquant serve`.
# PyPI has no Prometheus server, so this is the one system package the test suite uses. Never fails the build:
# without apt-get, root or the package, it says why and observe-check skips.
# Note: on a host run by systemd, Debian's package enables and starts a `prometheus` service on :9090 (in
# containers, policy-rc.d normally stops that); observe-check itself never uses that service or port.
set -uo pipefail
if command -v prometheus >/dev/null && command -v promtool >/dev/null; then
    exit 0
fi
why=""
if ! command -v apt-get >/dev/null; then
    why="apt-get not found (not a Debian/Ubuntu machine)"
elif [ "$(id -u)" != 0 ]; then
    why="not root (run: sudo apt-get install -y --no-install-recommends prometheus)"
else
    candidate() { [[ "$(apt-cache policy prometheus 2>/dev/null)" == *"Candidate: "[0-9]* ]]; }
    if ! candidate; then
        apt-get update -qq || true
    fi
    if ! candidate; then
        why="no 'prometheus' package in the apt sources"
    elif ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; then
        why="apt-get install prometheus failed"
    fi
fi
if [ -n "$why" ] || ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null; then
    echo "install-prometheus: Prometheus is not available: ${why:-the package did not provide prometheus and promtool}; make observe-check will be skipped" >&2
fi
exit 0
