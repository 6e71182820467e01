"""`shell_exec_safe`: classify a shell command, then run it hardened.

Classification parses the command with a real shell parser (bashlex) and
judges every simple command it finds, through wrappers (`sudo`, `env`,
`timeout`, …), command strings (`bash -c`, `eval`) and substitutions. The
rule is "prove it read-only or ask": only a known read-only program with flags
known to be harmless runs without approval. Anything the classifier does not
understand needs approval; destroying the machine is blocked outright.

Execution runs a simple command as argv (no shell), anything else with
`bash -c`, always in the workspace, with stdin closed, a scrubbed environment,
resource limits, capped output and a timeout that kills the whole process
group.

The package, one module per concept, in dependency order (each imports only
modules above it; `runtime.tools.secrets` holds the one secret list):

- `limits`: the classifier's size and nesting limits; `ResourceLimits`.
- `verdict`: `Classification`, `Verdict` and how verdicts combine (`worst`).
- `options`: GNU-style option parsing (`getopt`, `has_flag`); no abbreviations
  unless a table lists every option.
- `programs`: tables of programs by what they do (read-only, writers, ...).
- `paths`: protected, critical, disk and secret paths; `canonical_path`,
  `secret_reason` (names, system paths, what the bot's environment names).
- `words`: `Arg`, one word and what the shell does to it (globs, braces, `$`).
- `blocking`: the blocked forms (`blocked_reason`).
- `specs`: option allow-lists (`Spec`, value shapes, `check`, `judge`).
- `languages`: mini-languages in arguments (sed, awk, jq/yq, find, test).
- `specs_text`: the allow-lists of the file and text tools (`TEXT_SPECS`).
- `subcommands`: programs with subcommands (git, kubectl, helm, docker, the
  package tools, the systemd `*ctl` tools, iptables, nft, openssl).
- `specs_system`: system and network clients (ps, top, ss, lsof, journalctl,
  free, swapon, systemd-analyze, dig, ...): `SYSTEM_POLICIES`.
- `policies`: the few per-program policies left outside those (`mount`).
- `analyzer`: the tree walker, the wrappers it looks through, secret reads.
- `profiles`: sandbox profiles (network, a socket, the kubeconfig) per program.
- `classifier`: `classify`, the entry point; names the profile a command needs.
- `cgroups`: a pids cgroup per command (RLIMIT_NPROC does not bind root).
- `refusals`: reading what the sandbox stopped from a command's outcome.
- `sandbox`: the bubblewrap profile (`SandboxConfig`, `probe`, `command_prefix`).
- `execution`: `execute` and `scrubbed_env`.
- `tool`: `ShellTool`.

This module re-exports the public API; private helpers stay in their modules.
"""

from __future__ import annotations

from runtime.tools.shell.blocking import blocked_reason
from runtime.tools.shell.classifier import classify
from runtime.tools.shell.execution import execute, scrubbed_env
from runtime.tools.shell.limits import MAX_COMMAND_CHARS, MAX_NESTING, MAX_PARSE_CHARS
from runtime.tools.shell.paths import (
    canonical_path,
    is_critical_file,
    is_disk,
    is_protected,
    secret_reason,
)
from runtime.tools.shell.policies import sed_script_problem
from runtime.tools.shell.programs import INTERPRETERS, SHELLS
from runtime.tools.shell.tool import ShellTool
from runtime.tools.shell.verdict import Classification, Verdict, worst

__all__ = [
    "INTERPRETERS",
    "MAX_COMMAND_CHARS",
    "MAX_NESTING",
    "MAX_PARSE_CHARS",
    "SHELLS",
    "Classification",
    "ShellTool",
    "Verdict",
    "blocked_reason",
    "canonical_path",
    "classify",
    "execute",
    "is_critical_file",
    "is_disk",
    "is_protected",
    "scrubbed_env",
    "secret_reason",
    "sed_script_problem",
    "worst",
]
