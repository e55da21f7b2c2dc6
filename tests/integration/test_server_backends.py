"""The gate and promotion against production-shaped back ends: PostgreSQL and S3, all real, all on 127.0.0.1.

* PostgreSQL: the server binaries the ``pgserver`` wheel ships, started here as a plain
  ``postgres`` process on a free port (as an unprivileged user when the tests run as
  root, which PostgreSQL refuses to be);
* S3: moto's server mode (``ThreadedMotoServer``), a real HTTP endpoint that boto3,
  MLflow and DVC talk to as they would to AWS;
* ``mlflow server`` with its tracking and registry store in PostgreSQL
  (``postgresql+psycopg://``) and its artifacts proxied to a moto bucket
  (``--artifacts-destination s3://...``, ``MLFLOW_S3_ENDPOINT_URL``), so clients need no
  S3 credentials; the promotion lock is taken in the same PostgreSQL (``tracking.lock_uri``).

One candidate (the tiny random pipeline, no training) goes through the real stage 5
while the test holds the promotion lock, so the test also sees that the promotion waits
for a PostgreSQL advisory lock. A DVC project pushes a dataset to an S3 remote on the same
moto server and pulls it back through the library's ``pull_data``. Every server is
stopped in its fixture's teardown, processes by their PID.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from fairdiffusion import tracking as runs
from fairdiffusion.config import PipelineConfig, load_config
from fairdiffusion.data import versioning
from fairdiffusion.errors import RegistryError
from fairdiffusion.registry import lineage, schema
from fairdiffusion.registry import promotion as registry
from fairdiffusion.registry.locking import lock_uri, promotion_lock
from fairdiffusion.registry.serving import PIPELINE_ARTIFACT

sys.path.insert(0, str(Path(__file__).parent))
from candidates import make_metrics, open_candidate  # noqa: E402
from user_project import commit, dvc, run  # noqa: E402

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
MODEL = "fd-server-backends"
ARTIFACT_BUCKET, ARTIFACT_PREFIX = "fd-mlflow", "artifacts"
DVC_BUCKET, DVC_PREFIX = "fd-dvc", "store"
#: Start-up and step times, printed at the end of the module (pytest -s) for the report.
FIGURES: dict[str, float] = {}


@pytest.fixture(scope="module", autouse=True)
def _print_figures() -> Iterator[None]:
    """Set up first, so that it prints after every server has stopped."""
    yield
    for what, seconds in FIGURES.items():
        print(f"{what}: {seconds:.1f} s")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_until(ready: Any, process: subprocess.Popen[bytes], log: Path, what: str, timeout_s: float = 240) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.1)


def _stop(process: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    """Stop a process started in a session of its own, and whatever it spawned, by its PID."""
    with suppress(ProcessLookupError):
        os.killpg(process.pid, sig)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)


@dataclass(frozen=True)
class Postgres:
    """A running PostgreSQL server: the ``mlflow`` database's SQLAlchemy URI, and a DSN for psycopg."""

    uri: str
    dsn: str


def _postgres_install() -> Path:
    """The PostgreSQL build inside the ``pgserver`` wheel (found, not imported: its import has side effects)."""
    spec = importlib.util.find_spec("pgserver")
    assert spec is not None and spec.submodule_search_locations, "pip install -e '.[dev,server]' (pgserver)"
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall"


def _as_postgres_user(root: Path) -> dict[str, Any]:
    """Popen arguments that drop root (initdb and postgres refuse it) to ``nobody``, made owner of ``root``."""
    if os.geteuid() != 0:
        return {}
    nobody = pwd.getpwnam("nobody")
    os.chown(root, nobody.pw_uid, nobody.pw_gid)
    return {"user": nobody.pw_uid, "group": nobody.pw_gid, "extra_groups": []}


def _copy_install(install: Path, to: Path) -> Path:
    """Copy the build and the libraries the wheel keeps beside it (their RPATH is relative); returns the copy."""
    site = install.parents[1]
    for part in (install.relative_to(site), Path("pgserver.libs")):
        if (site / part).is_dir():
            shutil.copytree(site / part, to / part, ignore=shutil.ignore_patterns("include"))
    return to / install.relative_to(site)


def _can_connect(dsn: str) -> bool:
    import psycopg

    try:
        psycopg.connect(dsn, connect_timeout=2).close()
    except psycopg.OperationalError:
        return False
    return True


@pytest.fixture(scope="module")
def postgres() -> Iterator[Postgres]:
    """A fresh PostgreSQL cluster on a free port of 127.0.0.1 (TCP only, trust authentication)."""
    import psycopg

    started = time.monotonic()
    # Not under pytest's basetemp: that folder is private to root, and the server may run as nobody.
    root = Path(tempfile.mkdtemp(prefix="fd-postgres-"))
    try:
        user, log, port = _as_postgres_user(root), root / "postgres.log", _free_port()
        install = _postgres_install()
        if user:  # nobody may not reach the virtualenv (a checkout under /root): a copy of the build, 0.2 s
            install = _copy_install(install, root / "site-packages")
        data = str(root / "data")
        initdb = [str(install / "bin" / "initdb"), "-D", data, "-U", "postgres", "-A", "trust", "-E", "UTF8"]
        done = subprocess.run([*initdb, "--no-locale", "--no-sync"], capture_output=True, text=True, **user)
        assert done.returncode == 0, f"initdb failed:\n{done.stdout}\n{done.stderr}"
        # Durability off: a test cluster, thrown away at the end.
        settings = ["listen_addresses=127.0.0.1", "unix_socket_directories=", "fsync=off", "full_page_writes=off"]
        command = [str(install / "bin" / "postgres"), "-D", data, "-p", str(port)]
        command += [arg for setting in settings for arg in ("-c", setting)]
        with log.open("w") as out:
            process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, **user)
        try:
            admin = f"host=127.0.0.1 port={port} user=postgres dbname=postgres"
            _wait_until(lambda: _can_connect(admin), process, log, "postgres", timeout_s=60)
            with psycopg.connect(admin, autocommit=True) as connection:
                connection.execute("CREATE DATABASE mlflow")
            FIGURES["postgres start (initdb + server)"] = time.monotonic() - started
            yield Postgres(
                uri=f"postgresql+psycopg://postgres@127.0.0.1:{port}/mlflow",
                dsn=f"host=127.0.0.1 port={port} user=postgres dbname=mlflow",
            )
        finally:
            stopping = time.monotonic()
            _stop(process, signal.SIGINT)  # PostgreSQL's "fast" shutdown: ends the open sessions too
            FIGURES["postgres stop"] = time.monotonic() - stopping
    finally:
        removing = time.monotonic()
        shutil.rmtree(root, ignore_errors=True)
        FIGURES["postgres folder removed"] = time.monotonic() - removing


@pytest.fixture(scope="module")
def aws_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Dummy credentials and empty AWS config files: nothing here can reach, or be mistaken for, a real account."""
    empty = tmp_path_factory.mktemp("aws") / "config"
    empty.write_text("")  # a file: DVC's S3 remote refuses os.devnull ("config file could not be found")
    with pytest.MonkeyPatch.context() as env:
        for name, value in {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_CONFIG_FILE": str(empty),
            "AWS_SHARED_CREDENTIALS_FILE": str(empty),
            "AWS_EC2_METADATA_DISABLED": "true",
        }.items():
            env.setenv(name, value)
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "MLFLOW_TRACKING_URI"):
            env.delenv(name, raising=False)
        yield


@pytest.fixture(scope="module")
def s3(aws_env: None) -> Iterator[str]:
    """moto's S3 server on a free port of 127.0.0.1, with the two buckets; yields its endpoint URL."""
    import boto3
    from moto.server import ThreadedMotoServer

    started = time.monotonic()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        client = boto3.client("s3", endpoint_url=endpoint)
        for bucket in (ARTIFACT_BUCKET, DVC_BUCKET):
            client.create_bucket(Bucket=bucket)
        FIGURES["moto S3 server start"] = time.monotonic() - started
        yield endpoint
    finally:
        stopping = time.monotonic()
        server.stop()
        FIGURES["moto S3 server stop"] = time.monotonic() - stopping


def _s3_objects(endpoint: str, bucket: str, prefix: str) -> dict[str, bytes]:
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint)
    keys = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
            for o in page.get("Contents", [])]  # fmt: skip
    return {key: client.get_object(Bucket=bucket, Key=key)["Body"].read() for key in keys}


@dataclass(frozen=True)
class MlflowServer:
    """A launched ``mlflow server`` process; :meth:`wait` until it answers."""

    url: str
    process: subprocess.Popen[bytes]
    log: Path
    launched: float

    def healthy(self) -> bool:
        try:
            urllib.request.urlopen(f"{self.url}/health", timeout=5)
        except OSError:
            return False
        return True

    def wait(self) -> str:
        waited = time.monotonic()
        _wait_until(self.healthy, self.process, self.log, "mlflow server")
        # Launched before the DVC test: if it was up before this first look, the figure is an upper bound.
        FIGURES.setdefault("mlflow server answering, since its launch", time.monotonic() - self.launched)
        FIGURES.setdefault("  of which the promotion test waited", time.monotonic() - waited)
        return self.url


@pytest.fixture(scope="module", autouse=True)
def mlflow_server(postgres: Postgres, s3: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """``mlflow server`` on PostgreSQL with artifacts proxied to the moto bucket, launched and not waited for.

    Autouse, so that it is launched before the module's first test (the DVC one): its
    start, mostly MLflow's schema migrations, runs while DVC pushes and pulls.
    """
    root = tmp_path_factory.mktemp("mlflow-postgres-s3")
    port = _free_port()
    command = [str(BIN / "mlflow"), "server", "--backend-store-uri", postgres.uri]
    command += ["--artifacts-destination", f"s3://{ARTIFACT_BUCKET}/{ARTIFACT_PREFIX}"]
    command += ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    # The server, not the clients, writes to S3. No job runner: one more MLflow process on 2 cores.
    env = os.environ | {"MLFLOW_S3_ENDPOINT_URL": s3, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    log = root / "server.log"
    launched = time.monotonic()
    with log.open("w") as out:
        # A session of its own, so that one killpg stops the server and every worker it spawned.
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        yield MlflowServer(f"http://127.0.0.1:{port}", process, log, launched)
    finally:
        stopping = time.monotonic()
        _stop(process)
        FIGURES["mlflow server stop"] = time.monotonic() - stopping


@pytest.fixture(scope="module")
def config(mlflow_server: MlflowServer, postgres: Postgres, tmp_path_factory: pytest.TempPathFactory) -> PipelineConfig:
    server = mlflow_server.wait()
    root = tmp_path_factory.mktemp("server-backends")
    policy = root / "policy.yaml"
    policy.write_text(
        yaml.safe_dump(
            {
                "name": "server-backends",
                "absolute": {"min_slice_size": 5, "max_es_fid": 100.0, "max_group_fid_gap": 5.0},
                "non_regression": {"fid_overall": 0.10, "es_fid": 0.10},
                "reference": {"beat_base_model": False},
            }
        )
    )
    # What a deployment writes: the server for tracking, its PostgreSQL store for the lock.
    tracking = {"tracking_uri": server, "lock_uri": postgres.uri, "model_name": MODEL, "experiment": "backends"}
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump({"gate": {"policy": str(policy)}, "tracking": tracking}))
    return load_config(path)


def _sql(postgres: Postgres, query: str, *params: object) -> list[tuple[Any, ...]]:
    """Read the MLflow store as PostgreSQL holds it, in a session of its own."""
    import psycopg

    with psycopg.connect(postgres.dsn) as connection:
        return list(connection.execute(query, params).fetchall())


def _advisory_locks(postgres: Postgres) -> int:
    return int(_sql(postgres, "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted")[0][0])


def _md5s(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.md5(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_dvc_pull_from_an_s3_remote_restores_the_data(s3, demo_dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    started = time.monotonic()
    repo = tmp_path / "repo"
    repo.mkdir()
    run(["git", "init", "-q"], repo)
    data = Path(shutil.copytree(demo_dataset, repo / "data"))
    expected = _md5s(data)
    # The commands the README gives; the credentials come from the environment (AWS_ACCESS_KEY_ID, ...).
    dvc(["init", "-q"], repo)
    dvc(["remote", "add", "-d", "storage", f"s3://{DVC_BUCKET}/{DVC_PREFIX}"], repo)
    dvc(["remote", "modify", "storage", "endpointurl", s3], repo)
    dvc(["add", "-q", "data"], repo)
    dvc(["push", "-q"], repo)
    commit(repo, "data v1")
    # The remote is content-addressed: every file, and the folder's listing (the .dvc file's "<md5>.dir").
    listing = versioning.resolve_data_version(repo / "data.dvc").dvc_md5
    pushed = _s3_objects(s3, DVC_BUCKET, f"{DVC_PREFIX}/files/md5/")
    assert set(pushed) == {f"{DVC_PREFIX}/files/md5/{m[:2]}/{m[2:]}" for m in [*expected.values(), listing]}

    shutil.rmtree(data)
    shutil.rmtree(repo / ".dvc" / "cache")
    versioning.pull_data(repo / "data.dvc")
    FIGURES["dvc push + pull through moto S3"] = time.monotonic() - started
    assert _md5s(data) == expected


def test_a_promotion_waits_for_the_postgres_lock_then_registers_with_artifacts_in_s3(
    config, postgres, s3, tiny_pipeline_dir
):
    from mlflow import MlflowClient

    tracking = config.tracking
    assert lock_uri(tracking) == postgres.uri  # the server's own store, not the http:// tracking URI
    client = MlflowClient(tracking.resolved_tracking_uri(), registry_uri=tracking.resolved_tracking_uri())
    run_id, training, report = open_candidate(config, tiny_pipeline_dir, make_metrics(10.0))

    started = time.monotonic()
    # The pool outside the lock: the lock is released before the pool waits for the promotion.
    with ThreadPoolExecutor(1) as pool:
        with promotion_lock(tracking, holder="the test"):
            assert _advisory_locks(postgres) == 1
            with (
                pytest.raises(RegistryError, match=f"another promotion of '{MODEL}' holds the lock"),
                promotion_lock(tracking, holder="a second promotion", timeout_s=0.3),
            ):
                pass
            promoting = pool.submit(lineage.gate_and_register, config, run_id, training, report)
            # The model is logged before the lock is taken (schema.MODEL_URI marks it); then it must wait.
            deadline = time.monotonic() + 180
            while schema.MODEL_URI not in client.get_run(run_id).data.tags:
                assert not promoting.done(), promoting.result()
                assert time.monotonic() < deadline, "the candidate's model was never logged"
                time.sleep(0.2)
            FIGURES["log the candidate's model (to S3 through the server)"] = time.monotonic() - started
            time.sleep(0.5)  # it would have registered by now had it not waited
            assert not promoting.done(), "the promotion went ahead while another held the lock"
            assert client.search_model_versions(f"name = '{MODEL}'") == []
            released_ms = int(time.time() * 1000)
        outcome = promoting.result(timeout=180)
    runs.end_run(tracking, run_id)
    FIGURES["gate, register and promote after the lock was released"] = time.monotonic() - started

    # Registered once, champion, the decision recorded: read back through the server...
    assert (outcome.version, outcome.status, outcome.promoted) == ("1", schema.STATUS_CHAMPION, True)
    versions = client.search_model_versions(f"name = '{MODEL}'")
    assert [v.version for v in versions] == ["1"] and versions[0].run_id == run_id
    assert versions[0].creation_timestamp >= released_ms, "registered only once the lock was free"
    assert client.get_model_version_by_alias(MODEL, schema.CHAMPION).version == "1"
    assert versions[0].tags[schema.LATEST_DECISION] == schema.DECISION_PASS
    [decision] = [r for r in registry.decision_history(tracking, "1") if r.decision in schema.GATE_DECISIONS]
    assert (decision.decision, decision.champion_after) == (schema.DECISION_PASS, "1")
    assert runs.artifact_json(client, decision.audit_run_id, schema.DECISION_ARTIFACT)["version"] == "1"
    # ...and as PostgreSQL stores it; the lock is released.
    aliases = _sql(postgres, "SELECT alias, version FROM registered_model_aliases WHERE name = %s", MODEL)
    assert {alias: str(version) for alias, version in aliases} == registry.model_aliases(tracking)
    assert (schema.CHAMPION, 1) in aliases
    assert _sql(postgres, "SELECT count(*) FROM model_versions WHERE name = %s", MODEL) == [(1,)]
    assert _advisory_locks(postgres) == 0

    # The weights, the MLmodel and the audit record are objects in the moto bucket.
    objects = _s3_objects(s3, ARTIFACT_BUCKET, f"{ARTIFACT_PREFIX}/")
    for local in (p for p in tiny_pipeline_dir.rglob("*") if p.is_file()):
        relative = f"/artifacts/{PIPELINE_ARTIFACT}/{local.relative_to(tiny_pipeline_dir).as_posix()}"
        stored = [body for key, body in objects.items() if key.endswith(relative)]
        assert stored == [local.read_bytes()], f"{relative}: {len(stored)} copies in s3://{ARTIFACT_BUCKET}"
    assert any(key.endswith("/MLmodel") for key in objects)
    assert any(key.endswith(f"/{decision.audit_run_id}/artifacts/{schema.DECISION_ARTIFACT}") for key in objects)
