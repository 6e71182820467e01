"""Sandbox profiles: the few read-only programs that need more than the default sandbox.

By default a command that runs unasked gets no network and sees none of the
hidden locations (`runtime.tools.secrets`). A program named here needs one
thing more for its read-only use (a cluster client must reach its API server,
a container client its engine's socket), and gets exactly that. The
classifier allow-lists these programs' options so that no option can point
them at another server or other credentials (`policies`, `subcommands`).

The classifier names the profile a command needs (`Classification.sandbox_profile`);
the sandbox (`sandbox`) turns it into mounts and namespaces.
"""

from __future__ import annotations

from collections.abc import Iterable

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
}


def profile_for(programs: Iterable[str]) -> str | None:
    """The one profile the given programs need, or None (none, or more than one)."""
    names = {PROGRAM_PROFILES[p] for p in programs if p in PROGRAM_PROFILES}
    return names.pop() if len(names) == 1 else None
