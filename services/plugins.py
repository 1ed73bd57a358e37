"""Replaceable parts found by file name: one module per implementation, imported on demand.

Rollout backends, learner strategies and weight-sync transports are each a :class:`Plugins`
registry over a package. An implementation named ``NAME`` lives in that package's module
``NAME`` (plus the registry's suffix, e.g. ``NAME_backend``) and registers its class with the
registry's decorator. :meth:`Plugins.available` lists the modules without importing any of them
(the config validates names against it without loading torch or vLLM); :meth:`Plugins.get`
imports only the module asked for. Adding an implementation is adding one file.
"""

from __future__ import annotations

import importlib
import pkgutil


class Plugins:
    def __init__(self, kind: str, package: str, *, decorator: str, suffix: str = ""):
        self.kind, self.package, self.suffix = kind, package, suffix
        self.decorator = decorator  # the name users decorate their class with, for messages
        self._classes: dict[str, type] = {}

    def register(self, name: str):
        """Class decorator: register ``cls`` as ``name`` (its module re-imported is fine)."""

        def decorator(cls: type) -> type:
            existing = self._classes.get(name)
            if existing is not None and (existing.__module__, existing.__qualname__) != (
                    cls.__module__, cls.__qualname__):
                raise ValueError(f"{self.kind} {name!r} is already registered "
                                 f"({existing.__module__}.{existing.__qualname__})")
            cls.name = name
            self._classes[name] = cls
            return cls

        return decorator

    def _modules(self) -> dict[str, str]:
        """Implementation name -> module, read from the package's ``__path__`` at each call."""
        package = importlib.import_module(self.package)
        found = {}
        for module in pkgutil.iter_modules(package.__path__):
            name = module.name.removesuffix(self.suffix) if self.suffix else module.name
            if module.name.endswith(self.suffix) and name and not module.name.startswith("_"):
                found[name] = f"{self.package}.{module.name}"
        return found

    def available(self) -> list[str]:
        """Every implementation's name, sorted; nothing is imported."""
        return sorted(self._modules().keys() | self._classes.keys())

    def check(self, name: str) -> str:
        """``name`` if it is an implementation's (nothing imported), else a ValueError."""
        if name not in self.available():
            raise ValueError(f"unknown {self.kind} {name!r}; available: {self.available()}")
        return name

    def get(self, name: str) -> type:
        """The class registered as ``name``, importing its module if needed."""
        if name not in self._classes:
            module = self._modules().get(self.check(name))
            importlib.import_module(module)
            if name not in self._classes:
                raise ValueError(f"module {module} registers no {self.kind} named {name!r} "
                                 f"(decorate its class with @{self.decorator}({name!r}))")
        return self._classes[name]
