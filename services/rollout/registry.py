"""Rollout backends by name, each in its own module, imported only by the worker that uses it.

A backend named ``NAME`` is a class in the module ``services/rollout/NAME_backend.py``,
registered there with :func:`register_backend`::

    @register_backend("NAME")
    class NameBackend:
        @classmethod
        def from_options(cls, model_dir: str, options: dict) -> NameBackend: ...
        ...  # the rest of services.rollout.backend.RolloutBackend

The file name is what makes a backend known: :func:`available_backends` lists the
``*_backend`` modules of this package without importing any of them (importing vLLM alone
takes seconds and may need a GPU), and :func:`make_backend` imports only the module of the
backend asked for, whose decorator registers the class. Adding a backend is one new file.
A class registered from elsewhere is usable in that process only; rollout workers are other
processes, so a backend for ``rollout.backend`` must follow the file-name convention.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import TYPE_CHECKING

import services.rollout as _package

if TYPE_CHECKING:
    from services.rollout.backend import RolloutBackend

MODULE_SUFFIX = "_backend"

_REGISTRY: dict[str, type] = {}


def register_backend(name: str):
    """Class decorator: register a :class:`~services.rollout.backend.RolloutBackend` class
    under ``name`` (its module should be ``services/rollout/<name>_backend.py``)."""

    def decorator(cls: type) -> type:
        if not callable(getattr(cls, "from_options", None)):
            raise TypeError(f"rollout backend {name!r} ({cls.__qualname__}) needs a classmethod "
                            "from_options(model_dir, options)")
        existing = _REGISTRY.get(name)
        # the same class seen again (its module re-imported) is fine; a second class is not
        if existing is not None and (existing.__module__, existing.__qualname__) != (
                cls.__module__, cls.__qualname__):
            raise ValueError(f"rollout backend {name!r} is already registered "
                             f"({existing.__module__}.{existing.__qualname__})")
        _REGISTRY[name] = cls
        return cls

    return decorator


def _module_names() -> dict[str, str]:
    """Backend name -> module name, for every ``*_backend`` module of the package (read from
    the package's ``__path__`` at each call, nothing imported)."""
    found = {}
    for module in pkgutil.iter_modules(_package.__path__):
        name = module.name.removesuffix(MODULE_SUFFIX)
        if module.name.endswith(MODULE_SUFFIX) and name:
            found[name] = f"{_package.__name__}.{module.name}"
    return found


def available_backends() -> list[str]:
    """Names of the rollout backends, sorted; no backend module is imported."""
    return sorted(_module_names().keys() | _REGISTRY.keys())


def backend_class(name: str) -> type:
    """The class registered as ``name``, importing its module if it is not loaded yet."""
    if name not in _REGISTRY:
        module = _module_names().get(name)
        if module is None:
            raise ValueError(f"unknown rollout backend {name!r}; available: "
                             f"{available_backends()}")
        importlib.import_module(module)
        if name not in _REGISTRY:
            raise ValueError(f"module {module} registers no rollout backend named {name!r} "
                             f"(decorate its class with @register_backend({name!r}))")
    return _REGISTRY[name]


def make_backend(name: str, model_dir: str, options: dict | None = None) -> RolloutBackend:
    """The rollout backend ``name`` for the model in ``model_dir``, built by its class's
    ``from_options(model_dir, options)``; ``options`` is backend-specific (see each backend's
    ``from_options``)."""
    return backend_class(name).from_options(model_dir, dict(options or {}))
