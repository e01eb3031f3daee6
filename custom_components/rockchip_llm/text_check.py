"""Refuse text the runtime would cut short: its C strings end at the first NUL."""

from homeassistant.exceptions import ServiceValidationError

from .const import DOMAIN


def refuse_nul(text: str, field: str) -> None:
    """Raise a translated validation error when ``text`` holds a NUL character."""
    if "\0" in text:
        raise ServiceValidationError(
            translation_domain=DOMAIN,
            translation_key="text_has_nul",
            translation_placeholders={"field": field},
        )
