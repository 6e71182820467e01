"""What a shell prefix rule may name, and what it may add to what it names.

A prefix rule (`rm -rf build`) covers its own words plus *plain operands*
added after them, and only for programs whose operands are paths. Two things
are decided here:

- `prefix_problem`: the prefixes `rules add` refuses because they would allow
  arbitrary code (a shell or interpreter with its code flag, a wrapper with
  nothing specific after it, a remote shell, an `exec` subcommand of a cluster
  or container client, `git -c`, `find -exec`, `eval`, `source`, …), and the
  ones that could not be bounded (a `cd` or `export` prefix, a path program
  whose prefix ends with an option that may take the next word as its value);
- `plain_operand_problem`: whether one added word is a plain operand inside
  the workspace.

Everything is judged on the quote-removed words (`'--upload-pack'=x` is
`--upload-pack=x`), so quoting cannot hide an option.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import PurePosixPath

from runtime.tools.secrets import is_secret_path
from runtime.tools.shell import SHELLS
from runtime.tools.shell.options import getopt

_PYTHON = re.compile(r"^python[0-9.]*$")

# Programs whose operands are paths, with how many leading operands are not
# paths (the mode of `chmod`, the owner of `chown`) and so must be named by the
# rule itself. For every other program an added operand is a new unit, resource,
# package, host, target or argument the rule did not name: not covered.
PATH_OPERAND_PROGRAMS: dict[str, int] = {
    **dict.fromkeys(
        ("rm", "rmdir", "unlink", "cp", "mv", "mkdir", "touch", "truncate", "cat", "head",
         "tail", "wc", "ls", "stat", "file", "du", "md5sum", "sha1sum", "sha256sum",
         "sha512sum", "b2sum", "cksum", "gzip", "gunzip", "bzip2", "bunzip2", "xz", "unxz",
         "zstd", "unzstd"),
        0,
    ),
    "chmod": 1,
    "chown": 1,
    "chgrp": 1,
}  # fmt: skip
# `git` subcommands whose operands are pathspecs.
GIT_PATHSPEC_SUBCOMMANDS = frozenset({"add", "rm", "mv", "restore"})

# Builtins that change what the commands after them do (directory, variables,
# aliases, options, limits). A rule never covers a part that follows one, and a
# prefix rule of one is refused: only an exact rule for the whole command can
# name such a context.
CONTEXT_BUILTINS = frozenset(
    {"cd", "pushd", "popd", "export", "set", "shopt", "alias", "unalias", "unset", "declare",
     "typeset", "local", "readonly", "hash", "trap", "umask", "ulimit", "enable", "read",
     "mapfile", "readarray", "let", "shift", "getopts", "source", ".", "eval", "exec"}
)  # fmt: skip

# Programs that run a string or their input as code whatever follows them.
_CODE_RUNNERS: dict[str, str] = {
    "eval": "`eval` runs its arguments as shell code",
    "source": "`source` runs a file as shell code in the bot's shell",
    ".": "`.` runs a file as shell code in the bot's shell",
    "exec": "`exec` replaces the shell with any program",
    "xargs": "`xargs` builds its command's operands from its input, which no rule can bound",
    "parallel": "`parallel` builds commands from its input",
    "watch": "`watch` runs its words as a shell command string",
    "su": "`su` runs a command string as another user",
    "script": "`script -c` runs a command string",
}
_REMOTE_SHELLS = frozenset(
    {"ssh", "mosh", "mosh-client", "rsh", "rlogin", "slogin", "autossh", "sshpass", "telnet",
     "rexec"}
)  # fmt: skip
# Subcommands that run a command somewhere else (a pod, a container, a VM).
_REMOTE_SUBCOMMANDS: dict[str, frozenset[str]] = {
    "kubectl": frozenset({"exec", "attach", "debug", "run"}),
    "oc": frozenset({"exec", "rsh", "attach", "debug", "run"}),
    "docker": frozenset({"exec", "run", "attach"}),
    "podman": frozenset({"exec", "run", "attach"}),
    "nerdctl": frozenset({"exec", "run", "attach"}),
    "docker-compose": frozenset({"exec", "run"}),
    "crictl": frozenset({"exec", "attach", "run"}),
    "ctr": frozenset({"exec", "run"}),
    "lxc": frozenset({"exec", "shell", "console"}),
    "incus": frozenset({"exec", "shell", "console"}),
    "vagrant": frozenset({"ssh"}),
    "machinectl": frozenset({"shell", "login"}),
    "virsh": frozenset({"console"}),
    "gcloud": frozenset({"ssh"}),
    "az": frozenset({"ssh"}),
    "aws": frozenset({"start-session"}),
}
# Wrappers this check can see through: (flags, options with a value, operands
# before the wrapped command). A wrapper not listed (`strace`, `chroot`,
# `nsenter`, `systemd-run`, …) gets no prefix rule: make an exact rule.
_WRAPPERS: dict[str, tuple[tuple[str, ...], tuple[str, ...], int]] = {
    "sudo": (
        ("-E", "-H", "-n", "-P", "-S", "-k", "-b", "--preserve-env", "--set-home",
         "--non-interactive", "--preserve-groups", "--stdin", "--reset-timestamp",
         "--background"),
        ("-u", "-g", "-C", "-D", "-p", "-r", "-t", "-T", "-U", "-h", "--user", "--group",
         "--close-from", "--chdir", "--prompt", "--role", "--type", "--command-timeout",
         "--other-user", "--host"),
        0,
    ),
    "doas": (("-n", "-s"), ("-u", "-C"), 0),
    "pkexec": (("--disable-internal-agent",), ("--user",), 0),
    "runuser": (("-l", "--login", "-m", "-p"), ("-u", "--user", "-g", "--group"), 0),
    "env": (("-i", "--ignore-environment", "-0", "--null", "-v", "--debug"),
            ("-u", "--unset", "-C", "--chdir"), 0),
    "timeout": (("--preserve-status", "--foreground", "-v", "--verbose"),
                ("-s", "--signal", "-k", "--kill-after"), 1),
    "nice": ((), ("-n", "--adjustment"), 0),
    "ionice": (("-t", "--ignore"), ("-c", "--class", "-n", "--classdata"), 0),
    "stdbuf": ((), ("-i", "--input", "-o", "--output", "-e", "--error"), 0),
    "nohup": ((), (), 0),
    "setsid": (("-f", "--fork", "-w", "--wait", "-c", "--ctty"), (), 0),
    "time": (("-p", "--portability", "-v", "--verbose", "-q", "--quiet"), (), 0),
    "command": (("-p",), (), 0),
    "builtin": ((), (), 0),
    "busybox": ((), (), 0),
}  # fmt: skip
_UNPARSED_WRAPPERS = frozenset(
    {"strace", "ltrace", "valgrind", "perf", "taskset", "chrt", "numactl", "unshare", "nsenter",
     "chroot", "systemd-run", "firejail", "bwrap", "flock", "unbuffer", "proxychains",
     "proxychains4", "torsocks", "faketime", "gdb", "cgexec", "sg", "newgrp", "caffeinate"}
)  # fmt: skip

# Language interpreters: a code flag runs any program text. (Build tools in
# INTERPRETERS, such as `make`, run what the workspace holds; their prefixes
# cover no added operands, so they name one command like an exact rule.)
_LANGUAGES = frozenset(
    {"perl", "ruby", "irb", "node", "nodejs", "deno", "bun", "php", "lua", "luajit", "Rscript",
     "R", "julia", "tclsh", "wish", "jshell", "groovy", "scala", "kotlin", "osascript", "pwsh",
     "powershell", "erl", "escript", "ghci", "racket", "guile", "sbcl", "ocaml", "swift",
     "expect", "gdb", "pypy", "pypy3"}
)  # fmt: skip
_SHELL_CODE_FLAG = re.compile(r"^-[A-Za-z]*[cs][A-Za-z]*$|^--(command|init-file|rcfile)")
# A short option bundle holding one of these letters (`-c`, `-pe`, `-Bc`, `-ne`)
# gives the interpreter code to run, or makes it read code from its input.
_INTERPRETER_CODE_FLAG = re.compile(r"^-[A-Za-z]*[ceEprxi][A-Za-z]*$")
_INTERPRETER_CODE_LONG = ("--eval", "--print", "--command", "--exec", "--interactive")
# git options that run a program or set configuration (which can name one).
_GIT_CODE_OPTIONS = ("--config-env", "--exec-path", "--upload-pack", "--receive-pack", "--exec",
                     "--extcmd", "--ext-diff", "--tool")  # fmt: skip
_GIT_CODE_SUBCOMMANDS = (("submodule", "foreach"), ("bisect", "run"), ("filter-branch",),
                         ("filter-repo",), ("daemon",), ("difftool",), ("mergetool",),
                         ("rebase", "-x"), ("rebase", "--exec"), ("config",))  # fmt: skip
_FIND_CODE = frozenset({"-exec", "-execdir", "-ok", "-okdir", "-delete", "-fprint", "-fprint0",
                        "-fprintf", "-fls"})  # fmt: skip

_EXACT_INSTEAD = "make an exact rule for the one command instead"
# A plain operand: these characters only (no quoting, expansion, glob, `~`,
# `=` for make-style assignments, `:` for host:path and pathspec magic).
_PLAIN = re.compile(r"^[A-Za-z0-9_.,@%+/-]+$")


def program_name(word: str) -> str:
    return word.rsplit("/", 1)[-1] if "/" in word else word


def _is_interpreter(name: str) -> bool:
    """A shell or a language interpreter (not a build tool)."""
    return name in SHELLS or name in _LANGUAGES or bool(_PYTHON.match(name))


def unwrap(values: Sequence[str]) -> tuple[list[str], str | None]:
    """The wrapped command of a prefix (`sudo -u x systemctl …` -> `systemctl …`).

    Returns the inner argv (empty when nothing specific follows the wrapper)
    and a problem when a wrapper cannot be seen through.
    """
    argv = list(values)
    while argv:
        name = program_name(argv[0])
        if name in _UNPARSED_WRAPPERS:
            return argv, f"`{name}` runs another command in a way this check does not parse"
        if name == "env" and any(a in ("-S", "--split-string") or a.startswith(("-S", "--sp"))
                                 for a in argv[1:]):  # fmt: skip
            return argv, "`env -S` splits a string into a command"
        spec = _WRAPPERS.get(name)
        if spec is None:
            return argv, None
        if name == "command" and len(argv) > 1 and argv[1] in ("-v", "-V"):
            return argv, None  # a lookup, not a wrapper
        flags, with_values, operands = spec
        opts = getopt(argv, flags=flags, values=with_values, stop_at_positional=True)
        if opts.error:
            return argv, f"`{name}` with an {opts.error} cannot be seen through"
        start = opts.positionals[0] if opts.positionals else len(argv)
        start += operands
        # NAME=value words after `env` (or `sudo`) set the wrapped command's environment.
        while start < len(argv) and re.match(r"[A-Za-z_][A-Za-z0-9_]*=", argv[start]):
            start += 1
        argv = argv[start:]
        if not argv:
            return [], f"`{name}` followed by nothing specific would allow any command"
    return argv, None


def _positionals(argv: Sequence[str]) -> list[str]:
    return [a for a in argv[1:] if not a.startswith("-")]


def _long_hit(word: str, names: Sequence[str]) -> bool:
    """`--upload-p=x` is `--upload-pack=x`: GNU abbreviations count."""
    if not word.startswith("--"):
        return False
    name = word.split("=", 1)[0]
    return len(name) > 3 and any(n.startswith(name) for n in names)


def _code_problem(argv: Sequence[str]) -> str | None:
    """Why this command (wrappers removed) would run code no rule can bound."""
    name = program_name(argv[0])
    rest = list(argv[1:])
    if name in _CODE_RUNNERS:
        return _CODE_RUNNERS[name]
    if name in _REMOTE_SHELLS:
        return f"`{name}` runs commands on another machine"
    remote = _REMOTE_SUBCOMMANDS.get(name)
    if remote and remote & set(_positionals(argv)):
        verb = next(a for a in _positionals(argv) if a in remote)
        return f"`{name} {verb}` runs a command inside a pod, container or machine"
    if name in SHELLS and any(_SHELL_CODE_FLAG.match(a) for a in rest):
        return f"`{name}` with its code flag runs any command string"
    if _is_interpreter(name) and name not in SHELLS:
        if any(
            _INTERPRETER_CODE_FLAG.match(a)
            or a.split("=", 1)[0] in _INTERPRETER_CODE_LONG
            or _long_hit(a, _INTERPRETER_CODE_LONG)
            for a in rest
        ):
            return f"`{name}` with its code flag runs any code"
    if _is_interpreter(name) and not _positionals(argv):
        return f"`{name}` alone reads code from its input or arguments"
    if name == "git":
        if _git_global_config(rest):
            return "`git -c` sets configuration that can name a program to run"
        for a in rest:
            if any(
                a == o or a.startswith(o + "=") or _long_hit(a, (o,)) for o in _GIT_CODE_OPTIONS
            ):
                return f"`git {a.split('=', 1)[0]}` names a program for git to run"
        words = [a for a in rest if not a.startswith("-") or a in ("-x", "--exec")]
        for chain in _GIT_CODE_SUBCOMMANDS:
            if _subsequence(chain, words):
                return f"`git {' '.join(chain)}` runs programs or changes what git runs"
    if name == "find" and any(a in _FIND_CODE for a in rest):
        return "`find` with `-exec`, `-ok`, `-delete` or `-fprint` runs or writes beyond a listing"
    return None


def _git_global_config(rest: Sequence[str]) -> bool:
    """A `-c` among git's global options (before the subcommand; `git log -c` is not it)."""
    i = 0
    while i < len(rest):
        a = rest[i]
        if a.startswith("-c") or a.startswith("--config"):
            return True
        if a in ("-C", "--git-dir", "--work-tree", "--namespace", "--super-prefix"):
            i += 2
            continue
        if not a.startswith("-"):
            return False
        i += 1
    return False


def _subsequence(chain: Sequence[str], words: Sequence[str]) -> bool:
    it = iter(words)
    return all(any(w == c for w in it) for c in chain)


def path_operands_allowed(values: Sequence[str]) -> bool:
    """Whether a prefix with these words covers added plain operands (paths)."""
    argv, problem = unwrap(values)
    if problem or not argv:
        return False
    name = program_name(argv[0])
    if name == "git":
        positional = _positionals(argv)
        return bool(positional) and positional[0] in GIT_PATHSPEC_SUBCOMMANDS
    leading = PATH_OPERAND_PROGRAMS.get(name)
    if leading is None:
        return False
    # The mode of `chmod`, the owner of `chown`: named by the rule, never added.
    return len(_positionals(argv)) >= leading


def prefix_problem(values: Sequence[str]) -> str | None:
    """Why `rules add prefix <values>` is refused, or None when it may be added."""
    if not values:
        return "a prefix rule needs a command, such as `git pull`"
    argv, problem = unwrap(values)
    if problem:
        return f"a prefix rule here would allow arbitrary code: {problem}; {_EXACT_INSTEAD}"
    name = program_name(argv[0])
    problem = _code_problem(argv)
    if problem:
        return f"a prefix rule here would allow arbitrary code: {problem}; {_EXACT_INSTEAD}"
    if name in CONTEXT_BUILTINS:
        return (
            f"`{name}` changes what the commands after it do, and no rule covers a command "
            f"that follows it; make an exact rule for the whole command, with its `{name}`"
        )
    if path_operands_allowed(values):
        last = argv[-1]
        if last.startswith("-") and last != "--":
            return (
                f"a prefix rule must not end with an option (`{last}`): the first word added "
                "after it could be that option's value. End it with what the command acts on "
                f"(such as `rm -rf build`), or {_EXACT_INSTEAD}"
            )
    return None


def plain_operand_problem(value: str, workspace: str | os.PathLike[str] | None) -> str | None:
    """Why an added (quote-removed, literal) word is not a plain operand inside the workspace.

    The word is resolved in the workspace, symbolic links included, so a link
    that a pull brought in (`logs/x -> /etc/passwd`) does not lead a `chmod` or
    `truncate` rule outside it. Without the workspace nothing can be added.
    """
    if not value:
        return "an empty word"
    if value.startswith("-"):
        return f"`{value}` is an option"
    if not _PLAIN.match(value):
        return f"`{value}` is not a plain file name (letters, digits and `_.,@%+/-` only)"
    if value.startswith("/"):
        return f"`{value}` is an absolute path"
    parts = [p for p in PurePosixPath(value).parts if p != "."]
    if ".." in value.split("/"):
        return f"`{value}` climbs out with `..`"
    if not parts:
        return f"`{value}` is the workspace itself"
    if ".git" in parts:
        return f"`{value}` is inside `.git` (hooks and config run code)"
    if is_secret_path(value):
        return f"`{value}` is a secret location"
    if workspace is None:
        return "the workspace is not known, so no added path can be checked"
    root = os.path.realpath(workspace)
    resolved = os.path.realpath(os.path.join(root, value))
    if os.path.commonpath([root, resolved]) != root or resolved == root:
        return f"`{value}` leads outside the workspace (a symbolic link)"
    inside = os.path.relpath(resolved, root)
    if ".git" in PurePosixPath(inside).parts or is_secret_path(inside):
        return f"`{value}` leads to `{inside}`"
    return None
