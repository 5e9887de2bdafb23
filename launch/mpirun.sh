#!/usr/bin/env bash
# Run mora-dist under MPI (ranks come from mpi4py; mpiexec from the venv's mpich works):
#   launch/mpirun.sh -n 2 -- run configs/run.yaml [key=value ...]
#   launch/mpirun.sh -n 8 --hosts node1,node2 -- run configs/run.yaml   (rank 0, the rendezvous, on node1)
# mpiexec (Hydra) starts the remote ranks over ssh and forwards this shell's environment to them.
set -euo pipefail
cmd=$(python -m mora_dist.distributed.launch_cmd mpirun "$@")
echo "+ $cmd" >&2
eval "exec $cmd"
