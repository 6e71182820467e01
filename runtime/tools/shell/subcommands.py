"""Read-only policies for programs with subcommand grammars: git, kubectl, helm, docker, …

Each policy is an allow-list: the global options, then a read-only verb, then
that verb's options (with the shape of their values); anything not listed
needs approval. Long options are matched exactly (never as abbreviations): an
allow-listed `--output-indicator-new` must not let `--output` through.

Decisions worth knowing (docs/shell-policy.md repeats them):

- cluster and container clients may not be pointed elsewhere: kubectl's
  `--server`, `--kubeconfig`, `--token`, `--as`, `--insecure-skip-tls-verify`,
  certificate options; helm's `--kube-apiserver`, `--kube-token`,
  `--kubeconfig`; docker's `-H/--host`, `--context`, `--config`, `--tls*`.
  A `--context`/`--cluster`/`--user` of kubectl (and helm's `--kube-context`)
  only picks an entry of the operator's own kubeconfig, so it is allowed;
- `kubectl get/describe` of secrets, `kubectl config view --raw`, `helm get
  values|all|manifest|hooks` and `helm status -o json|yaml` (which carry the
  release's values and rendered Secrets) need approval;
- `docker inspect` of a container or image prints its environment, the usual
  place for a container's passwords: it needs approval unless `--format`
  names fields outside `Config`/`Env`;
- `git config --list` stays auto: it prints what `git remote -v` prints, and
  credentials in URLs are redacted (layer 3);
- `systemctl -H/--host` (ssh to another machine) and `-M/--machine` need
  approval; `systemctl help` starts `man`;
- package tools: only local queries; an option that names configuration
  (`apt -o`, `-c`, `dpkg --admindir`, `rpm --define/--eval`) needs approval.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Callable, Mapping, Sequence

from runtime.tools.shell.options import _long_hit, _opts, getopt, has_flag
from runtime.tools.shell.paths import _outside_workspace, secret_reason
from runtime.tools.shell.programs import NETWORK_PROGRAMS
from runtime.tools.shell.specs import (
    ANY,
    NAME,
    NUM,
    Shape,
    Spec,
    check,
    choice,
    matches,
    spec,
    with_values,
)
from runtime.tools.shell.verdict import Verdict, _cap

Policy = Callable[[list[str]], Verdict | None]


def _approval(action: str, risk: str, reason: str) -> Verdict:
    return Verdict(action, risk, reason)


def _path(value: str) -> str | None:
    """A file the program reads: any path that is not a secret location."""
    return "names a secret location" if secret_reason(value) else None


def _spec(
    flags: str = "",
    values: Mapping[str, Shape] | None = None,
    optional: Mapping[str, Shape] | None = None,
    *,
    max_operands: int | None = None,
    operand: Shape | None = None,
) -> Spec:
    """A `Spec` whose long options must be spelled out (see the module docstring)."""
    return spec(
        flags,
        values,
        optional=optional,
        max_operands=max_operands,
        operand=operand,
        long_abbrev=False,
    )


_FIRST = -1  # "as the first spec says"


def _merge(*specs: Spec, max_operands: int | None = _FIRST, operand: Shape | None = None) -> Spec:
    """One `Spec` holding every option of `specs`; operand rules from the first one."""
    if max_operands == _FIRST:
        max_operands = specs[0].max_operands
    operand = operand or specs[0].operand
    return Spec(
        flags=tuple(f for s in specs for f in s.flags),
        values={k: v for s in specs for k, v in s.values.items()},
        optional={k: v for s in specs for k, v in s.optional.items()},
        max_operands=max_operands,
        operand=operand,
        long_abbrev=False,
    )


def _first_positional(
    argv: list[str], flags: Sequence[str], values: Sequence[str]
) -> tuple[int | None, str | None]:
    """Index of the first positional (the verb); options before it must be known."""
    opts = getopt(argv, flags=flags, values=values, stop_at_positional=True, long_abbrev=False)
    if opts.error:
        return None, opts.error
    return (opts.positionals[0] if opts.positionals else None), None


def _operands(s: Spec, argv: Sequence[str]) -> list[str]:
    opts = getopt(
        argv, flags=s.flags, values=tuple(s.values), optional=tuple(s.optional), long_abbrev=False
    )
    return [argv[i] for i in opts.positionals]


def _option_values(s: Spec, argv: Sequence[str], *names: str) -> list[str]:
    opts = getopt(
        argv, flags=s.flags, values=tuple(s.values), optional=tuple(s.optional), long_abbrev=False
    )
    return opts.values(*names)


def _has(s: Spec, argv: Sequence[str], *names: str) -> bool:
    opts = getopt(
        argv, flags=s.flags, values=tuple(s.values), optional=tuple(s.optional), long_abbrev=False
    )
    return opts.has(*names)


FIELDS = matches(r"[A-Za-z0-9_%:,=+.-]{1,512}", "a list of fields")
UNIT = matches(r"[A-Za-z0-9@_.:\\/*?\[\]-]{1,256}", "a unit name")
PLAIN = matches(r"[A-Za-z0-9_][A-Za-z0-9_.:/@%+=~^-]{0,255}", "a plain name")
DURATION = matches(r"[0-9]{1,6}(\.[0-9]+)?(ms|s|m|h|d)?([0-9]+(s|m))?", "a duration")


# ---------------------------------------------------------------------------
# ip
# ---------------------------------------------------------------------------

# `ip` objects (exact spellings ip resolves to a read-only object) and verbs.
_IP_OBJECTS = frozenset(
    {"a", "ad", "addr", "address", "r", "ro", "rou", "rout", "route", "l", "li", "lin", "link",
     "n", "ne", "nei", "neig", "neigh", "neighbor", "neighbour", "ru", "rul", "rule", "ma",
     "maddr", "maddress", "netconf", "netns", "tunnel", "tun", "mr", "mroute", "ntable"}
)  # fmt: skip
# `s`/`sh`/`sho` abbreviate show for every object; `l` is left out (ambiguous in places).
_IP_VERBS = frozenset({"s", "sh", "sho", "show", "list", "lst", "ls"})
# `-n/-netns` runs ip in another namespace, `-b/-batch` reads commands from a
# file, `-force` goes on after errors: none listed.
_IP_OPTIONS = frozenset(
    {"-s", "-stats", "-statistics", "-d", "-details", "-br", "-brief", "-4", "-6", "-c",
     "-color", "-j", "-json", "-p", "-pretty", "-o", "-oneline", "-h", "-human",
     "-human-readable", "-N", "-numeric", "-a", "-all", "-t", "-timestamp", "-ts", "-tshort",
     "-V", "-Version"}
)  # fmt: skip


def _policy_ip(argv: list[str]) -> Verdict | None:
    i = 1
    while i < len(argv) and argv[i].startswith("-"):
        name, _, value = argv[i].partition("=")
        if name not in _IP_OPTIONS or (value and value not in ("always", "auto", "never")):
            return _approval("network", "high", f"`ip {argv[i]}` needs approval")
        i += 1
    if i >= len(argv):
        return None
    obj = argv[i]
    rest = argv[i + 1 :]
    if obj not in _IP_OBJECTS:
        return _approval("network", "high", NETWORK_PROGRAMS["ip"])
    for word in rest:
        if PLAIN(word) and word not in ("all",):
            return _approval("network", "high", f"`ip … {word}` needs approval")
    if obj == "netns":  # `ip netns exec` runs a command in a namespace
        if rest[:1] in ([], ["list"], ["show"], ["ls"], ["list-id"]) and len(rest) <= 1:
            return None
        return _approval("process", "high", "that `ip netns` command changes or enters namespaces")
    if not rest:
        return None
    verb = rest[0]
    if verb in _IP_VERBS or (verb == "get" and obj in ("r", "ro", "rou", "rout", "route")):
        return None
    if verb in ("dev",) and obj not in ("r", "ro", "rou", "rout", "route"):
        return None  # `ip addr dev eth0` = show
    return _approval("network", "high", NETWORK_PROGRAMS["ip"])


# ---------------------------------------------------------------------------
# systemd: systemctl and the *ctl tools
# ---------------------------------------------------------------------------

_SYSTEMCTL_READ = frozenset(
    {"status", "show", "list-units", "list-unit-files", "list-timers", "list-sockets",
     "list-dependencies", "list-jobs", "list-machines", "list-automounts", "list-paths",
     "is-active", "is-enabled", "is-failed", "is-system-running", "cat", "get-default"}
)  # fmt: skip
# journalctl's and systemctl's `-o/--output` formats (specs_system imports it).
JOURNAL_OUTPUT = choice(
    "short", "short-full", "short-iso", "short-iso-precise", "short-precise",
    "short-monotonic", "short-delta", "short-unix", "verbose", "export", "json",
    "json-pretty", "json-sse", "json-seq", "cat", "with-unit",
)  # fmt: skip
# `-H/--host` runs systemctl over ssh on another machine, `-M/--machine` in a
# container, `--root` on another tree: none listed.
SYSTEMCTL = _spec(
    "-a --all -l --full --no-pager --no-legend -q --quiet --user --system --failed -r "
    "--recursive --plain --value --no-ask-password --reverse --after --before --show-types "
    "--with-dependencies --global --version -h --help",
    {
        **with_values(FIELDS, "-t --type -p --property --state"),
        "-P": NAME,
        **with_values(NUM, "-n --lines"),
        **with_values(JOURNAL_OUTPUT, "-o --output"),
    },
    {
        "--legend": choice("yes", "no", "true", "false"),
        "--timestamp": choice("pretty", "us", "utc", "us+utc", "unix"),
    },
    operand=UNIT,
)


def _policy_systemctl(argv: list[str]) -> Verdict | None:
    problem = check("systemctl", SYSTEMCTL, argv)
    operands = _operands(SYSTEMCTL, argv) if problem is None else []
    verb = operands[0] if operands else None
    if verb is not None and verb not in _SYSTEMCTL_READ:
        return _approval("process", "high", f"`systemctl {verb}` changes services")
    if problem:
        return _approval("process", "high", f"{problem} needs approval")
    return None


# Read-only verbs of systemd's *ctl tools; `-H/--host` and `-M/--machine` are not listed.
_CTL_READ = {
    "timedatectl": frozenset({"status", "show", "list-timezones", "timesync-status",
                              "show-timesync"}),
    "hostnamectl": frozenset({"status"}),
    "localectl": frozenset({"status", "list-locales", "list-keymaps", "list-x11-keymap-models",
                            "list-x11-keymap-layouts", "list-x11-keymap-variants",
                            "list-x11-keymap-options"}),
    "loginctl": frozenset({"list-sessions", "list-users", "list-seats", "show-session",
                           "show-user", "show-seat", "session-status", "user-status",
                           "seat-status"}),
}  # fmt: skip
CTL = _spec(
    "--no-pager --no-legend --no-ask-password -a --all -l --full --value -h --help --version",
    {
        **with_values(FIELDS, "-p --property"),
        "-P": NAME,
        **with_values(NUM, "-n --lines"),
        **with_values(JOURNAL_OUTPUT, "-o --output"),
    },
    {"--json": choice("pretty", "short", "off")},
    operand=PLAIN,
)


def _policy_ctl(argv: list[str]) -> Verdict | None:
    name = argv[0]
    problem = check(name, CTL, argv)
    if problem:
        return _approval("privileged", "high", f"{problem} needs approval")
    operands = _operands(CTL, argv)
    if operands and operands[0] not in _CTL_READ[name]:
        return _approval("privileged", "high", f"`{name} {operands[0]}` changes system settings")
    return None


# ---------------------------------------------------------------------------
# kubectl
# ---------------------------------------------------------------------------

# Global options that only pick what the operator's own kubeconfig holds.
# `--server/-s`, `--kubeconfig` (it can name a credential plugin to run),
# `--token`, `--as*`, `--insecure-skip-tls-verify`, `--certificate-authority`,
# `--client-*`, `--tls-server-name`, `--cache-dir`, `--username/--password`
# and `--profile*` (writes a file) are not listed.
_KUBE_GLOBAL = _spec(
    "--match-server-version --warnings-as-errors",
    {
        **with_values(PLAIN, "-n --namespace --context --cluster --user"),
        "--request-timeout": DURATION,
        # -v 7+ prints request headers, which can carry the bearer token
        **with_values(matches(r"[0-6]", "a verbosity from 0 to 6"), "-v --v"),
    },
)
_KUBE_OUTPUT = matches(
    r"(json|yaml|wide|name|jsonpath=.*|jsonpath-as-json=.*|go-template=.*|template=.*|"
    r"custom-columns=.*)",
    "json, yaml, wide, name, jsonpath=…, go-template=… or custom-columns=… (a template file "
    "is read from disk)",
)
_KUBE_SELECT = {
    **with_values(ANY, "-l --selector --field-selector --sort-by -L --label-columns --template"),
    **with_values(_KUBE_OUTPUT, "-o --output"),
    "--chunk-size": NUM,
}
_KUBE_VERBS: dict[str, Spec] = {
    # `-f/--filename` and `-k` could name any object, secrets included; `-w` watches forever
    "get": _spec(
        "-A --all-namespaces --show-labels --show-kind --no-headers --ignore-not-found "
        "--show-managed-fields --allow-missing-template-keys",
        {**_KUBE_SELECT, "--subresource": NAME},
    ),
    "describe": _spec(
        "-A --all-namespaces", {**_KUBE_SELECT}, {"--show-events": choice("true", "false")}
    ),
    # `-f/--follow` never ends; `--insecure-skip-tls-verify-backend` is not listed
    "logs": _spec(
        "--all-containers -p --previous --timestamps --prefix --ignore-errors",
        {
            **with_values(PLAIN, "-c --container"),
            "--tail": NUM,
            "--since": DURATION,
            "--since-time": ANY,
            "--limit-bytes": NUM,
            "--max-log-requests": NUM,
            **with_values(ANY, "-l --selector"),
            "--pod-running-timeout": DURATION,
        },
        {"--all-pods": choice("true", "false")},
        max_operands=2,
    ),
    "top": _spec(
        "--containers -A --all-namespaces --no-headers --use-protocol-buffers --sum "
        "--show-capacity",
        with_values(ANY, "-l --selector --sort-by --field-selector"),
    ),
    "explain": _spec("--recursive", {"--api-version": PLAIN, "--output": choice("plaintext")}),
    "version": _spec("--client", {**with_values(choice("json", "yaml"), "-o --output")}),
    "api-resources": _spec(
        "--no-headers --cached",
        {
            "--api-group": ANY,
            "--sort-by": choice("name", "kind"),
            "--verbs": ANY,
            **with_values(choice("wide", "name"), "-o --output"),
        },
        {"--namespaced": choice("true", "false")},
    ),
    "api-versions": _spec(max_operands=0),
    "cluster-info": _spec(max_operands=0),  # `cluster-info dump` prints everything: approval
    "events": _spec(
        "-A --all-namespaces --no-headers",
        {"--for": PLAIN, "--types": FIELDS, **_KUBE_SELECT},
        max_operands=0,
    ),
}
_KUBE_SUB_VERBS: dict[str, dict[str, Spec]] = {
    "config": {
        # `--raw` and `--flatten` print the credentials that view otherwise redacts
        "view": _spec(
            "--minify --allow-missing-template-keys", {**with_values(_KUBE_OUTPUT, "-o --output")}
        ),
        "get-contexts": _spec("--no-headers", {**with_values(choice("name"), "-o --output")}),
        "current-context": _spec(max_operands=0),
        "get-clusters": _spec(max_operands=0),
        "get-users": _spec(max_operands=0),
    },
    "auth": {
        "can-i": _spec(
            "-A --all-namespaces --list --no-headers -q --quiet", {"--subresource": NAME}
        ),
        "whoami": _spec("", {**with_values(_KUBE_OUTPUT, "-o --output")}),
    },
    "rollout": {
        "status": _spec("", {"--revision": NUM, "--timeout": DURATION},
                        {"--watch": choice("false")}),
        "history": _spec("", {"--revision": NUM, **with_values(_KUBE_OUTPUT, "-o --output")}),
    },
}  # fmt: skip


def _policy_kubectl(argv: list[str]) -> Verdict | None:
    if any(a.split("=")[0] == "--kubeconfig" for a in argv[1:]):
        return _approval("process", "high", "`kubectl --kubeconfig` can make kubectl run a program")
    idx, err = _first_positional(argv, _KUBE_GLOBAL.flags, tuple(_KUBE_GLOBAL.values))
    if err:
        return _approval("process", "high", f"`kubectl` with an {err} needs approval")
    if idx is None:
        return None
    verb, rest = argv[idx], argv[idx + 1 :]
    label = f"kubectl {verb}"
    if verb in _KUBE_SUB_VERBS:
        sub_idx = next((i for i, a in enumerate(rest) if not a.startswith("-")), None)
        sub = rest[sub_idx] if sub_idx is not None else None
        if sub not in _KUBE_SUB_VERBS[verb]:
            return _approval("process", "high", f"`{label} {sub or ''}`".replace(" `", "`")
                             + " changes the cluster or needs approval")  # fmt: skip
        assert sub_idx is not None
        s = _merge(_KUBE_SUB_VERBS[verb][sub], _KUBE_GLOBAL)
        words = [f"{label} {sub}", *rest[:sub_idx], *rest[sub_idx + 1 :]]
        problem = check(words[0], s, words)
        if problem:
            if verb == "config" and any(a.split("=")[0] in ("--raw", "--flatten") for a in rest):
                return _approval("read", "high", "`kubectl config view --raw` prints credentials")
            return _approval("process", "high", f"{problem} needs approval")
        return None
    if verb not in _KUBE_VERBS:
        return _approval(
            "process", "high", f"`{label}` changes the cluster or runs something in it"
        )
    words = [label, *rest]
    if verb in ("logs", "events", "get") and any(
        a in ("-f", "--follow", "-w", "--watch", "--watch-only") or a.startswith("--follow=")
        or a.startswith("--watch") for a in rest
    ):  # fmt: skip
        return _approval("process", "medium", f"`{label} -f`/`-w` follows forever")
    s = _merge(_KUBE_VERBS[verb], _KUBE_GLOBAL)
    problem = check(label, s, words)
    if problem:
        if verb == "cluster-info":
            return _approval("read", "medium", "`kubectl cluster-info dump` prints the cluster")
        return _approval("process", "high", f"{problem} needs approval")
    if verb in ("get", "describe") and any("secret" in a.lower() for a in _operands(s, words)):
        return _approval("read", "high", "reading Kubernetes secrets exposes credentials")
    return None


# ---------------------------------------------------------------------------
# helm
# ---------------------------------------------------------------------------

# `--kubeconfig`, `--kube-apiserver`, `--kube-token`, `--kube-as-*`,
# `--kube-ca-file`, `--kube-insecure-skip-tls-verify`, `--registry-config`,
# `--repository-config`, `--repository-cache` are not listed.
_HELM_GLOBAL = _spec(
    "--debug",
    {**with_values(PLAIN, "-n --namespace --kube-context"), "--burst-limit": NUM, "--qps": NUM},
)
_HELM_OUT = {**with_values(choice("table", "json", "yaml"), "-o --output")}
_HELM_VERBS: dict[str, Spec] = {
    "list": _spec(
        "-a --all -A --all-namespaces -d --date --deployed --failed --no-headers --pending -r "
        "--reverse --short -q --superseded --uninstalled --uninstalling",
        {**_HELM_OUT, "-f": ANY, "--filter": ANY, "-m": NUM, "--max": NUM, "--offset": NUM,
         "-l": ANY, "--selector": ANY, "--time-format": ANY},
        max_operands=0,
    ),
    # `-o json|yaml` prints the whole release: its values and manifest
    "status": _spec(
        "--show-desc --show-resources", {"--revision": NUM, **with_values(choice("table"),
                                                                           "-o --output")},
        max_operands=1,
    ),
    "history": _spec("", {**_HELM_OUT, "--max": NUM}, max_operands=1),
    "version": _spec("--short --client -c", {"--template": ANY}, max_operands=0),
    "env": _spec(max_operands=1),
    "show": _spec("--devel", {"--version": PLAIN, "--jsonpath": ANY}, max_operands=2),
    "search": _spec("-r --regexp --devel -l --versions --fail-on-no-result",
                    {"--version": ANY, **_HELM_OUT, "--max-col-width": NUM}, max_operands=2),
    "repo": _spec("", {**_HELM_OUT}, max_operands=1),
    "dependency": _spec("", {"--max-col-width": NUM}, max_operands=2),
    "get": _spec("", {"--revision": NUM, "--template": ANY, **_HELM_OUT}, max_operands=2),
}  # fmt: skip
# `helm get values|all|manifest|hooks` carry the release's values and rendered Secrets.
_HELM_GET_SAFE = frozenset({"notes", "metadata"})


def _policy_helm(argv: list[str]) -> Verdict | None:
    idx, err = _first_positional(argv, _HELM_GLOBAL.flags, tuple(_HELM_GLOBAL.values))
    if err:
        return _approval("process", "high", f"`helm` with an {err} needs approval")
    if idx is None:
        return None
    verb = {"ls": "list", "hist": "history", "inspect": "show", "dep": "dependency",
            "dependencies": "dependency"}.get(argv[idx], argv[idx])  # fmt: skip
    rest = argv[idx + 1 :]
    label = f"helm {verb}"
    if verb not in _HELM_VERBS:
        return _approval(
            "process", "high", f"`{label}` changes releases or runs a plugin (needs approval)"
        )
    s = _merge(_HELM_VERBS[verb], _HELM_GLOBAL, max_operands=_HELM_VERBS[verb].max_operands)
    words = [label, *rest]
    problem = check(label, s, words)
    if problem:
        return _approval("process", "high", f"{problem} needs approval")
    ops = _operands(s, words)
    first = ops[0] if ops else None
    if verb == "get":
        if first not in _HELM_GET_SAFE:
            return _approval(
                "read", "high", f"`helm get {first or ''}` prints release values or Secrets"
            )
    elif verb == "show":
        if first not in ("chart", "readme", "values", "crds", "all") or any(
            "://" in o for o in ops
        ):
            return _approval("network", "medium", "that `helm show` fetches a chart from a URL")
    elif verb == "search":
        if first != "repo":  # `helm search hub` asks Artifact Hub over the internet
            return _approval("network", "medium", "`helm search hub` queries the internet")
    elif verb == "repo":
        if first != "list" and first != "ls":
            return _approval("process", "high", "that `helm repo` command changes repositories")
    elif verb == "dependency":
        if first not in ("list", "ls"):
            return _approval("write", "medium", "that `helm dependency` command downloads charts")
    return None


# ---------------------------------------------------------------------------
# docker and podman
# ---------------------------------------------------------------------------

# `-H/--host`, `--context`, `-c/--config`, `--tls*` point the client at
# another engine or other credentials; podman's `--url`, `--connection`,
# `--identity`, `--root`, `--runtime`, `--conmon`, `--hooks-dir`, `--module`
# name other engines, stores or programs. None is listed.
_DOCKER_GLOBAL = _spec(
    "-D --debug",
    {**with_values(choice("debug", "info", "warn", "error", "fatal"), "-l --log-level")},
)
_TEMPLATE = ANY
_FMT = {**with_values(_TEMPLATE, "-f --format")}
_FILTER = {**with_values(ANY, "-f --filter")}
_DOCKER_PS = _spec(
    "-a --all -l --latest -q --quiet -s --size --no-trunc",
    {"-n": NUM, "--last": NUM, **_FILTER, "--format": _TEMPLATE},
    max_operands=0,
)
_DOCKER_IMAGES = _spec(
    "-a --all -q --quiet --digests --no-trunc --tree",
    {**_FILTER, "--format": _TEMPLATE},
    max_operands=1,
)
_DOCKER_LOGS = _spec(
    "-t --timestamps --details",
    {**with_values(matches(r"[0-9]+|all", "a number or all"), "-n --tail"),
     "--since": ANY, "--until": ANY},
    max_operands=1,
    operand=PLAIN,
)  # fmt: skip
_DOCKER_INSPECT = _spec("-s --size", {**_FMT, "--type": NAME}, operand=PLAIN)
_DOCKER_STATS = _spec("--no-stream -a --all --no-trunc", {"--format": _TEMPLATE}, operand=PLAIN)
_DOCKER_HISTORY = _spec("-H --human --no-trunc -q --quiet", {"--format": _TEMPLATE}, max_operands=1)
_ONE = _spec(max_operands=1, operand=PLAIN)
_DOCKER_VERBS: dict[str, Spec] = {
    "ps": _DOCKER_PS,
    "images": _DOCKER_IMAGES,
    "logs": _DOCKER_LOGS,
    "inspect": _DOCKER_INSPECT,
    "stats": _DOCKER_STATS,
    "version": _spec("", {**_FMT}, max_operands=0),
    "info": _spec("", {**_FMT}, max_operands=0),
    "top": _spec("", operand=PLAIN),  # ps options after the container are checked below
    "port": _spec(max_operands=2, operand=PLAIN),
    "diff": _ONE,
    "history": _DOCKER_HISTORY,
}
_DOCKER_GROUPS: dict[str, dict[str, Spec]] = {
    "container": {"ls": _DOCKER_PS, "list": _DOCKER_PS, "ps": _DOCKER_PS,
                  "inspect": _DOCKER_INSPECT, "logs": _DOCKER_LOGS, "port": _DOCKER_VERBS["port"],
                  "diff": _ONE, "stats": _DOCKER_STATS, "top": _DOCKER_VERBS["top"]},
    "image": {"ls": _DOCKER_IMAGES, "list": _DOCKER_IMAGES, "inspect": _DOCKER_INSPECT,
              "history": _DOCKER_HISTORY},
    "network": {"ls": _spec("--no-trunc -q --quiet", {**_FILTER, "--format": _TEMPLATE},
                            max_operands=0),
                "list": _spec("--no-trunc -q --quiet", {**_FILTER, "--format": _TEMPLATE},
                              max_operands=0),
                "inspect": _spec("-v --verbose", {**_FMT}, operand=PLAIN)},
    "volume": {"ls": _spec("-q --quiet", {**_FILTER, "--format": _TEMPLATE}, max_operands=0),
               "list": _spec("-q --quiet", {**_FILTER, "--format": _TEMPLATE}, max_operands=0),
               "inspect": _spec("", {**_FMT}, operand=PLAIN)},
    "system": {"df": _spec("-v --verbose", {"--format": _TEMPLATE}, max_operands=0),
               "info": _spec("", {**_FMT}, max_operands=0)},
    "context": {"ls": _spec("-q --quiet", {"--format": _TEMPLATE}, max_operands=0),
                "list": _spec("-q --quiet", {"--format": _TEMPLATE}, max_operands=0),
                "show": _spec(max_operands=0)},
    # compose reads the project's compose file (and its `.env`) but these only list
    "compose": {"ps": _spec("-a --all -q --quiet --services",
                            {"--format": _TEMPLATE, "--filter": ANY, "--status": NAME}),
                "ls": _spec("-a --all -q --quiet", {"--format": _TEMPLATE, "--filter": ANY},
                            max_operands=0),
                "images": _spec("-q --quiet", {"--format": _TEMPLATE}),
                "top": _spec(),
                "version": _spec("--short", {**_FMT}, max_operands=0),
                "logs": _spec("-t --timestamps --no-color --no-log-prefix",
                              {"-n": NUM, "--tail": ANY, "--since": ANY, "--until": ANY})},
}  # fmt: skip
_COMPOSE_GLOBAL = _spec("", {**with_values(PLAIN, "-p --project-name")})
# A `--format` template that names only fields outside the configuration and
# environment: `{{.State.Status}}`, `{{.NetworkSettings.IPAddress}}`, `{{json .Mounts}}`.
_TEMPLATE_ACTION = re.compile(r"\{\{-?\s*(.*?)\s*-?\}\}", re.S)
_SAFE_ACTION = re.compile(
    r"((json|upper|lower|title|len|println)\s+)?\.[A-Z][A-Za-z0-9]*(\.[A-Za-z0-9_]+)*"
    r"|range\s+\.[A-Z][A-Za-z0-9.]*|end"
    r"|index\s+\.[A-Z][A-Za-z0-9.]*\s+\"[A-Za-z0-9_./-]+\"(\s+\"[A-Za-z0-9_./-]+\")?"
)


_FIELD_PATH = re.compile(r"\.[A-Za-z][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*")
# The whole configuration (`.Config`, `.ContainerConfig`) or any `Env` holds the environment.
_ENV_HOLDERS = frozenset({"Config", "ContainerConfig"})


def _template_is_safe(template: str) -> bool:
    actions = _TEMPLATE_ACTION.findall(template)
    if not actions or not all(_SAFE_ACTION.fullmatch(a) for a in actions):
        return False
    for action in actions:
        for match in _FIELD_PATH.finditer(action):
            parts = match.group(0)[1:].split(".")
            if "Env" in parts or parts[-1] in _ENV_HOLDERS:
                return False
    return True


_DOCKER_TOP_ARGS = frozenset({"-ef", "-eF", "-ely", "-eLf", "aux", "auxw", "auxww", "-eo", "-o"})


def _policy_docker(argv: list[str]) -> Verdict | None:
    name = argv[0]
    idx, err = _first_positional(argv, _DOCKER_GLOBAL.flags, tuple(_DOCKER_GLOBAL.values))
    if argv[1:] in (["-v"], ["--version"]):
        return None
    if err:
        return _approval("process", "high", f"`{name}` with an {err} needs approval")
    if idx is None:
        return None
    verb, rest = argv[idx], argv[idx + 1 :]
    label = f"{name} {verb}"
    group = None
    if verb in _DOCKER_GROUPS:
        group = verb
        pre: list[str] = []
        if verb == "compose":  # `docker compose -p name ps`
            i = 0
            while i < len(rest) and rest[i] in ("-p", "--project-name") and i + 1 < len(rest):
                pre += rest[i : i + 2]
                i += 2
            if i < len(rest) and rest[i].startswith("-"):
                return _approval("process", "high", f"`{label} {rest[i]}` needs approval")
            rest = rest[i:]
            if pre and check(label, _COMPOSE_GLOBAL, [label, *pre]):
                return _approval("process", "high", f"`{label}` with those options needs approval")
        sub = rest[0] if rest and not rest[0].startswith("-") else None
        if sub not in _DOCKER_GROUPS[verb]:
            return _approval(
                "process", "high", f"`{label} {sub or ''}`".replace(" `", "`")
                + " changes containers or images, or needs approval"
            )  # fmt: skip
        s = _DOCKER_GROUPS[verb][sub]
        verb, rest, label = sub, rest[1:], f"{label} {sub}"
    elif verb in _DOCKER_VERBS:
        s = _DOCKER_VERBS[verb]
    else:
        return _approval("process", "high", f"`{label}` changes containers or images")
    words = [label, *rest]
    if verb == "logs" and has_flag(words, "f", {"--follow"}):
        return _approval("process", "medium", f"`{label} -f` follows forever")
    if verb == "top" and group != "compose":
        if not rest or rest[0].startswith("-") or PLAIN(rest[0]):
            return _approval("process", "medium", f"`{label}` needs a container name")
        extra = rest[1:]
        if extra and not (
            extra[0] in _DOCKER_TOP_ARGS
            and all(a in _DOCKER_TOP_ARGS or FIELDS(a) is None for a in extra[1:])
            and "-o" not in extra[:1] + extra[2:]
        ):
            return _approval("read", "high", f"`{label}` with those ps options needs approval")
        if any(a.isalpha() and "e" in a and not a.startswith("-") for a in extra):
            return _approval("read", "high", f"`{label} … e` shows process environments")
        return None
    problem = check(label, _merge(s, _DOCKER_GLOBAL, max_operands=s.max_operands,
                                  operand=s.operand), words)  # fmt: skip
    if problem:
        return _approval("process", "high", f"{problem} needs approval")
    if verb == "stats" and "--no-stream" not in rest:
        return _approval("process", "medium", f"`{label}` without `--no-stream` never ends")
    if verb == "inspect" and group not in ("network", "volume"):
        formats = _option_values(s, words, "-f", "--format")
        if not formats or not all(_template_is_safe(f) for f in formats):
            return _approval(
                "read",
                "medium",
                f"`{label}` prints the environment, where containers keep their passwords "
                "(use `--format` with the fields you need)",
            )
    return None


# ---------------------------------------------------------------------------
# git
# ---------------------------------------------------------------------------

_GIT_GLOBAL_FLAGS = _opts(
    "--no-pager -P --bare --no-replace-objects --literal-pathspecs --glob-pathspecs "
    "--noglob-pathspecs --icase-pathspecs --no-optional-locks --version"
)
_GIT_GLOBAL_VALUES = ("-C", "--git-dir", "--work-tree", "--namespace")
# Options that write files, run programs or reach other repositories, on any git subcommand.
GIT_FORBIDDEN_LONG = frozenset(
    {"--output", "--ext-diff", "--upload-pack", "--receive-pack", "--exec",
     "--open-files-in-pager", "--config-env", "--exec-path", "--paginate"}
)  # fmt: skip

_DIGITS = " ".join(f"-{d}" for d in range(10))
# Diff output options shared by diff, show, log, …; `--output`, `--ext-diff` are not listed.
_GIT_DIFF = _spec(
    "-p -u --patch -s --no-patch --raw --patch-with-raw --patch-with-stat -t --minimal "
    "--patience --histogram --indent-heuristic --no-indent-heuristic --stat --compact-summary "
    "--numstat --shortstat --dirstat --cumulative --summary -z --name-only --name-status "
    "--color --no-color --color-moved --no-color-moved --color-words --word-diff --no-renames "
    "--rename-empty --no-rename-empty --check --full-index --binary --abbrev --no-abbrev -B "
    "--break-rewrites -M --find-renames -C --find-copies --find-copies-harder -D "
    "--irreversible-delete -R --relative --no-relative -a --text --ignore-cr-at-eol "
    "--ignore-space-at-eol -b --ignore-space-change -w --ignore-all-space --ignore-blank-lines "
    "-W --function-context --exit-code --quiet --no-ext-diff --textconv --no-textconv "
    "--ignore-submodules --submodule --no-prefix --default-prefix --cc -m -c --dd "
    "--remerge-diff --no-diff-merges --combined-all-paths --pickaxe-all --pickaxe-regex "
    "--ita-invisible-in-index --ita-visible-in-index --merge-base --cached --staged "
    "--no-index -1 -2 -3 --base --ours --theirs " + _DIGITS,
    {
        **with_values(NUM, "-U --unified --inter-hunk-context -l --stat-width "
                           "--stat-name-width --stat-graph-width --stat-count"),
        **with_values(ANY, "-S -G --diff-filter --find-object --anchored --word-diff-regex "
                           "--src-prefix --dst-prefix --line-prefix --skip-to --rotate-to"),
        "-O": _path,
    },
    {
        **with_values(ANY, "--stat --dirstat --color --color-moved --color-moved-ws "
                           "--word-diff --abbrev --submodule --relative --find-renames "
                           "--find-copies --ignore-submodules --diff-merges "
                           "--ws-error-highlight --break-rewrites --unified --dirstat-by-file"),
    },
)  # fmt: skip
# Revision walking and log formatting (log, show, shortlog, rev-list, …).
_GIT_REVS = _spec(
    "--oneline --graph --all --branches --tags --remotes --first-parent --no-merges --merges "
    "--reverse --follow --no-walk --do-walk --date-order --author-date-order --topo-order "
    "--left-right --left-only --right-only --cherry --cherry-mark --cherry-pick --boundary "
    "--simplify-by-decoration --full-history --dense --sparse --simplify-merges "
    "--ancestry-path --source --use-mailmap --mailmap --no-mailmap --full-diff --log-size "
    "--abbrev-commit --no-abbrev-commit --no-notes --show-notes --standard-notes "
    "--relative-date --parents --children -g --walk-reflogs -i --regexp-ignore-case -E "
    "--extended-regexp -F --fixed-strings -P --perl-regexp --all-match --invert-grep "
    "--remove-empty --single-worktree --exclude-first-parent-only --show-linear-break "
    "--count --expand-tabs --no-expand-tabs --show-pulls --no-decorate --clear-decorations "
    "--reflog --not --objects --no-object-names --show-signature",
    {
        **with_values(NUM, "-n --max-count --skip --min-parents --max-parents"),
        **with_values(ANY, "--since --after --until --before --author --committer --grep "
                           "--grep-reflog --format --date --decorate-refs --decorate-refs-exclude "
                           "--glob --exclude -L --encoding --since-as-filter"),
    },
    with_values(ANY, "--pretty --decorate --notes --abbrev --expand-tabs --show-linear-break"),
)  # fmt: skip
_GIT_LOG = _merge(_GIT_REVS, _GIT_DIFF)
_GIT_READ_SPECS: dict[str, Spec] = {
    "log": _GIT_LOG,
    "whatchanged": _GIT_LOG,
    "show": _GIT_LOG,
    "rev-list": _GIT_LOG,
    "diff": _GIT_DIFF,
    "diff-tree": _merge(_GIT_LOG, _spec("-r --root --no-commit-id --always -v")),
    "diff-files": _merge(_GIT_DIFF, _spec("-q -r")),
    "diff-index": _merge(_GIT_DIFF, _spec("-r")),
    "range-diff": _merge(
        _GIT_DIFF, _spec("--no-dual-color --left-only --right-only", {"--creation-factor": NUM})
    ),
    "status": _spec(
        "-s --short -b --branch --show-stash --long -v --verbose -u -z --null --column "
        "--no-column --ahead-behind --no-ahead-behind --renames --no-renames",
        {},
        with_values(ANY, "--porcelain --untracked-files --ignored --ignore-submodules "
                         "--find-renames --column"),
    ),
    "blame": _spec(
        "-b --root --show-stats -f --show-name -n --show-number -p --porcelain "
        "--line-porcelain --incremental -c -t -l -s -e --show-email -w --color-lines "
        "--color-by-age --minimal -M -C --progress --no-progress",
        {**with_values(ANY, "-L --since --date --encoding --ignore-rev"),
         **with_values(_path, "--contents --ignore-revs-file -S")},
        {"--abbrev": NUM},
    ),
    "ls-files": _spec(
        "-c --cached -d --deleted -m --modified -o --others -i --ignored -s --stage -u "
        "--unmerged -k --killed -z -t -v -f --directory --no-empty-directory --eol "
        "--full-name --recurse-submodules --debug --deduplicate --exclude-standard "
        "--error-unmatch --sparse --resolve-undo",
        {**with_values(ANY, "-x --exclude --exclude-per-directory --with-tree --format"),
         **with_values(_path, "-X --exclude-from")},
        {"--abbrev": NUM},
    ),
    "ls-tree": _spec(
        "-d -r -t -l --long -z --name-only --name-status --object-only --full-name "
        "--full-tree", {"--format": ANY}, {"--abbrev": NUM},
    ),
    "describe": _spec(
        "--all --tags --contains --long --always --first-parent --exact-match --debug",
        {"--candidates": NUM, **with_values(ANY, "--match --exclude")},
        {**with_values(ANY, "--dirty --broken"), "--abbrev": NUM},
    ),
    # shortlog's `-n` is --numbered, not log's --max-count
    "shortlog": Spec(
        flags=(*_GIT_REVS.flags, *_opts("-n --numbered -s --summary -e --email -c --committer")),
        values={**{k: v for k, v in _GIT_REVS.values.items() if k != "-n"}, "--group": ANY},
        optional=_GIT_REVS.optional,
        long_abbrev=False,
    ),
    "grep": _spec(
        "-a --text --textconv --no-textconv -i --ignore-case -I -r --recursive --no-recursive "
        "-w --word-regexp -v --invert-match -h -H --full-name -E --extended-regexp -G "
        "--basic-regexp -P --perl-regexp -F --fixed-strings -n --line-number --column -l "
        "--files-with-matches --name-only -L --files-without-match -z --null -o "
        "--only-matching -c --count --no-color --break --heading -p --show-function -W "
        "--function-context --and --or --not --all-match -q --quiet --cached --untracked "
        "--no-index --exclude-standard --no-exclude-standard --recurse-submodules " + _DIGITS,
        {**with_values(ANY, "-e"), **with_values(_path, "-f"),
         **with_values(NUM, "-A -B -C --context --after-context --before-context --max-depth "
                            "-m --max-count --threads")},
        {"--color": ANY},
    ),
    "rev-parse": _spec(
        "--verify -q --quiet --symbolic --symbolic-full-name --all --branches --tags --remotes "
        "--show-toplevel --show-prefix --show-cdup --git-dir --git-common-dir "
        "--absolute-git-dir --is-inside-work-tree --is-inside-git-dir --is-bare-repository "
        "--is-shallow-repository --show-superproject-working-tree --local-env-vars --sq "
        "--not --revs-only --no-revs --flags --no-flags --shared-index-path --abbrev-ref "
        "--short",
        {**with_values(ANY, "--default --since --until --git-path --resolve-git-dir")},
        {**with_values(ANY, "--abbrev-ref --short --show-object-format --disambiguate "
                            "--branches --tags --remotes --glob --exclude")},
    ),
    "cat-file": _spec(
        "-t -s -e -p --textconv --filters --batch-all-objects --allow-unknown-type --mailmap "
        "--use-mailmap --batch-check --unordered --buffer",
        {"--path": ANY},
    ),
    "show-ref": _spec(
        "--head --tags --heads --branches -d --dereference -s --verify -q --quiet --exists",
        {}, {**with_values(ANY, "--hash --abbrev")},
    ),
    "for-each-ref": _spec(
        "--shell --perl --python --tcl --ignore-case --omit-empty",
        {**with_values(ANY, "--format --sort --points-at --merged --no-merged --contains "
                            "--no-contains --exclude"), "--count": NUM},
        {"--color": ANY},
    ),
    "merge-base": _spec("-a --all --octopus --independent --is-ancestor --fork-point"),
    "name-rev": _spec("--tags --all --name-only --no-undefined --always",
                      {**with_values(ANY, "--refs --exclude")}),
    "count-objects": _spec("-v --verbose -H --human-readable", max_operands=0),
    "version": _spec("--build-options", max_operands=0),
    "check-ignore": _spec("-q --quiet -v --verbose -n --non-matching --no-index -z"),
    "check-attr": _spec("-a --all --cached -z", {"--source": ANY}),
    "cherry": _spec("-v", {}, {"--abbrev": NUM}),
    "var": _spec("-l", max_operands=1),
    "verify-commit": _spec("-v --verbose --raw"),
    "verify-tag": _spec("-v --verbose --raw", {"--format": ANY}),
    "show-branch": _spec(
        "-a --all -r --remotes --topo-order --date-order --current --sparse --list "
        "--merge-base --independent --no-name --sha1-name --topics -g --no-color",
        {}, {**with_values(ANY, "--more --reflog --color")},
    ),
    "annotate": _spec("-b --root --show-stats -f -n -p --porcelain -c -t -l -s -e -w",
                      {**with_values(ANY, "-L --since --date --encoding")}),
}  # fmt: skip
GIT_READ = frozenset(_GIT_READ_SPECS)
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


# Subcommands that only list in some forms (judged below).
_GIT_LISTING = frozenset({"branch", "tag", "remote", "config", "stash", "reflog", "worktree"})
# World-writable places where anyone can plant a repository with a hostile config.
_PLANTABLE = ("/tmp", "/var/tmp", "/dev/shm", "/run/user")


def _foreign_repository(dirs: list[str], git_dir: bool) -> str | None:
    """Why a read-only git command on another repository needs approval, or None.

    A repository's config can make even read commands run programs (a diff
    driver, a clean filter, `core.fsmonitor`). The workspace's repository and
    one named with `-C` are the operator's; `--git-dir`/`--work-tree` and a
    `-C` into a world-writable directory can be anyone's.
    """
    if git_dir:
        return (
            "`git --git-dir`/`--work-tree` reads another repository's config, "
            "which can run programs"
        )
    for d in dirs:
        path = posixpath.normpath(d)
        if any(path == root or path.startswith(root + "/") for root in _PLANTABLE):
            return f"`git -C {d}`: a repository anyone can write has a config that can run programs"
    return None


def _git_read(sub: str, rest: list[str]) -> Verdict | None:
    """The allow-list of one read-only git subcommand."""
    label = f"git {sub}"
    words = [label, *("-u" if re.fullmatch(r"-u(no|normal|all)", a) else a for a in rest)]
    problem = check(label, _GIT_READ_SPECS[sub], words)
    if problem:
        return Verdict("unknown", "medium", f"{problem} needs approval")
    return None


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
    foreign = _foreign_repository(opts.values("-C"), opts.has("--git-dir", "--work-tree"))
    if foreign and (sub in GIT_READ or sub in _GIT_LISTING):
        return _approval("process", "high", foreign)
    if sub in GIT_READ:
        if sub == "grep" and has_flag(sub_argv, "O", {"--open-files-in-pager"}):
            return _approval("process", "high", "`git grep -O` runs a pager program")
        return _git_read(sub, rest)
    mutate = Verdict(
        *_GIT_WRITE_REASONS.get(sub, ("write", "medium", f"`git {sub}` changes the repository"))
    )
    if sub == "rebase" and has_flag(sub_argv, "x", {"--exec"}):
        return Verdict("process", "high", "`git rebase --exec` runs commands")
    elsewhere = [v for v in opts.values("-C", "--git-dir", "--work-tree") if _outside_workspace(v)]
    if elsewhere and mutate.risk == "medium":
        mutate = Verdict(mutate.action, "high", f"{_cap(mutate.reason)} in `{elsewhere[0]}`")
    if sub == "branch":
        o = getopt(sub_argv, flags=_GIT_BRANCH_FLAGS, values=_GIT_BRANCH_VALUES, long_abbrev=False)
        if o.error or (o.positionals and not o.has("-l", "--list")):
            return Verdict("write", "medium", "`git branch` with those arguments changes branches")
        return None
    if sub == "tag":
        ok_n = [a for a in rest if re.fullmatch(r"-n\d*", a)]
        o = getopt(
            [sub_argv[0], *[a for a in rest if a not in ok_n]],
            flags=_GIT_TAG_FLAGS,
            values=_GIT_TAG_VALUES,
            long_abbrev=False,
        )
        if o.error or (o.positionals and not o.has("-l", "--list")):
            return Verdict("write", "medium", "`git tag` with those arguments changes tags")
        return None
    if sub == "remote":
        if all(a in ("-v", "--verbose") for a in rest):
            return None
        pos = [a for a in rest if a not in ("-v", "--verbose")]
        # `git remote show NAME` asks the remote over the network unless `-n`
        if (
            pos
            and (pos[0] == "get-url" or (pos[0] == "show" and ("-n" in pos[1:] or len(pos) == 1)))
            and all(not a.startswith("-") or a in ("-n", "--push", "--all") for a in pos[1:])
        ):
            return None
        if pos[:1] == ["show"]:
            return Verdict("network", "medium", "`git remote show` asks the remote (use `-n`)")
        return Verdict("write", "medium", "`git remote` with those arguments changes remotes")
    if sub == "config":
        o = getopt(sub_argv, flags=_GIT_CONFIG_FLAGS, values=_GIT_CONFIG_VALUES, long_abbrev=False)
        if not o.error and o.has(*_GIT_CONFIG_READ):
            return None
        if (
            rest
            and rest[0] in ("get", "list")
            and not o.error
            and not any(a.split("=")[0] in ("--edit", "-e") for a in rest)
        ):
            return None
        if rest and rest[0] in ("get", "list"):
            o2 = getopt(
                [sub_argv[0], *rest[1:]],
                flags=(*_GIT_CONFIG_FLAGS, "--all"),
                values=(*_GIT_CONFIG_VALUES, "--regexp", "--value", "--url"),
                long_abbrev=False,
            )
            if not o2.error:
                return None
        return mutate
    if sub == "stash":
        if rest[:1] == ["list"]:
            return _git_read("log", rest[1:])
        if rest[:1] == ["show"]:
            return _git_read("diff", rest[1:])
        return Verdict("write", "medium", "`git stash` changes the working tree")
    if sub == "reflog":
        if rest[:1] == ["exists"] and len(rest) == 2:
            return None
        pos = [a for a in rest if not a.startswith("-")]
        if pos and pos[0] in ("expire", "delete", "drop"):
            return Verdict("write", "medium", "`git reflog expire/delete` removes history")
        return _git_read("log", rest[1:] if rest[:1] == ["show"] else rest)
    if sub == "worktree":
        if rest[:1] == ["list"] and all(a in ("--porcelain", "-v", "--verbose", "-z")
                                         for a in rest[1:]):  # fmt: skip
            return None
        return Verdict("write", "medium", "`git worktree` changes worktrees")
    if sub in _GIT_WRITE_REASONS or sub in GIT_LOCAL_WRITES:
        return mutate
    # daemon, submodule foreach, bisect run, credential, aliases …: can run anything
    return Verdict("unknown", "high", f"`git {sub}` is not a git command known to be safe")


# ---------------------------------------------------------------------------
# Firewalls: iptables, nft
# ---------------------------------------------------------------------------

# Listing only. `-Z` (with `-L` it zeroes the counters), every command that
# changes a chain, `-M` (names a modprobe program) are not listed.
IPTABLES = _spec(
    "-L --list -S --list-rules -n --numeric -v --verbose -x --exact --line-numbers -4 -6 "
    "-w --wait",
    {**with_values(choice("filter", "nat", "mangle", "raw", "security"), "-t --table")},
    max_operands=1,
    operand=PLAIN,
)  # fmt: skip
IPTABLES_SAVE = _spec(
    "-c --counters",
    {**with_values(choice("filter", "nat", "mangle", "raw", "security"), "-t --table")},
    max_operands=0,
)


def _policy_iptables(argv: list[str]) -> Verdict | None:
    name = argv[0]
    if name.endswith("-save"):
        problem = check(name, IPTABLES_SAVE, argv)
        return _approval("network", "high", f"{problem} needs approval") if problem else None
    problem = check(name, IPTABLES, argv)
    if problem or not _has(IPTABLES, argv, "-L", "--list", "-S", "--list-rules"):
        return _approval("network", "high", f"`{name}` other than listing changes the firewall")
    return None


_NFT_OBJECTS = frozenset(
    {"ruleset", "tables", "table", "chains", "chain", "sets", "set", "maps", "map", "flowtables",
     "flowtable", "counters", "counter", "quotas", "quota", "meters", "meter", "limits", "limit",
     "ct", "secmarks", "synproxys", "elements"}
)  # fmt: skip
_NFT_FAMILIES = frozenset({"ip", "ip6", "inet", "arp", "bridge", "netdev"})
# `-f file` and `-i` (interactive) run rule files; `-c` only checks, but is unusual.
NFT = _spec(
    "-a --handle -n --numeric -s --stateless -j --json -t --terse -N --reversedns -S "
    "--service -u --guid -y --numeric-priority -p --numeric-protocol -T --numeric-time "
    "-e --echo -v --version -V",
)


def _policy_nft(argv: list[str]) -> Verdict | None:
    problem = check("nft", NFT, argv)
    # nft joins its operands into one command line: split it back into words.
    words = " ".join(_operands(NFT, argv)).split() if not problem else []
    if problem is None and argv[1:] and all(a.startswith("-") for a in argv[1:]):
        return None  # `nft -v`
    if (
        problem is None
        and len(words) >= 2
        and words[0] == "list"
        and words[1] in _NFT_OBJECTS
        and all(re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", w) for w in words[2:])
        and len(words) <= 5
    ):
        return None
    return _approval("network", "high", "`nft` other than `nft list …` changes the firewall")


# ---------------------------------------------------------------------------
# openssl
# ---------------------------------------------------------------------------

# Reading certificates and requests. `-out` writes, `-engine`/`-provider` load
# code, `-signkey`/`-key`/`-passin` use a private key, `s_client` connects to
# a server: none listed.
_OPENSSL_PRINT = (
    "-noout -text -subject -issuer -dates -startdate -enddate -fingerprint -serial -purpose "
    "-modulus -pubkey -email -hash -subject_hash -issuer_hash -ocspid -ocsp_uri -alias "
    "-sha1 -sha256 -sha384 -sha512 -md5 -nocert -verify -batch"
)
_OPENSSL_IN = {"-in": _path, "-inform": choice("PEM", "DER", "pem", "der")}
_OPENSSL = {
    "x509": _spec(
        _OPENSSL_PRINT,
        {**_OPENSSL_IN, "-checkend": NUM, "-nameopt": ANY, "-certopt": ANY, "-ext": ANY,
         "-dateopt": choice("rfc_822", "iso_8601")},
        max_operands=0,
    ),
    "req": _spec(_OPENSSL_PRINT, {**_OPENSSL_IN, "-nameopt": ANY, "-reqopt": ANY},
                 max_operands=0),
    "crl": _spec(_OPENSSL_PRINT + " -lastupdate -nextupdate -crlnumber",
                 {**_OPENSSL_IN, "-nameopt": ANY}, max_operands=0),
    "version": _spec("-a -v -b -o -f -p -d -e -c -r -m", max_operands=0),
}  # fmt: skip


def _policy_openssl(argv: list[str]) -> Verdict | None:
    if len(argv) < 2 or argv[1] not in _OPENSSL:
        sub = argv[1] if len(argv) > 1 else ""
        action = "network" if sub in ("s_client", "s_server", "ocsp", "s_time") else "process"
        return _approval(action, "high", f"`openssl {sub}` needs approval".replace(" `", "`"))
    label = f"openssl {argv[1]}"
    # openssl's options are single-dash words: getopt would split `-noout` into letters.
    s = _OPENSSL[argv[1]]
    i = 2
    while i < len(argv):
        arg = argv[i]
        if arg in s.flags:
            i += 1
            continue
        if arg in s.values:
            if i + 1 >= len(argv):
                return _approval("process", "high", f"`{label} {arg}` needs a value")
            problem = s.values[arg](argv[i + 1])
            if problem:
                return _approval("read", "high", f"`{label} {arg}` {problem}")
            i += 2
            continue
        return _approval("process", "high", f"`{label} {arg}` needs approval")
    return None


# ---------------------------------------------------------------------------
# Package tools: local queries only
# ---------------------------------------------------------------------------

_PKG = matches(r"[A-Za-z0-9_/][A-Za-z0-9_.+:~*?\[\]=/@-]{0,255}", "a package name, path or pattern")
_APT_SHARED = "-q --quiet -qq -h --help -v --version --no-all-versions"
_APT_VERBS: dict[str, Spec] = {
    "list": _spec("--installed --upgradable --all-versions -a --manual-installed " + _APT_SHARED,
                  operand=_PKG),
    "show": _spec("-a --all-versions --full " + _APT_SHARED, operand=_PKG),
    "search": _spec("--names-only -n --full " + _APT_SHARED, operand=ANY),
    "policy": _spec(_APT_SHARED, operand=_PKG),
    "depends": _spec("--installed --recurse --no-recommends --no-suggests --no-conflicts "
                     "--no-breaks --no-replaces --no-enhances --important -i " + _APT_SHARED,
                     operand=_PKG),
    "madison": _spec(_APT_SHARED, operand=_PKG),
    "showpkg": _spec(_APT_SHARED, operand=_PKG),
    "pkgnames": _spec("--all-names " + _APT_SHARED, max_operands=1, operand=_PKG),
    "stats": _spec(_APT_SHARED, max_operands=0),
    "showsrc": _spec("--only-source " + _APT_SHARED, operand=_PKG),
}  # fmt: skip
_APT_VERBS["rdepends"] = _APT_VERBS["depends"]
_APT_READ = {
    "apt": frozenset({"list", "show", "search", "policy", "depends", "rdepends"}),
    "apt-cache": frozenset(_APT_VERBS),
}
_PIP_GLOBAL = "-v --verbose -q --quiet --no-color --disable-pip-version-check --no-input " \
              "--isolated"  # fmt: skip
_PIP_VERBS: dict[str, Spec] = {
    # `--outdated`/`--uptodate` ask the package index over the network
    "list": _spec("-l --local --user -e --editable --exclude-editable --include-editable "
                  "--not-required --pre " + _PIP_GLOBAL,
                  {"--format": choice("columns", "freeze", "json"), "--exclude": _PKG},
                  max_operands=0),
    "show": _spec("-f --files " + _PIP_GLOBAL, operand=_PKG),
    "freeze": _spec("-l --local --user --all --exclude-editable " + _PIP_GLOBAL,
                    {"--exclude": _PKG}, max_operands=0),
    "check": _spec(_PIP_GLOBAL, max_operands=0),
}  # fmt: skip
_NPM_VERBS: dict[str, Spec] = {
    "ls": _spec("-a --all --json -l --long -p --parseable -g --global --prod --production "
                "--dev --link --unicode",
                {"--depth": matches(r"[0-9]{1,3}|Infinity", "a depth"),
                 "--omit": choice("dev", "optional", "peer"),
                 "--include": choice("prod", "dev", "optional", "peer")},
                operand=_PKG),
}  # fmt: skip
_NPM_VERBS["list"] = _NPM_VERBS["ls"]
_SIMPLE_VERBS: dict[str, dict[str, Spec]] = {
    "brew": {"list": _spec("--formula --cask --versions -1 -l --full-name --pinned", operand=_PKG),
             "ls": _spec("--formula --cask --versions -1 -l --full-name", operand=_PKG),
             "info": _spec("--json --installed --formula --cask", operand=_PKG)},
    "snap": {"list": _spec("--all", operand=_PKG), "info": _spec("--verbose", operand=_PKG),
             "version": _spec(max_operands=0)},
    "flatpak": {"list": _spec("--app --runtime --user --system -d --show-details --all",
                              {"--columns": FIELDS}, max_operands=0),
                "info": _spec("--user --system -r --show-ref -c --show-commit -s --show-size "
                              "-m --show-metadata", operand=_PKG)},
}  # fmt: skip
_DPKG_QUERY = _spec(
    "-l --list -W --show -L --listfiles -s --status -S --search -p --print-avail --no-pager "
    "--help --version",
    {**with_values(ANY, "-f --showformat")},
    operand=_PKG,
)
# `--admindir`, `--root`, `--instdir` point dpkg at another database; only the
# query actions are listed.
_DPKG_QUERIES = _opts(
    "-l --list -L --listfiles -s --status -S --search -p --print-avail --get-selections "
    "--print-architecture --print-foreign-architectures -c --contents -I --info -C --audit "
    "-V --verify --version --help"
)
_DPKG = _spec(" ".join(_DPKG_QUERIES) + " --no-pager", operand=_PKG)
# rpm query: `-q` plus query-selection letters. `-E/--eval`, `-D/--define`,
# `--macros`, `--rcfile`, `--dbpath`, `--root`, `--pipe` expand macros or run
# programs; `-V` runs the package's verify scripts. None listed.
_RPM_Q = re.compile(r"-q[aiflcdsRPv]*")
_RPM = _spec(
    "--info --list --configfiles --docfiles --state --requires --provides --changelog --scripts "
    "--triggers --whatrequires --whatprovides --last --dump --conflicts --obsoletes --file -a "
    "--all -i -l -c -d -s -R -f -p --nodigest --nosignature",
    {**with_values(matches(r"([^%]|%%|%[-0-9]*\{[A-Za-z]+(:[a-z]+)?\}|%[-0-9]*\[|\])*",
                           "tags only (no macros)"), "--qf --queryformat")},
    operand=_PKG,
)  # fmt: skip
_PACMAN_Q = re.compile(r"-Q[cdegiklmnopqstu]*|-S[sigl]+q?|-Sq[sigl]+")
_PACMAN = _spec("-q --quiet", {"--color": choice("never", "auto", "always")}, operand=ANY)


def _policy_package(argv: list[str]) -> Verdict | None:
    name = argv[0]
    install = _approval("package", "high", f"`{name}` installs, removes or changes packages")
    if argv[1:] in (["--version"], ["-V"], ["-v"], ["version"]):
        return None

    def verdict(label: str, s: Spec, words: list[str]) -> Verdict | None:
        problem = check(label, s, words)
        return _approval("package", "high", f"{problem} needs approval") if problem else None

    if name == "dpkg-query":
        return verdict(name, _DPKG_QUERY, argv)
    if name == "dpkg":
        if not any(a in _DPKG_QUERIES or a.startswith(("-l", "-L", "-s", "-S", "-p"))
                   for a in argv[1:2]):  # fmt: skip
            return install
        return verdict(name, _DPKG, argv)
    if name == "rpm":
        if len(argv) < 2 or not _RPM_Q.fullmatch(argv[1]):
            return install
        return verdict(name, _RPM, [argv[0], *argv[2:]])
    if name == "pacman":
        if len(argv) < 2 or not _PACMAN_Q.fullmatch(argv[1]):
            return install
        return verdict(name, _PACMAN, [argv[0], *argv[2:]])
    table: Mapping[str, Spec]
    if name in _APT_READ:
        table = {v: _APT_VERBS[v] for v in _APT_READ[name]}
    elif name in ("pip", "pip3"):
        table = _PIP_VERBS
    elif name == "npm":
        table = _NPM_VERBS
    else:
        table = _SIMPLE_VERBS.get(name, {})
    verb = argv[1] if len(argv) > 1 else None
    if verb not in table:
        if name in ("pip", "pip3", "npm") and verb in ("list", "ls", "view", "outdated"):
            return _approval("network", "medium", f"`{name} {verb}` asks the package index")
        return install
    return verdict(f"{name} {verb}", table[verb], [f"{name} {verb}", *argv[2:]])


def _policy_pip_list(argv: list[str]) -> Verdict | None:
    if any(a in ("-o", "--outdated", "-u", "--uptodate") for a in argv[2:]):
        return _approval("network", "medium", f"`{argv[0]} list --outdated` asks the package index")
    return _policy_package(argv)


def _policy_pip(argv: list[str]) -> Verdict | None:
    if argv[1:2] == ["list"]:
        return _policy_pip_list(argv)
    return _policy_package(argv)


_PACKAGE_READ = frozenset(
    {"apt", "apt-cache", "pip", "pip3", "npm", "brew", "snap", "flatpak", "dpkg", "dpkg-query",
     "rpm", "pacman"}
)  # fmt: skip


def _policy_dpkg_query(argv: list[str]) -> Verdict | None:
    return _policy_package(argv)


SUBCOMMAND_POLICIES: dict[str, Policy] = {
    "ip": _policy_ip,
    "systemctl": _policy_systemctl,
    **{name: _policy_ctl for name in _CTL_READ},
    "kubectl": _policy_kubectl,
    "helm": _policy_helm,
    "docker": _policy_docker,
    "podman": _policy_docker,
    "git": _policy_git,
    **{name: _policy_iptables for name in ("iptables", "ip6tables", "iptables-legacy",
                                           "iptables-nft", "iptables-save", "ip6tables-save")},
    "nft": _policy_nft,
    "openssl": _policy_openssl,
    **{name: _policy_package for name in _PACKAGE_READ},
    "pip": _policy_pip,
    "pip3": _policy_pip,
}  # fmt: skip

_SUBCOMMAND_PROGRAMS = frozenset(
    {"git", "kubectl", "helm", "docker", "podman", "systemctl", "ip", "nft", "openssl",
     *_CTL_READ, *_PACKAGE_READ}
)  # fmt: skip
