#!/usr/bin/env bash
# Start a multi-node Ray cluster on one host: a head and N worker nodes, each its own `ray start --block`
# with its own ports, resources and temp dir, all with Ray token authentication on.
#
#   cluster/local/start.sh [--workers N] [--dir DIR] [--base-port P] [--head-cpus C] [--worker-cpus C]
#                          [--worker-gpus G] [--object-store-mb M] [--token-file FILE] [--timeout S]
#   source DIR/cluster.env          # RAY_ADDRESS, RAY_API_SERVER_ADDRESS, RAY_AUTH_MODE, RAY_AUTH_TOKEN_PATH
#   ray job submit --working-dir . -- python -m jobs.reproduce --config debug
#   cluster/local/stop.sh [--dir DIR]
#
# What it writes under DIR (default ${TMPDIR:-/tmp}/dydit-ray-$USER; keep it short, Ray's socket paths
# live below it and Unix sockets are limited to 107 characters):
#   auth_token     the cluster token (generated, mode 600, unless --token-file names an existing one)
#   pids           "<node> <pid> <starttime>" of each `ray start --block` process, read by stop.sh
#   cluster.env    the client environment for this cluster
#   logs/<node>.log, <node>/   the output and the Ray temp dir of each node
#
# Ports, from --base-port B (default 26379): GCS B, dashboard B+1, Ray client B+2; node i (head = 0) uses
# B+10(i+1) .. B+10(i+1)+5 for its node manager, object manager, dashboard agent (http, grpc), metrics
# and runtime-env agent, and B+1000+100i .. +99 for its worker processes. The dashboard listens on
# 127.0.0.1 only; Ray binds the other ports on the host's address, where the token is what keeps others out.
#
# Never use `ray stop` against this cluster: it kills every Ray process on the host. stop.sh stops
# exactly the processes this script started.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"

workers=2
dir="${TMPDIR:-/tmp}/dydit-ray-${USER:-$(id -un)}"
base_port=26379
head_cpus=1
worker_cpus=1
worker_gpus=0
object_store_mb=100
token_file=""
timeout=120

usage() { sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; }
die() { echo "start.sh: $*" >&2; exit 2; }
is_uint() { [[ "$1" =~ ^[0-9]+$ ]]; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --workers) workers="$2"; shift 2 ;;
    --dir) dir="$2"; shift 2 ;;
    --base-port) base_port="$2"; shift 2 ;;
    --head-cpus) head_cpus="$2"; shift 2 ;;
    --worker-cpus) worker_cpus="$2"; shift 2 ;;
    --worker-gpus) worker_gpus="$2"; shift 2 ;;
    --object-store-mb) object_store_mb="$2"; shift 2 ;;
    --token-file) token_file="$2"; shift 2 ;;
    --timeout) timeout="$2"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument '$1'" ;;
  esac
done

for name in workers base_port head_cpus worker_cpus worker_gpus object_store_mb timeout; do
  is_uint "${!name}" || die "--${name//_/-} must be a non-negative integer, got '${!name}'"
done
(( workers >= 1 && workers <= 32 )) || die "--workers must be in 1..32, got $workers"
(( base_port >= 1024 && base_port + 1000 + 100 * (workers + 1) <= 65535 )) \
  || die "--base-port $base_port leaves no room for $workers workers (needs B >= 1024 and B+$((1000 + 100 * (workers + 1))) <= 65535)"
(( object_store_mb >= 75 )) || die "--object-store-mb must be at least 75 (Ray's minimum), got $object_store_mb"

ray_bin="${RAY_BIN:-}"
if [[ -z "$ray_bin" ]]; then
  if [[ -x "$repo/.venv/bin/ray" ]]; then ray_bin="$repo/.venv/bin/ray"; else ray_bin="$(command -v ray || true)"; fi
fi
[[ -n "$ray_bin" && -x "$ray_bin" ]] || die "no 'ray' executable: run 'make install' or set RAY_BIN"

mkdir -p "$dir/logs"
dir="$(cd "$dir" && pwd)"
pid_file="$dir/pids"

proc_starttime() {  # field 22 of /proc/PID/stat: the process start time, which tells a reused pid apart
  local stat fields
  stat="$(cat "/proc/$1/stat" 2>/dev/null)" || return 1
  read -r -a fields <<< "${stat##*) }"  # the fields after "pid (comm) ", comm may hold spaces
  echo "${fields[19]}"
}

# One cluster per directory: refuse to start over a live one.
if [[ -s "$pid_file" ]]; then
  while read -r node pid starttime; do
    if [[ "$(proc_starttime "$pid" || true)" == "$starttime" ]]; then
      die "a cluster started from $dir is still running ($node, pid $pid); run cluster/local/stop.sh --dir $dir"
    fi
  done < "$pid_file"
fi
: > "$pid_file"

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
for port in "$base_port" $((base_port + 1)) $((base_port + 2)); do
  if port_in_use "$port"; then die "port $port is in use on 127.0.0.1: choose another --base-port"; fi
done

# The token: an existing file the caller names, else a fresh 256-bit one in DIR (never ~/.ray/auth_token).
if [[ -n "$token_file" ]]; then
  [[ -s "$token_file" ]] || die "--token-file $token_file does not exist or is empty"
  token_file="$(cd "$(dirname "$token_file")" && pwd)/$(basename "$token_file")"
else
  token_file="$dir/auth_token"
  if [[ ! -s "$token_file" ]]; then
    (umask 077 && od -An -N32 -tx1 /dev/urandom | tr -d ' \n' > "$token_file")
  fi
fi

# The environment every node starts with: the caller's (S3 settings such as AWS_ENDPOINT_URL and the
# AWS credentials reach every task this way), with `ray`'s own bin folder first on PATH so that a job's
# `python` is the Python that runs Ray. RAY_AUTH_TOKEN is unset so that the token file is the only
# source of the token (it would take precedence over RAY_AUTH_TOKEN_PATH).
node_env=(
  env -u RAY_AUTH_TOKEN -u RAY_ADDRESS -u RAY_API_SERVER_ADDRESS
  PATH="$(dirname "$ray_bin"):$PATH"
  RAY_AUTH_MODE=token
  RAY_AUTH_TOKEN_PATH="$token_file"
  RAY_USAGE_STATS_ENABLED=0
  RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="${RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S:-0}"
)

gcs_address="127.0.0.1:$base_port"
dashboard_port=$((base_port + 1))

start_node() {  # start_node NAME INDEX ARGS... : one `ray start --block` in the background, recorded by pid
  local name="$1" index="$2"; shift 2
  local p=$((base_port + 10 * (index + 1))) w=$((base_port + 1000 + 100 * index))
  mkdir -p "$dir/$name"
  # setsid: each node leads its own session, away from the caller's terminal signals and process group.
  setsid "${node_env[@]}" "$ray_bin" start --block \
    --temp-dir "$dir/$name" \
    --node-manager-port "$p" --object-manager-port $((p + 1)) \
    --dashboard-agent-listen-port $((p + 2)) --dashboard-agent-grpc-port $((p + 3)) \
    --metrics-export-port $((p + 4)) --runtime-env-agent-port $((p + 5)) \
    --min-worker-port "$w" --max-worker-port $((w + 99)) \
    --object-store-memory $((object_store_mb * 1024 * 1024)) \
    --disable-usage-stats \
    "$@" < /dev/null > "$dir/logs/$name.log" 2>&1 &
  local pid=$!
  echo "$name $pid $(proc_starttime "$pid" || echo 0)" >> "$pid_file"
  wait_started "$name" "$pid"
}

wait_started() {  # wait until the node has registered with the GCS (`ray start` then prints this line)
  local name="$1" pid="$2" waited=0
  until grep -q "Ray runtime started" "$dir/logs/$name.log" 2>/dev/null; do
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "start.sh: node $name (pid $pid) exited during start-up; the end of $dir/logs/$name.log:" >&2
      tail -n 30 "$dir/logs/$name.log" >&2 || true
      fail
    fi
    if (( waited >= timeout * 10 )); then
      echo "start.sh: node $name did not start within ${timeout}s; see $dir/logs/$name.log" >&2
      fail
    fi
    sleep 0.1
    waited=$((waited + 1))
  done
  echo "start.sh: node $name up (pid $pid)"
}

fail() {
  "$here/stop.sh" --dir "$dir" >&2 || true
  exit 1
}
trap 'echo "start.sh: interrupted" >&2; fail' INT TERM

start_node head 0 --head --port "$base_port" \
  --include-dashboard true --dashboard-host 127.0.0.1 --dashboard-port "$dashboard_port" \
  --ray-client-server-port $((base_port + 2)) \
  --num-cpus "$head_cpus" --num-gpus 0 --resources '{"local_head": 1}'

for i in $(seq 1 "$workers"); do
  start_node "worker$i" "$i" --address "$gcs_address" \
    --num-cpus "$worker_cpus" --num-gpus "$worker_gpus" --resources "{\"local_worker$i\": 1}"
done

cat > "$dir/cluster.env" <<EOF
# Client environment for the local Ray cluster started from $dir (source it).
export RAY_ADDRESS=$gcs_address
export RAY_API_SERVER_ADDRESS=http://127.0.0.1:$dashboard_port
export RAY_AUTH_MODE=token
export RAY_AUTH_TOKEN_PATH=$token_file
EOF

echo "start.sh: head + $workers workers running; dashboard http://127.0.0.1:$dashboard_port (token required)"
echo "start.sh: source $dir/cluster.env, then e.g. ray job submit --working-dir . -- python -m jobs.reproduce --config debug"
echo "start.sh: stop with cluster/local/stop.sh --dir $dir"
