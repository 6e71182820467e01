"""The allow-lists of the file and text tools: `TEXT_SPECS`, one `Spec` per program.

Options are GNU coreutils', grep's, ripgrep's, findutils', sed's, gawk's,
jq's and the compression tools' own, each value-taking one with the shape of
its value. Left out on purpose (so they need approval):

- options that write: `sort -o`, `tree -o`/`-R`, `base64 -o`, `file -C`,
  `sed -i`, `yq -i`/`-s`, `gawk -o`/`-p`/`-d`, `uniq`/`xxd` second operands;
- options that run a program: `rg --pre`/`--hostname-bin`, `sort
  --compress-program`, `fd -x`/`-X`, `diff -l` (runs `pr`);
- options that never end: `tail -f`/`-F`/`--follow`/`--retry`;
- options that load code or a program the classifier cannot see: `sed -f`,
  `awk -f`/`-i`/`-l`/`-E`, `jq -f`/`-L`, `strings @file`;
- options that assign shell state: `printf -v`;
- `sort -T` (writes temporary files in a directory it names).

Options that name a file to read (`grep -f`, `wc --files0-from`) take
`FILE`: any path, judged by the analyser's secret check like every word.
"""

from __future__ import annotations

from collections.abc import Sequence

from runtime.tools.shell.languages import (
    awk_language,
    compress_language,
    find_language,
    jq_language,
    sed_language,
    test_language,
    yq_language,
)
from runtime.tools.shell.options import Opts
from runtime.tools.shell.specs import (
    ANY,
    NAME,
    NUM,
    SIZE,
    Spec,
    choice,
    matches,
    spec,
    with_values,
)
from runtime.tools.shell.verdict import Verdict

# A file the program reads. The analyser checks every word for secret
# locations, options' values included (`--file=~/.ssh/id_rsa`).
FILE = ANY
# A directory the program reads.
DIR = ANY
# A printf-style or field list format: text the program prints.
FORMAT = ANY
COLOR = choice("always", "never", "auto", "yes", "no", "force", "none", "tty", "if-tty", "ansi")
LIST = matches(r"[0-9,+-]{1,128}", "a list of numbers and ranges")
DURATION = matches(r"[0-9]+(\.[0-9]+)?[smhd]?", "a duration (NUMBER[smhd])")
NUMBER = matches(r"[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+)?", "a number")
CHAR = matches(r".{0,8}", "a short separator")
# awk's `-v NAME=value`; awk_language checks NAME further.
ASSIGNMENT = matches(r"[A-Za-z_][A-Za-z0-9_]*=.*", "NAME=value")


def _not_response_file(word: str) -> str | None:
    """binutils read `@FILE` as more options from FILE: unseen options."""
    return "is a response file (`@FILE`) of unseen options" if word.startswith("@") else None


_GREP = spec(
    "-E --extended-regexp -F --fixed-strings -G --basic-regexp -P --perl-regexp -i -y "
    "--ignore-case --no-ignore-case -v --invert-match -w --word-regexp -x --line-regexp "
    "-c --count -L --files-without-match -l --files-with-matches -o --only-matching "
    "-q --quiet --silent -s --no-messages -b --byte-offset -H --with-filename "
    "-h --no-filename -n --line-number -T --initial-tab -Z --null -z --null-data "
    "-a --text -I -r --recursive -R --dereference-recursive --line-buffered -U --binary "
    "--help -V --version",
    {
        **with_values(ANY, "-e --regexp --label --exclude --include --exclude-dir"),
        **with_values(FILE, "-f --file --exclude-from"),
        **with_values(NUM, "-m --max-count -A --after-context -B --before-context -C --context"),
        "--binary-files": choice("binary", "text", "without-match"),
        "-D": choice("read", "skip"),
        "--devices": choice("read", "skip"),
        "-d": choice("read", "skip", "recurse"),
        "--directories": choice("read", "skip", "recurse"),
    },
    optional={"--color": COLOR, "--colour": COLOR},
    numeric="-C",
    glob_safe=True,
)

_RG = spec(
    "-i --ignore-case -S --smart-case -s --case-sensitive -w --word-regexp -x --line-regexp "
    "-v --invert-match -n --line-number -N --no-line-number -l --files-with-matches "
    "--files-without-match -c --count --count-matches -o --only-matching -p --pretty "
    "-F --fixed-strings -H --with-filename -I --no-filename --heading --no-heading "
    "--hidden --no-hidden -u --unrestricted --no-ignore --no-ignore-vcs --no-ignore-parent "
    "--no-ignore-dot --no-ignore-global --no-ignore-exclude --no-ignore-files -L --follow "
    "--files --json --no-json -0 --null -U --multiline --multiline-dotall -P --pcre2 "
    "--no-pcre2 --column --no-column --vimgrep --trim --no-trim -q --quiet -a --text "
    "--no-messages --stats --passthru --passthrough --type-list --glob-case-insensitive "
    "--no-config --byte-offset -b --sort-files --crlf --no-crlf -z --search-zip "
    "--no-search-zip --one-file-system --line-buffered --block-buffered --no-unicode "
    "--include-zero --max-columns-preview --debug --trace -h --help -V --version",
    {
        **with_values(
            ANY,
            "-e --regexp -g --glob --iglob -t --type -T --type-not "
            "-r --replace --path-separator -E --encoding --type-add",
        ),
        **with_values(FILE, "-f --file --ignore-file"),
        **with_values(
            NUM,
            "-m --max-count -A --after-context -B --before-context -C --context "
            "-d --max-depth --maxdepth -M --max-columns -j --threads",
        ),
        **with_values(SIZE, "--max-filesize --dfa-size-limit --regex-size-limit"),
        "--sort": choice("none", "path", "modified", "accessed", "created"),
        "--sortr": choice("none", "path", "modified", "accessed", "created"),
        "--color": COLOR,
        "--colors": ANY,
        "--engine": choice("default", "pcre2", "auto"),
    },
    glob_safe=False,  # -z runs decompressors, --pre would run anything: keep globs behind --
)

_SORT = spec(
    "-b --ignore-leading-blanks -d --dictionary-order -f --ignore-case -g "
    "--general-numeric-sort -h --human-numeric-sort -i --ignore-nonprinting -M --month-sort "
    "-n --numeric-sort -R --random-sort -r --reverse -V --version-sort -c -C -m --merge "
    "-s --stable -u --unique -z --zero-terminated --debug --help --version",
    {
        **with_values(ANY, "-k --key"),
        "-t": CHAR,
        "--field-separator": CHAR,
        **with_values(SIZE, "-S --buffer-size"),
        "--parallel": NUM,
        "--batch-size": NUM,
        **with_values(FILE, "--random-source --files0-from"),
        "--sort": choice(
            "general-numeric", "human-numeric", "month", "numeric", "random", "version"
        ),
    },
    optional={"--check": choice("quiet", "silent", "diagnose-first")},
)

_HEAD = spec(
    "-q --quiet --silent -v --verbose -z --zero-terminated --help --version",
    with_values(SIZE, "-c --bytes -n --lines"),
    numeric="-n",
    glob_safe=True,
)
_TAIL = spec(
    "-q --quiet --silent -v --verbose -z --zero-terminated --help --version",
    with_values(SIZE, "-c --bytes -n --lines"),
    numeric="-n",
    glob_safe=False,  # a file named `-f` makes tail follow forever
)

_LS = spec(
    "-a --all -A --almost-all --author -b --escape -B --ignore-backups -c -C -d --directory "
    "-D --dired -f -F -g --group-directories-first -G --no-group -h --human-readable --si "
    "-H --dereference-command-line --dereference-command-line-symlink-to-dir -i --inode "
    "-k --kibibytes -l -L --dereference -m -n --numeric-uid-gid -N --literal -o -p "
    "-q --hide-control-chars --show-control-chars -Q --quote-name -r --reverse "
    "-R --recursive -s --size -S -t -u -U -v -x -X -Z --context -1 --full-time --zero "
    "--file-type --help --version",
    {
        **with_values(ANY, "-I --ignore --hide"),
        "--block-size": SIZE,
        "-T": NUM,
        "--tabsize": NUM,
        "-w": NUM,
        "--width": NUM,
        "--format": choice(
            "across", "commas", "horizontal", "long", "single-column", "verbose", "vertical"
        ),
        "--indicator-style": choice("none", "slash", "file-type", "classify"),
        "--quoting-style": choice(
            "literal",
            "locale",
            "shell",
            "shell-always",
            "shell-escape",
            "shell-escape-always",
            "c",
            "escape",
        ),
        "--sort": choice("none", "size", "time", "version", "extension", "width"),
        "--time": choice(
            "atime",
            "access",
            "use",
            "ctime",
            "status",
            "mtime",
            "modification",
            "birth",
            "creation",
        ),
        "--time-style": ANY,
    },
    optional={"--color": COLOR, "--colour": COLOR, "--classify": COLOR, "--hyperlink": COLOR},
    glob_safe=True,
)

_CAT = spec(
    "-A --show-all -b --number-nonblank -e -E --show-ends -n --number -s --squeeze-blank -t "
    "-T --show-tabs -u -v --show-nonprinting --help --version",
    glob_safe=True,
)
_WC = spec(
    "-c --bytes -m --chars -l --lines -L --max-line-length -w --words --help --version",
    {"--files0-from": FILE, "--total": choice("auto", "always", "only", "never")},
    glob_safe=True,
)
_CUT = spec(
    "-n -s --only-delimited -z --zero-terminated --complement --help --version",
    {
        **with_values(LIST, "-b --bytes -c --characters -f --fields"),
        "-d": CHAR,
        "--delimiter": CHAR,
        "--output-delimiter": ANY,
    },
)
_TR = spec(
    "-c -C --complement -d --delete -s --squeeze-repeats -t --truncate-set1 --help --version",
    max_operands=2,
)
_NL = spec(
    "-p --no-renumber --help --version",
    {
        **with_values(
            ANY,
            "-b --body-numbering -d --section-delimiter -f --footer-numbering "
            "-h --header-numbering -s --number-separator",
        ),
        **with_values(
            NUM,
            "-i --line-increment -l --join-blank-lines -v --starting-line-number -w --number-width",
        ),
        "-n": choice("ln", "rn", "rz"),
        "--number-format": choice("ln", "rn", "rz"),
    },
)
_COLUMN = spec(
    "-t --table -x --fillrows -n -e -L --keep-empty-lines -R -J --json -m --table-noheadings "
    "-d --help -V --version",
    {
        **with_values(
            ANY,
            "-s --separator -o --output-separator -N --table-columns "
            "--table-right -T --table-truncate -E --table-noextreme -W --table-wrap "
            "-H --table-hide -O --table-order -n --table-name -r --tree -i "
            "--tree-id -p --tree-parent",
        ),
        **with_values(NUM, "-c --output-width -l --table-columns-limit"),
    },
)
_PASTE = spec(
    "-s --serial -z --zero-terminated --help --version", with_values(ANY, "-d --delimiters")
)
_JOIN = spec(
    "-i --ignore-case --check-order --nocheck-order --header -z --zero-terminated --help --version",
    {
        **with_values(ANY, "-a -e -o -v"),
        "-t": CHAR,
        **with_values(NUM, "-j -1 -2"),
    },
)
_COMM = spec(
    "-1 -2 -3 --check-order --nocheck-order --total -z --zero-terminated --help --version",
    {"--output-delimiter": ANY},
)
_FOLD = spec(
    "-b --bytes -s --spaces --help --version", with_values(NUM, "-w --width"), numeric="-w"
)
_EXPAND = spec("-i --initial --help --version", with_values(ANY, "-t --tabs"), numeric="-t")
_UNEXPAND = spec(
    "-a --all --first-only --help --version", with_values(ANY, "-t --tabs"), numeric="-t"
)
_TAC = spec("-b --before -r --regex --help --version", with_values(ANY, "-s --separator"))
_UNIQ = spec(
    "-c --count -d --repeated -D -i --ignore-case -u --unique -z --zero-terminated --help "
    "--version",
    with_values(NUM, "-f --skip-fields -s --skip-chars -w --check-chars"),
    optional={
        "--all-repeated": choice("none", "prepend", "separate"),
        "--group": choice("separate", "prepend", "append", "both"),
    },
    max_operands=1,  # a second operand is the output file
    numeric="-f",
)

_SED = spec(
    "-n --quiet --silent -E -r --regexp-extended -s --separate -u --unbuffered -z --null-data "
    "--posix --debug --sandbox --help --version",
    {**with_values(ANY, "-e --expression"), **with_values(NUM, "-l --line-length")},
    language=sed_language,
    dangers={
        "-i": Verdict("write", "medium", "`sed -i` edits files in place."),
        "--in-place": Verdict("write", "medium", "`sed -i` edits files in place."),
        "-f": Verdict(
            "unknown", "medium", "`sed -f` runs a script file the classifier cannot see."
        ),
        "--file": Verdict(
            "unknown", "medium", "`sed -f` runs a script file the classifier cannot see."
        ),
    },
)

_AWK = spec(
    "-S --sandbox -b --characters-as-bytes -c --traditional -P --posix -r --re-interval -N "
    "--use-lc-numeric -n --non-decimal-data -s --no-optimize -M --bignum --version -V "
    "--help -h --copyright -C --lint-old -t",
    {
        "-F": ANY,
        "--field-separator": ANY,
        "-v": ASSIGNMENT,
        "--assign": ASSIGNMENT,
        "-e": ANY,
        "--source": ANY,
    },
    language=awk_language,
    dangers={
        option: Verdict(
            "process", "high", f"`awk {option}` loads or runs code the classifier cannot see."
        )
        for option in ("-f", "--file", "-i", "--include", "-l", "--load", "-E", "--exec")
    }
    | {
        option: Verdict("write", "medium", f"`awk {option}` writes a file.")
        for option in ("-o", "--pretty-print", "-p", "--profile", "-d", "--dump-variables")
    },
)

_JQ = spec(
    "-r --raw-output -j --join-output -a --ascii-output -c --compact-output -C "
    "--color-output -M --monochrome-output -S --sort-keys -s --slurp -n --null-input "
    "-e --exit-status -R --raw-input --tab --seq --stream --stream-errors --raw-output0 "
    "--unbuffered --args --jsonargs -h --help -V --version --build-configuration",
    {"--indent": NUM},
    pairs={"--arg": ANY, "--argjson": ANY, "--slurpfile": FILE, "--rawfile": FILE},
    language=jq_language,
    dangers={
        option: Verdict(
            "unknown", "medium", f"`jq {option}` loads a program the classifier cannot see."
        )
        for option in ("-f", "--from-file", "-L")
    },
)

_YQ = spec(
    # mikefarah's yq and the Python yq (a jq wrapper) together
    "-P --prettyPrint -C --colors -M --no-colors -N --no-doc -e --exit-status -n --null-input "
    "-0 --nul-output -r --raw-output -y --yaml-output -Y --yaml-roundtrip -c "
    "--compact-output -S --sort-keys -j --tojson --unwrapScalar -x --xml-output "
    "-t --toml-output -h --help -V --version",
    {
        **with_values(NAME, "-o --output-format -p --input-format"),
        "-I": NUM,
        "--indent": NUM,
    },
    pairs={"--arg": ANY, "--argjson": ANY},
    language=yq_language,
)

_FIND = spec(
    "-H -L -P",
    {"-D": NAME, "-O": NUM},
    stop_at_positional=True,
    lenient=True,  # the expression (`-name x`) is parsed by find_language
    language=find_language,
    honours_dashes=False,  # `--` ends find's options, not its expression
)

_FD = spec(
    "-H --hidden -I --no-ignore --no-ignore-vcs --no-ignore-parent -u --unrestricted "
    "-s --case-sensitive -i --ignore-case -g --glob --regex -F --fixed-strings "
    "-a --absolute-path --relative-path -l --list-details -L --follow -p --full-path -0 "
    "--print0 --prune -1 -q --quiet --show-errors --strip-cwd-prefix --one-file-system "
    "--no-require-git -h --help -V --version",
    {
        **with_values(NUM, "-d --max-depth --min-depth --exact-depth -j --threads --max-results"),
        **with_values(
            ANY,
            "-t --type -e --extension -E --exclude -S --size "
            "--changed-within --changed-before --change-newer-than "
            "--change-older-than -o --owner --format --and",
        ),
        **with_values(DIR, "--base-directory --search-path"),
        "-c": COLOR,
        "--color": COLOR,
    },
)

_TEST = spec(lenient=True, stop_at_positional=True, language=test_language, honours_dashes=False)

_STAT = spec(
    "-L --dereference -f --file-system -t --terse --help --version",
    {
        **with_values(FORMAT, "-c --format --printf"),
        "--cached": choice("always", "never", "default"),
    },
    glob_safe=True,
)
_FILE = spec(
    "-b --brief -i --mime --mime-type --mime-encoding -L --dereference -h --no-dereference "
    "-z --uncompress -Z --uncompress-noreport -s --special-files -k --keep-going -r --raw "
    "-0 --print0 -N --no-pad -n --no-buffer -E --extension --apple -l --list "
    "-v --version --help",
    {
        **with_values(ANY, "-e --exclude -P --parameter -F --separator --exclude-quiet"),
        **with_values(FILE, "-f --files-from -m --magic-file"),
    },
)
_DIFF = spec(
    "-q --brief -s --report-identical-files -c -u -e --ed -n --rcs -y --side-by-side "
    "-t --expand-tabs -T --initial-tab -r --recursive -N --new-file --unidirectional-new-file "
    "-i --ignore-case --ignore-file-name-case --no-ignore-file-name-case -E "
    "--ignore-tab-expansion -Z --ignore-trailing-space -b --ignore-space-change "
    "-w --ignore-all-space -B --ignore-blank-lines -a --text --strip-trailing-cr "
    "-d --minimal --speed-large-files -p --show-c-function --no-dereference "
    "--suppress-common-lines --left-column --normal --suppress-blank-empty --help "
    "-v --version",
    {
        **with_values(NUM, "-C -U -W --width --horizon-lines --tabsize"),
        **with_values(
            ANY,
            "-x --exclude -S --starting-file -I --ignore-matching-lines "
            "-F --show-function-line --label --from-file --to-file "
            "--line-format --old-line-format --new-line-format "
            "--unchanged-line-format --old-group-format --new-group-format "
            "--changed-group-format --unchanged-group-format",
        ),
        "-X": FILE,
        "--exclude-from": FILE,
    },
    optional={"--context": NUM, "--unified": NUM, "--color": COLOR},
)
_CMP = spec(
    "-b --print-bytes -l --verbose -s --quiet --silent --help -v --version",
    {**with_values(ANY, "-i --ignore-initial"), **with_values(SIZE, "-n --bytes")},
    max_operands=4,
)
_XXD = spec(
    "-a -b -C -E -e -i -p -u -d -h -v",
    with_values(ANY, "-c -g -l -o -s -n"),
    aliases={
        "-autoskip": "-a",
        "-bits": "-b",
        "-capitalize": "-C",
        "-EBCDIC": "-E",
        "-include": "-i",
        "-ps": "-p",
        "-postscript": "-p",
        "-plain": "-p",
        "-uppercase": "-u",
        "-cols": "-c",
        "-groupsize": "-g",
        "-len": "-l",
        "-offset": "-o",
        "-seek": "-s",
        "-name": "-n",
        "-help": "-h",
        "-version": "-v",
    },
    max_operands=1,  # a second operand is the output file (and -r turns hex into a file)
)
_OD = spec(
    "-a -b -c -d -f -i -l -o -s -x -v --output-duplicates --traditional --help --version",
    {
        **with_values(ANY, "-A --address-radix -t --format --endian"),
        **with_values(SIZE, "-j --skip-bytes -N --read-bytes"),
    },
    optional={"--strings": SIZE, "--width": NUM},
)
_HEXDUMP = spec(
    "-b -c -C --canonical -d -o -x -v --no-squeezing -L -h --help -V --version",
    {
        **with_values(FORMAT, "-e --format"),
        **with_values(FILE, "-f --format-file"),
        **with_values(SIZE, "-n --length -s --skip"),
    },
    optional={"--color": COLOR},
)
_STRINGS = spec(
    "-a --all -d --data -f --print-file-name -w --include-all-whitespace -h --help -v -V --version",
    {
        **with_values(NUM, "-n --bytes"),
        **with_values(choice("o", "d", "x"), "-t --radix"),
        **with_values(choice("s", "S", "b", "l", "B", "L"), "-e --encoding"),
        **with_values(ANY, "-s --output-separator"),
        **with_values(
            choice(
                "default",
                "invalid",
                "locale",
                "escape",
                "hex",
                "highlight",
                "d",
                "i",
                "l",
                "e",
                "x",
                "h",
            ),
            "-U --unicode",
        ),
    },
    numeric="-n",
    operand=_not_response_file,
)
_BASE64 = spec("-d --decode -i --ignore-garbage --help --version", with_values(NUM, "-w --wrap"))
_BASENC = spec(
    "-d --decode -i --ignore-garbage --base64 --base64url --base32 --base32hex --base16 "
    "--base2msbf --base2lsbf --z85 --help --version",
    with_values(NUM, "-w --wrap"),
)
_SUM = spec(
    "-b --binary -t --text -z --zero --tag -c --check --ignore-missing --quiet --status "
    "--strict -w --warn --help --version",
    glob_safe=True,
)
_CKSUM = spec(
    "--base64 --raw --untagged --tag -z --zero -c --check --ignore-missing --quiet --status "
    "--strict -w --warn --debug --help --version",
    {**with_values(NAME, "-a --algorithm"), **with_values(NUM, "-l --length")},
    glob_safe=True,
)
_OLD_SUM = spec("-r -s --sysv --help --version", glob_safe=True)

# Programs that print their arguments or ignore them.
_ECHO = spec("-n -e -E", lenient=True, stop_at_positional=True)
_PRINTF = spec("", stop_at_positional=True)  # no `-v VAR`: bash's printf assigns
_IGNORES_ARGS = spec(lenient=True)  # true, false
MAX_SLEEP_SECONDS = 300  # longer only meets the command timeout (60 s by default)
MAX_SEQ_LINES = 10_000_000
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def _sleep_bounded(argv: Sequence[str], opts: Opts) -> Verdict | None:
    """A sleep of more than a few minutes is a runaway: it needs approval."""
    total = 0.0
    for i in opts.positionals:
        word = argv[i]
        unit = word[-1] if word[-1:] in "smhd" else ""
        try:
            total += float(word[: len(word) - len(unit)]) * _UNIT_SECONDS[unit]
        except ValueError:
            return Verdict("unknown", "medium", f"`sleep {word}` is not a duration.")
    if total > MAX_SLEEP_SECONDS:
        return Verdict(
            "process", "medium", f"`sleep` for {total:g} s outlasts any command timeout."
        )
    return None


def _seq_bounded(argv: Sequence[str], opts: Opts) -> Verdict | None:
    """`seq 1 1e12` prints without end, for practical purposes."""
    try:
        numbers = [float(argv[i]) for i in opts.positionals]
    except ValueError:
        return None  # the operand shape already refused it
    if not numbers:
        return None
    first, step, last = (
        (1.0, 1.0, numbers[0])
        if len(numbers) == 1
        else ((numbers[0], 1.0, numbers[1]) if len(numbers) == 2 else tuple(numbers[:3]))
    )
    if step == 0 or (last - first) / step > MAX_SEQ_LINES:
        return Verdict("process", "medium", "`seq` would print too many lines.")
    return None


_SEQ = spec(
    "-w --equal-width --help --version",
    {**with_values(FORMAT, "-f --format"), **with_values(ANY, "-s --separator")},
    numbers_are_operands=True,
    max_operands=3,
    operand=NUMBER,
    language=_seq_bounded,
)
_SLEEP = spec("--help --version", operand=DURATION, language=_sleep_bounded)
_EXPR = spec(lenient=True, numbers_are_operands=True)  # arithmetic and string operators
_REALPATH = spec(
    "-e --canonicalize-existing -m --canonicalize-missing -L --logical -P --physical "
    "-q --quiet -s --strip --no-symlinks -z --zero --help --version",
    with_values(DIR, "--relative-to --relative-base"),
)
_READLINK = spec(
    "-f --canonicalize -e --canonicalize-existing -m --canonicalize-missing -n --no-newline "
    "-q --quiet -s --silent -v --verbose -z --zero --help --version"
)
_BASENAME = spec("-a --multiple -z --zero --help --version", with_values(ANY, "-s --suffix"))
_DIRNAME = spec("-z --zero --help --version")
_PWD = spec("-L -P --help --version", max_operands=0)
_WHICH = spec("-a -s", stop_at_positional=True)
_TYPE = spec("-a -f -P -p -t")
_WHOAMI = spec("--help --version", max_operands=0)
_ID = spec(
    "-a -Z --context -g --group -G --groups -n --name -r --real -u --user -z --zero --help "
    "--version",
    max_operands=1,
)
_GROUPS = spec("--help --version")
_TREE = spec(
    "-a -d -l -f -x -i -q -N -Q -p -u -g -s -h --si --du -D -F --inodes --device -v -t -c "
    "-U -r --dirsfirst --filesfirst -n -C -X -J -S --noreport --prune --matchdirs "
    "--ignore-case --gitignore --info --fflinks --metafirst --help --version --condense",
    {
        **with_values(NUM, "-L --filelimit"),
        **with_values(ANY, "-P -I --charset --timefmt -T -H --hintro --houtro --sort"),
    },
    glob_safe=False,
)
_NUMFMT = spec(
    "--grouping -z --zero-terminated --debug --help --version",
    {
        **with_values(
            ANY, "--from --to --round --suffix --format --invalid --field -d --delimiter"
        ),
        **with_values(SIZE, "--from-unit --to-unit --padding"),
    },
    optional={"--header": NUM},
)
_FMT = spec(
    "-c --crown-margin -s --split-only -t --tagged-paragraph -u --uniform-spacing --help --version",
    {**with_values(ANY, "-p --prefix"), **with_values(NUM, "-w --width -g --goal")},
    numeric="-w",
)
_PR = spec(
    "-a --across -c --show-control-chars -d --double-space -F -f -J --join-lines -m --merge "
    "-r --no-file-warnings -t --omit-header -T --omit-pagination -v --show-nonprinting "
    "--help --version",
    {
        **with_values(
            ANY,
            "-D --date-format -h --header -s -S --sep-string -e -i -n "
            "--expand-tabs --output-tabs --number-lines",
        ),
        **with_values(
            NUM,
            "-l --length -N --first-line-number -o --indent -w --width -W --page-width --columns",
        ),
    },
    numeric="--columns",
)
_PRINTENV = spec("-0 --null --help --version")
_TSORT = spec("--help --version", max_operands=1)
_REV = spec("--help -V --version", glob_safe=True)
_CD = spec("-L -P -e -@", max_operands=1)

# gzip-family readers. The compressors themselves only read with `-c` and
# `-d` (or `-l`/`-t`); `compress_language` in their specs says so.
_ZCAT = spec(
    "-f --force -q --quiet -v --verbose -l --list -t --test -h --help -V --version -L "
    "--license -N --name -n --no-name",
    glob_safe=True,
)
_XZCAT = spec(
    "-f --force -q --quiet -v --verbose -Q --no-warn -l --list -t --test --single-stream "
    "--no-sparse --ignore-check -h --help -V --version",
    {
        **with_values(NUM, "-T --threads"),
        **with_values(SIZE, "-M --memlimit --memory"),
        **with_values(NAME, "-F --format"),
    },
    glob_safe=True,
)
_BZCAT = spec(
    "-s --small -q --quiet -v --verbose -f --force -h --help -V --version -L --license",
    glob_safe=True,
)
_ZSTDCAT = spec(
    "-q --quiet -v --verbose -f --force --no-progress -h --help -V --version",
    {**with_values(NUM, "-T --threads"), **with_values(SIZE, "-M --memory")},
    optional={"--memory": SIZE},
    glob_safe=False,  # zstd's own `-o FILE` and `--rm` are one file name away
)
_ZGREP = _GREP  # zgrep hands its options to grep


def _compressor(extra_flags: str) -> Spec:
    return spec(
        "-c --stdout --to-stdout -d --decompress --uncompress -l --list -t --test -q --quiet "
        "-v --verbose -f --force -k --keep -h --help -V --version " + extra_flags,
        language=compress_language,
        glob_safe=False,
    )


_GETENT_DATABASES = frozenset(
    "hosts ahosts ahostsv4 ahostsv6 networks protocols services passwd group netgroup rpc "
    "ethers aliases initgroups".split()
)


def _getent_database(argv: Sequence[str], opts: Opts) -> Verdict | None:
    """`getent shadow` prints password hashes; the other databases are public."""
    if not opts.positionals:
        return Verdict("unknown", "medium", "`getent` needs a database name.")
    database = argv[opts.positionals[0]]
    if database in _GETENT_DATABASES:
        return None
    return Verdict("read", "high", f"`getent {database}` may print secrets; it needs approval.")


_GETENT = spec(
    "-i --no-idn -h --help -V --version",
    with_values(NAME, "-s --service"),
    language=_getent_database,
)

# Small system-information programs nobody else lists.
_NO_ARGS = spec("--help --version", max_operands=0)
_GETCONF = spec("-a --all", {"-v": NAME}, max_operands=2)
_LAST = spec(
    "-a --hostlast -d --dns -F --fulltimes -i --ip -w --fullnames -x --system -R "
    "--nohostname --help -V --version",
    {
        **with_values(NUM, "-n --limit"),
        **with_values(ANY, "-s --since -t --until -p --present --time-format"),
        **with_values(FILE, "-f --file"),
    },
    numeric="-n",
)
_LASTLOG = spec(  # not -C (clears records) nor -S (sets them)
    "-h --help", {**with_values(NUM, "-b --before -t --time"), **with_values(NAME, "-u --user")}
)
_LOCALE = spec(
    "-a --all-locales -m --charmaps -c --category-name -k --keyword-name -v --verbose --help "
    "-V --version"
)
_TTY = spec("-s --silent --quiet --help --version", max_operands=0)
_USERS = spec("--help --version", max_operands=1)
_NPROC = spec("--all --help --version", {"--ignore": NUM}, max_operands=0)
_PGREP = spec(  # pkill's options, minus signalling; not --env (probes other processes' env)
    "-l --list-name -a --list-full -c --count -f --full -i --ignore-case -n --newest "
    "-o --oldest -v --inverse -w --lightweight -x --exact -A --ignore-ancestors --help "
    "-V --version",
    {
        **with_values(
            ANY,
            "-d --delimiter -g --pgroup -G --group -P --parent -s --session "
            "-t --terminal -u --euid -U --uid --ns --nslist -r --runstates "
            "--cgroup",
        ),
        **with_values(FILE, "-F --pidfile"),
    },
)
_PIDOF = spec("-s -c -n -x -z -q", with_values(ANY, "-o --omit-pid -S --separator"))


def _shuf_bounded(argv: Sequence[str], opts: Opts) -> Verdict | None:
    """`shuf -r` without `-n` repeats forever."""
    if opts.has("-r", "--repeat") and not opts.has("-n", "--head-count"):
        return Verdict("process", "medium", "`shuf -r` without `-n` never ends.")
    counts = opts.values("-n", "--head-count")
    if opts.has("-r", "--repeat") and any(int(c) > MAX_SEQ_LINES for c in counts):
        return Verdict("process", "medium", "`shuf -r` would print too many lines.")
    return None


_SHUF = spec(  # not -o (writes a file)
    "-e --echo -r --repeat -z --zero-terminated --help --version",
    {
        **with_values(ANY, "-i --input-range"),
        **with_values(NUM, "-n --head-count"),
        "--random-source": FILE,
    },
    language=_shuf_bounded,
)
_W = spec(
    "-h --no-header -u --no-current -s --short -f --from -o --old-style -i --ip-addr "
    "-p --pids --help -V --version",
    max_operands=1,
)
_WHEREIS = spec("-b -m -s -u -l -f", with_values(ANY, "-B -M -S"))
_WHO = spec(
    "-a --all -b --boot -d --dead -H --heading -l --login --lookup -m -p --process -q "
    "--count -r --runlevel -s --short -t --time -T -w --mesg --writable -u --users --ips "
    "--help --version",
    max_operands=2,
)

# bash's `ulimit`: with no value it only prints the limit (a value would set it).
_ULIMIT = spec("-a -b -c -d -e -f -i -k -l -m -n -p -q -r -s -t -u -v -x -P -R -T -H -S",
               max_operands=0)  # fmt: skip

TEXT_SPECS: dict[str, Spec] = {
    "ls": _LS,
    "cat": _CAT,
    "head": _HEAD,
    "tail": _TAIL,
    "wc": _WC,
    "cut": _CUT,
    "tr": _TR,
    "nl": _NL,
    "column": _COLUMN,
    "paste": _PASTE,
    "join": _JOIN,
    "comm": _COMM,
    "fold": _FOLD,
    "expand": _EXPAND,
    "unexpand": _UNEXPAND,
    "rev": _REV,
    "tac": _TAC,
    "sort": _SORT,
    "uniq": _UNIQ,
    "grep": _GREP,
    "egrep": _GREP,
    "fgrep": _GREP,
    "rg": _RG,
    "zgrep": _ZGREP,
    "zegrep": _ZGREP,
    "zfgrep": _ZGREP,
    "bzgrep": _ZGREP,
    "xzgrep": _ZGREP,
    "zstdgrep": _ZGREP,
    "zcat": _ZCAT,
    "gzcat": _ZCAT,
    "xzcat": _XZCAT,
    "lzcat": _XZCAT,
    "bzcat": _BZCAT,
    "zstdcat": _ZSTDCAT,
    "gzip": _compressor("-r --recursive -n --no-name -N --name"),
    "xz": _compressor("--single-stream --ignore-check"),
    "bzip2": _compressor("-s --small"),
    "zstd": _compressor("--no-progress"),
    "find": _FIND,
    "fd": _FD,
    "fdfind": _FD,
    "sed": _SED,
    "awk": _AWK,
    "gawk": _AWK,
    "mawk": _AWK,
    "nawk": _AWK,
    "jq": _JQ,
    "yq": _YQ,
    "test": _TEST,
    "[": _TEST,
    "stat": _STAT,
    "file": _FILE,
    "diff": _DIFF,
    "cmp": _CMP,
    "xxd": _XXD,
    "od": _OD,
    "hexdump": _HEXDUMP,
    "strings": _STRINGS,
    "base64": _BASE64,
    "base32": _BASE64,
    "basenc": _BASENC,
    "md5sum": _SUM,
    "sha1sum": _SUM,
    "sha224sum": _SUM,
    "sha256sum": _SUM,
    "sha384sum": _SUM,
    "sha512sum": _SUM,
    "b2sum": _SUM,
    "cksum": _CKSUM,
    "sum": _OLD_SUM,
    "echo": _ECHO,
    "printf": _PRINTF,
    "true": _IGNORES_ARGS,
    "false": _IGNORES_ARGS,
    "seq": _SEQ,
    "sleep": _SLEEP,
    "expr": _EXPR,
    "realpath": _REALPATH,
    "readlink": _READLINK,
    "basename": _BASENAME,
    "dirname": _DIRNAME,
    "pwd": _PWD,
    "which": _WHICH,
    "type": _TYPE,
    "whoami": _WHOAMI,
    "id": _ID,
    "groups": _GROUPS,
    "tree": _TREE,
    "numfmt": _NUMFMT,
    "fmt": _FMT,
    "pr": _PR,
    "printenv": _PRINTENV,
    "tsort": _TSORT,
    "cd": _CD,
    "getent": _GETENT,
    "arch": _NO_ARGS,
    "logname": _NO_ARGS,
    "getconf": _GETCONF,
    "last": _LAST,
    "lastlog": _LASTLOG,
    "locale": _LOCALE,
    "tty": _TTY,
    "users": _USERS,
    "nproc": _NPROC,
    "pgrep": _PGREP,
    "pidof": _PIDOF,
    "shuf": _SHUF,
    "w": _W,
    "whereis": _WHEREIS,
    "who": _WHO,
    "ulimit": _ULIMIT,
}
