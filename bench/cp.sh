#!/usr/bin/env bash
# cp into and out of an imagefs mount, against cp on the state directory's own file system, in the
# same run. Usage: bench/cp.sh [SIZE_MIB] (default 2048). Needs root; builds imagefs if needed.
# RUNS (default 3) rounds; each prints its figures, and the summary gives medians and ratios.
# Within a round the direct and the mount steps alternate which goes first, so that neither always
# finds the disk (or the host's cache under a VM) in the state the other left it in.
set -euo pipefail
cd "$(dirname "$0")/.."
size_mib=${1:-2048}
runs=${RUNS:-3}
[ -x build/fs/imagefsd ] || scripts/build build >/dev/null
work=${BENCH_DIR:-/var/tmp/imagefs-bench}
other=${OTHER_FS_DIR:-/dev/shm/imagefs-bench}  # a directory on another file system (tmpfs)
cleanup() { mountpoint -q "$work/mnt" && umount "$work/mnt"; rm -rf "$work" "$other"; }
trap cleanup EXIT
rm -rf "$work" "$other"; mkdir -p "$work/mnt" "$work/direct" "$other"
echo "creating a ${size_mib} MiB file of random data in $work"
head -c $((size_mib * 1024 * 1024)) /dev/urandom > "$work/src.img"
build/fs/imagefsd "$work/state" "$work/mnt"
cli() { build/cli/imagefs --state "$work/state" "$@"; }

now() { date +%s.%N; }
timed() { local t0; t0=$(now); "$@"; echo "$(now) - $t0" | bc -l; }
drop() { sync; echo 3 > /proc/sys/vm/drop_caches; }
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

copy_in_direct() {
  rm -f "$work/direct/copy.img"; drop
  in_direct+=("$(timed sh -c "cp '$work/src.img' '$work/direct/copy.img' && sync -f '$work/direct/copy.img'")")
}
copy_in_mount() {
  rm -f "$work/mnt/copy.img"; drop
  local t0 t1 t2
  t0=$(now); cp "$work/src.img" "$work/mnt/copy.img"; t1=$(now)
  cli status copy.img --wait >/dev/null 2>&1; t2=$(now)
  in_mnt+=("$(echo "$t1 - $t0" | bc -l)"); in_active+=("$(echo "$t2 - $t0" | bc -l)")
}
copy_out() {  # SRC DEST ARRAY
  drop; local t; t=$(timed cp "$1" "$2"); [ "$2" = /dev/null ] || rm -f "$2"
  eval "$3+=(\"$t\")"
}

in_direct=(); in_mnt=(); in_active=(); out_direct=(); out_mnt=(); null_direct=(); null_mnt=()
other_direct=(); other_mnt=()
for i in $(seq "$runs"); do
  if [ $((i % 2)) = 1 ]; then copy_in_direct; copy_in_mount; else copy_in_mount; copy_in_direct; fi
  cmp "$work/src.img" "$work/mnt/copy.img"
  if [ $((i % 2)) = 1 ]; then
    copy_out "$work/direct/copy.img" "$work/direct/out.img" out_direct
    copy_out "$work/mnt/copy.img" "$work/direct/out.img" out_mnt
    copy_out "$work/mnt/copy.img" "$other/out.img" other_mnt
    copy_out "$work/direct/copy.img" "$other/out.img" other_direct
    copy_out "$work/direct/copy.img" /dev/null null_direct
    copy_out "$work/mnt/copy.img" /dev/null null_mnt
  else
    copy_out "$work/mnt/copy.img" "$work/direct/out.img" out_mnt
    copy_out "$work/direct/copy.img" "$work/direct/out.img" out_direct
    copy_out "$work/direct/copy.img" "$other/out.img" other_direct
    copy_out "$work/mnt/copy.img" "$other/out.img" other_mnt
    copy_out "$work/mnt/copy.img" /dev/null null_mnt
    copy_out "$work/direct/copy.img" /dev/null null_direct
  fi
  printf 'run %d: in %.2f / mount %.2f (active %.2f); out %.2f / mount %.2f; to tmpfs %.2f / mount %.2f; to /dev/null %.2f / mount %.2f\n' \
    "$i" "${in_direct[-1]}" "${in_mnt[-1]}" "${in_active[-1]}" "${out_direct[-1]}" "${out_mnt[-1]}" \
    "${other_direct[-1]}" "${other_mnt[-1]}" "${null_direct[-1]}" "${null_mnt[-1]}"
done
a=$(median "${in_direct[@]}"); b=$(median "${in_mnt[@]}"); c=$(median "${in_active[@]}")
d=$(median "${out_direct[@]}"); e=$(median "${out_mnt[@]}")
f=$(median "${null_direct[@]}"); g=$(median "${null_mnt[@]}")
h=$(median "${other_direct[@]}"); k=$(median "${other_mnt[@]}")
printf '\n%-48s %8s %8s\n' "${size_mib} MiB, median of $runs" seconds ratio
printf '%-48s %8.2f %8s\n' "cp onto the state dir's fs (+ sync)" "$a" 1.00
printf '%-48s %8.2f %8.2f\n' "cp into the mount (until cp returns)" "$b" "$(echo "$b / $a" | bc -l)"
printf '%-48s %8.2f %8.2f\n' "cp into the mount (until verified, active)" "$c" "$(echo "$c / $a" | bc -l)"
printf '%-48s %8.2f %8s\n' "cp from the state dir's fs to it (cold)" "$d" 1.00
printf '%-48s %8.2f %8.2f\n' "cp out of the mount to the state dir's fs (cold)" "$e" "$(echo "$e / $d" | bc -l)"
printf '%-48s %8.2f %8s\n' "cp from the state dir's fs to tmpfs (cold)" "$h" 1.00
printf '%-48s %8.2f %8.2f\n' "cp out of the mount to tmpfs (cold)" "$k" "$(echo "$k / $h" | bc -l)"
printf '%-48s %8.2f %8s\n' "cp from the state dir's fs to /dev/null (cold)" "$f" 1.00
printf '%-48s %8.2f %8.2f\n' "cp out of the mount to /dev/null (cold)" "$g" "$(echo "$g / $f" | bc -l)"
