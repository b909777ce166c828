"""Import ``timm`` without ``torchvision``: a stub ``torchvision`` that exists only while timm imports.

timm imports torchvision at module level (``FrozenBatchNorm2d``, transforms, datasets),
but building and running its models needs none of it. torchvision cannot be installed
beside this CPU torch (pip would replace torch, and the matching 0.28 wheel fails to load
its operators: "operator torchvision::nms does not exist"), so :func:`import_timm` puts a
finder at the front of ``sys.meta_path`` for the duration of ``import timm`` that answers
every ``torchvision`` and ``torchvision.*`` import with a stub package. Any name taken
from the stub is a placeholder class: ``isinstance`` checks against it are simply false,
attribute access (``InterpolationMode.BILINEAR``) gives further placeholders, and calling
it raises ``ImportError`` naming what needed torchvision (timm's data transforms, its
FrozenBatchNorm conversion, its fx feature extraction). Afterwards the finder and every
stub module are removed from ``sys.modules``, so nothing else sees a fake torchvision; a
real, importable torchvision is used when there is one.

Usage, in a model file::

    from splitinfer.models.timm_shim import import_timm
    timm = import_timm()
    model = timm.create_model("resnet18", pretrained=False)
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import threading
from types import ModuleType

from splitinfer.errors import UserError

__all__ = ["import_timm", "STUB_NAME"]

STUB_NAME = "torchvision"

# Executed in each stub module's namespace (no attribute is assigned from outside).
_STUB_SOURCE = '''
__path__ = []
__splitinfer_stub__ = True


class _MissingMeta(type):
    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _MissingMeta(name, (_Missing,), {"__module__": cls.__module__})


class _Missing(metaclass=_MissingMeta):
    def __init__(self, *args, **kwargs):
        raise ImportError(
            f"{type(self).__module__}.{type(self).__name__} needs torchvision, which is not installed "
            "(timm was imported through splitinfer.models.timm_shim)"
        )


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    return _MissingMeta(name, (_Missing,), {"__module__": __name__})
'''

_lock = threading.Lock()


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Answers ``torchvision`` and its submodules with stub packages."""

    def find_spec(self, fullname: str, path: object, target: object = None) -> importlib.machinery.ModuleSpec | None:
        if fullname == STUB_NAME or fullname.startswith(STUB_NAME + "."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return None  # the default module object

    def exec_module(self, module: ModuleType) -> None:
        exec(_STUB_SOURCE, module.__dict__)


def _real_torchvision() -> bool:
    """True when a torchvision imports for real (then timm gets it, not the stub)."""
    if STUB_NAME in sys.modules:
        return not getattr(sys.modules[STUB_NAME], "__splitinfer_stub__", False)
    try:
        importlib.import_module(STUB_NAME)
    except Exception:  # not installed, or built for another torch ("operator ... does not exist")
        _drop_modules(STUB_NAME)
        return False
    return True


def _drop_modules(prefix: str) -> None:
    for name in [n for n in sys.modules if n == prefix or n.startswith(prefix + ".")]:
        del sys.modules[name]


def import_timm() -> ModuleType:
    """``import timm``, with the torchvision stub in place when there is no working torchvision."""
    with _lock:
        if "timm" in sys.modules:
            return sys.modules["timm"]
        if _real_torchvision():
            return importlib.import_module("timm")
        finder = _StubFinder()
        sys.meta_path.insert(0, finder)
        try:
            return importlib.import_module("timm")
        except ModuleNotFoundError as exc:
            if exc.name == "timm":
                raise UserError("timm is not installed: pip install --no-deps 'timm>=1.0' (it needs no torchvision here)") from None
            raise
        finally:
            sys.meta_path.remove(finder)
            _drop_modules(STUB_NAME)
