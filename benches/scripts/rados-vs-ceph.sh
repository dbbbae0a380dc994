#!/usr/bin/env bash
# `rados bench` on cuttle and on real Ceph 16 (memstore, 1 mon, 3 OSDs, pool rbd size 3, 32 PGs), side by side
# in one run: 4 MiB write and sequential read, 4 KiB write and random read, 16 ops in flight. Also the daemons'
# CPU time per op (utime+stime of mon + OSDs over each phase, from /proc/PID/stat).
# Ceph comes from ../shared/bench/ceph-baseline.sh (it installs Ceph from Debian if missing).
# Usage: benches/scripts/rados-vs-ceph.sh [SECONDS_4M] [SECONDS_4K]   (default 5 and 10: memstore keeps every
# replica in RAM, so long 4 MiB write phases fill memory). Prints a markdown table.
set -euo pipefail
s4m="${1:-5}"; s4k="${2:-10}"
root="$(cd "$(dirname "$0")/../.." && pwd)"
work="$(mktemp -d /tmp/rados-vs-ceph.XXXXXX)"
cp "$root/../shared/bench/ceph-baseline.sh" "$root/../shared/bench/radosping.c" "$work/"
cd "$root" && cargo build --release -q -p tools
bin="$root/target/release"
# Neither system pays the VM's first-touch cost for guest pages the host does not back (see prefault.sh): it
# runs before each system, because the host takes idle guest memory back within minutes.
"$root/benches/scripts/prefault.sh"
ticks() { local t=0 p; for p in "$@"; do [ -r "/proc/$p/stat" ] && t=$((t + $(awk '{print $14+$15}' "/proc/$p/stat"))); done; echo $t; }
out="$work/results"; : > "$out"
# phase NAME PIDS... -- COMMAND...: runs COMMAND, records "NAME ops seconds MBps iops lat_avg lat_max cpu_ticks"
phase() {
  local name="$1"; shift; local pids=(); while [ "$1" != "--" ]; do pids+=("$1"); shift; done; shift
  local t0; t0=$(ticks "${pids[@]}")
  local text; text=$("$@" 2>&1)
  local t1; t1=$(ticks "${pids[@]}")
  python3 - "$name" "$((t1 - t0))" "$text" >> "$out" <<'PY'
import re, sys
name, cpu, text = sys.argv[1], int(sys.argv[2]), sys.argv[3]
def f(pat):
    m = re.search(pat + r"\s*([0-9.eE+-]+)", text)
    return float(m.group(1)) if m else float("nan")
ops = f(r"Total (?:writes|reads) made:")
secs = f(r"Total time run:")
print(name, ops, secs, f(r"Bandwidth \(MB/sec\):"), f(r"Average IOPS:"), f(r"Average Latency\(s\):"), f(r"Max latency\(s\):"), cpu)
PY
}

# --- Ceph ---
cd "$work"
CEPH_DIR="$work/ceph" bash ceph-baseline.sh up memstore >"$work/ceph-up.log" 2>&1 || { tail -20 "$work/ceph-up.log"; exit 1; }
cpids=$(awk '$1 ~ /^(mon|osd)/ {print $2}' "$work/ceph/pids")
R=(rados -c "$work/ceph/ceph.conf" -p rbd)
phase ceph-write-4M $cpids -- "${R[@]}" bench "$s4m" write -b 4M -t 16 --no-cleanup
phase ceph-seq-4M $cpids -- "${R[@]}" bench "$s4m" seq -t 16
"${R[@]}" cleanup >/dev/null 2>&1 || true
phase ceph-write-4K $cpids -- "${R[@]}" bench "$s4k" write -b 4K -t 16 --no-cleanup
phase ceph-rand-4K $cpids -- "${R[@]}" bench "$s4k" rand -t 16
bash ceph-baseline.sh down >/dev/null 2>&1 || true

# --- cuttle ---
"$root/benches/scripts/prefault.sh"
"$bin/cuttle" up --dir "$work/cuttle" >/dev/null
kpids=$(cat "$work"/cuttle/*.pid)
R=("$bin/rados" --conf "$work/cuttle/cuttle.toml" -p rbd)
phase cuttle-write-4M $kpids -- "${R[@]}" bench "$s4m" write -b 4M -t 16 --no-cleanup
phase cuttle-seq-4M $kpids -- "${R[@]}" bench "$s4m" seq -t 16
"$bin/cuttle" down --dir "$work/cuttle" >/dev/null
rm -rf "$work/cuttle"
"$bin/cuttle" up --dir "$work/cuttle" >/dev/null
kpids=$(cat "$work"/cuttle/*.pid)
phase cuttle-write-4K $kpids -- "${R[@]}" bench "$s4k" write -b 4K -t 16 --no-cleanup
phase cuttle-rand-4K $kpids -- "${R[@]}" bench "$s4k" rand -t 16
"$bin/cuttle" down --dir "$work/cuttle" >/dev/null

python3 - "$out" <<'PY'
import sys
r = {}
for line in open(sys.argv[1]):
    name, ops, secs, mbps, iops, lat, latmax, cpu = line.split()
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
