"""Fixtures for the launch tests: a one-node SLURM cluster."""

from __future__ import annotations

import os
import shutil

import pytest

from .slurm_cluster import LocalSlurm, missing_binaries


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


@pytest.fixture(scope="module")
def slurm_cluster():
    """A one-node SLURM cluster (munged + slurmctld + slurmd) on loopback, for this module's tests."""
    reason = None
    if os.geteuid() != 0:
        reason = "starting slurmctld/slurmd/munged as the cluster's SlurmUser needs root"
    elif missing := missing_binaries():
        reason = f"SLURM/munge binaries missing: {', '.join(missing)} (install with .ci/install_slurm.sh)"
    if reason:
        if _in_ci():
            # CI installs SLURM (.ci/install_slurm.sh) and runs as root: a missing cluster there is a
            # broken CI image, and skipping would hide that the launch path is untested.
            pytest.fail(f"CI is set but the SLURM test cluster cannot start: {reason}")
        # Outside CI this is a developer machine without root or without SLURM; the tests need a real
        # slurmctld/slurmd and there is nothing meaningful to run in their place.
        pytest.skip(reason)
    cluster = LocalSlurm()
    try:
        cluster.start()
    except Exception:
        cluster.stop()
        raise
    yield cluster
    cluster.stop()
    shutil.rmtree(cluster.root, ignore_errors=True)
