"""Store the dev instance's HTTP address as Home Assistant's confirmed settings.

Since HA 2026.10 the HTTP settings live in <config>/.storage/http: YAML is only
migrated once, as a trial that is reverted (to 0.0.0.0:8123) and restarted after
five minutes unless someone confirms it in the UI. scripts/develop writes host and
port as the confirmed ("stable") settings before every start instead; other
settings stored there are kept.

    python -m scripts.dev_http CONFIG_DIR HOST PORT
"""

import json
from pathlib import Path
import sys

from homeassistant.components.http.config import (
    HTTP_STORAGE_SCHEMA,
    STORAGE_KEY,
    STORAGE_MINOR_VERSION,
    STORAGE_VERSION,
)
from homeassistant.util import dt as dt_util


def main(config_dir: str, host: str, port: str) -> None:
    """Write host and port into the stored HTTP settings of config_dir."""
    path = Path(config_dir) / ".storage" / STORAGE_KEY
    stable: dict[str, object] = {}
    if path.is_file():
        stable = json.loads(path.read_text())["data"]["stable"]
    settings = {
        key: value
        for key, value in stable.items()
        if key not in ("created_at", "error", "error_message")
    }
    settings |= {"server_host": [host], "server_port": int(port)}
    data = {
        "version": STORAGE_VERSION,
        "minor_version": STORAGE_MINOR_VERSION,
        "key": STORAGE_KEY,
        "data": {
            "stable": {
                **HTTP_STORAGE_SCHEMA(settings),
                "created_at": dt_util.utcnow().isoformat(),
                "error": None,
                "error_message": None,
            },
            "pending": None,
            "yaml_migration_done": True,
        },
    }
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(data, indent=2))


if __name__ == "__main__":
    main(*sys.argv[1:])
