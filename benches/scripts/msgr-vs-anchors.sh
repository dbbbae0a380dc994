#!/usr/bin/env bash
# msgr-bench against the machine's own limits, side by side in one run: iperf3 single stream (bulk), sockperf
# 4 KiB ping-pong (round-trip floor), redis-benchmark SET 4 KiB (a tuned epoll request/response loop) — the
# commands of ../shared/bench/anchors.sh. Each figure is taken twice:
#   split:    every server pinned to CPU 1 and every client to CPU 0 (each side owns a core; stable)
#   unpinned: the scheduler decides (on this 2-vCPU VM a wakeup on the other vCPU costs ~80 us, and whether a
#             pair lands on one vCPU or two swings round-trip figures by 5x from run to run)
# Prints a markdown table. Usage: benches/scripts/msgr-vs-anchors.sh [SECONDS]   (default 10)
set -euo pipefail
secs="${1:-10}"
root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$root"
need=""
for c in iperf3 sockperf redis-server; do command -v $c >/dev/null || need="$need $c"; done
[ -z "$need" ] || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $need >/dev/null; }
cargo build --release -q -p benches
bin="$root/target/release/msgr-bench"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done; pids=(); }
trap cleanup EXIT
out=$(mktemp)
for mode in split unpinned; do
  if [ $mode = split ]; then S="taskset -c 1"; C="taskset -c 0"; else S=""; C=""; fi
  p=$(free_port); $S "$bin" server --addr "127.0.0.1:$p" 2>/dev/null & pids+=($!); sleep 0.5
  for cfg in "4096 1" "4096 64" "4194304 1" "4194304 64"; do
    set -- $cfg
    echo "$mode msgr_$1_$2 $($C "$bin" client --addr "127.0.0.1:$p" --size "$1" --depth "$2" --seconds "$secs" --json)" >> "$out"
  done
  cleanup
  p=$(free_port); $S iperf3 -s -B 127.0.0.1 -p "$p" >/dev/null 2>&1 & pids+=($!); sleep 0.5
  echo "$mode iperf3 $($C iperf3 -c 127.0.0.1 -p "$p" -t "$secs" -J | python3 -c 'import json,sys; print(json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"])')" >> "$out"
  cleanup
  p=$(free_port); $S sockperf server --tcp -i 127.0.0.1 -p "$p" >/dev/null 2>&1 & pids+=($!); sleep 0.5
  echo "$mode sockperf $($C sockperf ping-pong --tcp --full-rtt -i 127.0.0.1 -p "$p" -m 4096 -t "$secs" 2>&1 | awk '/percentile 50.000/ {p50=$NF} /percentile 99.000/ {p99=$NF} END {print p50, p99}')" >> "$out"
  cleanup
  p=$(free_port); $S redis-server --port "$p" --bind 127.0.0.1 --save '' --appendonly no --daemonize no >/dev/null 2>&1 & pids+=($!); sleep 0.5
  for depth in 1 64; do
    n=$((secs * (depth == 1 ? 10000 : 100000)))
    echo "$mode redis_P$depth $($C redis-benchmark -h 127.0.0.1 -p "$p" -t set -d 4096 -c 1 -P "$depth" -n "$n" -q 2>/dev/null | tr '\r' '\n' | awk '/SET:/ {print $2}' | tail -1)" >> "$out"
  done
  cleanup
done
python3 - "$out" <<'PY'
import json, sys
r = {}
for line in open(sys.argv[1]):
    mode, key, rest = line.split(" ", 2)
    r[(mode, key)] = rest.strip()
print("| figure | mode | cuttle | anchor | ratio | target |")
print("|---|---|---|---|---|---|")
for mode in ("split", "unpinned"):
    m = lambda s, d: json.loads(r[(mode, f"msgr_{s}_{d}")])
    iperf = float(r[(mode, "iperf3")]) / 8 / 1e6
    sp50, sp99 = (float(x) for x in r[(mode, "sockperf")].split())
    p1, p64 = float(r[(mode, "redis_P1")]), float(r[(mode, "redis_P64")])
    rows = [
        ("4 MiB depth 64, MB/s", m(4194304, 64)["mb_per_s"], f"iperf3 1 stream {iperf:.0f} MB/s", iperf, ">= 0.80"),
        ("4 MiB depth 1, MB/s", m(4194304, 1)["mb_per_s"], f"iperf3 1 stream {iperf:.0f} MB/s", iperf, ""),
        ("4 KiB depth 64, msg/s", m(4096, 64)["msgs_per_s"], f"redis SET 4K -P 64: {p64:.0f}/s", p64, ">= 1.00"),
        ("4 KiB depth 1, msg/s", m(4096, 1)["msgs_per_s"], f"redis SET 4K -P 1: {p1:.0f}/s", p1, ""),
        ("4 KiB depth 1, p99 RTT us", m(4096, 1)["lat_us_p99"], f"sockperf p99 {sp99:.0f} us", sp99, "<= 2.00"),
        ("4 KiB depth 1, p50 RTT us", m(4096, 1)["lat_us_p50"], f"sockperf p50 {sp50:.0f} us", sp50, ""),
    ]
    for name, ours, label, anchor, target in rows:
        print(f"| {name} | {mode} | {ours:.0f} | {label} | {ours/anchor:.2f} | {target} |")
    print(f"| 4 KiB depth 64, p50/p99 RTT us | {mode} | {m(4096,64)['lat_us_p50']:.0f} / {m(4096,64)['lat_us_p99']:.0f} | | | |")
    print(f"| 4 MiB depth 64, p50/p99 RTT ms | {mode} | {m(4194304,64)['lat_us_p50']/1e3:.0f} / {m(4194304,64)['lat_us_p99']/1e3:.0f} | | | |")
PY
rm -f "$out"
