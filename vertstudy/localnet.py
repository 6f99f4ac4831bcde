"""Separate network addresses for the nodes of a local cluster: one Linux network namespace per
worker node, joined to the host by a veth pair on a bridge of the project's own.

``make_network(prefix, workers)`` creates a bridge ``<prefix>b`` holding the head's address
(``10.213.N.1/24``, N chosen free) and, for worker ``i``, a namespace ``<prefix>-w<i>`` whose
end of a veth pair has ``10.213.N.(10+i)``. Nodes then reach each other over real (virtual)
links by distinct IP addresses, as machines do, and :func:`cut` takes one worker's link down
(a network partition, the processes keep running) until :func:`heal`. Needs root and iproute2;
everything made here carries the prefix, and :func:`remove_network` deletes exactly that.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass

from vertstudy.errors import ConfigError

SUBNET = "10.213"  # 10.213.N.0/24, N in 1..254: private, and checked free on this host


@dataclass(frozen=True)
class Network:
    """The namespaces and addresses of one local cluster (``prefix``: at most 8 characters)."""

    prefix: str
    subnet: str  # e.g. "10.213.17"

    @property
    def bridge(self) -> str:
        return f"{self.prefix}b"

    @property
    def head_ip(self) -> str:
        return f"{self.subnet}.1"

    def namespace(self, index: int) -> str:
        return f"{self.prefix}-w{index}"

    def worker_ip(self, index: int) -> str:
        return f"{self.subnet}.{10 + index}"

    def inner_link(self, index: int) -> str:
        return f"{self.prefix}n{index}"

    def outer_link(self, index: int) -> str:
        return f"{self.prefix}h{index}"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and out.returncode != 0:
        raise ConfigError(f"`ip {' '.join(args)}` failed: {(out.stderr or out.stdout).strip()[:300]}")
    return out


def namespaces_allowed() -> str | None:
    """``None`` when this process may create network namespaces, else why not (one line)."""
    import secrets

    probe = f"vsprobe{secrets.token_hex(3)}"
    try:
        out = _ip("netns", "add", probe, check=False)
    except FileNotFoundError:
        return "the `ip` command (iproute2) is not installed"
    if out.returncode != 0:
        return f"`ip netns add` refused: {(out.stderr or out.stdout).strip()[:200]}"
    _ip("netns", "del", probe, check=False)
    return None


def _free_subnet(prefix: str) -> str:
    used = _ip("-4", "-o", "addr", "show").stdout
    start = int(prefix.encode().hex(), 16) % 254
    for k in range(254):
        subnet = f"{SUBNET}.{1 + (start + k) % 254}"
        if f" {subnet}." not in used:
            return subnet
    raise ConfigError(f"no free {SUBNET}.N.0/24 subnet on this host for the cluster's nodes")


def make_network(prefix: str, workers: int) -> Network:
    """Create the bridge and one namespace per worker (1..``workers``); on failure, remove what
    was made."""
    if not (1 <= len(prefix) <= 8 and prefix.isalnum()):
        raise ConfigError(f"network prefix {prefix!r}: 1 to 8 letters or digits")
    net = Network(prefix, _free_subnet(prefix))
    try:
        _ip("link", "add", net.bridge, "type", "bridge")
        _ip("addr", "add", f"{net.head_ip}/24", "dev", net.bridge)
        _ip("link", "set", net.bridge, "up")
        for i in range(1, workers + 1):
            ns, inner, outer = net.namespace(i), net.inner_link(i), net.outer_link(i)
            _ip("netns", "add", ns)
            _ip("link", "add", outer, "type", "veth", "peer", "name", inner)
            _ip("link", "set", inner, "netns", ns)
            _ip("link", "set", outer, "master", net.bridge)
            _ip("link", "set", outer, "up")
            _ip("-n", ns, "addr", "add", f"{net.worker_ip(i)}/24", "dev", inner)
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "link", "set", inner, "up")
    except BaseException:
        remove_network(prefix)
        raise
    return net


def in_namespace(net: Network, index: int, argv: list[str]) -> list[str]:
    """``argv`` run inside worker ``index``'s namespace."""
    return ["ip", "netns", "exec", net.namespace(index), *argv]


def cut(net: Network, index: int) -> None:
    """Take worker ``index``'s link down: no packet in or out, its processes keep running."""
    _ip("-n", net.namespace(index), "link", "set", net.inner_link(index), "down")


def heal(net: Network, index: int) -> None:
    """Bring worker ``index``'s link up again."""
    _ip("-n", net.namespace(index), "link", "set", net.inner_link(index), "up")


def remove_network(prefix: str) -> None:
    """Delete every namespace ``<prefix>-w*`` and the bridge ``<prefix>b`` (the veth pairs go with
    their namespaces); what is already gone is skipped."""
    listed = _ip("netns", "list", check=False).stdout.split()
    for name in listed:
        if name.startswith(f"{prefix}-w"):
            _ip("netns", "del", name, check=False)
    _ip("link", "del", f"{prefix}b", check=False)
