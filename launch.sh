#!/usr/bin/env bash
# launch.sh: run train.py under torchrun on one node or many, configured by environment variables.
# Every argument is passed to train.py unchanged; only a leading --help/-h is launch.sh's own.
# MASTER_ADDR/MASTER_PORT name node 0, NNODES (or NUM_NODES) and NODE_RANK (or RANK) place this node,
# NPROC_PER_NODE or WORLD_SIZE (all processes, over every node) set the process count; under Slurm
# its own variables fill in whatever is not set. NNODES=MIN:MAX or MAX_RESTARTS make the job elastic:
# torchrun's c10d rendezvous restarts it, from its newest checkpoint, when a node dies or joins.
# `./launch.sh --help` describes each variable.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

usage() {
  cat <<'EOF'
Usage: [VAR=value ...] ./launch.sh [train.py arguments ...]

Runs train.py under torchrun: a static job, or with NNODES=MIN:MAX or MAX_RESTARTS an elastic one.
All arguments go to train.py; use "./launch.sh --max-steps 3 --help" to see train.py's own flags.

Variables (explicit ones win over Slurm's):
  MASTER_ADDR     address of node 0                       (default: first Slurm host, else 127.0.0.1)
  MASTER_PORT     free TCP port on node 0                 (default: 29500)
  NNODES          number of nodes; alias NUM_NODES        (default: SLURM_NNODES, else 1)
  NODE_RANK       this node's index in [0, NNODES); alias RANK when NNODES > 1 (as in LLaMA-Factory)
                                                          (default: SLURM_NODEID, else 0)
  NPROC_PER_NODE  processes (GPUs) on this node           (default: count of CUDA_VISIBLE_DEVICES if
                  set, else of "nvidia-smi -L" GPUs, else 1 on a CPU machine)
  WORLD_SIZE      total processes over all nodes; sets NPROC_PER_NODE = WORLD_SIZE / NNODES
Elastic jobs (torchrun's c10d rendezvous at MASTER_ADDR:MASTER_PORT, whose store lives on node 0):
  NNODES=MIN:MAX  run on any number of nodes from MIN to MAX: a node that dies leaves the job on
                  the rest (from the newest checkpoint), one that starts later joins it (from a
                  checkpoint of the step the others were at). train.py gets --resume first, so a
                  restarted worker continues where the job was; give train.py --global-batch N
                  (and --save-every) so that every node count follows the same trajectory
  MAX_RESTARTS    restarts after a failure before the job gives up       (default: 3 if elastic)
  RDZV_ID         the job's name at the rendezvous              (default: SLURM_JOB_ID, else nanotune)
  RDZV_CONF       torchrun --rdzv-conf: how fast a lost node is noticed and a new rendezvous closes
                  (default: last_call_timeout=5,keep_alive_interval=2,keep_alive_max_attempt=3)
  LOCAL_ADDR      this node's address as the others reach it   (default: torchrun's, the hostname)
  NODE_RANK       in an elastic job only says which node hosts the rendezvous store: 0 does
  LAUNCH_DRY_RUN  1: print the torchrun command and exit without running it
                  (useful to check a multi-node setup on every node before starting)
  PYTHON          interpreter for "-m torch.distributed.run" when torchrun is not on PATH
  Slurm (read when SLURM_JOB_ID is set): SLURM_NNODES or SLURM_JOB_NUM_NODES, SLURM_NODEID,
                  SLURM_JOB_NODELIST (first host, via "scontrol show hostnames" when available)

Examples:
  ./launch.sh --max-steps 20                                      # single node, CPU or all its GPUs
  NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 ./launch.sh ...       # 2 nodes: run this on node 0,
  NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 ./launch.sh ...       #          and this on node 1
  WORLD_SIZE=12 NNODES=3 RANK=2 MASTER_ADDR=10.0.0.1 ./launch.sh  # 3 machines x 4 cards, 3rd machine
  srun --nodes=2 --ntasks-per-node=1 ./launch.sh ...              # Slurm: one launch.sh per node
  LAUNCH_DRY_RUN=1 NNODES=2 NODE_RANK=1 ./launch.sh               # print the command only
  NNODES=1:4 MASTER_ADDR=10.0.0.1 ./launch.sh --global-batch 64 --save-every 50   # elastic, on each node
EOF
}

if [[ "${1:-}" == "--help" || "${1:-}" == "-h" ]]; then usage; exit 0; fi

die() { echo "launch.sh: error: $*" >&2; exit 2; }
# Integers only: a typo like NNODES=2x must fail here, not as a hang at rendezvous.
positive() { [[ "$2" =~ ^[1-9][0-9]*$ ]] || die "$1 must be a positive integer, got '$2'."; }

# First host of a Slurm nodelist. scontrol expands every syntax; without it, a simple parse of the
# first entry: "node[01-04]" -> "node01", "gpu[07,09],cpu1" -> "gpu07", "a,b" -> "a".
first_host() {
  if command -v scontrol >/dev/null 2>&1; then
    local hosts; hosts="$(scontrol show hostnames "$1")"; echo "${hosts%%$'\n'*}"; return
  fi
  local re='^([^],[]*)\[([^],[-]*)[^]]*\]([^,[]*)'
  if [[ "$1" =~ $re ]]; then echo "${BASH_REMATCH[1]}${BASH_REMATCH[2]}${BASH_REMATCH[3]}"
  else echo "${1%%,*}"; fi
}

# Slurm supplies node count, node rank and the master host; explicit variables still override them.
SL_NNODES="" SL_NODEID="" SL_MASTER=""
if [[ -n "${SLURM_JOB_ID:-}" ]]; then
  SL_NNODES="${SLURM_NNODES:-${SLURM_JOB_NUM_NODES:-}}"
  SL_NODEID="${SLURM_NODEID:-}"
  if [[ -n "${SLURM_JOB_NODELIST:-}" ]]; then SL_MASTER="$(first_host "$SLURM_JOB_NODELIST")"; fi
fi

NNODES="${NNODES:-${NUM_NODES:-${SL_NNODES:-1}}}"
ELASTIC=""
if [[ "$NNODES" == *:* || -n "${MAX_RESTARTS:-}" ]]; then ELASTIC=1; fi
if [[ "$NNODES" == *:* ]]; then
  MIN_NODES="${NNODES%%:*}" MAX_NODES="${NNODES#*:}"
  positive "NNODES's MIN" "$MIN_NODES"; positive "NNODES's MAX" "$MAX_NODES"
  (( MIN_NODES <= MAX_NODES )) || die "NNODES=$NNODES: MIN must not exceed MAX."
else
  positive NNODES "$NNODES"
  MAX_NODES="$NNODES"
fi

# RANK means "node rank" only for multi-node LLaMA-Factory-style launches; on one node an inherited
# RANK is most likely a stale per-process rank, and the only valid node rank is 0 anyway.
if [[ -z "${NODE_RANK:-}" && "$MAX_NODES" -gt 1 && -n "${RANK:-}" ]]; then NODE_RANK="$RANK"; fi
NODE_RANK="${NODE_RANK:-${SL_NODEID:-0}}"
[[ "$NODE_RANK" =~ ^(0|[1-9][0-9]*)$ ]] || die "NODE_RANK must be a non-negative integer, got '$NODE_RANK'."
# An elastic job's nodes get their places at each rendezvous: a node that replaces a lost one has no range.
if [[ -z "$ELASTIC" ]] && (( NODE_RANK >= NNODES )); then
  die "NODE_RANK=$NODE_RANK is out of range: it must be in [0, NNODES=$NNODES)."
fi

MASTER_ADDR="${MASTER_ADDR:-${SL_MASTER:-127.0.0.1}}"
MASTER_PORT="${MASTER_PORT:-29500}"
positive MASTER_PORT "$MASTER_PORT"

# Processes per node. WORLD_SIZE (first seed's meaning: all processes on all nodes) is divided by
# NNODES; otherwise count this node's GPUs; a machine without GPUs runs one CPU process.
gpu_count() {
  local n=0
  if [[ -n "${CUDA_VISIBLE_DEVICES+set}" ]]; then    # set (even empty) = what CUDA will see
    local ids="${CUDA_VISIBLE_DEVICES//[[:space:]]/}"
    [[ -n "$ids" ]] && n=$(( $(tr -cd ',' <<<"$ids" | wc -c) + 1 ))
  elif command -v nvidia-smi >/dev/null 2>&1; then
    n="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)"
  fi
  echo $(( n > 0 ? n : 1 ))
}
if [[ -n "${WORLD_SIZE:-}" ]]; then
  [[ -z "$ELASTIC" ]] || die "WORLD_SIZE fixes the process count, which an elastic job changes; set NPROC_PER_NODE."
  positive WORLD_SIZE "$WORLD_SIZE"
  (( WORLD_SIZE % NNODES == 0 )) || die "WORLD_SIZE=$WORLD_SIZE (all processes) is not divisible by NNODES=$NNODES."
  PER_NODE=$(( WORLD_SIZE / NNODES ))
  if [[ -n "${NPROC_PER_NODE:-}" && "$NPROC_PER_NODE" != "$PER_NODE" ]]; then
    die "WORLD_SIZE=$WORLD_SIZE / NNODES=$NNODES gives $PER_NODE per node, contradicting NPROC_PER_NODE=$NPROC_PER_NODE."
  fi
  NPROC_PER_NODE="$PER_NODE"
fi
NPROC_PER_NODE="${NPROC_PER_NODE:-$(gpu_count)}"
positive NPROC_PER_NODE "$NPROC_PER_NODE"

# torchrun sets WORLD_SIZE/RANK for each child itself; drop our inputs so nothing stale leaks through.
unset WORLD_SIZE RANK

if command -v torchrun >/dev/null 2>&1; then RUN=(torchrun)
else RUN=("${PYTHON:-python3}" -m torch.distributed.run); fi
if [[ -z "$ELASTIC" ]]; then
  CMD=("${RUN[@]}" --nnodes "$NNODES" --nproc_per_node "$NPROC_PER_NODE" --node_rank "$NODE_RANK"
       --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" "$HERE/train.py" "$@")
else
  MAX_RESTARTS="${MAX_RESTARTS:-3}"
  [[ "$MAX_RESTARTS" =~ ^(0|[1-9][0-9]*)$ ]] || die "MAX_RESTARTS must be a non-negative integer, got '$MAX_RESTARTS'."
  # Node 0 hosts the rendezvous store (is_host): on one machine every agent would otherwise try to.
  CONF="${RDZV_CONF:-last_call_timeout=5,keep_alive_interval=2,keep_alive_max_attempt=3},is_host=$(( NODE_RANK == 0 ))"
  # Without TORCH_DISABLE_SHARE_RDZV_TCP_STORE a running agent reuses its first store, and the round
  # after a node joins fails (DistStoreError after 60 s; pytorch/pytorch#135712). SIGUSR1 (Slurm's
  # --signal=USR1@N) is forwarded to the workers like SIGTERM, so they checkpoint before they stop.
  CMD=(env TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 "${RUN[@]}" --nnodes "$NNODES" --nproc_per_node "$NPROC_PER_NODE"
       --max-restarts "$MAX_RESTARTS" --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT"
       --rdzv-id "${RDZV_ID:-${SLURM_JOB_ID:-nanotune}}" --rdzv-conf "$CONF"
       ${LOCAL_ADDR:+--local-addr "$LOCAL_ADDR"} --signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1
       "$HERE/train.py" --resume "$@")
fi

# One line, shell-quoted, so it can be copied and rerun by hand.
printf -v LINE ' %q' "${CMD[@]}"
echo "launch.sh:$LINE"
if [[ -n "${LAUNCH_DRY_RUN:-}" && "${LAUNCH_DRY_RUN}" != "0" ]]; then exit 0; fi
exec "${CMD[@]}"
