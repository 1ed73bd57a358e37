"""Rollout backends are found by module name and imported only when one is built."""

import subprocess
import sys
import textwrap

import pytest

import services.rollout
from services.rollout import registry
from services.rollout.registry import available_backends, backend_class, make_backend


@pytest.fixture
def scratch_registry(monkeypatch, tmp_path):
    """The registry and the package path as a test may change them, restored afterwards;
    ``tmp_path`` joins the package's path, so a module written there is a backend module."""
    monkeypatch.setattr(registry.BACKENDS, "_classes", dict(registry.BACKENDS._classes))
    monkeypatch.setattr(services.rollout, "__path__", [*services.rollout.__path__, str(tmp_path)])
    yield tmp_path
    for name in [m for m in sys.modules if m.startswith("services.rollout.scratch")]:
        del sys.modules[name]


def test_hf_and_vllm_are_listed_without_importing_them():
    code = textwrap.dedent("""
        import sys
        import services.config
        from services.rollout.registry import available_backends
        names = available_backends()
        assert {"hf", "vllm"} <= set(names), names
        loaded = [m for m in ("vllm", "services.rollout.vllm_backend",
                              "services.rollout.hf_backend") if m in sys.modules]
        assert not loaded, loaded
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr


def test_an_unknown_backend_names_the_available_ones():
    with pytest.raises(ValueError, match=r"unknown rollout backend 'tgi'; available: "
                                         r"\['hf', 'vllm'.*\]"):
        make_backend("tgi", "model-dir", {})


def test_the_hf_backend_is_built_from_options(tiny_assets):
    from services.rollout.hf_backend import HFBackend

    assert backend_class("hf") is HFBackend
    backend = make_backend("hf", str(tiny_assets.model_dir), {"device": "cpu"})
    assert isinstance(backend, HFBackend) and backend.device.type == "cpu"


def test_a_new_backend_module_is_discovered_and_built(scratch_registry):
    (scratch_registry / "scratch_backend.py").write_text(textwrap.dedent("""
        from services.rollout.registry import register_backend

        @register_backend("scratch")
        class ScratchBackend:
            def __init__(self, model_dir, options):
                self.model_dir, self.options = model_dir, options

            @classmethod
            def from_options(cls, model_dir, options):
                return cls(model_dir, options)
    """))
    assert "scratch" in available_backends()
    assert "services.rollout.scratch_backend" not in sys.modules  # listed, not imported
    backend = make_backend("scratch", "some/model", {"device": "cpu"})
    assert type(backend).__name__ == "ScratchBackend"
    assert (backend.model_dir, backend.options) == ("some/model", {"device": "cpu"})


def test_a_backend_module_must_register_its_name(scratch_registry):
    (scratch_registry / "scratchy_backend.py").write_text("")
    with pytest.raises(ValueError, match=r"registers no rollout backend named 'scratchy' "
                                         r"\(decorate its class"):
        make_backend("scratchy", "some/model", {})


def test_registration_rules(scratch_registry):
    with pytest.raises(TypeError, match="needs a classmethod from_options"):
        registry.register_backend("scratch")(type("NoFactory", (), {}))
    first = type("First", (), {"from_options": classmethod(lambda cls, m, o: cls())})
    second = type("Second", (), {"from_options": classmethod(lambda cls, m, o: cls())})
    registry.register_backend("scratch")(first)
    with pytest.raises(ValueError, match="rollout backend 'scratch' is already registered"):
        registry.register_backend("scratch")(second)
    assert registry.register_backend("scratch")(first) is first  # the same class again
