# shellcheck shell=bash
# Helpers shared by the side-by-side scripts (rados-vs-ceph.sh, rbd-vs-ceph.sh, bluestore-vs-ceph.sh); sourced,
# not run. Every cluster and NBD server they start lives under $work and is stopped on exit (bench_cleanup), through
# the pid files of the tool that started it (ceph-baseline.sh's, `cuttle up`'s, `rbd map`'s), never by name.
#
# bench_init NAME         root (the repository), work (a fresh /tmp/NAME.XXXXXX with a copy of Ceph's baseline
#                         script), out ($work/results), bin (the release tools, built here; $CARGO_TARGET_DIR is
#                         honoured); installs bench_cleanup on exit.
# ceph_up STORE / ceph_down   Ceph 16 (1 mon, 3 OSDs, pool rbd size 3, 32 PGs) in $work/ceph; cpids = mon + OSDs.
# cuttle_up DIR [ARGS] / cuttle_down DIR   `cuttle up --dir DIR ARGS`; kpids = mon + OSDs.
# ticks PID... / wbytes      utime+stime clock ticks (/proc/PID/stat), summed / bytes the disk under $work took.
# phase NAME PID... -- CMD...    a `rados bench` run; appends
#                         "NAME ops seconds MBps iops lat_avg lat_max cpu_ticks write_bytes" to $out.
# rbdbench NAME CMD...    an `rbd bench` run; appends "NAME ops_per_sec 0 ops" to $out.
# fiobench NAME RW ARGS...    fio, 4 KiB at iodepth 16 for $fsec seconds; appends "NAME iops bw_bytes" to $out.
# metered NAME PID... -- CMD...  runs CMD; appends "meter NAME cpu_ticks write_bytes" (the PIDs' deltas) to $out.
# CPU and disk bytes are read $SETTLE seconds (default 0) after the command ends, so that work a store defers
# (e.g. BlueStore's deferred writes) is counted with the writes that caused it.
# Commands run by phase/rbdbench/fiobench/metered are also appended to $cmdlog when it is set.

bench_init() {
  root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
  work="$(mktemp -d "/tmp/$1.XXXXXX")"
  out="$work/results"; : > "$out"
  trap bench_cleanup EXIT
  trap 'exit 130' INT TERM
  cp "$root/../shared/bench/ceph-baseline.sh" "$root/../shared/bench/radosping.c" "$work/"
  (cd "$root" && cargo build --release -q -p tools)
  local t="${CARGO_TARGET_DIR:-target}"
  case "$t" in /*) ;; *) t="$root/$t" ;; esac
  bin="$t/release"
}

# Stops what the script started and is still running, then removes $work.
bench_cleanup() {
  set +e
  trap - EXIT
  [ -n "${work:-}" ] && [ -d "$work" ] || return 0
  local f s d
  local uri c
  for f in "$work"/run/*.json; do  # `rbd map` servers, "FSID.POOLID.IMAGEID.json": by URI, through their cluster
    [ -e "$f" ] || continue
    uri="$(sed -n 's/.*"uri": *"\([^"]*\)".*/\1/p' "$f")"
    for c in "$work"/*/cuttle.toml; do
      CUTTLE_RBD_RUN_DIR="$work/run" "$bin/rbd" --conf "$c" unmap "$uri" >/dev/null 2>&1 && break
    done
  done
  for f in "$work"/*/mon.*.pid; do  # `cuttle up` clusters
    [ -e "$f" ] || continue
    d="$(dirname "$f")"
    "$bin/cuttle" down --dir "$d" >/dev/null 2>&1
  done
  [ -f "$work/.cluster-dir" ] && bash "$work/ceph-baseline.sh" down >/dev/null 2>&1
  rm -rf "$work"
}

# prefault: prefault.sh before a system runs (the VM's first-touch cost), $PREFAULT_GIB GiB if set, else its default
prefault() { "$root/benches/scripts/prefault.sh" ${PREFAULT_GIB:-}; }

ceph_up() {
  CEPH_DIR="$work/ceph" bash "$work/ceph-baseline.sh" up "$1" >"$work/ceph-up.log" 2>&1 \
    || { tail -20 "$work/ceph-up.log" >&2; return 1; }
  cpids=$(awk '$1 ~ /^(mon|osd)/ {print $2}' "$work/ceph/pids")
}

ceph_down() {
  bash "$work/ceph-baseline.sh" down >/dev/null 2>&1 || true
  rm -rf "$work/ceph"  # ceph-baseline.sh removes only the directories it made itself
}

cuttle_up() {
  local dir="$1"; shift
  "$bin/cuttle" up --dir "$dir" "$@" >/dev/null
  kpids=$(awk '{print $1}' "$dir"/*.pid)
}

cuttle_down() { "$bin/cuttle" down --dir "$1" >/dev/null; }

# For the A/B scripts (one build against another; no Ceph): bin = BIN_DIR made absolute, work = a fresh
# /tmp/NAME.XXXXXX, a `cuttle up` cluster from that build in $work/c (ARGS go to `cuttle up`; kpids = its
# daemons, conf = its config); cluster and $work go on exit.
ab_init() {
  bin="$(cd "$2" && pwd)"
  work="$(mktemp -d "/tmp/$1.XXXXXX")"
  trap '"$bin/cuttle" down --dir "$work/c" >/dev/null 2>&1; rm -rf "$work"' EXIT
  cuttle_up "$work/c" "${@:3}"
  conf="$work/c/cuttle.toml"
}

# field KEY: the last word of the stdin line that starts with KEY (rados bench's summary lines).
field() { awk -v k="$1" 'index($0, k) == 1 {print $NF}'; }

ticks() { local t=0 p; for p in "$@"; do [ -r "/proc/$p/stat" ] && t=$((t + $(awk '{print $14+$15}' "/proc/$p/stat"))); done; echo $t; }
# Bytes written to the block device under $work so far (sectors written x 512, /sys/class/block/DEV/stat), after a
# `sync`, so that what a phase left in the page cache is counted with it. Whoever wrote them: only one cluster runs
# at a time. Not /proc/PID/io write_bytes: with large page-cache folios the kernel charges a 4 KiB buffered write as
# the whole folio (measured here: 20 GB charged to a cuttle OSD that wrote 0.33 GB); Ceph writes its block file with
# direct IO, so the two would not compare. The PID arguments are kept for the callers and ignored.
wbytes() {
  local dev; dev="$(basename "$(df --output=source "$work" | tail -1)")"
  sync
  awk '{printf "%.0f\n", $7 * 512}' "/sys/class/block/$dev/stat"
}

note_cmd() { if [ -n "${cmdlog:-}" ]; then printf '%s\n' "$*" >> "$cmdlog"; fi; }

phase() {
  local name="$1"; shift; local pids=(); while [ "$1" != "--" ]; do pids+=("$1"); shift; done; shift
  note_cmd "$@"
  local t0 b0 t1 b1 text
  t0=$(ticks "${pids[@]}"); b0=$(wbytes "${pids[@]}")
  text=$("$@" 2>&1)
  sleep "${SETTLE:-0}"
  t1=$(ticks "${pids[@]}"); b1=$(wbytes "${pids[@]}")
  printf '%s\n' "$text" > "$work/$name.txt"
  python3 - "$name" "$((t1 - t0))" "$((b1 - b0))" "$text" >> "$out" <<'PY'
import re, sys
name, cpu, wb, text = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
def f(pat):
    m = re.search(pat + r"\s*([0-9.eE+-]+)", text)
    return float(m.group(1)) if m else float("nan")
ops = f(r"Total (?:writes|reads) made:")
secs = f(r"Total time run:")
print(name, ops, secs, f(r"Bandwidth \(MB/sec\):"), f(r"Average IOPS:"), f(r"Average Latency\(s\):"), f(r"Max latency\(s\):"), cpu, wb)
PY
}

rbdbench() {
  local name="$1"; shift
  note_cmd "$@"
  "$@" > "$work/$name.txt" 2>&1
  python3 - "$name" "$work/$name.txt" >> "$out" <<'PY'
import re, sys
t = open(sys.argv[2]).read()
m = re.search(r"ops/sec:\s*([0-9.]+)", t)
n = re.search(r"\bops:\s*([0-9]+)", t)
# bytes/sec is printed with units ("535 MiB/s") by Ceph 16; MB/s is computed from ops/sec and the io size.
print(sys.argv[1], m.group(1) if m else "nan", "0", n.group(1) if n else "nan")
PY
}

# fio's JSON (FILE) -> "NAME iops bw_bytes" of the side that moved data
fio_result() {
  python3 - "$1" "$2" <<'PY'
import json, sys
try:
    text = open(sys.argv[2]).read()
    # fio's nbd engine prints "fio: connected to NBD server" before the JSON.
    j = json.loads(text[text.index("{"):])["jobs"][0]
    side = "write" if j["write"]["io_bytes"] > 0 else "read"
    print(sys.argv[1], j[side]["iops"], j[side]["bw_bytes"])
except Exception:
    print(sys.argv[1], "nan", "nan")
PY
}

fiobench() {
  local name="$1" rw="$2"; shift 2
  local cmd=(fio --output-format=json --time_based --runtime="$fsec" --name=j --rw="$rw" --bs=4k --iodepth=16 "$@")
  note_cmd "${cmd[@]}"
  "${cmd[@]}" > "$work/$name.json" 2>"$work/$name.err" || true
  fio_result "$name" "$work/$name.json" >> "$out"
}

metered() {
  local name="$1"; shift; local pids=(); while [ "$1" != "--" ]; do pids+=("$1"); shift; done; shift
  local t0 b0 t1 b1
  t0=$(ticks "${pids[@]}"); b0=$(wbytes "${pids[@]}")
  "$@"
  sleep "${SETTLE:-0}"
  t1=$(ticks "${pids[@]}"); b1=$(wbytes "${pids[@]}")
  echo "meter $name $((t1 - t0)) $((b1 - b0))" >> "$out"
}
