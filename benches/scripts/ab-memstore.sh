#!/bin/bash
# A/B of the memstore write path between two builds of the tools, in alternating runs on fresh clusters:
# rados bench 4 KiB and 4 MiB writes (16 in flight), IOPS and the OSDs' CPU per op (from /proc).
# Usage: ab-memstore.sh OLD_BIN_DIR NEW_BIN_DIR [PAIRS] [SECONDS]
# (a build older than osd_objectstore runs memstore without being told; the newer one is told.)
set -eu
OLD=$1; NEW=$2; PAIRS=${3:-3}; SECS=${4:-5}
run() { # bin-dir label size
    local B=$1 L=$2 SZ=$3 D; D=$(mktemp -d /tmp/ab.XXXX)
    if "$B/cuttle" config help | grep -q '^osd_objectstore'; then
        "$B/cuttle" up --dir "$D" --set osd_objectstore=memstore >/dev/null
    else
        "$B/cuttle" up --dir "$D" >/dev/null
    fi
    local pids=$(awk '{print $1}' "$D"/osd.*.pid) t0=0 t1=0 p
    for p in $pids; do t0=$((t0 + $(awk '{print $14+$15}' /proc/$p/stat))); done
    local out; out=$("$B/rados" --conf "$D/cuttle.toml" -p rbd bench "$SECS" write -t 16 -b "$SZ" --no-cleanup 2>&1)
    for p in $pids; do t1=$((t1 + $(awk '{print $14+$15}' /proc/$p/stat))); done
    local ops; ops=$(echo "$out" | awk '/^Total writes made:/{print $4}')
    local iops; iops=$(echo "$out" | awk '/^Average IOPS:/{print $3}')
    local tck; tck=$(getconf CLK_TCK)
    echo "$L $SZ iops=$iops osd_cpu_us_per_op=$(( (t1 - t0) * 1000000 / tck / (ops > 0 ? ops : 1) ))"
    "$B/cuttle" down --dir "$D" >/dev/null; rm -rf "$D"
}
for i in $(seq "$PAIRS"); do
    for sz in 4K 4M; do run "$OLD" old $sz; run "$NEW" new $sz; done
done
