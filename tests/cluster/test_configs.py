"""Checks of the cluster configs in cluster/: Ray cluster launcher YAMLs (AWS, GCP) and KubeRay manifests.

The launcher YAMLs are validated the way `ray up` validates them before it touches a cloud:
``prepare_config`` (merge with the provider's defaults.yaml) then ``validate_config`` (Ray's
ray-schema.json plus its cross-field checks), and additionally the raw file against ray-schema.json
(unknown keys are errors there). The rest are static checks: a comment on every key, security
(token auth, localhost dashboard, nothing open to the internet, secrets only by reference), and
consistency between the KubeRay RayCluster and the RayJob's cluster. No network, no cloud SDKs.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import ray
import ray.autoscaler
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
LAUNCHERS = {"aws": CLUSTER / "aws.yaml", "gcp": CLUSTER / "gcp.yaml"}
STORAGE_SCHEME = {"aws": "s3://", "gcp": "gs://"}
KUBERAY = CLUSTER / "kuberay"
RAYCLUSTER = KUBERAY / "raycluster.yaml"
RAYJOB = KUBERAY / "rayjob.yaml"
SECRETS = KUBERAY / "secrets.example.yaml"
CONFIG_FILES = [*LAUNCHERS.values(), RAYCLUSTER, RAYJOB, SECRETS]
RAY_VERSION = "2.60.0"

ray_schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text(encoding="utf-8"))


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def load_docs(path: Path) -> dict[str, dict]:
    """The documents of a manifest file by kind (each kind once)."""
    docs = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]
    kinds = [d["kind"] for d in docs]
    assert len(kinds) == len(set(kinds)), f"{path.name}: one document per kind, got {kinds}"
    return {d["kind"]: d for d in docs}


def ray_up_validate(config: dict) -> None:
    """What `ray up` checks before calling the cloud, plus the raw file against Ray's schema."""
    jsonschema.validate(config, ray_schema)
    validate_config(prepare_config(copy.deepcopy(config)))


def walk(node, path=()):
    """Every (path, mapping) in a parsed YAML tree."""
    if isinstance(node, dict):
        yield path, node
        for k, v in node.items():
            yield from walk(v, (*path, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from walk(v, (*path, i))


def all_commands(config: dict) -> list[str]:
    """Every shell command of a launcher config, the node types' own included."""
    keys = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
            "head_start_ray_commands", "worker_start_ray_commands")
    found = [c for k in keys for c in config.get(k) or []]
    for node_type in config["available_node_types"].values():
        found += [c for k in keys for c in node_type.get(k) or []]
    return found


# --------------------------------------------------------------------------- comment on every key

KEY_RE = re.compile(r"""^(?P<lead>\s*(?:-\s+)?)(?P<key>"[^"]*"|'[^']*'|[A-Za-z_~][\w.\-/~]*)\s*:(?:\s|$)""")
BLOCK_SCALAR_RE = re.compile(r"(?:^|:|-)\s*[|>][-+0-9]*\s*$")  # `key: >-`, `- |` (comment already removed)
WORDS_RE = re.compile(r"[A-Za-z]{2,}")


def _split_comment(text: str) -> tuple[str, str | None]:
    """(code, comment) of a YAML line fragment; quoted strings in the code are blanked, a `#` in
    them starts no comment."""
    blanked = re.sub(r""""[^"]*"|'[^']*'""", '""', text)
    m = re.search(r"(?:^|\s)#(.*)$", blanked)
    return (blanked[: m.start()], m.group(1)) if m else (blanked, None)


def uncommented_keys(text: str) -> list[str]:
    """Lines defining a mapping key with neither a comment at the end of the line nor a comment
    line directly above. Block scalar contents (`key: >-` ...) are not YAML keys and are skipped;
    a comment must have at least one word."""
    missing = []
    block_indent = None  # the block scalar's parent indentation while inside one
    previous = ""  # the previous non-blank line, stripped
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped:
            continue
        indent = len(line) - len(line.lstrip())
        if block_indent is not None:
            if indent > block_indent:
                continue
            block_indent = None
        if stripped.startswith("#"):
            previous = stripped
            continue
        m = KEY_RE.match(line)
        if m:
            inline = _split_comment(line[m.end():])[1]
            above = previous[1:] if previous.startswith("#") else None
            if not any(c is not None and WORDS_RE.search(c) for c in (inline, above)):
                missing.append(f"line {number}: {stripped}")
        if BLOCK_SCALAR_RE.search(_split_comment(line)[0].rstrip()):
            block_indent = len(m.group("lead")) if m else indent
        previous = stripped
    return missing


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
def test_every_key_has_a_comment(path):
    assert uncommented_keys(path.read_text(encoding="utf-8")) == []


def test_comment_rule_catches_a_bare_key_and_skips_block_scalars():
    text = (
        "# the name\n"
        "name: x\n"
        "size: 3\n"  # no comment: reported
        "commands:  # commands\n"
        "  # first command\n"
        "  - >-\n"
        "    postgresql://not-a-key: here\n"
        "  # second\n"
        "  - ok\n"
        "list:  #\n"  # a comment without words does not count
        "  - \"# not a comment\"\n"
        '"~/quoted": "#."\n'  # quoted key without comment (a `#` inside quotes is none): reported
        "# a block scalar\n"
        "script: |  # shell\n"
        "  key: not a key\n"
    )
    assert uncommented_keys(text) == ["line 3: size: 3", "line 10: list:  #", 'line 12: "~/quoted": "#."']


# --------------------------------------------------------------------------- launcher configs

@pytest.fixture(scope="module", params=sorted(LAUNCHERS))
def launcher(request):
    return request.param, load(LAUNCHERS[request.param])


def test_launcher_passes_ray_validation(launcher):
    _, config = launcher
    ray_up_validate(config)


def _workers(config: dict) -> list[dict]:
    return [t for name, t in config["available_node_types"].items() if name != config["head_node_type"]]


def _unknown_top_level_key(config):
    config["worker_count"] = 3


def _max_workers_not_an_integer(config):
    config["max_workers"] = "many"


def _fractional_gpu_resource(config):
    _workers(config)[0]["resources"]["GPU"] = 0.5


def _min_workers_above_max_workers(config):
    for worker in _workers(config):
        worker["min_workers"] = config["max_workers"]


def _head_type_not_a_node_type(config):
    config["head_node_type"] = "no.such.type"


@pytest.mark.parametrize("breakage", [_unknown_top_level_key, _max_workers_not_an_integer, _fractional_gpu_resource,
                                      _min_workers_above_max_workers, _head_type_not_a_node_type],
                         ids=lambda f: f.__name__.strip("_"))
def test_broken_launcher_config_fails_validation(launcher, breakage):
    _, config = launcher
    broken = copy.deepcopy(config)
    breakage(broken)
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        ray_up_validate(broken)


def test_launcher_node_types(launcher):
    _, config = launcher
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0, "the head is CPU-only"
    assert head.get("min_workers", 0) == 0 and head.get("max_workers", 0) == 0
    gpu_workers = {name: t for name, t in types.items() if name != config["head_node_type"]}
    assert gpu_workers and all(t["resources"].get("GPU", 0) >= 1 for t in gpu_workers.values())
    for name, t in gpu_workers.items():
        assert 0 <= t["min_workers"] <= t["max_workers"] <= config["max_workers"], name
        assert t["resources"]["CPU"] >= 1, name


def test_launcher_installs_vertstudy_from_the_mounted_checkout(launcher):
    _, config = launcher
    assert config["file_mounts"]["~/vertstudy"] == "."
    installs = [c for c in config["setup_commands"] if re.search(r"pip install (-\S+ )*~/vertstudy\b", c)]
    assert len(installs) == 1, "setup_commands install vertstudy from the mounted checkout"
    assert "~/vertstudy'[cluster]'" in installs[0], "with the cluster extra (boto3 for the S3 lease, psycopg)"
    assert not any("torch==" in c for c in all_commands(config)), "GPU nodes take torch's CUDA build"
    image = config["docker"]["image"]
    assert image.startswith(f"rayproject/ray:{RAY_VERSION}-") and image.endswith("-gpu")
    assert config["docker"]["container_name"]


def test_launcher_storage_uri_matches_the_cloud(launcher):
    cloud, _ = launcher
    text = LAUNCHERS[cloud].read_text(encoding="utf-8")
    other = next(s for c, s in STORAGE_SCHEME.items() if c != cloud)
    assert f"--storage {STORAGE_SCHEME[cloud]}" in text
    assert other not in text


def test_every_ray_start_uses_token_auth(launcher):
    _, config = launcher
    token_mounts = {remote for remote in config["file_mounts"] if remote.endswith("/.ray/auth_token")}
    assert len(token_mounts) == 1, "the Ray token file is mounted on every node"
    starts = [c for c in all_commands(config) if "ray start" in c]
    assert len(starts) == 2
    for command in starts:
        start = command.index("ray start")
        mode = command.find("RAY_AUTH_MODE=token")
        assert 0 <= mode < start, command
        path = re.search(r"RAY_AUTH_TOKEN_PATH=(\S+)", command[:start])
        assert path and path.group(1).replace("$HOME", "~") in token_mounts, command
        assert "disabled" not in command


def test_head_dashboard_is_bound_to_localhost(launcher):
    _, config = launcher
    heads = [c for c in config["head_start_ray_commands"] if "ray start" in c]
    assert len(heads) == 1
    assert "--head" in heads[0]
    assert "--dashboard-host=127.0.0.1" in heads[0]
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in heads[0]
    assert not any("--head" in c or "--dashboard-host" in c for c in config["worker_start_ray_commands"])


def test_launcher_nodes_are_private(launcher):
    cloud, config = launcher
    assert config["provider"]["use_internal_ips"] is True
    for name, node_type in config["available_node_types"].items():
        node = node_type["node_config"]
        if cloud == "aws":
            # With SecurityGroupIds on every node type Ray neither creates nor edits a security group
            # (its own group would open ssh to the internet).
            assert node["SecurityGroupIds"] and node["SubnetIds"], name
            assert "NetworkInterfaces" not in node, name
        else:
            assert node["networkInterfaces"], name
            assert all("accessConfigs" not in nic for nic in node["networkInterfaces"]), f"{name}: external IP"
    if cloud == "aws":
        assert "security_group" not in config["provider"]


def test_launcher_secrets_come_from_the_secret_manager_into_a_private_file(launcher):
    _, config = launcher
    env_file = "~/.vertstudy.env"
    writers = [c for c in config["setup_commands"] if f"> {env_file}" in c]
    assert len(writers) == 1 and "umask 077" in writers[0]
    assert not any(word in writers[0] for word in ("echo", "cat ", "tee")), "the secret is never printed"
    for command in all_commands(config):
        assert "runtime-env" not in command and "runtime_env" not in command, "runtime envs are logged"
        if "ray start" in command:
            assert f". {env_file}" in command
        if "VERTSTUDY_OPTUNA_STORAGE" in command:
            # no password in the URL (vertstudy refuses one): PostgreSQL's client reads PGPASSWORD
            url = re.search(r"VERTSTUDY_OPTUNA_STORAGE='([^']*)'", command).group(1)
            assert "@" in url and ":" not in url.split("://", 1)[1].split("@", 1)[0]


# --------------------------------------------------------------------------- whole directory

def test_nothing_is_open_to_the_internet():
    for path in CLUSTER.rglob("*"):
        if path.is_file():
            text = path.read_text(encoding="utf-8")
            for needle in ("0.0.0.0", "::/0"):
                assert needle not in text, f"{path.relative_to(REPO)} contains {needle}"


def test_no_credentials_in_any_config():
    patterns = {
        "AWS access key id": r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b",
        "private key": r"-----BEGIN [A-Z ]*PRIVATE KEY-----",
        "40-hex W&B key": r"\b[0-9a-f]{40}\b",
        "literal key assignment":
            r"(?:WANDB_API_KEY|PGPASSWORD|RAY_AUTH_TOKEN)\s*[=:]\s*['\"]?[A-Za-z0-9+/]{16,}",
        "password in a URL": r"://[^\s:/@]+:(?!\$\{)[^\s@]+@",
    }
    for path in CLUSTER.rglob("*"):
        if path.is_file():
            text = path.read_text(encoding="utf-8")
            for what, pattern in patterns.items():
                assert not re.search(pattern, text), f"{path.relative_to(REPO)}: {what}"


# --------------------------------------------------------------------------- KubeRay manifests

@pytest.fixture(scope="module")
def raycluster():
    return load_docs(RAYCLUSTER)


@pytest.fixture(scope="module")
def rayjob():
    return load_docs(RAYJOB)


@pytest.fixture(scope="module")
def cluster_specs(raycluster, rayjob):
    return {
        "raycluster.yaml": raycluster["RayCluster"]["spec"],
        "rayjob.yaml": rayjob["RayJob"]["spec"]["rayClusterSpec"],
    }


def containers_of(spec: dict) -> list[dict]:
    templates = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
    return [c for t in templates for c in t["spec"].get("initContainers", []) + t["spec"]["containers"]]


def test_manifest_kinds(raycluster, rayjob):
    assert set(raycluster) == {"PersistentVolumeClaim", "RayCluster"}
    assert set(rayjob) == {"PersistentVolumeClaim", "RayJob"}
    assert raycluster["RayCluster"]["apiVersion"] == rayjob["RayJob"]["apiVersion"] == "ray.io/v1"
    assert raycluster["PersistentVolumeClaim"] == rayjob["PersistentVolumeClaim"]
    assert "ReadWriteMany" in raycluster["PersistentVolumeClaim"]["spec"]["accessModes"]


def test_rayjob_cluster_is_the_raycluster(cluster_specs):
    specs = list(cluster_specs.values())
    assert specs[0]["rayVersion"] == specs[1]["rayVersion"] == RAY_VERSION
    images = {c["image"] for spec in specs for c in containers_of(spec)}
    assert len(images) == 1, f"one image in every container of both files, got {images}"
    assert specs[0] == specs[1], "rayjob.yaml's rayClusterSpec must be a copy of raycluster.yaml's spec"


def test_gpu_workers_and_cpu_head(cluster_specs):
    resources = {}
    for name, spec in cluster_specs.items():
        assert spec["enableInTreeAutoscaling"] is True
        head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]
        assert "nvidia.com/gpu" not in head["limits"] and "nvidia.com/gpu" not in head["requests"]
        assert spec["workerGroupSpecs"]
        for group in spec["workerGroupSpecs"]:
            assert 0 <= group["minReplicas"] <= group["maxReplicas"]
            assert group["minReplicas"] <= group.get("replicas", group["minReplicas"]) <= group["maxReplicas"]
            (worker,) = group["template"]["spec"]["containers"]
            limits, requests = worker["resources"]["limits"], worker["resources"]["requests"]
            assert int(limits["nvidia.com/gpu"]) >= 1 and limits["nvidia.com/gpu"] == requests["nvidia.com/gpu"]
            resources.setdefault(group["groupName"], {})[name] = worker["resources"]
        resources.setdefault("head", {})[name] = head
    for group, by_file in resources.items():
        assert len(set(map(json.dumps, by_file.values()))) == 1, f"{group}: resources differ between files"


def test_kuberay_token_auth_and_no_exposed_service(cluster_specs):
    for name, spec in cluster_specs.items():
        assert spec["authOptions"]["mode"] == "token", name
        assert spec["headGroupSpec"]["serviceType"] == "ClusterIP", name
        assert not spec["headGroupSpec"].get("enableIngress", False), name
        dashboard_host = spec["headGroupSpec"]["rayStartParams"].get("dashboard-host")
        assert dashboard_host in (None, "127.0.0.1"), name
        for container in containers_of(spec):
            for env in container.get("env", []):
                if env["name"] == "RAY_AUTH_MODE":
                    assert env.get("value") == "token", f"{name}: {container['name']}"
    for path in (RAYCLUSTER, RAYJOB):
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            for where, mapping in walk(doc):
                for key in ("serviceType", "type"):
                    assert mapping.get(key) not in ("LoadBalancer", "NodePort"), f"{path.name}: {where}"
                if mapping.get("kind") == "Service":
                    pytest.fail(f"{path.name}: no extra Service objects")


def test_kuberay_secrets_only_by_reference(cluster_specs):
    secret = load(SECRETS)
    secret_keys = set(secret["stringData"])
    for name, spec in cluster_specs.items():
        for container in containers_of(spec):
            env = {e["name"]: e for e in container.get("env", [])}
            assert "WANDB_API_KEY" in env, f"{name}: {container['name']} lacks the W&B key"
            for var, entry in env.items():
                if re.search(r"KEY|PASSWORD|TOKEN|SECRET", var):
                    ref = entry.get("valueFrom", {}).get("secretKeyRef")
                    assert "value" not in entry and ref, f"{name}: {container['name']}: {var} is not a secretKeyRef"
                    assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret_keys
            if "VERTSTUDY_OPTUNA_STORAGE" in env:
                assert "PGPASSWORD" in env
                url = env["VERTSTUDY_OPTUNA_STORAGE"]["value"]
                assert ":" not in url.split("://", 1)[1].split("@", 1)[0], "no password in the Optuna URL"


def test_rayjob_runs_a_study_on_the_shared_volume(rayjob, cluster_specs):
    spec = rayjob["RayJob"]["spec"]
    assert spec["submissionMode"] == "K8sJobMode"
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] > 0
    runtime_env = yaml.safe_load(spec.get("runtimeEnvYAML") or "{}")
    assert "env_vars" not in runtime_env, "runtime envs are logged: secrets come from the Secret only"
    entrypoint = spec["entrypoint"]
    assert entrypoint.startswith("vertstudy study run studies/")
    argv = shlex.split(entrypoint)
    assert (REPO / argv[3]).is_file(), f"{argv[3]} is not a study in the repository"
    storage = argv[argv.index("--storage") + 1]
    claim = rayjob["PersistentVolumeClaim"]["metadata"]["name"]
    for name, cluster in cluster_specs.items():
        for template in [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]:
            volumes = {v["name"] for v in template["spec"]["volumes"]
                       if v.get("persistentVolumeClaim", {}).get("claimName") == claim}
            mounts = [m["mountPath"] for c in template["spec"]["containers"] for m in c["volumeMounts"]
                      if m["name"] in volumes and not m.get("readOnly") and not m.get("subPath")]
            assert any(storage.startswith(mount.rstrip("/") + "/") for mount in mounts), name
    raycluster_text = RAYCLUSTER.read_text(encoding="utf-8")
    assert f"--storage {storage}" in raycluster_text, "raycluster.yaml documents the same storage"


def test_secrets_example_holds_placeholders_only():
    docs = [d for d in yaml.safe_load_all(SECRETS.read_text(encoding="utf-8")) if d is not None]
    assert len(docs) == 1
    (secret,) = docs
    assert secret["apiVersion"] == "v1" and secret["kind"] == "Secret"
    assert "data" not in secret, "base64 `data` could hide a real value"
    assert {"WANDB_API_KEY", "PGPASSWORD"} <= set(secret["stringData"])
    for key, value in secret["stringData"].items():
        assert re.fullmatch(r"<[a-z0-9-]+>", value), f"{key} is not a <placeholder>"
