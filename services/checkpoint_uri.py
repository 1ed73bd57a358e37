"""``run.checkpoint_uri``: which URIs are accepted, and where an unset one comes from.

Pure string checks (no pyarrow, no network) so a config error arrives at load time; the
store itself is :mod:`services.checkpoint_store`.
"""

from __future__ import annotations

import os

ENV_VAR = "HARPO_CHECKPOINT_URI"  # set by the Helm chart from its `checkpointUri` value
# pyarrow.fs.FileSystem.from_uri's schemes
SCHEMES = ("file", "s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss")


def check_checkpoint_uri(value: str | None) -> str | None:
    """An absolute local path or ``SCHEME://...`` with a pyarrow.fs scheme."""
    if value is None:
        return None
    value = value.strip()
    if "://" in value:
        scheme, rest = value.split("://", 1)
        if scheme.lower() not in SCHEMES:
            raise ValueError(f"scheme {scheme!r} is not one pyarrow.fs reads; use one of "
                             f"{', '.join(s + '://' for s in SCHEMES)} or an absolute path")
        if not rest.strip("/"):
            raise ValueError(f"{value!r} names no bucket or directory")
        return value.rstrip("/")
    if not os.path.isabs(value):
        raise ValueError(f"{value!r} is neither a URI (s3://bucket/prefix, gs://..., "
                         f"file:///dir) nor an absolute path")
    return value.rstrip("/") or "/"


def with_env_uri(config, environ=os.environ):
    """``config`` with ``run.checkpoint_uri`` from ``$HARPO_CHECKPOINT_URI`` when the config
    leaves it unset: the config file wins, the deployment's variable is the default."""
    uri = environ.get(ENV_VAR, "").strip()
    if config.run.checkpoint_uri is not None or not uri:
        return config
    from services.config import ConfigError

    try:
        uri = check_checkpoint_uri(uri)
    except ValueError as exc:
        raise ConfigError(f"${ENV_VAR}: {exc}") from None
    run = config.run.model_copy(update={"checkpoint_uri": uri})
    return config.model_copy(update={"run": run})


def stored_config(overrides: dict, environ=os.environ) -> tuple[str, str] | None:
    """``--resume RUN_DIR`` of a run directory that is gone: the ``config.yaml`` kept in
    ``run.checkpoint_uri`` (from ``--set run.checkpoint_uri=...`` or
    ``$HARPO_CHECKPOINT_URI``) and where it came from, or None."""
    uri = overrides.get("run.checkpoint_uri") or environ.get(ENV_VAR, "").strip()
    if not uri:
        return None
    from services.checkpoint_store import CONFIG_NAME, CheckpointStore

    text = CheckpointStore(check_checkpoint_uri(uri)).config_text()
    return None if text is None else (text, f"{uri}/{CONFIG_NAME}")
