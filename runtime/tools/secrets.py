"""Where secrets live: the one list of secret locations.

Three layers use it, so it is kept in one place:

- the shell classifier (`runtime.tools.shell.paths.secret_reason`) treats a
  word that could name one of these as a possible secret read;
- the sandbox (`runtime.tools.shell.sandbox`) hides the concrete locations
  that exist on the host (`hidden_paths`);
- `read_file`/`list_dir` refuse them inside the workspace (`is_secret_path`).

Names are fnmatch patterns matched against one path component; directories
are components anywhere in a path; pairs are two adjacent components.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Iterable
from pathlib import Path, PurePath


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


# Directory components that hold credentials.
SECRET_DIRS = frozenset(
    {".ssh", ".gnupg", ".aws", ".azure", ".kube", ".docker", ".password-store", "sudoers.d",
     ".vault", ".gcloud", "keyrings"}
)  # fmt: skip
# Two adjacent components that hold credentials (`~/.config/gcloud`).
SECRET_DIR_PAIRS = frozenset({(".config", "gcloud"), (".config", "gh"), (".config", "hub")})
# File names (fnmatch patterns) that hold credentials.
SECRET_NAMES = _words(
    "id_rsa* id_dsa* id_ecdsa* id_ed25519* *.pem *.key *.p12 *.pfx *.kdbx *.jks *.keystore .env "
    ".env.* *.env .envrc .netrc _netrc .pgpass .git-credentials .npmrc .pypirc credentials "
    "credentials.json *credentials*.json .vault-token shadow shadow- gshadow gshadow- sudoers "
    "environ ssh_host_*_key .htpasswd master.key *.tfstate *.tfstate.backup kubeconfig .dockercfg "
    "service-account*.json .my.cnf secrets.yml secrets.yaml secrets.json *.ovpn authorized_keys "
    "known_hosts"
)
# Concrete samples, to test whether a glob (`~/.ss*/*`, `*.pe?`) could reach a secret.
SECRET_SAMPLES = _words(
    "id_rsa id_dsa id_ecdsa id_ed25519 x.pem x.key x.p12 x.pfx .env .env.local prod.env .netrc "
    ".pgpass .git-credentials .npmrc .pypirc credentials credentials.json .vault-token shadow "
    "gshadow sudoers environ x.tfstate .ssh .aws .gnupg .kube .docker"
)
# Whole directories that only hold secrets, hidden from sandboxed commands.
SECRET_ROOTS = ("/root", "/run/secrets", "/var/run/secrets")


def is_secret_name(component: str) -> bool:
    """Whether one literal path component is a secret file or credentials directory."""
    return component in SECRET_DIRS or any(
        fnmatch.fnmatchcase(component, pattern) for pattern in SECRET_NAMES
    )


def is_secret_path(path: PurePath | str) -> bool:
    """Whether a literal path has a secret name or runs through a credentials directory."""
    parts = [p for p in PurePath(path).parts if p not in ("/", "")]
    for i, part in enumerate(parts):
        if is_secret_name(part) or is_secret_name(part.lower()):
            return True
        if i + 1 < len(parts) and (part, parts[i + 1]) in SECRET_DIR_PAIRS:
            return True
    return False


def hidden_paths(home: str | None = None, extra: Iterable[str | Path] = ()) -> list[str]:
    """The concrete secret locations on this host a sandbox must hide, existing ones only.

    `home` defaults to the bot's `$HOME`; `extra` adds the bot's own files (the
    database's directory, the Matrix session files, its `.env`).
    """
    home = home if home is not None else os.path.expanduser("~")
    candidates: list[str] = list(SECRET_ROOTS)
    if home and home != "/":
        for name in sorted(SECRET_DIRS):
            candidates.append(os.path.join(home, name))
        for first, second in sorted(SECRET_DIR_PAIRS):
            candidates.append(os.path.join(home, first, second))
        try:
            entries = os.listdir(home)
        except OSError:
            entries = []
        candidates.extend(os.path.join(home, e) for e in sorted(entries) if is_secret_name(e))
    candidates.extend(str(p) for p in extra)
    out: list[str] = []
    for path in candidates:
        absolute = os.path.abspath(path)
        if absolute not in out and os.path.lexists(absolute):
            out.append(absolute)
    return out
