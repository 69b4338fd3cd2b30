#!/bin/bash
# SPDX-License-Identifier: GPL-2.0-or-later
#
# Install everything (scripts/setup.sh), create a 64 MiB demo image, and run qsd in the foreground with a QMP
# monitor and an NBD export on unix sockets, exactly as one would run qemu-storage-daemon. Ctrl-C stops it.
#
#   bash scripts/demo.sh              # qsd
#   bash scripts/demo.sh --qemu       # the same command line with QEMU's qemu-storage-daemon, for comparison
#   bash scripts/demo.sh --no-setup   # skip scripts/setup.sh
#
# The work directory is $QSD_DEMO_DIR (default /tmp/qsd-demo); the image is kept between runs.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}
daemon=qsd
setup=1
for arg in "$@"; do
    case "$arg" in
        --qemu) daemon=qemu ;;
        --no-setup) setup= ;;
        -h|--help) sed -n '3,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "demo.sh: unknown argument '$arg'" >&2; exit 2 ;;
    esac
done

if [[ -n $setup ]]; then
    PIP_ROOT_USER_ACTION=ignore bash "$here/scripts/setup.sh"
fi

dir=${QSD_DEMO_DIR:-/tmp/qsd-demo}
mkdir -p "$dir"
img=$dir/demo.img
qmp=$dir/qmp.sock
nbd=$dir/nbd.sock
pidfile=$dir/$daemon.pid
log=$dir/$daemon.log

if [[ ! -f $img ]]; then
    # 64 MiB, mostly a hole, with two recognisable patterns: 0x5a in the first MiB, 0xa5 in the MiB at 32 MiB.
    qemu-img create -q -f raw "$img" 64M
    qemu-io -f raw -c 'write -q -P 0x5a 0 1M' -c 'write -q -P 0xa5 32M 1M' "$img" >/dev/null
fi

if [[ -f $pidfile ]] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
    echo "demo.sh: a demo daemon is already running (pid $(cat "$pidfile"), pidfile $pidfile)" >&2
    exit 1
fi
rm -f "$qmp" "$nbd" "$pidfile"

if [[ $daemon == qsd ]]; then
    if command -v qsd >/dev/null; then cmd=(qsd); else cmd=("$PYTHON" -m qsd); fi
else
    cmd=(qemu-storage-daemon)
fi
cmd+=(
    --blockdev "driver=file,node-name=file0,filename=$img"
    --blockdev "driver=raw,node-name=demo,file=file0"
    --nbd-server "addr.type=unix,addr.path=$nbd"
    --export "type=nbd,id=export0,node-name=demo,name=demo,writable=on"
    --chardev "socket,path=$qmp,server=on,wait=off,id=qmp0"
    --monitor "chardev=qmp0"
    --pidfile "$pidfile"
)

echo "demo.sh: starting: ${cmd[*]}"
"${cmd[@]}" </dev/null 2> >(trap '' INT; exec tee "$log" >&2) &
pid=$!

stop() {
    trap - INT TERM
    echo
    echo "demo.sh: stopping $daemon (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null
    status=$?
    echo "demo.sh: $daemon exited with status $status"
    exit "$status"
}
trap stop INT TERM

# Ready = the pidfile holds the daemon's pid (written once every option has been applied).
for _ in $(seq 1 600); do
    if ! kill -0 "$pid" 2>/dev/null; then
        wait "$pid"; status=$?
        echo "demo.sh: $daemon failed to start (exit status $status); its stderr is above and in $log" >&2
        exit 1
    fi
    [[ -s $pidfile && $(cat "$pidfile") == "$pid" ]] && break
    sleep 0.05
done
if [[ ! -s $pidfile ]]; then
    echo "demo.sh: $daemon did not become ready within 30 s" >&2
    stop
fi

uri="nbd+unix:///demo?socket=$nbd"
cat <<EOF

$daemon is running (pid $pid) and serves $img (64 MiB raw: 0x5a at 0..1M, 0xa5 at 32M..33M, zeroes elsewhere).

QMP (unix socket $qmp):
    qmp-shell $qmp
    # then e.g.: query-block-exports    query-named-block-nodes    blockdev-add driver=null-co node-name=n0
    # or: printf '%s\n' '{"execute":"qmp_capabilities"}' '{"execute":"query-version"}' | socat - UNIX-CONNECT:$qmp

NBD (export "demo", writable, unix socket $nbd):
    nbdinfo "$uri"
    nbdinfo --map "$uri"
    qemu-img info "$uri"
    qemu-io -f raw -c 'read -P 0x5a 0 1M' -c 'write -P 0x11 4M 64k' "$uri"
    nbdcopy "$uri" /tmp/demo-copy.raw

Press Ctrl-C to stop (the daemon gets SIGTERM and exits with status 0).
EOF

wait "$pid"
status=$?
trap - INT TERM
echo "demo.sh: $daemon exited with status $status"
exit "$status"
