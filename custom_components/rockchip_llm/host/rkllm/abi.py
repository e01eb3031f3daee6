"""ctypes declarations of the RKLLM runtime C ABI, one layout per ABI family.

Written from the published facts about ``rkllm.h`` (LP64, aarch64 Linux). Family
``1.2`` covers runtimes 1.2.1 to 1.2.3, family ``1.3`` covers runtime 1.3.0. Every
minor release changed RKLLMParam, RKLLMInput or RKLLMInferParam, so a family is
picked once when the library is loaded and never guessed per call.
"""

import ctypes
from dataclasses import dataclass
from enum import IntEnum, StrEnum
from typing import Any

LLMHandle = ctypes.c_void_p


class AbiFamily(StrEnum):
    """The runtime ABI families we support."""

    V1_2 = "1.2"
    V1_3 = "1.3"


def family_setting(family: AbiFamily) -> str:
    """Return how a setting names a family ("1_3": translation keys have no dots)."""
    return family.value.replace(".", "_")


def parse_family(value: str | None) -> AbiFamily | None:
    """Return the ABI family a setting names ("auto" or nothing: None)."""
    if value in (None, "", "auto"):
        return None
    return AbiFamily(value.replace("_", "."))


class CallState(IntEnum):
    """LLMCallState: the state passed to the result callback."""

    NORMAL = 0
    WAITING = 1
    FINISH = 2
    ERROR = 3


class InputType(IntEnum):
    """RKLLMInputType."""

    PROMPT = 0
    TOKEN = 1
    EMBED = 2
    MULTIMODAL = 3


class InferMode(IntEnum):
    """RKLLMInferMode."""

    GENERATE = 0
    GET_LAST_HIDDEN_LAYER = 1
    GET_LOGITS = 2


class CallbackAction(IntEnum):
    """Values a result callback returns (runtime >= 1.2.1)."""

    CONTINUE = 0
    PAUSE = 1


class RKLLMExtendParam(ctypes.Structure):
    """Extended init parameters (same layout in both families, 120 bytes)."""

    _fields_ = [
        ("base_domain_id", ctypes.c_int32),
        ("embed_flash", ctypes.c_int8),
        ("enabled_cpus_num", ctypes.c_int8),
        ("enabled_cpus_mask", ctypes.c_uint32),
        ("n_batch", ctypes.c_uint8),
        ("use_cross_attn", ctypes.c_int8),
        ("reserved", ctypes.c_uint8 * 104),
    ]


_PARAM_HEAD: list[tuple[str, Any]] = [
    ("model_path", ctypes.c_char_p),
    ("max_context_len", ctypes.c_int32),
    ("max_new_tokens", ctypes.c_int32),
    ("top_k", ctypes.c_int32),
    ("n_keep", ctypes.c_int32),
    ("top_p", ctypes.c_float),
    ("temperature", ctypes.c_float),
    ("repeat_penalty", ctypes.c_float),
    ("frequency_penalty", ctypes.c_float),
    ("presence_penalty", ctypes.c_float),
    ("mirostat", ctypes.c_int32),
    ("mirostat_tau", ctypes.c_float),
    ("mirostat_eta", ctypes.c_float),
    ("skip_special_token", ctypes.c_bool),
]


class RKLLMParam12(ctypes.Structure):
    """RKLLMParam of runtimes 1.2.1 to 1.2.3 (208 bytes)."""

    _fields_ = [
        *_PARAM_HEAD,
        ("is_async", ctypes.c_bool),
        ("img_start", ctypes.c_char_p),
        ("img_end", ctypes.c_char_p),
        ("img_content", ctypes.c_char_p),
        ("extend_param", RKLLMExtendParam),
    ]


class RKLLMParam13(ctypes.Structure):
    """RKLLMParam of runtime 1.3.0 (184 bytes)."""

    _fields_ = [
        *_PARAM_HEAD,
        ("ignore_eos_token", ctypes.c_bool),
        ("is_async", ctypes.c_bool),
        ("extend_param", RKLLMExtendParam),
    ]


class RKLLMEmbedInput(ctypes.Structure):
    """Embedding input."""

    _fields_ = [
        ("embed", ctypes.POINTER(ctypes.c_float)),
        ("n_tokens", ctypes.c_size_t),
    ]


class RKLLMTokenInput(ctypes.Structure):
    """Token id input."""

    _fields_ = [
        ("input_ids", ctypes.POINTER(ctypes.c_int32)),
        ("n_tokens", ctypes.c_size_t),
    ]


class RKLLMMultiModalInput12(ctypes.Structure):
    """Multimodal input of family 1.2 (48 bytes)."""

    _fields_ = [
        ("prompt", ctypes.c_char_p),
        ("image_embed", ctypes.POINTER(ctypes.c_float)),
        ("n_image_tokens", ctypes.c_size_t),
        ("n_image", ctypes.c_size_t),
        ("image_width", ctypes.c_size_t),
        ("image_height", ctypes.c_size_t),
    ]


class RKLLMImageInput13(ctypes.Structure):
    """Image part of the 1.3 multimodal input (64 bytes)."""

    _fields_ = [
        ("image_embed", ctypes.POINTER(ctypes.c_float)),
        ("n_image_tokens", ctypes.c_size_t),
        ("n_image", ctypes.c_size_t),
        ("image_start", ctypes.c_char_p),
        ("image_end", ctypes.c_char_p),
        ("image_content", ctypes.c_char_p),
        ("image_width", ctypes.c_size_t),
        ("image_height", ctypes.c_size_t),
    ]


class RKLLMVideoInput13(ctypes.Structure):
    """Video part of the 1.3 multimodal input (72 bytes)."""

    _fields_ = [
        ("video_embed", ctypes.POINTER(ctypes.c_float)),
        ("n_frame_tokens", ctypes.c_size_t),
        ("n_frame_per_video", ctypes.c_size_t),
        ("n_video", ctypes.c_size_t),
        ("video_start", ctypes.c_char_p),
        ("video_end", ctypes.c_char_p),
        ("video_content", ctypes.c_char_p),
        ("frame_width", ctypes.c_size_t),
        ("frame_height", ctypes.c_size_t),
    ]


class RKLLMMultiModalInput13(ctypes.Structure):
    """Multimodal input of family 1.3 (144 bytes)."""

    _fields_ = [
        ("prompt", ctypes.c_char_p),
        ("image", RKLLMImageInput13),
        ("video", RKLLMVideoInput13),
    ]


class _InputUnion12(ctypes.Union):
    _fields_ = [
        ("prompt_input", ctypes.c_char_p),
        ("embed_input", RKLLMEmbedInput),
        ("token_input", RKLLMTokenInput),
        ("multimodal_input", RKLLMMultiModalInput12),
    ]


class _InputUnion13(ctypes.Union):
    _fields_ = [
        ("prompt_input", ctypes.c_char_p),
        ("embed_input", RKLLMEmbedInput),
        ("token_input", RKLLMTokenInput),
        ("multimodal_input", RKLLMMultiModalInput13),
    ]


_INPUT_HEAD: list[tuple[str, Any]] = [
    ("role", ctypes.c_char_p),
    ("enable_thinking", ctypes.c_bool),
    ("input_type", ctypes.c_int),
]


class RKLLMInput12(ctypes.Structure):
    """RKLLMInput of family 1.2 (64 bytes); the union is anonymous in C."""

    _anonymous_ = ("u",)
    _fields_ = [*_INPUT_HEAD, ("u", _InputUnion12)]


class RKLLMInput13(ctypes.Structure):
    """RKLLMInput of family 1.3 (160 bytes); the union is anonymous in C."""

    _anonymous_ = ("u",)
    _fields_ = [*_INPUT_HEAD, ("u", _InputUnion13)]


class RKLLMLoraParam(ctypes.Structure):
    """Per-run LoRA selection."""

    _fields_ = [("lora_adapter_name", ctypes.c_char_p)]


class RKLLMPromptCacheParam(ctypes.Structure):
    """Per-run prompt cache saving (16 bytes)."""

    _fields_ = [
        ("save_prompt_cache", ctypes.c_int),
        ("prompt_cache_path", ctypes.c_char_p),
    ]


class RKLLMSamplingParam(ctypes.Structure):
    """Per-run sampling of family 1.3 (36 bytes)."""

    _fields_ = [
        ("top_k", ctypes.c_int32),
        ("top_p", ctypes.c_float),
        ("temperature", ctypes.c_float),
        ("repeat_penalty", ctypes.c_float),
        ("frequency_penalty", ctypes.c_float),
        ("presence_penalty", ctypes.c_float),
        ("mirostat", ctypes.c_int32),
        ("mirostat_tau", ctypes.c_float),
        ("mirostat_eta", ctypes.c_float),
    ]


class RKLLMInferParam12(ctypes.Structure):
    """RKLLMInferParam of family 1.2 (32 bytes)."""

    _fields_ = [
        ("mode", ctypes.c_int),
        ("lora_params", ctypes.POINTER(RKLLMLoraParam)),
        ("prompt_cache_params", ctypes.POINTER(RKLLMPromptCacheParam)),
        ("keep_history", ctypes.c_int),
    ]


class RKLLMInferParam13(ctypes.Structure):
    """RKLLMInferParam of family 1.3 (40 bytes)."""

    _fields_ = [
        ("mode", ctypes.c_int),
        ("lora_params", ctypes.POINTER(RKLLMLoraParam)),
        ("prompt_cache_params", ctypes.POINTER(RKLLMPromptCacheParam)),
        ("sampling_params", ctypes.POINTER(RKLLMSamplingParam)),
        ("keep_history", ctypes.c_int),
        ("max_new_tokens", ctypes.c_int32),
    ]


class RKLLMResultLastHiddenLayer(ctypes.Structure):
    """Hidden states of the last layer (valid only inside the callback)."""

    _fields_ = [
        ("hidden_states", ctypes.POINTER(ctypes.c_float)),
        ("embd_size", ctypes.c_int),
        ("num_tokens", ctypes.c_int),
    ]


class RKLLMResultLogits(ctypes.Structure):
    """Logits (valid only inside the callback)."""

    _fields_ = [
        ("logits", ctypes.POINTER(ctypes.c_float)),
        ("vocab_size", ctypes.c_int),
        ("num_tokens", ctypes.c_int),
    ]


class RKLLMPerfStat(ctypes.Structure):
    """Performance counters, filled on RKLLM_RUN_FINISH (20 bytes)."""

    _fields_ = [
        ("prefill_time_ms", ctypes.c_float),
        ("prefill_tokens", ctypes.c_int),
        ("generate_time_ms", ctypes.c_float),
        ("generate_tokens", ctypes.c_int),
        ("memory_usage_mb", ctypes.c_float),
    ]


class RKLLMResult(ctypes.Structure):
    """One callback result (72 bytes, same in both families)."""

    _fields_ = [
        ("text", ctypes.c_char_p),
        ("token_id", ctypes.c_int32),
        ("last_hidden_layer", RKLLMResultLastHiddenLayer),
        ("logits", RKLLMResultLogits),
        ("perf", RKLLMPerfStat),
    ]


LLMResultCallback = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(RKLLMResult), ctypes.c_void_p, ctypes.c_int
)


class RKLLMCallback(ctypes.Structure):
    """The callback bundle rkllm_init takes in family 1.3 (48 bytes)."""

    _fields_ = [
        ("result_callback", LLMResultCallback),
        ("result_userdata", ctypes.c_void_p),
        ("tokenizer_callback", ctypes.c_void_p),
        ("tokenizer_userdata", ctypes.c_void_p),
        ("embed_callback", ctypes.c_void_p),
        ("embed_userdata", ctypes.c_void_p),
    ]


@dataclass(frozen=True, slots=True)
class AbiLayout:
    """The structures and prototypes of one ABI family."""

    family: AbiFamily
    param: type[ctypes.Structure]
    input: type[ctypes.Structure]
    infer_param: type[ctypes.Structure]

    @property
    def has_sampling_params(self) -> bool:
        """Whether runs take per-run sampling and max_new_tokens."""
        return self.family is AbiFamily.V1_3

    def prototypes(self) -> dict[str, tuple[Any, list[Any]]]:
        """Return restype and argtypes of every function the binding calls."""
        handle_ptr = ctypes.POINTER(LLMHandle)
        init_callback: Any = (
            ctypes.POINTER(RKLLMCallback)
            if self.family is AbiFamily.V1_3
            else LLMResultCallback
        )
        c_int_p = ctypes.POINTER(ctypes.c_int)
        return {
            "rkllm_createDefaultParam": (self.param, []),
            "rkllm_init": (
                ctypes.c_int,
                [handle_ptr, ctypes.POINTER(self.param), init_callback],
            ),
            "rkllm_destroy": (ctypes.c_int, [LLMHandle]),
            "rkllm_run": (
                ctypes.c_int,
                [
                    LLMHandle,
                    ctypes.POINTER(self.input),
                    ctypes.POINTER(self.infer_param),
                    ctypes.c_void_p,
                ],
            ),
            "rkllm_abort": (ctypes.c_int, [LLMHandle]),
            "rkllm_is_running": (ctypes.c_int, [LLMHandle]),
            "rkllm_load_prompt_cache": (ctypes.c_int, [LLMHandle, ctypes.c_char_p]),
            "rkllm_release_prompt_cache": (ctypes.c_int, [LLMHandle]),
            "rkllm_clear_kv_cache": (
                ctypes.c_int,
                [LLMHandle, ctypes.c_int, c_int_p, c_int_p],
            ),
            "rkllm_get_kv_cache_size": (ctypes.c_int, [LLMHandle, c_int_p]),
            "rkllm_set_chat_template": (
                ctypes.c_int,
                [LLMHandle, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p],
            ),
            "rkllm_set_function_tools": (
                ctypes.c_int,
                [LLMHandle, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p],
            ),
        }


LAYOUTS: dict[AbiFamily, AbiLayout] = {
    AbiFamily.V1_2: AbiLayout(
        family=AbiFamily.V1_2,
        param=RKLLMParam12,
        input=RKLLMInput12,
        infer_param=RKLLMInferParam12,
    ),
    AbiFamily.V1_3: AbiLayout(
        family=AbiFamily.V1_3,
        param=RKLLMParam13,
        input=RKLLMInput13,
        infer_param=RKLLMInferParam13,
    ),
}

REQUIRED_SYMBOLS: tuple[str, ...] = tuple(LAYOUTS[AbiFamily.V1_3].prototypes())
