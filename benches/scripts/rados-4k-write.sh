#!/usr/bin/env bash
# One A/B round of 4 KiB rados writes: on a fresh `cuttle up` from BIN (a target/release directory),
# `rados bench SECS write -b 4K -t 16` (SECS=10), then one line: IOPS, and the daemons' CPU per op (utime+stime
# of mon + OSDs over the bench, rados bench's cleanup of its objects included). PERF=1 also records osd.0 with
# perf (dwarf call graphs) into ./perf-rados-4k.data. Run it alternately for two builds, e.g.
#   for i in 1 2 3; do benches/scripts/rados-4k-write.sh /old/target/release; benches/scripts/rados-4k-write.sh target/release; done
set -euo pipefail
bin="$(cd "${1:?usage: rados-4k-write.sh BIN_DIR}" && pwd)"
out="$PWD/perf-rados-4k.data"
work="$(mktemp -d /tmp/rados-4k-write.XXXXXX)"
trap '"$bin/cuttle" down --dir "$work/c" >/dev/null 2>&1; rm -rf "$work"' EXIT
"$bin/cuttle" up --dir "$work/c" >/dev/null
pids=$(awk '{print $1}' "$work"/c/*.pid)
ticks() { local t=0 p; for p in $pids; do t=$((t + $(awk '{print $14+$15}' "/proc/$p/stat"))); done; echo $t; }
field() { awk -v k="$1" 'index($0, k) == 1 {print $NF}'; }
R=("$bin/rados" --conf "$work/c/cuttle.toml" -p rbd)
if [ "${PERF:-0}" = 1 ]; then
  perf record -F 1999 --call-graph dwarf,16384 -o "$out" -p "$(awk '{print $1}' "$work/c/osd.0.pid")" -- sleep 6 >/dev/null 2>&1 &
  pp=$!
fi
t0=$(ticks); res=$("${R[@]}" bench "${SECS:-10}" write -b 4K -t 16 2>&1); t1=$(ticks)
n=$(echo "$res" | field "Total writes made:"); iops=$(echo "$res" | field "Average IOPS:")
echo "$(basename "$(dirname "$bin")")/$(basename "$bin"): rados write 4K ${iops} IOPS $(( (t1 - t0) * 10000 / n )) us/op ($n ops)"
if [ "${PERF:-0}" = 1 ]; then wait "$pp" || true; fi
