#!/bin/bash
# BlueStore memory and mount time (issue 12): 8 GiB of 4 MiB writes through rbd bench into a fresh local
# cluster with the default options, each OSD's peak resident memory, then a restart and each OSD's mount time.
# Uses the optimized dev build (cargo build -p tools); the cluster lives in /tmp/m8 and is removed at the end.
set -e
cd "$(dirname "$0")/../.."; D=/tmp/m8; C=$D/cuttle.toml
target/debug/cuttle down --dir $D 2>/dev/null || true; rm -rf $D
target/debug/cuttle up --dir $D
target/debug/rbd --conf $C create --size 9G rbd/big
target/debug/rbd --conf $C bench --io-type write --io-size 4M --io-pattern seq --io-total 8G rbd/big 2>&1 | tail -3
for o in 0 1 2; do p=$(awk '{print $1}' $D/osd.$o.pid); echo "osd.$o $(grep -E 'VmRSS|VmHWM' /proc/$p/status | tr '\n' ' ')"; done
target/debug/cuttle --conf $C osd df
du -sh $D/osd.*/block $D/osd.*/db
target/debug/cuttle down --dir $D
t=$(date +%s.%N); target/debug/cuttle up --dir $D; echo "up took $(echo "$(date +%s.%N) - $t" | bc)"
grep -h "mount_ms" $D/osd.*.log | tail -3
for o in 0 1 2; do p=$(awk '{print $1}' $D/osd.$o.pid); echo "after restart osd.$o $(grep -E 'VmRSS' /proc/$p/status)"; done
target/debug/cuttle down --dir $D
rm -rf $D
