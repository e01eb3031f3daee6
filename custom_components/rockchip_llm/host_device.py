"""The device of a runtime entry's host: the board its agents run on."""

from homeassistant.config_entries import ConfigEntry
from homeassistant.core import HomeAssistant, callback
from homeassistant.helpers import device_registry as dr

from .const import DOMAIN
from .remote import RuntimeHost


def host_device_identifier(entry: ConfigEntry) -> tuple[str, str]:
    """Return the identifier of the entry's host device."""
    return (DOMAIN, f"host_{entry.entry_id}")


@callback
def async_register_host_device(
    hass: HomeAssistant, entry: ConfigEntry, host: RuntimeHost
) -> dr.DeviceEntry:
    """Show the host on the device page: its name, version and SoC, as it says.

    Its model line says what the device is (a hostname alone may not).
    """
    soc = host.board.get("soc")
    return dr.async_get(hass).async_get_or_create(
        config_entry_id=entry.entry_id,
        identifiers={host_device_identifier(entry)},
        name=str(host.hello.get("hostname") or host.where),
        manufacturer="Rockchip" if soc else None,
        model=f"{str(soc).upper()} runtime host" if soc else "Runtime host",
        sw_version=str(host.hello.get("host_version")),
    )
