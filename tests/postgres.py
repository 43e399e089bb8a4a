"""A PostgreSQL server of the tests' own, as a cluster's shared database: initdb and pg_ctl in a
temporary folder, 127.0.0.1 only, a password-protected user."""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import subprocess
import uuid
from contextlib import contextmanager
from pathlib import Path


def _postgres_bin(name: str) -> str:
    """A PostgreSQL server program: on the PATH, else where Debian's packages put it."""
    found = shutil.which(name) or next(
        iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None
    )
    if found is None:
        raise RuntimeError(
            f"{name} not found: install PostgreSQL (Debian: apt-get install -y postgresql; "
            ".ci/run does this) or deselect these tests with -m 'not cluster'"
        )
    return found


class Postgres:
    """A PostgreSQL server of the tests' own (initdb in a temporary folder, 127.0.0.1 only).

    Its one user needs a password (scram-sha-256), as on a real cluster. initdb refuses to run
    as root, so under root the server runs as an unprivileged user that owns the folder.
    """

    user = "emotr"

    def __init__(self, folder: Path, port: int):
        self.folder = folder
        self.data = folder / "data"
        self.port = port
        self.host = "127.0.0.1"
        self.password = secrets.token_urlsafe(16)
        self._as_user = self._unprivileged_ids()

    @staticmethod
    def _unprivileged_ids() -> dict:
        if os.geteuid() != 0:
            return {}
        for name in ("postgres", "nobody"):  # `postgres` exists once Debian's package is in
            try:
                entry = pwd.getpwnam(name)
            except KeyError:
                continue
            return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}
        raise RuntimeError("no unprivileged user (postgres, nobody) to run PostgreSQL as")

    def _run(self, *args: str) -> subprocess.CompletedProcess:
        env = {"PATH": os.environ.get("PATH", ""), "LC_ALL": "C.UTF-8", "TZ": "UTC"}
        return subprocess.run(
            args,
            cwd=self.folder,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            **self._as_user,
        )

    def init(self) -> None:
        """initdb with a password-protected superuser."""
        if self._as_user:
            os.chown(self.folder, self._as_user["user"], self._as_user["group"])
        password_file = self.folder / "password"
        password_file.write_text(self.password + "\n")
        if self._as_user:
            os.chown(password_file, self._as_user["user"], self._as_user["group"])
        result = self._run(
            _postgres_bin("initdb"),
            "-D",
            str(self.data),
            "-U",
            self.user,
            f"--pwfile={password_file}",
            "--auth=scram-sha-256",
            "-E",
            "UTF8",
            "--no-sync",
        )
        password_file.unlink()
        if result.returncode:
            raise RuntimeError(f"initdb failed: {result.stderr[-2000:]}")

    def start(self) -> None:
        """Start the server on 127.0.0.1:port; its socket stays in the folder, not /var/run."""
        options = (
            f"-p {self.port} -c listen_addresses={self.host} "
            f"-c unix_socket_directories={self.folder} -c fsync=off"
        )
        log = str(self.folder / "server.log")
        result = self._run(
            _postgres_bin("pg_ctl"), "-D", str(self.data), "-l", log, "-o", options, "-w", "start"
        )
        if result.returncode:
            raise RuntimeError(f"PostgreSQL did not start: {result.stderr}; see {log}")

    def stop(self) -> None:
        """Stop exactly this server (pg_ctl acts on the postmaster.pid of its data folder)."""
        if (self.data / "postmaster.pid").exists():
            self._run(_postgres_bin("pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")

    @contextmanager
    def stopped(self):
        """The server stopped for the block (a database host that is down), then started again."""
        self.stop()
        try:
            yield
        finally:
            self.start()

    @property
    def env(self) -> dict[str, str]:
        """What libpq (psycopg, SQLAlchemy, Optuna, MLflow) reads the password from."""
        return {"PGPASSWORD": self.password}

    def url(self, database: str, password: bool = False) -> str:
        """postgresql://emotr@127.0.0.1:PORT/database; the password only when asked for."""
        secret = f":{self.password}" if password else ""
        return f"postgresql://{self.user}{secret}@{self.host}:{self.port}/{database}"

    def new_database(self) -> str:
        """Create an empty database with a unique name; returns the name."""
        import psycopg

        name = f"emotr_{uuid.uuid4().hex[:12]}"
        # autocommit: CREATE DATABASE cannot run in a transaction
        with psycopg.connect(self.dsn("postgres"), autocommit=True) as connection:
            connection.execute(f"CREATE DATABASE {name}")
        return name

    def dsn(self, database: str) -> str:
        """A libpq connection string with the password, for the tests' own connections."""
        return (
            f"host={self.host} port={self.port} user={self.user} password={self.password} "
            f"dbname={database} connect_timeout=5"
        )
