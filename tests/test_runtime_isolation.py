"""A local run starts its own Ray even when another cluster runs on the machine.

A bare ``ray.init()`` joins the cluster that ``ray start`` last started (found through
``$RAY_TMPDIR/ray/ray_current_cluster``) and then competes for that cluster's resources.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from cluster.runtime import init_ray
from rlhf.config import RayConfig
from rlhf.serve import free_port


@pytest.mark.timeout(180)
def test_local_ray_is_our_own_even_when_another_cluster_runs(monkeypatch):
    import ray

    temp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths live under it
    monkeypatch.setenv("RAY_TMPDIR", temp)
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    head = subprocess.Popen(
        [ray_bin, "start", "--head", f"--port={free_port()}", "--node-ip-address=127.0.0.1", "--num-cpus=1",
         "--include-dashboard=false", "--block"],
        env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        address_file = os.path.join(temp, "ray", "ray_current_cluster")
        deadline = time.time() + 60
        while not os.path.exists(address_file) and time.time() < deadline:
            time.sleep(0.5)
        assert os.path.exists(address_file), "the other cluster did not start"
        init_ray(RayConfig(num_cpus=2))
        assert ray.cluster_resources()["CPU"] == 2  # ours, not the other cluster's single CPU
        ray.shutdown()
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        head.wait(timeout=60)
        shutil.rmtree(temp, ignore_errors=True)
