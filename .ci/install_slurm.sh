#!/usr/bin/env bash
# Install a single-node SLURM (slurmctld, slurmd, client tools) and munge from
# Debian/Ubuntu packages, for tests/launch/test_slurm.py. Idempotent and quiet:
# does nothing when the binaries are already there. Must run as root.
#
# The packages' own services are not used: the test fixture writes its own
# slurm.conf and munge key under a tmp dir and starts the daemons itself.
set -euo pipefail

export PATH="$PATH:/usr/sbin:/sbin"   # the daemons live in sbin
need=(sbatch srun scontrol sinfo slurmctld slurmd munged)
missing=0
for bin in "${need[@]}"; do
    command -v "$bin" >/dev/null 2>&1 || missing=1
done
if [[ $missing == 0 ]]; then
    exit 0
fi

if [[ $(id -u) != 0 ]]; then
    echo "install_slurm.sh: must run as root (apt-get)" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
log=$(mktemp)
trap 'rm -f "$log"' EXIT
if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends \
        slurmctld slurmd slurm-client munge; } >"$log" 2>&1; then
    cat "$log" >&2
    echo "install_slurm.sh: apt-get failed" >&2
    exit 1
fi

# The packages try to start their services; in containers without systemd this
# fails harmlessly. Stop anything that did start so the fixture owns the ports.
for svc in slurmd slurmctld munge; do
    service "$svc" stop >/dev/null 2>&1 || true
done
echo "install_slurm.sh: installed $(slurmctld -V 2>/dev/null || echo slurm)"
