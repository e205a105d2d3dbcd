#!/bin/sh
# pgfence-sh-shim @VERSION@: the fence for images without Python (`pgfence export-shim`).
#
# Mounted at /newbin/postgres, first on PATH (e.g. a Swarm config with mode 0555), it
# takes the lock file and then execs the real postgres found further down PATH:
#   no lock               take it (a complete temp file, hard-linked into place), record
#                         its generation in <lock>.generation, and start
#   lock of another token exit 73
#   lock of this token    start, if it is a one-line lock or one this shim wrote (the shell
#                         script's rule); exit 73 if a pgfence that heartbeats wrote it
# Invocations that start no server (--version, -C NAME, ...) pass straight through.
#
# It writes the lock record pgfence writes, in strict mode, with `interval=0`: this holder
# never renews (nothing supervises the server once it is exec'd), so pgfence judges the
# lock like a one-line lock: never taken over by another token, never "alive" or
# "silent". Nothing releases it either: after the server has stopped for good, an
# operator runs `pgfence release --force` (or removes the file). Exit codes as pgfence:
# 64 configuration, 65 unreadable lock content, 73 fenced out, 74 storage error,
# 127 no real postgres. Needs only POSIX sh (dash, busybox ash), ln, mv, rm, od, sync;
# and stat for the NFS link-count check.
set -u
umask 022

me=$0

say() { printf 'pgfence: %s\n' "$*" >&2; }
die() {
  code=$1
  shift
  say "$*"
  exit "$code"
}

# -- which invocations start a server (as pgfence's Python shim decides) ----------------

starts_server() {
  while [ $# -gt 0 ]; do
    case $1 in
      --version | -V | --help | '-?' | --describe-config*) return 1 ;;
      -C*)
        name=${1#-C}
        [ -n "$name" ] || name=${2:-}
        # These settings are computed at run time: `postgres -C` locks the data
        # directory to compute them, so it is fenced like a server start.
        case $(printf '%s' "$name" | tr 'ABCDEFGHIJKLMNOPQRSTUVWXYZ' 'abcdefghijklmnopqrstuvwxyz') in
          data_checksums | data_directory_mode | num_os_semaphores | shared_memory_size | \
            shared_memory_size_in_huge_pages | wal_segment_size) return 0 ;;
        esac
        return 1
        ;;
    esac
    shift
  done
  return 0
}

# -- the real postgres: $FENCE_POSTGRES_BIN, else the next postgres on PATH that is neither
# this file nor another copy of pgfence or of this shim -------------------------------

is_pgfence() {
  [ "$1" -ef "$me" ] && return 0
  [ "$(head -c 2 "$1" 2>/dev/null)" = '#!' ] || return 1
  head -c 4096 "$1" 2>/dev/null | grep -q -e 'pgfence-sh-shim' -e 'pgfence\.cli' -e 'pgfence/__init__\.py'
}

find_real_postgres() {
  if [ -n "${FENCE_POSTGRES_BIN:-}" ]; then
    if [ ! -f "$FENCE_POSTGRES_BIN" ] || [ ! -x "$FENCE_POSTGRES_BIN" ]; then
      die 127 "FENCE_POSTGRES_BIN='$FENCE_POSTGRES_BIN' is not an executable file"
    fi
    if is_pgfence "$FENCE_POSTGRES_BIN"; then
      die 127 "FENCE_POSTGRES_BIN='$FENCE_POSTGRES_BIN' is pgfence itself, not the real postgres"
    fi
    real=$FENCE_POSTGRES_BIN
    return
  fi
  saved_ifs=$IFS
  IFS=:
  set -f
  for dir in ${PATH:-/usr/local/bin:/usr/bin:/bin}; do
    candidate=${dir:-.}/postgres
    if [ -f "$candidate" ] && [ -x "$candidate" ] && ! is_pgfence "$candidate"; then
      IFS=$saved_ifs
      set +f
      real=$candidate
      return
    fi
  done
  IFS=$saved_ifs
  set +f
  die 127 "cannot find the real postgres further down PATH; set FENCE_POSTGRES_BIN to it" \
    "(e.g. /usr/lib/postgresql/16/bin/postgres)"
}

# -- configuration: the FENCE_* variables pgfence reads, where they apply here ----------

token_problem() {
  case $1 in
    '') echo "is empty"; return ;;
  esac
  case $1 in
    *[![:space:]]*) ;;
    *) echo "is blank"; return ;;
  esac
  nl='
'
  case $1 in
    *"$nl"*) echo "spans several lines"; return ;;
  esac
  if [ "$(printf '%s' "$1" | wc -c)" -gt 255 ]; then
    echo "is longer than 255 bytes"
    return
  fi
  case $1 in
    *[[:cntrl:]]*) echo "contains control characters"; return ;;
    [[:space:]]* | *[[:space:]]) echo "starts or ends with white space"; return ;;
  esac
}

configure() {
  if [ -n "${FENCE_BACKEND+set}" ] && [ "$FENCE_BACKEND" != file ]; then
    die 64 "FENCE_BACKEND='$FENCE_BACKEND': this shim supports only the file backend;" \
      "use pgfence itself (an image with python3) for etcd"
  fi
  if [ -n "${FENCE_MODE+set}" ] && [ "$FENCE_MODE" != strict ]; then
    die 64 "FENCE_MODE='$FENCE_MODE': this shim supports only strict mode (lease mode" \
      "needs a heartbeat, which needs pgfence itself); unset it or set it to strict"
  fi
  if [ -n "${FENCE_USER:-}" ]; then
    die 64 "FENCE_USER is not supported by this shim; run the container as that user"
  fi
  if [ -n "${FENCE_VARIABLE+set}" ]; then
    token=$FENCE_VARIABLE source=FENCE_VARIABLE
  elif [ -n "${HOSTNAME+set}" ]; then
    token=$HOSTNAME source=HOSTNAME
  else
    token=$(cat /proc/sys/kernel/hostname 2>/dev/null || uname -n) source="the kernel hostname"
  fi
  problem=$(token_problem "$token")
  if [ -n "$problem" ]; then
    die 64 "the token from $source $problem; set FENCE_VARIABLE to a single-line name" \
      "of this container"
  fi
  lock=${FENCE_LOCK_FILE-/var/lib/postgresql/data/fence_lock}
  case $lock in
    '' | */ | */. | */..) die 64 "lock file path '$lock' must name a file; fix FENCE_LOCK_FILE" ;;
    /*) ;;
    *) lock=$PWD/$lock ;;
  esac
  dir=${lock%/*}
  [ -n "$dir" ] || dir=/
  name=${lock##*/}
}

# -- reading ----------------------------------------------------------------------------

# Fail closed on anything at PATH that is not a plain readable file; "absent" is fine.
check_plain_file() {
  path=$1 what=$2
  if [ ! -d "$dir" ]; then
    die 74 "lock directory $dir does not exist or is not a directory; create it on the" \
      "data volume, or fix FENCE_LOCK_FILE"
  fi
  if [ -L "$path" ]; then
    die 74 "$path is a symlink; pgfence never follows one at the lock path (remove it," \
      "or point FENCE_LOCK_FILE at a plain file)"
  fi
  [ -e "$path" ] || return 1
  if [ -d "$path" ]; then
    die 74 "$path is a directory, not a $what; remove it or fix FENCE_LOCK_FILE"
  fi
  if [ ! -f "$path" ]; then
    die 74 "$path is not a regular file; remove it or fix FENCE_LOCK_FILE"
  fi
  if [ ! -r "$path" ]; then
    die 74 "cannot read $what $path: permission denied (check the owner and mode of the" \
      "directory)"
  fi
  return 0
}

# Sets holder, header and interval from the lock file; fails closed on what pgfence
# would refuse to read.
read_lock() {
  size=$(wc -c <"$lock" 2>/dev/null) || die 74 "cannot read lock file $lock"
  if [ "$size" -gt 4096 ]; then
    die 65 "lock file $lock is larger than 4096 bytes; inspect it, and if no server runs" \
      "on this data directory clear it with \`pgfence release --force\`"
  fi
  lines=0 holder='' header='' interval=''
  while IFS= read -r line || [ -n "$line" ]; do
    lines=$((lines + 1))
    case $lines in
      1) holder=$line ;;
      2) header=$line ;;
      *) case $line in interval=*) interval=${line#interval=} ;; esac ;;
    esac
    line=''
  done <"$lock" || die 74 "cannot read lock file $lock"
  problem=$(token_problem "$holder")
  if [ -n "$problem" ]; then
    die 65 "lock file $lock has a first line (the holder's token) that $problem; inspect" \
      "it, and if no server runs on this data directory clear it with" \
      "\`pgfence release --force\`"
  fi
}

read_generation() {
  last=0
  if check_plain_file "$lock.generation" file; then
    last=$(cat "$lock.generation" 2>/dev/null) || die 74 "cannot read $lock.generation"
    # pgfence writes "N" or "N <instance>" (who won N): the number comes first.
    last=${last%% *}
    case $last in
      '' | *[!0-9]*) bad=1 ;;
      *) bad=$([ "${#last}" -gt 18 ] && echo 1) ;;
    esac
    if [ -n "$bad" ]; then
      die 65 "$lock.generation does not hold a generation number; restore it, or remove" \
        "it if no server runs on this data directory"
    fi
  fi
  generation=$((last + 1))
}

# -- writing ----------------------------------------------------------------------------

new_instance() {
  instance=$(od -An -N8 -tx1 /dev/urandom 2>/dev/null | tr -d ' \n')
  case $instance in
    ????????????????) ;;
    *) die 74 "cannot read /dev/urandom for an instance id" ;;
  esac
}

write_temp() { # write_temp PATH FUNCTION: FUNCTION's output into a new file at PATH, synced
  if ! (set -C && "$2" >"$1") 2>/dev/null; then
    rm -f "$1"
    die 74 "cannot write a file in $dir (check the owner and mode of the directory, and" \
      "free space)"
  fi
  sync "$1" 2>/dev/null || sync
}

record() {
  now=$(date -u +%Y-%m-%dT%H:%M:%SZ)
  boot_id=$(cat /proc/sys/kernel/random/boot_id 2>/dev/null) || boot_id=unknown
  # /proc/uptime reads CLOCK_BOOTTIME, pgfence's clock; for humans only here (a lock
  # that is never renewed has no heartbeat age to compute).
  uptime=$(cut -d ' ' -f 1 /proc/uptime 2>/dev/null) || uptime=0
  case $uptime in '' | *[!0-9.]*) uptime=0 ;; esac
  host=$(cat /proc/sys/kernel/hostname 2>/dev/null || uname -n)
  printf '%s\n' "$token" "pgfence-lock 1" "instance=$instance" "mode=strict" \
    "generation=$generation" "heartbeat=0" "interval=0" "ttl=0" "lock_delay=0" \
    "pid=$$" "host=$host" "boot_id=$boot_id" "clock=$uptime" "acquired_at=$now" \
    "heartbeat_at=$now"
}

print_generation() {
  printf '%s\n' "$generation"
}

link_count() {
  stat -c %h "$1" 2>/dev/null || echo 0
}

# Create the lock, atomically: exactly one of any number of contenders links it.
# Returns 1 if another process created it first.
create_lock() {
  read_generation
  new_instance
  temp=$dir/.$name.$instance.$$.tmp
  trap 'rm -f "$temp"' EXIT
  write_temp "$temp" record
  won=0
  if ln "$temp" "$lock" 2>/dev/null; then
    won=1
  elif [ "$(link_count "$temp")" = 2 ]; then
    # NFS: a retransmitted LINK may report failure although the first one succeeded;
    # our unique temp file's link count tells the truth.
    won=1
  elif [ ! -e "$lock" ] && [ ! -L "$lock" ]; then
    die 74 "cannot create $lock (hard links must work in $dir; check its owner and mode)"
  fi
  rm -f "$temp"
  trap - EXIT
  [ "$won" = 1 ] || return 1
  record_generation
  sync "$dir" 2>/dev/null || sync
  say "acquired $lock as token '$token' (generation $generation; previously free);" \
    "strict mode, no heartbeat: release it with \`pgfence release --force\` after the" \
    "server has stopped"
  export PGFENCE_GENERATION="$generation" PGFENCE_INSTANCE="$instance"
  return 0
}

# Only the holder writes <lock>.generation, as pgfence does, and before its server
# starts. A contender writing it before linking would be unsafe: one that lost, and
# stalled between reading and replacing the file, would put back a lower number than
# the winner's, and a later holder would repeat the winner's generation. If the write
# fails, the lock is given back and no server starts: no server ever runs under a
# generation the file does not record.
record_generation() {
  recorded=$(cat "$lock.generation" 2>/dev/null) || recorded=0
  recorded=${recorded%% *}
  case $recorded in '' | *[!0-9]*) recorded=0 ;; esac
  if [ "${#recorded}" -le 18 ] && [ "$recorded" -ge "$generation" ]; then
    return 0 # a newer holder wrote more meanwhile (a takeover under the same token)
  fi
  gen_temp=$dir/.$name.$instance.$$.generation.tmp
  if (set -C && print_generation >"$gen_temp") 2>/dev/null \
    && { sync "$gen_temp" 2>/dev/null || sync; } \
    && mv -f "$gen_temp" "$lock.generation" 2>/dev/null; then
    return 0
  fi
  rm -f "$gen_temp"
  if grep -qx "instance=$instance" "$lock" 2>/dev/null; then
    rm -f "$lock"
  fi
  die 74 "cannot record the generation in $lock.generation (check the owner and mode of" \
    "$dir, and free space); gave the lock back, not starting"
}

# -- main -------------------------------------------------------------------------------

find_real_postgres
if ! starts_server "$@"; then
  exec "$real" "$@"
fi
configure
attempts=0
while :; do
  if ! check_plain_file "$lock" "lock file"; then
    create_lock && break
    attempts=$((attempts + 1))
    [ "$attempts" -lt 100 ] || die 74 "$lock keeps appearing and vanishing; look at it with \`pgfence status\`"
    continue # another process created it first: judge its lock
  fi
  read_lock
  if [ "$holder" != "$token" ]; then
    die 73 "fenced out: $lock is held by token '$holder'"
  fi
  if [ "$lines" -gt 1 ]; then
    if [ "$header" != "pgfence-lock 1" ]; then
      die 65 "lock file $lock has more than one line but no pgfence header; inspect it," \
        "and if no server runs on this data directory clear it with" \
        "\`pgfence release --force\`"
    fi
    if [ "$interval" != 0 ]; then
      die 73 "fenced out: $lock is held by a pgfence with the same token '$token' that" \
        "heartbeats, which this shim cannot watch; give each container a distinct token" \
        "(FENCE_VARIABLE), or check with \`pgfence status\`"
    fi
  fi
  say "$lock is held by this token '$token' (the shell script's rule: ours); starting"
  break
done
export PGFENCE_LOCK="$lock" PGFENCE_LOCK_FILE="$lock"
exec "$real" "$@"
