#!/bin/bash
# SPDX-License-Identifier: GPL-2.0-or-later
#
# Install everything qsd's demo, tests and benchmarks need, on Debian 12, as root.
# Idempotent: a second run installs nothing new (it still lets pip check the Python deps).
#
#   bash scripts/setup.sh            # apt packages (only if some are missing) + pip install -e '.[test,fast]'
#   QSD_SETUP_FORCE=1 bash scripts/setup.sh   # always run apt-get update/install
#   QSD_SETUP_SKIP_APT=1 ...                  # Python side only (not root, or packages installed by hand)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$here"

# The Debian 12 packages:
#  - qemu-utils (qemu-img, qemu-io, qemu-nbd), qemu-system-common (qemu-storage-daemon),
#    qemu-block-extra: the reference tools the differential tests compare against;
#  - libnbd-bin (nbdinfo, nbdcopy, nbdsh), python3-libnbd, nbdkit, socat: NBD/QMP peers;
#  - fio (its "nbd" ioengine is built in Debian's fio 3.33): the load generator of bench/;
#  - cryptsetup-bin: cryptsetup luksDump, an oracle for the LUKS headers qsd writes.
#  - gnutls-bin (certtool, psktool): certificates and PSK files for the NBD TLS tests;
#    libssl-dev: headers the sslpsk3 wheel builds against (TLS-PSK for Python < 3.13).
#  - qemu-system-x86, busybox-static: the TCG guest that boots from the vhost-user-blk export
#    (tests/guest/mkguest.py builds its kernel + initramfs from Debian's kernel .deb, below).
#  - fuse3: fusermount3 (FUSE exports mounted by a non-root daemon) and /etc/fuse.conf.
APT_PACKAGES=(
    qemu-utils
    qemu-system-common
    qemu-block-extra
    libnbd-bin
    python3-libnbd
    nbdkit
    socat
    fio
    cryptsetup-bin
    gnutls-bin
    libssl-dev
    qemu-system-x86
    busybox-static
    fuse3
)

PYTHON=${PYTHON:-python3}

log() { printf 'setup: %s\n' "$*" >&2; }

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed'; then
        missing+=("$pkg")
    fi
done

if [[ -n "${QSD_SETUP_SKIP_APT:-}" ]]; then
    log "skipping apt (QSD_SETUP_SKIP_APT set)"
elif [[ ${#missing[@]} -gt 0 || -n "${QSD_SETUP_FORCE:-}" ]]; then
    if [[ $(id -u) -ne 0 ]]; then
        log "need root to install: ${missing[*]:-${APT_PACKAGES[*]}} (run as root, or set QSD_SETUP_SKIP_APT=1)"
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    log "apt-get update"
    apt-get update
    log "apt-get install ${APT_PACKAGES[*]}"
    apt-get install -y --no-install-recommends "${APT_PACKAGES[@]}"
else
    log "Debian packages already installed"
fi

log "pip install -e '.[test,fast]'"
"$PYTHON" -m pip install --disable-pip-version-check -q -e '.[test,fast]'

# The vhost-user-blk tests' guest (kernel unpacked from its .deb + busybox initramfs), cached in /var/tmp.
if [[ -z "${QSD_SETUP_SKIP_APT:-}" ]]; then
    "$PYTHON" tests/guest/mkguest.py || log "building the test guest failed (tests/guest/mkguest.py)"
fi

# A short report, so a log shows what the tests ran against.
for tool in qemu-storage-daemon qemu-img nbdkit nbdinfo fio; do
    if command -v "$tool" >/dev/null; then
        log "$(printf '%-20s %s' "$tool" "$("$tool" --version 2>&1 | head -n1)")"
    else
        log "$(printf '%-20s %s' "$tool" 'MISSING')"
    fi
done
log "$(printf '%-20s %s' python "$("$PYTHON" --version 2>&1)")"
log done
