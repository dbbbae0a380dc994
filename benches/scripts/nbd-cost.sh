#!/usr/bin/env bash
# Where the NBD path's CPU goes, per op, on one image written whole with 4 MiB writes: `rbd bench` 4 KiB random
# writes (its client's CPU and the OSDs'), then fio 4 KiB random writes through `rbd map`'s unix socket (fio's,
# the map server's and the OSDs'). RW=read measures random reads instead. BIN=DIR uses other binaries.
# Usage: benches/scripts/nbd-cost.sh
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
if [ -z "${BIN:-}" ]; then (cd "$root" && cargo build --release -q -p tools); fi
bin=${BIN:-$root/target/release}
rw=${RW:-write}
d=$(mktemp -d /tmp/nbd-cost.XXXX)
$bin/cuttle up --dir $d/c >/dev/null
trap "pkill -f $d/ 2>/dev/null; sleep 2; pkill -9 -f $d/ 2>/dev/null; rm -rf $d" EXIT
export CUTTLE_CONF=$d/c/cuttle.toml CUTTLE_RBD_RUN_DIR=$d/run
$bin/rbd create --size 1G rbd/img
$bin/rbd bench --io-type write --io-size 4M --io-threads 16 --io-total 1G --io-pattern seq rbd/img >/dev/null
osds="$(awk '{print $1}' $d/c/osd.*.pid)"
cpu() { for p in "$@"; do awk '{print $14+$15}' /proc/$p/stat; done | awk '{s += $1} END {print s}'; }
a=$(cpu $osds)
/usr/bin/time -f "%U %S" -o $d/t1 $bin/rbd bench --io-type $rw --io-size 4K --io-threads 16 --io-total 256M --io-pattern rand --format json rbd/img > $d/b.json
b=$(cpu $osds)
python3 -c "
import json; j=json.load(open('$d/b.json')); t=open('$d/t1').read().split()
ops=j['ops']; print('rbd bench: %.0f IOPS  client %.1f us/op  osds %.1f us/op' % (j['ops_per_s'], (float(t[0])+float(t[1]))*1e6/ops, ($b-$a)*1e4/ops))"
uri=$($bin/rbd map rbd/img)
srv=$(awk '{print $1}' $d/run/*.pid | head -1)
a=$(cpu $osds); s1=$(cpu $srv)
/usr/bin/time -f "%U %S" -o $d/t2 fio --output-format=json --time_based --runtime=5 --name=j --rw=rand$rw --bs=4k --iodepth=16 --ioengine=nbd --uri="$uri" > $d/fio.json 2>/dev/null
b=$(cpu $osds); s2=$(cpu $srv)
python3 -c "
import json; t=open('$d/fio.json').read(); j=json.loads(t[t.index('{'):])['jobs'][0]['$rw']; f=open('$d/t2').read().split()
ops=j['total_ios']; print('fio nbd:   %.0f IOPS  fio %.1f us/op  server %.1f us/op  osds %.1f us/op' % (ops/5, (float(f[0])+float(f[1]))*1e6/ops, ($s2-$s1)*1e4/ops, ($b-$a)*1e4/ops))"
$bin/rbd unmap rbd/img >/dev/null
