"""Two "hosts" on one machine: Linux network namespaces joined by a veth pair, each with its
own network stack and address, so torchrun's rendezvous, the store and gloo cross a real
(virtual) link. Needs root and iproute2; `two_hosts()` skips the test with the reason otherwise.

Only the namespaces made here are touched: their names carry this process's id, their
addresses are a private /24 that exists only inside them, and they are deleted (with every
process still running in them) on the way out, also when the test fails.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest

SUBNET = "10.77.0"          # a /24 that exists only inside the namespaces made here


class NetnsError(RuntimeError):
    """An `ip` command failed while making or removing the namespaces."""


@dataclass(frozen=True)
class Host:
    namespace: str
    interface: str              # this host's end of the veth pair (GLOO_SOCKET_IFNAME), inside its namespace
    address: str

    def command(self, *args: str) -> list[str]:
        """args run inside this host's namespace (with the caller's environment)."""
        return ["ip", "netns", "exec", self.namespace, *args]

    def pids(self) -> list[int]:
        listed = subprocess.run(["ip", "netns", "pids", self.namespace], capture_output=True, text=True)
        return [int(pid) for pid in listed.stdout.split()]

    def kill_all(self) -> None:
        """SIGKILL every process in this namespace: the machine is gone, nothing shuts down cleanly."""
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def cut_link(self) -> None:
        """Take this host's interface down: from then on nothing it sends arrives anywhere."""
        ip("netns", "exec", self.namespace, "ip", "link", "set", self.interface, "down")


def ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if done.returncode:
        raise NetnsError(f"ip {' '.join(args)}: {done.stderr.strip()}")


def skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root (CI runs as root)"
    if shutil.which("ip") is None:
        return "iproute2's `ip` command is not installed"
    return None


INTERFACE = "eth0"          # each host's end of the veth pair, named as on a real machine


def make_hosts(tag: str) -> tuple[Host, Host]:
    hosts = tuple(Host(f"ds-{tag}-{side}", INTERFACE, f"{SUBNET}.{number}") for number, side in ((1, "a"), (2, "b")))
    # Made under names unique on this machine, renamed eth0 once inside their own namespaces.
    ends = [f"ds{tag}{side}" for side in ("a", "b")]
    for host in hosts:
        ip("netns", "add", host.namespace)
    ip("link", "add", ends[0], "type", "veth", "peer", "name", ends[1])
    for host, end in zip(hosts, ends):
        ip("link", "set", end, "netns", host.namespace)
        run = ("netns", "exec", host.namespace, "ip")
        ip(*run, "link", "set", end, "name", host.interface)
        ip(*run, "addr", "add", f"{host.address}/24", "dev", host.interface)
        ip(*run, "link", "set", host.interface, "up")
        ip(*run, "link", "set", "lo", "up")   # torchrun's agent talks to its own workers over loopback
    return hosts


def remove_hosts(tag: str) -> None:
    """Kill what still runs in the namespaces, then delete them (the veth pair goes with them)."""
    for side in ("a", "b"):
        namespace = f"ds-{tag}-{side}"
        host = Host(namespace, "", "")
        if subprocess.run(["ip", "netns", "pids", namespace], capture_output=True).returncode == 0:
            host.kill_all()
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True)


@contextmanager
def two_hosts() -> Iterator[tuple[Host, Host]]:
    """Two namespaces joined by a veth pair: (host a at SUBNET.1, host b at SUBNET.2)."""
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    tag = str(os.getpid())
    try:
        try:
            hosts = make_hosts(tag)
        except NetnsError as error:
            pytest.skip(f"cannot make network namespaces here: {error}")
        yield hosts
    finally:   # also after a half-made pair or a failed test: nothing of ours stays behind
        remove_hosts(tag)
