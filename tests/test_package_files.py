"""What hassfest and HACS check for a custom integration, checked here."""

import json
from pathlib import Path
import re

import yaml

from custom_components.rockchip_llm import binary_sensor, sensor, services
from custom_components.rockchip_llm.const import AGENT_OPTION_DEFAULTS, DOMAIN
from homeassistant import components
from homeassistant.const import __version__ as HA_VERSION
from homeassistant.core import HomeAssistant

from .conftest import PACKAGE, REPO


def load_json(name: str) -> dict:
    """Read one of the package's JSON files."""
    data: dict = json.loads((PACKAGE / name).read_text())
    return data


def test_manifest_keys_and_order() -> None:
    """domain and name first, then every other key in alphabetical order."""
    manifest = load_json("manifest.json")
    keys = list(manifest)
    assert keys[:2] == ["domain", "name"]
    assert keys[2:] == sorted(keys[2:])
    assert manifest["domain"] == DOMAIN
    for key in (
        "codeowners",
        "config_flow",
        "dependencies",
        "documentation",
        "integration_type",
        "iot_class",
        "issue_tracker",
        "requirements",
        "version",
    ):
        assert key in manifest, key
    assert manifest["documentation"].startswith("https://")
    assert manifest["integration_type"] == "service"
    assert {"conversation"} <= set(manifest["dependencies"])


def pinned(requirements: str, package: str) -> str:
    """The version a requirements file pins a package to."""
    text = (REPO / requirements).read_text()
    match = re.search(rf"^{re.escape(package)}==(\S+)$", text, re.MULTILINE)
    assert match, f"{requirements} pins no {package}"
    return match.group(1)


def version_tuple(version: str) -> tuple[int, ...]:
    """2026.10.4 as (2026, 10, 4)."""
    return tuple(int(part) for part in version.split("."))


def test_hacs_minimum_is_the_tested_minimum() -> None:
    """hacs.json's minimum HA is the one the suite runs against, besides the newest.

    2025.10 is the floor: older HA put the time of day into the system prompt, so
    no prompt cache could ever match.
    """
    hacs = json.loads((REPO / "hacs.json").read_text())
    assert hacs["name"]
    minimum = pinned("requirements_test_min.txt", "homeassistant")
    newest = pinned("requirements_test.txt", "homeassistant")
    assert hacs["homeassistant"] == minimum
    assert (2025, 10) <= version_tuple(minimum) < version_tuple(newest)


def test_running_ha_is_in_the_declared_range() -> None:
    """The suite runs on one of the two tested HA versions (scripts/test --ha)."""
    tested = {
        pinned("requirements_test.txt", "homeassistant"),
        pinned("requirements_test_min.txt", "homeassistant"),
    }
    assert HA_VERSION in tested


def test_manifest_requires_nothing_home_assistant_ships() -> None:
    """Only packages HA lacks belong in manifest.json (none today: ctypes is stdlib)."""
    assert load_json("manifest.json")["requirements"] == []


def test_translations_are_strings() -> None:
    """translations/en.json is strings.json with references resolved."""
    strings = load_json("strings.json")
    english = load_json("translations/en.json")

    def shape(data: object) -> object:
        return (
            {key: shape(value) for key, value in data.items()}
            if isinstance(data, dict)
            else None
        )

    assert shape(strings) == shape(english)
    assert "[%key:" not in json.dumps(english)


def test_texts_have_no_markup_tags() -> None:
    """The frontend reads "<word>" as a tag of the message format: no text may hold one.

    (The host step once said "python3 <config>/…" and showed "Translation error:
    UNCLOSED_TAG" instead.)
    """

    def texts(data: object) -> list[str]:
        if isinstance(data, dict):
            return [text for value in data.values() for text in texts(value)]
        return [data] if isinstance(data, str) else []

    tagged = [
        text
        for text in texts(load_json("translations/en.json"))
        if re.search(r"</?[A-Za-z][^>]*>", text)
    ]
    assert tagged == []


def test_every_flow_field_is_described() -> None:
    """Every form field of every step has a label and a data_description."""
    strings = load_json("strings.json")
    steps = list(strings["config"]["step"].values())
    for subentry in strings["config_subentries"].values():
        steps += subentry["step"].values()
    for step in steps:
        assert set(step.get("data", {})) == set(step.get("data_description", {}))


async def test_services_yaml_matches_registered_actions(hass: HomeAssistant) -> None:
    """services.yaml, strings.json and icons.json cover exactly the registered actions."""
    await services.async_setup_services(hass)
    registered = set(hass.services.async_services_for_domain(DOMAIN))
    described = yaml.safe_load((PACKAGE / "services.yaml").read_text())
    strings = load_json("strings.json")["services"]
    icons = load_json("icons.json")["services"]
    assert registered == set(described) == set(strings) == set(icons)
    for action, spec in described.items():
        assert set(spec.get("fields", {})) == set(strings[action].get("fields", {})), (
            action
        )
        schema_fields = {
            str(key)
            for key in hass.services.async_services_for_domain(DOMAIN)[
                action
            ].schema.schema
        }
        assert set(spec.get("fields", {})) == schema_fields, action


def test_exception_keys_are_translated() -> None:
    """Every translation_key raised or used for a repair in the package has a message."""
    strings = load_json("strings.json")
    translated = set(strings["exceptions"]) | set(strings["issues"])
    source = "\n".join(path.read_text() for path in PACKAGE.rglob("*.py"))
    keys = (
        set(re.findall(r'translation_key="([a-z_]+)"', source))
        | set(re.findall(r'translation_key = "([a-z_]+)"', source))
        | set(re.findall(r'_validation_error\(\s*"([a-z_]+)"', source))
    )
    keys -= {"history_strategy"}  # a selector, not an exception
    keys -= {key for platform in strings["entity"].values() for key in platform}
    missing = keys - translated
    assert not missing


def test_agent_forms_have_their_own_texts() -> None:
    """Conversation and AI Task forms, adding and reconfiguring, each say what they are."""
    english = load_json("translations/en.json")["config_subentries"]
    texts = [
        (
            english[kind]["step"][step]["title"],
            english[kind]["step"][step]["description"],
        )
        for kind in ("conversation", "ai_task_data")
        for step in ("set_options", "reconfigure")
    ]
    assert len({title for title, _ in texts}) == 4
    assert len({description for _, description in texts}) == 4
    assert "AI Task" in english["ai_task_data"]["step"]["set_options"]["title"]
    labels = english["conversation"]["step"]["set_options"]
    assert labels["data"]["max_history"] == "Earlier questions remembered"
    assert "questions" in labels["data_description"]["max_history"]


def ha_quality_rules() -> set[str]:
    """Every rule of Home Assistant's quality scale, as its core integrations declare them.

    hassfest makes each core integration with a quality_scale.yaml declare only known
    rules, so their union is the current rule list of the installed Home Assistant.
    """
    rules: set[str] = set()
    for path in Path(components.__file__).parent.glob("*/quality_scale.yaml"):
        rules |= set((yaml.safe_load(path.read_text()) or {}).get("rules", {}))
    return rules


def test_quality_scale_declares_every_rule() -> None:
    """Each rule of the current quality scale is done, or exempt with a reason."""
    ours = yaml.safe_load((PACKAGE / "quality_scale.yaml").read_text())["rules"]
    known = ha_quality_rules()
    assert len(known) > 50
    assert {"docs-triggers", "docs-conditions"} <= set(ours)  # new in HA 2026.x
    assert not known - set(ours), "undeclared rules"
    for name, rule in ours.items():
        assert rule["status"] in {"done", "exempt"}, name
        assert rule.get("comment"), name


def test_entities_are_translated_and_have_icons() -> None:
    """Every status entity has a translated name and an icon; every enum state too."""
    strings = load_json("strings.json")["entity"]
    icons = load_json("icons.json")["entity"]
    descriptions = {
        "sensor": [*sensor.SENSORS, sensor.NPU_LOAD],
        "binary_sensor": [binary_sensor.BUSY],
    }
    assert set(strings) == set(icons) == set(descriptions)
    for platform, platform_descriptions in descriptions.items():
        keys = {description.translation_key for description in platform_descriptions}
        assert keys == set(strings[platform]) == set(icons[platform]), platform
        for description in platform_descriptions:
            assert description.key == description.translation_key
            options = getattr(description, "options", None) or []
            states = strings[platform][description.key].get("state", {})
            assert set(options) <= set(states), description.key


def test_readme_states_the_agent_option_defaults() -> None:
    """The README's option table gives the defaults new agents get (one table in const)."""
    documented: dict[str, str] = {}
    for line in (REPO / "README.md").read_text(encoding="utf-8").splitlines():
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if len(cells) != 3 or not cells[0].startswith("`"):
            continue
        names = re.findall(r"`(\w+)`", cells[0].split("(")[0])
        values = [value.strip().strip("`") for value in cells[2].split(",")]
        if len(names) == len(values):
            documented.update(zip(names, values, strict=True))
    for name, default in AGENT_OPTION_DEFAULTS.items():
        shown = ("on" if default else "off") if isinstance(default, bool) else default
        assert documented[name] == str(shown), name
