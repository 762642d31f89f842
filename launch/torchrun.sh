#!/usr/bin/env bash
# Launch lcv-train on this node under torchrun (torch.distributed.run) with elastic restarts for faults;
# a configuration error (the trainer exits 2, on any node) stops every node at once with one line, exit 2.
#
#   launch/torchrun.sh [hydra overrides...]          # every argument goes to `-m lcv_train`
#
# One node, all local GPUs (or one process on a CPU-only box):
#   launch/torchrun.sh stage=video_pretrain parallel=fsdp_cp4
# Several nodes (run the same line on each node; the node whose name or address is the endpoint's host
# hosts the rendezvous store, and the job cannot outlive that node):
#   LCV_NNODES=4 LCV_RDZV_ENDPOINT=node001:29400 LCV_RUN_NAME=vp1 launch/torchrun.sh ...
# Surviving the loss of any node: run the store outside the training agents (on a machine that is not
# one of the nodes, or one that stays up), and point every node at it with LCV_RDZV_IS_HOST=0:
#   store-host$ python launch/rdzv_store.py 0.0.0.0:29400
#   every node$ LCV_RDZV_IS_HOST=0 LCV_NNODES=4 LCV_RDZV_ENDPOINT=store-host:29400 LCV_RUN_NAME=vp1 launch/torchrun.sh ...
# A lost node ends the attempt on the others (at once when its processes die, else after
# trainer.collective_timeout_s); they wait up to LCV_RDZV_TIMEOUT for it (or a replacement running the
# same line) and resume together from the latest checkpoint. README "When a node dies".
#
# Settings (environment; unset = default):
#   LCV_NPROC_PER_NODE  workers on this node   NPROC_PER_NODE, else the number of visible GPUs, else 1
#   LCV_NNODES          nodes, or MIN:MAX      NNODES, else SLURM_JOB_NUM_NODES, else 1
#   LCV_RDZV_ENDPOINT   c10d store HOST:PORT   MASTER_ADDR:MASTER_PORT; required when nnodes != 1;
#                                              one node: localhost on a free port (like --standalone)
#   LCV_RDZV_ID         rendezvous id          SLURM_JOB_ID, else "lcv-train"
#   LCV_RDZV_IS_HOST    1: this node hosts     torch's guess from the endpoint's host name
#                       the c10d store         (train.sbatch: SLURM node 0)
#   LCV_MAX_RESTARTS    group restarts         3 (each restart resumes from the latest checkpoint; a lost
#                                              node costs one on every surviving node)
#   LCV_RDZV_TIMEOUT    seconds to wait for    600 (torch's join_timeout): how long nodes wait for the
#                       every node             others, at the start and after a failure
#   OMP_NUM_THREADS     threads per worker     CPUs available here / workers per node
#   LCV_RUN_NAME        run.name, all ranks    a run.name=... argument wins; else a timestamp taken
#                                              here (several nodes: required)
#   LCV_TORCHRUN_ARGS   extra torchrun flags, word-split (e.g. "--log-dir logs/torchrun --tee 3")
#   PYTHON              interpreter            python, else python3
#   LCV_DRY_RUN=1       print the command line and exit
set -euo pipefail

py=${PYTHON:-}
if [[ -z $py ]]; then
    py=$(command -v python || command -v python3 || true)
    [[ -n $py ]] || { echo "torchrun.sh: no python on PATH (set PYTHON)" >&2; exit 2; }
fi

count_gpus() {
    if [[ -n ${CUDA_VISIBLE_DEVICES+x} ]]; then
        # Set but empty means "no GPUs"; otherwise a comma-separated list.
        [[ -z $CUDA_VISIBLE_DEVICES ]] && { echo 0; return; }
        local IFS=,
        local ids=($CUDA_VISIBLE_DEVICES)
        echo ${#ids[@]}
    elif command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true
    else
        echo 0
    fi
}

nproc_per_node=${LCV_NPROC_PER_NODE:-${NPROC_PER_NODE:-}}
if [[ -z $nproc_per_node ]]; then
    nproc_per_node=$(count_gpus)
    (( nproc_per_node > 0 )) || nproc_per_node=1
fi
nnodes=${LCV_NNODES:-${NNODES:-${SLURM_JOB_NUM_NODES:-1}}}

endpoint=${LCV_RDZV_ENDPOINT:-}
if [[ -z $endpoint && -n ${MASTER_ADDR:-} ]]; then
    endpoint=$MASTER_ADDR:${MASTER_PORT:-29400}
fi
if [[ -z $endpoint ]]; then
    if [[ $nnodes != 1 ]]; then
        echo "torchrun.sh: LCV_NNODES=$nnodes needs LCV_RDZV_ENDPOINT=HOST:PORT (same on every node)" >&2
        exit 2
    fi
    endpoint=localhost:0   # torchrun picks a free port, as with --standalone
fi

if [[ -z ${OMP_NUM_THREADS:-} ]]; then
    cpus=$(nproc 2>/dev/null || echo 1)
    OMP_NUM_THREADS=$(( cpus / nproc_per_node > 0 ? cpus / nproc_per_node : 1 ))
    export OMP_NUM_THREADS
fi

# One run name for every rank and every elastic restart, fixed here rather than by each worker's
# config (its default is a timestamp, which would differ between ranks and between restarts, and a
# restarted group must find the previous attempt's checkpoints). A run.name=... argument wins.
run_name_given=0
for a in "$@"; do
    [[ $a == run.name=* || $a == +run.name=* || $a == ++run.name=* ]] && run_name_given=1
done
run_name=${LCV_RUN_NAME:-}
if [[ $run_name_given == 0 && -z $run_name ]]; then
    if [[ $nnodes != 1 ]]; then
        echo "torchrun.sh: several nodes need one run name: set LCV_RUN_NAME or pass run.name=..." >&2
        exit 2
    fi
    run_name=$(date +%Y%m%d-%H%M%S)
fi
name_arg=()
[[ $run_name_given == 0 ]] && name_arg=("run.name=$run_name")

# Workers get a fresh TCPStore for every restart of the group. With the default (the workers share the
# rendezvous agent's store, which lives on across restarts), a restarted group finds the previous
# attempt's keys there, and init_process_group connects to the dead workers' addresses.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}

# launch/elastic.py is torchrun, except that a worker's configuration error stops it (exit 2) instead of
# restarting the group.
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cmd=("$py" "$here/elastic.py"
     --nnodes "$nnodes"
     --nproc-per-node "$nproc_per_node"
     --rdzv-backend c10d
     --rdzv-endpoint "$endpoint"
     --rdzv-id "${LCV_RDZV_ID:-${SLURM_JOB_ID:-lcv-train}}"
     --max-restarts "${LCV_MAX_RESTARTS:-3}")
# Which node hosts the c10d store. torch guesses by comparing the endpoint with this machine's names
# and addresses, which fails where the scheduler's node names are aliases; train.sbatch sets
# LCV_RDZV_FROM_SLURM=1 (endpoint = first node of the job), so there it is SLURM node 0.
is_host=${LCV_RDZV_IS_HOST:-}
if [[ -z $is_host && ${LCV_RDZV_FROM_SLURM:-0} == 1 && -n ${SLURM_NODEID:-} ]]; then
    is_host=$(( SLURM_NODEID == 0 ? 1 : 0 ))
fi
rdzv_conf="join_timeout=${LCV_RDZV_TIMEOUT:-600}"
[[ -n $is_host ]] && rdzv_conf+=",is_host=$is_host"
cmd+=(--rdzv-conf "$rdzv_conf")
# shellcheck disable=SC2206  # word splitting is the point
[[ -n ${LCV_TORCHRUN_ARGS:-} ]] && cmd+=($LCV_TORCHRUN_ARGS)
cmd+=(-m lcv_train "${name_arg[@]}" "$@")

echo "torchrun.sh [$(hostname)] OMP_NUM_THREADS=$OMP_NUM_THREADS ${cmd[*]}" >&2
[[ ${LCV_DRY_RUN:-0} == 1 ]] && exit 0
exec "${cmd[@]}"
