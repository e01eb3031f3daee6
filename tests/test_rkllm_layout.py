"""The ctypes layouts equal what a C compiler makes of our declarations and the real headers."""

import ctypes
import json
from pathlib import Path
import subprocess

import pytest

from custom_components.rockchip_llm.host.rkllm import abi
from custom_components.rockchip_llm.host.rkllm.abi import AbiFamily

from .conftest import SIM_DIR

CTYPES_BY_FAMILY: dict[AbiFamily, dict[str, type[ctypes.Structure]]] = {
    AbiFamily.V1_2: {
        "RKLLMParam": abi.RKLLMParam12,
        "RKLLMInput": abi.RKLLMInput12,
        "RKLLMInferParam": abi.RKLLMInferParam12,
        "RKLLMMultiModalInput": abi.RKLLMMultiModalInput12,
    },
    AbiFamily.V1_3: {
        "RKLLMParam": abi.RKLLMParam13,
        "RKLLMInput": abi.RKLLMInput13,
        "RKLLMInferParam": abi.RKLLMInferParam13,
        "RKLLMMultiModalInput": abi.RKLLMMultiModalInput13,
        "RKLLMImageInput": abi.RKLLMImageInput13,
        "RKLLMVideoInput": abi.RKLLMVideoInput13,
        "RKLLMSamplingParam": abi.RKLLMSamplingParam,
        "RKLLMCallback": abi.RKLLMCallback,
    },
}
SHARED: dict[str, type[ctypes.Structure]] = {
    "RKLLMExtendParam": abi.RKLLMExtendParam,
    "RKLLMEmbedInput": abi.RKLLMEmbedInput,
    "RKLLMTokenInput": abi.RKLLMTokenInput,
    "RKLLMLoraParam": abi.RKLLMLoraParam,
    "RKLLMPromptCacheParam": abi.RKLLMPromptCacheParam,
    "RKLLMResultLastHiddenLayer": abi.RKLLMResultLastHiddenLayer,
    "RKLLMResultLogits": abi.RKLLMResultLogits,
    "RKLLMPerfStat": abi.RKLLMPerfStat,
    "RKLLMResult": abi.RKLLMResult,
}

# Sizes measured by compiling the real 1.2.3 and 1.3.0 headers (runtime doc §12).
HEADER_SIZES = {
    AbiFamily.V1_2: {
        "RKLLMParam": 208,
        "RKLLMInput": 64,
        "RKLLMInferParam": 32,
        "RKLLMMultiModalInput": 48,
    },
    AbiFamily.V1_3: {
        "RKLLMParam": 184,
        "RKLLMInput": 160,
        "RKLLMInferParam": 40,
        "RKLLMMultiModalInput": 144,
        "RKLLMSamplingParam": 36,
        "RKLLMCallback": 48,
    },
}
HEADER_OFFSETS = {
    AbiFamily.V1_2: {
        ("RKLLMParam", "is_async"): 57,
        ("RKLLMParam", "extend_param"): 88,
        ("RKLLMInferParam", "keep_history"): 24,
    },
    AbiFamily.V1_3: {
        ("RKLLMParam", "ignore_eos_token"): 57,
        ("RKLLMParam", "is_async"): 58,
        ("RKLLMParam", "extend_param"): 60,
        ("RKLLMInferParam", "sampling_params"): 24,
        ("RKLLMInferParam", "keep_history"): 32,
        ("RKLLMInferParam", "max_new_tokens"): 36,
    },
}


def c_layout(family: AbiFamily, tmp_path: Path) -> dict[str, dict[str, object]]:
    """Compile the layout probe for a family and return what it prints."""
    binary = tmp_path / f"probe{family}"
    subprocess.run(
        [
            "cc",
            f"-DRKLLM_SIM_ABI={family.replace('.', '')}",
            "-I",
            str(SIM_DIR),
            "-o",
            str(binary),
            str(SIM_DIR / "layout_probe.c"),
        ],
        check=True,
    )
    output = subprocess.run(
        [str(binary)], check=True, capture_output=True, text=True
    ).stdout
    result: dict[str, dict[str, object]] = json.loads(output)
    return result


def test_ctypes_match_c_layout(abi_family: AbiFamily, tmp_path: Path) -> None:
    """Every declared struct has the C size and every field the C offset."""
    layout = c_layout(abi_family, tmp_path)
    structs = {**SHARED, **CTYPES_BY_FAMILY[abi_family]}
    for name, struct in structs.items():
        assert name in layout, name
        assert ctypes.sizeof(struct) == layout[name]["size"], name
        fields = layout[name]["fields"]
        assert isinstance(fields, dict)
        for field, offset in fields.items():
            descriptor = getattr(struct, field, None)
            assert descriptor is not None, f"{name}.{field} is not declared"
            assert descriptor.offset == offset, f"{name}.{field}"


def test_layout_matches_real_headers(abi_family: AbiFamily) -> None:
    """Sizes and the offsets that moved between releases equal the real headers'."""
    structs = CTYPES_BY_FAMILY[abi_family]
    for name, size in HEADER_SIZES[abi_family].items():
        assert ctypes.sizeof(structs[name]) == size, name
    for (name, field), offset in HEADER_OFFSETS[abi_family].items():
        assert getattr(structs[name], field).offset == offset
    assert ctypes.sizeof(abi.RKLLMResult) == 72
    assert abi.RKLLMResult.perf.offset == 48
    assert ctypes.sizeof(abi.RKLLMExtendParam) == 120


@pytest.mark.parametrize(
    ("state", "value"),
    [
        (abi.CallState.NORMAL, 0),
        (abi.CallState.WAITING, 1),
        (abi.CallState.FINISH, 2),
        (abi.CallState.ERROR, 3),
    ],
)
def test_call_states(state: abi.CallState, value: int) -> None:
    """Callback states take the header's values (not the 1.0.x ones)."""
    assert state == value
