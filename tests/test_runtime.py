"""The Ray runtime: a local Ray stays on loopback; resource checks fail fast, naming what is missing."""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from cluster.runtime import ResourceError, check_resources, create_placement_group, init_ray
from rlhf.config import RayConfig

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def ray_local():
    import ray

    init_ray(RayConfig(num_cpus=2))
    yield ray
    ray.shutdown()


def test_local_ray_is_on_loopback(ray_local):
    ray = ray_local

    @ray.remote(num_cpus=0)
    def where():
        return ray.util.get_node_ip_address()

    assert [n["NodeManagerAddress"] for n in ray.nodes()] == ["127.0.0.1"]
    assert ray.get(where.remote()) == "127.0.0.1"


def test_workers_of_a_local_ray_mute_the_state_api_warning(ray_local):
    """Without a dashboard Ray Train's placement-group cleaner would warn every few seconds."""
    import logging

    from cluster.runtime import _NOISY_WITHOUT_DASHBOARD

    @ray_local.remote(num_cpus=0)
    def level(name):
        return logging.getLogger(name).getEffectiveLevel()

    assert ray_local.get(level.remote(_NOISY_WITHOUT_DASHBOARD)) == logging.ERROR
    assert ray_local.get(level.remote("ray.train")) < logging.ERROR  # only that one logger


def test_fractional_bundles_fit(ray_local):
    from ray.util.placement_group import remove_placement_group

    group = create_placement_group([{"CPU": 0.5}] * 4, strategy="PACK", timeout_s=30, what="four actors")
    assert group.bundle_count == 4
    remove_placement_group(group)


def test_missing_gpu_is_named_at_once(ray_local):
    started = time.perf_counter()
    with pytest.raises(ResourceError, match=r"policy needs .*GPU 2.*missing GPU 2"):
        create_placement_group([{"CPU": 1, "GPU": 1}] * 2, what="policy")
    assert time.perf_counter() - started < 5  # a check, not a wait


def test_too_many_cpus(ray_local):
    with pytest.raises(ResourceError, match=r"two engines needs CPU 3 in 2 bundles.*has CPU 2: missing CPU 1"):
        check_resources([{"CPU": 1.5}, {"CPU": 1.5}], what="two engines")


def test_local_ray_stays_on_loopback_when_ray_is_imported_first():
    """Ray reads its cluster switch at import; a script that imports ray before rlhf (benchmarks did)
    must still get a loopback-only local Ray."""
    import sys

    script = (
        "import ray\n"
        "from cluster.runtime import init_ray\n"
        "from rlhf.config import RayConfig\n"
        "init_ray(RayConfig(num_cpus=1))\n"
        "print('NODES', [n['NodeManagerAddress'] for n in ray.nodes()])\n"
        "ray.shutdown()\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=150, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "NODES ['127.0.0.1']" in done.stdout


def test_a_stale_build_lock_is_removed_and_a_fresh_one_kept(tmp_path, monkeypatch, caplog):
    """A DeepSpeed op build killed half way leaves torch's lock file, which would make every later
    DeepSpeed start wait forever; one minutes old is removed (logged), a fresh one is a live build's."""
    from rlhf.deepspeed_setup import clear_stale_build_locks

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    stale = tmp_path / "py311_cpu" / "deepspeed_shm_comm" / "lock"
    fresh = tmp_path / "py311_cpu" / "other_op" / "lock"
    for lock in (stale, fresh):
        lock.parent.mkdir(parents=True)
        lock.touch()
    old = time.time() - 3600
    os.utime(stale, (old, old))
    # An old lock whose build is still running (a process works in its folder) is kept...
    build = subprocess.Popen(["sleep", "60"], cwd=stale.parent)
    try:
        assert clear_stale_build_locks(max_age_s=300) == []
        assert stale.exists()
    finally:
        build.kill()
        build.wait()
    # ... and removed once nothing runs there.
    assert clear_stale_build_locks(max_age_s=300) == [str(stale)]
    assert not stale.exists() and fresh.exists()
    assert "stale build lock" in caplog.text


@pytest.mark.timeout(120)
def test_deepspeed_starts_without_building_its_inference_all_reduce_op(tmp_path):
    """DeepSpeed would compile its shared-memory all-reduce op (for inference only) when its
    communication starts on the CPU: 60-80 s on a new machine. The learners start without it."""
    import sys

    from rlhf.serve import free_port

    script = (
        "import os\n"
        "from rlhf.deepspeed_setup import import_deepspeed\n"
        "deepspeed = import_deepspeed()\n"
        "deepspeed.init_distributed(dist_backend='gloo')\n"
        "from deepspeed.comm import comm\n"
        "print('SHM OP', comm.cdb.shm_comm_op)\n"
    )
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path), "DS_ACCELERATOR": "cpu", "PYTHONPATH": os.getcwd(),
           "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "GLOO_SOCKET_IFNAME": "lo"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=110, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "SHM OP None" in done.stdout
    assert not list(tmp_path.rglob("*.so")), "an op was built"
