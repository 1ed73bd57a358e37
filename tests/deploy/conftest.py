"""Starts the `.[gpu]` resolve (tests/deploy/gpu_resolve.py) in the background as soon as
collection ends, when a selected test needs it, so that the tests before it overlap it."""

from tests.deploy import gpu_resolve


def pytest_collection_finish(session):
    if any("gpu_resolved" in getattr(item, "fixturenames", ()) for item in session.items):
        gpu_resolve.start()


def pytest_sessionfinish(session, exitstatus):
    gpu_resolve.cleanup()
