"""The scaled-out deployment (docker-compose.yml, docker/nginx.conf, docker/entrypoint.sh, docker/init-secrets.sh):
what an operator relies on without running it. Compose's own parser (`docker-compose config`, `docker compose
config`) and nginx's (`nginx -t`, in the nginx image when present or a local nginx) check the files when they are
installed; the rest reads them as data. The compose run itself is recorded in docs/deploy.md ("Checked")."""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from app.settings import Settings
from conftest import REPO

COMPOSE = yaml.safe_load((REPO / "docker-compose.yml").read_text())   # PyYAML resolves the `<<:` merges
SERVICES = COMPOSE["services"]
NGINX_CONF = REPO / "docker" / "nginx.conf"
ENTRYPOINT = REPO / "docker" / "entrypoint.sh"
DEFAULT = re.compile(r"^\$\{(\w+):?-(.*)\}$")
SETTINGS = {name: field.default for name, field in Settings.model_fields.items()}   # what compose leaves unset


def default(value) -> str:
    """A compose value with its `${VAR:-default}` interpolated to the default."""
    m = DEFAULT.match(str(value))
    return m.group(2) if m else str(value)


def nginx_blocks(text: str) -> list:
    """nginx.conf as nested [directive, [args], children] lists (children None for a simple directive)."""
    tokens = re.findall(r'"[^"]*"|[{};]|[^\s{};]+', re.sub(r"#[^\n]*", "", text))
    stack, current, words = [], [], []
    for token in tokens:
        if token == "{":
            block = [words[0], words[1:], []]
            current.append(block)
            stack.append(current)
            current, words = block[2], []
        elif token == "}":
            current = stack.pop()
        elif token == ";":
            current.append([words[0], words[1:], None])
            words = []
        else:
            words.append(token.strip('"'))
    assert not stack, "unbalanced braces"
    return current


def find(blocks: list, name: str, *args: str) -> list:
    return [b for b in blocks if b[0] == name and (not args or tuple(b[1]) == args)]


def directive(blocks: list, name: str) -> list[str]:
    found = find(blocks, name)
    assert len(found) == 1, f"{name}: {found}"
    return found[0][1]


NGINX = nginx_blocks(NGINX_CONF.read_text())
HTTP = find(NGINX, "http")[0][2]
SERVER = find(HTTP, "server")[0][2]


def location(*args: str) -> list:
    found = find(SERVER, "location", *args)
    assert len(found) == 1, args
    return found[0][2]


# --------------------------------------------------------------------------- topology

def test_only_the_load_balancer_is_published_and_on_loopback_by_default():
    published = {name for name, s in SERVICES.items() if s.get("ports") and "profiles" not in s}
    assert published == {"lb"}
    (port,) = SERVICES["lb"]["ports"]
    address, host_port, container_port = re.fullmatch(r"(\$\{[^}]*\}):(\$\{[^}]*\}):(\d+)", port).groups()
    assert default(address) == "127.0.0.1" and default(host_port) == "8000"
    assert directive(SERVER, "listen") == [container_port]


def test_api_replicas_are_the_upstream_of_the_load_balancer():
    api = SERVICES["api"]
    assert int(default(api["deploy"]["replicas"])) >= 2
    assert "ports" not in api
    (server,) = find(find(HTTP, "upstream", "cmn_api")[0][2], "server")
    host, port = server[1][0].split(":")
    assert host == "api" and port == str(api["environment"]["CMN_PORT"])
    options = dict(o.split("=") for o in server[1][1:])
    assert int(options["max_fails"]) >= 1 and options["fail_timeout"].endswith("s")
    assert SERVICES["lb"]["depends_on"]["api"]["condition"] == "service_healthy"
    for name in ("/", "/admin/"):
        assert directive(location(name), "proxy_pass") == ["http://cmn_api"]
    assert directive(location("=", "/feedback"), "proxy_pass") == ["http://cmn_api"]


def test_a_503_is_passed_on_not_retried_nor_counted_against_the_replica():
    """A 503 on /feedback means the shared store cannot be written: every replica would answer it, and counting it
    as a failure would take replicas that still serve /recommend out of rotation. A timeout may still commit."""
    feedback = directive(location("=", "/feedback"), "proxy_next_upstream")
    assert "http_503" not in feedback and "timeout" not in feedback
    assert "error" in feedback and "non_idempotent" in feedback
    # issue 23: a POST /recommend was resent on 503, doubling the load of a full service; a sent POST and a 503
    # (overloaded) are passed on, with its Retry-After
    recommend = directive(location("/"), "proxy_next_upstream")
    assert "error" in recommend and not {"http_503", "non_idempotent"} & set(recommend)
    assert "non_idempotent" not in directive(location("/admin/"), "proxy_next_upstream")
    assert int(directive(SERVER, "proxy_next_upstream_tries")[0]) == 2


def test_pooled_upstream_connections_close_before_uvicorn_closes_them():
    """A POST sent on a keep-alive connection uvicorn is closing fails and is not retried: nginx must drop idle
    connections first."""
    upstream = find(HTTP, "upstream", "cmn_api")[0][2]
    assert float(directive(upstream, "keepalive_timeout")[0].rstrip("s")) < SETTINGS["keep_alive_s"]
    assert directive(SERVER, "proxy_http_version") == ["1.1"]
    assert ["Connection", ""] in [b[1] for b in find(SERVER, "proxy_set_header")]


def test_nginx_accepts_what_the_api_accepts():
    size = directive(HTTP, "client_max_body_size")[0]
    assert size.endswith("m") and int(size[:-1]) * 1024 * 1024 >= SETTINGS["max_body_bytes"]
    _, buffer = directive(HTTP, "large_client_header_buffers")
    assert int(buffer.rstrip("k")) * 1024 >= SETTINGS["max_header_bytes"]


def test_the_api_sees_each_client_address_and_no_client_can_choose_it():
    """The wrong-key throttle counts per client address. Behind nginx the api trusts X-Forwarded-For from its
    peers; that is safe only if nginx replaces the header and the api can be reached through nginx alone."""
    headers = {b[1][0]: b[1][1] for b in find(SERVER, "proxy_set_header")}
    assert headers["X-Forwarded-For"] == "$remote_addr"
    api = SERVICES["api"]
    assert api["environment"]["CMN_FORWARDED_ALLOW_IPS"] == "*"
    assert "ports" not in api
    assert all(COMPOSE["networks"][n].get("internal") for n in api["networks"])
    for name, service in SERVICES.items():
        if service.get("ports"):   # reachable from outside: must not trust a forwarded address
            env = service.get("environment", {})
            assert name == "lb" or not env.get("CMN_FORWARDED_ALLOW_IPS") and "FORWARDED_ALLOW_IPS" not in env
    # the server itself believes no forwarded header unless told (uvicorn's default believes loopback's)
    assert SETTINGS["forwarded_allow_ips"] == ""


def test_every_container_is_hardened():
    for name, s in SERVICES.items():
        assert s.get("read_only") is True, name
        assert s.get("cap_drop") == ["ALL"], name
        assert "no-new-privileges:true" in s.get("security_opt", []), name
        assert s.get("mem_limit") and s.get("pids_limit"), name
    # postgres's entrypoint hands its directories to its user: ownership and uid changes, nothing else
    assert set(SERVICES["postgres"]["cap_add"]) <= {"CHOWN", "DAC_OVERRIDE", "FOWNER", "SETGID", "SETUID"}
    assert all("cap_add" not in s for n, s in SERVICES.items() if n != "postgres")
    assert SERVICES["lb"]["user"] not in ("root", "0")
    assert directive(NGINX, "pid")[0].startswith("/tmp/")
    for temp in ("client_body_temp_path", "proxy_temp_path"):
        assert directive(HTTP, temp)[0].startswith("/tmp/")


# --------------------------------------------------------------------------- the store and its password

def test_postgres_is_checked_over_tcp_and_keeps_its_data_in_a_named_volume():
    pg = SERVICES["postgres"]
    test = pg["healthcheck"]["test"]
    assert test[:2] == ["CMD", "pg_isready"] and test[test.index("-h") + 1] == "127.0.0.1"
    name, path = pg["volumes"][0].split(":")[:2]
    assert name in COMPOSE["volumes"] and path == "/var/lib/postgresql/data"
    assert default(pg["image"]) == "postgres:16"
    # the database's encoding comes from initdb's locale: a SQL_ASCII database hands psycopg bytes, not text
    assert pg["environment"]["LANG"].upper().replace("-", "").endswith("UTF8")


def test_no_password_is_in_the_compose_file_and_everyone_reads_the_same_secret():
    pg = SERVICES["postgres"]
    assert not {"POSTGRES_PASSWORD", "PGPASSWORD"} & set(pg["environment"])
    secret = "/secrets/postgres-password"
    assert secret in " ".join(pg["entrypoint"]) and "cmn-secrets:/secrets:ro" in pg["volumes"]
    urls = set()
    for name in ("api", "api-gpu", "trainer"):
        env = SERVICES[name]["environment"]
        url = urlsplit(env["CMN_FEEDBACK_URL"])
        assert url.scheme == "postgresql" and url.password is None, name
        assert url.hostname == "postgres" and url.username == pg["environment"]["POSTGRES_USER"]
        assert url.path == "/" + pg["environment"]["POSTGRES_DB"]
        assert env["PGPASSWORD_FILE"] == secret and "cmn-secrets:/secrets:ro" in SERVICES[name]["volumes"]
        assert "store" in SERVICES[name]["networks"]
        urls.add(env["CMN_FEEDBACK_URL"])
    assert len(urls) == 1
    assert "store" in pg["networks"] and "front" not in pg["networks"]


def test_the_trainer_waits_for_postgres_and_folds_its_feedback():
    trainer = SERVICES["trainer"]
    assert trainer["depends_on"]["postgres"]["condition"] == "service_healthy"
    script = trainer["command"][-1]
    assert '--feedback "$$CMN_FEEDBACK_URL"' in script
    for name in ("api", "api-gpu"):
        assert SERVICES[name]["depends_on"] == {"trainer": {"condition": "service_completed_successfully"},
                                                "postgres": {"condition": "service_healthy"}}
        # the checkpoint (feedback and rollouts are in postgres) and the secrets, read-only
        assert SERVICES[name]["volumes"] == ["cmn-data:/data:ro", "cmn-secrets:/secrets:ro"]


def check_store(url: str) -> subprocess.CompletedProcess:
    """The trainer's check of its feedback store (docker-compose.yml, STORE_EXISTS)."""
    return subprocess.run([sys.executable, "-c", SERVICES["trainer"]["environment"]["STORE_EXISTS"]],
                          env={**os.environ, "CMN_FEEDBACK_URL": url}, cwd=REPO, capture_output=True, text=True,
                          timeout=60)


def test_the_trainers_store_check_tells_a_store_not_created_yet_from_one_it_cannot_read(tmp_path):
    """The trainer folds the store in when it exists, trains without it before any api created it (exit 3), and
    stops on a store it cannot read rather than silently training without its feedback."""
    from model.store.events import open_store

    url = f"sqlite:///{tmp_path / 'feedback.sqlite3'}"
    assert check_store(url).returncode == 3
    open_store(url).close()
    assert check_store(url).returncode == 0
    unreachable = check_store("postgresql://cmn@127.0.0.1:1/cmn")
    assert unreachable.returncode == 1 and "cannot read the feedback store" in unreachable.stderr
    assert "Traceback" not in unreachable.stderr


def test_the_first_training_on_a_fresh_database_goes_ahead_without_feedback(fresh_postgres_url):
    from model.store.events import open_store

    url = fresh_postgres_url()      # what compose's postgres holds before the first api started
    assert check_store(url).returncode == 3
    open_store(url).close()         # an api's first connection creates the tables
    proc = check_store(url)
    assert proc.returncode == 0, proc.stderr


def test_the_image_entrypoint_is_the_script_that_reads_the_password_file():
    dockerfile = (REPO / "Dockerfile").read_text()
    (copy,) = re.findall(r"^COPY docker/entrypoint.sh (\S+)$", dockerfile, re.M)
    assert f'ENTRYPOINT ["/bin/sh", "{copy}"]' in dockerfile


def run_entrypoint(tmp_path: Path, password_file: Path | None, *cmd: str,
                   env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("PG", "CMN_", "CREATE_"))}, **(env or {})}
    env["TMPDIR"] = str(tmp_path)
    if password_file is not None:
        env["PGPASSWORD_FILE"] = str(password_file)
    return subprocess.run(["sh", str(ENTRYPOINT), *cmd], env=env, capture_output=True, text=True, timeout=60)


def test_entrypoint_writes_a_private_pgpass_and_keeps_the_password_out_of_the_environment(tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("p:ss\\word\n")       # `:` and `\` are separators and escapes in pgpass
    secret.chmod(0o644)                      # as compose mounts it: libpq would ignore such a file
    proc = run_entrypoint(tmp_path, secret, "sh", "-c", 'echo "$PGPASSFILE"; env')
    assert proc.returncode == 0, proc.stderr
    pgpass = Path(proc.stdout.splitlines()[0])
    assert pgpass.parent == tmp_path
    assert stat.S_IMODE(pgpass.stat().st_mode) == 0o600
    assert pgpass.read_text() == "*:*:*:*:p\\:ss\\\\word\n"
    assert "p:ss" not in proc.stdout.split("\n", 1)[1] and "PGPASSWORD_FILE" not in proc.stdout


def test_entrypoint_explains_a_missing_password_file_and_runs_plainly_without_one(tmp_path):
    proc = run_entrypoint(tmp_path, tmp_path / "absent", "true")
    assert proc.returncode == 2 and "cannot be read" in proc.stderr and "logs init" in proc.stderr
    proc = run_entrypoint(tmp_path, None, "sh", "-c", 'echo "${PGPASSFILE-unset}"; exit 7')
    assert proc.returncode == 7 and proc.stdout.strip() == "unset"


def test_libpq_logs_in_with_the_password_the_entrypoint_hands_it(tmp_path, postgres_admin_url):
    """psycopg's libpq reads the pgpass file the entrypoint wrote: the URL without its password connects."""
    url = urlsplit(postgres_admin_url)
    if not url.password:
        pytest.skip("the test server's role has no password to hand over")
    bare = url._replace(netloc=url.netloc.replace(f":{url.password}@", "@")).geturl()
    connect = [sys.executable, "-c", f"import psycopg; psycopg.connect({bare!r}, connect_timeout=5).close()"]
    if run_entrypoint(tmp_path, None, *connect).returncode == 0:
        pytest.skip("the test server lets this role in without a password")
    secret = tmp_path / "secret"
    secret.write_text(url.password + "\n")
    proc = run_entrypoint(tmp_path, secret, *connect)
    assert proc.returncode == 0, proc.stderr


def printed_key(stdout: str) -> str:
    (line,) = [line for line in stdout.splitlines() if line.startswith("cmn-init: API key ")]
    return line.rsplit(" ", 1)[1]


def test_init_secrets_makes_private_secrets_once_and_prints_the_key(tmp_path):
    """What compose's `init` runs into the secrets volume (and what the api image's entrypoint runs for its key
    file): each file only if missing, private, the key printed once and stored as its hash."""
    (tmp_path / "docker").mkdir()
    script = shutil.copy(REPO / "docker" / "init-secrets.sh", tmp_path / "docker")
    first = subprocess.run(["sh", script], capture_output=True, text=True, timeout=60)
    assert first.returncode == 0, first.stderr
    secrets = tmp_path / "secrets"
    assert stat.S_IMODE(secrets.stat().st_mode) == 0o700
    assert {stat.S_IMODE(f.stat().st_mode) for f in secrets.iterdir()} == {0o600}
    assert sorted(f.name for f in secrets.iterdir()) == ["auth-keys", "postgres-password"]   # nothing left aside
    password = (secrets / "postgres-password").read_text().strip()
    assert len(password) >= 32 and re.fullmatch(r"[A-Za-z0-9_-]+", password)
    key = printed_key(first.stdout)
    digest, scopes, name = (secrets / "auth-keys").read_text().split()
    assert digest == hashlib.sha256(key.encode()).hexdigest()
    assert set(scopes.split(",")) == {"recommend", "history", "feedback", "admin", "metrics"}
    again = subprocess.run(["sh", script, str(secrets)], capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and key not in again.stdout and "API key" not in again.stdout
    assert (secrets / "postgres-password").read_text().strip() == password
    assert (secrets / "auth-keys").read_text().split()[0] == digest
    added = subprocess.run(["sh", script, "--add-key", str(secrets / "auth-keys"), "metrics", "prometheus"],
                           capture_output=True, text=True, timeout=60)
    lines = (secrets / "auth-keys").read_text().splitlines()
    assert len(lines) == 2 and lines[1].split() == [hashlib.sha256(printed_key(added.stdout).encode()).hexdigest(),
                                                    "metrics", "prometheus"]


def test_compose_makes_its_secrets_in_a_volume_before_anything_starts():
    """`docker compose up` on a fresh clone needs no step before it (issue 23): the one-shot `init` writes the
    secrets volume, the only service that may; postgres starts after it, and the rest after postgres."""
    init = SERVICES["init"]
    assert init["restart"] == "no" and init["network_mode"] == "none"
    assert init["volumes"] == ["cmn-secrets:/secrets"] and init["command"][-1] == "/secrets"
    assert "/usr/local/bin/cmn-init-secrets" in init["command"]
    assert SERVICES["postgres"]["depends_on"]["init"]["condition"] == "service_completed_successfully"
    for name, service in SERVICES.items():
        mounts = [v for v in service.get("volumes", []) if v.startswith("cmn-secrets:")]
        assert name == "init" or all(v.endswith(":ro") for v in mounts), name
    for name in ("api", "api-gpu"):
        env = SERVICES[name]["environment"]
        assert env["CMN_AUTH_FILE"] == "/secrets/auth-keys" and env["CREATE_AUTH_FILE"] == "0"
    assert "cmn-secrets" in COMPOSE["volumes"]
    assert set(COMPOSE.get("secrets", {})) == {"cmn_metrics_key"}     # profile monitoring's, a file of yours


def test_every_image_can_be_pinned_by_digest():
    """Tags by default (the stand-ins of ../shared/tools/docker-local.sh have no digest); each image a variable
    that .env can set to `name:tag@sha256:...` (docs/deploy.md, "Pinning images")."""
    for name, service in SERVICES.items():
        if "build" not in service:
            assert DEFAULT.match(service["image"]), (name, service["image"])
    assert re.search(r"^ARG BASE_IMAGE=", (REPO / "Dockerfile").read_text(), re.M)


def test_the_api_image_serves_with_auth_on_unless_told_otherwise():
    """`docker run -p 8000:8000 <image>` listens on 0.0.0.0: the image names a key file, and its entrypoint
    creates it on first start (the trainer image makes none)."""
    dockerfile = (REPO / "Dockerfile").read_text()
    api = dockerfile[dockerfile.index("FROM python AS api"):dockerfile.index("FROM api AS trainer")]
    trainer = dockerfile[dockerfile.index("FROM api AS trainer"):]
    assert "CMN_HOST=0.0.0.0" in api and "CMN_AUTH_FILE=/data/auth-keys" in api and "CREATE_AUTH_FILE=1" in api
    assert "CREATE_AUTH_FILE=0" in trainer


def test_entrypoint_creates_a_missing_key_file_once_and_never_replaces_one(tmp_path):
    env = {"CREATE_AUTH_FILE": "1", "CMN_AUTH_FILE": str(tmp_path / "data" / "auth-keys")}
    first = run_entrypoint(tmp_path, None, "sh", "-c", 'echo "create=${CREATE_AUTH_FILE-unset}"', env=env)
    assert first.returncode == 0, first.stderr
    key = printed_key(first.stdout)
    assert first.stdout.strip().endswith("create=unset")      # not passed on to the server
    content = (tmp_path / "data" / "auth-keys").read_text()
    assert content.split()[0] == hashlib.sha256(key.encode()).hexdigest()
    again = run_entrypoint(tmp_path, None, "true", env=env)
    assert "API key" not in again.stdout and (tmp_path / "data" / "auth-keys").read_text() == content
    off = run_entrypoint(tmp_path, None, "true", env={**env, "CREATE_AUTH_FILE": "0",
                                                      "CMN_AUTH_FILE": str(tmp_path / "other")})
    assert off.returncode == 0 and not (tmp_path / "other").exists()


# --------------------------------------------------------------------------- the tools' own parsers

def compose_commands() -> list[list[str]]:
    found = []
    if shutil.which("docker-compose"):
        found.append(["docker-compose"])
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        found.append(["docker", "compose"])
    return found


@pytest.mark.parametrize("profile", [[], ["--profile", "gpu"]], ids=["default", "gpu"])
def test_compose_accepts_the_file(tmp_path, profile):
    commands = compose_commands()
    if not commands:
        pytest.skip("neither docker-compose nor docker compose is installed")
    env = {**os.environ, "CMN_AUTH_KEYS": str(tmp_path / "keys"),
           "CMN_POSTGRES_PASSWORD_FILE": str(tmp_path / "password")}
    for command in commands:
        proc = subprocess.run([*command, "-f", str(REPO / "docker-compose.yml"), *profile, "config"], env=env,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        resolved = yaml.safe_load(proc.stdout)["services"]
        assert int(resolved["api"]["deploy"]["replicas"]) >= 2
        assert "api-gpu" in resolved or not profile   # v1 lists profiled services either way, v2 when enabled


def nginx_image_present() -> bool:
    return bool(shutil.which("docker")) and subprocess.run(
        ["docker", "image", "inspect", "nginx:1.27"], capture_output=True).returncode == 0


def test_nginx_accepts_the_config(tmp_path):
    if nginx_image_present():   # the image compose runs, as compose runs it (never pulled here)
        cmd = ["docker", "run", "--rm", "--user", SERVICES["lb"]["user"], "--read-only", "--cap-drop", "ALL",
               "--tmpfs", "/tmp", "--add-host", "api:127.0.0.1",
               "-v", f"{NGINX_CONF}:/etc/nginx/nginx.conf:ro", "nginx:1.27", "nginx", "-t"]
    elif shutil.which("nginx"):  # a local nginx: `api` resolved by hand, its own mime.types
        conf = tmp_path / "nginx.conf"
        conf.write_text(NGINX_CONF.read_text().replace("server api:", "server 127.0.0.1:"))
        cmd = ["nginx", "-t", "-c", str(conf), "-p", str(tmp_path)]
    else:
        pytest.skip("neither the nginx:1.27 image nor nginx is installed")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "test is successful" in proc.stderr, proc.stderr
