#!/bin/sh
# Installs what the benchmark needs beyond the lock file: wrk, the HTTP load
# generator (a Debian package). Run as root, or with sudo available.
set -eu
if command -v wrk >/dev/null 2>&1; then
    echo "wrk is installed: $(command -v wrk)"
    exit 0
fi
if [ "$(id -u)" -eq 0 ]; then SUDO=""; else SUDO="sudo"; fi
$SUDO apt-get update
$SUDO apt-get install -y wrk
