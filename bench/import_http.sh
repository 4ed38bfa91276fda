#!/usr/bin/env bash
# Benchmark: an imagefs HTTP import against `curl -o` of the same URL into the same file system.
#
#   bench/import_http.sh [SIZE_MIB] [RUNS]      (defaults: 2048 MiB, 3 runs; run as root)
#
# nginx (Debian's package, installed here if missing, never started as a service) serves a file of
# random bytes on 127.0.0.1. Each run, from a warm page cache on the server side:
#   curl      curl -sS -o OUT URL                      (no hashing, no fsync)
#   curl+sync the same, then `sync OUT` (durable on disk, as an imagefs import is)
#   imagefs   imagefs import NAME URL --wait          (SHA-256 of every byte, fsync, verify,
#                                                      rename; timed until the image is active)
# into the same directory tree (BENCH_DIR, default /var/tmp/imagefs-bench). Prints each run, the
# medians, and imagefs/curl ratios. Record results in docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "bench/import_http.sh: run as root (it mounts a FUSE file system)" >&2; exit 1; }
size_mib=${1:-2048}
runs=${2:-3}
work=${BENCH_DIR:-/var/tmp/imagefs-bench}

# Dependencies: the project's, plus nginx for this bench only.
scripts/deps
if ! command -v nginx >/dev/null && [ ! -x /usr/sbin/nginx ]; then
  echo "bench: installing nginx"
  # Install without letting the package start a system-wide nginx on port 80.
  policy=/usr/sbin/policy-rc.d
  had_policy=0; [ -e "$policy" ] && had_policy=1
  [ "$had_policy" = 1 ] || { printf '#!/bin/sh\nexit 101\n' > "$policy"; chmod +x "$policy"; }
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nginx >/dev/null \
    || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nginx >/dev/null; }
  [ "$had_policy" = 1 ] || rm -f "$policy"
fi
scripts/build build >/dev/null
bin=$PWD/build

cleanup() {
  mountpoint -q "$work/mnt" 2>/dev/null && umount "$work/mnt" || true
  [ -f "$work/nginx.pid" ] && kill "$(cat "$work/nginx.pid")" 2>/dev/null || true
}
trap cleanup EXIT
cleanup
mkdir -p "$work/www" "$work/mnt" "$work/out"
rm -rf "$work/state" "$work/out"/*

src=$work/www/image.raw
want=$((size_mib * 1024 * 1024))
if [ ! -f "$src" ] || [ "$(stat -c %s "$src")" != "$want" ]; then
  echo "bench: writing $size_mib MiB of random bytes to $src"
  # A fast stream of incompressible bytes (openssl dies of SIGPIPE when head has enough).
  (openssl enc -aes-128-ctr -nosalt -pass pass:imagefs-bench -in /dev/zero 2>/dev/null || true) \
    | head -c "$want" > "$src.tmp"
  mv "$src.tmp" "$src"
fi
sum=$(sha256sum "$src" | cut -d' ' -f1)

cat > "$work/nginx.conf" <<CONF
worker_processes 1;
daemon on;
pid $work/nginx.pid;
error_log $work/nginx-error.log;
events { worker_connections 64; }
http {
  access_log off;
  sendfile on;
  tcp_nopush on;
  default_type application/octet-stream;
  client_body_temp_path $work/tmp; proxy_temp_path $work/tmp; fastcgi_temp_path $work/tmp;
  uwsgi_temp_path $work/tmp; scgi_temp_path $work/tmp;
  server { listen 127.0.0.1:18931; root $work/www; }
}
CONF
mkdir -p "$work/tmp"
"$(command -v nginx || echo /usr/sbin/nginx)" -c "$work/nginx.conf" -e "$work/nginx-error.log"
url=http://127.0.0.1:18931/image.raw
for _ in $(seq 50); do curl -sfI "$url" >/dev/null && break; sleep 0.1; done

"$bin/fs/imagefsd" -o log_level=warn "$work/state" "$work/mnt"
export IMAGEFS_STATE=$work/state

now() { date +%s.%N; }
calc() { awk "BEGIN { printf \"%.4f\", $1 }"; }
# Same start for every run: dirty data written back, caches dropped, the source read into the
# page cache (nginx then serves it from memory).
warm() {
  sync
  echo 1 > /proc/sys/vm/drop_caches 2>/dev/null || true
  cat "$src" > /dev/null
}
declare -a t_curl t_sync t_imfs
for i in $(seq "$runs"); do
  warm
  rm -f "$work/out/curl.raw"; sync
  t0=$(now); curl -sS -o "$work/out/curl.raw" "$url"; t1=$(now)
  sync "$work/out/curl.raw"; t2=$(now)
  t_curl+=("$(calc "$t1 - $t0")"); t_sync+=("$(calc "$t2 - $t0")")
  [ "$(stat -c %s "$work/out/curl.raw")" = "$want" ] || { echo "curl got a short file" >&2; exit 1; }
  rm -f "$work/out/curl.raw"; sync

  warm
  t0=$(now); "$bin/cli/imagefs" import "run$i" "$url" --wait >/dev/null 2>&1; t1=$(now)
  t_imfs+=("$(calc "$t1 - $t0")")
  got=$("$bin/cli/imagefs" status "run$i" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["sha256"])')
  [ "$got" = "$sum" ] || { echo "imagefs sha256 $got != $sum" >&2; exit 1; }
  "$bin/cli/imagefs" rm "run$i" >/dev/null; sync
  printf 'run %d: curl %6.2f s   curl+sync %6.2f s   imagefs %6.2f s\n' \
    "$i" "${t_curl[-1]}" "${t_sync[-1]}" "${t_imfs[-1]}"
done

median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
mc=$(median "${t_curl[@]}"); ms=$(median "${t_sync[@]}"); mi=$(median "${t_imfs[@]}")
mib=$size_mib
echo
printf 'median of %d runs, %d MiB over loopback:\n' "$runs" "$mib"
printf '  curl -o          %6.2f s  %7.0f MiB/s\n' "$mc" "$(calc "$mib / $mc")"
printf '  curl -o + sync   %6.2f s  %7.0f MiB/s\n' "$ms" "$(calc "$mib / $ms")"
printf '  imagefs import   %6.2f s  %7.0f MiB/s\n' "$mi" "$(calc "$mib / $mi")"
printf 'ratio imagefs / curl -o        = %.3f\n' "$(calc "$mi / $mc")"
printf 'ratio imagefs / curl -o + sync = %.3f\n' "$(calc "$mi / $ms")"
