"""Errors raised by the RKLLM binding.

Each error carries a translation key and placeholders so the integration can show
a translated message; ``str()`` gives a clear English message for logs.
"""


class RKLLMError(Exception):
    """Base class of every binding error."""

    translation_key = "runtime_error"

    def __init__(self, message: str, **placeholders: str) -> None:
        """Store the English message and the translation placeholders."""
        super().__init__(message)
        self.placeholders = {"error": message, **placeholders}


class LibraryError(RKLLMError):
    """The runtime library cannot be used."""

    translation_key = "library_error"


class LibraryNotFound(LibraryError):
    """No file at the library path."""

    translation_key = "library_not_found"


class NotASharedLibrary(LibraryError):
    """The file is not an ELF shared library."""

    translation_key = "library_not_elf"


class WrongArchitecture(LibraryError):
    """The library is built for another CPU architecture."""

    translation_key = "library_wrong_arch"


class MissingSymbols(LibraryError):
    """The library lacks functions the binding needs."""

    translation_key = "library_missing_symbols"


class UnsupportedRuntime(LibraryError):
    """The runtime version (ABI family) is not supported."""

    translation_key = "library_unsupported_version"


class UnknownRuntimeVersion(LibraryError):
    """The runtime version could not be detected."""

    translation_key = "library_unknown_version"


class LibraryLoadError(LibraryError):
    """The dynamic loader refused the library."""

    translation_key = "library_load_failed"


class LibraryCopyFailed(LibraryError):
    """The private copy of the library could not be written (disk full, read-only)."""

    translation_key = "library_copy_failed"

    def __init__(self, message: str, os_error: OSError, **placeholders: str) -> None:
        """Keep the OS error, whose number tells what to fix."""
        super().__init__(message, **placeholders)
        self.os_error = os_error


class LibraryChanged(LibraryError):
    """The private copy is damaged and the original is no longer the checked library."""

    translation_key = "library_changed"


class LibraryCrashed(LibraryError):
    """Loading the library killed (or hung) the process that tried it."""

    translation_key = "library_crashed"


class ModelInitError(RKLLMError):
    """rkllm_init failed for a model."""

    translation_key = "model_init_failed"


class ModelFileMissing(ModelInitError):
    """The model's file (or its folder, or the models folder) is gone."""

    translation_key = "model_file_missing"


class RunError(RKLLMError):
    """A run failed (non-zero return or RKLLM_RUN_ERROR)."""

    translation_key = "run_failed"

    def __init__(self, message: str, code: int) -> None:
        """Store the runtime's return code."""
        super().__init__(message, code=str(code))
        self.code = code


class PromptCacheNotSaved(RKLLMError):
    """The runtime ran the build but wrote no prompt cache file (rknn-llm #517)."""

    translation_key = "prompt_cache_not_saved"


class ModelClosedError(RKLLMError):
    """The model was destroyed."""

    translation_key = "model_closed"


class WorkerDiedError(RKLLMError):
    """The worker process that hosts a model ended unexpectedly."""

    translation_key = "worker_died"


class ModelGivenUp(WorkerDiedError):
    """A model whose worker keeps dying (or died while loading) is not started again."""

    translation_key = "model_given_up"


class RunStalledError(RKLLMError):
    """A run produced no text for too long and was stopped."""

    translation_key = "run_stalled"
