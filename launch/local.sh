#!/usr/bin/env bash
# One training process on this machine (CPU, or the local GPU/TPU).
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: launch/local.sh [--devices=N] [--dry_run] [--] ZTT_TRAIN_ARGS...

Runs one ztt-train process on this machine, e.g.

  launch/local.sh --config=configs/default.py --workdir=runs/demo
  launch/local.sh --devices=8 --config=configs/tiny.py --workdir=runs/mesh \
      --config.mesh.data=2 --config.mesh.fsdp=2 --config.mesh.tensor=2

Options:
  --devices=N   split the host CPU into N JAX devices (JAX_PLATFORMS=cpu),
                to try a data/fsdp/tensor mesh without an accelerator
  --dry_run     print the command instead of running it
  -h, --help    this help
Every other argument goes to ztt-train (ztt-train --help lists them).
Environment: PYTHON (default python3) runs `-m ztt_jax.commands.train`.
USAGE
}

devices=""
dry_run=0
args=()
while (($#)); do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --dry_run|--dry-run) dry_run=1 ;;
    --devices=*) devices="${1#*=}" ;;
    --) shift; args+=("$@"); break ;;
    *) args+=("$1") ;;
  esac
  shift
done
if [[ -n "$devices" && ! "$devices" =~ ^[1-9][0-9]*$ ]]; then
  echo "local.sh: error: --devices=$devices must be a positive integer" >&2
  exit 2
fi

cmd=()
if [[ -n "$devices" ]]; then
  cmd+=(env JAX_PLATFORMS=cpu "JAX_NUM_CPU_DEVICES=$devices")
fi
cmd+=("${PYTHON:-python3}" -m ztt_jax.commands.train "${args[@]}")

if ((dry_run)); then
  printf '%q ' "${cmd[@]}" | sed 's/ $//'
  echo
  exit 0
fi
exec "${cmd[@]}"
