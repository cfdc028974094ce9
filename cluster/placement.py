"""Where each role's bundles go on a multi-node cluster, decided before anything is created.

A role (policy, critic, reference, reward, rollout) asks for a list of bundles (``{"CPU": 4, "GPU": 1}``),
a placement strategy, and optionally a *node resource*: a custom resource that only some nodes offer,
such as ``rlhf_train`` on the training GPU nodes and ``rlhf_rollout`` on the generation nodes. Nodes
advertise it when they start (``ray start --resources='{"rlhf_train": 1}'``, or ``resources:`` in the
cluster launcher YAML, ``rayStartParams.resources`` in KubeRay). Each of the role's bundles then asks
for a sliver of it (``NODE_RESOURCE_UNIT``), so Ray can only place them on those nodes, and up to
1 / NODE_RESOURCE_UNIT bundles fit on one such node.

``plan()`` is pure: it takes node resource dicts (as ``ray.nodes()`` reports them) and either returns
which node each bundle lands on or raises ``ResourceError`` naming the role and what is missing.
``place()`` is the thin Ray part: plan against the live cluster, then create one placement group per
role through ``cluster.runtime.create_placement_group`` and report where Ray actually put the bundles.
``place_actors()`` does this for the PPO roles from the ``placement`` config section (per-role bundle
sizes, node resources and strategies; colocated roles share their host's bundles) and hands back a
``Slot`` per actor for ``ActorClass.options(**slot.options())``.

Ray waits forever for resources it cannot get; planning first turns that into an immediate error.
"""

from __future__ import annotations

import logging
import secrets
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence, get_args

from cluster.runtime import ResourceError, _fmt, create_placement_group
from rlhf.config import COLOCATION, PlacementConfig, PlacementStrategy

log = logging.getLogger("rlhf.placement")

STRATEGIES: tuple[str, ...] = get_args(PlacementStrategy)
# The node resources the shipped cluster configs (cluster/configs/*.yaml) give their GPU node types.
TRAIN_NODES = "rlhf_train"  # learners: policy, critic, reference, reward
ROLLOUT_NODES = "rlhf_rollout"  # vLLM generation engines
# Share of a node resource each bundle takes: up to 1000 bundles of a role per node that offers 1 unit.
NODE_RESOURCE_UNIT = 0.001
_EPS = 1e-9


@dataclass(frozen=True)
class RoleRequest:
    """What one role asks for: bundles, a strategy, and optionally nodes offering ``node_resource``."""

    role: str
    bundles: tuple[Mapping[str, float], ...]
    strategy: str = "PACK"
    node_resource: str | None = None

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"{self.role}: strategy {self.strategy!r} is not one of {', '.join(STRATEGIES)}")
        if not self.bundles:
            raise ValueError(f"{self.role}: asks for no bundles")
        for bundle in self.bundles:
            if not bundle or any(v < 0 for v in bundle.values()) or not any(v > 0 for v in bundle.values()):
                raise ValueError(f"{self.role}: bundle {dict(bundle)} must ask for a positive amount of something")

    @property
    def ray_bundles(self) -> list[dict[str, float]]:
        """The bundles as Ray gets them: with a sliver of the node resource when one is asked for."""
        extra = {self.node_resource: NODE_RESOURCE_UNIT} if self.node_resource else {}
        return [{**{k: float(v) for k, v in b.items() if v}, **extra} for b in self.bundles]


@dataclass(frozen=True)
class Node:
    """A node as the planner sees it: an id, an address for messages, and its total resources."""

    node_id: str
    address: str
    resources: Mapping[str, float]

    @property
    def label(self) -> str:
        return f"{self.address} ({self.node_id[:8]})"


def nodes_from_ray(ray_nodes: Sequence[Mapping[str, Any]]) -> list[Node]:
    """``ray.nodes()`` -> alive nodes with their total resources (``node:<ip>`` markers dropped)."""
    return [
        Node(n["NodeID"], n.get("NodeManagerAddress", "?"),
             {k: v for k, v in n["Resources"].items() if not k.startswith("node:")})
        for n in ray_nodes if n.get("Alive")
    ]


@dataclass
class Plan:
    """Where each role's bundles land: role -> one node id per bundle."""

    requests: dict[str, RoleRequest]
    nodes: dict[str, Node]
    assignment: dict[str, list[str]] = field(default_factory=dict)

    def describe(self) -> str:
        lines = []
        for role, node_ids in self.assignment.items():
            request = self.requests[role]
            per_node: dict[str, int] = defaultdict(int)
            for node_id in node_ids:
                per_node[node_id] += 1
            where = ", ".join(f"{count} on {self.nodes[n].label}" for n, count in per_node.items())
            lines.append(f"{role}: {len(node_ids)} x {{{_fmt(dict(request.bundles[0]))}}} {request.strategy} -> {where}")
        return "\n".join(lines)


def _fits(free: Mapping[str, float], bundle: Mapping[str, float]) -> bool:
    return all(free.get(k, 0.0) + _EPS >= v for k, v in bundle.items())


def _take(free: dict[str, float], bundle: Mapping[str, float]) -> None:
    for k, v in bundle.items():
        free[k] = free.get(k, 0.0) - v


def _sum(bundles: Sequence[Mapping[str, float]]) -> dict[str, float]:
    total: dict[str, float] = defaultdict(float)
    for bundle in bundles:
        for k, v in bundle.items():
            total[k] += v
    return dict(total)


def _shortfall(need: Mapping[str, float], have: Mapping[str, float]) -> dict[str, float]:
    return {k: v - have.get(k, 0.0) for k, v in need.items() if v > have.get(k, 0.0) + _EPS}


def _tightness(free: Mapping[str, float], bundle: Mapping[str, float]) -> tuple:
    """Best fit: prefer the node left with the fewest GPUs, then CPUs, after taking the bundle."""
    return tuple(free.get(k, 0.0) - bundle.get(k, 0.0) for k in ("GPU", "CPU"))


def _room_for(free: Mapping[str, float], bundle: Mapping[str, float]) -> float:
    """How many copies of ``bundle`` fit in ``free``."""
    return min((free.get(k, 0.0) + _EPS) // v for k, v in bundle.items() if v > 0)


def _place_role(request: RoleRequest, candidates: list[str], free: dict[str, dict[str, float]],
                nodes: dict[str, Node], placed_before: list[str]) -> list[str]:
    bundles = [{k: v for k, v in b.items() if k != request.node_resource} for b in request.ray_bundles]
    need = _sum(bundles)
    where = f"the nodes with '{request.node_resource}' have" if request.node_resource else "the cluster has"
    have = _sum([free[n] for n in candidates])  # before this role takes anything

    def error(detail: str) -> ResourceError:
        missing = _shortfall(need, have)
        left = f" left after {', '.join(placed_before)}" if placed_before else ""
        summary = (f"{request.role} needs {_fmt(need)} in {len(bundles)} bundles ({request.strategy}); "
                   f"{where} {_fmt({k: have.get(k, 0.0) for k in need})}{left}")
        if missing:
            summary += f": missing {_fmt(missing)}"
        return ResourceError(f"{summary}. {detail}".rstrip())

    # A bundle no candidate node could ever hold, even empty: name the biggest node's shortfall.
    for i, bundle in enumerate(bundles):
        if not any(_fits(nodes[n].resources, bundle) for n in candidates):
            biggest = max(candidates, key=lambda n: _tightness(nodes[n].resources, {}))
            raise error(f"Bundle {i} ({_fmt(bundle)}) fits on no single node; the largest, "
                        f"{nodes[biggest].label}, has {_fmt({k: nodes[biggest].resources.get(k, 0.0) for k in bundle})}: "
                        f"missing {_fmt(_shortfall(bundle, nodes[biggest].resources))}.")

    if request.strategy in ("STRICT_PACK", "PACK"):
        whole = [n for n in candidates if _fits(free[n], need)]
        if whole:
            best = min(whole, key=lambda n: _tightness(free[n], need))
            _take(free[best], need)
            return [best] * len(bundles)
        if request.strategy == "STRICT_PACK":
            raise error("STRICT_PACK puts every bundle on one node, and no node has room for all of them.")

    chosen: list[str] = []
    for i, bundle in enumerate(bundles):
        fitting = [n for n in candidates if _fits(free[n], bundle)]
        if request.strategy == "STRICT_SPREAD":
            fitting = [n for n in fitting if n not in chosen]
        elif request.strategy == "SPREAD":
            fitting = [n for n in fitting if n not in chosen] or fitting
        if not fitting:
            spread = " on a node of its own" if request.strategy == "STRICT_SPREAD" else ""
            raise error(f"Bundle {i} ({_fmt(bundle)}) finds no node with room left{spread}.")
        if request.strategy == "PACK":  # stay on the nodes it uses; else open the roomiest, to use few
            best = next((n for n in chosen if n in fitting), None) or max(
                fitting, key=lambda n: _room_for(free[n], bundle))
        else:
            best = min(fitting, key=lambda n: _tightness(free[n], bundle))
        _take(free[best], bundle)
        chosen.append(best)
    return chosen


def plan(requests: Sequence[RoleRequest], nodes: Sequence[Node]) -> Plan:
    """Decide which node each role's bundles land on, or raise ``ResourceError`` naming the role.

    Roles are placed in the order given (put the hardest, e.g. the largest GPU groups, first); each
    takes room from the nodes, so a later role sees what earlier ones left. Within a role:
    PACK prefers one node for all, else fills the roomiest nodes first (few nodes); SPREAD prefers
    nodes it does not use yet; STRICT_PACK needs one node for all; STRICT_SPREAD needs a distinct
    node per bundle. Otherwise the tightest fit (fewest GPUs, then CPUs, left over) wins, keeping big
    nodes for big asks.
    """
    by_id = {n.node_id: n for n in nodes}
    if not by_id:
        raise ResourceError("the cluster has no alive nodes")
    result = Plan(requests={}, nodes=by_id)
    free = {n.node_id: dict(n.resources) for n in nodes}
    for request in requests:
        if request.role in result.requests:
            raise ValueError(f"role {request.role!r} is asked for twice")
        result.requests[request.role] = request
        candidates = list(by_id)
        if request.node_resource:
            candidates = [n for n in candidates if by_id[n].resources.get(request.node_resource, 0.0) > 0]
            if not candidates:
                offered = sorted({k for n in nodes for k in n.resources if k not in ("memory", "object_store_memory")})
                raise ResourceError(
                    f"{request.role} asks for nodes with the custom resource '{request.node_resource}', but no node "
                    f"offers it (the nodes offer: {', '.join(offered)}). Start those nodes with "
                    f"--resources='{{\"{request.node_resource}\": 1}}' (or `resources:` in the cluster config)."
                )
        result.assignment[request.role] = _place_role(request, candidates, free, by_id, list(result.assignment))
    return result


# --------------------------------------------------------------------------------------------------
# The Ray part
# --------------------------------------------------------------------------------------------------


@dataclass
class Placement:
    """The created placement groups, the plan, and where Ray actually put each bundle."""

    plan: Plan
    groups: dict[str, Any]
    actual: dict[str, list[str]]

    def remove(self) -> None:
        from ray.util.placement_group import remove_placement_group

        for group in self.groups.values():
            remove_placement_group(group)
        self.groups.clear()


def bundle_nodes(group) -> list[str]:
    """The node id of each bundle of a ready placement group."""
    from ray.util import placement_group_table

    table = placement_group_table(group)["bundles_to_node_id"]
    return [table[i] for i in range(len(table))]


def place(requests: Sequence[RoleRequest], *, timeout_s: float = 30.0, name_prefix: str = "rlhf") -> Placement:
    """Plan against the live cluster, then create one placement group per role (in order).

    Fails before creating anything when the plan fails; if a later group cannot be created, the
    groups already made are removed again.
    """
    import ray

    result = plan(requests, nodes_from_ray(ray.nodes()))
    placement = Placement(plan=result, groups={}, actual={})
    try:
        for request in requests:
            group = create_placement_group(
                request.ray_bundles, strategy=request.strategy, name=f"{name_prefix}-{request.role}",
                timeout_s=timeout_s, what=request.role,
            )
            placement.groups[request.role] = group
            placement.actual[request.role] = bundle_nodes(group)
    except BaseException:
        placement.remove()
        raise
    return placement


# --------------------------------------------------------------------------------------------------
# The PPO roles: placement config -> one placement group per role -> a slot per actor
# --------------------------------------------------------------------------------------------------

# Planning order: the big learner groups first, so they get the roomiest nodes; then the engines, then
# the single inference actors. A colocated role always comes after the role whose bundles it shares.
PLAN_ORDER = ("policy", "critic", "rollout", "reference", "reward")


def role_layout(cfg: PlacementConfig, replicas: Mapping[str, int]) -> tuple[list[RoleRequest], dict[str, list[tuple[str, int]]]]:
    """Pure: the placement groups to make, and which bundle each actor of each role runs on.

    ``replicas`` counts the actors of each role (0 or missing: the role does not run). A role gets one
    bundle per replica, sized by ``cfg.for_role(role)``; a role colocated with a running host
    (``cfg.colocate``) gets no bundles and shares the host's, replica k on the host's bundle k mod n.
    Returns the requests in planning order and ``role -> [(role whose group holds it, bundle index)]``.
    """
    guests = COLOCATION[cfg.colocate]
    requests: list[RoleRequest] = []
    slots: dict[str, list[tuple[str, int]]] = {}
    for role in PLAN_ORDER:
        count = replicas.get(role, 0)
        if count <= 0:
            continue
        host = guests.get(role)
        if host and replicas.get(host, 0) > 0:
            slots[role] = [(host, k % replicas[host]) for k in range(count)]
            continue
        own = cfg.for_role(role)
        bundle = {"CPU": own.cpus, **({"GPU": own.gpus} if own.gpus else {}), **own.resources}
        requests.append(RoleRequest(role, (bundle,) * count, own.strategy, own.node_resource))
        slots[role] = [(role, k) for k in range(count)]
    unknown = set(replicas) - set(PLAN_ORDER)
    if unknown:
        raise ValueError(f"unknown roles {', '.join(sorted(unknown))}; roles are {', '.join(PLAN_ORDER)}")
    return requests, slots


@dataclass(frozen=True)
class Slot:
    """One actor's place: a bundle of a placement group, and the share of that bundle the actor takes
    (a bundle shared by colocated actors is split evenly between them)."""

    group: Any
    index: int
    num_cpus: float
    num_gpus: float

    def options(self) -> dict[str, Any]:
        """Keyword arguments for ``ActorClass.options(...)``."""
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        return {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus,
                "scheduling_strategy": PlacementGroupSchedulingStrategy(self.group, self.index)}


@dataclass
class ActorPlacement:
    """The placement groups of a run and the slot of every actor of every role."""

    placement: Placement
    slots: dict[str, list[Slot]]

    def group_of(self, role: str) -> tuple[Any, list[int], float, float]:
        """``(placement group, bundle index per replica, num_cpus, num_gpus)`` for a group of actors
        that all take the same amount: the smallest share any of them gets."""
        slots = self.slots[role]
        return (slots[0].group, [s.index for s in slots], min(s.num_cpus for s in slots),
                min(s.num_gpus for s in slots))

    def describe(self) -> str:
        return self.placement.plan.describe()

    def shared_cpu_node(self) -> Node | None:
        """The node, when every actor runs on the CPUs of that one node (so they all share its cores);
        None when any actor has a GPU or the actors span several nodes."""
        node_ids = {node_id for ids in self.placement.actual.values() for node_id in ids}
        no_gpu = all(slot.num_gpus == 0 for slots in self.slots.values() for slot in slots)
        return self.placement.plan.nodes[node_ids.pop()] if len(node_ids) == 1 and no_gpu else None

    def remove(self) -> None:
        self.placement.remove()


def place_actors(cfg: PlacementConfig, replicas: Mapping[str, int], *, timeout_s: float = 30.0,
                 name_prefix: str | None = None) -> ActorPlacement:
    """Plan and create the placement groups of ``replicas`` (see ``role_layout``), or raise
    ``ResourceError`` naming the role that does not fit, before anything is created."""
    requests, layout = role_layout(cfg, replicas)
    placement = place(requests, timeout_s=timeout_s, name_prefix=name_prefix or f"rlhf-{secrets.token_hex(3)}")
    sharing: dict[tuple[str, int], int] = defaultdict(int)
    for positions in layout.values():
        for position in positions:
            sharing[position] += 1
    by_role = {r.role: r for r in requests}

    def slot(position: tuple[str, int]) -> Slot:
        role, index = position
        bundle, share = by_role[role].bundles[index], sharing[position]
        return Slot(placement.groups[role], index, bundle.get("CPU", 0.0) / share, bundle.get("GPU", 0.0) / share)

    result = ActorPlacement(placement, {role: [slot(p) for p in positions] for role, positions in layout.items()})
    log.info("placement:\n%s", result.describe())
    return result
