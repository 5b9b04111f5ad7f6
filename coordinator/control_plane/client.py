"""Reaching the control-plane Ray actor from a coordinator process."""

from __future__ import annotations

import os
from typing import Any

import ray
from ray.exceptions import RayActorError, RayTaskError

from coordinator.config import CoordinatorConfig
from coordinator.control_plane.actor import ControlPlane
from specd.core.errors import SpecdError, Unavailable
from specd.rpc.security import SECURITY_FILES


class PlaneClient:
    """Awaitable calls on the control-plane actor; domain errors come back as themselves."""

    def __init__(self, handle: Any):
        self.handle = handle

    async def call(self, method: str, *args: Any) -> Any:
        try:
            return await getattr(self.handle, method).remote(*args)
        except RayTaskError as error:
            if isinstance(error.cause, SpecdError):
                raise error.cause from None
            raise
        except RayActorError as error:  # the actor died or is restarting
            raise Unavailable(f"the control plane is unavailable ({type(error).__name__}); retry shortly") from None

    def tell(self, method: str, *args: Any) -> None:
        """Fire and forget (progress reports): the caller never waits on Ray."""
        getattr(self.handle, method).remote(*args)


def connect_ray(address: str, namespace: str, resources: dict[str, float] | None = None) -> None:
    """Join a Ray cluster, or start a local one bound to loopback (with optional custom resources)."""
    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, namespace=namespace, logging_level="WARNING")
    else:
        ray.init(
            namespace=namespace,
            include_dashboard=False,
            logging_level="WARNING",
            resources=resources or None,
            _node_ip_address="127.0.0.1",
        )


async def get_or_create_plane(config: CoordinatorConfig) -> PlaneClient:
    """Join the control-plane actor named in the config, or create it (restarted by Ray if it dies)."""
    actor_cls = ray.remote(num_cpus=0, max_restarts=-1)(ControlPlane)
    # Its health checks call the workers with the worker credential: it reads the same files as this process
    # (their paths, never the secrets, travel with the actor).
    files = {name: os.environ[name] for name in SECURITY_FILES if os.environ.get(name)}
    options = {"runtime_env": {"env_vars": files}} if files else {}
    handle = actor_cls.options(name=config.plane_name, get_if_exists=True, **options).remote(
        config.depth_policy, config.max_depth, config.health_interval_seconds,
        f"{config.ray_namespace}/{config.plane_name}", config.lease_seconds,
    )
    plane = PlaneClient(handle)
    await plane.call("start")
    return plane
