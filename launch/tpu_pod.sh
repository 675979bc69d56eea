#!/usr/bin/env bash
# Train on a Cloud TPU VM slice (one host or a pod slice) with gcloud:
# create or reuse the slice, copy this checkout to every worker, install it,
# and run ztt-train on all workers at once (--worker=all).
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: launch/tpu_pod.sh --tpu=NAME --zone=ZONE [options] [--] ZTT_TRAIN_ARGS...

  launch/tpu_pod.sh --tpu=ztt-v5e-16 --zone=us-west4-a \
      --accelerator=v5litepod-16 --create \
      --config=configs/budget.py:125m,ztt --workdir=/mnt/runs/125m_ztt \
      --config.data.path='/mnt/data/*.txt'

Steps (each printed first; --dry_run prints them and runs nothing):
  1. with --create: create the slice unless it exists (gcloud compute tpus
     tpu-vm create; with --queued through a queued resource, waiting until
     it is ACTIVE)
  2. unless --skip_install: copy this checkout (a tarball without .venv,
     runs, .git) to every worker and install it there with uv (pip-installed
     for the user if missing) into ~/ztt_jax/.venv on Python 3.11 (uv
     fetches it; the TPU VM images have 3.10, too old for jax and orbax):
     uv venv --python 3.11 .venv; uv pip install -e ".[tpu]"
  3. run ztt-train on every worker (--worker=all); each worker is one JAX
     process and jax.distributed.initialize() finds the others itself.
     It runs under setsid nohup with its output in ~/ztt_train.log on each
     worker, so it survives this SSH session ending (closing the laptop);
     this script follows the log until ztt-train exits (--background:
     returns at once). A stale /tmp/libtpu_lockfile is removed first; a
     worker where ztt-train is already running refuses to start another.
     With --queued, a queued resource that turns FAILED or SUSPENDED stops
     the wait with an error.

The workdir must be one directory that every worker sees (checkpoints are
written by all workers; metrics, tokenizer and token cache by worker 0;
ztt-train checks this at start): a Filestore NFS mount or a GCS bucket
mounted with gcsfuse at the same path on every worker (pass
--mount_bucket=BUCKET to mount gs://BUCKET at /mnt on every worker; a
gs:// workdir itself is refused). The data path is read on every worker
(put the corpus on the shared mount or copy it to each worker).

Options:
  --tpu=NAME            the TPU VM (or queued resource) name (required)
  --zone=ZONE           its zone (required)
  --project=PROJECT     gcloud project (default: gcloud's configured one)
  --accelerator=TYPE    for --create, e.g. v5litepod-16, v5p-32, v4-32,
                        v6e-16 (default v5litepod-16)
  --version=RUNTIME     TPU VM software version for --create (default: by
                        generation: v2-alpha-tpuv5-lite, v2-alpha-tpuv5,
                        tpu-ubuntu2204-base, v2-alpha-tpuv6e)
  --create              create the slice if it does not exist
  --queued              create through a queued resource (gcloud compute
                        tpus queued-resources create) instead
  --spot                ask for Spot capacity
  --skip_install        reuse the code already on the workers
  --mount_bucket=NAME   gcsfuse-mount gs://NAME at /mnt on every worker
  --background          start ztt-train (log: ~/ztt_train.log on each
                        worker) and return without following the log
  --dry_run             print the commands, run nothing
  -h, --help            this help
Every other argument goes to ztt-train.

Other routes to the same job: GKE with xpk, e.g.
  xpk workload create --cluster=CLUSTER --tpu-type=v5litepod-256 \
      --num-slices=1 --docker-image=IMAGE_WITH_THIS_PACKAGE \
      --workload=ztt-1b --command='ztt-train --config=configs/budget.py:1b --workdir=/gcs/runs/1b'
(jax.distributed.initialize() also finds the workers on GKE).
Check a config fits a slice before creating it:
  ztt-compile --config=configs/budget.py:1b --topology=v5e:16x16
USAGE
}

tpu=""
zone=""
project=""
accelerator="v5litepod-16"
version=""
create=0
queued=0
spot=0
install=1
bucket=""
background=0
dry_run=0
args=()
while (($#)); do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --tpu=*) tpu="${1#*=}" ;;
    --zone=*) zone="${1#*=}" ;;
    --project=*) project="${1#*=}" ;;
    --accelerator=*) accelerator="${1#*=}" ;;
    --version=*) version="${1#*=}" ;;
    --create) create=1 ;;
    --queued) queued=1; create=1 ;;
    --spot) spot=1 ;;
    --skip_install) install=0 ;;
    --mount_bucket=*) bucket="${1#*=}" ;;
    --background) background=1 ;;
    --dry_run|--dry-run) dry_run=1 ;;
    --) shift; args+=("$@"); break ;;
    *) args+=("$1") ;;
  esac
  shift
done
fail() { echo "tpu_pod.sh: error: $*" >&2; exit 2; }
[[ -n "$tpu" ]] || fail "--tpu=NAME is required (see --help)"
[[ -n "$zone" ]] || fail "--zone=ZONE is required (see --help)"
((${#args[@]})) || fail "no ztt-train arguments; pass at least --config=... --workdir=..."
if [[ -z "$version" ]]; then
  case "$accelerator" in
    v5litepod-*|v5e-*) version="v2-alpha-tpuv5-lite" ;;
    v5p-*) version="v2-alpha-tpuv5" ;;
    v4-*) version="tpu-ubuntu2204-base" ;;
    v6e-*) version="v2-alpha-tpuv6e" ;;
    *) fail "--accelerator=$accelerator: unknown generation; pass --version" ;;
  esac
fi

gcloud_tpu=(gcloud compute tpus)
where=("--zone=$zone")
[[ -n "$project" ]] && where+=("--project=$project")

show() {  # Prints a command, shell-quoted, on one line.
  printf '%q ' "$@" | sed 's/ $//'
  echo
}
run() {
  show "$@"
  ((dry_run)) || "$@"
}
on_all_workers() {  # Runs one shell command line on every worker.
  run "${gcloud_tpu[@]}" tpu-vm ssh "$tpu" "${where[@]}" --worker=all \
    "--command=$1"
}

# 1. The slice.
if ((create)); then
  spot_flag=()
  ((spot)) && spot_flag=(--spot)
  if ((dry_run)) || ! "${gcloud_tpu[@]}" tpu-vm describe "$tpu" "${where[@]}" \
      >/dev/null 2>&1; then
    if ((queued)); then
      run "${gcloud_tpu[@]}" queued-resources create "$tpu" "${where[@]}" \
        "--node-id=$tpu" "--accelerator-type=$accelerator" \
        "--runtime-version=$version" "${spot_flag[@]+"${spot_flag[@]}"}"
      state_cmd=("${gcloud_tpu[@]}" queued-resources describe "$tpu"
                 "${where[@]}" '--format=value(state.state)')
      show "${state_cmd[@]}"
      if ! ((dry_run)); then
        while :; do
          state="$("${state_cmd[@]}")"
          case "$state" in
            ACTIVE) break ;;
            FAILED|SUSPENDED)
              fail "queued resource $tpu is $state and will not become" \
                "ACTIVE; see why with: gcloud compute tpus queued-resources" \
                "describe $tpu ${where[*]}, then delete it" \
                "(gcloud compute tpus queued-resources delete $tpu" \
                "${where[*]}) and run this again" ;;
          esac
          sleep "${ZTT_QUEUED_POLL_S:-30}"
        done
      fi
    else
      run "${gcloud_tpu[@]}" tpu-vm create "$tpu" "${where[@]}" \
        "--accelerator-type=$accelerator" "--version=$version" \
        "${spot_flag[@]+"${spot_flag[@]}"}"
    fi
  fi
fi

# 2. The code, on every worker.
repo="$(cd "$(dirname "$0")/.." && pwd)"
if ((install)); then
  tarball="${TMPDIR:-/tmp}/ztt_jax_src.tgz"
  run tar -czf "$tarball" -C "$repo" --exclude=./.venv --exclude=./runs \
    --exclude=./.git --exclude='*.egg-info' --exclude=__pycache__ .
  run "${gcloud_tpu[@]}" tpu-vm scp "$tarball" "$tpu:ztt_jax_src.tgz" \
    "${where[@]}" --worker=all
  # jax, libtpu, orbax and grain need Python >= 3.11; the TPU VM images
  # ship 3.10, so uv (pip-installed for this user) fetches a 3.11 for the
  # venv. A .venv left from an older interpreter is rebuilt.
  # shellcheck disable=SC2016  # $uv expands on the worker.
  on_all_workers 'set -e; mkdir -p ~/ztt_jax && tar -xzf ~/ztt_jax_src.tgz -C ~/ztt_jax && cd ~/ztt_jax && { command -v uv >/dev/null || [ -x ~/.local/bin/uv ] || python3 -m pip install -q --user uv || curl -LsSf https://astral.sh/uv/install.sh | sh; } && uv=$(command -v uv || echo ~/.local/bin/uv) && { .venv/bin/python -c "import sys; sys.exit(sys.version_info < (3, 11))" 2>/dev/null || { rm -rf .venv && "$uv" venv -q --python 3.11 .venv; }; } && "$uv" pip install -q --python .venv/bin/python -e ".[tpu]"'
fi
if [[ -n "$bucket" ]]; then
  on_all_workers "set -e; command -v gcsfuse >/dev/null || { echo 'deb https://packages.cloud.google.com/apt gcsfuse-jammy main' | sudo tee /etc/apt/sources.list.d/gcsfuse.list && curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /etc/apt/trusted.gpg.d/gcsfuse.asc && sudo apt-get update -q && sudo apt-get install -y -q gcsfuse; }; sudo mkdir -p /mnt && sudo chown \"\$USER\" /mnt; mountpoint -q /mnt || gcsfuse --implicit-dirs --rename-dir-limit=200000 $(printf '%q' "$bucket") /mnt"
fi

# 3. Train: one process per worker, all at once. ztt-train runs in its own
# session (setsid nohup, output in ~/ztt_train.log on each worker), so it
# survives this SSH session ending; in the foreground the log is followed
# until ztt-train exits, and its exit status is returned. Before it starts:
# refuse if a ztt-train already holds the TPU there, and clear a stale
# /tmp/libtpu_lockfile left by a killed one.
quoted="$(printf '%q ' "${args[@]}")"
train="cd ~/ztt_jax && if pgrep -x ztt-train >/dev/null; then echo \"tpu_pod.sh: error: ztt-train is already running on \$(hostname); wait for it or stop it (pkill -x ztt-train)\" >&2; exit 2; fi; sudo -n rm -f /tmp/libtpu_lockfile || rm -f /tmp/libtpu_lockfile; setsid nohup .venv/bin/ztt-train ${quoted% } > ~/ztt_train.log 2>&1 < /dev/null &"
if ((!background)); then
  train+=" pid=\$!; tail -n +1 --pid=\$pid -f ~/ztt_train.log; wait \$pid"
fi
on_all_workers "$train"
