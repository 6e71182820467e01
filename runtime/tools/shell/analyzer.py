"""The analyser: walks bashlex's tree and judges every simple command in it.

`_Analyzer` descends through lists, pipelines, compounds, functions,
redirections, substitutions and command strings (`bash -c`, `eval`, here
documents), and judges each simple command against the blocked forms, the
program tables and the per-program policies. Text the parser rejects still
gets a crude scan for blocked forms.

The wrappers (`sudo`, `env`, `timeout`, `xargs`, `su -c`, …) live here too:
they are judged by what they wrap, so they call back into the analyser, and
the analyser looks them up by name. The two depend on each other, so they
share one module rather than a deferred import.
"""

from __future__ import annotations

import dataclasses
import itertools
import posixpath
import re
import shlex
from collections.abc import Callable, Sequence
from typing import Any

import bashlex

from runtime.tools.shell.blocking import (
    _output_options,
    blocked_reason,
    brace_expand,
    resolve_operand,
)
from runtime.tools.shell.limits import MAX_NESTING, MAX_PARSE_CHARS
from runtime.tools.shell.options import _opts, getopt, has_flag
from runtime.tools.shell.paths import (
    HARMLESS_DEVICES,
    _escapes,
    _has_glob,
    _outside_workspace,
    canonical_path,
    holds_secrets,
    is_critical_file,
    is_disk,
    secret_reason,
)
from runtime.tools.shell.policies import (
    _SUBCOMMAND_PROGRAMS,
    POLICIES,
    READ_ONLY_PROGRAMS,
)
from runtime.tools.shell.programs import (
    _PYTHON_RE,
    _UPLOAD_OPTIONS,
    DOWNLOADERS,
    FLAG_POLICIES,
    FLAG_SENSITIVE,
    INTERPRETERS,
    NETWORK_PROGRAMS,
    NON_READING,
    PACKAGE_PROGRAMS,
    PAGERS,
    PRIVILEGED_PROGRAMS,
    PROCESS_PROGRAMS,
    SAFE_VARIABLES,
    SHELLS,
    SUFFIX_BLOCK_PROGRAMS,
    SYSTEM_BIN_DIRS,
    WRITE_PROGRAMS,
)
from runtime.tools.shell.specs import Spec, judge, parse
from runtime.tools.shell.specs_system import SYSTEM_POLICIES, SYSTEM_SPECS
from runtime.tools.shell.specs_text import TEXT_SPECS
from runtime.tools.shell.verdict import Verdict, _block, _cap, _read, _worse, worst
from runtime.tools.shell.words import _PLAIN_PARAM, Arg, _raw_features

# Every program with an option allow-list: the system programs' (`specs_system`)
# and the file and text tools' (`specs_text`).
ALLOW_LISTS: dict[str, Spec] = {**TEXT_SPECS, **SYSTEM_SPECS}
# What can run unasked: the policies' programs plus every allow-listed one.
_READ_ONLY = READ_ONLY_PROGRAMS | set(ALLOW_LISTS) | set(SYSTEM_POLICIES)
# `$NAME`, `${NAME}`, `${NAME:-x}`, `$1`, `$?`: a parameter inside a word.
_PARAM_TEXT = re.compile(r"\$\{[^}]*\}|\$[A-Za-z_][A-Za-z0-9_]*|\$.")

# --------------------------------------------------------------------------
# The analyser
# --------------------------------------------------------------------------


class _Analyzer:
    def __init__(self, depth: int = 0) -> None:
        self.depth = depth
        self.verdicts: list[Verdict] = []
        self.commands: list[list[str]] = []
        self.programs: list[str] = []  # effective program names, in order seen
        self.complex = False  # anything but one plain simple command
        # Where later commands run: None = the workspace; "?" = somewhere unknown
        # outside it; else a canonical path (`cd /etc && rm -rf *`).
        self.cwd: str | None = None
        self.simple_count = 0
        self.text = ""
        self.nodes: list[Any] = []  # bashlex's tree of `text`, when it parsed
        # Files an earlier part of the command downloaded (`curl -o x URL`,
        # `wget URL`, `curl URL > x`), by full word and by base name: running
        # one later (`sh x`, `./x`) runs unreviewed code and is blocked.
        # Files read through `<` redirections (a profile must not be lent to them).
        self.inputs: list[str] = []
        self.downloads: set[str] = set()
        # Scripts an earlier part wrote from known text (`echo '…' > b.sh`).
        self.scripts: dict[str, str] = {}
        # `cd src` moved below the workspace root: `.` is no longer the root
        # where a project keeps its `.env`.
        self.subdir = False

    # -- entry -----------------------------------------------------------

    def analyze(self, text: str) -> None:
        self.text = text
        if self.depth > MAX_NESTING:
            self.add(Verdict("unknown", "high", "The command nests shells too deeply to judge."))
            return
        if not text.strip():
            self.add(Verdict("unknown", "high", "The command is empty."))
            return
        if len(text) > MAX_PARSE_CHARS:
            self.add(Verdict("unknown", "high", "The command is too long to judge."))
            self._fallback(text)
            return
        try:
            nodes = bashlex.parse(text)
        except Exception as exc:  # bashlex raises many kinds on odd input
            self.add(
                Verdict(
                    "unknown",
                    "high",
                    "The command could not be parsed as shell "
                    f"({_short_error(exc)}), so it needs approval.",
                )
            )
            if not self._around_substitutions(text):
                self._fallback(text)
            return
        self.nodes = nodes
        if len(nodes) > 1:
            self.complex = True
        for node in nodes:
            self.node(node)

    def add(self, verdict: Verdict) -> None:
        self.verdicts.append(verdict)

    def merge(self, other: _Analyzer) -> None:
        self.inputs.extend(other.inputs)
        self.verdicts.extend(other.verdicts)
        self.commands.extend(other.commands)
        self.programs.extend(other.programs)

    def sub(self, text: str) -> _Analyzer:
        inner = _Analyzer(self.depth + 1)
        inner.cwd = self.cwd
        inner.downloads = self.downloads
        inner.scripts = self.scripts
        inner.subdir = self.subdir
        inner.analyze(text)
        self.merge(inner)
        return inner

    # -- tree ------------------------------------------------------------

    def node(self, node: Any) -> list[str] | None:
        kind = getattr(node, "kind", None)
        if kind == "list":
            self.complex = True
            for part in node.parts:
                if part.kind == "operator":
                    if part.op == "&":
                        self.add(
                            Verdict(
                                "process",
                                "medium",
                                "`&` leaves a command running in the background.",
                            )
                        )
                    elif part.op not in (";", "&&", "||", "\n"):
                        self.add(
                            Verdict(
                                "unknown", "high", f"The operator `{part.op}` is not understood."
                            )
                        )
                else:
                    self.node(part)
            return None
        if kind == "pipeline":
            self.complex = True
            effective: list[list[str] | None] = []
            for part in node.parts:
                if part.kind in ("pipe", "reservedword"):
                    if part.kind == "reservedword" and part.word != "!":
                        self.add(Verdict("unknown", "high", f"`{part.word}` is not understood."))
                    continue
                effective.append(self.node(part))
            self._pipe_to_shell(effective)
            raw = [_words_of(p) for p in node.parts if p.kind == "command"]
            for left, right in itertools.pairwise(raw):
                left = _strip_wrappers(left)
                names = [_prog_name(w) for w in right]
                right = right[names.index("xargs") :] if "xargs" in names else right
                endless = left[:1] in (["yes"], ["seq"]) or left[:2] in (["cat", "/dev/zero"],)
                if endless and right[:1] == ["xargs"] and _unbounded_parallel(right):
                    self.add(
                        _block("Endless input into `xargs -P 0` starts processes without end.")
                    )
            return None
        if kind == "command":
            return self.command(node)
        if kind == "compound":
            self.complex = True
            self.add(
                Verdict(
                    "unknown",
                    "medium",
                    "Loops, conditionals, subshells and `{ }` groups need approval.",
                )
            )
            for part in node.list:
                if part.kind == "reservedword":
                    continue
                if part.kind == "word":
                    self.word(part)
                else:
                    self.node(part)
            for redirect in getattr(node, "redirects", None) or []:
                self.redirect(redirect)
            return None
        if kind in ("for", "if", "while", "until"):
            self.complex = True
            if kind in ("while", "until") and _endless_spawner(node, kind):
                self.add(
                    _block(f"An endless `{kind}` loop that starts background jobs: a fork bomb.")
                )
            for part in node.parts:
                if part.kind == "reservedword":
                    continue
                if part.kind == "word":
                    self.word(part)
                else:
                    self.node(part)
            return None
        if kind == "function":
            self.complex = True
            name = node.name.word
            body = _Analyzer(self.depth + 1)
            body.downloads = self.downloads
            body.node(node.body)
            self.merge(body)
            if name in body.programs or any(c and c[0] == name for c in body.commands):
                self.add(_block(f"The function `{name}` calls itself: a fork bomb."))
            self.add(
                Verdict(
                    "unknown", "medium", f"Defining the shell function `{name}` needs approval."
                )
            )
            return None
        self.complex = True
        self.add(Verdict("unknown", "high", f"The shell construct `{kind}` is not understood."))
        return None

    def _pipe_to_shell(self, effective: list[list[str] | None]) -> None:
        for i, left in enumerate(effective):
            right = effective[i + 1] if i + 1 < len(effective) else None
            if left and right and _prog_name(left[0]) in DOWNLOADERS:
                if _prog_name(right[0]) in _EXTRACTORS:
                    # `curl … | tar xz`: files nobody has seen, under names nobody knows
                    self.downloads.add(_ANY_FILE)

            if left and _prog_name(left[0]) in ("echo", "printf") and i + 1 < len(effective):
                right = effective[i + 1]
                if right and _runs_stdin_as_code(right):
                    # `echo ':(){ :|:& };:' | bash`: the echoed text is the script
                    words = [w for w in left[1:] if not (w.startswith("-") and w == left[1])]
                    self.sub(" ".join(words))
            if not left or _prog_name(left[0]) not in DOWNLOADERS:
                continue
            for right in effective[i + 1 :]:
                if right and _runs_stdin_as_code(right):
                    self.add(
                        _block(
                            f"Piping a download (`{_prog_name(left[0])}`) into "
                            f"`{_prog_name(right[0])}` runs unreviewed code."
                        )
                    )
                    return

    def word(self, node: Any) -> Arg:
        """Scan a word node: substitutions are analysed as commands of their own."""
        raw = self.text[node.pos[0] : node.pos[1]] if hasattr(node, "pos") else node.word
        glob, brace, expand = _raw_features(raw)
        arg = Arg(_unquoted(node.word, raw, expand), raw, glob=glob, brace=brace, expand=expand)
        stack = list(getattr(node, "parts", None) or [])
        while stack:
            part = stack.pop()
            pk = part.kind
            if pk in ("commandsubstitution", "processsubstitution"):
                arg.subst = True
                self.complex = True
                before = len(self.programs)
                judged = len(self.verdicts)
                self.node(part.command)
                inner = self.programs[before:]
                what = (
                    "Command substitution"
                    if pk == "commandsubstitution"
                    else "Process substitution"
                )
                # `diff <(sort a) <(sort b)`: a read-only command's output read as a
                # file is a pipe by another name. Its text never becomes words of the
                # outer command (as `$(…)` does), so it only needs what its command needs.
                reads_only = all(v.risk == "low" for v in self.verdicts[judged:])
                if not (pk == "processsubstitution" and raw.startswith("<(") and reads_only):
                    self.add(Verdict("unknown", "medium", f"{what} (`{raw}`) needs approval."))
                arg.params.extend(f"<{p}>" for p in inner)
            elif pk == "parameter":
                arg.params.append(part.value)
            elif pk == "tilde":
                arg.tilde = True
            stack.extend(getattr(part, "parts", None) or [])
        return arg

    def redirect(self, node: Any) -> tuple[str, str] | None:
        """Judge a redirection. Returns what it feeds to stdin, when that matters:
        ("download", "") for `< <(curl …)`, ("text", body) for here-documents/strings."""
        rtype = node.type
        out = node.output
        if rtype in ("<<", "<<-"):
            self.complex = True
            body = getattr(getattr(node, "heredoc", None), "value", "") or ""
            if "$" in body or "`" in body or "\\" in body:
                self.add(
                    Verdict("unknown", "medium", "A here-document with expansions needs approval.")
                )
            # the body ends with the delimiter line
            return ("text", body.rsplit("\n", 1)[0] if "\n" in body else "")
        if isinstance(out, str):  # `2>&-`: closing a descriptor
            if out == "-" and rtype in (">&", "<&"):
                return
            self.add(
                Verdict("unknown", "high", f"The redirection `{rtype}{out}` is not understood.")
            )
            return
        if isinstance(out, int):
            if rtype in (">&", "<&"):
                return  # 2>&1 and friends: fd duplication
            self.add(
                Verdict("unknown", "high", f"The redirection `{rtype}{out}` is not understood.")
            )
            return
        target_arg = self.word(out)
        target = target_arg.word
        self.complex = True
        if rtype == "<<<":
            return ("text", target)
        if rtype in ("<", "<&", "<>") and _is_bash_socket(target):
            self.add(Verdict("network", "high", f"`{target}` opens a network connection."))
            return
        if rtype in ("<", "<&"):
            if rtype == "<&" and target == "-":
                return
            stdin = None
            if any(p.startswith("<") and p[1:-1] in DOWNLOADERS for p in target_arg.params):
                stdin = ("download", "")
            if canonical_path(target) not in HARMLESS_DEVICES and target != "/dev/null":
                self.inputs.append(target)
            reason = secret_reason(target)
            if reason:
                self.add(Verdict("read", "high", f"{reason}; reading it needs approval."))
            elif canonical_path(target) in ENDLESS_DEVICES:
                self.add(Verdict("process", "medium", f"Reading `{target}` never ends."))
            elif not target_arg.literal and not target_arg.tilde:
                self.add(
                    Verdict("read", "medium", f"The input file `{target}` is computed at run time.")
                )
            return stdin
        if rtype in (">", ">>", ">|", "&>", "&>>", ">&", "<>"):
            if rtype == ">&" and target == "-":
                return
            path = canonical_path(target) or target
            if path in HARMLESS_DEVICES and target_arg.literal:
                return
            if _is_bash_socket(target):
                self.add(Verdict("network", "high", f"`{target}` opens a network connection."))
                return
            target = resolve_operand(target, self.cwd)
            if is_disk(target) or is_critical_file(target):
                self.add(_block(f"Redirecting output onto `{target}` would destroy it."))
                return
            outside = self.cwd is not None and (self.cwd == "?" or _outside_workspace(target))
            if (
                outside
                or not target_arg.literal
                or _outside_workspace(target)
                or ".git" in target.split("/")
            ):
                self.add(
                    Verdict(
                        "write",
                        "high",
                        f"Redirecting output into `{target}` writes outside the workspace.",
                    )
                )
            else:
                self.add(
                    Verdict("write", "medium", f"Redirecting output into `{target}` writes a file.")
                )
            return
        self.add(Verdict("unknown", "high", f"The redirection `{rtype}` is not understood."))

    def command(self, node: Any) -> list[str] | None:
        args: list[Arg] = []
        assigns: list[str] = []
        stdin: tuple[str, str] | None = None
        for part in node.parts:
            pk = part.kind
            if pk == "word":
                args.append(self.word(part))
            elif pk == "assignment":
                self.complex = True
                value = self.word(part)  # substitutions inside the value
                if not (value.literal and _harmless_assignment(part.word)):
                    assigns.append(part.word)
            elif pk == "redirect":
                stdin = self.redirect(part) or stdin
            else:
                self.complex = True
                self.add(Verdict("unknown", "high", f"`{pk}` in a command is not understood."))
        argv = [a.word for a in args]
        if argv:
            self.commands.append(argv)
        self.simple_count += 1
        if assigns:
            names = ", ".join(f"`{a.split('=', 1)[0]}`" for a in assigns)
            if argv:
                self.add(
                    Verdict(
                        "process",
                        "high",
                        f"Setting environment variables ({names}) can change what a command runs.",
                    )
                )
            else:
                self.add(
                    Verdict("process", "high", f"Setting shell variables ({names}) needs approval.")
                )
        if not argv:
            return None
        verdict, effective = self.judge(args)
        if effective:
            written = self._runs_written_script(effective)
            if written is not None and written.rank > verdict.rank:
                verdict = written
            ran = self._runs_download(effective)
            if ran and _ANY_FILE in self.downloads and ran not in self.downloads:
                verdict = _block(f"`{ran}` runs code fetched earlier in the command, unreviewed.")
            elif ran:
                verdict = _block(f"`{ran}` was downloaded earlier in the command; running it "
                                 "runs unreviewed code.")  # fmt: skip
            self._note_downloads(effective, node)
        if stdin and effective and _runs_stdin_as_code(effective):
            runner = _prog_name(effective[0])
            if stdin[0] == "download":
                verdict = _block(f"Feeding a download to `{runner}` runs unreviewed code.")
            elif runner in SHELLS or runner in ("eval", "source", "."):
                # `bash <<EOF … EOF`, `sh <<< "…"`: the text is the script; judge it too
                inner = self.sub(stdin[1])
                verdict = _worse(verdict, worst(inner.verdicts))
        self.add(verdict)
        return effective

    # -- downloads, then run ---------------------------------------------

    def _note_downloads(self, argv: list[str], node: Any) -> None:
        name = _prog_name(argv[0])
        if name in ("echo", "printf"):
            self._note_script(argv, node)
            return
        if _fetches_a_tree(name, argv):
            self.downloads.add(_ANY_FILE)  # a cloned tree: its scripts and Makefile
            return
        if name not in DOWNLOADERS:
            return
        files = _download_targets(name, argv)
        for part in node.parts:
            if part.kind == "redirect" and part.type in (">", ">>", ">|", "&>", "&>>"):
                out = part.output
                if not isinstance(out, (str, int)):
                    files.append(out.word)
        for f in files:
            if f and f != "-":
                self.downloads.add(f)
                self.downloads.add(posixpath.basename(f.rstrip("/")))

    def _note_script(self, argv: list[str], node: Any) -> None:
        """`echo '…' > f.sh`: remember the text, to judge it when `f.sh` is run."""
        words = argv[1:]
        if words and words[0].startswith("-") and argv[0] == "echo":
            words = words[1:]
        for part in node.parts:
            if part.kind == "redirect" and part.type in (">", ">>", ">|"):
                out = part.output
                if not isinstance(out, (str, int)):
                    self.scripts[out.word] = " ".join(words)
                    self.scripts[posixpath.basename(out.word)] = " ".join(words)

    def _runs_written_script(self, argv: list[str]) -> Verdict | None:
        """The verdict of a script this command wrote earlier and now runs (`bash b.sh`)."""
        if not self.scripts:
            return None
        name = _prog_name(argv[0])
        targets = [argv[0]] if "/" in argv[0] or argv[0] in self.scripts else []
        if name in SHELLS or name in ("source", "."):
            targets += [w for w in argv[1:] if not w.startswith("-")][:1]
        for t in targets:
            text = self.scripts.get(t) or self.scripts.get(posixpath.basename(t))
            if text is not None:
                inner = _Analyzer(self.depth + 1)
                inner.analyze(text)
                return worst(inner.verdicts)
        return None

    def _runs_download(self, argv: list[str]) -> str | None:
        """The downloaded file this command runs, if any."""
        if not self.downloads:
            return None
        name = _prog_name(argv[0])
        if _ANY_FILE in self.downloads:
            runs_code = name in SHELLS or name in INTERPRETERS or _PYTHON_RE.match(name)
            if (
                runs_code
                or name in ("source", ".")
                or (
                    "/" in argv[0]
                    and not argv[0].startswith(tuple(d + "/" for d in SYSTEM_BIN_DIRS))
                )
            ):
                return argv[0]
        if argv[0] in self.downloads or ("/" in argv[0] and name in self.downloads):
            return argv[0]
        if (
            name in SHELLS
            or name in INTERPRETERS
            or _PYTHON_RE.match(name)
            or name in ("source", ".", "exec", "nohup", "setsid")
        ):
            for word in argv[1:]:
                if not word.startswith("-") and (
                    word in self.downloads or posixpath.basename(word) in self.downloads
                ):
                    return word
        return None

    # -- simple commands -------------------------------------------------

    def judge(self, args: list[Arg]) -> tuple[Verdict, list[str]]:
        """Judge one simple command (already split into words)."""
        argv = [a.word for a in args]
        head = args[0]
        if (not head.literal and head.raw != "[") or not head.word:
            self.complex = True
            self.programs.append("?")
            guessed = _guess_blocked(args)
            if guessed:
                return _block(guessed[0].upper() + guessed[1:] + "."), argv
            return (
                Verdict(
                    "unknown",
                    "high",
                    f"The program name `{head.raw}` is computed when the command runs.",
                ),
                argv,
            )
        prog = head.word
        name = _prog_name(prog)
        self.programs.append(name)
        reason = blocked_reason(name, argv, self.cwd)
        if reason:
            return _block(reason[0].upper() + reason[1:] + "."), argv
        if name in ("cd", "pushd"):
            self._change_directory(args)
        if "/" in prog and posixpath.dirname(posixpath.normpath(prog)) not in SYSTEM_BIN_DIRS:
            v = Verdict(
                "unknown",
                "high",
                f"`{prog}` runs a program from a path the classifier does not know.",
            )
            return self._with_suffix_scan(v, args), argv
        wrapper = WRAPPERS.get(name)
        if wrapper is not None:
            return wrapper(self, args)
        if name in SHELLS:
            return self._shell(args), argv
        if name in ("eval",):
            self.complex = True
            if self._subst_download(args):
                return _block("`eval` of a download runs unreviewed code."), argv
            inner = self.sub(" ".join(argv[1:]))
            return _floor(
                inner, Verdict("process", "high", "`eval` runs a string as shell code.")
            ), argv
        if name in ("source", "."):
            self.complex = True
            if self._subst_download(args):
                return _block(f"`{name}` of a download runs unreviewed code."), argv
            return Verdict("process", "high", f"`{name}` runs a shell script in this shell."), argv
        if name in ("cd", "type", "ulimit"):
            self.complex = True  # shell builtins: run through bash
        verdict = self._program(name, args)
        if verdict.risk != "low" and not verdict.blocked:
            verdict = self._with_suffix_scan(verdict, args)
        return verdict, argv

    def _change_directory(self, args: list[Arg]) -> None:
        operands = [a for a in args[1:] if not a.word.startswith("-") or a.word == "-"]
        if not operands:
            self.cwd = "~"
            return
        target = operands[0]
        unknown = [p for p in target.params if p not in SAFE_VARIABLES]
        if target.word == "-" or target.subst or (target.expand and not target.params) or unknown:
            self.cwd = "?"
            return
        path = canonical_path(target.word)
        if path is not None:
            self.cwd = path
        elif self.cwd is None:
            self.cwd = "?" if _escapes(target.word) else None
            if self.cwd is None and target.word.strip("./"):
                self.subdir = True  # below the workspace root (`cd src`)
        elif self.cwd != "?":
            self.cwd = canonical_path(resolve_operand(target.word, self.cwd)) or "?"

    def _program(self, name: str, args: list[Arg]) -> Verdict:
        argv = [a.word for a in args]
        argv[0] = name
        secret = self._secret(name, args)
        if name in _READ_ONLY:
            v = self._read_only(name, argv, args)
            if v.risk == "low" and secret:
                return secret
            return _worse(v, secret)
        if name in INTERPRETERS or _PYTHON_RE.match(name):
            if argv[1:] in (["--version"], ["-V"], ["-v"], ["version"]):
                return _read(f"`{name} --version` only prints a version.")
            if self._subst_download(args):
                return _block(f"Running a download with `{name}` runs unreviewed code.")
            return _worse(Verdict("process", "high", f"`{name}` runs code."), secret)
        if name in PAGERS:
            return Verdict(
                "unknown",
                "medium",
                f"`{name}` is an interactive program that can run commands; use `cat` or `head`.",
            )
        if name in DOWNLOADERS:
            sends = has_flag(argv, "TdFXu", _UPLOAD_OPTIONS)
            if sends:
                return _worse(
                    Verdict("network", "high", f"`{name}` sends data over the network."), secret
                )
            return _worse(
                Verdict("network", "medium", f"`{name}` contacts the network and may write files."),
                secret,
            )
        if name in WRITE_PROGRAMS:
            return _worse(self._write(name, args), secret)
        if name in PROCESS_PROGRAMS:
            return Verdict("process", "high", PROCESS_PROGRAMS[name] + ".")
        if name in PACKAGE_PROGRAMS:
            return Verdict("package", "high", f"`{name}` installs, removes or changes packages.")
        if name in NETWORK_PROGRAMS:
            return Verdict("network", "high", NETWORK_PROGRAMS[name] + ".")
        if name in PRIVILEGED_PROGRAMS or name.startswith("mkfs."):
            return Verdict("privileged", "high", f"`{name}` changes system configuration.")
        if name in ("init", "telinit"):
            return Verdict("privileged", "high", f"`{name}` changes the system run level.")
        if name in ("exec", "xargs"):  # reached only without a command to wrap
            return Verdict("process", "high", f"`{name}` needs approval.")
        return _worse(
            Verdict("unknown", "high", f"`{name}` is not a program known to be read-only."), secret
        )

    def _read_only(self, name: str, argv: list[str], args: list[Arg]) -> Verdict:
        if name == "find":
            found = self._find_exec(argv, args)
            if found is not None:
                return found
        policy = FLAG_POLICIES.get(name)
        if policy and has_flag(argv, policy[0], policy[1]):
            action = "write" if "writ" in policy[2] or "edit" in policy[2] else "process"
            if name in ("journalctl", "dmesg"):
                action = "process"
            risk = "medium" if name not in ("rg",) else "high"
            v = Verdict(action, risk, _cap(policy[2]) + ".")
            if action == "write":
                targets = [Arg.plain(t) for t in _output_options(name, argv)]
                return _worse(v, self._write_outside(name, targets, v.reason))
            return v
        fn = SYSTEM_POLICIES.get(name) or POLICIES.get(name)
        if fn is not None:
            v = fn(argv)
            if v is not None:
                return self._policy_verdict(name, v, args)
        allow = ALLOW_LISTS.get(name)
        if allow is not None:
            v = judge(name, allow, argv)
            if v is not None:
                return self._policy_verdict(name, v, args)
        elif fn is None:
            # fail closed: a program that can run unasked has its options listed
            return Verdict("unknown", "medium", f"`{name}` has no option allow-list yet.")
        words = self._word_problem(name, args)
        if words:
            return words
        endless = _endless_input(name, argv)
        if endless:
            return endless
        recursive = _recursive_secret_read(name, argv, self.subdir and self.cwd is None, self.cwd)
        if recursive:
            return recursive
        label = name
        if name in _SUBCOMMAND_PROGRAMS:
            verb = next((a for a in argv[1:] if not a.startswith("-")), None)
            label = f"{name} {verb}" if verb else name
        return _read(f"`{label}` only reads.")

    def _find_exec(self, argv: list[str], args: list[Arg]) -> Verdict | None:
        """`find … -exec CMD {} +`: approval, and no lower than what CMD itself needs.

        The file names find passes start with a start point (`./x`, `/var/log/x`),
        never with `-`, so they cannot become options of CMD. `-ok`/`-okdir`
        prompt on a terminal and stay with the expression check (approval).
        """
        if "-exec" not in argv and "-execdir" not in argv:
            return None
        kept: list[int] = [0]  # indices of the words find itself gets
        commands: list[list[Arg]] = []
        i = 1
        while i < len(argv):
            if argv[i] in ("-exec", "-execdir"):
                j = i + 1
                while j < len(argv) and argv[j] not in (";", "+"):
                    j += 1
                if j >= len(argv) or j == i + 1:
                    return None  # unterminated: the expression check says why
                commands.append([_found(a) for a in args[i + 1 : j]])
                i = j + 1
                continue
            kept.append(i)
            i += 1
        verdicts = []
        for command in commands:
            inner = _Analyzer(self.depth + 1)
            inner.text = " ".join(a.raw for a in command)
            verdict, _ = inner.judge(command)
            verdicts.append(_worse(verdict, worst(inner.verdicts)))
        decider = worst(verdicts)
        if decider is not None and decider.risk != "low":
            return Verdict(
                decider.action,
                "high" if decider.risk == "low" else decider.risk,
                f"`find -exec {commands[0][0].word}`: {decider.reason}",
                blocked=decider.blocked,
            )
        v = self._read_only("find", [argv[k] for k in kept], [args[k] for k in kept])
        if v.risk != "low":
            return v
        names = ", ".join(f"`{c[0].word}`" for c in commands)
        # read-only or not, a command run per file found is for a person to allow
        return Verdict("process", "medium", f"`find -exec` runs {names} on every file found.")

    def _policy_verdict(self, name: str, v: Verdict, args: list[Arg]) -> Verdict:
        reason = v.reason if v.reason.endswith(".") else v.reason + "."
        v = Verdict(v.action, v.risk, _cap(reason))
        if v.action == "write" and v.risk == "medium":
            return _worse(v, self._write_outside(name, args[1:], v.reason))
        return v

    def _word_problem(self, name: str, args: list[Arg]) -> Verdict | None:
        allow = ALLOW_LISTS.get(name)
        # Every allow-listed program parses options, so a word that could
        # become one at run time (a glob matching a file named `-exec`, an
        # unknown variable) is a question, unless it comes after `--` or the
        # program has no harmful option at all (`Spec.glob_safe`).
        # The system programs' policies parse options too (`specs_system`).
        sensitive = name in FLAG_SENSITIVE or allow is not None or name in SYSTEM_POLICIES
        glob_ok = allow is not None and allow.glob_safe
        after_dashes = False
        for a in args[1:]:
            if a.word == "--" and a.literal and (allow is None or allow.honours_dashes):
                after_dashes = True
                continue
            if after_dashes:
                sensitive = False
            if a.subst:
                continue  # already judged as a substitution
            if a.brace:
                return Verdict("unknown", "medium", f"Brace expansion in `{a.raw}` needs approval.")
            for p in a.params:
                if p.startswith("<"):
                    continue
                if not _PLAIN_PARAM.fullmatch(p):
                    return Verdict(
                        "unknown", "medium", f"The expansion `{a.raw}` is not understood."
                    )
                # `a.expand` is False when every `$` sits in single quotes
                # (`-f='${Package}'`: dpkg-query's own format, not the shell's).
                if sensitive and p not in SAFE_VARIABLES and a.expand:
                    return Verdict(
                        "unknown", "medium", f"`${p}` could expand to an option of `{name}`."
                    )
            if a.expand and not a.params:
                return Verdict(
                    "unknown", "medium", f"The expansion in `{a.raw}` is not understood."
                )
            if sensitive and not glob_ok and a.glob and a.raw[:1] in "*?[":
                return Verdict(
                    "unknown",
                    "medium",
                    f"The glob `{a.raw}` could expand to a file named like an option of `{name}`.",
                )
        return None

    def _secret(self, name: str, args: list[Arg]) -> Verdict | None:
        """A word that names, or could name, a secret location: `high`, approval.

        Checked after every expansion the classifier can prove: the directory
        a `cd` moved to (`cd /proc/1 && cat environ`), and variables read as
        "anything" (an unset `$X` in `.e${X}nv` is empty, so `.env`). A word
        made only of unknown variables names nothing provable.
        """
        if name in NON_READING:
            return None
        patterns = _pattern_positions(name, [a.word for a in args])
        for index, a in enumerate(args[1:], 1):
            if index in patterns:
                continue  # a search pattern or a program's text, not a file to read
            for word in self._readings(a):
                reason = secret_reason(word) if word else None
                if reason:
                    return Verdict("read", "high", f"{reason}; reading it needs approval.")
                if word is None:
                    return Verdict(
                        "read",
                        "medium",
                        f"`{a.raw}` is only known at run time and could name a secret.",
                    )
            if a.glob and name not in _NAME_ONLY and _any_name_glob(a.word):
                return Verdict(
                    "read",
                    "high",
                    f"`{a.raw}` matches every file there, secret-named ones (`id_rsa`, "
                    "`*.key`) included; reading them needs approval.",
                )
            if self.cwd == "?" and not a.word.startswith(("-", "/", "~")) and a.word:
                if name not in ("cd", "pushd"):
                    return Verdict(
                        "read",
                        "medium",
                        f"`{a.raw}` is read from a directory only known at run time.",
                    )
        return None

    def _readings(self, a: Arg) -> list[str | None]:
        """The spellings of one word worth checking for secrets (None: unprovable)."""
        words: list[str | None] = [a.word]
        if self.cwd not in (None, "?") and a.word and not a.word.startswith(("-", "/", "~")):
            words.append(resolve_operand(a.word, self.cwd))
        unknown = [p for p in a.params if not p.startswith("<") and p not in SAFE_VARIABLES]
        if unknown or a.subst:
            anything = _PARAM_TEXT.sub("*", a.word)
            if a.subst:
                anything = re.sub(r"\$\(.*\)|`[^`]*`", "*", anything)
            words.append(anything)
            if not anything.replace("*", "").strip("/"):
                words.append(None)  # nothing but unknowns: could be any path
        return words

    def _write_outside(self, name: str, operands: list[Arg], reason: str) -> Verdict | None:
        """A `high` verdict when a write reaches outside the workspace, else None."""
        if self.cwd is not None and (self.cwd == "?" or _outside_workspace(self.cwd + "/x")):
            return Verdict(
                "write", "high", f"{reason.rstrip('.')}, after `cd` out of the workspace."
            )
        for a in operands:
            if a.word.startswith("-") or not a.word:
                continue
            if a.expand or a.subst or _outside_workspace(a.word) or ".git" in a.word.split("/"):
                return Verdict("write", "high", f"{reason.rstrip('.')}, outside the workspace.")
        return None

    def _write(self, name: str, args: list[Arg]) -> Verdict:
        reason = WRITE_PROGRAMS[name]
        if name == "sed":
            reason = "`sed -i` edits files in place"
        if self.cwd is not None and (self.cwd == "?" or _outside_workspace(self.cwd + "/x")):
            return Verdict("write", "high", f"{_cap(reason)}, after `cd` out of the workspace.")
        for a in args[1:]:
            if a.word.startswith("-") and a.word != "-":
                continue
            if not a.literal and not a.tilde:
                if name in ("rm", "shred", "mv", "chmod") and "$" in a.raw:
                    return Verdict(
                        "write",
                        "high",
                        f"{_cap(reason)}, and `{a.raw}` is only known at run time.",
                    )
                if a.expand or a.subst:
                    return Verdict(
                        "write",
                        "high",
                        f"{_cap(reason)}, and `{a.raw}` is only known at run time.",
                    )
            if _outside_workspace(a.word) or ".git" in a.word.split("/"):
                return Verdict(
                    "write",
                    "high",
                    f"{reason[0].upper() + reason[1:]} outside the workspace (`{a.word}`).",
                )
        return Verdict("write", "medium", reason[0].upper() + reason[1:] + ".")

    def _with_suffix_scan(self, verdict: Verdict, args: list[Arg]) -> Verdict:
        argv = [a.word for a in args]
        for i in range(1, len(argv)):
            name = _prog_name(argv[i])
            if name in SUFFIX_BLOCK_PROGRAMS or name.startswith("mkfs."):
                reason = blocked_reason(name, argv[i:], self.cwd)
                if reason:
                    return _block(reason[0].upper() + reason[1:] + ".")
        return verdict

    def _subst_download(self, args: list[Arg]) -> bool:
        return any(p.startswith("<") and p[1:-1] in DOWNLOADERS for a in args[1:] for p in a.params)

    def _shell(self, args: list[Arg]) -> Verdict:
        self.complex = True
        argv = [a.word for a in args]
        name = _prog_name(argv[0])
        command_string: str | None = None
        has_c = False
        i = 1
        while i < len(argv):
            a = argv[i]
            if a == "--":
                i += 1
                break
            if a in ("-o", "+o", "-O", "+O", "--rcfile", "--init-file"):
                i += 2
                continue
            if a.startswith("--") or (a[:1] in "-+" and len(a) > 1):
                if not a.startswith("--") and "c" in a:
                    has_c = True
                i += 1
                continue
            break
        if has_c and i < len(argv):
            command_string = argv[i]
        if self._subst_download(args):
            return _block(f"Running a download with `{name}` runs unreviewed code.")
        if has_c and command_string is not None:
            inner = self.sub(command_string)
            return _floor(
                inner,
                Verdict("process", "high", f"`{name} -c` runs a command string as shell code."),
            )
        if self._subst_download(args):
            return _block(f"Running a download with `{name}` runs unreviewed code.")
        return Verdict("process", "high", f"`{name}` runs a shell script.")

    # -- fallback for what does not parse ---------------------------------

    def _around_substitutions(self, text: str) -> bool:
        """Judge `$(…)`, `<(…)` and backquotes on their own when bashlex fails on the whole.

        bashlex cannot parse some substitutions (`echo $(cd / && rm -rf *)`):
        each one's text is judged as a command of its own (so a blocked form
        inside stays blocked, with its `cd` context), then the rest with a
        plain word in its place. Returns False when there was nothing to take
        out or the rest still does not parse (the crude scan then runs).
        """
        outer, inner = _take_out_substitutions(text)
        if not inner:
            return False
        for part in inner:
            self.sub(part)
        try:
            nodes = bashlex.parse(outer)
        except Exception:
            self._fallback(outer)
            return True
        self.complex = True
        saved = self.text
        self.text = outer
        for node in nodes:
            self.node(node)
        self.text = saved
        return True

    def _fallback(self, text: str) -> None:
        """Look for blocked forms in text the parser rejected (it still needs approval)."""
        try:
            lex = shlex.shlex(text.replace("\x00", " "), posix=True, punctuation_chars=";&|()<>")
            lex.whitespace_split = True
            tokens = list(lex)
        except ValueError:
            tokens = text.split()
        segments: list[list[str]] = [[]]
        pipes: list[str] = []
        for tok in tokens:
            if tok and all(c in ";&|()<>" for c in tok):
                pipes.append(tok)
                segments.append([])
            else:
                segments[-1].append(tok)
        effective: list[list[str] | None] = []
        for seg in segments:
            argv = _strip_wrappers(seg)
            effective.append(argv or None)
            if not argv:
                continue
            reason = blocked_reason(_prog_name(argv[0]), argv)
            if reason is None:
                for i in range(1, len(argv)):
                    reason = blocked_reason(_prog_name(argv[i]), argv[i:])
                    if reason:
                        break
            if reason:
                self.add(_block(reason[0].upper() + reason[1:] + "."))
                return
        self._pipe_to_shell(effective)


# Devices that never run dry: reading one to its end is a runaway.
ENDLESS_DEVICES = frozenset({"/dev/zero", "/dev/urandom", "/dev/random", "/dev/full"})
_HEAD_BOUND = re.compile(r"[0-9]{1,7}")  # `head -c 32 /dev/urandom`: a bounded read


def _endless_input(name: str, argv: list[str]) -> Verdict | None:
    """`cat /dev/zero`, `sort /dev/urandom`: a read that never ends (or fills memory)."""
    hits = [w for w in argv[1:] if canonical_path(w.rsplit("=", 1)[-1]) in ENDLESS_DEVICES]
    if not hits:
        return None
    if name == "head":
        counts = [argv[i + 1] for i, w in enumerate(argv[:-1]) if w in ("-c", "-n")]
        counts += [w[2:] for w in argv[1:] if w[:2] in ("-c", "-n") and len(w) > 2]
        if counts and all(_HEAD_BOUND.fullmatch(c) for c in counts):
            return None
    return Verdict("process", "medium", f"Reading `{hits[0]}` with `{name}` never ends.")


# Variables that only change how a program formats its output (locale, time
# zone, width, colour), given a plain value: `LC_ALL=C sort`. Anything else
# (`PATH=`, `LD_PRELOAD=`, `PAGER=`, `GIT_*`) can change what runs.
_HARMLESS_VARIABLE = re.compile(
    r"(LANG|LANGUAGE|LC_[A-Z]+|TZ|COLUMNS|LINES|NO_COLOR|TERM|POSIXLY_CORRECT)="
    r"(?![:/])(?!.*\.\.)[A-Za-z0-9_.@+/-]{0,64}"
)


def _harmless_assignment(word: str) -> bool:
    return bool(_HARMLESS_VARIABLE.fullmatch(word))


_GREPS = frozenset({"grep", "egrep", "fgrep", "zgrep", "zegrep", "zfgrep"})


# Programs that print names, sizes or counts of the files a glob gives them,
# never their contents: `ls *`, `du -sh *`, `wc -l *` reveal no secret.
_NAME_ONLY = frozenset({"ls", "du", "wc", "stat", "file", "find", "tree", "cd", "pushd"})


def _any_name_glob(word: str) -> bool:
    """A relative glob with a component that matches any name (`*`, `*/*`, `sub/*`).

    In the workspace such a glob reaches secret-named files (`id_rsa`,
    `server.key`) whatever they are called; absolute globs are matched against
    the known secret paths instead (`paths.secret_reason`).
    """
    if word.startswith(("/", "~")):
        return False
    return any(part and not part.strip("*") for part in word.split("/"))


def _recursive_secret_read(
    name: str, argv: list[str], in_subdir: bool, cwd: str | None = None
) -> Verdict | None:
    """`grep -r x /etc`, `grep -r x .`, `rg --hidden x`: every file under a tree with secrets.

    grep's recursion includes hidden files (the workspace's `.env`); ripgrep
    skips hidden ones unless told (`--hidden`, `-uu`), but not `/etc/shadow`.
    """
    if name == "git" and "diff" in argv and "--no-index" in argv:
        # `git diff --no-index . /dev/null` is `diff -r`: every file under `.`
        for start in argv[argv.index("diff") + 1 :]:
            if not start.startswith("-") and holds_secrets(start):
                return Verdict(
                    "read", "high", f"`git diff --no-index` reads every file under `{start}`."
                )
        return None
    if name not in _GREPS and name not in ("rg", "diff"):
        return None
    allow = ALLOW_LISTS[name]
    opts = parse(allow, argv)
    if opts.error:
        return None  # the allow-list already asked
    operands = [argv[i] for i in opts.positionals]
    if name == "diff":
        # `diff -r /etc ./backup` prints the lines of every file that differs
        if not opts.has("-r", "--recursive"):
            return None
        for start in operands:
            if holds_secrets(start):  # `.` too: the workspace root holds its `.env`
                return Verdict(
                    "read", "high", f"`diff -r` reads every file under `{start}`, secrets too."
                )
        return None
    if not opts.has("-e", "--regexp", "-f", "--file") and operands and not opts.has("--files"):
        operands = operands[1:]  # the pattern
    if name in _GREPS:
        recursive = opts.has("-r", "-R", "--recursive", "--dereference-recursive") or any(
            v == "recurse" for v in opts.values("-d", "--directories")
        )
        if not recursive:
            return None
        hidden = True
    else:
        u_count = sum(w.count("u") for w in argv[1:] if w[:1] == "-" and w[1:2] != "-")
        # `-u`/`--no-ignore` add git-ignored files (where secrets are kept on
        # purpose), `-uu`/`--hidden` dotfiles such as `.env`
        hidden = u_count >= 1 or any(w.startswith(("--hidden", "--no-ignore")) for w in argv[1:])
    for start in operands or ["."]:
        if cwd is not None and canonical_path(start) is None:
            if cwd == "?":
                return Verdict(
                    "read",
                    "medium",
                    f"`{name}` reads a tree in a directory known only at run time.",
                )
            start = canonical_path(resolve_operand(start, cwd)) or start
        relative = canonical_path(start) is None
        if relative and in_subdir and not _escapes(start):
            continue  # `cd src && grep -r x .`: a subdirectory, not the root
        # ripgrep skips dotfiles and ignored files, not `id_rsa` or `server.key`
        # at the workspace root: a search of the root reads those too.
        root_read = name == "rg" and not opts.has("--files")  # `--files` prints names
        if (hidden or not relative or root_read) and holds_secrets(start):
            return Verdict(
                "read",
                "high",
                f"`{name}` reads every file under `{start}`, where secrets are kept.",
            )
    return None


def _unquoted(word: str, raw: str, expand: bool) -> str:
    """The word bash passes on, for a word without expansions.

    bashlex leaves the quotes of a single-quoted piece that follows a
    double-quoted one (`"/etc/sh"'ad'ow` comes back as `/etc/sh'ad'ow`), which
    would hide `/etc/shadow` from the secret check; shlex removes quotes the
    way bash does when nothing in the word expands.
    """
    if expand or ("'" not in raw and '"' not in raw):
        return word
    try:
        split = shlex.split(raw, comments=False, posix=True)
    except ValueError:
        return word
    return split[0] if len(split) == 1 else word


_SUBST_WORD = "ducklm_substitution"


def _take_out_substitutions(text: str) -> tuple[str, list[str]]:
    """`text` with each outermost `$(…)`, `<(…)`, `>(…)` and `` `…` `` replaced by a word.

    Quotes are followed (nothing is taken out of single quotes); nesting is
    counted. Returns the new text and the texts taken out.
    """
    out: list[str] = []
    inner: list[str] = []
    i, n = 0, len(text)
    quote: str | None = None
    while i < n:
        c = text[i]
        if c == "\\" and quote != "'":
            out.append(text[i : i + 2])
            i += 2
            continue
        if quote == "'":
            out.append(c)
            if c == "'":
                quote = None
            i += 1
            continue
        if c in "'\"" and quote is None:
            quote = c if c == "'" else '"'
            out.append(c)
            i += 1
            continue
        if c == '"' and quote == '"':
            quote = None
            out.append(c)
            i += 1
            continue
        opener = text[i : i + 2]
        if opener in ("$(", "<(", ">(") and text[i : i + 3] != "$((":
            end = _matching_paren(text, i + 2)
            if end < 0:
                return text, []
            inner.append(text[i + 2 : end])
            out.append(_SUBST_WORD)
            i = end + 1
            continue
        if c == "`":
            end = text.find("`", i + 1)
            if end < 0:
                return text, []
            inner.append(text[i + 1 : end])
            out.append(_SUBST_WORD)
            i = end + 1
            continue
        out.append(c)
        i += 1
    return "".join(out), inner


def _matching_paren(text: str, start: int) -> int:
    """Index of the `)` closing a `(` just before `start`, or -1."""
    depth, i, quote = 0, start, None
    while i < len(text):
        c = text[i]
        if c == "\\" and quote != "'":
            i += 2
            continue
        if quote:
            if c == quote:
                quote = None
        elif c in "'\"":
            quote = c
        elif c == "(":
            depth += 1
        elif c == ")":
            if depth == 0:
                return i
            depth -= 1
        i += 1
    return -1


# Programs whose first operand (or `-e` values) is a pattern or a program text,
# never a file: `grep token app.log` searches for "token"; it reads app.log.
# The languages keep these texts from reading files themselves (no `getline`
# in awk, `r` targets in sed are checked, no `import`/`load` in jq and yq).
_PATTERN_FIRST = frozenset(
    {"grep", "egrep", "fgrep", "zgrep", "zegrep", "zfgrep", "bzgrep", "xzgrep", "zstdgrep",
     "rg", "awk", "gawk", "mawk", "nawk", "sed", "jq", "yq"}
)  # fmt: skip
_PATTERN_OPTIONS = ("-e", "--regexp", "--expression", "--source")


def _pattern_positions(name: str, argv: list[str]) -> set[int]:
    """Indices of argv that are patterns or program texts (not paths) for `name`."""
    allow = ALLOW_LISTS.get(name)
    if name not in _PATTERN_FIRST or allow is None:
        return set()
    opts = parse(allow, argv)
    if opts.error:
        return set()
    out: set[int] = set()
    for i, word in enumerate(argv[:-1]):
        if word in _PATTERN_OPTIONS or (word[:2] == "-e" and name not in ("jq", "yq")):
            out.add(i + 1 if word in _PATTERN_OPTIONS else i)
    for i, word in enumerate(argv):
        if any(word.startswith(o + "=") for o in _PATTERN_OPTIONS):
            out.add(i)
    if name in ("jq", "yq"):
        positionals = [i for i in opts.positionals if argv[i] not in ("e", "eval", "ea")]
        return out | set(positionals[:1])
    if opts.has(*_PATTERN_OPTIONS, "-f", "--file", "--files") or not opts.positionals:
        return out
    return out | {opts.positionals[0]}


def _guess_blocked(args: list[Arg]) -> str | None:
    """A blocked form behind a program name bash computes: `{rm,-rf,/}`, `/???/???/reboot`.

    Braces are expanded the way bash would (comma lists); a glob in the
    directory part still leaves the program's own name (`reboot`) known.
    """
    words = [a.word for a in args]
    head = args[0]
    if head.brace:
        words = [w for word in words for w in brace_expand(word)]
    if not words:
        return None
    name = posixpath.basename(words[0])
    if (head.glob and not _has_glob(name)) or head.brace:
        return blocked_reason(name, words)
    return None


def _found(a: Arg) -> Arg:
    """An argument of `find -exec` with `{}` (the file found, never a brace expansion)."""
    if "{}" not in a.word:
        return a
    raw = a.raw.replace("{}", "./found")
    return dataclasses.replace(a, word=a.word.replace("{}", "./found"), raw=raw,
                               brace=a.brace and "{" in raw)  # fmt: skip


_ANY_FILE = "\0any"  # in `downloads`: some files under unknown names
_EXTRACTORS = frozenset({"tar", "bsdtar", "unzip", "cpio", "7z", "gunzip", "unxz", "bunzip2"})


def _fetches_a_tree(name: str, argv: list[str]) -> bool:
    """`git clone URL`, `svn checkout URL`, `hg clone URL`: code arrives under a new name."""
    words = [w for w in argv[1:] if not w.startswith("-")]
    if name == "git":
        return bool(words) and words[0] == "clone"
    if name == "svn":
        return bool(words) and words[0] in ("checkout", "co", "export")
    if name == "hg":
        return bool(words) and words[0] == "clone"
    return False


def _unbounded_parallel(argv: list[str]) -> bool:
    """`xargs -P 0` / `-P0` / `--max-procs=0`: as many processes at once as input lines."""
    for i, w in enumerate(argv[1:], 1):
        if w in ("-P", "--max-procs") and i + 1 < len(argv) and argv[i + 1] == "0":
            return True
        if w in ("-P0", "--max-procs=0"):
            return True
    return False


def _download_targets(name: str, argv: list[str]) -> list[str]:
    """The files a download command writes (`-o F`, `-O`, wget's default name)."""
    out: list[str] = []
    urls = [a for a in argv[1:] if re.match(r"[a-z][a-z0-9+.-]*://", a)]
    remote = [posixpath.basename(u.split("?", 1)[0].rstrip("/")) or "index.html" for u in urls]
    writes_remote_name = name == "wget" or name == "axel" or name == "aria2c"
    words = argv[1:]
    for i, a in enumerate(words):
        nxt = words[i + 1] if i + 1 < len(words) else ""
        if a in ("-o", "--output", "-O", "--output-document") and nxt:
            if name == "curl" and a == "-O":
                writes_remote_name = True
            else:
                out.append(nxt)
        elif a.startswith(("--output=", "--output-document=")):
            out.append(a.split("=", 1)[1])
        elif a.startswith("-") and not a.startswith("--") and len(a) > 2:
            # a bundle: `-fsSLo FILE`, `-sLoFILE`, wget's `-qO FILE`
            letter = "O" if name == "wget" else "o"
            if letter in a[1:]:
                value = a[a.index(letter, 1) + 1 :] or nxt
                if value and value != "-":
                    out.append(value)
            if name == "curl" and "O" in a[1:]:
                writes_remote_name = True
        elif a in ("--remote-name", "--remote-name-all") or (
            name == "curl" and a.startswith("-") and not a.startswith("--") and "O" in a
        ):
            writes_remote_name = True
    if writes_remote_name:
        out.extend(remote)
    return out


def _endless_spawner(node: Any, kind: str) -> bool:
    """`while true; do x & done`: a loop with a constant condition that backgrounds jobs."""
    parts = [p for p in node.parts if p.kind != "reservedword"]
    if len(parts) < 2:
        return False
    cond = parts[0]
    words = _words_of(cond)
    constant = words in (["true"], [":"], ["1"]) if kind == "while" else words == ["false"]
    return constant and _has_background(parts[1])


def _words_of(node: Any) -> list[str]:
    if node.kind == "list":
        node = next((p for p in node.parts if p.kind != "operator"), node)
    if node.kind != "command":
        return []
    return [p.word for p in node.parts if p.kind == "word"]


def _has_background(node: Any) -> bool:
    stack = [node]
    while stack:
        n = stack.pop()
        if getattr(n, "kind", None) == "operator" and getattr(n, "op", None) == "&":
            return True
        stack.extend(getattr(n, "parts", None) or [])
        stack.extend(getattr(n, "list", None) or [])
    return False


def _is_bash_socket(target: str) -> bool:
    return target.startswith(("/dev/tcp/", "/dev/udp/"))


def _prog_name(prog: str) -> str:
    return posixpath.basename(prog) if "/" in prog else prog


def _runs_stdin_as_code(argv: list[str]) -> bool:
    name = _prog_name(argv[0])
    rest = argv[1:]
    if name in SHELLS:
        return (
            (
                not any(a.startswith("-") and not a.startswith("--") and "c" in a for a in rest)
                and not any(not a.startswith("-") for a in rest)
            )
            or "-s" in rest
            or "-" in rest
            or any(a in ("/dev/stdin", "/proc/self/fd/0", "/dev/fd/0") for a in rest)
        )
    if name in INTERPRETERS or _PYTHON_RE.match(name) or name in ("eval", "source", "."):
        positional = [a for a in rest if not a.startswith("-")]
        if "-" in rest or any(a in ("/dev/stdin", "/proc/self/fd/0") for a in rest):
            return True
        code_flags = any(a in ("-c", "-e", "-m", "-E", "-r", "--eval") for a in rest)
        return not positional and not code_flags
    return False


def _strip_wrappers(argv: list[str]) -> list[str]:
    """Crude wrapper removal for the fallback scan."""
    i = 0
    while i < len(argv):
        a = argv[i]
        name = _prog_name(a)
        if "=" in a and re.match(r"[A-Za-z_][A-Za-z0-9_]*=", a):
            i += 1
        elif name in WRAPPERS or a.startswith("-") or re.fullmatch(r"[\d.]+[smhd]?", a):
            i += 1
        else:
            break
    return argv[i:]


def _floor(inner: _Analyzer, floor: Verdict) -> Verdict:
    w = worst(inner.verdicts)
    if w is None:
        return floor
    if w.rank > floor.rank:
        return w
    return floor


def _short_error(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:120]


# --------------------------------------------------------------------------
# Wrappers: judged by what they wrap
# --------------------------------------------------------------------------

WrapperFn = Callable[[_Analyzer, list[Arg]], tuple[Verdict, list[str]]]


def _wrap(
    analyzer: _Analyzer,
    args: list[Arg],
    start: int | None,
    floor: Verdict,
    alone: Verdict,
) -> tuple[Verdict, list[str]]:
    """Judge args[start:] as the wrapped command, no lower than `floor`."""
    argv = [a.word for a in args]
    analyzer.complex = True if floor.risk != "low" else analyzer.complex
    if start is None or start >= len(args):
        return alone, argv
    inner_args = args[start:]
    # NAME=value words right after the wrapper are environment assignments.
    assigns = []
    while inner_args and re.match(r"[A-Za-z_][A-Za-z0-9_]*=", inner_args[0].word):
        if not (inner_args[0].literal and _harmless_assignment(inner_args[0].word)):
            assigns.append(inner_args[0].word.split("=", 1)[0])
        inner_args = inner_args[1:]
    if not inner_args:
        return _worse(alone, floor) if assigns and floor.risk != "low" else alone, argv
    verdict, effective = analyzer.judge(inner_args)
    if assigns:
        names = ", ".join(f"`{n}`" for n in assigns)
        verdict = _worse(
            verdict,
            Verdict(
                "process",
                "high",
                f"Setting environment variables ({names}) can change what a command runs.",
            ),
        )
    return _worse(verdict, floor) if floor.rank > verdict.rank else verdict, effective


def _getopt_wrapper(
    flags: Sequence[str], values: Sequence[str], optional: Sequence[str] = ()
) -> Callable[[list[str]], tuple[int | None, str | None]]:
    def parse(argv: list[str]) -> tuple[int | None, str | None]:
        opts = getopt(argv, flags=flags, values=values, optional=optional, stop_at_positional=True)
        if opts.error:
            return None, opts.error
        return (opts.positionals[0] if opts.positionals else len(argv)), None

    return parse


_LOW = Verdict("read", "low", "")


def _make_wrapper(
    flags: Sequence[str],
    values: Sequence[str],
    floor: Verdict,
    alone: Verdict,
    *,
    optional: Sequence[str] = (),
    skip_operand: bool = False,
) -> WrapperFn:
    parse = _getopt_wrapper(flags, values, optional)

    def wrapper(analyzer: _Analyzer, args: list[Arg]) -> tuple[Verdict, list[str]]:
        argv = [a.word for a in args]
        name = _prog_name(argv[0])
        if name in ("builtin", "exec"):
            analyzer.complex = True  # shell builtins: only bash can run them
        start, err = parse(argv)
        if err:
            v = Verdict(floor.action if floor.risk != "low" else "unknown", "high",
                        f"`{name}` with an {err} needs approval.")  # fmt: skip
            return analyzer._with_suffix_scan(v, args), argv
        if skip_operand and start is not None and start < len(argv):
            start += 1  # timeout DURATION
        real_floor = (
            floor
            if floor.reason
            else Verdict(floor.action, floor.risk, f"`{name}` only wraps another command.")
        )
        return _wrap(analyzer, args, start, real_floor, alone)

    return wrapper


def _env_wrapper(analyzer: _Analyzer, args: list[Arg]) -> tuple[Verdict, list[str]]:
    argv = [a.word for a in args]
    opts = getopt(
        argv,
        flags=(
            "-i",
            "--ignore-environment",
            "-0",
            "--null",
            "-v",
            "--debug",
            "--list-signal-handling",
        ),
        values=("-u", "--unset", "-C", "--chdir", "-S", "--split-string", "-P"),
        optional=("--ignore-signal", "--default-signal", "--block-signal"),
        stop_at_positional=True,
    )
    if opts.error:
        return analyzer._with_suffix_scan(
            Verdict("process", "high", f"`env` with an {opts.error} needs approval."), args
        ), argv
    for chdir in opts.values("-C", "--chdir"):
        path = canonical_path(chdir)
        analyzer.cwd = path if path is not None else ("?" if _escapes(chdir) else analyzer.cwd)
        if secret_reason(chdir):
            return Verdict(
                "read", "high", f"`env -C {chdir}` enters a credentials directory."
            ), argv
    split = opts.values("-S", "--split-string")
    if split:
        analyzer.complex = True
        try:
            words = shlex.split(split[0])
        except ValueError:
            return Verdict(
                "unknown", "high", "`env -S` with an unbalanced string needs approval."
            ), argv
        rest = [Arg.plain(w) for w in words] + [args[i] for i in opts.positionals]
        fake = [args[0], *rest]
        return _wrap(
            analyzer,
            fake,
            1,
            Verdict("process", "high", "`env -S` splits a string into a command."),
            _read("`env` only prints the environment."),
        )
    start = opts.positionals[0] if opts.positionals else len(argv)
    alone = _read("`env` only prints its (scrubbed) environment.")
    if start < len(argv):
        analyzer.complex = True
    return _wrap(
        analyzer, args, start, Verdict("read", "low", "`env` only wraps another command."), alone
    )


def _shell_string_wrapper(name: str, floor: Verdict) -> WrapperFn:
    """`su -c STRING`, `watch CMD…`: a command given as a string."""

    def wrapper(analyzer: _Analyzer, args: list[Arg]) -> tuple[Verdict, list[str]]:
        argv = [a.word for a in args]
        analyzer.complex = True
        text: str | None = None
        if name == "su":
            for i, a in enumerate(argv[1:], 1):
                if a in ("-c", "--command") and i + 1 < len(argv):
                    text = argv[i + 1]
                elif a.startswith("--command="):
                    text = a.split("=", 1)[1]
        else:  # watch [options] command…
            opts = getopt(
                argv,
                flags=("-b", "--beep", "-c", "--color", "-d", "--differences", "-e", "--errexit",
                       "-g", "--chgexit", "-t", "--no-title", "-x", "--exec", "-p", "--precise"),
                values=("-n", "--interval", "-q", "--equexit"),
                optional=("--differences",),
                stop_at_positional=True,
            )  # fmt: skip
            if not opts.error and opts.positionals:
                text = " ".join(argv[opts.positionals[0] :])
        if text is None:
            return analyzer._with_suffix_scan(floor, args), argv
        inner = analyzer.sub(text)
        return _floor(inner, floor), argv

    return wrapper


def _xargs_wrapper(analyzer: _Analyzer, args: list[Arg]) -> tuple[Verdict, list[str]]:
    argv = [a.word for a in args]
    opts = getopt(
        argv,
        flags=("-0", "--null", "-r", "--no-run-if-empty", "-t", "--verbose", "-p",
               "--interactive", "-x", "--exit", "-o", "--open-tty"),
        values=("-a", "--arg-file", "-d", "--delimiter", "-E", "-I", "-L", "--max-lines",
                "-n", "--max-args", "-P", "--max-procs", "-s", "--max-chars",
                "--process-slot-var"),
        optional=("--eof", "--replace", "-i", "-l", "-e"),
        stop_at_positional=True,
    )  # fmt: skip
    floor = Verdict("process", "high", "`xargs` runs a command built from its input.")
    if opts.error or not opts.positionals:
        return analyzer._with_suffix_scan(floor, args), argv
    return _wrap(analyzer, args, opts.positionals[0], floor, floor)


def _command_builtin(analyzer: _Analyzer, args: list[Arg]) -> tuple[Verdict, list[str]]:
    argv = [a.word for a in args]
    analyzer.complex = True
    if len(argv) > 1 and argv[1] in ("-v", "-V"):
        return _read("`command -v` only looks a program up."), argv
    start = 1
    while start < len(argv) and argv[start] in ("-p", "--"):
        start += 1
    return _wrap(
        analyzer,
        args,
        start,
        Verdict("read", "low", "`command` only wraps another command."),
        _read("`command` does nothing alone."),
    )


_SUDO_FLAGS = _opts(
    "-A --askpass -b --background -E -H --set-home -n --non-interactive -P --preserve-groups -S "
    "--stdin -k --reset-timestamp -K --remove-timestamp -i --login -s --shell -l --list -v "
    "--validate -V --version -e --edit -B --bell -N --no-update"
)
_SUDO_VALUES = _opts(
    "-u --user -g --group -p --prompt -C --close-from -D --chdir -r --role -t --type -U "
    "--other-user -T --command-timeout -R --chroot -h --host"
)

_SUDO_FLOOR = Verdict("privileged", "high", "`sudo` runs a command as another user (root).")


def _needs(action: str, risk: str, reason: str) -> Verdict:
    return Verdict(action, risk, reason)


WRAPPERS: dict[str, WrapperFn] = {
    "sudo": _make_wrapper(
        _SUDO_FLAGS,
        _SUDO_VALUES,
        _SUDO_FLOOR,
        _needs("privileged", "high", "`sudo` alone opens a root shell or changes sudo state."),
        optional=("--preserve-env",),
    ),
    "doas": _make_wrapper(
        _opts("-n -s -L"),
        _opts("-u -C"),
        _needs("privileged", "high", "`doas` runs a command as another user (root)."),
        _needs("privileged", "high", "`doas` alone opens a root shell."),
    ),
    "pkexec": _make_wrapper(
        _opts("--disable-internal-agent"),
        _opts("--user"),
        _needs("privileged", "high", "`pkexec` runs a command as root."),
        _needs("privileged", "high", "`pkexec` alone opens a root shell."),
    ),
    "runuser": _make_wrapper(
        _opts("-l --login -m -p --preserve-environment"),
        _opts("-u --user -g --group -G --supp-group -s --shell"),
        _needs("privileged", "high", "`runuser` runs a command as another user."),
        _needs("privileged", "high", "`runuser` alone opens a shell."),
    ),
    "timeout": _make_wrapper(
        _opts("--preserve-status --foreground -v --verbose"),
        _opts("-s --signal -k --kill-after"),
        _LOW,
        _read("`timeout` alone does nothing."),
        skip_operand=True,
    ),
    "nice": _make_wrapper(
        _opts("-h"), _opts("-n --adjustment"), _LOW, _read("`nice` alone prints the niceness.")
    ),
    "ionice": _make_wrapper(
        _opts("-t --ignore"),
        _opts("-c --class -n --classdata"),
        _LOW,
        _read("`ionice` alone prints the I/O class."),
    ),
    "stdbuf": _make_wrapper(
        (), _opts("-i --input -o --output -e --error"), _LOW, _read("`stdbuf` alone does nothing.")
    ),
    "nohup": _make_wrapper(
        (),
        (),
        _needs("process", "medium", "`nohup` keeps a command running after the session ends."),
        _needs("process", "medium", "`nohup` needs approval."),
    ),
    "setsid": _make_wrapper(
        _opts("-f --fork -w --wait -c --ctty"),
        (),
        _needs("process", "medium", "`setsid` detaches a command from this session."),
        _needs("process", "medium", "`setsid` needs approval."),
    ),
    "exec": _make_wrapper(
        _opts("-c -l"),
        _opts("-a"),
        _needs("process", "high", "`exec` replaces the shell with another program."),
        _needs("process", "high", "`exec` alone changes the shell's file descriptors."),
    ),
    "builtin": _make_wrapper((), (), _LOW, _read("`builtin` alone does nothing.")),
    "time": _make_wrapper(
        _opts("-p --portability -v --verbose -q --quiet -a --append"),
        _opts("-f --format"),
        _LOW,
        _read("`time` alone does nothing."),
    ),
    "busybox": _make_wrapper(
        (),
        (),
        _needs("process", "high", "`busybox` runs one of its built-in programs."),
        _read("`busybox` alone lists its programs."),
    ),
    "env": _env_wrapper,
    "command": _command_builtin,
    "xargs": _xargs_wrapper,
    "su": _shell_string_wrapper(
        "su", _needs("privileged", "high", "`su` runs commands as another user.")
    ),
    "watch": _shell_string_wrapper(
        "watch", _needs("process", "medium", "`watch` runs a command repeatedly and never ends.")
    ),
}
# Wrappers not parsed in detail: approval, and what follows them is still
# scanned for blocked forms (`strace -f rm -rf /`).
for _name in _opts(
    "strace ltrace valgrind perf taskset chrt numactl unshare nsenter chroot systemd-run "
    "firejail bwrap script flock unbuffer parallel caffeinate proxychains torsocks faketime"
):
    WRAPPERS[_name] = _make_wrapper(
        (),
        (),
        _needs("process", "high", f"`{_name}` runs another command."),
        _needs("process", "high", f"`{_name}` needs approval."),
    )
