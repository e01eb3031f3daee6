"""The models of a runtime entry: loaded on demand, shared, placed on the NPU.

No Home Assistant imports. Each loaded model is a :class:`~.session.ModelSession`
with a worker process of its own; the engine starts them, plans their NPU memory
domains, serialises runs on runtimes that cannot run handles at once, and closes
them all on unload.
"""

import asyncio
from collections.abc import Callable

from .host.model_files import ModelInfo
from .host.prompt_cache import CacheWriteError
from .host.rkllm.abi import AbiFamily
from .host.rkllm.errors import RKLLMError
from .host.rkllm.library import RuntimeInfo
from .host.rkllm.runtime import ModelParams
from .remote import RuntimeHost
from .session import ModelSession, SessionServices

DOMAIN_BYTES = 4 * 1024**3
"""About what one NPU memory domain holds (rknn-llm #314, #437)."""

MULTI_INSTANCE_VERSION = (1, 2, 2)
"""The first runtime that runs several model instances at once."""


def plan_domains(sizes: list[int]) -> list[int]:
    """Give each model (by file size) a base_domain_id of its own.

    A model larger than a domain spans the next ones too, so the following model
    starts after them.
    """
    domains: list[int] = []
    next_free = 0
    for size in sizes:
        domains.append(next_free)
        next_free += max(1, -(-size // DOMAIN_BYTES))
    return domains


def runs_concurrently(info: RuntimeInfo) -> bool:
    """Whether the runtime can run several handles at once (1.2.2 and later).

    A version known only as its family (1.2.x) counts as the older one.
    """
    if info.family is not AbiFamily.V1_2:
        return True
    parts = info.version.split(".")
    try:
        version = tuple(int(part) for part in parts[:3])
    except ValueError:
        return False
    return version >= MULTI_INSTANCE_VERSION


class Engine:
    """Loads models on demand and shares each among the agents that use it."""

    def __init__(
        self,
        host: RuntimeHost,
        runtime: RuntimeInfo,
        on_cache_write: Callable[[CacheWriteError | None], None] | None = None,
        on_model_down: Callable[[str, RKLLMError], None] | None = None,
    ) -> None:
        """Create an engine for the models of a connected host.

        on_cache_write hears of every cache build: None when it was written, the
        error when the disk refused it. on_model_down hears of a model that
        stays down until a reload (its library changed, its worker keeps dying).
        """
        self.host = host
        self.runtime = runtime
        self.store = host.store
        self._sessions: dict[str, ModelSession] = {}
        self._services = SessionServices(
            host=host,
            runtime=runtime,
            store=host.store,
            on_cache_write=on_cache_write or (lambda _error: None),
            on_caches_evicted=self._forget_listings,
            on_model_down=on_model_down or (lambda _model, _error: None),
            run_gate=None if runs_concurrently(runtime) else asyncio.Lock(),
        )

    @property
    def sessions(self) -> dict[str, ModelSession]:
        """Loaded models by name."""
        return self._sessions

    async def async_acquire(self, info: ModelInfo, params: ModelParams) -> ModelSession:
        """Return the session of info's model, loading the model on first use."""
        if (session := self._sessions.get(info.name)) is None:
            session = await ModelSession.async_start(self._services, info, params)
            self._sessions[info.name] = session
        session.users += 1
        return session

    def _forget_listings(self) -> None:
        for session in self._sessions.values():
            session.forget_listing()

    async def async_close(self) -> None:
        """Abort every run and stop every worker process."""
        sessions, self._sessions = list(self._sessions.values()), {}
        for session in sessions:
            await session.async_close()
