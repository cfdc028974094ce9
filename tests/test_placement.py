"""The placement planner: pure plans over node resource dicts, then real placement groups on a
two-node local cluster whose nodes carry fake GPUs and custom resources (loopback only)."""

from __future__ import annotations

import os
import time

import pytest

from cluster.placement import NODE_RESOURCE_UNIT, Node, RoleRequest, nodes_from_ray, place, plan
from cluster.runtime import ResourceError

HEAD = Node("head0000aaaa", "10.0.0.1", {"CPU": 4.0, "memory": 8e9})
TRAIN = Node("train000bbbb", "10.0.0.2", {"CPU": 16.0, "GPU": 4.0, "rlhf_train": 1.0})
ROLLOUT = Node("rollout0cccc", "10.0.0.3", {"CPU": 8.0, "GPU": 2.0, "rlhf_rollout": 1.0})
NODES = [HEAD, TRAIN, ROLLOUT]
GPU1 = {"CPU": 1, "GPU": 1}


def role(name, n, bundle=GPU1, node_resource=None, strategy="PACK"):
    return RoleRequest(name, tuple([bundle] * n), strategy, node_resource)


def test_each_role_lands_where_it_asks():
    result = plan([
        role("policy", 2, node_resource="rlhf_train"),
        role("critic", 2, node_resource="rlhf_train"),
        role("rollout", 2, node_resource="rlhf_rollout", strategy="SPREAD"),  # one such node: both there
        role("reference", 1, {"CPU": 1}),
    ], NODES)
    assert result.assignment == {
        "policy": [TRAIN.node_id] * 2,
        "critic": [TRAIN.node_id] * 2,
        "rollout": [ROLLOUT.node_id] * 2,
        "reference": [HEAD.node_id],  # tightest fit for a CPU-only bundle: the GPU nodes stay free
    }
    assert "policy: 2 x {CPU 1, GPU 1} PACK -> 2 on 10.0.0.2 (train000)" in result.describe()
    assert role("policy", 1, node_resource="rlhf_train").ray_bundles == [
        {"CPU": 1.0, "GPU": 1.0, "rlhf_train": NODE_RESOURCE_UNIT}]


def test_strategies():
    two_gpu_nodes = [TRAIN, ROLLOUT]
    assert plan([role("r", 2, strategy="SPREAD")], two_gpu_nodes).assignment["r"] == [ROLLOUT.node_id, TRAIN.node_id]
    assert plan([role("r", 2, strategy="PACK")], two_gpu_nodes).assignment["r"] == [ROLLOUT.node_id] * 2
    assert plan([role("r", 5)], two_gpu_nodes).assignment["r"] == [TRAIN.node_id] * 4 + [ROLLOUT.node_id]
    with pytest.raises(ResourceError, match=r"r needs CPU 5, GPU 5 .*STRICT_PACK.*no node has room for all"):
        plan([role("r", 5, strategy="STRICT_PACK")], two_gpu_nodes)
    with pytest.raises(ResourceError, match=r"Bundle 2 .*no node with room left on a node of its own"):
        plan([role("r", 3, strategy="STRICT_SPREAD")], two_gpu_nodes)


def test_a_cluster_too_small_is_named_by_role_and_resource():
    with pytest.raises(ResourceError, match=r"^policy needs CPU 5, GPU 5 in 5 bundles \(PACK\); the nodes with "
                       r"'rlhf_train' have CPU 16, GPU 4: missing GPU 1\. Bundle 4 .*finds no node with room left"):
        plan([role("policy", 5, node_resource="rlhf_train")], NODES)
    with pytest.raises(ResourceError, match=r"^critic needs .*GPU 1.* have CPU 12, GPU 0 left after policy: missing GPU 1"):
        plan([role("policy", 4, node_resource="rlhf_train"), role("critic", 1, node_resource="rlhf_train")], NODES)
    with pytest.raises(ResourceError, match=r"rollout asks for nodes with the custom resource 'rlhf_gen', but no "
                       r"node offers it \(the nodes offer: CPU, GPU, rlhf_rollout, rlhf_train\)"):
        plan([role("rollout", 1, node_resource="rlhf_gen")], NODES)
    with pytest.raises(ResourceError, match=r"policy needs .*GPU 8.*fits on no single node; the largest, 10\.0\.0\.2 "
                       r"\(train000\), has CPU 16, GPU 4: missing GPU 4"):
        plan([role("policy", 1, {"CPU": 1, "GPU": 8})], NODES)


def test_requests_from_config_like_mappings():
    policy = RoleRequest.from_dict("policy", {"bundles": 2, "cpus": 4, "gpus": 1, "node_resource": "rlhf_train"})
    assert policy == RoleRequest("policy", ({"CPU": 4.0, "GPU": 1.0},) * 2, "PACK", "rlhf_train")
    explicit = RoleRequest.from_dict("rollout", {"bundles": [{"CPU": 2, "GPU": 1}], "strategy": "SPREAD"})
    assert explicit.bundles == ({"CPU": 2, "GPU": 1},) and explicit.strategy == "SPREAD"
    with pytest.raises(ValueError, match="policy: unknown keys gpu; valid keys: bundles, cpus"):
        RoleRequest.from_dict("policy", {"gpu": 1})
    with pytest.raises(ValueError, match="strategy 'TIGHT' is not one of PACK"):
        RoleRequest.from_dict("policy", {"strategy": "TIGHT"})
    with pytest.raises(ValueError, match="asked for twice"):
        plan([role("policy", 1), role("policy", 1)], NODES)


def test_nodes_from_ray_keeps_alive_nodes_without_ip_markers():
    ray_nodes = [
        {"NodeID": "a" * 8, "NodeManagerAddress": "10.0.0.1", "Alive": True,
         "Resources": {"CPU": 2.0, "node:10.0.0.1": 1.0, "node:__internal_head__": 1.0}},
        {"NodeID": "b" * 8, "NodeManagerAddress": "10.0.0.2", "Alive": False, "Resources": {"CPU": 8.0}},
    ]
    assert nodes_from_ray(ray_nodes) == [Node("a" * 8, "10.0.0.1", {"CPU": 2.0})]


# --------------------------------------------------------------------------------------------------
# A real two-node cluster on this machine: fake GPUs, a custom resource per node
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    import ray

    from test_jobs import RayNodes

    # This process's driver and the nodes must agree on the auth mode (an earlier local Ray in this
    # process may have turned token mode on, with the token in ~/.ray/auth_token).
    mode = os.environ.get("RAY_AUTH_MODE", "disabled")
    nodes = RayNodes(tmp_path_factory.mktemp("ray2"), {**os.environ, "RAY_AUTH_MODE": mode})
    try:
        nodes.start_head(num_cpus=1, num_gpus=1, resources='{"rlhf_rollout": 1}', dashboard=False)
        nodes.add_worker(num_cpus=2, num_gpus=2, resources={"rlhf_train": 1})
        ray.init(address=f"127.0.0.1:{nodes.gcs_port}")  # not init_ray: keep this process on loopback
        nodes._wait(lambda: len([n for n in ray.nodes() if n["Alive"]]) == 2, 60)
        yield {n["NodeManagerAddress"] + ("-head" if "node:__internal_head__" in n["Resources"] else ""): n["NodeID"]
               for n in ray.nodes() if n["Alive"]}
    finally:
        ray.shutdown()
        assert nodes.stop() == [], "left behind after the nodes were stopped"


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_placement_groups_land_where_the_plan_says(two_nodes):
    import ray
    from ray.util import placement_group_table

    head, worker = two_nodes["127.0.0.1-head"], two_nodes["127.0.0.1"]
    requests = [
        role("policy", 2, {"CPU": 0.5, "GPU": 1}, node_resource="rlhf_train", strategy="STRICT_PACK"),
        role("rollout", 1, {"CPU": 0.5, "GPU": 1}, node_resource="rlhf_rollout"),
    ]
    placement = place(requests, timeout_s=60)
    try:
        assert placement.plan.assignment == {"policy": [worker, worker], "rollout": [head]}
        assert placement.actual == placement.plan.assignment

        # Too small: named at once, before any group is made (Ray alone would wait forever).
        before = len(placement_group_table())
        with pytest.raises(ResourceError, match=r"critic needs .*GPU 1.*'rlhf_train' have .*GPU 0 left after "
                           r"policy, rollout: missing GPU 1"):
            place(requests + [role("critic", 1, node_resource="rlhf_train")], timeout_s=5)
        assert len(placement_group_table()) == before
    finally:
        placement.remove()
    deadline = time.monotonic() + 10
    while ray.available_resources().get("GPU") != 3.0:  # removal is asynchronous
        assert time.monotonic() < deadline, ray.available_resources()
        time.sleep(0.2)
