"""The promotion lock: one promotion of a model at a time, held by the store's own mechanism.

Reading the champion, deciding, registering and moving aliases must not interleave with
another promotion of the same model. MLflow has no compare-and-set on aliases, so the
lock is taken where the tracking store lives, with a primitive the operating system or
the database releases by itself when its holder dies (no stale locks, no lock records):

* a SQLite file or a local file store: ``flock`` on ``<store>.<model>.promotion-lock``
  next to it (one machine by construction);
* PostgreSQL: a session-level advisory lock (``pg_try_advisory_lock``);
* MySQL: a named lock (``GET_LOCK``).

With an MLflow *server* (``http(s)://``) the client cannot see the store, so
``tracking.lock_uri`` must name the server's backend store (the URI given to
``mlflow server --backend-store-uri``); without it the promotion refuses to run (the
gate fails closed). The Prefect flow additionally holds the global concurrency limit
``fairdiffusion-promotion`` around the whole stage (see ``tasks/register.py``).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import unquote, urlparse

from fairdiffusion.config import TrackingConfig
from fairdiffusion.errors import RegistryError

POLL_S = 0.1


def lock_uri(tracking: TrackingConfig) -> str:
    """The store the lock is taken in: ``tracking.lock_uri``, else the tracking URI itself."""
    uri = tracking.lock_uri or tracking.resolved_tracking_uri()
    if urlparse(uri).scheme in ("http", "https"):
        raise RegistryError(
            f"tracking.lock_uri is not set: with an MLflow server ({uri}) set it to the server's "
            "backend store URI (postgresql://..., mysql://... or sqlite:///...) so promotions are serialised"
        )
    return uri


@contextmanager
def promotion_lock(tracking: TrackingConfig, holder: str, timeout_s: float = 300) -> Iterator[None]:
    """Hold the promotion lock of ``tracking.model_name`` for the ``with`` block.

    Raises:
        RegistryError: if no lock can be taken for this store, or it stays held for
            ``timeout_s`` (the message names the store).
    """
    uri = lock_uri(tracking)
    scheme = urlparse(uri).scheme.split("+")[0]
    if scheme in ("", "file", "sqlite"):
        lock = _file_lock(_lock_path(uri, tracking.model_name), timeout_s)
    elif scheme in ("postgresql", "postgres"):
        lock = _sql_lock(uri, tracking.model_name, timeout_s, _PG)
    elif scheme == "mysql":
        lock = _sql_lock(uri, tracking.model_name, timeout_s, _MYSQL)
    else:
        raise RegistryError(f"tracking.lock_uri: no promotion lock for '{scheme}://' (use sqlite, postgresql or mysql)")
    with lock:
        yield


def _lock_path(uri: str, model: str) -> Path:
    parsed = urlparse(uri)
    if parsed.scheme == "sqlite":
        store = Path(unquote(uri[len("sqlite:///") :]))
        return store.with_name(f"{store.name}.{model}.promotion-lock")
    store = Path(unquote(parsed.path) if parsed.scheme == "file" else uri).resolve()
    return store / f".{model}.promotion-lock"


@contextmanager
def _file_lock(path: Path, timeout_s: float) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise RegistryError(f"another promotion holds {path}; try again later") from None
                time.sleep(POLL_S)
        try:
            yield
        finally:
            fcntl.flock(descriptor, fcntl.LOCK_UN)
    finally:
        os.close(descriptor)


#: (try to acquire, release) statements, each returning 1/true on success.
_PG = ("SELECT pg_try_advisory_lock(:key)", "SELECT pg_advisory_unlock(:key)")
_MYSQL = ("SELECT GET_LOCK(:name, 0)", "SELECT RELEASE_LOCK(:name)")


def _lock_key(model: str) -> tuple[int, str]:
    digest = hashlib.sha256(f"fairdiffusion-promotion:{model}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True), f"fd-promotion-{digest.hex()[:40]}"


@contextmanager
def _sql_lock(uri: str, model: str, timeout_s: float, statements: tuple[str, str]) -> Iterator[None]:
    """A session-level database lock, released by the server if this process dies."""
    import sqlalchemy

    key, name = _lock_key(model)
    params = {"key": key, "name": name}
    acquire, release = (sqlalchemy.text(s) for s in statements)
    engine = sqlalchemy.create_engine(uri, poolclass=sqlalchemy.pool.NullPool)
    try:
        with engine.connect() as connection:
            deadline = time.monotonic() + timeout_s
            while not connection.execute(acquire, params).scalar():
                connection.rollback()
                if time.monotonic() > deadline:
                    raise RegistryError(f"another promotion of '{model}' holds the lock in {engine.url!r}; try later")
                time.sleep(POLL_S)
            connection.commit()
            try:
                yield
            finally:
                connection.execute(release, params)
                connection.commit()
    except sqlalchemy.exc.SQLAlchemyError as error:
        raise RegistryError(f"tracking.lock_uri: cannot take the promotion lock in {engine.url!r}: {error}") from None
    finally:
        engine.dispose()
