#!/usr/bin/env bash
# Touches most of the machine's free memory once and frees it again, so that the benchmark that follows does not
# pay the hypervisor's first-touch cost for guest pages that were never used since boot.
#
# Why: on this kind of VM (Firecracker; guest memory backed lazily by the host) the first write to a guest page
# that was never used costs 8.5 us (host fault + zeroing), against 1.6 us for a guest page that was used and freed
# before (measured: touching 4 GiB twice in a row). A RAM store writing new data takes one fresh page per 4 KiB on
# every OSD, so without this step whichever system runs first pays up to 5x more per page, and figures move with
# what ran on the machine before. Both systems run after it and are treated alike.
# The host takes idle guest memory back: measured on 2026-11-24, 12 GiB of new allocations right after this
# script cost 1.8-2.5 us per page and the 13th GiB 13 us; 35 minutes after it, pages cost 13 us from the 8th GiB
# on. So the side-by-side scripts run it right before each system (a 5 s 4 MiB write phase takes ~10 GiB).
#
# Usage: benches/scripts/prefault.sh [GIB]   (default: available memory minus 3 GiB, at most 16 GiB)
set -euo pipefail
avail_gib=$(awk '/MemAvailable/ {print int($2 / 1048576)}' /proc/meminfo)
gib="${1:-$(( avail_gib > 19 ? 16 : (avail_gib > 4 ? avail_gib - 3 : 1) ))}"
python3 - "$gib" <<'PY'
import sys, time
gib = int(sys.argv[1])
t = time.monotonic()
held = []  # all held at once: a GiB freed before the next is taken would only be taken back
for _ in range(gib):
    b = bytearray(1 << 30)            # calloc: mapped, not yet touched
    b[::4096] = b"\x01" * (1 << 18)   # one write per 4 KiB page
    held.append(b)
del held
print(f"prefault: touched {gib} GiB in {time.monotonic() - t:.1f} s", file=sys.stderr)
PY
