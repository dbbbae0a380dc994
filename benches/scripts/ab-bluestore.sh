#!/usr/bin/env bash
# One round of BlueStore write-path figures for an A/B between two builds: on a fresh `cuttle up` from BIN
# (a target/release directory), `rados bench` 4 MiB writes then sequential reads, then a 1 GiB image filled by
# 4 MiB writes and overwritten by 4 KiB random writes (`rbd bench`, 16 threads). Prints one line: IOPS or MB/s,
# and the daemons' CPU per op (utime+stime of mon + OSDs). Run it alternately for two builds, e.g.
#   for i in 1 2 3; do benches/scripts/ab-bluestore.sh /old/target/release; benches/scripts/ab-bluestore.sh target/release; done
set -euo pipefail
bin="$(cd "${1:?usage: ab-bluestore.sh BIN_DIR}" && pwd)"
work="$(mktemp -d /tmp/ab-bluestore.XXXXXX)"
trap '"$bin/cuttle" down --dir "$work/c" >/dev/null 2>&1; rm -rf "$work"' EXIT
"$bin/cuttle" up --dir "$work/c" >/dev/null
pids=$(awk '{print $1}' "$work"/c/*.pid)
ticks() { local t=0 p; for p in $pids; do t=$((t + $(awk '{print $14+$15}' "/proc/$p/stat"))); done; echo $t; }
field() { awk -v k="$1" 'index($0, k) == 1 {print $NF}'; }
R=("$bin/rados" --conf "$work/c/cuttle.toml" -p rbd)
t0=$(ticks); out=$("${R[@]}" bench 8 write -b 4M -t 16 --no-cleanup 2>&1); t1=$(ticks)
w4m=$(echo "$out" | field "Bandwidth (MB/sec):"); n4m=$(echo "$out" | field "Total writes made:")
out=$("${R[@]}" bench 8 seq -t 16 2>&1); s4m=$(echo "$out" | field "Bandwidth (MB/sec):")
B=("$bin/rbd" --conf "$work/c/cuttle.toml")
"${B[@]}" create --size 1G rbd/img
"${B[@]}" bench --io-type write --io-size 4M --io-threads 16 --io-total 1G --io-pattern seq rbd/img >/dev/null
t2=$(ticks)
line=$("${B[@]}" bench --io-type write --io-size 4K --io-threads 16 --io-total 128M --io-pattern rand rbd/img | tail -1)
t3=$(ticks)
iops=$(echo "$line" | awk '{for (i = 1; i < NF; i++) if ($i == "ops/sec:") print $(i + 1)}')
echo "$(basename "$(dirname "$bin")")/$(basename "$bin"): rados write 4M ${w4m} MB/s $(( (t1 - t0) * 10 / n4m )) ms/op; seq 4M ${s4m} MB/s; rbd 4K overwrite ${iops} IOPS $(( (t3 - t2) * 10000 / 32768 )) us/op"
