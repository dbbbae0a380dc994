#!/usr/bin/env bash
# `rbd bench` and fio on cuttle and on real Ceph 16 (memstore, 1 mon, 3 OSDs, pool rbd size 3, 32 PGs), side by
# side in one run: 4 KiB random write and read with 16 threads, 4 MiB sequential write with 16 threads; fio
# 4 KiB random write/read at iodepth 16 through Ceph's librbd engine (ioengine=rbd) and through cuttle's
# `rbd map` NBD export (ioengine=nbd), over TCP (`--port`) and over the default unix socket. Ceph comes from
# ../shared/bench/ceph-baseline.sh (installed if missing).
# Usage: benches/scripts/rbd-vs-ceph.sh [IO_TOTAL_4K] [IO_TOTAL_4M] [FIO_SECONDS]  (default 256M 2G 10)
set -euo pipefail
t4k="${1:-256M}"; t4m="${2:-2G}"; fsec="${3:-10}"
. "$(dirname "$0")/lib.sh"
bench_init rbd-vs-ceph
# Neither system pays the VM's first-touch cost for guest pages the host does not back (see prefault.sh): it
# runs before each system, because the host takes idle guest memory back within minutes.
prefault

# --- Ceph ---
ceph_up memstore
B=(rbd -c "$work/ceph/ceph.conf")
"${B[@]}" create --size 1G rbd/bench
rbdbench ceph-write-4K-rand "${B[@]}" bench --io-type write --io-size 4K --io-threads 16 --io-total "$t4k" --io-pattern rand rbd/bench
rbdbench ceph-read-4K-rand "${B[@]}" bench --io-type read --io-size 4K --io-threads 16 --io-total "$t4k" --io-pattern rand rbd/bench
rbdbench ceph-write-4M-seq "${B[@]}" bench --io-type write --io-size 4M --io-threads 16 --io-total "$t4m" --io-pattern seq rbd/bench
CEPH_CONF="$work/ceph/ceph.conf" fiobench ceph-fio-randwrite-4K randwrite --ioengine=rbd --clientname=admin --pool=rbd --rbdname=bench --direct=1
CEPH_CONF="$work/ceph/ceph.conf" fiobench ceph-fio-randread-4K randread --ioengine=rbd --clientname=admin --pool=rbd --rbdname=bench --direct=1
"${B[@]}" rm rbd/bench >/dev/null 2>&1 || true
ceph_down

# --- cuttle ---
prefault
cuttle_up "$work/cuttle"
export CUTTLE_CONF="$work/cuttle/cuttle.toml" CUTTLE_RBD_RUN_DIR="$work/run"
"$bin/rbd" create --size 1G rbd/bench
rbdbench cuttle-write-4K-rand "$bin/rbd" bench --io-type write --io-size 4K --io-threads 16 --io-total "$t4k" --io-pattern rand rbd/bench
rbdbench cuttle-read-4K-rand "$bin/rbd" bench --io-type read --io-size 4K --io-threads 16 --io-total "$t4k" --io-pattern rand rbd/bench
rbdbench cuttle-write-4M-seq "$bin/rbd" bench --io-type write --io-size 4M --io-threads 16 --io-total "$t4m" --io-pattern seq rbd/bench
# The NBD path's baseline: `rbd bench` on the image as fio finds it (written whole by the 4 MiB phase), not on
# the fresh image of the first phases, where a write costs the store differently.
rbdbench cuttle-write-4K-rand-written "$bin/rbd" bench --io-type write --io-size 4K --io-threads 16 --io-total "$t4k" --io-pattern rand rbd/bench
rbdbench cuttle-read-4K-rand-written "$bin/rbd" bench --io-type read --io-size 4K --io-threads 16 --io-total "$t4k" --io-pattern rand rbd/bench
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
uri=$("$bin/rbd" map rbd/bench --port "$port")
fiobench cuttle-fio-randwrite-4K randwrite --ioengine=nbd --uri="$uri"
fiobench cuttle-fio-randread-4K randread --ioengine=nbd --uri="$uri"
"$bin/rbd" unmap rbd/bench >/dev/null
# `rbd map` without --port exports on a unix socket (the default): the same fio jobs through it.
uri=$("$bin/rbd" map rbd/bench)
fiobench cuttle-fio-randwrite-4K-unix randwrite --ioengine=nbd --uri="$uri"
fiobench cuttle-fio-randread-4K-unix randread --ioengine=nbd --uri="$uri"
"$bin/rbd" unmap rbd/bench >/dev/null
cuttle_down "$work/cuttle"

python3 - "$out" <<'PY'
import sys
r = {}
for line in open(sys.argv[1]):
    name, ops, bps = line.split()[:3]
    r[name] = (float(ops), float(bps))
print("| figure | Ceph 16 memstore | cuttle | ratio | target |")
print("|---|---|---|---|---|")
for name, unit, idx, target in [("write-4K-rand", "rbd bench 4K randwrite, 16 threads, IOPS", 0, ">= 3x"),
                                ("read-4K-rand", "rbd bench 4K randread, 16 threads, IOPS", 0, ">= 2x"),
                                ("write-4M-seq", "rbd bench 4M seq write, 16 threads, MB/s", 2, ">= 2x"),
                                ("fio-randwrite-4K", "fio 4K randwrite iodepth 16, IOPS (Ceph: ioengine=rbd; cuttle: nbd)", 0, ""),
                                ("fio-randread-4K", "fio 4K randread iodepth 16, IOPS (Ceph: ioengine=rbd; cuttle: nbd)", 0, "")]:
    if idx == 2:  # MB/s from 4 MiB ops
        c, k = r["ceph-" + name][0] * 4.194304, r["cuttle-" + name][0] * 4.194304
    else:
        c, k = r["ceph-" + name][idx], r["cuttle-" + name][idx]
    print(f"| {unit} | {c:.0f} | {k:.0f} | {k/c:.2f} | {target} |")
for a, b in [("fio-randwrite-4K", "write-4K-rand-written"), ("fio-randread-4K", "read-4K-rand-written"),
             ("fio-randwrite-4K-unix", "write-4K-rand-written"), ("fio-randread-4K-unix", "read-4K-rand-written")]:
    f, o = r["cuttle-" + a][0], r["cuttle-" + b][0]
    via = "unix socket" if a.endswith("-unix") else "TCP"
    print(f"| cuttle NBD path over {via} ({a}) vs cuttle rbd bench on the same image ({b}) | | {f:.0f} vs {o:.0f} | {f/o:.2f} | >= 0.80 |")
PY
rm -rf "$work"
