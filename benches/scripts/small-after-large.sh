#!/usr/bin/env bash
# Small random writes into an image just written with large ones (the life of a VM image after `rbd import`):
# `rbd bench` 4 KiB random writes, twice over, on a 256 MiB image first filled with 4 MiB writes; per pass the
# IOPS and the OSDs' CPU per op (utime+stime summed over the OSDs, from /proc/PID/stat).
# Usage: benches/scripts/small-after-large.sh [PASS_BYTES]   (default 64M: 16384 writes, ~4 per 64 KiB chunk)
set -euo pipefail
total="${1:-64M}"
root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$root" && cargo build --release -q -p tools
bin="$root/target/release"
work="$(mktemp -d /tmp/small-after-large.XXXXXX)"
trap '"$bin/cuttle" down --dir "$work/c" >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
"$root/benches/scripts/prefault.sh"
"$bin/cuttle" up --dir "$work/c" >/dev/null
export CUTTLE_CONF="$work/c/cuttle.toml"
"$bin/rbd" create --size 256M rbd/img
"$bin/rbd" bench --io-type write --io-size 4M --io-threads 16 --io-total 256M --io-pattern seq rbd/img >/dev/null
pids=$(awk '{print $1}' "$work"/c/osd.*.pid)
ticks() { local t=0 p; for p in $pids; do t=$((t + $(awk '{print $14+$15}' "/proc/$p/stat"))); done; echo $t; }
for pass in first second; do
  a=$(ticks)
  out=$("$bin/rbd" bench --io-type write --io-size 4K --io-threads 16 --io-total "$total" --io-pattern rand --format json rbd/img)
  b=$(ticks)
  python3 - "$pass" "$out" "$((b - a))" "$(getconf CLK_TCK)" <<'PY'
import json, sys
j = json.loads(sys.argv[2])
cpu_us = int(sys.argv[3]) * 1e6 / int(sys.argv[4])
print("%s pass: %.0f IOPS, OSD CPU %.1f us per op (summed over the OSDs)" % (sys.argv[1], j["ops_per_s"], cpu_us / j["ops"]))
PY
done
