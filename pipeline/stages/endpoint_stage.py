"""The base of the async Ray Data stages that call the teacher or judge endpoint."""
from __future__ import annotations

from typing import Optional

from pipeline.config import EndpointConfig, ScoringConfig
from pipeline.llm.client import ChatClient
from pipeline.llm.secret import secret_from_env


class EndpointStage:
    """Holds what an actor needs to open its client; the key is read from the actor's environment.

    The client is opened on the first batch, inside the event loop Ray Data runs the async `__call__` in:
    an aiohttp session belongs to the loop that created it.
    """

    def __init__(self, endpoint: EndpointConfig, base_url: str, model: str, limits, role: str):
        self.endpoint, self.base_url, self.model, self.limits, self.role = endpoint, base_url, model, limits, role
        self._client: Optional[ChatClient] = None

    async def client(self) -> ChatClient:
        if self._client is None:
            self._client = await ChatClient(self.endpoint, self.base_url,
                                            secret_from_env(self.endpoint.api_key_env, self.role), self.limits,
                                            self.model).__aenter__()
        return self._client


# An endpoint actor waits on the network; a small CPU share keeps it from taking a core that the
# read, repartition and write tasks of the same streaming job need on a laptop.
ENDPOINT_ACTOR_CPUS = 0.25


def endpoint_stage_options(scoring: ScoringConfig) -> dict:
    """`map_batches` options of an endpoint stage: rows per batch, actors, batches in flight per actor."""
    import ray.data

    return {"batch_size": scoring.batch_size, "batch_format": "pyarrow", "num_cpus": ENDPOINT_ACTOR_CPUS,
            "compute": ray.data.ActorPoolStrategy(
                size=scoring.actors_per_stage,
                max_tasks_in_flight_per_actor=scoring.batches_in_flight_per_actor,
                max_concurrent_calls_per_actor=scoring.batches_in_flight_per_actor)}
