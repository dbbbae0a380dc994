#!/usr/bin/env bash
# msgr-bench against the machine's own limits, side by side in one run (the box is shared and noisy, so only
# ratios taken together mean anything). Anchors: iperf3 single stream, sockperf 4 KiB ping-pong, redis-benchmark
# SET 4 KiB pipelined, via ../shared/bench/anchors.sh. Prints a markdown table for BENCHMARKS.md.
# Usage: benches/scripts/msgr-vs-anchors.sh [SECONDS]   (default 10)
set -euo pipefail
secs="${1:-10}"
root="$(cd "$(dirname "$0")/../.." && pwd)"
anchors="$root/../shared/bench/anchors.sh"
cd "$root"
cargo build --release -q -p benches
bin="$root/target/release/msgr-bench"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$bin" server --addr "127.0.0.1:$port" 2>/dev/null &
srv=$!
trap 'kill $srv 2>/dev/null; wait $srv 2>/dev/null' EXIT
sleep 0.5
declare -A r
for cfg in "4096 1" "4096 64" "4194304 1" "4194304 64"; do
  set -- $cfg
  r["$1/$2"]=$("$bin" client --addr "127.0.0.1:$port" --size "$1" --depth "$2" --seconds "$secs" --json)
done
a=$(bash "$anchors" "$secs")
python3 - "$a" "${r[4096/1]}" "${r[4096/64]}" "${r[4194304/1]}" "${r[4194304/64]}" <<'PY'
import json, re, sys
anch = {}
for line in sys.argv[1].splitlines():
    parts = line.split()
    if len(parts) >= 2:
        anch[parts[0]] = float(parts[1])
k1, k64, m1, m64 = (json.loads(x) for x in sys.argv[2:6])
iperf_mb = anch["iperf3_single_stream"] * 1e9 / 8 / 1e6
print("| figure | cuttle msgr-bench | anchor | ratio | target |")
print("|---|---|---|---|---|")
print(f"| 4 MiB, depth 64: MB/s | {m64['mb_per_s']:.0f} | iperf3 single stream {iperf_mb:.0f} MB/s | {m64['mb_per_s']/iperf_mb:.2f} | >= 0.80 |")
print(f"| 4 MiB, depth 1: MB/s | {m1['mb_per_s']:.0f} | iperf3 single stream {iperf_mb:.0f} MB/s | {m1['mb_per_s']/iperf_mb:.2f} | - |")
print(f"| 4 KiB, depth 64: msgs/s | {k64['msgs_per_s']:.0f} | redis SET 4 KiB -P 64 {anch['redis_set_4k_c1_P64']:.0f} req/s | {k64['msgs_per_s']/anch['redis_set_4k_c1_P64']:.2f} | >= 1.00 |")
print(f"| 4 KiB, depth 1: msgs/s | {k1['msgs_per_s']:.0f} | redis SET 4 KiB -P 1 {anch['redis_set_4k_c1_P1']:.0f} req/s | {k1['msgs_per_s']/anch['redis_set_4k_c1_P1']:.2f} | - |")
print(f"| 4 KiB, depth 1: p99 RTT us | {k1['lat_us_p99']:.0f} | sockperf p99 {anch['sockperf_rtt_4k_p99']:.0f} us | {k1['lat_us_p99']/anch['sockperf_rtt_4k_p99']:.2f} | <= 2.00 |")
print(f"| 4 KiB, depth 1: p50 RTT us | {k1['lat_us_p50']:.0f} | sockperf p50 {anch['sockperf_rtt_4k_p50']:.0f} us | {k1['lat_us_p50']/anch['sockperf_rtt_4k_p50']:.2f} | - |")
print(f"| 4 KiB, depth 64: p50 / p99 RTT us | {k64['lat_us_p50']:.0f} / {k64['lat_us_p99']:.0f} | | | - |")
print(f"| 4 MiB, depth 64: p50 / p99 RTT ms | {m64['lat_us_p50']/1000:.0f} / {m64['lat_us_p99']/1000:.0f} | | | - |")
PY
