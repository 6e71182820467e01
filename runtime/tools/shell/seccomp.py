"""A seccomp filter for sandboxed commands: what namespaces cannot take away.

Mount and PID namespaces hide files and processes, but two doors stay open to
a command running as the bot's user:

- unix sockets anywhere on disk (`/var/snap/lxd/common/lxd/unix.socket`,
  a kubelet's, a docker socket the operator moved): connecting to one works
  through a read-only mount, and several give root. The sandbox covers the
  sockets it can find under /run; this filter refuses `socket(AF_UNIX)` and
  `socketpair(AF_UNIX)` for every profile that needs no control socket, so the
  ones nobody can predict are out of reach too;
- the kernel keyring (`add_key`, `keyctl`, `request_key`): keyrings belong to
  the user, not to a mount or PID namespace, so a root bot's sandboxed command
  would read root's keys (Kerberos `KEYRING:` caches, cryptsetup passphrases).
  Docker's default profile refuses the same calls for the same reason.

`io_uring_setup` is refused as well: io_uring operations (a socket connect
among them) are not seen by seccomp. The filter is built with libseccomp
(`pyseccomp`, a ctypes binding), compiled once per kind, and handed to bwrap
(`--seccomp FD`) as a fresh memfd per command, since bwrap reads the program
from the descriptor's current offset. Syscalls of a foreign architecture (a
32-bit binary's `socketcall`) are killed: libseccomp's default for an
architecture the filter does not name.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import tempfile

logger = logging.getLogger("ducklm.tools")

_AF_UNIX = 1
# Calls refused for every profile, with EPERM (programs treat it as "not allowed").
_ALWAYS_REFUSED = ("add_key", "keyctl", "request_key", "io_uring_setup")


@functools.cache
def program(*, unix_sockets: bool) -> bytes | None:
    """The compiled BPF program, or None where libseccomp is not available.

    `unix_sockets` keeps AF_UNIX sockets (the docker, podman and systemd
    profiles talk to their control socket).
    """
    try:
        import pyseccomp
    except (ImportError, OSError) as exc:  # OSError: libseccomp.so.2 missing
        logger.warning("no seccomp filter for the sandbox: %s", exc)
        return None
    try:
        f = pyseccomp.SyscallFilter(pyseccomp.ALLOW)
        for name in _ALWAYS_REFUSED:
            f.add_rule(pyseccomp.ERRNO(errno.EPERM), name)
        if not unix_sockets:
            for name in ("socket", "socketpair"):
                f.add_rule(
                    pyseccomp.ERRNO(errno.EAFNOSUPPORT),
                    name,
                    pyseccomp.Arg(0, pyseccomp.EQ, _AF_UNIX),
                )
        # libseccomp writes to a descriptor: a temporary file, read back.
        with tempfile.TemporaryFile() as out:
            f.export_bpf(out)
            out.seek(0)
            code = out.read()
    except Exception as exc:  # any libseccomp failure means "no filter"
        logger.warning("could not build the sandbox's seccomp filter: %s", exc)
        return None
    return code or None


def available() -> bool:
    """Whether sandboxed commands get the filter on this host."""
    return program(unix_sockets=False) is not None


def descriptor(*, unix_sockets: bool) -> int | None:
    """A fresh readable descriptor holding the program (the caller closes it), or None."""
    code = program(unix_sockets=unix_sockets)
    if code is None:
        return None
    fd = os.memfd_create("ducklm-seccomp", os.MFD_CLOEXEC)
    os.write(fd, code)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd
