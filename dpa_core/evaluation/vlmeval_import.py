"""Import VLMEvalKit (`import vlmeval`, PyPI package nvidia-vlmeval) without letting it change this process.

Only evaluators that need VLMEvalKit call `import_vlmeval()`; nothing imports it at package import.
What its `import vlmeval` does, and what is done about it here:
  * it sets `ssl._create_default_https_context = ssl._create_unverified_context`, i.e. turns off
    TLS certificate checks for the whole process -> restored right after the import;
  * `vlmeval.vlm` calls `torch.set_grad_enabled(False)`: gradients off for the whole process, which
    breaks any training after it -> restored; and `torch.manual_seed(1234)` -> the RNG state is restored;
  * modules it imports change the environment (PATH, LD_LIBRARY_PATH and Qt paths from decord/cv2,
    model-specific variables from its Ola adapter) -> os.environ is restored;
  * it calls `logging.basicConfig(...)` (a root handler and format for everybody) -> restored, and
    logs an ERROR when no `.env` file of judge API keys sits next to the package -> silenced;
  * it imports torchvision (module level, in video datasets and other model adapters we never use).
    PyPI's torchvision wheels are CUDA builds: next to the CPU torch wheel they fail to load
    ("operator torchvision::nms does not exist"), and an installed-but-broken torchvision also breaks
    transformers' image processors. So on CPU torchvision is not installed; during the import a
    placeholder stands in for it, and is removed again afterwards. Code that really needs torchvision
    (VLMEvalKit's video datasets, InternVL-style adapters) then fails with ModuleNotFoundError when
    called; image benchmarks and our adapter never touch it. Where torchvision works (CUDA torch),
    the real one is used.
  * `load_env()` reads a `.env` file next to the installed package, if any (API keys for judges).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import logging
import os
import ssl
import sys
import types
from contextlib import contextmanager

INSTALL_HINT = (
    "pip install -c constraints.txt --no-deps nvidia-vlmeval==26.3 && pip install -c constraints.txt "
    "decord==0.6.0 opencv-python==5.0.0.93 openai==3.54.0 sentencepiece==0.2.3 imageio==2.38.1 "
    "validators==0.36.0 timeout-decorator==0.5.0 sty==1.0.6 openpyxl==3.1.5 xlsxwriter==3.2.2 tiktoken==0.14.0"
)
_STUBBED_PACKAGES = ("torchvision",)


class VLMEvalUnavailable(ImportError):
    """VLMEvalKit is not installed or cannot be imported here."""


class _Unavailable:
    """Stands for any name of a package that is not usable here; fails only when actually used."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Unavailable(f"{self._name}.{attr}")

    def __call__(self, *args, **kwargs):
        raise ModuleNotFoundError(f"{self._name} needs torchvision, which is not usable in this environment")

    def __mro_entries__(self, bases):  # `class X(torchvision.Something)` at import time
        return (object,)


class _PlaceholderFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, packages: tuple[str, ...]):
        self.packages = packages

    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in self.packages:
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        module.__path__ = []

        def module_getattr(attr: str, _name=spec.name):
            if attr.startswith("__"):
                raise AttributeError(attr)
            return _Unavailable(f"{_name}.{attr}")

        module.__getattr__ = module_getattr
        return module

    def exec_module(self, module):
        pass


def _usable(package: str) -> bool:
    if importlib.util.find_spec(package) is None:
        return False
    try:
        __import__(package)
    except Exception:  # noqa: BLE001 - any failure (RuntimeError from a CUDA-only build) means unusable
        for name in [m for m in sys.modules if m.split(".")[0] == package]:
            del sys.modules[name]
        return False
    return True


@contextmanager
def _placeholders_for_unusable_packages():
    # transformers caches "is torchvision available?" on first ask: ask now, before a placeholder
    # could make the answer "yes", so transformers keeps using its PIL image processors.
    from transformers.utils import import_utils

    import_utils.is_torchvision_available()
    missing = tuple(p for p in _STUBBED_PACKAGES if not _usable(p))
    finder = _PlaceholderFinder(missing) if missing else None
    if finder is not None:
        sys.meta_path.insert(0, finder)
    try:
        yield missing
    finally:
        if finder is not None:
            sys.meta_path.remove(finder)
            for name in [m for m in sys.modules if m.split(".")[0] in missing]:
                del sys.modules[name]


@contextmanager
def _process_state_restored():
    import torch

    https_context = ssl._create_default_https_context
    grad_enabled, rng_state = torch.is_grad_enabled(), torch.random.get_rng_state()
    environ = dict(os.environ)
    root = logging.getLogger()
    handlers, level, disabled = root.handlers[:], root.level, logging.root.manager.disable
    # Its load_env() logs an ERROR when there is no .env of API keys, which we never use.
    logging.disable(logging.ERROR)
    try:
        yield
    finally:
        logging.disable(disabled)
        ssl._create_default_https_context = https_context
        torch.set_grad_enabled(grad_enabled)
        torch.random.set_rng_state(rng_state)
        if dict(os.environ) != environ:
            os.environ.clear()
            os.environ.update(environ)
        root.handlers[:] = handlers
        root.setLevel(level)


def import_vlmeval() -> types.ModuleType:
    """`import vlmeval`, with its process-wide side effects undone (see the module docstring)."""
    if "vlmeval" in sys.modules:
        return sys.modules["vlmeval"]
    if importlib.util.find_spec("vlmeval") is None:
        raise VLMEvalUnavailable(f"VLMEvalKit is not installed. Install it with: {INSTALL_HINT}")
    with _process_state_restored(), _placeholders_for_unusable_packages():
        try:
            import vlmeval
        except Exception as err:  # noqa: BLE001 - report any import failure the same way
            for name in [m for m in sys.modules if m.split(".")[0] == "vlmeval"]:
                del sys.modules[name]
            raise VLMEvalUnavailable(f"VLMEvalKit is installed but cannot be imported: {err!r}") from err
    return vlmeval


def vlmeval_available() -> bool:
    return importlib.util.find_spec("vlmeval") is not None
