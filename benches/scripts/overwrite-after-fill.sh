#!/usr/bin/env bash
# 4 KiB random overwrites of an image first written whole by 4 MiB writes, on a fresh `cuttle up` (BlueStore):
# IOPS, the daemons' CPU per write (utime+stime of mon + OSDs) and the disk's own bytes per write (sectors
# written to the disk under the cluster, after a sync).
# Usage: benches/scripts/overwrite-after-fill.sh [IMAGE_SIZE] [IO_TOTAL]   (default 1G 128M)
#        UPARGS="--set osd_objectstore=memstore" benches/scripts/overwrite-after-fill.sh   (the same on MemStore)
set -euo pipefail
size="${1:-1G}"; total="${2:-128M}"
root="$(cd "$(dirname "$0")/../.." && pwd)"
(cd "$root" && cargo build --release -q -p tools)
bin="$root/target/release"
work="$(mktemp -d /tmp/overwrite-after-fill.XXXXXX)"
trap '"$bin/cuttle" down --dir "$work/c" >/dev/null 2>&1; rm -rf "$work"' EXIT
# shellcheck disable=SC2086
"$bin/cuttle" up --dir "$work/c" ${UPARGS:-} >/dev/null
pids=$(awk '{print $1}' "$work"/c/*.pid)
dev="$(basename "$(df --output=source "$work" | tail -1)")"
ticks() { local t=0 p; for p in $pids; do t=$((t + $(awk '{print $14+$15}' "/proc/$p/stat"))); done; echo $t; }
disk() { sync; awk '{printf "%.0f\n", $7 * 512}' "/sys/class/block/$dev/stat"; }
R=("$bin/rbd" --conf "$work/c/cuttle.toml")
"${R[@]}" create --size "$size" rbd/img
echo "fill:  $("${R[@]}" bench --io-type write --io-size 4M --io-threads 16 --io-total "$size" --io-pattern seq rbd/img | tail -1)"
t0=$(ticks); d0=$(disk)
line=$("${R[@]}" bench --io-type write --io-size 4K --io-threads 16 --io-total "$total" --io-pattern rand rbd/img | tail -1)
t1=$(ticks); d1=$(disk)
ops=$(echo "$line" | awk '{for (i = 1; i < NF; i++) if ($i == "ops:") print $(i + 1)}')
echo "4 KiB: $line"
python3 -c "import sys; t, d, n = map(float, sys.argv[1:]); print(f'daemon CPU per write {t * 1e4 / n:.0f} us, disk bytes per write {d / n / 4096:.1f} x 4 KiB')" \
  "$((t1 - t0))" "$((d1 - d0))" "$ops"
