#!/usr/bin/env bash
# Cloud TPU VMs for pnapo_jax: create, ship the code, set up, run on every worker, follow, delete.
# Each step is one gcloud command; --dry-run prints them instead of running them. See launch/README.md.
#
#   launch/tpu.sh [--dry-run] COMMAND --name=NAME --zone=ZONE [options] [-- --config.x=y ...]
#
#   create  --type=v5p-8 [--version=RUNTIME] [--spot] [--queued]   a TPU VM, or a queued resource (--queued)
#   status  [--queued]                                              describe it
#   ship    [--ref=HEAD]                                            git archive of REF onto every worker
#   setup   [--python=python3.11]                                   venv ~/venv with pip install ~/pnapo_jax[tpu]
#   run     --workdir=gs://... [--config=configs/flux_tpu.py] [--env=K=V ...] [-- overrides]
#                                                                   train on every worker, detached
#   logs    [--worker=0]                                            follow a worker's training log
#   stop                                                            SIGTERM the run: it checkpoints and exits
#   delete  [--queued]                                              delete the TPU (and its queued resource)
set -euo pipefail

usage() { sed -n '2,18s/^# \{0,1\}//p' "$0"; exit "${1:-0}"; }
die() { echo "tpu.sh: $*" >&2; exit 2; }

# One word quoted for bash: bare when nothing in it is special, else single-quoted.
q() {
  if [[ $1 =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then printf '%s' "$1"; else printf "'%s'" "${1//\'/\'\\\'\'}"; fi
}
quote_all() { local out=() w; for w in "$@"; do out+=("$(q "$w")"); done; echo "${out[*]}"; }
# Run a command, or print it (copy-pastable) under --dry-run.
x() { if [[ $DRY_RUN == 1 ]]; then quote_all "$@"; else "$@"; fi; }

DRY_RUN=0 NAME=${TPU_NAME:-} ZONE=${TPU_ZONE:-} TYPE="" VERSION="" SPOT=0 QUEUED=0 REF=HEAD PYTHON=python3.11
CONFIG=configs/flux_tpu.py WORKDIR="" WORKER=0 ENVS=() OVERRIDES=() COMMAND=""
while (($#)); do
  case $1 in
    --dry-run) DRY_RUN=1 ;;
    --name=*) NAME=${1#*=} ;;
    --zone=*) ZONE=${1#*=} ;;
    --type=*) TYPE=${1#*=} ;;
    --version=*) VERSION=${1#*=} ;;
    --spot) SPOT=1 ;;
    --queued) QUEUED=1 ;;
    --ref=*) REF=${1#*=} ;;
    --python=*) PYTHON=${1#*=} ;;
    --config=*) CONFIG=${1#*=} ;;
    --workdir=*) WORKDIR=${1#*=} ;;
    --worker=*) WORKER=${1#*=} ;;
    --env=*) ENVS+=("${1#*=}") ;;
    -h|--help) usage ;;
    --) shift; OVERRIDES=("$@"); break ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) [[ -z $COMMAND ]] || die "one command at a time, got $COMMAND and $1"; COMMAND=$1 ;;
  esac
  shift
done
[[ -n $COMMAND ]] || usage 2
[[ -n $NAME && -n $ZONE ]] || die "--name and --zone (or TPU_NAME, TPU_ZONE) are required"

TPUS=(gcloud compute tpus)
ssh_all() { x "${TPUS[@]}" tpu-vm ssh "$NAME" --zone="$ZONE" --worker=all --command="$1"; }
# shellcheck disable=SC2088  # expanded on the workers
LOG='~/pnapo_jax.log' PID='~/pnapo_jax.pid'

case $COMMAND in
  create)
    [[ -n $TYPE ]] || die "create needs --type (e.g. v5p-8, v6e-8, v5litepod-16)"
    if [[ -z $VERSION ]]; then
      case $TYPE in
        v5p-*) VERSION=v2-alpha-tpuv5 ;;
        v5litepod-*|v5e-*) VERSION=v2-alpha-tpuv5-lite ;;
        v6e-*) VERSION=v2-alpha-tpuv6e ;;
        *) die "no default runtime for $TYPE: pass --version" ;;
      esac
    fi
    spot=(); ((SPOT)) && spot=(--spot)
    if ((QUEUED)); then
      x "${TPUS[@]}" queued-resources create "$NAME" --node-id="$NAME" --zone="$ZONE" --accelerator-type="$TYPE" \
        --runtime-version="$VERSION" "${spot[@]}"
    else
      x "${TPUS[@]}" tpu-vm create "$NAME" --zone="$ZONE" --accelerator-type="$TYPE" --version="$VERSION" "${spot[@]}"
    fi ;;
  status)
    if ((QUEUED)); then x "${TPUS[@]}" queued-resources describe "$NAME" --zone="$ZONE"
    else x "${TPUS[@]}" tpu-vm describe "$NAME" --zone="$ZONE"; fi ;;
  ship)
    archive=${TMPDIR:-/tmp}/pnapo_jax-$NAME.tar.gz
    x git -C "$(cd "$(dirname "$0")/.." && pwd)" archive --format=tar.gz --output="$archive" "$REF"
    x "${TPUS[@]}" tpu-vm scp "$archive" "$NAME":pnapo_jax.tar.gz --zone="$ZONE" --worker=all
    ssh_all 'rm -rf ~/pnapo_jax && mkdir ~/pnapo_jax && tar -xzf ~/pnapo_jax.tar.gz -C ~/pnapo_jax' ;;
  setup)
    ssh_all "sudo apt-get update -q && sudo apt-get install -yq $(q "$PYTHON") $(q "$PYTHON-venv") \
&& $(q "$PYTHON") -m venv ~/venv && ~/venv/bin/pip install -q -U pip && ~/venv/bin/pip install -q ~/pnapo_jax'[tpu]'" ;;
  run)
    [[ $WORKDIR == gs://* ]] || die "run needs --workdir=gs://BUCKET/... (every worker reads and writes it)"
    env=""
    for e in "${ENVS[@]}"; do
      [[ $e =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env takes KEY=VALUE, got $e"
      env+="${e%%=*}=$(q "${e#*=}") "
    done
    args=(--config="$CONFIG" --workdir="$WORKDIR" --progress=false "${OVERRIDES[@]}")
    ssh_all "cd ~/pnapo_jax && PYTHONUNBUFFERED=1 ${env}setsid nohup ~/venv/bin/python \
-m pnapo_jax.main $(quote_all "${args[@]}") > $LOG 2>&1 < /dev/null & echo \$! > $PID" ;;
  logs)
    x "${TPUS[@]}" tpu-vm ssh "$NAME" --zone="$ZONE" --worker="$WORKER" --command="tail -n 100 -F $LOG" ;;
  stop)
    ssh_all "kill -TERM \$(cat $PID)" ;;  # as a preemption: the run checkpoints, then exits
  delete)
    if ((QUEUED)); then x "${TPUS[@]}" queued-resources delete "$NAME" --zone="$ZONE" --force --quiet
    else x "${TPUS[@]}" tpu-vm delete "$NAME" --zone="$ZONE" --quiet; fi ;;
  *) die "unknown command $COMMAND (see --help)" ;;
esac
