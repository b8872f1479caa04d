"""The ``ray`` executor: each model instance is a Ray actor, so instances can run on other machines
of a Ray cluster, with the CPUs and GPUs each asks for, placed together by one placement group per
model version (``executor_options: {num_cpus, num_gpus, placement: PACK|SPREAD|STRICT_PACK|STRICT_SPREAD,
placement_timeout_s}``).

``rtserve serve --ray local|auto|ADDRESS`` chooses the cluster: ``local`` starts a Ray instance in
this machine, ``auto`` joins the one this machine belongs to, anything else is a cluster address.
The model repository must be readable at the same path on every node (a shared volume), since
actors load the model files themselves. An actor that dies is restarted by Ray; the batch it held is
answered with 503 and later requests succeed. Ray is an optional extra: ``pip install rtserve[ray]``.
"""
from __future__ import annotations

import os
import threading

import numpy as np

from ..errors import ConfigError, Unavailable
from .base import InstanceSpec, register_executor

_LOCK = threading.Lock()
STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
OPTIONS = {"num_cpus", "num_gpus", "placement", "placement_timeout_s"}


def ensure_ray():
    """Import Ray and connect once (``RTSERVE_RAY_ADDRESS``: local | auto | an address; default local)."""
    try:
        import ray
    except ImportError:
        raise ConfigError("executor: ray needs Ray (pip install 'rtserve[ray]')") from None
    with _LOCK:
        if not ray.is_initialized():
            address = os.environ.get("RTSERVE_RAY_ADDRESS", "local")
            kw = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
            ray.init(**kw) if address == "local" else ray.init(address=address, **kw)
    return ray


class _Worker:
    """The actor: a backend built where the actor runs."""

    def __init__(self, spec: InstanceSpec):
        self.backend = spec.build()

    def specs(self):
        return self.backend.file_inputs, self.backend.file_outputs

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.backend.run(inputs)

    def pid(self) -> int:
        return os.getpid()


class PlacementGroup:
    """One bundle per instance of a model version."""

    def __init__(self, instances: int, options: dict) -> None:
        unknown = sorted(set(options) - OPTIONS)
        if unknown:
            raise ConfigError(f"executor_options: unknown key '{unknown[0]}'; allowed: {', '.join(sorted(OPTIONS))}")
        self.num_cpus = float(options.get("num_cpus", 1))
        self.num_gpus = float(options.get("num_gpus", 0))
        strategy = str(options.get("placement", "PACK")).upper()
        if strategy not in STRATEGIES:
            raise ConfigError(f"executor_options.placement: '{strategy}' is not one of {', '.join(STRATEGIES)}")
        ray = ensure_ray()
        from ray.util.placement_group import placement_group

        bundle = {"CPU": self.num_cpus} | ({"GPU": self.num_gpus} if self.num_gpus else {})
        self.pg = placement_group([dict(bundle) for _ in range(instances)], strategy=strategy)
        timeout = float(options.get("placement_timeout_s", 60))
        if not self.pg.wait(timeout_seconds=timeout):
            ray.util.remove_placement_group(self.pg)
            raise ConfigError(f"Ray could not place {instances} x {bundle} ({strategy}) within {timeout:g} s: "
                              f"the cluster has {ray.available_resources()}")

    def close(self) -> None:
        import ray

        ray.util.remove_placement_group(self.pg)


class RayInstance:
    """A model instance as a Ray actor; ``run`` has the backend's signature (the batcher's instance
    thread blocks on the actor's answer)."""

    in_flight = 1

    def __init__(self, spec: InstanceSpec, index: int, group: PlacementGroup) -> None:
        ray = ensure_ray()
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        actor_cls = ray.remote(_Worker).options(
            num_cpus=group.num_cpus, num_gpus=group.num_gpus, max_restarts=-1, max_task_retries=0,
            scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=group.pg,
                                                                 placement_group_bundle_index=index))
        self.index, self.group = index, group
        self.actor = actor_cls.remote(spec)
        try:
            self.file_inputs, self.file_outputs = ray.get(self.actor.specs.remote())
        except ray.exceptions.RayError as e:
            ray.kill(self.actor)
            cause = getattr(e, "cause", None) or e
            raise ConfigError(f"Ray actor for {spec.path}: {str(cause).splitlines()[-1] if str(cause) else type(e).__name__}") from None

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import ray

        try:
            return ray.get(self.actor.run.remote(inputs))
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
            raise Unavailable("the Ray actor running this batch died; Ray restarts it, retry the request") from None

    def close(self) -> None:
        import ray

        try:
            ray.kill(self.actor, no_restart=True)
        except Exception:  # noqa: BLE001 - already gone
            pass
        if self.index == 0:
            self.group.close()


@register_executor("ray")
def make_ray_instances(spec: InstanceSpec, count: int, options: dict) -> list[RayInstance]:
    """``count`` actors in one placement group (a bundle each); the group goes with the first actor."""
    group = PlacementGroup(count, options)
    made: list[RayInstance] = []
    try:
        for i in range(count):
            made.append(RayInstance(spec, i, group))
    except BaseException:
        for inst in made:
            inst.close()
        if not made:
            group.close()  # not yet owned by an actor
        raise
    return made
