"""Mini-languages in arguments: sed scripts, awk programs, jq/yq filters, find and test.

These programs take a program as an argument, and that program can do what
the options cannot: sed's `e` and `w` run commands and write files, awk has
`system()`, pipes and `ENVIRON`, jq has `$ENV`, find has `-exec`, bash's
`test -v 'a[$(…)]'` evaluates an array subscript. Each is either parsed
fully (sed, find, test) or kept to a safe subset (awk, jq, yq): anything the
checker does not recognise needs approval, so a trick it has never seen
waits for a person instead of running.

Every check here is a `specs.Language`: it gets argv and the options the
program's `Spec` parsed, and returns None (read-only) or a `Verdict`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from runtime.tools.shell.options import Opts
from runtime.tools.shell.paths import secret_reason
from runtime.tools.shell.verdict import Verdict

# ---------------------------------------------------------------------------
# sed
# ---------------------------------------------------------------------------

_SED_SIMPLE = set("=dDgGhHnNpPxzlLqQF")
_SED_LABEL = re.compile(r"[A-Za-z0-9_.-]*")


def sed_script_problem(script: str) -> str | None:
    """Why a sed script is not read-only (`w`, `W`, `e`, `s///w`, `s///e`), or None.

    A small parser for GNU sed's grammar; anything it does not recognise is a
    problem, so a trick it misses needs approval instead of running.
    """
    s, n, i = script, len(script), 0
    # label -> whether input was read (`n`/`N`) since it: a branch back to a
    # label with no read in between loops forever (`:a;s/^/x/;ta`, `:a;ba`).
    labels: dict[str, bool] = {}

    def read_delimited(j: int, delim: str) -> int:
        # returns the index just past the closing delimiter, or -1
        while j < n:
            c = s[j]
            if c == "\\":
                j += 2
                continue
            if c == "\n" and delim != "\n":
                return -1
            if c == delim:
                return j + 1
            j += 1
        return -1

    def skip_to_eol(j: int) -> int:
        while j < n and s[j] != "\n":
            j += 1
        return j

    def read_two_parts(j: int) -> int:
        # `s/a/b/`, `y/a/b/`: the delimiter after the command letter at j, then
        # two delimited parts; the index past the last delimiter, or -1
        delim = s[j + 1]
        k = read_delimited(j + 2, delim)
        return read_delimited(k, delim) if k >= 0 else -1

    while i < n:
        c = s[i]
        if c in " \t\n;}":
            i += 1
            continue
        if c == "#":
            i = skip_to_eol(i)
            continue
        # addresses
        for _ in range(2):
            if i < n and (s[i].isdigit() or s[i] == "$"):
                i += 1
                while i < n and (s[i].isdigit() or s[i] == "~"):
                    i += 1
            elif i < n and (s[i] == "/" or s[i] == "\\"):
                delim = "/"
                if s[i] == "\\":
                    if i + 1 >= n:
                        return "has an address the classifier does not understand"
                    delim = s[i + 1]
                    i += 1
                i = read_delimited(i + 1, delim)
                if i < 0:
                    return "has an unterminated address"
                while i < n and s[i] in "IM":
                    i += 1
            while i < n and s[i] in " \t":
                i += 1
            if i < n and s[i] == ",":
                i += 1
                while i < n and s[i] in " \t":
                    i += 1
                if i < n and s[i] in "+~":
                    i += 1
                continue
            break
        while i < n and s[i] in " \t!":
            i += 1
        if i >= n:
            return None
        c = s[i]
        if c in "{};\n":
            i += 1
            continue
        if c in _SED_SIMPLE:
            if c in "nN":
                labels = dict.fromkeys(labels, True)
            i += 1
            while i < n and s[i].isdigit():  # q5, l40
                i += 1
            continue
        if c in "wWe":
            return f"uses the `{c}` command (writes files or runs commands)"
        if c in "rR":
            end = skip_to_eol(i + 1)
            target = s[i + 1 : end].strip()
            if secret_reason(target):
                return f"reads a secret file `{target}`"
            i = end
            continue
        if c in "aic":
            i = skip_to_eol(i + 1)
            continue
        if c in ":btTv":
            # GNU sed ends a label at a blank or `;` (`:a e id` is the label `a`
            # and then the command `e id`), so after the label only a separator
            # may follow; anything else is a command we must see.
            i += 1
            while i < n and s[i] in " \t" and c != ":":
                i += 1
            label = _SED_LABEL.match(s, i)
            name = label.group() if label else ""
            i = label.end() if label else i
            if c == ":":
                labels[name] = False
            elif c in "btT" and name and labels.get(name) is False:
                return f"branches back to `:{name}` without reading input, so it may never end"
            while i < n and s[i] in " \t":
                i += 1
            if i < n and s[i] not in ";\n}":
                return f"has text after the label of `{c}` the classifier does not understand"
            continue
        if c == "y":
            j = read_two_parts(i) if i + 1 < n else -1
            if j < 0:
                return "has an incomplete `y` command"
            i = j
            continue
        if c == "s":
            j = read_two_parts(i) if i + 1 < n and s[i + 1] not in "\\\n" else -1
            if j < 0:
                return "has an incomplete `s` command"
            i = j
            while i < n and s[i] not in ";\n}":
                f = s[i]
                if f in "we":
                    return f"uses the `s///{f}` flag (writes files or runs commands)"
                if f.isdigit() or f in "gpiImM \t":
                    i += 1
                    continue
                return f"has an `s` flag `{f}` the classifier does not understand"
            continue
        return f"uses `{c}`, which the classifier does not understand"
    return None


def sed_language(argv: Sequence[str], opts: Opts) -> Verdict | None:
    """The scripts of a sed call (`-e`, `--expression`, or the first operand)."""
    scripts = opts.values("-e", "--expression")
    if not scripts:
        if not opts.positionals:
            return None
        scripts = [argv[opts.positionals[0]]]
    for script in scripts:
        problem = sed_script_problem(script)
        if problem and "never end" in problem:
            return Verdict("process", "medium", f"The `sed` script {problem}.")
        if problem:
            return Verdict("write", "high", f"The `sed` script {problem}.")
    return None


# ---------------------------------------------------------------------------
# awk
# ---------------------------------------------------------------------------

# Names that reach outside the program: running commands, reading files the
# command line does not name, the environment, and the argument list (a
# `BEGIN{ARGV[1]="/etc/shadow"}` swaps the file awk reads).
_AWK_FORBIDDEN = frozenset(
    {"system", "getline", "close", "ENVIRON", "PROCINFO", "ARGV", "ARGC", "SYMTAB", "FUNCTAB"}
)
_AWK_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_AWK_NUMBER = re.compile(r"[0-9]+(\.[0-9]*)?([eE][+-]?[0-9]+)?|\.[0-9]+")
# After one of these a `/` divides; after anything else it starts a regex.
_AWK_OPERAND_END = frozenset({"ident", "number", "string", ")", "]", "$", "incr"})


def awk_program_problem(prog: str) -> str | None:
    """Why an awk program is outside the safe subset, or None.

    The subset: patterns, actions, expressions, `print`/`printf` to stdout,
    user functions and the string and math built-ins. Outside it: `system`,
    `getline`, `close`, any pipe (`|`, `|&`), output redirection (`>`/`>>`
    inside a `print`), `ENVIRON`/`PROCINFO`/`ARGV`/`ARGC`, and gawk's `@`
    (`@include`, `@load`, indirect calls). A comparison such as `$3 > 100`
    stays inside: only an unparenthesised `>` in a print statement redirects.
    """
    s, n, i = prog, len(prog), 0
    prev = ""  # kind of the previous token
    depth = 0  # parentheses and brackets
    print_depth: int | None = None  # depth of the print statement we are in
    while i < n:
        c = s[i]
        if c in " \t\r":
            i += 1
            continue
        if c == "\\" and i + 1 < n and s[i + 1] == "\n":
            i += 2
            continue
        if c == "#":
            while i < n and s[i] != "\n":
                i += 1
            continue
        if c in "\n;{}":
            print_depth = None
            prev = c
            i += 1
            continue
        if c == '"':
            i += 1
            while i < n and s[i] != '"':
                i += 2 if s[i] == "\\" else 1
            if i >= n:
                return "has an unterminated string"
            i += 1
            prev = "string"
            continue
        if c == "/" and prev not in _AWK_OPERAND_END:
            i += 1
            in_class = False
            while i < n and (s[i] != "/" or in_class):
                if s[i] == "\\":
                    i += 2
                    continue
                if s[i] == "[":
                    in_class = True
                elif s[i] == "]":
                    in_class = False
                elif s[i] == "\n":
                    return "has an unterminated regular expression"
                i += 1
            if i >= n:
                return "has an unterminated regular expression"
            i += 1
            prev = "string"
            continue
        ident = _AWK_IDENT.match(s, i)
        if ident:
            word = ident.group()
            if word in _AWK_FORBIDDEN:
                return f"uses `{word}`, which runs commands or reads outside the named files"
            if word in ("print", "printf"):
                print_depth = depth
            i = ident.end()
            prev = "ident"
            continue
        number = _AWK_NUMBER.match(s, i)
        if number and c in "0123456789.":
            i = number.end()
            prev = "number"
            continue
        if c == "@":
            return "uses `@` (gawk's include, load or indirect call)"
        if c == "|":
            if s[i : i + 2] == "||":
                i += 2
                prev = "op"
                continue
            return "uses a pipe `|`, which runs a command"
        if c == ">":
            if s[i : i + 2] == ">=":
                i += 2
                prev = "op"
                continue
            if print_depth is not None and depth == print_depth:
                return "redirects output with `>`, which writes a file"
            i += 1
            prev = "op"
            continue
        if c in "([":
            depth += 1
        elif c in ")]":
            depth = max(0, depth - 1)
        if s[i : i + 2] in ("++", "--"):
            i += 2
            prev = "incr"
            continue
        prev = c if c in ")]$" else "op"
        i += 1
    return None


# Loops whose condition is a constant: `while(1)`, `for(;;)`, `while ("x")`.
_AWK_ENDLESS = re.compile(r'while\s*\(\s*([1-9][0-9]*|"[^"]+")\s*\)|for\s*\([^;()]*;\s*;')


def awk_language(argv: Sequence[str], opts: Opts) -> Verdict | None:
    """The program of an awk call (`-e`/`--source`, or the first operand) and its assignments."""
    programs = opts.values("-e", "--source")
    operands = [argv[i] for i in opts.positionals]
    if not programs:
        if not operands:
            return None
        programs, operands = [operands[0]], operands[1:]
    for prog in programs:
        problem = awk_program_problem(prog)
        if problem:
            return Verdict("process", "high", f"The `{argv[0]}` program {problem}.")
        endless = _AWK_ENDLESS.search(prog)
        if endless:
            return Verdict(
                "process",
                "medium",
                f"The `{argv[0]}` program loops on a constant (`{endless.group()}`): "
                "it may never end.",
            )
    assignments = opts.values("-v", "--assign") + [
        w for w in operands if re.match(r"[A-Za-z_][A-Za-z0-9_]*=", w)
    ]
    for assignment in assignments:
        name = assignment.split("=", 1)[0]
        if not _AWK_IDENT.fullmatch(name) or name in _AWK_FORBIDDEN:
            return Verdict(
                "process", "high", f"The `{argv[0]}` assignment `{assignment}` is not a plain one."
            )
    return None


# ---------------------------------------------------------------------------
# jq and yq
# ---------------------------------------------------------------------------

# jq cannot write files or run programs; what it can reach beyond its input is
# the environment (`$ENV`, `env`) and modules read from the search path
# (`import`, `include`, `modulemeta`). A filter naming none of them only
# transforms its input. Matched anywhere, strings included, because string
# interpolation (`"\(env.HOME)"`) is code.
_JQ_FORBIDDEN = re.compile(
    r"\$ENV\b|(?<![.\w$])env\b|(?<![.\w$])(import|include|modulemeta|get_search_list)\b"
)
# mikefarah's yq adds environment and file readers to the same idea.
_YQ_FORBIDDEN = re.compile(
    r"(?<![.\w$])(strenv|envsubst|load|load_str|load_props|load_xml|load_base64|load_yaml"
    r"|eval|from_file)\b"
)


# Filters that produce without end or fill memory from nothing: generators
# with no bound of their own, and numbers big enough to be a runaway on purpose.
_JQ_ENDLESS = re.compile(r"(?<![.\w$])(repeat|while|until|recurse\s*\(|infinite)")
_JQ_NUMBER = re.compile(r"(?<![\w.$])[0-9]+(\.[0-9]+)?([eE][+-]?[0-9]+)?")
_JQ_DEF = re.compile(r"\bdef\s+([A-Za-z_][A-Za-z0-9_]*)\s*(\([^)]*\))?\s*:([^;]*)")
_JQ_BIG = 10_000_000


def jq_filter_problem(program: str, *, yq: bool = False) -> str | None:
    """Why a jq (or yq) filter reaches outside its input, or None."""
    hit = _JQ_FORBIDDEN.search(program) or (yq and _YQ_FORBIDDEN.search(program))
    if hit:
        return f"uses `{hit.group()}`, which reads the environment or other files"
    return None


def jq_runaway(program: str) -> str | None:
    """Why a jq filter may never end or fill memory, or None."""
    hit = _JQ_ENDLESS.search(program)
    if hit:
        return f"uses `{hit.group().rstrip('( ')}`, which may never end"
    for number in _JQ_NUMBER.finditer(program):
        try:
            big = float(number.group()) >= _JQ_BIG
        except ValueError:
            big = True
        if big:
            return f"counts to `{number.group()}`, which may fill memory or never end"
    for d in _JQ_DEF.finditer(program):
        if re.search(rf"(?<![.\w$]){re.escape(d.group(1))}\b", d.group(3)):
            return f"defines `{d.group(1)}` in terms of itself, which may never end"
    return None


def jq_language(argv: Sequence[str], opts: Opts) -> Verdict | None:
    """The filter of a jq call: the first operand (a `-f` program file is refused by the spec)."""
    if not opts.positionals:
        return None
    program = argv[opts.positionals[0]]
    problem = jq_filter_problem(program)
    if problem:
        return Verdict("read", "high", f"The `jq` filter {problem}.")
    runaway = jq_runaway(program)
    if runaway:
        return Verdict("process", "medium", f"The `jq` filter {runaway}.")
    return None


_YQ_SUBCOMMANDS = frozenset({"e", "eval", "ea", "eval-all"})


def yq_language(argv: Sequence[str], opts: Opts) -> Verdict | None:
    """The expression of a yq call (after an optional `eval`/`e` subcommand)."""
    operands = [argv[i] for i in opts.positionals]
    if operands and operands[0] in _YQ_SUBCOMMANDS:
        operands = operands[1:]
    if not operands:
        return None
    problem = jq_filter_problem(operands[0], yq=True)
    if problem:
        return Verdict("read", "high", f"The `yq` expression {problem}.")
    return None


# ---------------------------------------------------------------------------
# find
# ---------------------------------------------------------------------------

_FIND_OPERATORS = frozenset({"(", ")", "!", ",", "-not", "-a", "-and", "-o", "-or"})
_FIND_TESTS_0 = frozenset(
    "-true -false -empty -nouser -nogroup -readable -writable -executable -prune -quit "
    "-print -print0 -ls -depth -mount -xdev -noleaf -follow -daystart -ignore_readdir_race "
    "-noignore_readdir_race -nowarn -warn".split()
)
_FIND_TESTS_1 = frozenset(
    "-name -iname -path -ipath -wholename -iwholename -regex -iregex -regextype -type -xtype "
    "-size -mtime -mmin -atime -amin -ctime -cmin -newer -anewer -cnewer -perm -user -group "
    "-uid -gid -links -inum -samefile -maxdepth -mindepth -lname -ilname -fstype -used "
    "-context -printf".split()
)
_FIND_NEWER_XY = re.compile(r"-newer[aBcmt][aBcmt]")
_FIND_RUNS = frozenset({"-exec", "-execdir", "-ok", "-okdir"})
_FIND_WRITES = frozenset({"-delete", "-fprint", "-fprint0", "-fprintf", "-fls"})


def find_language(argv: Sequence[str], opts: Opts) -> Verdict | None:
    """A find call's expression, kept to tests and printing actions.

    `-exec`/`-execdir`/`-ok`/`-okdir` run commands; `-delete`, `-fprint*` and
    `-fls` write; any primary not listed here (a newer find's, a typo) needs
    approval too.
    """
    words = [argv[i] for i in opts.positionals]
    i = 0
    while i < len(words) and not words[i].startswith("-") and words[i] not in _FIND_OPERATORS:
        i += 1  # start points
    while i < len(words):
        word = words[i]
        if word in _FIND_RUNS:
            return Verdict("process", "high", f"`find {word}` runs other commands.")
        if word in _FIND_WRITES:
            return Verdict("write", "medium", f"`find {word}` deletes or writes files.")
        if word in _FIND_OPERATORS or word in _FIND_TESTS_0:
            i += 1
            continue
        if word in _FIND_TESTS_1 or _FIND_NEWER_XY.fullmatch(word):
            if i + 1 >= len(words):
                return Verdict("unknown", "medium", f"`find {word}` is missing its value.")
            i += 2
            continue
        return Verdict(
            "unknown", "medium", f"`find` with `{word}`, which the classifier does not know."
        )
    return None


# ---------------------------------------------------------------------------
# test / [
# ---------------------------------------------------------------------------

_TEST_UNARY = frozenset("-b -c -d -e -f -g -G -h -k -L -N -O -p -r -s -S -t -u -w -x -z -n".split())
_TEST_BINARY = frozenset(
    "= == != < > -eq -ne -lt -le -gt -ge -nt -ot -ef -a -o".split()
)  # -a/-o: and/or
# `-v NAME` (is NAME set) evaluates an array subscript in bash, and
# `test -v 'a[$(id)]'` runs `id`; `-R` is the same for namerefs.
_TEST_EVALUATES = frozenset({"-v", "-R"})


def test_language(argv: Sequence[str], opts: Opts) -> Verdict | None:
    """A test expression kept to the file, string and integer tests."""
    words = list(argv[1:])
    if argv[0].endswith("["):
        if not words or words[-1] != "]":
            return Verdict("unknown", "medium", "`[` without its closing `]` needs approval.")
        words = words[:-1]
    if len(words) == 1:
        return None  # one word: true when non-empty, never an operator
    for word in words:
        if word in _TEST_EVALUATES:
            return Verdict(
                "process",
                "high",
                f"`test {word}` evaluates an array subscript in bash, which can run commands.",
            )
        if (
            word.startswith("-")
            and len(word) > 1
            and word not in _TEST_UNARY
            and word not in _TEST_BINARY
            and not re.fullmatch(r"-[0-9]+", word)
        ):
            return Verdict(
                "unknown", "medium", f"`test {word}` is not a test the classifier knows."
            )
    return None


# ---------------------------------------------------------------------------
# gzip, xz, bzip2, zstd
# ---------------------------------------------------------------------------

_TO_STDOUT = ("-c", "--stdout", "--to-stdout", "-l", "--list", "-t", "--test")


def compress_language(argv: Sequence[str], opts: Opts) -> Verdict | None:
    """A compressor only reads when it writes to stdout (`-c`, `-dc`) or lists/tests.

    Without those it replaces each file with its (de)compressed form.
    """
    if opts.has(*_TO_STDOUT) or not opts.positionals:
        return None  # no operand: stdin to stdout
    name = argv[0]
    return Verdict("write", "medium", f"`{name}` without `-c` replaces files with new ones.")
