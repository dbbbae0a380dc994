#!/usr/bin/env bash
# One A/B round of 4 KiB rados writes: on a fresh `cuttle up` from BIN (a target/release directory),
# `rados bench SECS write -b 4K -t 16` (SECS=10), then one line: IOPS, and the daemons' CPU per op (utime+stime
# of mon + OSDs over the bench, rados bench's cleanup of its objects included). PERF=1 also records osd.0 with
# perf (dwarf call graphs) into ./perf-rados-4k.data. Run it alternately for two builds, e.g.
#   for i in 1 2 3; do benches/scripts/rados-4k-write.sh /old/target/release; benches/scripts/rados-4k-write.sh target/release; done
set -euo pipefail
out="$PWD/perf-rados-4k.data"
. "$(dirname "$0")/lib.sh"
ab_init rados-4k-write "${1:?usage: rados-4k-write.sh BIN_DIR}"
if [ "${PERF:-0}" = 1 ]; then
  perf record -F 1999 --call-graph dwarf,16384 -o "$out" -p "$(awk '{print $1}' "$work/c/osd.0.pid")" -- sleep 6 >/dev/null 2>&1 &
  pp=$!
fi
# shellcheck disable=SC2086
t0=$(ticks $kpids); res=$("$bin/rados" --conf "$conf" -p rbd bench "${SECS:-10}" write -b 4K -t 16 2>&1); t1=$(ticks $kpids)
n=$(echo "$res" | field "Total writes made:"); iops=$(echo "$res" | field "Average IOPS:")
echo "$(basename "$(dirname "$bin")")/$(basename "$bin"): rados write 4K ${iops} IOPS $(( (t1 - t0) * 10000 / n )) us/op ($n ops)"
if [ "${PERF:-0}" = 1 ]; then wait "$pp" || true; fi
