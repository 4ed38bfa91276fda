#!/usr/bin/env bash
# cp into and out of an imagefs mount, against cp on the state directory's own file system, in the
# same run. Usage: bench/cp.sh [SIZE_MIB] (default 2048). Needs root; builds imagefs if needed.
# Reports seconds and ratios; each figure is the best of RUNS (default 3).
set -euo pipefail
cd "$(dirname "$0")/.."
size_mib=${1:-2048}
runs=${RUNS:-3}
[ -x build/fs/imagefsd ] || scripts/build build >/dev/null
work=${BENCH_DIR:-/var/tmp/imagefs-bench}
cleanup() { mountpoint -q "$work/mnt" && umount "$work/mnt"; rm -rf "$work"; }
trap cleanup EXIT
rm -rf "$work"; mkdir -p "$work/mnt" "$work/direct"
echo "creating a ${size_mib} MiB file of random data in $work"
head -c $((size_mib * 1024 * 1024)) /dev/urandom > "$work/src.img"
build/fs/imagefsd "$work/state" "$work/mnt"

best() { sort -n | head -1; }
timed() { local t0 t1; t0=$(date +%s.%N); "$@"; t1=$(date +%s.%N); echo "$t1 - $t0" | bc -l; }
drop() { sync; echo 3 > /proc/sys/vm/drop_caches; }

in_direct=(); in_mnt=(); in_active=(); out_direct=(); out_mnt=()
for i in $(seq "$runs"); do
  rm -f "$work/direct/copy.img"; drop
  in_direct+=("$(timed sh -c "cp '$work/src.img' '$work/direct/copy.img' && sync -f '$work/direct/copy.img'")")
  rm -f "$work/mnt/copy.img"; drop
  t0=$(date +%s.%N)
  cp "$work/src.img" "$work/mnt/copy.img"
  t1=$(date +%s.%N)
  build/cli/imagefs --state "$work/state" status copy.img --wait >/dev/null 2>&1
  t2=$(date +%s.%N)
  in_mnt+=("$(echo "$t1 - $t0" | bc -l)")
  in_active+=("$(echo "$t2 - $t0" | bc -l)")
  drop
  out_direct+=("$(timed cp "$work/direct/copy.img" "$work/direct/out.img")")
  rm -f "$work/direct/out.img"; drop
  out_mnt+=("$(timed cp "$work/mnt/copy.img" "$work/direct/out.img")")
  rm -f "$work/direct/out.img"
done
a=$(printf '%s\n' "${in_direct[@]}" | best); b=$(printf '%s\n' "${in_mnt[@]}" | best)
c=$(printf '%s\n' "${in_active[@]}" | best)
d=$(printf '%s\n' "${out_direct[@]}" | best); e=$(printf '%s\n' "${out_mnt[@]}" | best)
printf '\n%-44s %8s %8s\n' "${size_mib} MiB, best of $runs" seconds ratio
printf '%-44s %8.2f %8s\n' "cp onto the state dir's fs (+ sync)" "$a" 1.00
printf '%-44s %8.2f %8.2f\n' "cp into the mount (until cp returns)" "$b" "$(echo "$b / $a" | bc -l)"
printf '%-44s %8.2f %8.2f\n' "cp into the mount (until verified, active)" "$c" "$(echo "$c / $a" | bc -l)"
printf '%-44s %8.2f %8s\n' "cp from the state dir's fs (cold)" "$d" 1.00
printf '%-44s %8.2f %8.2f\n' "cp out of the mount (cold)" "$e" "$(echo "$e / $d" | bc -l)"
