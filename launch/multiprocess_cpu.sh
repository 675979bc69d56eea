#!/usr/bin/env bash
# N JAX processes on this machine, CPU devices, one global mesh: the
# multi-host code path (jax.distributed, per-process data, Orbax
# multi-process checkpoints) without a cluster.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: launch/multiprocess_cpu.sh [--num_processes=2] [--devices_per_process=2]
                                  [--port=PORT] [--dry_run] [--] ZTT_TRAIN_ARGS...

Starts --num_processes ztt-train processes on 127.0.0.1, each with
--devices_per_process CPU devices (cross-process collectives over gloo), so
they form one mesh of num_processes * devices_per_process devices; e.g.

  launch/multiprocess_cpu.sh --config=configs/tiny.py --workdir=runs/mp \
      --config.mesh.data=2 --config.mesh.fsdp=2

Process i gets --coordinator_address=127.0.0.1:PORT --num_processes=N
--process_id=i. Output lines are prefixed [process i]; only process 0 writes
metrics. If one process fails the others are stopped.

Options:
  --num_processes=N        processes (default 2)
  --devices_per_process=D  CPU devices per process (default 2)
  --port=PORT              coordinator port (default: a free port)
  --program="CMD ..."      what each process runs (default:
                           "$PYTHON -m ztt_jax.commands.train", PYTHON=python3)
  --dry_run                print the commands instead of running them
  -h, --help               this help
Every other argument goes to every process's ztt-train.
USAGE
}

num_processes=2
devices=2
port=""
dry_run=0
program="${PYTHON:-python3} -m ztt_jax.commands.train"
args=()
while (($#)); do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --dry_run|--dry-run) dry_run=1 ;;
    --num_processes=*) num_processes="${1#*=}" ;;
    --devices_per_process=*) devices="${1#*=}" ;;
    --port=*) port="${1#*=}" ;;
    --program=*) program="${1#*=}" ;;
    --) shift; args+=("$@"); break ;;
    *) args+=("$1") ;;
  esac
  shift
done
for pair in "num_processes=$num_processes" "devices_per_process=$devices"; do
  if [[ ! "${pair#*=}" =~ ^[1-9][0-9]*$ ]]; then
    echo "multiprocess_cpu.sh: error: --$pair must be a positive integer" >&2
    exit 2
  fi
done
if [[ -z "$port" ]]; then
  port="$("${PYTHON:-python3}" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
fi
read -r -a program_words <<<"$program"

process_cmd() {  # The command of process $1, into the array `cmd`.
  cmd=(env JAX_PLATFORMS=cpu "JAX_NUM_CPU_DEVICES=$devices"
       JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo
       "${program_words[@]}" "--coordinator_address=127.0.0.1:$port"
       "--num_processes=$num_processes" "--process_id=$1" "${args[@]}")
}

if ((dry_run)); then
  for ((i = 0; i < num_processes; i++)); do
    process_cmd "$i"
    printf '%q ' "${cmd[@]}" | sed 's/ $//'
    echo
  done
  exit 0
fi

pids=()
stop_all() {
  local pid
  for pid in "${pids[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
}
trap stop_all INT TERM
for ((i = 0; i < num_processes; i++)); do
  process_cmd "$i"
  "${cmd[@]}" > >(sed -u "s/^/[process $i] /") 2>&1 &
  pids+=("$!")
done
status=0
left=("${pids[@]}")
while ((${#left[@]})); do  # Poll, so a failed process stops the rest.
  still=()
  for pid in "${left[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then
      still+=("$pid")
    elif ! wait "$pid"; then
      status=1
      stop_all
    fi
  done
  left=("${still[@]+"${still[@]}"}")
  ((${#left[@]})) && sleep 0.5
done
wait  # The output filters.
exit "$status"
