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
import glob
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path, PurePath


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


# Directory components that hold credentials (exact names).
SECRET_DIRS = frozenset(
    {".ssh", ".gnupg", ".aws", ".azure", ".kube", ".docker", ".password-store", "sudoers.d",
     ".vault", ".gcloud", "keyrings", ".oci", ".terraform.d", "serviceaccount",
     "ducklm-matrix", ".aliyun", ".oraclebm", ".bluemix", ".doctl", ".linode-cli",
     ".op", ".1password", ".mozilla", ".thunderbird", "wireguard", "system-connections"}
)  # fmt: skip
# Directory names by pattern: the bot's own Matrix session directory is
# `<database stem>-matrix` (`runtime.settings.Settings.matrix_state_dir`).
SECRET_DIR_PATTERNS = ("*-matrix",)
# Two adjacent components that hold credentials: a tool's directory and its
# credentials file or directory (`~/.config/gcloud`, `~/.m2/settings.xml`).
SECRET_DIR_PAIRS = frozenset(
    {(".config", "gcloud"), (".config", "gh"), (".config", "hub"), (".config", "doctl"),
     (".config", "rclone"), (".config", "heroku"), (".config", "git-credential-manager"),
     (".m2", "settings.xml"), (".m2", "settings-security.xml"),
     (".gradle", "gradle.properties"), (".cargo", "credentials"),
     (".cargo", "credentials.toml"), (".gem", "credentials"),
     ("ssl", "private"), ("security", "opasswd"), ("kubernetes", "pki"),
     ("kubelet", "pki"), ("kubernetes", "admin.conf"), ("docker", "key.json"),
     ("docker", "swarm"), ("kubernetes.io", "serviceaccount"), ("share", "keyrings")}
)  # fmt: skip
# File names (fnmatch patterns) that hold credentials.
SECRET_NAMES = _words(
    "id_rsa* id_dsa* id_ecdsa* id_ed25519* id_xmss* *.pem *.key *.p12 *.pfx *.kdbx *.jks "
    "*.keystore *.keytab *.ppk .env .env.* *.env .envrc .netrc _netrc .pgpass "
    ".git-credentials .npmrc .pypirc .yarnrc .yarnrc.yml .gemrc .s3cfg .boto .dockercfg "
    "credentials credentials.json credentials.toml credentials.tfrc.json *credentials*.json "
    ".vault-token shadow shadow- shadow~ gshadow gshadow- gshadow~ sudoers sudoers~ "
    "opasswd environ ssh_host_*_key .htpasswd master.key *.tfstate *.tfstate.backup "
    "kubeconfig service-account*.json .my.cnf .mylogin.cnf secrets.yml secrets.yaml "
    "secrets.json *.ovpn authorized_keys known_hosts ducklm.db ducklm.db-* session.json "
    ".bash_history .zsh_history .sh_history .history .python_history .psql_history "
    ".mysql_history .node_repl_history .lesshst .rediscli_history .sqlite_history "
    ".irb_history .php_history .wget-hsts .viminfo token chap-secrets pap-secrets "
    "ipsec.secrets debian.cnf gitlab-secrets.json k3s.yaml sasl_passwd user-data "
    "user-data.txt config.v2.json smbpasswd secrets.tdb passdb.tdb *kubeconfig* "
    "kube.conf kube.config"
)
# Concrete samples, to test whether a glob (`~/.ss*/*`, `*.pe?`) could reach a secret.
SECRET_SAMPLES = _words(
    "id_rsa id_dsa id_ecdsa id_ed25519 x.pem x.key x.p12 x.pfx x.keytab .env .env.local "
    "prod.env .netrc .pgpass .git-credentials .npmrc .pypirc .s3cfg .boto credentials "
    "credentials.json credentials.toml .vault-token shadow gshadow sudoers opasswd environ "
    "x.tfstate .ssh .aws .gnupg .kube .docker .azure .oci .my.cnf ducklm.db ducklm.db-wal "
    "session.json .bash_history .zsh_history .python_history .psql_history .mysql_history "
    ".node_repl_history token ssh_host_rsa_key master.key secrets.yaml k3s.yaml kubeconfig.yaml"
)
# Whole directories that only hold secrets, hidden from sandboxed commands.
SECRET_ROOTS = ("/root", "/run/secrets", "/var/run/secrets")
# Host files and directories outside any home that hold credentials. The
# sandbox hides the ones that exist (globs expanded): it runs as the bot's
# user, and a root bot's uid 0 reads mode-0600 files even without
# capabilities. The classifier reads them as paths (a glob such as `/etc/*`
# could reach one).
SYSTEM_SECRETS = (
    "/etc/shadow", "/etc/shadow-", "/etc/gshadow", "/etc/gshadow-", "/etc/sudoers",
    "/etc/sudoers.d", "/etc/ssl/private", "/etc/ssh/ssh_host_*_key", "/etc/security/opasswd",
    "/var/lib/kubelet/pki", "/etc/kubernetes/pki", "/etc/kubernetes/admin.conf",
    "/var/lib/docker/swarm", "/etc/docker/key.json", "/etc/krb5.keytab",
    "/var/run/secrets/kubernetes.io/serviceaccount/token", "/etc/rancher/k3s/k3s.yaml",
    "/var/lib/rancher/k3s/server/token", "/etc/kubernetes/kubelet.conf",
    "/etc/kubernetes/controller-manager.conf", "/etc/kubernetes/scheduler.conf",
    "/etc/mysql/debian.cnf", "/etc/wireguard", "/etc/NetworkManager/system-connections",
    "/etc/ppp/chap-secrets", "/etc/ppp/pap-secrets", "/etc/ipsec.secrets",
    "/etc/gitlab/gitlab-secrets.json", "/var/lib/docker/containers", "/var/lib/cloud/instance",
    "/var/lib/cloud/instances", "/etc/postfix/sasl_passwd", "/var/lib/samba/private",
    "/etc/letsencrypt/live", "/etc/letsencrypt/archive", "/etc/pki/tls/private",
    "/etc/kubernetes/*.conf", "/var/lib/kubelet/pods", "/var/lib/rancher/k3s/server",
    "/var/lib/containers/storage/secrets", "/var/lib/sss/secrets", "/var/lib/jenkins/secrets",
)  # fmt: skip
# Environment variables of the bot that name a credential file, directory or
# socket somewhere the names above cannot predict (`KUBECONFIG=/srv/k/prod.yaml`).
# The classifier treats their paths as secret locations and the sandbox hides
# them, both reading the bot's own environment (`credential_env_paths`).
# Path lists (`:`-separated) only where the tool itself reads a list.
CREDENTIAL_ENV_VARS = (
    "KUBECONFIG", "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE",
    "GOOGLE_APPLICATION_CREDENTIALS", "CLOUDSDK_CONFIG", "AZURE_CONFIG_DIR", "DOCKER_CONFIG",
    "REGISTRY_AUTH_FILE", "PGPASSFILE", "NETRC", "BOTO_CONFIG", "TF_CLI_CONFIG_FILE",
    "NPM_CONFIG_USERCONFIG", "VAULT_CONFIG_PATH", "SSH_AUTH_SOCK", "GNUPGHOME",
    "PASSWORD_STORE_DIR", "KRB5CCNAME", "KRB5_KTNAME", "HELM_REGISTRY_CONFIG",
)  # fmt: skip
_PATH_LIST_VARS = frozenset({"KUBECONFIG"})


def credential_env_paths(environ: Mapping[str, str], *, skip: Iterable[str] = ()) -> list[str]:
    """Absolute paths the credential variables of `environ` name (existing or not).

    `skip` leaves variables out (the kubernetes profile keeps $KUBECONFIG's
    files for kubectl). `KRB5CCNAME=FILE:/tmp/krb5cc_1000` names its file after
    the type prefix; a non-file cache type (`KEYRING:`) names no path.
    """
    skipped = set(skip)
    out: list[str] = []
    for name in CREDENTIAL_ENV_VARS:
        value = environ.get(name, "")
        if name in skipped or not value:
            continue
        parts = value.split(":") if name in _PATH_LIST_VARS else [value]
        for part in parts:
            if name.startswith("KRB5") and ":" in part:
                kind, _, rest = part.partition(":")
                part = rest if kind in ("FILE", "DIR", "WRFILE") else ""
            if part and os.path.abspath(part) not in out:
                out.append(os.path.abspath(part))
    return out


# Concrete secret paths to test a path glob against, component by component
# (`/etc/*` reaches `/etc/shadow`; `~/*` does not reach `~/.ssh`).
SECRET_PATH_SAMPLES = (
    *(p.replace("*", "rsa") for p in SYSTEM_SECRETS),
    "/proc/kcore", "/dev/mem", "/dev/kmem", "/dev/port",
    "/root/.bash_history", "/run/secrets/token", "~/.ssh/id_rsa", "~/.aws/credentials",
    "~/.netrc", "~/.pgpass", "~/.kube/config", "~/.docker/config.json", "~/.bash_history",
    "~/.config/gh/hosts.yml", "~/.local/share/keyrings/login.keyring", "~/.m2/settings.xml",
    "~/.cargo/credentials.toml", "~/.gem/credentials", "~/.s3cfg", "~/.my.cnf",
)  # fmt: skip


# Every name pattern as one regular expression: the classifier asks for each word.
_SECRET_NAME_RE = re.compile(
    "|".join(fnmatch.translate(p) for p in (*SECRET_NAMES, *SECRET_DIR_PATTERNS))
)


def secret_name_matches(component: str) -> bool:
    """Whether one component matches a secret file-name pattern (not the directory names)."""
    return _SECRET_NAME_RE.match(component) is not None


def is_secret_name(component: str) -> bool:
    """Whether one literal path component is a secret file or credentials directory."""
    return component in SECRET_DIRS or _SECRET_NAME_RE.match(component) is not None


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
    for pattern in SYSTEM_SECRETS:
        candidates.extend(sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern])
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
