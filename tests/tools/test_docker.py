"""docker/: what can be checked without a Docker engine (there is none here).

Every YAML parses; each config the stack mounts validates as the process that
reads it would (spoa.config.load, the real HAProxy with -c on each line the
files are meant for); every `python -m` command exists and its arguments
parse; every mounted path and Dockerfile COPY source exists; and the stack's
agent and LB node settings are the ones `python -m spoa demo` runs. The same for
the tier (compose.yaml + compose.tier.yaml, as compose merges them) against
`python -m spoa demo --lbnodes 3`: its Valkey Cluster and its three LB nodes.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from spoa import config as cfg
from spoa.tools import provision
from spoa.tools.demo import stack, tier

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
COMPOSE = DOCKER / "compose.yaml"
COMPOSE_TIER = DOCKER / "compose.tier.yaml"
ENV = {"PYTHONPATH": str(REPO)}


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def services() -> dict:
    return compose()["services"]


def _depends(service: dict) -> dict:
    depends = service.get("depends_on", {})
    return dict.fromkeys(depends, {}) if isinstance(depends, list) else dict(depends)


def tier_services() -> dict:
    """compose.yaml with compose.tier.yaml over it, by compose's merge rules for the keys the
    override uses: volumes merged by container path, depends_on merged, any other key replaced."""
    merged = {name: dict(service) for name, service in services().items()}
    for name, override in yaml.safe_load(COMPOSE_TIER.read_text())["services"].items():
        into = merged.setdefault(name, {})
        for key, value in override.items():
            if key == "volumes":
                by_target = {v.split(":")[1]: v for v in into.get("volumes", []) + value}
                into[key] = list(by_target.values())
            elif key == "depends_on":
                into[key] = {**_depends(into), **_depends(override)}
            else:
                into[key] = value
    return merged


def mounts(service: dict) -> dict[str, Path]:
    """Container path -> host path (relative host paths are relative to docker/)."""
    out = {}
    for volume in service.get("volumes", []):
        host, container, *_ = volume.split(":")
        assert host.startswith("."), f"{volume}: the stack mounts files of the repository only"
        out[container] = (DOCKER / host).resolve()
    return out


def host_path(service: dict, container_path: str) -> Path:
    """Where a path the container reads comes from, through the service's mounts."""
    for container, host in sorted(mounts(service).items(), key=lambda kv: -len(kv[0])):
        if container_path == container or container_path.startswith(container + "/"):
            return host / container_path[len(container):].lstrip("/")
    raise AssertionError(f"{container_path} is not mounted into the container")


def python_commands() -> list[tuple[str, list[str]]]:
    out = []
    for name, service in {**services(), **{f"tier:{k}": v for k, v in tier_services().items()}}.items():
        command = service.get("command")
        if isinstance(command, str):
            command = shlex.split(command)
        if command and command[:2] == ["python", "-m"]:
            out.append((name, command[2:]))
    return out


# -- files parse -------------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(DOCKER.glob("**/*.y*ml")), ids=lambda p: str(p.relative_to(DOCKER)))
def test_every_yaml_parses(path):
    assert isinstance(yaml.safe_load(path.read_text()), dict)


def test_compose_has_the_services_and_their_wiring():
    s = services()
    assert {"haproxy", "agent", "lbnode", "backend", "loadgen", "prometheus"} <= set(s)
    assert s["haproxy"]["image"] == "haproxy:3.2"  # the official image, line 3.2
    # the agent must share HAProxy's network namespace for the kernel sampler
    assert s["agent"]["network_mode"] == "service:haproxy"
    assert s["loadgen"]["network_mode"] == "service:haproxy"  # loopback-only generator
    assert s["prometheus"]["profiles"] == ["prometheus"]  # optional
    for name in ("agent", "lbnode", "backend", "loadgen"):
        assert s[name]["build"] == {"context": "..", "dockerfile": "docker/Dockerfile"}
    for name, service in s.items():
        for dep in service.get("depends_on", []):
            assert dep in s, f"{name} depends on unknown service {dep}"


# -- mounts, COPY sources, commands ---------------------------------------------------------------


@pytest.mark.parametrize("of", [services, tier_services], ids=["single", "tier"])
def test_every_mounted_path_exists_in_the_repository(of):
    for name, service in of().items():
        for container, host in mounts(service).items():
            assert host.exists(), f"{name}: {host} (mounted on {container}) does not exist"
            assert REPO in host.parents or host == REPO, f"{name}: {host} is outside the repository"


def test_dockerfile_copy_sources_exist():
    build = services()["agent"]["build"]
    context = (DOCKER / build["context"]).resolve()
    dockerfile = context / build["dockerfile"]
    copies = [line.split()[1:] for line in dockerfile.read_text().splitlines() if line.startswith("COPY ")]
    assert copies, "the Dockerfile copies nothing"
    for args in copies:
        args = [a for a in args if not a.startswith("--")]
        for source in args[:-1]:
            assert (context / source).exists(), f"COPY {source}: not in the build context {context}"
    # what `pip install -e .` needs to build the package
    sources = {s.rstrip("/") for args in copies for s in args[:-1]}
    assert {"pyproject.toml", "setup.py", "cext", "spoa"} <= sources
    assert "README.md" in sources  # pyproject.toml names it as the readme


@pytest.mark.parametrize("name,argv", python_commands(), ids=lambda v: v if isinstance(v, str) else None)
def test_python_commands_exist_and_their_arguments_parse(name, argv):
    module, args = argv[0], argv[1:]
    if module == "spoa":
        from spoa.cli import make_parser

        sub = args[:1]
    elif module in ("spoa.tools.demo.backend", "spoa.tools.demo.loadgen"):
        import importlib

        make_parser = importlib.import_module(module).make_parser
        sub = []
    else:
        raise AssertionError(f"{name}: python -m {module} is not one of the project's commands")
    make_parser().parse_args(args)  # SystemExit on an unknown option
    done = subprocess.run([sys.executable, "-m", module, *sub, "--help"], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, **ENV}, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "usage:" in done.stdout


# -- the configs validate, and match the non-Docker demo ----------------------------------------------


def _config_of(service_name: str, schema, tmp_path: Path, of=services) -> tuple[dict, dict]:
    service = of()[service_name]
    command = service["command"]
    path = command[command.index("--config") + 1]
    raw = yaml.safe_load(host_path(service, path).read_text())
    # key files are read at validation: point them at the mounted file
    section = "publish" if "publish" in raw else "lbnode"
    key_container = raw[section]["key_file"]
    key_host = host_path(service, key_container)
    assert key_host.is_file()
    validated = dict(raw)
    validated[section] = {**raw[section], "key_file": str(key_host)}
    checked = tmp_path / f"{of.__name__}-{service_name}.yaml"
    checked.write_text(yaml.safe_dump(validated))
    return raw, cfg.load(schema, checked)


def test_agent_config_validates_and_matches_the_demo(tmp_path):
    raw, loaded = _config_of("agent", cfg.AGENT_SCHEMA, tmp_path)
    assert raw == stack.agent_config(raw["agent"]["listen"][0], raw["metrics"]["listen"],
                                     raw["publish"]["lb_nodes"], raw["publish"]["key_file"])
    # HAProxy (same namespace) reaches the agent where SPOA_LEASE_AGENT says
    assert services()["haproxy"]["environment"]["SPOA_LEASE_AGENT"] == loaded["agent"]["listen"][0]
    host, port = loaded["publish"]["lb_nodes"][0].split(":")
    assert host in services()
    _, lbnode = _config_of("lbnode", cfg.LBNODE_SCHEMA, tmp_path)
    assert lbnode["lbnode"]["listen"].endswith(f":{port}")


def test_lbnode_config_validates_and_matches_the_demo(tmp_path):
    raw, _ = _config_of("lbnode", cfg.LBNODE_SCHEMA, tmp_path)
    assert raw["lease"]["policy"] == "activity"  # the demo's default
    assert raw == stack.lbnode_config(raw["lbnode"]["listen"], raw["metrics"]["listen"], raw["lbnode"]["key_file"],
                                      "activity")


def _valkey_nodes(s: dict) -> list[str]:
    return sorted(name for name, service in s.items() if service.get("image", "").startswith("valkey/")
                  and service.get("command", [None])[0] == "valkey-server")


def test_tier_store_is_the_demos_cluster():
    """3 primaries x 1 replica, cluster-node-timeout as `demo --lbnodes N`, formed once before the LB nodes start."""
    s = tier_services()
    nodes = _valkey_nodes(s)
    assert len(nodes) == tier.STORE_PRIMARIES * (1 + tier.STORE_REPLICAS), nodes
    for name in nodes:
        command = s[name]["command"]
        assert command[command.index("--cluster-node-timeout") + 1] == str(tier.STORE_NODE_TIMEOUT_MS)
        assert command[command.index("--port") + 1] == "6379"
    create = s["valkey-create"]
    script = create["command"][0]
    assert f"--cluster-replicas {tier.STORE_REPLICAS}" in script and "--cluster-yes" in script
    assert script.split("for h in ", 1)[1].split(";", 1)[0].split() == nodes  # every node, named once
    assert set(_depends(create)) == set(nodes)
    assert all(dep == {"condition": "service_healthy"} for dep in _depends(create).values())
    for name in ("lbnode", "lbnode2", "lbnode3"):
        assert _depends(s[name]) == {"valkey-create": {"condition": "service_completed_successfully"}}, name


def test_tier_configs_validate_and_match_the_demo_with_three_lbnodes(tmp_path):
    s = tier_services()
    raw, loaded = _config_of("agent", cfg.AGENT_SCHEMA, tmp_path, tier_services)
    assert raw == stack.agent_config(raw["agent"]["listen"][0], raw["metrics"]["listen"],
                                     raw["publish"]["lb_nodes"], raw["publish"]["key_file"])
    lbnodes = [address.split(":")[0] for address in loaded["publish"]["lb_nodes"]]
    assert lbnodes == ["lbnode", "lbnode2", "lbnode3"]
    assert set(lbnodes) <= set(_depends(s["agent"]))
    seeds = [f"{name}:6379" for name in _valkey_nodes(s)]
    for node_id, (name, address) in enumerate(zip(lbnodes, loaded["publish"]["lb_nodes"]), 1):
        raw, lbnode = _config_of(name, cfg.LBNODE_SCHEMA, tmp_path, tier_services)
        assert lbnode["lbnode"]["listen"].endswith(":" + address.split(":")[1])
        assert raw == stack.lbnode_config(raw["lbnode"]["listen"], raw["metrics"]["listen"],
                                          raw["lbnode"]["key_file"], "activity", node_id=node_id,
                                          cluster=stack.cluster_config(seeds)), name


def test_prometheus_scrapes_both_metrics_endpoints():
    service = services()["prometheus"]
    prom = yaml.safe_load(host_path(service, "/etc/prometheus/prometheus.yml").read_text())
    targets = {t for job in prom["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]}
    agent = yaml.safe_load((DOCKER / "agent.yaml").read_text())
    lbnode = yaml.safe_load((DOCKER / "lbnode.yaml").read_text())
    # the agent is in HAProxy's namespace: its metrics are reached by HAProxy's name
    assert f"haproxy:{agent['metrics']['listen'].rsplit(':', 1)[1]}" in targets
    assert f"lbnode:{lbnode['metrics']['listen'].rsplit(':', 1)[1]}" in targets


def test_tier_prometheus_scrapes_every_lbnode_under_the_dashboards_jobs():
    """With compose.tier.yaml, Prometheus reads tier/prometheus.yml: each LB node's /metrics (the
    port its tier config listens on), under the job names the single stack uses (the dashboard's
    panels select by job)."""
    tier = tier_services()
    prom = yaml.safe_load(host_path(tier["prometheus"], "/etc/prometheus/prometheus.yml").read_text())
    jobs = {job["job_name"]: {t for sc in job["static_configs"] for t in sc["targets"]}
            for job in prom["scrape_configs"]}
    single = {job["job_name"] for job in yaml.safe_load((DOCKER / "prometheus.yml").read_text())["scrape_configs"]}
    assert set(jobs) == single
    expected = set()
    for service, config in (("lbnode", "lbnode1.yaml"), ("lbnode2", "lbnode2.yaml"), ("lbnode3", "lbnode3.yaml")):
        raw = yaml.safe_load((DOCKER / "tier" / config).read_text())
        assert service in tier and service in _depends(tier["prometheus"])
        expected.add(f"{service}:{raw['metrics']['listen'].rsplit(':', 1)[1]}")
    assert jobs["spoa-lbnode"] == expected


@pytest.mark.parametrize("line", provision.LINES)
def test_haproxy_configs_pass_haproxy_check(line, tmp_path):
    """The very files and environment the haproxy service uses, through `haproxy -c`.

    3.2 is the image's line; the include is meant for 2.6 and 2.8 too. Compose
    service names do not resolve here, so addresses naming a service become
    127.0.0.1 (that is the only change)."""
    s = services()
    service = s["haproxy"]
    env = {}
    for key, value in service["environment"].items():
        host, sep, port = str(value).rpartition(":")
        env[key] = f"127.0.0.1:{port}" if sep and host in s else str(value)
    env["SPOA_LEASE_DIR"] = str(host_path(service, env["SPOA_LEASE_DIR"]))
    env["SPOA_LEASE_RUN"] = str(tmp_path)
    args = list(service["command"])
    for i, arg in enumerate(args):
        if i and args[i - 1] == "-f":
            args[i] = str(host_path(service, arg))
            assert Path(args[i]).is_file()
    binary = provision.ensure(line)
    done = subprocess.run(binary.command("-c", *args), env={**binary.run_env(), **env}, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "[ALERT]" not in done.stdout + done.stderr


def test_grafana_provisions_the_dashboard_on_the_prometheus_datasource():
    """Profile `prometheus` also starts Grafana with the operators' dashboard;
    its queries are checked against real /metrics in tests/e2e/test_dashboard.py."""
    import json

    service = services()["grafana"]
    assert service["profiles"] == ["prometheus"]
    sources = yaml.safe_load(host_path(service, "/etc/grafana/provisioning/datasources/prometheus.yml").read_text())
    (source,) = sources["datasources"]
    assert source["url"] == "http://prometheus:9090" and "prometheus" in services()
    provider = yaml.safe_load(host_path(service, "/etc/grafana/provisioning/dashboards/spoa-lease.yml").read_text())
    folder = host_path(service, provider["providers"][0]["options"]["path"])
    (dashboard_file,) = folder.glob("*.json")
    dashboard = json.loads(dashboard_file.read_text())
    jobs = {job["job_name"] for job in yaml.safe_load((DOCKER / "prometheus.yml").read_text())["scrape_configs"]}
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == source["uid"], panel["title"]
        for target in panel["targets"]:
            assert set(re.findall(r'job="([^"]+)"', target["expr"])) <= jobs, target["expr"]
