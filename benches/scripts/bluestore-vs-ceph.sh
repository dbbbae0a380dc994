#!/usr/bin/env bash
# cuttle and real Ceph 16 side by side on BlueStore, in one run (1 mon + 3 OSDs on 127.0.0.1, pool rbd size 3
# with 32 PGs, a 10 GiB sparse block file per OSD under /tmp on both sides; Ceph from
# ../shared/bench/ceph-baseline.sh `up bluestore`, cuttle from `cuttle up`). Prints one markdown table:
#  - the disk's own limits, measured first with fio in the same directory: 4 KiB random writes (3 jobs, iodepth
#    16, an fdatasync every 16 writes), IOPS; 4 MiB sequential writes, MiB/s;
#  - `rados bench`, 16 in flight: 4 KiB write and random read, 4 MiB write and sequential read; the daemons' CPU
#    per op (utime+stime of mon + OSDs, /proc/PID/stat) and the bytes they wrote to the disk per op
#    (sectors written to the disk under the clusters, /sys/class/block, after a sync);
#  - `rbd bench` 4 KiB random writes, 16 threads, on an image first written whole by `rbd bench` 4 MiB writes;
#  - fio 4 KiB random writes then reads at iodepth 16 on that image: Ceph through librbd (ioengine=rbd), cuttle
#    through its `rbd map` NBD export (ioengine=nbd, unix socket).
# Every group runs on fresh clusters (Ceph first, then cuttle), so no group starts on another's data.
#
# Usage: benches/scripts/bluestore-vs-ceph.sh          (~12-14 min, 4 of them prefault.sh)
#        QUICK=1 benches/scripts/bluestore-vs-ceph.sh  (~5 min; short phases, for testing the script only)
# Knobs (environment; defaults, QUICK=1 defaults in brackets):
#   DISK_SECS=15 [3]   each disk fio run          SECS_4M=10 [3]   each 4 MiB rados phase (the 10 GiB block
#   SECS_4K=20 [4]     each 4 KiB rados phase     file per OSD bounds it: 10 s at 600 MiB/s leave room)
#   IMG_SIZE=2G [256M] the rbd/fio image          RBD_TOTAL=256M [32M]  --io-total of `rbd bench` 4 KiB writes
#   FIO_SECS=20 [4]    each fio phase on the image
#   SETTLE=3 [2]       seconds waited after a measured phase before CPU and disk bytes are read again, so that
#                      deferred store work (BlueStore's deferred writes, a flush) counts with its phase
#   PREFAULT_GIB=      [4]  GiB prefault.sh touches before each system's part of a group (default: its own,
#                      up to 16 GiB; ~35-45 s each on this VM once the host has taken the memory back)
set -euo pipefail
if [ "${QUICK:-0}" = 1 ]; then
  : "${DISK_SECS:=3}" "${SECS_4M:=3}" "${SECS_4K:=4}" "${IMG_SIZE:=256M}" "${RBD_TOTAL:=32M}" "${FIO_SECS:=4}" "${SETTLE:=2}"
  : "${PREFAULT_GIB:=4}"
else
  : "${DISK_SECS:=15}" "${SECS_4M:=10}" "${SECS_4K:=20}" "${IMG_SIZE:=2G}" "${RBD_TOTAL:=256M}" "${FIO_SECS:=20}" "${SETTLE:=3}"
  : "${PREFAULT_GIB:=}"
fi
export SETTLE
. "$(dirname "$0")/lib.sh"
bench_init bluestore-vs-ceph
fsec="$FIO_SECS"
cmdlog="$work/commands"; : > "$cmdlog"
export CUTTLE_RBD_RUN_DIR="$work/run"
log() { echo "[$(date +%H:%M:%S)] $*" >&2; }
t_start=$(date +%s)
block=10737418240  # 10 GiB per OSD, as ceph-baseline.sh's bluestore_block_size
KUP=(--set osd_objectstore=bluestore --set "bluestore_block_size=$block")

# --- what ran, so that the run can be repeated ---
rev="$(git -C "$root" rev-parse HEAD)"
dirty="$(git -C "$root" status --porcelain --untracked-files=no | awk '{print $2}' | tr '\n' ' ')"
cat <<EOF
# bluestore-vs-ceph.sh, $(date -u +%FT%TZ)
- cuttle: git $rev${dirty:+ plus uncommitted changes to: $dirty}; release build (\`cargo build --release -q -p tools\`) in $bin;
  \`cuttle up --dir DIR ${KUP[*]}\` (mon + 3 OSDs, pool rbd size 3, 32 PGs)
- Ceph: $(ceph --version); \`ceph-baseline.sh up bluestore\` (a copy of $root/../shared/bench/ceph-baseline.sh, sha256 $(sha256sum "$work/ceph-baseline.sh" | cut -c1-16)): mon + 3 OSDs, pool rbd size 3, 32 PGs, bluestore_block_size $block, osd_memory_target 2 GiB, mgr stopped after bring-up
- $(fio --version), rados/rbd clients: Ceph's $(command -v rados) / $(command -v rbd), cuttle's $bin/rados / $bin/rbd
- machine: $(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')), $(free -g | awk '/Mem:/{print $2}') GiB RAM, kernel $(uname -r); $work on $(df --output=fstype,source "$work" | tail -1 | awk '{print $1 " on " $2}') (rotational=$(cat /sys/block/"$(basename "$(df --output=source "$work" | tail -1)")"/queue/rotational 2>/dev/null || echo '?')); loadavg $(cut -d' ' -f1-3 /proc/loadavg)
- parameters: QUICK=${QUICK:-0} DISK_SECS=$DISK_SECS SECS_4M=$SECS_4M SECS_4K=$SECS_4K IMG_SIZE=$IMG_SIZE RBD_TOTAL=$RBD_TOTAL FIO_SECS=$FIO_SECS SETTLE=$SETTLE PREFAULT_GIB=$PREFAULT_GIB
- WORK=$work (removed at the end); \`prefault.sh $PREFAULT_GIB\` runs before each system's part of each group
EOF

# --- 1. the disk's own limits ---
log "disk: fio"
mkdir -p "$work/fio"
diskfio() { # NAME FIO-ARGS...
  local name="$1"; shift
  local cmd=(fio --output-format=json --name="$name" --directory="$work/fio" "$@" --iodepth=16 --ioengine=libaio
             --fdatasync=16 --numjobs=3 --group_reporting --time_based --runtime="$DISK_SECS")
  note_cmd "${cmd[@]}"
  "${cmd[@]}" > "$work/$name.json" 2>"$work/$name.err" || true
  fio_result "$name" "$work/$name.json" >> "$out"
  rm -f "$work/fio/"*
}
diskfio disk4k --size=1G --rw=randwrite --bs=4k
diskfio disk4m --size=2G --rw=write --bs=4m
rm -rf "$work/fio"

# --- 2./3. rados bench: 4 MiB write + seq, then 4 KiB write + rand, each pair on fresh clusters ---
rados_group() { # SIZE WRITE-SECS READ-MODE
  local size="$1" secs="$2" rmode="$3" R
  log "rados $size: Ceph"
  prefault
  ceph_up bluestore
  R=(rados -c "$work/ceph/ceph.conf" -p rbd)
  phase "ceph-write-$size" $cpids -- "${R[@]}" bench "$secs" write -b "$size" -t 16 --no-cleanup
  phase "ceph-$rmode-$size" $cpids -- "${R[@]}" bench "$secs" "$rmode" -t 16
  ceph_down
  log "rados $size: cuttle"
  prefault
  cuttle_up "$work/cuttle" "${KUP[@]}"
  R=("$bin/rados" --conf "$work/cuttle/cuttle.toml" -p rbd)
  phase "cuttle-write-$size" $kpids -- "${R[@]}" bench "$secs" write -b "$size" -t 16 --no-cleanup
  phase "cuttle-$rmode-$size" $kpids -- "${R[@]}" bench "$secs" "$rmode" -t 16
  cuttle_down "$work/cuttle"
  rm -rf "$work/cuttle"
}
rados_group 4M "$SECS_4M" seq
rados_group 4K "$SECS_4K" rand

# --- 4./5. rbd bench and fio on an image written whole first ---
log "rbd + fio: Ceph"
prefault
ceph_up bluestore
B=(rbd -c "$work/ceph/ceph.conf")
note_cmd "${B[@]}" create --size "$IMG_SIZE" rbd/bench
"${B[@]}" create --size "$IMG_SIZE" rbd/bench
metered ceph-rbd-fill-4M $cpids -- rbdbench ceph-rbd-fill-4M "${B[@]}" bench --io-type write --io-size 4M --io-threads 16 --io-total "$IMG_SIZE" --io-pattern seq rbd/bench
metered ceph-rbd-write-4K $cpids -- rbdbench ceph-rbd-write-4K "${B[@]}" bench --io-type write --io-size 4K --io-threads 16 --io-total "$RBD_TOTAL" --io-pattern rand rbd/bench
note_cmd "export CEPH_CONF=$work/ceph/ceph.conf"
CEPH_CONF="$work/ceph/ceph.conf" fiobench ceph-fio-randwrite-4K randwrite --ioengine=rbd --clientname=admin --pool=rbd --rbdname=bench --direct=1
CEPH_CONF="$work/ceph/ceph.conf" fiobench ceph-fio-randread-4K randread --ioengine=rbd --clientname=admin --pool=rbd --rbdname=bench --direct=1
ceph_down

log "rbd + fio: cuttle"
prefault
cuttle_up "$work/cuttle" "${KUP[@]}"
K=("$bin/rbd" --conf "$work/cuttle/cuttle.toml")
note_cmd "${K[@]}" create --size "$IMG_SIZE" rbd/bench
"${K[@]}" create --size "$IMG_SIZE" rbd/bench
metered cuttle-rbd-fill-4M $kpids -- rbdbench cuttle-rbd-fill-4M "${K[@]}" bench --io-type write --io-size 4M --io-threads 16 --io-total "$IMG_SIZE" --io-pattern seq rbd/bench
metered cuttle-rbd-write-4K $kpids -- rbdbench cuttle-rbd-write-4K "${K[@]}" bench --io-type write --io-size 4K --io-threads 16 --io-total "$RBD_TOTAL" --io-pattern rand rbd/bench
note_cmd "export CUTTLE_RBD_RUN_DIR=$work/run; uri=\$(${K[*]} map rbd/bench)"
uri=$("${K[@]}" map rbd/bench)
fiobench cuttle-fio-randwrite-4K randwrite --ioengine=nbd --uri="$uri"
fiobench cuttle-fio-randread-4K randread --ioengine=nbd --uri="$uri"
"${K[@]}" unmap rbd/bench >/dev/null
cuttle_down "$work/cuttle"
log "done in $(( $(date +%s) - t_start )) s"

echo
echo "Commands (in this order; rados bench and rbd bench ran once against each system, Ceph's first):"
echo '```'
cat "$cmdlog"
echo '```'
echo
python3 - "$out" "$(getconf CLK_TCK)" <<'PY'
import math, sys
hz = int(sys.argv[2])
r, rb, fio, meter = {}, {}, {}, {}
for line in open(sys.argv[1]):
    f = line.split()
    if f[0] == "meter":
        meter[f[1]] = dict(cpu=int(f[2]) / hz, wb=int(f[3]))
    elif len(f) == 9:   # rados bench: name ops secs MBps iops lat latmax cpu_ticks write_bytes
        r[f[0]] = dict(ops=float(f[1]), secs=float(f[2]), mbps=float(f[3]), iops=float(f[4]), lat=float(f[5]),
                       latmax=float(f[6]), cpu=int(f[7]) / hz, wb=int(f[8]))
    elif len(f) == 4:   # rbd bench: name ops_per_sec 0 ops
        rb[f[0]] = dict(iops=float(f[1]), ops=float(f[3]))
    else:               # fio: name iops bw_bytes
        fio[f[0]] = dict(iops=float(f[1]), bw=float(f[2]))
nan = float("nan")
def g(d, k, field):
    return d.get(k, {}).get(field, nan)
def div(a, b):
    return a / b if b else nan

rows = []  # (figure, ceph, cuttle, fmt, target, check) ; check(ceph, cuttle, ratio) -> bool or None
def row(fig, c, k, fmt, target="", check=None):
    rows.append((fig, c, k, fmt, target, check))

d4k, d4m = g(fio, "disk4k", "iops"), g(fio, "disk4m", "bw") / 2**20
rows.append(("disk alone: fio 4 KiB randwrite, 3 jobs x iodepth 16, fdatasync every 16 (IOPS)", d4k, None, "{:.0f}", "the disk's limit", None))
rows.append(("disk alone: fio 4 MiB seq write, 3 jobs x iodepth 16, fdatasync every 16 (MiB/s)", d4m, None, "{:.0f}", "the disk's limit", None))

def lat(ph):
    c, k = r.get("ceph-" + ph, {}), r.get("cuttle-" + ph, {})
    return f"avg lat {c.get('lat', nan)*1e3:.1f} / {k.get('lat', nan)*1e3:.1f} ms"
at_least = lambda x: (lambda c, k, q: q >= x)
for ph, unit, key, x in [("write-4K", "IOPS", "iops", 4), ("rand-4K", "IOPS", "iops", 3),
                         ("write-4M", "MiB/s", "mbps", 1.5), ("seq-4M", "MiB/s", "mbps", 1.5)]:
    row(f"rados bench {ph}, 16 in flight ({unit}; {lat(ph)})", g(r, "ceph-" + ph, key), g(r, "cuttle-" + ph, key),
        "{:.0f}", f">= {x}x", at_least(x))
for ph, unit, scale, target in [("write-4K", "us", 1e6, "<= 0.125x"), ("rand-4K", "us", 1e6, ""),
                                ("write-4M", "ms", 1e3, ""), ("seq-4M", "ms", 1e3, "")]:
    cpu = lambda s: div(g(r, s + ph, "cpu"), g(r, s + ph, "ops")) * scale
    row(f"daemon CPU per op, rados bench {ph} ({unit}/op, mon+OSDs utime+stime)", cpu("ceph-"), cpu("cuttle-"), "{:.0f}",
        target, (lambda c, k, q: q <= 0.125) if target else None)
wb = lambda s, ph, size: div(g(r, s + ph, "wb"), g(r, s + ph, "ops") * size)
row("disk bytes written per 4 MiB rados write (x 4 MiB; the disk's own count, 3 replicas)",
    wb("ceph-", "write-4M", 4 << 20), wb("cuttle-", "write-4M", 4 << 20), "{:.2f}", "cuttle <= 3.3", lambda c, k, q: k <= 3.3)
row("disk bytes written per 4 KiB rados write (x 4 KiB)", wb("ceph-", "write-4K", 4096), wb("cuttle-", "write-4K", 4096), "{:.1f}")
rate = lambda s: div(g(r, s + "write-4M", "wb"), g(r, s + "write-4M", "secs")) / 2**20
row(f"disk write rate during the 4 MiB rados write (MiB/s; disk alone: {d4m:.0f})", rate("ceph-"), rate("cuttle-"), "{:.0f}")
mb = lambda s: g(rb, s + "rbd-fill-4M", "iops") * 4
row("rbd bench 4 MiB seq write filling the image, 16 threads (MiB/s)", mb("ceph-"), mb("cuttle-"), "{:.0f}")
row("rbd bench 4 KiB randwrite on the written image, 16 threads (IOPS)", g(rb, "ceph-rbd-write-4K", "iops"),
    g(rb, "cuttle-rbd-write-4K", "iops"), "{:.0f}", ">= 4x", at_least(4))
mcpu = lambda s: div(g(meter, s + "rbd-write-4K", "cpu"), g(rb, s + "rbd-write-4K", "ops")) * 1e6
row("daemon CPU per rbd bench 4 KiB write (us/op)", mcpu("ceph-"), mcpu("cuttle-"), "{:.0f}")
mwb = lambda s: div(g(meter, s + "rbd-write-4K", "wb"), g(rb, s + "rbd-write-4K", "ops") * 4096)
row("disk bytes written per rbd bench 4 KiB write (x 4 KiB)", mwb("ceph-"), mwb("cuttle-"), "{:.1f}")
row("fio 4 KiB randwrite, iodepth 16 (IOPS; Ceph ioengine=rbd, cuttle ioengine=nbd via rbd map)",
    g(fio, "ceph-fio-randwrite-4K", "iops"), g(fio, "cuttle-fio-randwrite-4K", "iops"), "{:.0f}", ">= 3x", at_least(3))
row("fio 4 KiB randread, iodepth 16 (IOPS; same)", g(fio, "ceph-fio-randread-4K", "iops"),
    g(fio, "cuttle-fio-randread-4K", "iops"), "{:.0f}", ">= 2x", at_least(2))

print("| figure | Ceph 16 bluestore | cuttle bluestore | ratio cuttle/Ceph | target | met |")
print("|---|---|---|---|---|---|")
for fig, c, k, fmt, target, check in rows:
    if k is None:  # one value for the machine
        print(f"| {fig} | {fmt.format(c)} | (same disk) | | {target} | |")
        continue
    q = div(k, c)
    met = "" if check is None else ("?" if any(map(math.isnan, (c, k, q))) else ("yes" if check(c, k, q) else "no"))
    print(f"| {fig} | {fmt.format(c)} | {fmt.format(k)} | {q:.2f} | {target} | {met} |")
PY
