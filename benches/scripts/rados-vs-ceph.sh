#!/usr/bin/env bash
# `rados bench` on cuttle and on real Ceph 16 (memstore, 1 mon, 3 OSDs, pool rbd size 3, 32 PGs), side by side
# in one run: 4 MiB write and sequential read, 4 KiB write and random read, 16 ops in flight. Also the daemons'
# CPU time per op (utime+stime of mon + OSDs over each phase, from /proc/PID/stat).
# Ceph comes from ../shared/bench/ceph-baseline.sh (it installs Ceph from Debian if missing).
# Usage: benches/scripts/rados-vs-ceph.sh [SECONDS_4M] [SECONDS_4K]   (default 5 and 10: memstore keeps every
# replica in RAM, so long 4 MiB write phases fill memory). Prints a markdown table.
set -euo pipefail
s4m="${1:-5}"; s4k="${2:-10}"
. "$(dirname "$0")/lib.sh"
bench_init rados-vs-ceph
# Neither system pays the VM's first-touch cost for guest pages the host does not back (see prefault.sh): it
# runs before each system, because the host takes idle guest memory back within minutes.
prefault

# --- Ceph ---
ceph_up memstore
R=(rados -c "$work/ceph/ceph.conf" -p rbd)
phase ceph-write-4M $cpids -- "${R[@]}" bench "$s4m" write -b 4M -t 16 --no-cleanup
phase ceph-seq-4M $cpids -- "${R[@]}" bench "$s4m" seq -t 16
"${R[@]}" cleanup >/dev/null 2>&1 || true
phase ceph-write-4K $cpids -- "${R[@]}" bench "$s4k" write -b 4K -t 16 --no-cleanup
phase ceph-rand-4K $cpids -- "${R[@]}" bench "$s4k" rand -t 16
ceph_down

# --- cuttle ---
prefault
cuttle_up "$work/cuttle"
R=("$bin/rados" --conf "$work/cuttle/cuttle.toml" -p rbd)
phase cuttle-write-4M $kpids -- "${R[@]}" bench "$s4m" write -b 4M -t 16 --no-cleanup
phase cuttle-seq-4M $kpids -- "${R[@]}" bench "$s4m" seq -t 16
cuttle_down "$work/cuttle"
rm -rf "$work/cuttle"
cuttle_up "$work/cuttle"
phase cuttle-write-4K $kpids -- "${R[@]}" bench "$s4k" write -b 4K -t 16 --no-cleanup
phase cuttle-rand-4K $kpids -- "${R[@]}" bench "$s4k" rand -t 16
cuttle_down "$work/cuttle"

python3 - "$out" <<'PY'
import sys
r = {}
for line in open(sys.argv[1]):
    name, ops, secs, mbps, iops, lat, latmax, cpu = line.split()[:8]
    r[name] = dict(ops=float(ops), secs=float(secs), mbps=float(mbps), iops=float(iops), lat=float(lat),
                   latmax=float(latmax), cpu_us_per_op=int(cpu) * 1e4 / max(float(ops), 1))
print("| rados bench, 16 in flight | Ceph 16 memstore | cuttle | ratio | target | Ceph daemon CPU us/op | cuttle daemon CPU us/op | CPU ratio |")
print("|---|---|---|---|---|---|---|---|")
rows = [("write-4M", "MB/s", "mbps", ">= 2x"), ("seq-4M", "MB/s", "mbps", ""),
        ("write-4K", "IOPS", "iops", ">= 3x"), ("rand-4K", "IOPS", "iops", ">= 2x")]
for ph, unit, key, target in rows:
    c, k = r["ceph-" + ph], r["cuttle-" + ph]
    print(f"| {ph} ({unit}; avg/max lat ms {c['lat']*1e3:.1f}/{c['latmax']*1e3:.0f} vs {k['lat']*1e3:.1f}/{k['latmax']*1e3:.0f}) | {c[key]:.0f} | {k[key]:.0f} | {k[key]/c[key]:.2f} | {target} | {c['cpu_us_per_op']:.0f} | {k['cpu_us_per_op']:.0f} | {k['cpu_us_per_op']/c['cpu_us_per_op']:.2f} |")
PY
rm -rf "$work"
