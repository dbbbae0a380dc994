#!/usr/bin/env bash
# One round of BlueStore write-path figures for an A/B between two builds: on a fresh `cuttle up` from BIN
# (a target/release directory), `rados bench` 4 MiB writes then sequential reads, then a 1 GiB image filled by
# 4 MiB writes and overwritten by 4 KiB random writes (`rbd bench`, 16 threads). Prints one line: IOPS or MB/s,
# and the daemons' CPU per op (utime+stime of mon + OSDs). Run it alternately for two builds, e.g.
#   for i in 1 2 3; do benches/scripts/ab-bluestore.sh /old/target/release; benches/scripts/ab-bluestore.sh target/release; done
set -euo pipefail
. "$(dirname "$0")/lib.sh"
ab_init ab-bluestore "${1:?usage: ab-bluestore.sh BIN_DIR}"
R=("$bin/rados" --conf "$conf" -p rbd)
# shellcheck disable=SC2086
t0=$(ticks $kpids); out=$("${R[@]}" bench 8 write -b 4M -t 16 --no-cleanup 2>&1); t1=$(ticks $kpids)
w4m=$(echo "$out" | field "Bandwidth (MB/sec):"); n4m=$(echo "$out" | field "Total writes made:")
out=$("${R[@]}" bench 8 seq -t 16 2>&1); s4m=$(echo "$out" | field "Bandwidth (MB/sec):")
B=("$bin/rbd" --conf "$conf")
"${B[@]}" create --size 1G rbd/img
"${B[@]}" bench --io-type write --io-size 4M --io-threads 16 --io-total 1G --io-pattern seq rbd/img >/dev/null
t2=$(ticks $kpids)
line=$("${B[@]}" bench --io-type write --io-size 4K --io-threads 16 --io-total 128M --io-pattern rand rbd/img | tail -1)
t3=$(ticks $kpids)
iops=$(echo "$line" | awk '{for (i = 1; i < NF; i++) if ($i == "ops/sec:") print $(i + 1)}')
echo "$(basename "$(dirname "$bin")")/$(basename "$bin"): rados write 4M ${w4m} MB/s $(( (t1 - t0) * 10 / n4m )) ms/op; seq 4M ${s4m} MB/s; rbd 4K overwrite ${iops} IOPS $(( (t3 - t2) * 10000 / 32768 )) us/op"
