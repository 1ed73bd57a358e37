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

from typing import TYPE_CHECKING

from services.plugins import Plugins

if TYPE_CHECKING:
    from services.rollout.backend import RolloutBackend

BACKENDS = Plugins("rollout backend", "services.rollout", suffix="_backend",
                   decorator="register_backend")
available_backends = BACKENDS.available
backend_class = BACKENDS.get


def register_backend(name: str):
    """Class decorator: register a :class:`~services.rollout.backend.RolloutBackend` class
    under ``name`` (its module should be ``services/rollout/<name>_backend.py``)."""

    def decorator(cls: type) -> type:
        if not callable(getattr(cls, "from_options", None)):
            raise TypeError(f"rollout backend {name!r} ({cls.__qualname__}) needs a classmethod "
                            "from_options(model_dir, options)")
        return BACKENDS.register(name)(cls)

    return decorator


def make_backend(name: str, model_dir: str, options: dict | None = None) -> RolloutBackend:
    """The rollout backend ``name`` for the model in ``model_dir``, built by its class's
    ``from_options(model_dir, options)``; ``options`` is backend-specific (see each backend's
    ``from_options``)."""
    return backend_class(name).from_options(model_dir, dict(options or {}))
