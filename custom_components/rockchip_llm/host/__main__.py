"""Start the runtime host: ``python3 <path to this folder> --help``.

The folder is imported as a package of a private name, so the host never imports
the Home Assistant side of the integration (its parent folder).
"""

import importlib
import importlib.util
import os
import sys

_FOLDER = os.path.dirname(os.path.abspath(__file__))  # noqa: PTH100, PTH120
if sys.path and os.path.abspath(sys.path[0]) == _FOLDER:  # noqa: PTH100
    del sys.path[0]  # its modules are the package's, not top-level ones
_SPEC = importlib.util.spec_from_file_location(
    "rockchip_llm_host",
    os.path.join(_FOLDER, "__init__.py"),  # noqa: PTH118
    submodule_search_locations=[_FOLDER],
)
assert _SPEC is not None and _SPEC.loader is not None
_PACKAGE = importlib.util.module_from_spec(_SPEC)
sys.modules[_SPEC.name] = _PACKAGE
_SPEC.loader.exec_module(_PACKAGE)
importlib.import_module(f"{_SPEC.name}.rkllm.child").start_coverage()
sys.exit(importlib.import_module(f"{_SPEC.name}.cli").main(sys.argv[1:]))
