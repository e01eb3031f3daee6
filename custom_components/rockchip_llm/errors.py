"""Translated errors users see for what they sent or what the runtime did."""

from typing import Final

from homeassistant.exceptions import HomeAssistantError, ServiceValidationError

from .const import DOMAIN
from .host.rkllm.errors import (
    LibraryChanged,
    ModelFileMissing,
    ModelGivenUp,
    RKLLMError,
    RunStalledError,
    WorkerDiedError,
)
from .host.wire import HostLost

_TOLD_PLAINLY: Final[tuple[tuple[type[RKLLMError], str], ...]] = (
    (HostLost, "host_lost_answer"),
    (ModelGivenUp, "model_given_up_answer"),
    (WorkerDiedError, "worker_died_answer"),
    (RunStalledError, "run_stalled_answer"),
    (ModelFileMissing, "model_file_missing_answer"),
    (LibraryChanged, "library_changed_answer"),
)
"""Failures told in one plain sentence; their details (the runtime's own output
among them) are in the log, the repairs and diagnostics."""


def refuse_nul(text: str, field: str) -> None:
    """Raise a translated validation error when ``text`` holds a NUL character.

    The runtime's C strings end at the first NUL: the text would be cut short.
    """
    if "\0" in text:
        raise ServiceValidationError(
            translation_domain=DOMAIN,
            translation_key="text_has_nul",
            translation_placeholders={"field": field},
        )


def generation_failed(err: RKLLMError) -> HomeAssistantError:
    """Return the translated error of a run the runtime failed (or its process died).

    It may be spoken at a satellite: a crash, a stalled run, a lost host, a
    missing model file or a changed library get a sentence of what happened and
    what to do, never the runtime's lines; other failures say their message.
    """
    key = next(
        (key for kind, key in _TOLD_PLAINLY if isinstance(err, kind)),
        "generation_failed",
    )
    return HomeAssistantError(
        translation_domain=DOMAIN,
        translation_key=key,
        translation_placeholders={**err.placeholders, "error": str(err)},
    )
