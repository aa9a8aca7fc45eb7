#!/usr/bin/env bash
# Run `radfm-jax train` on every worker of a Cloud TPU VM pod slice, or of every slice of a
# multislice job, with one SSH fan-out. Every worker runs the same command; JAX finds its peers
# from the TPU metadata (radfm_jax.launch.initialize: RADFM_DISTRIBUTED=1 -> auto-detect).
#
#   launch/tpu_pod.sh TPU_NAME ZONE -- --config configs/radfm.py:model=radfm_13b,mesh=tpu_v5p_128 \
#       --workdir gs://BUCKET/runs/r1 --config.data.store=STORE --config.data.tokenizer=TOK \
#       [--config.train.steps=20000 ...]       # --config.data.store=synthetic: a throughput run
#
# Environment:
#   PROJECT       gcloud project (default: gcloud's configured one)
#   NUM_SLICES    >1 for multislice (queued resource with nodes TPU_NAME-0 .. TPU_NAME-(N-1));
#                 set mesh.dcn in the config to match, e.g. --config.mesh.dcn="[['data',N],...]"
#   REPO_DIR      checkout of radfm-jax on the workers (default: ~/radfm-jax), with .venv built by
#                 `pip install -e '.[tpu]'`
#   SETUP=1       first `git pull` and `pip install -e .[tpu]` on every worker
#   FLAGS         LIBTPU_INIT_ARGS to use instead of the recipe below ('' = none)
#
# The workdir should be a GCS path (or a shared filesystem) for a multi-host run: every host
# writes its checkpoint shards there.
set -euo pipefail

if [[ $# -lt 3 || "$3" != "--" ]]; then
  sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2   # the header above, as text
fi
TPU_NAME=$1; ZONE=$2; shift 3
TRAIN_ARGS=$(printf ' %q' "$@")
REPO_DIR=${REPO_DIR:-'~/radfm-jax'}
NUM_SLICES=${NUM_SLICES:-1}
if [[ ! "$NUM_SLICES" =~ ^[1-9][0-9]*$ ]]; then   # else bash's arithmetic error, or one slice
  echo "launch/tpu_pod.sh: NUM_SLICES=$NUM_SLICES: expected a whole number >= 1" >&2; exit 2
fi
PROJECT_FLAG=${PROJECT:+--project=$PROJECT}

# libtpu / XLA recipe for FSDP training of a dense decoder on v5p / v6e (the MaxText set):
#   --xla_tpu_scoped_vmem_limit_kib=98304           more VMEM per fusion for large dense matmuls
#   --xla_tpu_enable_async_collective_fusion=true   run collectives asynchronously, fused with
#   --xla_tpu_enable_async_collective_fusion_fuse_all_gather=true   compute ("continuation
#   --xla_tpu_enable_async_collective_fusion_multiple_steps=true    fusion"): the FSDP weight
#   --xla_tpu_overlap_compute_collective_tc=true    all-gathers of layer i+1 overlap layer i
#   --xla_enable_async_all_gather=true
#   --xla_tpu_enable_data_parallel_all_reduce_opt=true   overlap / combine the gradient
#   --xla_tpu_data_parallel_opt_different_sized_ops=true reduce-scatters across the data axis
# These are performance recipes, not correctness settings: drop any your libtpu rejects.
RECIPE="--xla_tpu_scoped_vmem_limit_kib=98304 \
--xla_tpu_enable_async_collective_fusion=true \
--xla_tpu_enable_async_collective_fusion_fuse_all_gather=true \
--xla_tpu_enable_async_collective_fusion_multiple_steps=true \
--xla_tpu_overlap_compute_collective_tc=true \
--xla_enable_async_all_gather=true \
--xla_tpu_enable_data_parallel_all_reduce_opt=true \
--xla_tpu_data_parallel_opt_different_sized_ops=true"
LIBTPU_ARGS=${FLAGS-$RECIPE}

SETUP_CMD=""
if [[ "${SETUP:-0}" == 1 ]]; then
  SETUP_CMD="git pull --ff-only && .venv/bin/pip install -q -e '.[tpu]' && "
fi
# The remote shell parses REMOTE again: every value in it is quoted for it (printf %q), except a
# leading ~/ of REPO_DIR, which the remote shell expands to the worker's home.
if [[ "$REPO_DIR" == '~' ]]; then
  REMOTE_DIR='~'
elif [[ "$REPO_DIR" == '~/'* ]]; then
  REMOTE_DIR="~/$(printf %q "${REPO_DIR#\~/}")"
else
  REMOTE_DIR=$(printf %q "$REPO_DIR")
fi
REMOTE="cd $REMOTE_DIR && ${SETUP_CMD}export RADFM_DISTRIBUTED=1 \
LIBTPU_INIT_ARGS=$(printf %q "$LIBTPU_ARGS") TF_CPP_MIN_LOG_LEVEL=1 && \
.venv/bin/radfm-jax train --no-progress$TRAIN_ARGS"

run_on() {   # $1 = TPU VM (slice) name
  gcloud compute tpus tpu-vm ssh "$1" --zone="$ZONE" $PROJECT_FLAG --worker=all \
    --command="$REMOTE"
}

if [[ "$NUM_SLICES" -le 1 ]]; then
  run_on "$TPU_NAME"
else
  # Multislice: the TPU runtime sets MEGASCALE_* on each slice's hosts; JAX joins the slices.
  pids=()
  for ((i = 0; i < NUM_SLICES; i++)); do
    run_on "$TPU_NAME-$i" & pids+=($!)
  done
  status=0
  for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
  exit $status
fi
