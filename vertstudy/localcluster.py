"""A multi-node Ray cluster on one machine, for development, tests and benchmarks.

``start_local_cluster(root, workers=2)`` runs ``ray start`` for a head and N worker nodes, each a
real raylet with its own CPUs, object store and ports, the way nodes of a real cluster are. The
head holds no CPUs by default, so every trial runs on a worker node. Token authentication is
always on: a random token is written to ``<root>/auth_token`` (mode 0600) and every node and
driver gets ``RAY_AUTH_MODE=token`` and ``RAY_AUTH_TOKEN_PATH``; ``<root>/env.sh`` exports them
with ``RAY_ADDRESS`` for a shell. The dashboard (and with it ``ray job submit``) listens on
127.0.0.1 only.

By default nodes on one machine share its IP address: they are told apart by their node id (the
raylet's ``--node_id``), which is what the study tables record in ``node``. With
``netns=True`` (root and iproute2) every worker runs in a network namespace of its own with its
own address on a private bridge (:mod:`vertstudy.localnet`), as separate hosts would, and
``cut_worker`` / ``heal_worker`` take a worker's link down and up (a network partition).
With ``home_per_node=True`` every node runs with a HOME of its own (``<root>/home/node-N``), so
``~/.cache/vertstudy`` (the default ``data.node_cache`` and a driver's working folder) is not
shared between nodes, as on separate hosts; with an object store as the study's storage, the data
then reach a worker only through the published cache and a checkpoint only through the store.
``health_check_s`` shortens how long the head waits before it declares a silent node dead
(Ray's default is about 30 s). ``kill_worker`` SIGKILLs a
worker's raylet and everything it started (its trial workers and agents), which is what the
cluster sees when a machine dies. ``stop_local_cluster`` stops only this cluster's processes
(found by ``root`` in their command line), never another Ray on the machine.

State is kept in ``<root>/cluster.json`` so separate commands (``vertstudy cluster``,
``cluster/local.sh``) can find the cluster again.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from vertstudy.atomic import atomic_write_text
from vertstudy.errors import ConfigError

STATE = "cluster.json"
#: ports of one node: GCS (head only), node manager, object manager, dashboard agent (http,
#: grpc), metrics, runtime-env agent, ray client server (head only), dashboard (head only)
PORTS_PER_NODE = 10
WORKER_PORTS_PER_NODE = 100


@dataclass
class Node:
    """One node of the local cluster. ``index`` 0 is the head; ``node_id`` is Ray's (hex)."""

    index: int
    cpus: float
    node_id: str = ""
    raylet_pid: int = 0
    base_port: int = 0
    alive: bool = True
    ip: str = "127.0.0.1"
    cut: bool = False  # its network link is down (cut_worker)


@dataclass
class LocalCluster:
    """A running local cluster: where it lives and how drivers reach it."""

    root: Path
    gcs_port: int
    dashboard_port: int
    object_store_mb: int
    nodes: list[Node] = field(default_factory=list)
    head_ip: str = "127.0.0.1"
    network: str = ""  # prefix of its network namespaces and bridge (netns=True), else ""
    subnet: str = ""
    health_check_s: float = 0.0  # 0: Ray's default
    home_per_node: bool = False  # each node's HOME is <root>/home/node-N (node_home)

    def node_home(self, index: int) -> Path | None:
        """The HOME of node ``index`` (``None``: the caller's, shared by every node)."""
        return self.root / "home" / f"node-{index}" if self.home_per_node else None

    @property
    def address(self) -> str:
        """The GCS address (``ray.init(address=...)``, ``vertstudy study run --address``)."""
        return f"{self.head_ip}:{self.gcs_port}"

    @property
    def net(self):
        """Its :class:`vertstudy.localnet.Network` (``None`` when nodes share the host's address)."""
        from vertstudy.localnet import Network

        return Network(self.network, self.subnet) if self.network else None

    @property
    def dashboard_url(self) -> str:
        """The job-submission address (``ray job submit --address ...``): localhost only."""
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def token_path(self) -> Path:
        return self.root / "auth_token"

    @property
    def temp_dir(self) -> Path:
        return self.root / "ray"

    def env(self) -> dict[str, str]:
        """Environment a driver or CLI needs for this cluster (token auth on, address set)."""
        return {"RAY_ADDRESS": self.address, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.token_path)}

    def running(self) -> bool:
        """Whether any raylet of this cluster is still running."""
        procs = _processes()
        return any(n.raylet_pid in procs and "raylet" in procs[n.raylet_pid][1] for n in self.nodes)

    def workers(self, alive_only: bool = True) -> list[Node]:
        return [n for n in self.nodes if n.index > 0 and (n.alive or not alive_only)]

    def save(self) -> None:
        data = {**asdict(self), "root": str(self.root)}
        atomic_write_text(self.root / STATE, json.dumps(data, indent=1))
        lines = [f"export {k}={shlex.quote(v)}" for k, v in self.env().items()]
        lines.append(f"export VERTSTUDY_DASHBOARD={shlex.quote(self.dashboard_url)}")
        (self.root / "env.sh").write_text("\n".join(lines) + "\n", encoding="utf-8")


def load_cluster(root: Path) -> LocalCluster:
    """The cluster started in ``root`` (one line of error if there is none)."""
    root = Path(root).resolve()
    try:
        data = json.loads((root / STATE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{root}: no local cluster here (no {STATE}); start one with `vertstudy cluster start`") \
            from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{root / STATE}: unreadable cluster state ({exc})") from None
    nodes = [Node(**n) for n in data.pop("nodes")]
    data.pop("root", None)
    return LocalCluster(root=root, nodes=nodes, **data)


def _free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _port_block(n_nodes: int, first: int = 21000, last: int = 60000) -> int:
    """A base port such that every node's ports and worker-port range are free."""
    rng = secrets.SystemRandom()
    need = n_nodes * (PORTS_PER_NODE + WORKER_PORTS_PER_NODE)
    for _ in range(200):
        base = rng.randrange(first, last - need) // 10 * 10
        if all(_free(base + i) for i in range(need)):
            return base
    raise ConfigError(f"no free block of {need} ports between {first} and {last} on 127.0.0.1")


def _node_ports(base: int, index: int, n_nodes: int) -> dict[str, int]:
    p = base + PORTS_PER_NODE * index
    workers = base + PORTS_PER_NODE * n_nodes + WORKER_PORTS_PER_NODE * index
    return {
        "gcs": p, "node_manager": p + 1, "object_manager": p + 2, "agent_http": p + 3, "agent_grpc": p + 4,
        "metrics": p + 5, "runtime_env": p + 6, "client": p + 7, "dashboard": p + 8,
        "min_worker": workers, "max_worker": workers + WORKER_PORTS_PER_NODE - 1,
    }


def ray_command() -> str:
    """The ``ray`` command of this Python environment (beside its interpreter), else the PATH's."""
    beside = Path(sys.executable).parent / "ray"
    return str(beside) if beside.exists() else (shutil.which("ray") or "ray")


def _ray_start(cluster: LocalCluster, node: Node, ports: dict[str, int], log) -> None:
    args = [
        ray_command(), "start", f"--num-cpus={node.cpus:g}", "--num-gpus=0",
        f"--object-store-memory={cluster.object_store_mb * 1024 * 1024}", "--disable-usage-stats",
        f"--node-manager-port={ports['node_manager']}", f"--object-manager-port={ports['object_manager']}",
        f"--dashboard-agent-listen-port={ports['agent_http']}", f"--dashboard-agent-grpc-port={ports['agent_grpc']}",
        f"--metrics-export-port={ports['metrics']}", f"--runtime-env-agent-port={ports['runtime_env']}",
        f"--min-worker-port={ports['min_worker']}", f"--max-worker-port={ports['max_worker']}",
        f"--resources={json.dumps({f'vs_node_{node.index}': 1})}",
    ]
    if node.index == 0:
        args += ["--head", f"--port={ports['gcs']}", f"--temp-dir={cluster.temp_dir}", "--include-dashboard=true",
                 "--dashboard-host=127.0.0.1", f"--dashboard-port={ports['dashboard']}",
                 f"--ray-client-server-port={ports['client']}"]
    else:
        args += [f"--address={cluster.address}"]
    if cluster.network:
        from vertstudy.localnet import in_namespace

        args.append(f"--node-ip-address={node.ip}")
        if node.index > 0:
            args = in_namespace(cluster.net, node.index, args)
    env = {**os.environ, **cluster.env(), **_health_env(cluster.health_check_s)}
    home = cluster.node_home(node.index)
    if home is not None:  # the node's Ray workers (trials) inherit it, as on a host of its own
        home.mkdir(parents=True, exist_ok=True)
        env["HOME"] = str(home)
        env.pop("XDG_CACHE_HOME", None)
    env.pop("RAY_ADDRESS")  # `ray start` takes --address; a stale RAY_ADDRESS would confuse the head
    # a W&B service of the caller's process (wandb sets WANDB_SERVICE once it has run) would serve
    # every node's trials: two attempts of a trial would share it, and it refuses the retry's run
    # while the lost attempt's is still open. Each node's workers start their own, as on real hosts.
    env.pop("WANDB_SERVICE", None)
    out = subprocess.run(args, env=env, capture_output=True, text=True, timeout=180)
    (cluster.root / "logs").mkdir(exist_ok=True)
    (cluster.root / "logs" / f"ray-start-{node.index}.log").write_text(out.stdout + out.stderr, encoding="utf-8")
    if out.returncode != 0:
        tail = (out.stderr or out.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise ConfigError(f"ray start of node {node.index} failed: {tail[0]} (log: {cluster.root}/logs)")
    node.base_port = ports["node_manager"]
    node.raylet_pid, node.node_id = _find_raylet(ports["node_manager"])
    log(f"node {node.index} ({'head' if node.index == 0 else 'worker'}, {node.cpus:g} CPU) up: {node.node_id[:12]}")


def _health_env(health_check_s: float) -> dict[str, str]:
    """Ray settings (read from the environment by every Ray process) under which the head
    declares a node dead after about ``health_check_s`` seconds without an answer, and a node
    that cannot reach the head gives up (exits) after about twice that; empty for Ray's defaults."""
    if health_check_s <= 0:
        return {}
    period_ms = 500
    return {
        "RAY_health_check_initial_delay_ms": "1000", "RAY_health_check_period_ms": str(period_ms),
        "RAY_health_check_timeout_ms": str(period_ms),
        "RAY_health_check_failure_threshold": str(max(2, round(health_check_s * 1000 / period_ms))),
        "RAY_gcs_rpc_server_reconnect_timeout_s": str(max(5, round(2 * health_check_s))),
    }


def _processes() -> dict[int, tuple[int, str]]:
    """``{pid: (parent pid, command line)}`` of every process (from /proc)."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        out[int(entry.name)] = (ppid, cmd)
    return out


def _find_raylet(node_manager_port: int, timeout_s: float = 30.0) -> tuple[int, str]:
    """(pid, node id) of the raylet listening on ``node_manager_port``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for pid, (_, cmd) in _processes().items():
            if "raylet" in cmd and f"--node_manager_port={node_manager_port} " in cmd + " ":
                node_id = next((a.split("=", 1)[1] for a in cmd.split() if a.startswith("--node_id=")), "")
                return pid, node_id
        time.sleep(0.2)
    raise ConfigError(f"no raylet on node-manager port {node_manager_port} after {timeout_s:g} s")


def _descendants(pid: int, procs: dict[int, tuple[int, str]]) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, (pp, _) in procs.items() if pp == p]
        out += kids
        todo += kids
    return out


def start_local_cluster(root: Path, workers: int = 2, cpus_per_worker: float = 1, head_cpus: float = 0,
                        object_store_mb: int = 100, log=print, netns: bool = False,
                        health_check_s: float = 0.0, home_per_node: bool = False) -> LocalCluster:
    """Start a head and ``workers`` worker nodes in ``root`` (created; must not hold a running cluster).

    ``object_store_mb`` caps each node's object store (Ray's default claims ~30 % of RAM per node).
    ``netns``: each worker in a network namespace of its own, with its own address (see the
    module docstring). ``health_check_s``: seconds of silence after which the head declares a
    node dead (0: Ray's default). ``home_per_node``: a HOME of its own for each node. On failure
    everything started so far is stopped again."""
    if workers < 0 or cpus_per_worker <= 0 or head_cpus < 0 or object_store_mb < 75 or health_check_s < 0:
        raise ConfigError(f"workers >= 0, cpus per worker > 0, head cpus >= 0, object store >= 75 MB, health "
                          f"check >= 0 s; got {workers}, {cpus_per_worker}, {head_cpus}, {object_store_mb}, "
                          f"{health_check_s}")
    if not Path(ray_command()).exists() and shutil.which("ray") is None:
        raise ConfigError("the `ray` command is not on PATH: install vertstudy (pip install -e .) in this environment")
    root = Path(root).resolve()
    if (root / STATE).exists() and load_cluster(root).running():
        raise ConfigError(f"{root}: a local cluster is already running here; stop it with `vertstudy cluster stop`")
    if len(str(root)) > 60:
        raise ConfigError(f"{root}: too long for Ray's socket paths (at most 60 characters); use e.g. /tmp/vs-cluster")
    root.mkdir(parents=True, exist_ok=True)
    n_nodes = 1 + workers
    base = _port_block(n_nodes)
    head = _node_ports(base, 0, n_nodes)
    cluster = LocalCluster(root=root, gcs_port=head["gcs"], dashboard_port=head["dashboard"],
                           object_store_mb=object_store_mb, health_check_s=health_check_s,
                           home_per_node=home_per_node)
    fd = os.open(cluster.token_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    try:
        if netns:
            from vertstudy.localnet import make_network, namespaces_allowed

            why_not = namespaces_allowed()
            if why_not:
                raise ConfigError(f"--netns: {why_not} (network namespaces need root and iproute2)")
            cluster.network = network_prefix(root)
            net = make_network(cluster.network, workers)
            cluster.subnet, cluster.head_ip = net.subnet, net.head_ip
            cluster.save()
        for index in range(n_nodes):
            node = Node(index=index, cpus=head_cpus if index == 0 else cpus_per_worker)
            if netns:
                node.ip = cluster.head_ip if index == 0 else cluster.net.worker_ip(index)
            _ray_start(cluster, node, _node_ports(base, index, n_nodes), log)
            cluster.nodes.append(node)
            cluster.save()
        _wait_for_nodes(cluster, n_nodes)
    except BaseException:
        cluster.save()
        stop_local_cluster(root, log=lambda *_: None)
        raise
    return cluster


def network_prefix(root: Path) -> str:
    """The name prefix of a cluster's namespaces and bridge: ``vs`` + 5 hex digits of its root."""
    import hashlib

    return "vs" + hashlib.sha1(str(Path(root).resolve()).encode()).hexdigest()[:5]


def _wait_for_nodes(cluster: LocalCluster, n: int, timeout_s: float = 60.0) -> None:
    """Wait until the GCS lists ``n`` alive nodes (a worker's `ray start` returns before it registers)."""
    env = {**os.environ, **cluster.env()}
    code = ("import ray, sys; ray.init(address=sys.argv[1], log_to_driver=False, logging_level='ERROR'); "
            "print(sum(1 for n in ray.nodes() if n['Alive']))")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        out = subprocess.run([sys.executable, "-c", code, cluster.address], env=env, capture_output=True, text=True,
                             timeout=120)
        if out.returncode == 0 and out.stdout.strip().splitlines()[-1:] == [str(n)]:
            return
        time.sleep(1.0)
    raise ConfigError(f"the local cluster in {cluster.root} did not reach {n} alive nodes in {timeout_s:g} s")


def kill_worker(root: Path, index: int) -> list[int]:
    """SIGKILL worker node ``index`` (>= 1): its raylet and every process it started. Returns the pids."""
    cluster, node = _worker(root, index)
    procs = _processes()
    pids = [node.raylet_pid, *_descendants(node.raylet_pid, procs)] if node.raylet_pid in procs else []
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    node.alive = False
    cluster.save()
    return pids


def _worker(root: Path, index: int) -> tuple[LocalCluster, Node]:
    cluster = load_cluster(root)
    node = next((n for n in cluster.nodes if n.index == index), None)
    if node is None or index == 0:
        raise ConfigError(f"worker index {index}: not a worker of the cluster in {cluster.root} "
                          f"(workers: {', '.join(str(n.index) for n in cluster.workers()) or 'none'})")
    return cluster, node


def cut_worker(root: Path, index: int, heal: bool = False) -> None:
    """Take worker ``index``'s network link down (``heal``: up again). Its processes keep running:
    the head stops hearing from it, declares it dead after the health-check time, and its
    trials are retried elsewhere. Only for clusters started with ``netns=True``."""
    from vertstudy import localnet

    cluster, node = _worker(root, index)
    if cluster.net is None:
        raise ConfigError(f"{cluster.root}: its nodes share the host's network; start the cluster with --netns to "
                          "cut one off")
    (localnet.heal if heal else localnet.cut)(cluster.net, index)
    node.cut = not heal
    cluster.save()


def stop_local_cluster(root: Path, log=print, timeout_s: float = 15.0) -> int:
    """Stop every process of the cluster in ``root`` (SIGTERM, then SIGKILL) and remove its network
    namespaces (if any); returns how many processes."""
    root = Path(root).resolve()
    marker = str(root / "ray") + "/"
    procs = _processes()
    ours = [pid for pid, (_, cmd) in procs.items() if marker in cmd and pid != os.getpid()]
    for pid in list(ours):
        ours += _descendants(pid, procs)
    ours = sorted(set(ours))
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in ours:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + (timeout_s if sig == signal.SIGTERM else 2.0)
        while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() and _running(p) for p in ours):
            time.sleep(0.2)
    if (root / STATE).exists():
        network = json.loads((root / STATE).read_text(encoding="utf-8")).get("network", "")
        if network:
            from vertstudy.localnet import remove_network

            remove_network(network)
    log(f"stopped {len(ours)} processes of the local cluster in {root}")
    return len(ours)


def _running(pid: int) -> bool:
    """False for a zombie (exited, not yet reaped) process."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False
