"""PostgreSQL for the tests and the benchmarks: the local server's admin URL, scratch databases on it, and a private
server a test may stop and start."""
from __future__ import annotations

import os
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

# The role the fallback creates on the local server: a throwaway login for tests (password = name), which may only
# create databases. `.ci/run` creates the same one and exports CMN_TEST_POSTGRES_URL.
TEST_ROLE = "cmn_test"
LOCAL_SOCKETS = Path("/var/run/postgresql")


def as_postgres(cmd: list[str]) -> list[str]:
    """`cmd` run as the postgres user when we are root (PostgreSQL's tools refuse to run as root)."""
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


def local_postgres_admin_url() -> tuple[str | None, str]:
    """(a postgresql:// URL of a role that may create databases, or None; why not). CMN_TEST_POSTGRES_URL when
    set; otherwise the local server as user postgres over its unix socket, or, as root (whom peer authentication
    refuses that user), the TEST_ROLE that `runuser -u postgres psql` creates, over TCP."""
    import psycopg

    def reachable(url: str) -> str | None:
        try:
            psycopg.connect(url, connect_timeout=3).close()
            return None
        except psycopg.Error as e:
            return str(e).strip().splitlines()[0]

    if url := os.environ.get("CMN_TEST_POSTGRES_URL"):
        why = reachable(url)
        return (None, f"CMN_TEST_POSTGRES_URL cannot be reached: {why}") if why else (url, "")
    sockets = sorted(LOCAL_SOCKETS.glob(".s.PGSQL.*"))
    if not sockets:
        return None, f"no PostgreSQL server: set CMN_TEST_POSTGRES_URL or start one (no socket in {LOCAL_SOCKETS})"
    port = sockets[0].name.rsplit(".", 1)[1]
    url = f"postgresql://postgres@/postgres?host={LOCAL_SOCKETS}&port={port}"
    if not (why := reachable(url)):
        return url, ""
    if os.geteuid() != 0:
        return None, f"the local PostgreSQL server refuses user postgres ({why}); set CMN_TEST_POSTGRES_URL"
    create = (f"DO $$ BEGIN CREATE ROLE {TEST_ROLE} LOGIN CREATEDB PASSWORD '{TEST_ROLE}'; "
              "EXCEPTION WHEN duplicate_object THEN NULL; END $$")
    proc = subprocess.run(as_postgres(["psql", "-p", port, "-qXc", create]), capture_output=True, text=True,
                          stdin=subprocess.DEVNULL)
    if proc.returncode:
        return None, f"cannot create the test role on the local PostgreSQL server: {proc.stderr.strip()}"
    url = f"postgresql://{TEST_ROLE}:{TEST_ROLE}@127.0.0.1:{port}/postgres"
    why = reachable(url)
    return (None, f"the local PostgreSQL server refuses {TEST_ROLE} over TCP: {why}") if why else (url, "")


class ScratchDatabases:
    """Fresh, empty PostgreSQL databases on the server of `admin_url` (whose role may create databases): each call
    returns the URL of a new one (with the admin URL's credentials, usable by other processes); `drop()` removes
    them all, cutting their connections."""

    def __init__(self, admin_url: str):
        self.admin_url, self.names = admin_url, []

    def __call__(self) -> str:
        import psycopg
        name = f"cmn_scratch_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        self.names.append(name)
        return urlunsplit(urlsplit(self.admin_url)._replace(path="/" + name))

    def drop(self) -> None:
        import psycopg
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            for name in self.names:
                conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        self.names.clear()


class PrivatePostgres:
    """A throwaway PostgreSQL server of the test session's own (a cluster under /tmp, TCP on 127.0.0.1, trust
    authentication), which tests may stop and start: the machine's server is not theirs to stop."""

    def __init__(self, bindir: Path):
        import shutil
        import socket
        import tempfile
        self.bindir, self.dir = bindir, Path(tempfile.mkdtemp(prefix="cmn-pg-"))
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres", "postgres")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self._pg("initdb", "-D", str(self.dir / "data"), "-A", "trust", "-U", "postgres", "--no-sync", "--no-locale",
                 "-E", "UTF8")
        self.admin_url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self.running = False

    def _pg(self, tool: str, *args: str) -> None:
        proc = subprocess.run(as_postgres([str(self.bindir / tool), *args]), capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, timeout=120)
        if proc.returncode:
            raise RuntimeError(f"{tool} failed: {proc.stderr.strip() or proc.stdout.strip()}")

    def start(self) -> None:
        if not self.running:
            self._pg("pg_ctl", "-D", str(self.dir / "data"), "-l", str(self.dir / "log"), "-w", "start", "-o",
                     f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off")
            self.running = True

    def stop(self) -> None:
        """Shuts the server down, cutting its connections (as an outage would)."""
        if self.running:
            self._pg("pg_ctl", "-D", str(self.dir / "data"), "-m", "fast", "-w", "stop")
            self.running = False

    def remove(self) -> None:
        import shutil
        try:
            self.stop()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


@dataclass
class StoppablePostgres:
    url: str                # a fresh database of its own on the private server
    server: PrivatePostgres

    def stop(self) -> None:
        self.server.stop()

    def start(self) -> None:
        self.server.start()
