"""The placement planner: pure plans over node resource dicts, then real placement groups on a
two-node local cluster whose nodes carry fake GPUs and custom resources (loopback only)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import yaml

from cluster.placement import NODE_RESOURCE_UNIT, Node, RoleRequest, nodes_from_ray, place, place_actors, plan, role_layout
from cluster.runtime import ResourceError
from rlhf.config import ConfigError, load_config

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


def layout(*overrides, **replicas):
    cfg = load_config("ppo", None, list(overrides)).placement
    return role_layout(cfg, replicas or {"policy": 2, "critic": 1, "reference": 1, "reward": 1, "rollout": 1})


def test_roles_from_the_placement_config():
    requests, slots = layout("placement.cpus_per_actor=2", "placement.strategy=SPREAD",
                             "placement.roles.policy={gpus: 1, node_resource: rlhf_train, strategy: STRICT_PACK}",
                             "placement.roles.rollout={cpus: 4, gpus: 1, resources: {'accelerator_type:A10G': 0.001}}")
    assert requests == [  # planning order: learner groups, engines, then the single actors
        RoleRequest("policy", ({"CPU": 2.0, "GPU": 1.0},) * 2, "STRICT_PACK", "rlhf_train"),
        RoleRequest("critic", ({"CPU": 2.0},), "SPREAD"),
        RoleRequest("rollout", ({"CPU": 4.0, "GPU": 1.0, "accelerator_type:A10G": 0.001},), "SPREAD"),
        RoleRequest("reference", ({"CPU": 2.0},), "SPREAD"),
        RoleRequest("reward", ({"CPU": 2.0},), "SPREAD"),
    ]
    assert slots == {"policy": [("policy", 0), ("policy", 1)], "critic": [("critic", 0)], "rollout": [("rollout", 0)],
                     "reference": [("reference", 0)], "reward": [("reward", 0)]}
    # Defaults: every role one 0.25-CPU bundle per replica, PACK; a role with no replicas is left out.
    requests, _ = layout(policy=1, critic=0, reference=1, reward=1, rollout=2)
    assert [(r.role, len(r.bundles), dict(r.bundles[0]), r.strategy, r.node_resource) for r in requests] == [
        ("policy", 1, {"CPU": 0.25}, "PACK", None), ("rollout", 2, {"CPU": 0.25}, "PACK", None),
        ("reference", 1, {"CPU": 0.25}, "PACK", None), ("reward", 1, {"CPU": 0.25}, "PACK", None)]
    with pytest.raises(ValueError, match="unknown roles actor"):
        layout(actor=1)


def test_colocated_roles_share_their_hosts_bundles():
    def slots(colocate, **replicas):
        return layout(f"placement.colocate={colocate}", **replicas)[1]

    replicas = {"policy": 2, "critic": 1, "reference": 1, "reward": 1}
    assert slots("none", **replicas) == {"policy": [("policy", 0), ("policy", 1)], "critic": [("critic", 0)],
                                         "reference": [("reference", 0)], "reward": [("reward", 0)]}
    assert slots("policy_reference", **replicas)["reference"] == [("policy", 0)]
    assert slots("critic_reward", **replicas)["reward"] == [("critic", 0)]
    shared = slots("all", policy=2, critic=3, reference=1, reward=1)
    assert shared["critic"] == [("policy", 0), ("policy", 1), ("policy", 0)] and shared["reward"] == [("policy", 0)]
    assert [r.role for r in layout("placement.colocate=all", policy=2, critic=3, reference=1, reward=1)[0]] == ["policy"]
    # Without its host (no critic for GRPO), a colocated role gets bundles of its own.
    assert slots("critic_reward", policy=1, reward=1)["reward"] == [("reward", 0)]
    with pytest.raises(ConfigError, match="roles.reference: with colocate 'policy_reference' reference runs on "
                       "policy's bundles; set its placement under roles.policy"):
        layout("placement.colocate=policy_reference", "placement.roles.reference.gpus=1")
    with pytest.raises(ConfigError, match="strategy.*'PACK', 'SPREAD'"):
        layout("placement.roles.policy.strategy=TIGHT")
    with pytest.raises(ValueError, match="strategy 'TIGHT' is not one of PACK"):
        role("policy", 1, strategy="TIGHT")
    with pytest.raises(ValueError, match="asked for twice"):
        plan([role("policy", 1), role("policy", 1)], NODES)


# README "Where each role runs": per-role placement for the shipped KubeRay cluster (cluster/configs/rayjob.yaml).
README_EXAMPLE = [
    "policy_workers=2", "critic_workers=1", "placement.colocate=policy_reference",
    "placement.roles.policy={cpus: 8, gpus: 1, node_resource: rlhf_train}",
    "placement.roles.critic={cpus: 8, gpus: 1, node_resource: rlhf_train}",
    "placement.roles.reward={cpus: 4, gpus: 1, node_resource: rlhf_train}",
    "placement.roles.rollout={cpus: 6, gpus: 1, node_resource: rlhf_rollout, strategy: SPREAD}",
]


def shipped_cluster_nodes() -> dict[str, list[Node]]:
    """The GPU nodes of the shipped cluster configs at their minimum size, as the planner sees them."""
    configs = Path(__file__).resolve().parents[1] / "cluster" / "configs"
    launcher = yaml.safe_load((configs / "ray-cluster.yaml").read_text())["available_node_types"]
    kuberay = yaml.safe_load((configs / "rayjob.yaml").read_text())["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    nodes = {"launcher": [], "kuberay": []}
    for name, kind in launcher.items():
        for i in range(kind.get("min_workers", 0)):
            nodes["launcher"].append(Node(f"{name}-{i}", name, {k: float(v) for k, v in kind["resources"].items()}))
    for group in kuberay:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        custom = json.loads(json.loads(group["rayStartParams"]["resources"]))  # a JSON string, quoted again
        shape = {"CPU": float(limits["cpu"]), "GPU": float(limits.get("nvidia.com/gpu", 0)), **custom}
        nodes["kuberay"] += [Node(f"{group['groupName']}-{i}", group["groupName"], shape) for i in range(group["replicas"])]
    return nodes


def test_the_readme_example_fits_the_shipped_clusters():
    cfg = load_config("ppo", None, README_EXAMPLE)
    replicas = {"policy": cfg.policy_workers, "critic": cfg.critic_workers, "reference": 1, "reward": 1,
                "rollout": cfg.rollout.engines}
    requests, slots = role_layout(cfg.placement, replicas)
    for name, nodes in shipped_cluster_nodes().items():
        result = plan(requests, nodes)
        groups = {node.node_id: node.address for node in nodes}
        where = {role: {groups[n] for n in ids} for role, ids in result.assignment.items()}
        assert where == {"policy": {"train-gpu" if name == "kuberay" else "gpu_train"}, **{
            r: where["policy"] for r in ("critic", "reward")}, "rollout": {"rollout-gpu" if name == "kuberay" else "gpu_rollout"}}, name
    assert slots["reference"] == [("policy", 0)]
    # One policy rank more and the learners' node is short of a GPU: the message of the README.
    with pytest.raises(ResourceError, match=r"^reward needs CPU 4, GPU 1 in 1 bundles \(PACK\); the nodes with "
                       r"'rlhf_train' have CPU 0, GPU 0 left after policy, critic, rollout: missing CPU 4, GPU 1\. Bundle 0 "
                       r"\(CPU 4, GPU 1\) finds no node with room left\.$"):
        plan(role_layout(cfg.placement, {**replicas, "policy": 3})[0], shipped_cluster_nodes()["kuberay"])


def test_shared_cpu_node_only_when_every_actor_is_on_the_cpus_of_one_node():
    """What decides whether PPO's actors take turns (rlhf/ppo.py, actors_take_turns)."""
    from cluster.placement import ActorPlacement, Placement, Plan, Slot

    def placed(actual, gpus=0.0):
        plan_ = Plan(requests={}, nodes={n.node_id: n for n in NODES}, assignment=actual)
        slots = {r: [Slot(None, i, 0.25, gpus) for i in range(len(ids))] for r, ids in actual.items()}
        return ActorPlacement(Placement(plan_, {}, actual), slots)

    one_node = {"policy": [HEAD.node_id, HEAD.node_id], "critic": [HEAD.node_id], "rollout": [HEAD.node_id]}
    assert placed(one_node).shared_cpu_node() == HEAD
    assert placed(one_node, gpus=0.5).shared_cpu_node() is None  # GPU actors do not share the CPU cores
    assert placed({**one_node, "rollout": [ROLLOUT.node_id]}).shared_cpu_node() is None  # two nodes


def test_nodes_from_ray_keeps_alive_nodes_without_ip_markers():
    ray_nodes = [
        {"NodeID": "a" * 8, "NodeManagerAddress": "10.0.0.1", "Alive": True,
         "Resources": {"CPU": 2.0, "node:10.0.0.1": 1.0, "node:__internal_head__": 1.0}},
        {"NodeID": "b" * 8, "NodeManagerAddress": "10.0.0.2", "Alive": False, "Resources": {"CPU": 8.0}},
    ]
    assert nodes_from_ray(ray_nodes) == [Node("a" * 8, "10.0.0.1", {"CPU": 2.0})]


# --------------------------------------------------------------------------------------------------
# A real three-node cluster on this machine: fake GPUs, a custom resource per node (loopback only)
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def nodes(tmp_path_factory):
    """Node ids by the custom resource each node offers: a head with 1 CPU, 1 GPU and 'rlhf_rollout',
    a worker with 2 CPUs, 2 GPUs and 'rlhf_train', and a CPU-only worker with 'rlhf_cpu'."""
    import ray

    from test_jobs import RayNodes

    # This process's driver and the nodes must agree on the auth mode (an earlier local Ray in this
    # process may have turned token mode on, with the token in ~/.ray/auth_token).
    mode = os.environ.get("RAY_AUTH_MODE", "disabled")
    cluster = RayNodes(tmp_path_factory.mktemp("ray3"), {**os.environ, "RAY_AUTH_MODE": mode})
    try:
        cluster.start_head(num_cpus=1, num_gpus=1, resources='{"rlhf_rollout": 1}', dashboard=False)
        cluster.add_worker(num_cpus=2, num_gpus=2, resources={"rlhf_train": 1})
        cluster.add_worker(num_cpus=1, resources={"rlhf_cpu": 1})
        ray.init(address=f"127.0.0.1:{cluster.gcs_port}")  # not init_ray: keep this process on loopback
        cluster._wait(lambda: len([n for n in ray.nodes() if n["Alive"]]) == 3, 60)
        yield {next(r for r in n["Resources"] if r.startswith("rlhf_")): n["NodeID"] for n in ray.nodes() if n["Alive"]}
    finally:
        ray.shutdown()
        assert cluster.stop() == [], "left behind after the nodes were stopped"


def created_groups() -> int:
    from ray.util import placement_group_table

    return sum(g["state"] == "CREATED" for g in placement_group_table().values())


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_placement_groups_land_where_the_plan_says(nodes):
    import ray

    train, rollout = nodes["rlhf_train"], nodes["rlhf_rollout"]
    requests = [
        role("policy", 2, {"CPU": 0.5, "GPU": 1}, node_resource="rlhf_train", strategy="STRICT_PACK"),
        role("rollout", 1, {"CPU": 0.5, "GPU": 1}, node_resource="rlhf_rollout"),
    ]
    placement = place(requests, timeout_s=60)
    try:
        assert placement.plan.assignment == {"policy": [train, train], "rollout": [rollout]}
        assert placement.actual == placement.plan.assignment

        # Too small: named at once, before any group is made (Ray alone would wait forever).
        before = created_groups()
        with pytest.raises(ResourceError, match=r"critic needs .*GPU 1.*'rlhf_train' have .*GPU 0 left after "
                           r"policy, rollout: missing GPU 1"):
            place(requests + [role("critic", 1, node_resource="rlhf_train")], timeout_s=5)
        assert created_groups() == before
    finally:
        placement.remove()
    deadline = time.monotonic() + 10
    while ray.available_resources().get("GPU") != 3.0:  # removal is asynchronous
        assert time.monotonic() < deadline, ray.available_resources()
        time.sleep(0.2)


# What PPOTrainer does with cfg.placement (rlhf/ppo.py), with stand-in actors instead of models.
PPO_ROLES = {"policy": 2, "critic": 1, "reference": 1, "reward": 1, "rollout": 1}
PER_ROLE = [
    "placement.colocate=policy_reference",  # reference shares policy's first bundle
    "placement.roles.policy={cpus: 0.5, gpus: 1, node_resource: rlhf_train, strategy: STRICT_PACK}",
    "placement.roles.critic={cpus: 0.5, node_resource: rlhf_train}",
    "placement.roles.rollout={cpus: 0.5, gpus: 1, node_resource: rlhf_rollout}",
    "placement.roles.reward={cpus: 0.5, node_resource: rlhf_cpu}",
]


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_each_ppo_role_runs_on_the_nodes_its_config_asks_for(nodes):
    import ray

    class WhereAmI:  # defined here so that Ray ships it by value (the workers cannot import tests/)
        def node(self) -> str:
            return ray.get_runtime_context().get_node_id()

        def gpus(self) -> list:
            return ray.get_runtime_context().get_accelerator_ids()["GPU"]

    cfg = load_config("ppo", None, PER_ROLE).placement
    placement = place_actors(cfg, PPO_ROLES, timeout_s=60)
    actors = []
    try:
        train, rollout, cpu = nodes["rlhf_train"], nodes["rlhf_rollout"], nodes["rlhf_cpu"]
        assert placement.placement.actual == placement.placement.plan.assignment == {
            "policy": [train, train], "critic": [train], "rollout": [rollout], "reward": [cpu]}
        on = {role: [ray.remote(WhereAmI).options(**slot.options()).remote() for slot in slots]
              for role, slots in placement.slots.items()}
        actors = [a for group in on.values() for a in group]
        where = {role: ray.get([a.node.remote() for a in group], timeout=120) for role, group in on.items()}
        assert where == {"policy": [train, train], "critic": [train], "reference": [train],
                         "reward": [cpu], "rollout": [rollout]}
        # The reference shares the first policy bundle: half its CPU and half its GPU each.
        assert placement.slots["reference"][0].index == 0
        assert (placement.slots["reference"][0].num_gpus, placement.slots["policy"][0].num_gpus) == (0.5, 0.5)
        assert ray.get(on["reference"][0].gpus.remote()) == ray.get(on["policy"][0].gpus.remote())
        assert placement.group_of("policy")[1:] == ([0, 1], 0.25, 0.5)  # the smaller share for every rank
        assert placement.shared_cpu_node() is None  # three nodes and GPUs: the PPO actors work at the same time

        # Too small: an error naming the role and what is missing, before any group is made.
        before = created_groups()
        with pytest.raises(ResourceError, match=r"^policy needs CPU 1\.5, GPU 3 in 3 bundles \(STRICT_PACK\); the "
                           r"nodes with 'rlhf_train' have CPU 2, GPU 2: missing GPU 1\."):
            place_actors(cfg, {**PPO_ROLES, "policy": 3}, timeout_s=60)
        with pytest.raises(ResourceError, match=r"^rollout needs CPU 1, GPU 2 in 2 bundles \(PACK\); the nodes with "
                           r"'rlhf_rollout' have CPU 1, GPU 1 left after policy, critic: missing GPU 1\."):
            place_actors(cfg, {**PPO_ROLES, "rollout": 2}, timeout_s=60)
        with pytest.raises(ResourceError, match=r"^reward asks for nodes with the custom resource 'rlhf_judge', but "
                           r"no node offers it"):
            place_actors(load_config("ppo", None, [*PER_ROLE, "placement.roles.reward.node_resource=rlhf_judge"])
                         .placement, PPO_ROLES, timeout_s=60)
        assert created_groups() == before
    finally:
        for actor in actors:
            ray.kill(actor)
        placement.remove()
