"""Run the deployment on one host: service replicas and the nginx gateway on 127.0.0.1.

Used by tests/deploy (gateway integration) and by ``make load`` (deploy/load.py). The gateway
runs the very ``deploy/nginx.conf`` that docker-compose uses, rendered here instead of by
``deploy/gateway-entrypoint.sh``: placeholders are filled from Python and the ``${UPSTREAM}``
line is repeated once per local replica. nginx runs in the foreground as a child process,
with its pid, logs and temp files in a private directory.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

DEPLOY_DIR = Path(__file__).resolve().parent
NGINX_TEMPLATE = DEPLOY_DIR / "nginx.conf"
REPO_ROOT = DEPLOY_DIR.parent

_PLACEHOLDER = re.compile(r"\$\{([A-Z][A-Z0-9_]*)\}")


def template_variables(template: str) -> set[str]:
    """Names of the ``${UPPER_CASE}`` placeholders in an nginx config template.

    Args:
        template: the template text.
    Returns:
        the set of placeholder names (nginx's own lower-case ``$vars`` are not included).
    """
    return set(_PLACEHOLDER.findall(template))


def render_nginx_conf(template: str, values: Mapping[str, str], upstreams: Sequence[str]) -> str:
    """Fill the gateway template for a set of replica addresses.

    Args:
        template: text of ``deploy/nginx.conf``.
        values: a value for every placeholder except ``UPSTREAM``.
        upstreams: replica addresses (``host:port``); the line holding ``${UPSTREAM}`` is
            repeated once per address, keeping its failover parameters.
    Returns:
        the nginx configuration text, with no placeholder left.
    Raises:
        ValueError: a placeholder has no value, or no upstream is given.
    """
    if not upstreams:
        raise ValueError("at least one upstream address is needed")
    missing = template_variables(template) - set(values) - {"UPSTREAM"}
    if missing:
        raise ValueError(f"no value for template placeholders: {sorted(missing)}")
    lines = []
    for line in template.splitlines():
        if "${UPSTREAM}" in line:
            lines.extend(line.replace("${UPSTREAM}", addr) for addr in upstreams)
        else:
            lines.append(line)
    text = "\n".join(lines) + "\n"
    return _PLACEHOLDER.sub(lambda m: str(values[m.group(1)]), text)


def find_nginx() -> str | None:
    """Path of the nginx binary (``/usr/sbin`` is often off a non-root PATH), or None."""
    found = shutil.which("nginx")
    if found:
        return found
    return "/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_http(
    url: str, timeout_s: float, proc: subprocess.Popen | None = None, *, streak: int = 1
) -> None:
    """Poll ``url`` until it answers 200 ``streak`` times in a row.

    Each GET opens a fresh connection, so with several worker processes sharing the port
    (any of them may accept it) a streak of ~20 means every worker is ready.

    Args:
        url: the URL to GET.
        timeout_s: give up after this many seconds.
        proc: the process expected to serve it; fail fast if it exits.
        streak: consecutive 200 answers required.
    Raises:
        RuntimeError: the process exited or the deadline passed.
    """
    deadline = time.monotonic() + timeout_s
    last: object = None
    run = 0
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process serving {url} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                last = resp.status
        except (urllib.error.URLError, OSError) as exc:
            last = exc
        run = run + 1 if last == 200 else 0
        if run >= streak:
            return
        time.sleep(0.02 if run else 0.2)
    raise RuntimeError(f"{url} not ready after {timeout_s:.0f} s (last: {last})")


@dataclass
class Replica:
    """One ``influence serve`` process on 127.0.0.1.

    Args:
        index_dir: the index directory to serve.
        port: the port to listen on.
        log_path: where its stdout and stderr go.
        threads: torch threads for the replica; replicas share the host's cores.
    """

    index_dir: Path
    port: int
    log_path: Path
    threads: int = 1
    proc: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        """Spawn the process (returns at once; see :meth:`wait_ready`)."""
        env = dict(os.environ)
        env.update(  # the server sets its own torch threads (cores by default): say how many
            INFLUENCE_TORCH_THREADS=str(self.threads),
            OMP_NUM_THREADS=str(self.threads),
            MKL_NUM_THREADS=str(self.threads),
            TOKENIZERS_PARALLELISM="false",
        )
        cmd = [
            sys.executable,
            "-m",
            "service.cli",
            "serve",
            "--index",
            str(self.index_dir),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
        ]
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            cmd,
            cwd=REPO_ROOT,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.info("replica %s: pid %d", self.address, self.proc.pid)

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        """Block until ``/readyz`` answers 200."""
        try:
            wait_http(f"http://{self.address}/readyz", timeout_s, self.proc)
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}\n--- replica log ---\n{self.log_text()[-4000:]}") from exc

    def kill(self) -> None:
        """SIGKILL: the replica dies mid-request, as on a crash or OOM kill."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        """SIGTERM (graceful), SIGKILL after 10 s."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()
        if getattr(self, "_log", None):
            self._log.close()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@dataclass
class Gateway:
    """nginx running ``deploy/nginx.conf`` in the foreground on 127.0.0.1.

    Args:
        workdir: private directory for the rendered config, pid, logs and temp files.
        upstreams: replica addresses (``host:port``).
        port: the port to listen on (a free one when 0).
        rate_limit: nginx ``limit_req`` rate per client, e.g. ``"20r/s"``.
        rate_burst: requests allowed above the rate before 429.
        max_body_size: nginx ``client_max_body_size``.
    """

    workdir: Path
    upstreams: Sequence[str]
    port: int = 0
    rate_limit: str = "20r/s"
    rate_burst: int = 40
    max_body_size: str = "1m"
    proc: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def access_log(self) -> Path:
        return self.workdir / "logs" / "access.log"

    @property
    def error_log(self) -> Path:
        return self.workdir / "logs" / "error.log"

    def render(self) -> Path:
        """Write the rendered config into ``workdir`` and return its path."""
        if not self.port:
            self.port = free_port()
        (self.workdir / "logs").mkdir(parents=True, exist_ok=True)
        (self.workdir / "run").mkdir(parents=True, exist_ok=True)
        values = {
            "NGINX_LISTEN": f"127.0.0.1:{self.port}",
            "NGINX_RUN_DIR": str(self.workdir / "run"),
            "NGINX_LOG_DIR": str(self.workdir / "logs"),
            "RATE_LIMIT": self.rate_limit,
            "RATE_BURST": str(self.rate_burst),
            "MAX_BODY_SIZE": self.max_body_size,
        }
        conf = render_nginx_conf(NGINX_TEMPLATE.read_text(), values, self.upstreams)
        path = self.workdir / "nginx.conf"
        path.write_text(conf)
        return path

    def _command(self, conf: Path, *extra: str) -> list[str]:
        nginx = find_nginx()
        if nginx is None:
            raise RuntimeError("nginx is not installed (make system-deps installs it)")
        # As root, workers would drop to `nobody`, who cannot enter a 0700 temp dir;
        # compose runs the unprivileged image instead, where `user` does not apply.
        globals_ = "daemon off;" + (" user root;" if os.geteuid() == 0 else "")
        return [nginx, "-p", str(self.workdir), "-c", str(conf), "-g", globals_, *extra]

    def check(self) -> str:
        """``nginx -t`` on the rendered config; returns its output, raises on failure."""
        conf = self.render()
        done = subprocess.run(self._command(conf, "-t"), capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"nginx -t failed:\n{done.stderr}")
        return done.stderr

    def start(self, timeout_s: float = 10.0) -> None:
        """Render, start nginx, and wait until it answers its own health location."""
        conf = self.render()
        self.proc = subprocess.Popen(
            self._command(conf),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        try:
            wait_http(f"{self.url}/gateway/healthz", timeout_s, self.proc)
        except RuntimeError as exc:
            err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
            self.stop()
            raise RuntimeError(f"{exc}\n{err}") from exc
        log.info("gateway %s -> %s", self.url, ", ".join(self.upstreams))

    def stop(self) -> None:
        """SIGQUIT (graceful nginx shutdown), SIGKILL after 10 s."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if self.proc is not None and self.proc.stderr:
            self.proc.stderr.close()


def start_replicas(
    index_dir: Path, count: int, log_dir: Path, timeout_s: float = 120.0, threads: int = 1
) -> list[Replica]:
    """Start ``count`` replicas of one index in parallel and wait until all are ready.

    Args:
        index_dir: the index directory to serve.
        count: number of replicas.
        log_dir: one log file per replica is written here.
        timeout_s: readiness deadline per replica.
        threads: torch threads per replica.
    Returns:
        the ready replicas (stopped again if any fails to start).
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    replicas = []
    for _ in range(count):
        port = free_port()
        replicas.append(Replica(index_dir, port, log_dir / f"replica-{port}.log", threads))
    try:
        for replica in replicas:
            replica.start()
        for replica in replicas:
            replica.wait_ready(timeout_s)
    except BaseException:
        for replica in replicas:
            replica.stop()
        raise
    return replicas
