"""The context limit each model file reported when it was loaded, remembered.

An agent whose context follows its model (max_context_len 0) needs the limit
before the model loads: the runtime refuses a larger context. The first load of a
model file asks for MAX_SAFE_CONTEXT_LEN; when the runtime refuses and names the
model's limit, the model is loaded again at that limit, which is remembered here
(per file path and size) so later starts load it once.
"""

from typing import Any

from homeassistant.core import HomeAssistant
from homeassistant.helpers.storage import Store

from .const import DOMAIN
from .host.model_files import ModelInfo

_STORE_VERSION = 1
_DATA_KEY = f"{DOMAIN}_model_limits"


def _key(info: ModelInfo) -> str:
    return f"{info.path}:{info.size_bytes}"


class ModelLimits:
    """Context limits of model files, kept in Home Assistant's storage."""

    def __init__(self, hass: HomeAssistant) -> None:
        """Read nothing yet: use async_get_model_limits."""
        self._store: Store[dict[str, int]] = Store(
            hass, _STORE_VERSION, f"{DOMAIN}.model_limits"
        )
        self._limits: dict[str, int] = {}

    async def async_load(self) -> None:
        """Read the remembered limits."""
        self._limits = dict(await self._store.async_load() or {})

    def get(self, info: ModelInfo) -> int | None:
        """Return the limit the model file reported, if it was loaded before."""
        return self._limits.get(_key(info))

    def remember(self, info: ModelInfo, limit: int) -> None:
        """Remember the limit a model file reported (written a little later)."""
        if self._limits.get(_key(info)) != limit:
            self._limits[_key(info)] = limit
            self._store.async_delay_save(lambda: dict(self._limits), 1.0)


async def async_get_model_limits(hass: HomeAssistant) -> ModelLimits:
    """Return the limits of this Home Assistant, read once."""
    limits: Any = hass.data.get(_DATA_KEY)
    if limits is None:
        limits = hass.data[_DATA_KEY] = ModelLimits(hass)
        await limits.async_load()
    assert isinstance(limits, ModelLimits)
    return limits
