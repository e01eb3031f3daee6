"""Translated errors users see for what they sent or what the runtime did."""

from homeassistant.exceptions import HomeAssistantError, ServiceValidationError

from .const import DOMAIN
from .host.rkllm.errors import RKLLMError


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
    """Return the translated error of a run the runtime failed (or its process died)."""
    return HomeAssistantError(
        translation_domain=DOMAIN,
        translation_key="generation_failed",
        translation_placeholders={"error": str(err)},
    )
