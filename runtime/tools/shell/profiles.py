"""Sandbox profiles: the few read-only programs that need more than the default sandbox.

By default a command that runs unasked gets no network, no control socket
(container engines, D-Bus, systemd) and sees none of the hidden locations
(`runtime.tools.secrets`). A program named here needs one thing more for its
read-only use (a cluster client must reach its API server, a container client
its engine's socket), and gets exactly that. The classifier allow-lists these
programs' options so that no option can point them at another server or other
credentials (`policies`, `subcommands`).

The classifier names the profile a command needs (`Classification.sandbox_profile`);
the sandbox (`sandbox`) turns it into mounts and namespaces.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

# program name -> profile name. A command whose programs need two different
# profiles gets none (it runs without network, and the client fails cleanly).
PROGRAM_PROFILES: dict[str, str] = {
    "kubectl": "kubernetes",
    "helm": "kubernetes",
    "docker": "docker",
    "podman": "podman",
    "dig": "dns",
    "host": "dns",
    "nslookup": "dns",
    "systemctl": "systemd",
    # The other systemd tools ask the same managers over the same socket and D-Bus.
    **dict.fromkeys(
        ("loginctl", "timedatectl", "hostnamectl", "localectl", "systemd-analyze"), "systemd"
    ),
}

# Every container engine and service-manager socket a root process could use
# to start something outside the sandbox. The default profile covers each one
# (besides every socket found under /run, see `sandbox`); a profile below
# uncovers exactly the ones it names.
CONTROL_SOCKETS: tuple[str, ...] = (
    "/run/docker.sock",
    "/var/run/docker.sock",
    "/run/containerd/containerd.sock",
    "/run/containerd/containerd.sock.ttrpc",
    "/run/podman/podman.sock",
    "/run/crio/crio.sock",
    "/run/dbus/system_bus_socket",
    "/run/systemd/private",
    "/run/systemd/journal/socket",
    "/run/systemd/journal/stdout",
)


@dataclass(frozen=True)
class Profile:
    """What one profile adds to the default sandbox, and why."""

    name: str
    why: str
    # Keep the host's network namespace (the client talks TCP/UDP to a server).
    network: bool = False
    # Control sockets left visible (all others stay covered).
    sockets: tuple[str, ...] = ()
    # Make the kubeconfig ($KUBECONFIG, else ~/.kube/config) visible read-only.
    kubeconfig: bool = False


PROFILES: dict[str, Profile] = {
    "kubernetes": Profile(
        "kubernetes",
        "kubectl/helm read from the cluster's API server with the operator's kubeconfig; "
        "their options are allow-listed so no --server/--kubeconfig can redirect them",
        network=True,
        kubeconfig=True,
    ),
    "docker": Profile(
        "docker",
        "the docker client lists containers through the engine's socket (no network needed)",
        sockets=("/run/docker.sock", "/var/run/docker.sock"),
    ),
    "podman": Profile(
        "podman",
        "podman talks to its service socket when one is running",
        sockets=("/run/podman/podman.sock",),
    ),
    "dns": Profile(
        "dns",
        "dig/host/nslookup send DNS queries; the classifier keeps them to lookups",
        network=True,
    ),
    "systemd": Profile(
        "systemd",
        "systemctl status/list-units, loginctl, timedatectl, systemd-analyze blame ask the "
        "service manager and its daemons over its socket and D-Bus",
        sockets=("/run/systemd/private", "/run/dbus/system_bus_socket"),
    ),
}


# Programs that may share a command with a profile's own programs and leave it
# the profile: filters that read their input and print (`kubectl get pods | grep
# web`). Anything else beside them (`; cat <kubeconfig>`, `; ping 10.0.0.1`)
# would borrow the network or the credentials the profile gives, so such a
# command runs with the default sandbox instead (the client then fails cleanly).
PROFILE_COMPANIONS = frozenset(
    "grep egrep fgrep head tail sort uniq wc cut tr column cat nl tac fold fmt rev expand "
    "unexpand paste jq".split()
)


def profile_for(programs: Iterable[str]) -> str | None:
    """The one profile the given programs need, or None (none, or more than one)."""
    names = {
        PROGRAM_PROFILES[base]
        for p in programs
        if (base := os.path.basename(p)) in PROGRAM_PROFILES
    }
    return names.pop() if len(names) == 1 else None
