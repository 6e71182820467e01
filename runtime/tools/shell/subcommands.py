"""Read-only policies for programs with subcommand grammars: git, kubectl, docker, …

Each policy is an allow-list: global options, then a read-only verb, then that
verb's options; anything not listed needs approval. Moved out of `policies`
so the subcommand programs live in one module.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from runtime.tools.shell.options import _long_hit, _opts, getopt, has_flag
from runtime.tools.shell.paths import _outside_workspace
from runtime.tools.shell.programs import NETWORK_PROGRAMS, PROCESS_PROGRAMS
from runtime.tools.shell.verdict import Verdict, _cap


def _approval(action: str, risk: str, reason: str) -> Verdict:
    return Verdict(action, risk, reason)


# `ip` objects (exact spellings ip resolves to a read-only object) and verbs.
_IP_OBJECTS = frozenset(
    {"a", "ad", "addr", "address", "r", "ro", "rou", "rout", "route", "l", "li", "lin", "link",
     "n", "ne", "nei", "neig", "neigh", "neighbor", "neighbour", "ru", "rul", "rule", "ma",
     "maddr", "maddress", "netconf"}
)  # fmt: skip
_IP_VERBS = frozenset({"show", "list", "lst", "ls"})


def _policy_ip(argv: list[str]) -> Verdict | None:
    i = 1
    ok_opts = {"-s", "-stats", "-statistics", "-d", "-details", "-br", "-brief", "-4", "-6",
               "-c", "-color", "-j", "-json", "-p", "-pretty", "-o", "-oneline", "-h", "-human",
               "-human-readable", "-N", "-numeric", "-a", "-all", "-t", "-timestamp",
               "-ts", "-tshort"}  # fmt: skip
    while i < len(argv) and argv[i].startswith("-"):
        if argv[i].split("=")[0] not in ok_opts:
            return _approval("network", "high", f"`ip {argv[i]}` needs approval")
        i += 1
    if i >= len(argv):
        return None
    obj = argv[i]
    if obj not in _IP_OBJECTS:
        return _approval("network", "high", NETWORK_PROGRAMS["ip"])
    if i + 1 >= len(argv):
        return None
    verb = argv[i + 1]
    if verb in _IP_VERBS or (verb == "get" and obj in ("r", "ro", "rou", "rout", "route")):
        return None
    if verb in ("dev",) and obj not in ("r", "ro", "rou", "rout", "route"):
        return None  # `ip addr dev eth0` = show
    return _approval("network", "high", NETWORK_PROGRAMS["ip"])


def _first_positional(
    argv: list[str], flags: Sequence[str], values: Sequence[str]
) -> tuple[int | None, str | None]:
    """Index of the first positional (the verb); options before it must be known."""
    opts = getopt(argv, flags=flags, values=values, stop_at_positional=True, long_abbrev=False)
    if opts.error:
        return None, opts.error
    return (opts.positionals[0] if opts.positionals else None), None


_SYSTEMCTL_READ = frozenset(
    {"status", "show", "list-units", "list-unit-files", "list-timers", "list-sockets",
     "list-dependencies", "list-jobs", "list-machines", "list-automounts", "list-paths",
     "is-active", "is-enabled", "is-failed", "is-system-running", "cat", "help",
     "get-default", "--version"}
)  # fmt: skip
_SYSTEMCTL_FLAGS = _opts(
    "-a --all -l --full --no-pager --no-legend -q --quiet --user --system --failed -r --recursive "
    "--plain --value --no-ask-password --reverse --after --before --show-types -i "
    "--ignore-inhibitors --global --version -h --help"
)
_SYSTEMCTL_VALUES = _opts(
    "-t --type -p --property -P -H --host -M --machine -n --lines -o --output --state --root"
)


def _policy_systemctl(argv: list[str]) -> Verdict | None:
    idx, err = _first_positional(argv, _SYSTEMCTL_FLAGS, _SYSTEMCTL_VALUES)
    if err:
        return _approval("process", "high", f"`systemctl` with an {err} needs approval")
    if idx is None:
        return None  # bare `systemctl` lists units
    if argv[idx] in _SYSTEMCTL_READ:
        if has_flag(argv, "", {"--now"}) or (argv[idx] == "help" and len(argv) > idx + 2):
            return _approval("process", "high", PROCESS_PROGRAMS["systemctl"])
        return None
    return _approval("process", "high", f"`systemctl {argv[idx]}` changes services")


_KUBECTL_GLOBAL_VALUES = _opts(
    "-n --namespace --context --cluster --user --kubeconfig -s --server --as --as-group "
    "--as-uid --request-timeout --cache-dir --tls-server-name -v --v --certificate-authority "
    "--client-certificate --client-key --token -o --output -l --selector"
)
_KUBECTL_GLOBAL_FLAGS = _opts(
    "-A --all-namespaces --insecure-skip-tls-verify -h --help --warnings-as-errors "
    "--match-server-version"
)
_KUBECTL_READ = frozenset(
    {"get", "describe", "logs", "top", "version", "explain", "api-resources", "api-versions",
     "cluster-info", "events"}
)  # fmt: skip
_KUBECTL_SUB_READ = {
    "config": frozenset({"view", "get-contexts", "current-context", "get-clusters", "get-users"}),
    "auth": frozenset({"can-i", "whoami"}),
    "rollout": frozenset({"status", "history"}),
}


def _policy_kubectl(argv: list[str]) -> Verdict | None:
    if any(a.split("=")[0] == "--kubeconfig" for a in argv[1:]):
        # a kubeconfig can name an exec credential plugin: a program kubectl runs
        return _approval("process", "high", "`kubectl --kubeconfig` can make kubectl run a program")
    idx, err = _first_positional(argv, _KUBECTL_GLOBAL_FLAGS, _KUBECTL_GLOBAL_VALUES)
    mutate = _approval("process", "high", PROCESS_PROGRAMS["kubectl"])
    if err:
        return _approval("process", "high", f"`kubectl` with an {err} needs approval")
    if idx is None:
        return None
    verb = argv[idx]
    rest = argv[idx + 1 :]
    if verb in _KUBECTL_SUB_READ:
        sub = next((a for a in rest if not a.startswith("-")), None)
        if sub not in _KUBECTL_SUB_READ[verb]:
            return mutate
        if verb == "config" and any(a.split("=")[0] in ("--raw", "--flatten") for a in rest):
            return _approval("read", "high", "`kubectl config view --raw` prints credentials")
        if verb == "rollout" and has_flag(["x", *rest], "w", {"--watch"}):
            return _approval("process", "medium", "`kubectl rollout status -w` may never end")
        return None
    if verb not in _KUBECTL_READ:
        return _approval(
            "process", "high", f"`kubectl {verb}` changes the cluster or runs something in it"
        )
    if verb == "cluster-info" and any(a.startswith("--output-directory") for a in rest):
        return _approval(
            "write", "medium", "`kubectl cluster-info dump --output-directory` writes files"
        )
    if verb in ("logs", "events") and has_flag(["x", *rest], "fw", {"--follow", "--watch"}):
        return _approval("process", "medium", f"`kubectl {verb} -f` follows forever")
    if verb == "get" and has_flag(["x", *rest], "w", {"--watch", "--watch-only"}):
        return _approval("process", "medium", "`kubectl get -w` watches forever")
    if verb in ("get", "describe") and any("secret" in a.lower() for a in rest):
        return _approval("read", "high", "reading Kubernetes secrets exposes credentials")
    return None


_DOCKER_GLOBAL_VALUES = _opts(
    "-H --host --context -c --config -l --log-level --tlscacert --tlscert --tlskey"
)
_DOCKER_GLOBAL_FLAGS = ("-D", "--debug", "--tls", "--tlsverify", "-v", "--version")
_DOCKER_READ = frozenset(
    {"ps", "images", "logs", "inspect", "stats", "version", "info", "top", "port", "diff",
     "history", "search"}
)  # fmt: skip
_DOCKER_SUB_READ = {
    "container": frozenset({"ls", "list", "ps", "inspect", "logs", "top", "port", "diff", "stats"}),
    "image": frozenset({"ls", "list", "inspect", "history"}),
    "network": frozenset({"ls", "list", "inspect"}),
    "volume": frozenset({"ls", "list", "inspect"}),
    "system": frozenset({"df", "info"}),
    "context": frozenset({"ls", "list", "inspect", "show"}),
    "compose": frozenset({"ps", "ls", "images", "top", "version", "logs"}),
}


def _policy_docker(argv: list[str]) -> Verdict | None:
    name = argv[0]
    idx, err = _first_positional(argv, _DOCKER_GLOBAL_FLAGS, _DOCKER_GLOBAL_VALUES)
    if err:
        return _approval("process", "high", f"`{name}` with an {err} needs approval")
    if idx is None:
        return None
    verb = argv[idx]
    rest = argv[idx + 1 :]
    if verb in _DOCKER_SUB_READ:
        sub = next((a for a in rest if not a.startswith("-")), None)
        if sub not in _DOCKER_SUB_READ[verb]:
            return _approval(
                "process",
                "high",
                f"`{name} {verb} {sub or ''}`".strip() + " changes containers or images",
            )
        verb = sub
    elif verb not in _DOCKER_READ:
        return _approval("process", "high", f"`{name} {verb}` changes containers or images")
    if verb == "logs" and has_flag(["x", *rest], "f", {"--follow"}):
        return _approval("process", "medium", f"`{name} logs -f` follows forever")
    if verb == "stats" and "--no-stream" not in rest:
        return _approval("process", "medium", f"`{name} stats` without `--no-stream` never ends")
    return None


_GIT_GLOBAL_FLAGS = _opts(
    "--no-pager -P --bare --no-replace-objects --literal-pathspecs --glob-pathspecs "
    "--noglob-pathspecs --icase-pathspecs --no-optional-locks --version"
)
_GIT_GLOBAL_VALUES = ("-C", "--git-dir", "--work-tree", "--namespace")
GIT_READ = frozenset(
    {"status", "log", "diff", "show", "rev-parse", "blame", "annotate", "ls-files", "ls-tree",
     "grep", "describe", "shortlog", "cat-file", "rev-list", "show-ref", "show-branch",
     "name-rev", "merge-base", "for-each-ref", "whatchanged", "count-objects", "check-ignore",
     "check-attr", "cherry", "range-diff", "version", "var", "diff-tree", "diff-files",
     "diff-index", "verify-commit", "verify-tag"}
)  # fmt: skip
# Options that write files, run programs or reach other repositories, on any git subcommand.
GIT_FORBIDDEN_LONG = frozenset(
    {"--output", "--ext-diff", "--upload-pack", "--receive-pack", "--exec",
     "--open-files-in-pager", "--config-env", "--exec-path", "--paginate"}
)  # fmt: skip
_GIT_BRANCH_FLAGS = _opts(
    "-a --all -r --remotes -l --list -v -vv --verbose --show-current --color --no-color --column "
    "--no-column -i --ignore-case --omit-empty"
)
_GIT_BRANCH_VALUES = _opts(
    "--contains --no-contains --merged --no-merged --points-at --sort --format --abbrev"
)
_GIT_TAG_FLAGS = _opts("-l --list --column --no-column -i --ignore-case --color --omit-empty")
_GIT_TAG_VALUES = _opts("--contains --no-contains --merged --no-merged --points-at --sort --format")
_GIT_CONFIG_READ = _opts(
    "--get --get-all --get-regexp --list -l --get-urlmatch --get-color --get-colorbool"
)
_GIT_CONFIG_FLAGS = (*_GIT_CONFIG_READ, "--show-origin", "--show-scope", "--global", "--local",
                     "--system", "--worktree", "--name-only", "-z", "--null", "--includes",
                     "--no-includes", "--bool", "--int", "--path")  # fmt: skip
_GIT_CONFIG_VALUES = ("-f", "--file", "--blob", "--type", "--default")
# Local repository changes: ordinary workspace writes (medium).
GIT_LOCAL_WRITES = frozenset(
    _opts(
        "add rm mv commit reset checkout switch restore clean merge cherry-pick revert stash "
        "tag branch init am apply notes gc prune pull fetch clone remote config worktree reflog"
    )
)
_GIT_WRITE_REASONS = {
    "push": ("network", "high", "`git push` publishes commits to a remote"),
    "commit": ("write", "medium", "`git commit` records changes"),
    "reset": ("write", "medium", "`git reset` moves the branch and can discard changes"),
    "clean": ("write", "medium", "`git clean` deletes untracked files"),
    "checkout": ("write", "medium", "`git checkout` changes the working tree"),
    "switch": ("write", "medium", "`git switch` changes the working tree"),
    "restore": ("write", "medium", "`git restore` discards changes"),
    "pull": ("network", "medium", "`git pull` fetches and changes the working tree"),
    "fetch": ("network", "medium", "`git fetch` downloads from a remote"),
    "clone": ("network", "medium", "`git clone` downloads a repository"),
    "config": ("write", "high", "`git config` changes settings that can make git run programs"),
    "rebase": ("write", "medium", "`git rebase` rewrites commits"),
}


def _policy_git(argv: list[str]) -> Verdict | None:
    for arg in argv[1:]:
        if arg.startswith("--") and _long_hit(arg, GIT_FORBIDDEN_LONG):
            return _approval(
                "process", "high", f"`git {arg.split('=')[0]}` can write files or run programs"
            )
    # -c / --config-env: any config can name a program (core.pager, diff.external, …)
    opts = getopt(
        argv,
        flags=_GIT_GLOBAL_FLAGS,
        values=_GIT_GLOBAL_VALUES,
        stop_at_positional=True,
        long_abbrev=False,
    )
    if opts.error or not opts.positionals:
        if not opts.error and opts.has("--version"):
            return None
        why = (
            "`git -c` sets config that can run programs"
            if any(a.startswith("-c") for a in argv[1:])
            else f"`git` with an {opts.error or 'no subcommand'} needs approval"
        )
        return _approval("process", "high", why)
    idx = opts.positionals[0]
    sub, rest = argv[idx], argv[idx + 1 :]
    sub_argv = [f"git {sub}", *rest]
    if sub in GIT_READ:
        if sub == "grep" and has_flag(sub_argv, "O", {"--open-files-in-pager"}):
            return _approval("process", "high", "`git grep -O` runs a pager program")
        return None
    mutate = Verdict(
        *_GIT_WRITE_REASONS.get(sub, ("write", "medium", f"`git {sub}` changes the repository"))
    )
    if sub == "rebase" and has_flag(sub_argv, "x", {"--exec"}):
        return Verdict("process", "high", "`git rebase --exec` runs commands")
    elsewhere = [v for v in opts.values("-C", "--git-dir", "--work-tree") if _outside_workspace(v)]
    if elsewhere and mutate.risk == "medium":
        mutate = Verdict(mutate.action, "high", f"{_cap(mutate.reason)} in `{elsewhere[0]}`")
    if sub == "branch":
        o = getopt(sub_argv, flags=_GIT_BRANCH_FLAGS, values=_GIT_BRANCH_VALUES)
        if o.error or (o.positionals and not o.has("-l", "--list")):
            return Verdict("write", "medium", "`git branch` with those arguments changes branches")
        return None
    if sub == "tag":
        ok_n = [a for a in rest if re.fullmatch(r"-n\d*", a)]
        o = getopt(
            [sub_argv[0], *[a for a in rest if a not in ok_n]],
            flags=_GIT_TAG_FLAGS,
            values=_GIT_TAG_VALUES,
        )
        if o.error or (o.positionals and not o.has("-l", "--list")):
            return Verdict("write", "medium", "`git tag` with those arguments changes tags")
        return None
    if sub == "remote":
        if all(a in ("-v", "--verbose") for a in rest):
            return None
        pos = [a for a in rest if a not in ("-v", "--verbose")]
        if (
            pos
            and pos[0] in ("show", "get-url")
            and all(not a.startswith("-") or a in ("-n", "--push", "--all") for a in pos[1:])
        ):
            return None
        return Verdict("write", "medium", "`git remote` with those arguments changes remotes")
    if sub == "config":
        o = getopt(sub_argv, flags=_GIT_CONFIG_FLAGS, values=_GIT_CONFIG_VALUES)
        if not o.error and o.has(*_GIT_CONFIG_READ):
            return None
        if (
            rest
            and rest[0] in ("get", "list")
            and not any(a.split("=")[0] in ("--edit", "-e") for a in rest)
        ):
            return None
        return mutate
    if sub == "stash":
        if rest[:1] in (["list"], ["show"]):
            return None
        return Verdict("write", "medium", "`git stash` changes the working tree")
    if sub == "reflog":
        pos = [a for a in rest if not a.startswith("-")]
        if not pos or pos[0] not in ("expire", "delete", "drop"):
            return None
        return Verdict("write", "medium", "`git reflog expire/delete` removes history")
    if sub == "worktree":
        if rest[:1] == ["list"]:
            return None
        return Verdict("write", "medium", "`git worktree` changes worktrees")
    if sub in _GIT_WRITE_REASONS or sub in GIT_LOCAL_WRITES:
        return mutate
    # daemon, submodule foreach, bisect run, credential, aliases …: can run anything
    return Verdict("unknown", "high", f"`git {sub}` is not a git command known to be safe")


_PACKAGE_READ: dict[str, frozenset[str]] = {
    "apt": frozenset({"list", "show", "search", "policy", "depends", "rdepends"}),
    "apt-cache": frozenset(
        {
            "policy",
            "show",
            "search",
            "depends",
            "rdepends",
            "madison",
            "showpkg",
            "pkgnames",
            "stats",
            "showsrc",
        }
    ),
    "pip": frozenset({"list", "show", "freeze", "check"}),
    "pip3": frozenset({"list", "show", "freeze", "check"}),
    "npm": frozenset({"ls", "list", "view", "outdated"}),
    "brew": frozenset({"list", "info", "outdated"}),
    "snap": frozenset({"list", "info"}),
    "flatpak": frozenset({"list", "info"}),
}


def _policy_package(argv: list[str]) -> Verdict | None:
    name = argv[0]
    install = _approval("package", "high", f"`{name}` installs, removes or changes packages")
    if argv[1:] in (["--version"], ["-V"], ["-v"]):
        return None
    if name == "dpkg":
        query = {"-l", "--list", "-L", "--listfiles", "-s", "--status", "-S", "--search", "-p",
                 "--print-avail", "--get-selections", "--print-architecture"}  # fmt: skip
        if len(argv) > 1 and argv[1] in query:
            return None
        return install
    if name == "rpm":
        if (
            len(argv) > 1
            and re.fullmatch(r"-q[a-zA-Z]*", argv[1])
            and not has_flag(argv, "E", {"--eval", "--scripts"})
        ):
            return None
        return install
    if name == "pacman":
        if len(argv) > 1 and re.fullmatch(r"-Q[a-zA-Z]*", argv[1]):
            return None
        return install
    reads = _PACKAGE_READ.get(name)
    if reads and len(argv) > 1 and argv[1] in reads:
        return None
    return install


def _policy_dpkg_query(argv: list[str]) -> Verdict | None:
    return None


# Read-only subcommands of systemd's *ctl tools, with no options before the verb.
_CTL_READ = {
    "timedatectl": frozenset({"status", "show", "list-timezones", "timesync-status"}),
    "hostnamectl": frozenset({"status", "show"}),
    "localectl": frozenset({"status", "list-locales", "list-keymaps"}),
    "loginctl": frozenset({"list-sessions", "list-users", "list-seats", "show-session",
                           "show-user", "session-status", "user-status"}),
}  # fmt: skip

_SUBCOMMAND_PROGRAMS = frozenset(
    {"git", "kubectl", "docker", "podman", "systemctl", "ip", *_CTL_READ, *_PACKAGE_READ}
)
