"""Test hosts on one machine: network namespaces on a bridge, made and removed by a test.

Each host is a network namespace with its own address, joined to a bridge in the test's
own namespace by a veth pair; the test reaches every host (and the hosts reach the
test's services) through the bridge's address. ``partition`` takes a host's link down,
``heal`` brings it back. Everything is named after the test process, so two runs never
share a name, and ``close`` removes it all.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tests.toolchains import missing

#: The test hosts' subnet (their addresses exist only inside the namespaces a test makes).
SUBNET = ipaddress.ip_network("10.213.15.0/24")


def ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


@dataclass(frozen=True)
class Host:
    namespace: str
    address: str
    link: str
    """The veth end in the test's namespace (on the bridge)."""

    def command(self, *argv: str) -> list[str]:
        """``argv`` run inside this host's namespace."""
        return ["ip", "netns", "exec", self.namespace, *argv]


@dataclass
class Network:
    bridge: str
    address: str
    """The bridge's address: the test's own, as the hosts see it."""
    hosts: list[Host] = field(default_factory=list)

    def add_host(self) -> Host:
        index = len(self.hosts) + 1
        tag = f"{os.getpid() % 100000}h{index}"
        host = Host(
            namespace=f"sluice-test-{tag}",
            address=str(SUBNET.network_address + 10 + index),
            link=f"slv{tag}",
        )
        peer = f"slp{tag}"
        ip("netns", "add", host.namespace)
        self.hosts.append(host)
        ip("link", "add", host.link, "type", "veth", "peer", "name", peer)
        ip("link", "set", peer, "netns", host.namespace)
        ip("-n", host.namespace, "link", "set", peer, "name", "eth0")
        ip("-n", host.namespace, "addr", "add", f"{host.address}/{SUBNET.prefixlen}", "dev", "eth0")
        ip("-n", host.namespace, "link", "set", "eth0", "up")
        ip("-n", host.namespace, "link", "set", "lo", "up")
        ip("link", "set", host.link, "master", self.bridge)
        ip("link", "set", host.link, "up")
        return host

    def partition(self, host: Host) -> None:
        """Cut the host off: its link goes down (no packet in or out, no reset sent)."""
        ip("link", "set", host.link, "down")

    def heal(self, host: Host) -> None:
        ip("link", "set", host.link, "up")

    def close(self) -> None:
        for host in self.hosts:
            with contextlib.suppress(RuntimeError):
                ip("link", "del", host.link)
            with contextlib.suppress(RuntimeError):
                ip("netns", "del", host.namespace)
        with contextlib.suppress(RuntimeError):
            ip("link", "del", self.bridge)


def _remove_leftovers() -> None:
    """Remove the bridge, links and namespaces of an earlier run that was killed before it
    could (named after a process that no longer exists)."""
    done = subprocess.run(["ip", "-j", "link"], capture_output=True, text=True, check=False)
    for link in json.loads(done.stdout or "[]"):
        name = str(link.get("ifname", ""))
        owner = name[3:].split("h")[0]
        if name[:3] in ("slb", "slv") and owner.isdigit() and not Path(f"/proc/{owner}").exists():
            with contextlib.suppress(RuntimeError):
                ip("link", "del", name)
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False)
    for line in listed.stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        owner = name.removeprefix("sluice-test-").split("h")[0]
        gone = owner.isdigit() and not Path(f"/proc/{owner}").exists()
        if name.startswith("sluice-test-") and gone:
            with contextlib.suppress(RuntimeError):
                ip("netns", "del", name)


def _subnet_in_use() -> bool:
    done = subprocess.run(["ip", "-j", "route"], capture_output=True, text=True, check=False)
    for route in json.loads(done.stdout or "[]"):
        destination = route.get("dst", "")
        if destination and destination != "default":
            with contextlib.suppress(ValueError):
                if ipaddress.ip_network(destination, strict=False).overlaps(SUBNET):
                    return True
    return False


@contextlib.contextmanager
def make_network(hosts: int) -> Iterator[Network]:
    """A bridge on ``SUBNET`` joined by ``hosts`` hosts; skipped (failed where tools are
    required) when this machine does not let the test make namespaces and links."""
    if shutil.which("ip") is None:
        missing("needs the ip command (Debian: apt-get install iproute2)")
    if os.geteuid() != 0:
        missing("needs root to make network namespaces (ip netns)")
    _remove_leftovers()
    if _subnet_in_use():
        missing(f"the test hosts' subnet {SUBNET} is already routed on this machine")
    network = Network(bridge=f"slb{os.getpid() % 100000}", address=str(SUBNET.network_address + 1))
    try:
        ip("link", "add", network.bridge, "type", "bridge")
        ip("addr", "add", f"{network.address}/{SUBNET.prefixlen}", "dev", network.bridge)
        ip("link", "set", network.bridge, "up")
        for _ in range(hosts):
            network.add_host()
    except RuntimeError as exc:
        network.close()
        missing(f"this machine does not let the test make network namespaces: {exc}")
    try:
        yield network
    finally:
        network.close()
