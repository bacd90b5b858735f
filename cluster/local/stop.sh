#!/usr/bin/env bash
# Stop the local multi-node Ray cluster that cluster/local/start.sh started, and nothing else.
#
#   cluster/local/stop.sh [--dir DIR] [--grace S]
#
# It reads DIR/pids (the `ray start --block` process of each node, with its start time so that a reused
# pid is never signalled), notes every descendant of those processes (GCS, raylet, dashboard, agents,
# Ray workers), sends SIGTERM to the worker nodes and then to the head (`ray start --block` shuts its
# own processes down on SIGTERM), waits up to S seconds (default 30) for them and 5 more for the rest,
# then SIGKILLs whatever of the noted processes is left. It never runs `ray stop`, which would kill
# every Ray process on the host.
# Exit status 0: every noted process is gone.
set -euo pipefail

dir="${TMPDIR:-/tmp}/dydit-ray-${USER:-$(id -un)}"
grace=30

while [[ $# -gt 0 ]]; do
  case "$1" in
    --dir) dir="$2"; shift 2 ;;
    --grace) grace="$2"; shift 2 ;;
    -h|--help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "stop.sh: unknown argument '$1'" >&2; exit 2 ;;
  esac
done
[[ "$grace" =~ ^[0-9]+$ ]] || { echo "stop.sh: --grace must be a non-negative integer" >&2; exit 2; }

pid_file="$dir/pids"
if [[ ! -s "$pid_file" ]]; then
  echo "stop.sh: no $pid_file: nothing to stop"
  exit 0
fi

proc_stat() {  # proc_stat PID: sets st_state and st_start (clock ticks); fails if there is no PID
  local line fields
  { read -r line < "/proc/$1/stat"; } 2>/dev/null || return 1
  read -r -a fields <<< "${line##*) }"  # the fields after "pid (comm) ", comm may hold spaces
  st_state="${fields[0]}" st_start="${fields[19]}"
}

alive() {  # alive PID STARTTIME: the same process is still there and not a zombie
  proc_stat "$1" && [[ "$st_state" != "Z" && "$st_start" == "$2" ]]
}

# Every noted process: pid -> start time.
declare -A noted=()
launchers=()   # workers first (reverse start order), the head last

while read -r node pid starttime; do
  [[ -n "${pid:-}" ]] || continue
  if alive "$pid" "$starttime"; then
    launchers=("$node:$pid" "${launchers[@]}")
    noted[$pid]="$starttime"
  fi
done < "$pid_file"

note() {  # note PID: remember a live process with its start time
  if [[ -z "${noted[$1]:-}" ]] && proc_stat "$1"; then noted[$1]="$st_start"; fi
}

note_tree() {  # note every live descendant of the launchers, and every process in a group a launcher leads
  local -A children=()
  local pid ppid pgid entry queue p c
  local -A leaders=()
  for entry in "${launchers[@]}"; do leaders[${entry#*:}]=1; done
  while read -r pid ppid pgid; do
    children[$ppid]+=" $pid"
    [[ -n "${leaders[$pgid]:-}" ]] && note "$pid"
  done < <(ps -e -o pid=,ppid=,pgid=)
  queue=("${!leaders[@]}")
  while [[ ${#queue[@]} -gt 0 ]]; do
    p="${queue[0]}"; queue=("${queue[@]:1}")
    for c in ${children[$p]:-}; do
      note "$c"
      queue+=("$c")
    done
  done
}

wait_gone() {  # wait_gone SECONDS PID... : until none of the PIDs is alive, or the time is up
  local deadline=$(( $1 * 10 )) waited=0 p left; shift
  while :; do
    left=0
    for p in "$@"; do alive "$p" "${noted[$p]}" && left=1; done
    (( left == 0 )) && return 0
    (( waited >= deadline )) && return 1
    sleep 0.1
    waited=$((waited + 1))
  done
}

note_tree
echo "stop.sh: stopping ${#launchers[@]} node(s), ${#noted[@]} process(es) from $dir"

terminate() {  # terminate ROLE PID...: SIGTERM these launchers, wait for them to exit
  local role="$1" p; shift
  [[ $# -gt 0 ]] || return 0
  note_tree  # a Ray worker process may have started since the last look
  for p in "$@"; do alive "$p" "${noted[$p]}" && kill -TERM "$p" 2>/dev/null || true; done
  wait_gone "$grace" "$@" || echo "stop.sh: $role node(s) still running after ${grace}s" >&2
}

# Worker nodes first, then the head, so that no worker outlives the GCS it reports to.
worker_pids=() head_pids=()
for entry in "${launchers[@]}"; do
  if [[ "${entry%%:*}" == head ]]; then head_pids+=("${entry#*:}"); else worker_pids+=("${entry#*:}"); fi
done
terminate worker "${worker_pids[@]}"
terminate head "${head_pids[@]}"

# Whatever a node left behind (the dashboard's forkserver modules take a moment to notice): a few
# seconds to exit on their own, then SIGKILL, then make sure.
wait_gone 5 "${!noted[@]}" || true
survivors=()
for p in "${!noted[@]}"; do alive "$p" "${noted[$p]}" && survivors+=("$p"); done
if [[ ${#survivors[@]} -gt 0 ]]; then
  echo "stop.sh: SIGKILL what is left:" >&2
  ps -o pid=,args= -p "$(IFS=,; echo "${survivors[*]}")" | cut -c1-200 >&2 || true
  for p in "${survivors[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
  if ! wait_gone 10 "${survivors[@]}"; then
    echo "stop.sh: processes still alive after SIGKILL:" >&2
    for p in "${survivors[@]}"; do alive "$p" "${noted[$p]}" && ps -o pid=,args= -p "$p" >&2; done
    exit 1
  fi
fi

printf '%s\n' "${!noted[@]}" | sort -n > "$dir/pids.stopped"
rm -f "$pid_file"
echo "stop.sh: stopped; logs kept in $dir/logs"
