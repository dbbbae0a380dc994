#!/usr/bin/env bash
# fio 4 KiB random writes through `rbd map` (unix socket) with a flush every ${FS:-256} writes, on a 64 MiB image
# warmed by 3 s of random writes: IOPS, and per op the CPU of fio, of the OSDs (summed) and of the map server,
# and the server's context switches. CACHE=false runs with rbd_cache off; BIN=DIR uses other binaries.
# Usage: benches/scripts/nbd-fsync.sh [FIO ARGS...]
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
if [ -z "${BIN:-}" ]; then (cd "$root" && cargo build --release -q -p tools); fi
bin=${BIN:-$root/target/release}
d=$(mktemp -d /tmp/fsync.XXXX)
$bin/cuttle up --dir $d/c ${CACHE:+--set rbd_cache=$CACHE} >/dev/null
trap "pkill -f $d/ 2>/dev/null; sleep 2; pkill -9 -f $d/ 2>/dev/null; rm -rf $d" EXIT
export CUTTLE_CONF=$d/c/cuttle.toml CUTTLE_RBD_RUN_DIR=$d/run
$bin/rbd create --size 64M rbd/img
uri=$($bin/rbd map rbd/img)
fio --time_based --runtime=3 --name=w --rw=randwrite --bs=4k --iodepth=16 --ioengine=nbd --uri="$uri" >/dev/null 2>&1
pids="$(awk '{print $1}' $d/c/*.pid) $(awk '{print $1}' $d/run/*.pid | head -1)"
snap() { for p in $pids; do echo "$p $(awk '{print $14+$15}' /proc/$p/stat) $(cat /proc/$p/task/*/status | awk '/ctxt_switches/{s+=$2} END{print s}')"; done; }
snap > $d/a
/usr/bin/time -f "%U %S" fio --output-format=json --time_based --runtime=5 --name=j --rw=randwrite --bs=4k --iodepth=16 --fsync=${FS:-256} --ioengine=nbd --uri="$uri" "$@" > $d/fio.json 2>$d/time || true
snap > $d/b
ops=$(python3 -c "import json; t=open('$d/fio.json').read(); t=t[t.index('{'):]; j=json.loads(t); print(j['jobs'][0]['write']['total_ios'])")
python3 - $ops $d/time $d/a $d/b "$pids" <<'PY'
import sys
ops=int(sys.argv[1]); t=open(sys.argv[2]).read().split()[-2:]
a={l.split()[0]:l.split()[1:] for l in open(sys.argv[3])}; b={l.split()[0]:l.split()[1:] for l in open(sys.argv[4])}
pids=sys.argv[5].split()
osd=sum(int(b[p][0])-int(a[p][0]) for p in pids[:-1])*1e4/ops
srv=pids[-1]
print("iops %d  fio %.1f us/op  osds %.1f us/op  server %.1f us/op, %.2f ctxsw/op" % (ops/5, (float(t[0])+float(t[1]))*1e6/ops, osd,
      (int(b[srv][0])-int(a[srv][0]))*1e4/ops, (int(b[srv][1])-int(a[srv][1]))/ops))
PY
$bin/rbd unmap rbd/img >/dev/null
