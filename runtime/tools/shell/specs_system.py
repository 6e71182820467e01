"""Allow-lists for system and network-client programs: ps, top, ss, df, journalctl, dig, ping, …

`SYSTEM_SPECS` lists, for every program here that has a plain option grammar,
the options known to be harmless and the shape of their values (`specs.Spec`).
Anything else (an option nobody listed, a value of the wrong shape, an
operand that is not allowed) needs approval.

Some programs need one more rule than their options: `top` never ends without
`-b -n N`, `ps` takes BSD option bundles without a dash (`ps e` prints every
process's environment), `vmstat 1` never ends without a count, `dig @host`
sends the query to an arbitrary server. `SYSTEM_POLICIES` holds a policy for
every program here: the option check plus that one rule, so the allow-list
holds even where the analyser only looks at policies.

Network and sockets (told to the sandbox, `profiles`): the read-only use of
these programs needs more than the default sandbox, and their options are
allow-listed so that nothing can point them somewhere else:

- `dig`, `host`, `nslookup`, `ping -c N`: the network (DNS to the configured
  resolver; ICMP echo). `dig @server` may name the server (see `_DIG_SERVER`
  for why); `host name server` and `nslookup name server` still need
  approval; so do `dig -f file` (it sends a file's lines as queries) and
  `dig -k`/`-y` (TSIG keys). `traceroute`/`tracepath`/`mtr` always need
  approval: they probe every hop and often outlast the timeout.
- `ip`, `ss`, `netstat`, `iptables -L`, `nft list`, `lsof -i`, `ethtool`: no
  network traffic at all, but they describe the *host's* network namespace;
  in a private one they only see the sandbox's loopback.
- `systemctl`, `loginctl`, `timedatectl`, `hostnamectl`, `localectl`: the
  system D-Bus socket (`/run/dbus/system_bus_socket`) and `/run/systemd`, no
  network. `journalctl` reads `/var/log/journal` and `/run/log/journal` files.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from runtime.tools.shell.options import getopt
from runtime.tools.shell.paths import secret_reason
from runtime.tools.shell.programs import FLAG_SENSITIVE
from runtime.tools.shell.specs import (
    ANY,
    NAME,
    NUM,
    SIZE,
    Spec,
    check,
    choice,
    list_of,
    matches,
    spec,
    with_values,
)
from runtime.tools.shell.subcommands import JOURNAL_OUTPUT, SUBCOMMAND_POLICIES
from runtime.tools.shell.verdict import Verdict

Policy = Callable[[list[str]], Verdict | None]


def _path(value: str) -> str | None:
    """A file the program reads: any path that is not a secret location."""
    return "names a secret location" if secret_reason(value) else None


# Shapes used below.
COUNT = matches(r"[0-9]{1,6}", "a count")
SECONDS = matches(r"[0-9]{1,6}(\.[0-9]{1,3})?", "a number of seconds")
PIDS = matches(r"[0-9]+([, ][0-9]+)*", "a list of process ids")
FIELDS = matches(r"[A-Za-z0-9_%:,=+.-]{1,512}", "a list of fields")
HOSTNAME = matches(r"[A-Za-z0-9_:][A-Za-z0-9_.:%-]{0,252}", "a host name or address")
IFACE = matches(r"[A-Za-z0-9_.:@-]{1,32}", "an interface name")
DATE_TEXT = matches(r"[A-Za-z0-9 :+.,_/-]{1,64}", "a date or time")
NOT_OPTION = matches(r"[^-].*|-", "an operand")

# Long options are never abbreviated here: getopt_long prefers an exact match,
# so an allow-listed `--follow-name` must not accept the forbidden `--follow`
# as its abbreviation.
_EXACT = {"long_abbrev": False}


def _approval(action: str, risk: str, reason: str) -> Verdict:
    return Verdict(action, risk, reason)


# ---------------------------------------------------------------------------
# Processes and resources
# ---------------------------------------------------------------------------

_PS_VALUES = {
    **with_values(FIELDS, "-o -O --format -s --sort --sid"),
    **with_values(PIDS, "-p --pid --ppid -q --quick-pid"),
    **with_values(FIELDS, "-u -U --user --User -g -G --group --Group -C -t --tty"),
    **with_values(COUNT, "--cols --columns --width --rows --lines"),
}
PS = spec(
    "-A -e -a -d -N --deselect -r -T -x -f -F -l -j -y -H -w -M -Z -L -m -c -P "
    "--forest --headers --no-headers --no-heading --cumulative --help --version -V",
    _PS_VALUES,
    **_EXACT,
)
# BSD-style operands (`ps aux`, `ps axjf`): letters without `e` (environment)
# and without those that take a value, which would need their own parsing.
_PS_BSD = re.compile(r"[aAcCfhjlmrsSTuvwxXnLMZH]+")


_PS_VALUE_LETTERS = frozenset(o[1] for o in PS.values if len(o) == 2)


def _may_turn_bsd(argv: list[str]) -> bool:
    """Whether procps could re-read this command line as BSD options with an `e`.

    procps re-parses the whole command line BSD-style (dashes dropped) when the
    UNIX reading fails: `-x` is no UNIX option, and a glued value that is no
    user or group (`-ux`, `-gx`, `-sx`) fails too. `ps -aeux` then prints every
    process's environment. An `e` in a dash bundle is harmless only if nothing
    can trigger that fallback (measured with procps-ng 4).
    """
    has_e = has_x = glued = False
    skip = False
    for arg in argv[1:]:
        if skip:
            skip = False
            continue
        if not arg.startswith("-") or arg.startswith("--") or arg == "-":
            continue
        letters = arg[1:]
        has_e = has_e or "e" in letters
        for j, ch in enumerate(letters):
            if ch in _PS_VALUE_LETTERS:
                glued = glued or j < len(letters) - 1
                skip = j == len(letters) - 1
                break
            has_x = has_x or ch == "x"
    return has_e and (has_x or glued)


def _policy_ps(argv: list[str]) -> Verdict | None:
    if _may_turn_bsd(argv):
        return _approval(
            "read",
            "high",
            "`ps` may read these options BSD-style, where `e` shows other processes' environments",
        )
    problem = check("ps", PS, argv)
    if problem is None:
        opts = getopt(argv, flags=PS.flags, values=tuple(PS.values), long_abbrev=False)
        for i in opts.positionals:
            if not _PS_BSD.fullmatch(argv[i]):
                if "e" in argv[i] and argv[i].isalpha():
                    return _approval("read", "high", "`ps e` shows other processes' environments")
                problem = f"`ps {argv[i]}` is not an option bundle known to be safe"
                break
    if problem:
        return _approval("read", "medium", f"{problem} needs approval")
    return None


# `-e`/`-E` take a scaling letter in procps top.
TOP = spec(
    "-b -c -H -i -S -s -1 -h -v -V",
    {
        "-n": COUNT,
        "-d": SECONDS,
        "-o": FIELDS,
        "-O": FIELDS,
        "-p": PIDS,
        "-u": NAME,
        "-U": NAME,
        "-w": COUNT,
        "-E": choice("k", "m", "g", "t", "p", "e"),
        "-e": choice("k", "m", "g", "t", "p"),
    },
    max_operands=0,
)


def _policy_top(argv: list[str]) -> Verdict | None:
    problem = check("top", TOP, argv)
    if problem:
        return _approval("process", "medium", f"{problem} needs approval")
    opts = getopt(argv, flags=TOP.flags, values=tuple(TOP.values))
    if opts.has("-b") and opts.has("-n"):
        return None
    return _approval("process", "medium", "`top` without `-b -n N` never ends (it needs a tty)")


_SYSSTAT_COMMON = "-h -H -y -z -V --human --pretty"
IOSTAT = spec(
    _SYSSTAT_COMMON + " -c -d -k -m -N -s -t -x --compact",
    {
        "-p": matches(r"[A-Za-z0-9_,/-]{1,256}|ALL", "devices or ALL"),
        "-j": choice("ID", "LABEL", "PATH", "UUID"),
        "-g": NAME,
        "-o": choice("JSON"),
        "--dec": choice("0", "1", "2"),
    },
    **_EXACT,
)
MPSTAT = spec(
    _SYSSTAT_COMMON + " -A -n -T -u",
    {
        "-I": list_of(choice("CPU", "SCPU", "SUM", "ALL")),
        "-P": matches(r"[0-9,-]{1,256}|ALL|ON", "CPU numbers or ALL"),
        "-N": matches(r"[0-9,-]{1,256}|ALL", "node numbers or ALL"),
        "-o": choice("JSON"),
        "--dec": choice("0", "1", "2"),
    },
    **_EXACT,
)
# `sar -o file` writes a file: not listed. `-f file` reads a data file.
SAR = spec(
    _SYSSTAT_COMMON + " -A -B -b -d -F -p -q -r -S -t -u -v -W -w -x",
    {
        "-f": _path,
        "-I": matches(r"[A-Za-z0-9,]{1,64}", "interrupts"),
        "-m": matches(r"[A-Z,]{1,64}", "power keywords"),
        "-n": matches(r"[A-Z0-9,-]{1,128}", "network keywords"),
        "-P": matches(r"[0-9,-]{1,256}|ALL", "CPU numbers or ALL"),
        "-s": matches(r"[0-9:]{1,8}", "a time"),
        "-e": matches(r"[0-9:]{1,8}", "a time"),
        "-i": COUNT,
        "-j": choice("ID", "LABEL", "PATH", "UUID", "SID"),
        "--dec": choice("0", "1", "2"),
    },
    **_EXACT,
)
# `pidstat -e program args` runs a program: not listed.
PIDSTAT = spec(
    _SYSSTAT_COMMON + " -d -I -l -R -r -s -t -U -u -v -w",
    {
        "-p": matches(r"[0-9,]{1,256}|ALL|SELF", "process ids, ALL or SELF"),
        "-C": ANY,
        "-G": ANY,
        "-T": choice("TASK", "CHILD", "ALL"),
        "--dec": choice("0", "1", "2"),
    },
    **_EXACT,
)
VMSTAT = spec(
    "-a --active -f --forks -m --slabs -n --one-header -s --stats -d --disk -D --disk-sum "
    "-t --timestamp -w --wide -y --no-first -h --help -V --version",
    {"-p": NAME, "--partition": NAME, "-S": choice("k", "K", "m", "M"), "--unit": ANY},
    **_EXACT,
)
# `-s N` repeats every N seconds forever unless `-c N` bounds it; `-c` alone
# repeats every second, `count` times.
FREE = spec(
    "-b --bytes -k --kibi -m --mebi -g --gibi --tebi --pebi --kilo --mega --giga --tera --peta "
    "-h --human -w --wide -t --total -l --lohi -v --committed --si --help -V --version",
    {**with_values(SECONDS, "-s --seconds"), **with_values(COUNT, "-c --count")},
    max_operands=0,
    **_EXACT,
)


def _policy_free(argv: list[str]) -> Verdict | None:
    problem = check("free", FREE, argv)
    if problem:
        return _approval("unknown", "medium", f"{problem} needs approval")
    opts = getopt(argv, flags=FREE.flags, values=tuple(FREE.values), long_abbrev=False)
    counts = opts.values("-c", "--count")
    if opts.has("-s", "--seconds") and not counts:
        return _approval("process", "medium", "`free -s` without `-c N` repeats forever")
    if any(int(c) < 1 for c in counts):
        return _approval("process", "medium", "`free -c` needs a count of at least 1")
    return None


# swapon only reads with `--show`/`--summary` (the `/proc/swaps` table); any
# operand or other option turns swap on.
SWAPON = spec(
    "-s --summary --noheadings --raw --bytes -h --help -V --version",
    optional={"--show": list_of(matches(r"[A-Za-z0-9-]{1,16}", "a column name"))},
    max_operands=0,
    **_EXACT,
)


def _policy_swapon(argv: list[str]) -> Verdict | None:
    problem = check("swapon", SWAPON, argv)
    shows = any(a.split("=")[0] in ("-s", "--summary", "--show", "-h", "--help", "-V",
                                     "--version") for a in argv[1:])  # fmt: skip
    if problem or not shows:
        return _approval("privileged", "high", "`swapon` without `--show` turns swap space on")
    return None


# systemd-analyze: verbs that only print what the service manager already
# knows, with options that cannot point it elsewhere. Not listed: `-H/--host`
# and `-M/--machine` (ssh or a container), `--root/--image` (another tree),
# `verify`, `condition`, `security` with files, `cat-config` (they load unit
# files or run generators), `log-level`/`log-target`/`service-watchdogs` (set
# the manager's state when given a value), `--man`/`--generators` (run programs).
_ANALYZE_VERBS = frozenset(
    "time blame critical-chain dot plot dump unit-paths calendar timespan timestamp "
    "exit-status capability syscall-filter filesystems".split()
)
SYSTEMD_ANALYZE = spec(
    "--no-pager --no-legend --system -q --quiet --order --require -h --help --version",
    {
        "--fuzz": matches(r"[0-9a-z ]{1,32}", "a time span"),
        "--from-pattern": NAME,
        "--to-pattern": NAME,
        "--iterations": COUNT,
        "--base-time": DATE_TEXT,
        "--json": choice("off", "pretty", "short"),
        "--scale-svg": matches(r"[0-9.]{1,8}", "a factor"),
    },
    operand=matches(r"[A-Za-z0-9_.:@*+ -]{1,256}", "a unit name, time or verb"),
    **_EXACT,
)


def _policy_systemd_analyze(argv: list[str]) -> Verdict | None:
    problem = check("systemd-analyze", SYSTEMD_ANALYZE, argv)
    if problem:
        return _approval("privileged", "medium", f"{problem} needs approval")
    opts = getopt(argv, flags=SYSTEMD_ANALYZE.flags, values=tuple(SYSTEMD_ANALYZE.values),
                  long_abbrev=False)  # fmt: skip
    verb = argv[opts.positionals[0]] if opts.positionals else "time"
    if verb not in _ANALYZE_VERBS:
        return _approval(
            "privileged", "medium", f"`systemd-analyze {verb}` is not a verb known to only read"
        )
    return None


UPTIME = spec("-p --pretty -s --since -h --help -V --version", max_operands=0, **_EXACT)


def _interval_count(name: str, s: Spec, numbers_from: int = 0) -> Policy:
    """Option check, then `[interval [count]]`: an interval without a count never ends."""

    def policy(argv: list[str]) -> Verdict | None:
        problem = check(name, s, argv)
        if problem:
            return _approval("unknown", "medium", f"{problem} needs approval")
        opts = getopt(argv, flags=s.flags, values=tuple(s.values), long_abbrev=s.long_abbrev)
        numbers = [argv[i] for i in opts.positionals if re.fullmatch(r"[0-9]+(\.[0-9]+)?", argv[i])]
        others = [argv[i] for i in opts.positionals if argv[i] not in numbers]
        if others and name != "iostat":
            return _approval("unknown", "medium", f"`{name} {others[0]}` needs approval")
        for word in others:  # iostat's device operands
            if not re.fullmatch(r"[A-Za-z0-9_/-]{1,64}|ALL", word):
                return _approval("unknown", "medium", f"`{name} {word}` needs approval")
        if len(numbers) > 2:
            return _approval("unknown", "medium", f"`{name}` takes an interval and a count")
        if len(numbers) == 2 and float(numbers[1]) < 1:
            return _approval("process", "medium", f"`{name}` with a count of 0 never ends")
        if len(numbers) == 1 and not (name == "sar" and opts.has("-f")):
            return _approval(
                "process", "medium", f"`{name} {numbers[0]}` without a count never ends"
            )
        return None

    return policy


# ---------------------------------------------------------------------------
# Sockets, files, disks, hardware
# ---------------------------------------------------------------------------

# `-K/--kill` kills sockets, `-E/--events` never ends, `-D/--diag` writes a file,
# `-N/--net` switches namespace: none listed. Operands are a filter expression.
SS = spec(
    "-h --help -V --version -H --no-header -O --oneline -n --numeric -r --resolve -a --all "
    "-l --listening -o --options -e --extended -m --memory -p --processes -T --threads -i "
    "--info --tos --cgroup --tipcinfo -s --summary -b --bpf -Z --context -z --contexts -4 "
    "--ipv4 -6 --ipv6 -0 --packet -t --tcp -M --mptcp -S --sctp -u --udp -d --dccp -w --raw "
    "-x --unix --tipc --vsock --xdp --inet-sockopt",
    {
        "-f": choice("unix", "inet", "inet6", "link", "netlink", "vsock", "tipc", "xdp"),
        "--family": choice("unix", "inet", "inet6", "link", "netlink", "vsock", "tipc", "xdp"),
        "-A": FIELDS,
        "--query": FIELDS,
        "--socket": FIELDS,
    },
    **_EXACT,
)
# `-c/--continuous` never ends: not listed.
NETSTAT = spec(
    "-a --all -n --numeric --numeric-hosts --numeric-ports --numeric-users -t --tcp -u --udp "
    "-w --raw -x --unix -l --listening -p --program -e --extend -r --route -i --interfaces "
    "-s --statistics -g --groups -M --masquerade -v --verbose -W --wide -o --timers -N "
    "--symbolic -C --cache -F --fib -4 -6 --inet --inet6 -h --help -V --version",
    {"-A": NAME, "--protocol": NAME},
    max_operands=0,
    **_EXACT,
)
DF = spec(
    "-a --all -h --human-readable -H --si -i --inodes -k -l --local -P --portability -T "
    "--print-type --total --no-sync --sync --help --version",
    {
        **with_values(NAME, "-t --type -x --exclude-type"),
        **with_values(SIZE, "-B --block-size"),
    },
    optional={"--output": FIELDS},
    **_EXACT,
)
DU = spec(
    "-0 --null -a --all --apparent-size -b --bytes -c --total -D --dereference-args -H -h "
    "--human-readable --inodes -k -L --dereference -l --count-links -m -P --no-dereference "
    "-S --separate-dirs --si -s --summarize -x --one-file-system --help --version",
    {
        **with_values(NUM, "-d --max-depth"),
        **with_values(SIZE, "-B --block-size -t --threshold"),
        "--exclude": ANY,
        **with_values(_path, "-X --exclude-from --files0-from"),
        "--time-style": ANY,
    },
    optional={"--time": choice("atime", "access", "use", "ctime", "status")},
    **_EXACT,
)
UNAME = spec(
    "-a --all -s --kernel-name -n --nodename -r --kernel-release -v --kernel-version -m "
    "--machine -p --processor -i --hardware-platform -o --operating-system --help --version",
    max_operands=0,
    **_EXACT,
)
LSBLK = spec(
    "-a --all -b --bytes -d --nodeps -D --discard -z --zoned -f --fs -J --json -l --list -m "
    "--perms -n --noheadings -O --output-all -p --paths -P --pairs -r --raw -s --inverse -S "
    "--scsi -N --nvme -v --virtio -t --topology -T --tree -A --noempty -M --merge -h --help "
    "-V --version -y --shell --ascii -i",
    {
        **with_values(FIELDS, "-o --output -x --sort -e --exclude -I --include -Q --filter"),
        "--width": COUNT,
        "-w": COUNT,
    },
    optional={"--tree": NAME},
    **_EXACT,
)
# `-e[=list]`/`-p[=list]`: a list only as `--extended=list`/`--parse=list`.
LSCPU = spec(
    "-a --all -b --online -c --offline -B --bytes -C -J --json -x --hex -y --physical -V "
    "--version -h --help --output-all -e -p",
    {"-s": _path, "--sysroot": _path},
    optional={"--extended": FIELDS, "--parse": FIELDS, "--caches": FIELDS},
    max_operands=0,
    **_EXACT,
)
# `lspci -q/-Q` asks a DNS server about ids: not listed.
LSPCI = spec(
    "-m -mm -t -v -vv -vvv -k -x -xxx -xxxx -b -D -P -PP -n -nn -M -version -i -F -A",
    {"-s": NAME, "-d": NAME, "-i": _path, "-F": _path, "-A": NAME, "-p": _path},
    max_operands=0,
    long_abbrev=False,
)
LSUSB = spec(
    "-v --verbose -t --tree -V --version -h --help",
    {"-s": NAME, "-d": NAME, "-D": _path},
    max_operands=0,
    **_EXACT,
)
LSMOD = spec(max_operands=0)
# `--poll` never ends; `-w/--timeout` only goes with it. `-F/--tab-file` reads a file.
FINDMNT = spec(
    "-A --all -a --ascii -b --bytes -C --nocanonicalize -c --canonicalize -D --df -d "
    "--direction -e --evaluate -f --first-only -i --invert -J --json -k --kernel -l --list -m "
    "--mtab -n --noheadings --output-all -P --pairs -R "
    "--submounts -r --raw --real --pseudo -s --fstab -U "
    "--uniq -u --notruncate -v --nofsroot -x --verify --verbose -y --shell --help -V --version "
    "--vfs-all --shadowed",
    {
        **with_values(FIELDS, "-o --output -O --options -t --types"),
        **with_values(_path, "-F --tab-file -T --target -M --mountpoint -S --source"),
        **with_values(choice("forward", "backward"), "-d --direction"),
        "-N": NUM,
        "--task": NUM,
        "--ns": _path,
        "--id": NUM,
        "--uniq-id": NUM,
    },
    **_EXACT,
)
# `-c/-C/-D/-E/-n/-w/-W` clear the ring buffer, change the console or follow: not listed.
_LEVELS = list_of(choice("emerg", "alert", "crit", "err", "warn", "notice", "info", "debug"))
DMESG = spec(
    "-T --ctime -H --human -P --nopager -k --kernel -u --userspace -x --decode -t --notime "
    "-r --raw -e --reltime -d --show-delta -S --syslog -J --json -p --force-prefix -h --help "
    "-V --version -L",
    {
        **with_values(_LEVELS, "-l --level"),
        **with_values(FIELDS, "-f --facility"),
        **with_values(_path, "-F --file -K --kmsg-file"),
        **with_values(NUM, "-s --buffer-size"),
        "--time-format": choice("ctime", "reltime", "delta", "notime", "iso", "raw"),
        **with_values(DATE_TEXT, "--since --until"),
    },
    optional={"--color": choice("auto", "never", "always")},
    max_operands=0,
    **_EXACT,
)
# `-f/--follow`, `--vacuum-*`, `--rotate`, `--flush`, `--sync`, `--relinquish-var`,
# `--setup-keys`, `--update-catalog`, `--cursor-file` (writes) are not listed.
JOURNALCTL = spec(
    "-a --all -e --pager-end -r --reverse -x --catalog -q --quiet -k --dmesg -l --full "
    "--no-full --no-pager --no-hostname --utc -m --merge --system --user --list-boots "
    "--disk-usage --header --verify --show-cursor --no-tail -N --fields --list-catalog "
    "--list-namespaces --list-fields -h --help --version --case-sensitive",
    {
        **with_values(NAME, "-u --unit --user-unit -t --identifier -T --exclude-identifier"),
        **with_values(matches(r"[0-9]{1,9}|all|\+[0-9]{1,9}", "a count or all"), "-n --lines"),
        **with_values(
            matches(r"[a-z0-9.]{1,24}", "a priority or range of priorities"), "-p --priority"
        ),
        **with_values(FIELDS, "--facility --output-fields -F --field"),
        **with_values(DATE_TEXT, "-S --since -U --until"),
        **with_values(JOURNAL_OUTPUT, "-o --output"),
        **with_values(ANY, "-g --grep --cursor --after-cursor -I --invocation"),
        **with_values(_path, "-D --directory --file -i --root --image"),
        "--namespace": NAME,
    },
    optional={"--case-sensitive": choice("yes", "no", "true", "false", "1", "0")},
    **_EXACT,
)
_BOOT = re.compile(r"[+-]?[0-9]{1,6}|[0-9a-f]{32}([+-][0-9]{1,6})?|all")


def _policy_journalctl(argv: list[str]) -> Verdict | None:
    # `-b`/`--boot` takes an optional value in the next word (`-b -1`): glue it
    # to a form getopt understands before checking.
    words: list[str] = [argv[0]]
    i = 1
    while i < len(argv):
        arg = argv[i]
        if arg in ("-b", "--boot"):
            if i + 1 < len(argv) and _BOOT.fullmatch(argv[i + 1]):
                i += 1
            arg = "--this-boot"
        elif arg.startswith(("--boot=", "-b")) and not arg.startswith("--"):
            value = arg[2:]
            if not _BOOT.fullmatch(value):
                return _approval("unknown", "medium", f"`journalctl {arg}` needs approval")
            arg = "--this-boot"
        elif arg.startswith("--boot="):
            if not _BOOT.fullmatch(arg[7:]):
                return _approval("unknown", "medium", f"`journalctl {arg}` needs approval")
            arg = "--this-boot"
        words.append(arg)
        i += 1
    s = Spec(flags=(*JOURNALCTL.flags, "--this-boot"), values=JOURNALCTL.values,
             optional=JOURNALCTL.optional, long_abbrev=False)  # fmt: skip
    problem = check("journalctl", s, words)
    if problem:
        return _approval("process", "medium", f"{problem} needs approval")
    return None


# lsof: `-r`/`+r` repeat forever; `+`-options and optional glued values need
# their own small parser.
_LSOF_FLAGS = frozenset(
    "-n -P -t -a -l -w -b -U -R -V -N -h -X -M -Q -H -C -E +E -x -? -O -S +c".split()
)
_LSOF_VALUES = frozenset("-p -u -c -g -d +d +D -s -k -z -Z -e -T -F +c".split())
_LSOF_GLUED = re.compile(r"-(i[^\s]*|s[A-Za-z:,^]*|T[a-z]*|F[a-zA-Z0]*|[lLO]|g[0-9,^]*)")
# `+L1`: files with fewer than that many links (deleted but open); `-L`: no counts.
_LSOF_LINKS = re.compile(r"\+L[0-9]{0,6}|-L")
# Bundles of value-less flags (`-nP`, `-lnP`). lsof reads `-nPi` as `-n -P -i`,
# so a trailing `i` (every internet file) is listed too; `r` never is.
_LSOF_BUNDLE = re.compile(r"-[nPtalwbUVNhXHCExOQ]{2,12}i?")
_LSOF_ADDR = re.compile(r"[46]?([A-Za-z]{3,4})?(@[A-Za-z0-9_.:\[\]-]+)?(:[A-Za-z0-9_,-]+)?")


def _policy_lsof(argv: list[str]) -> Verdict | None:
    i = 1
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            break
        if arg in ("-i",):
            if i + 1 < len(argv) and argv[i + 1] and _LSOF_ADDR.fullmatch(argv[i + 1]):
                i += 1
        elif arg in _LSOF_VALUES and arg not in ("-s", "-T", "-F"):
            if i + 1 >= len(argv) or argv[i + 1].startswith(("-", "+")):
                return _approval("unknown", "medium", f"`lsof {arg}` needs a value")
            if _path(argv[i + 1]):
                return _approval("read", "high", f"`lsof {arg} {argv[i + 1]}` names a secret")
            i += 1
        elif arg in _LSOF_FLAGS or _LSOF_GLUED.fullmatch(arg) or _LSOF_LINKS.fullmatch(arg):
            pass
        elif _LSOF_BUNDLE.fullmatch(arg):
            pass  # `-nP`: flags without values, bundled
        elif arg.startswith(("-", "+")):
            return _approval("process", "medium", f"`lsof {arg}` is not an option known to be safe")
        i += 1
    return None


# Showing an interface's settings; every option that changes one (`-s`, `-K`,
# `-G`, `-A`, `-C`, `-L`, `-E`, `-f` flashes firmware, `-t` runs a self-test
# that drops the link, `-p` blinks, `-r` restarts negotiation) is not listed.
ETHTOOL = spec(
    "-i --driver -S --statistics -k --show-features --show-offload -g --show-ring -a "
    "--show-pause -c --show-coalesce -l --show-channels -T --show-time-stamping -P "
    "--show-permaddr --show-fec --show-eee --json -I --include-statistics -h --help "
    "--version",
    max_operands=1,
    operand=IFACE,
    **_EXACT,
)


# ---------------------------------------------------------------------------
# Clock, host, kernel, schedules, signals
# ---------------------------------------------------------------------------

# `-s/--set` and a `MMDDhhmm` operand set the clock: not listed / not allowed.
DATE = spec(
    "-u --utc --universal -R --rfc-email --debug --help --version",
    {
        **with_values(ANY, "-d --date"),
        **with_values(_path, "-f --file -r --reference"),
        "--rfc-3339": choice("date", "seconds", "ns"),
        "-I": choice("date", "hours", "minutes", "seconds", "ns"),
    },
    optional={"--iso-8601": choice("date", "hours", "minutes", "seconds", "ns")},
    operand=matches(r"\+.*", "a +FORMAT (other operands set the clock)"),
    max_operands=1,
    **_EXACT,
)


def _policy_date(argv: list[str]) -> Verdict | None:
    words = ["-Idate" if a == "-I" else a for a in argv]
    problem = check("date", DATE, words)
    if problem:
        return _approval("privileged", "high", f"{problem}: it may set the clock")
    return None


# An operand or `-F/--file` sets the host name.
HOSTNAME_SPEC = spec(
    "-f --fqdn --long -s --short -i --ip-address -I --all-ip-addresses -d --domain -A "
    "--all-fqdns -a --alias -y --yp --nis -v --verbose -V --version -h --help",
    max_operands=0,
    **_EXACT,
)
# `-w`, `-p/--load`, `--system`, `-f` and `name=value` change kernel settings.
SYSCTL = spec(
    "-a -A -X --all -n --values -N --names -e --ignore -b --binary -q --quiet -h --help -V "
    "--version -d",
    {"-r": ANY, "--pattern": ANY},
    operand=matches(r"[A-Za-z0-9_./*-]{1,256}", "a setting name (name=value changes it)"),
    **_EXACT,
)
# Only `crontab -l` lists; every other form installs or removes a crontab.
CRONTAB = spec("-l", {"-u": NAME}, max_operands=0)


def _policy_crontab(argv: list[str]) -> Verdict | None:
    if check("crontab", CRONTAB, argv) is None and getopt(
        argv, flags=CRONTAB.flags, values=tuple(CRONTAB.values)
    ).has("-l"):
        return None
    return _approval("process", "high", "`crontab` other than `crontab -l` changes scheduled jobs")


def _policy_kill(argv: list[str]) -> Verdict | None:
    # Listing signal names is the only read-only use; sending signals is PROCESS.
    rest = argv[1:]
    if (
        rest[:1] in (["-l"], ["-L"], ["--list"], ["--table"])
        and all(re.fullmatch(r"[0-9]{1,3}|[A-Z][A-Z0-9+]{0,11}", a) for a in rest[1:2])
        and len(rest) <= 2
    ):
        return None
    return _approval("process", "high", "`kill` signals processes")


# ---------------------------------------------------------------------------
# Network clients
# ---------------------------------------------------------------------------

# `-f` floods, `-p` fills packets with chosen bytes (a covert channel), `-i`
# below 0.2 s needs privileges and floods, `-b` pings a broadcast address,
# `-l` preloads a burst: not listed. A count or deadline is
# required, or ping never ends.
PING = spec(
    "-4 -6 -n -q -v -D -O -A -a -d -R -U -L -H",
    {
        "-c": matches(r"[1-9][0-9]?|100", "a count from 1 to 100"),
        "-w": matches(r"[1-9][0-9]?|1[0-9]{2}", "a deadline up to 199 seconds"),
        "-W": SECONDS,
        "-i": matches(
            r"([1-9][0-9]{0,2}|0?\.[2-9][0-9]?)(\.[0-9])?", "an interval of 0.2 s or more"
        ),
        "-s": matches(r"[0-9]{1,4}", "a packet size below 10000"),
        "-t": matches(r"[0-9]{1,3}", "a TTL"),
        "-I": IFACE,
        "-M": choice("do", "want", "dont", "probe"),
        "-Q": NUM,
    },
    operand=HOSTNAME,
    max_operands=1,
)


def _policy_ping(argv: list[str]) -> Verdict | None:
    problem = check(argv[0], PING, argv)
    if problem:
        risk = "high" if re.search(r"-\w*f", " ".join(argv[1:])) else "medium"
        return _approval("network", risk, f"{problem} needs approval")
    opts = getopt(argv, flags=PING.flags, values=tuple(PING.values))
    if not opts.has("-c", "-w"):
        return _approval("network", "medium", f"`{argv[0]}` without `-c N` never ends")
    if not opts.positionals:
        return _approval("network", "medium", f"`{argv[0]}` needs a destination")
    return None


def _policy_route_probe(argv: list[str]) -> Verdict | None:
    # traceroute/tracepath probe every hop to a host chosen on the command
    # line and often run past the timeout (30 hops x 3 probes x 5 s): they are
    # not among the sandbox's network exceptions, so a person decides.
    return _approval(
        "network", "medium", f"`{argv[0]}` probes every hop to a host; it needs approval"
    )


# dig: `+options` allow-listed; `@server` sends the query to an arbitrary
# server, `-f file` sends a file's lines as queries, `-k`/`-y` use TSIG keys.
_DIG_PLUS = re.compile(
    r"\+(no)?(short|all|answer|authority|additional|question|comments|cmd|stats|multiline|"
    r"multi|dnssec|tcp|vc|recurse|trace|nssearch|search|defname|ttlid|ttlunits|identify|cd|"
    r"cdflag|ad|adflag|aaflag|aaonly|edns|nsid|besteffort|class|crypto|rrcomments|split|"
    r"onesoa|expire|subnet|cookie|qr|showsearch|unknownformat|zflag|fail|idnin|idnout|"
    r"header-only|rdflag|raflag|tcflag|keepopen|badcookie|ednsflags|ednsnegotiation)"
    r"|\+(time|tries|retry|ndots|bufsize|edns|split|subnet)=[0-9A-Za-z./:]{1,40}"
)
DIG = spec(
    "-4 -6 -h -v -r -u -m -i",
    {"-t": NAME, "-c": NAME, "-q": HOSTNAME, "-x": HOSTNAME},
    operand=HOSTNAME,
)


# `@server` (a name or an address, port 53: `-p` is not listed) is allowed:
# asking a public resolver (`@1.1.1.1`) or a zone's own server is how on-call
# checks DNS, and it opens no channel the system resolver does not already
# give (any query name reaches its zone's server, whoever the attacker is).
# The query is a DNS question built from this command's own words, which the
# classifier has checked; a server word that is not a plain host needs approval.
_DIG_SERVER = re.compile(r"@[A-Za-z0-9][A-Za-z0-9.-]{0,252}|@[0-9A-Fa-f:.]{2,45}")


def _policy_dig(argv: list[str]) -> Verdict | None:
    plain: list[str] = [argv[0]]
    for arg in argv[1:]:
        if arg.startswith("@"):
            if not _DIG_SERVER.fullmatch(arg):
                return _approval(
                    "network", "medium", f"`dig {arg}` names a server that is not a plain host"
                )
            continue
        if arg.startswith("+"):
            if not _DIG_PLUS.fullmatch(arg):
                return _approval("network", "medium", f"`dig {arg}` needs approval")
            continue
        plain.append(arg)
    problem = check("dig", DIG, plain)
    if problem:
        return _approval("network", "medium", f"{problem} needs approval")
    return None


# host: a second operand is the server to ask.
HOST = spec(
    "-a -A -C -d -l -n -r -s -T -U -v -V -w -4 -6",
    {"-c": NAME, "-N": COUNT, "-R": COUNT, "-t": NAME, "-W": COUNT, "-m": NAME},
    operand=HOSTNAME,
    max_operands=1,
)


def _policy_nslookup(argv: list[str]) -> Verdict | None:
    names = [a for a in argv[1:] if not a.startswith("-")]
    for arg in argv[1:]:
        if arg.startswith("-") and not re.fullmatch(
            r"-(debug|nodebug|d2|nod2|recurse|norecurse|search|nosearch|vc|novc|"
            r"(type|query|querytype|q|ty|class|timeout|retry|ndots)=[A-Za-z0-9]{1,12})",
            arg,
        ):
            return _approval("network", "medium", f"`nslookup {arg}` needs approval")
    if len(names) != 1:
        why = (
            "`nslookup` with no name is interactive"
            if not names
            else "`nslookup name server` sends the query to a server named here"
        )
        return _approval("network", "medium", why)
    if HOSTNAME(names[0]):
        return _approval("network", "medium", f"`nslookup {names[0]}` needs approval")
    return None


# ---------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------

# Programs whose option check is all there is.
SYSTEM_SPECS: dict[str, Spec] = {
    "ss": SS,
    "netstat": NETSTAT,
    "df": DF,
    "du": DU,
    "uptime": UPTIME,
    "uname": UNAME,
    "lsblk": LSBLK,
    "lscpu": LSCPU,
    "lspci": LSPCI,
    "lsusb": LSUSB,
    "lsmod": LSMOD,
    "ethtool": ETHTOOL,
    "findmnt": FINDMNT,
    "dmesg": DMESG,
    "hostname": HOSTNAME_SPEC,
    "sysctl": SYSCTL,
    "host": HOST,
}

_ACTIONS = {
    "hostname": ("privileged", "high"),
    "ethtool": ("network", "high"),
    "sysctl": ("privileged", "high"),
    "dmesg": ("process", "medium"),
    "host": ("network", "medium"),
}


def _checked(name: str, s: Spec) -> Policy:
    action, risk = _ACTIONS.get(name, ("unknown", "medium"))

    def policy(argv: list[str]) -> Verdict | None:
        problem = check(argv[0], s, argv)
        return _approval(action, risk, f"{problem} needs approval") if problem else None

    return policy


# Every program this module and `subcommands` cover, with its policy.
SYSTEM_POLICIES: dict[str, Policy] = {
    **SUBCOMMAND_POLICIES,
    **{name: _checked(name, s) for name, s in SYSTEM_SPECS.items()},
    "ps": _policy_ps,
    "top": _policy_top,
    "iostat": _interval_count("iostat", IOSTAT),
    "mpstat": _interval_count("mpstat", MPSTAT),
    "sar": _interval_count("sar", SAR),
    "pidstat": _interval_count("pidstat", PIDSTAT),
    "vmstat": _interval_count("vmstat", VMSTAT),
    "journalctl": _policy_journalctl,
    "lsof": _policy_lsof,
    "free": _policy_free,
    "swapon": _policy_swapon,
    "systemd-analyze": _policy_systemd_analyze,
    "date": _policy_date,
    "crontab": _policy_crontab,
    "kill": _policy_kill,
    "ping": _policy_ping,
    "ping6": _policy_ping,
    "dig": _policy_dig,
    "nslookup": _policy_nslookup,
    **{name: _policy_route_probe for name in ("traceroute", "traceroute6", "tracepath",
                                              "tracepath6", "mtr")},
}  # fmt: skip


def _no_late_options(policy: Policy) -> Policy:
    """A word that could become an option at run time needs approval.

    The analyser asks about globs and variables for the programs in
    `FLAG_SENSITIVE` and the allow-listed ones; the other programs here get
    the same rule from this wrapper: a glob that starts with a wildcard
    (a file named `-out` would become an option) or any expansion.
    """

    def guarded(argv: list[str]) -> Verdict | None:
        for i, word in enumerate(argv[1:], 1):
            if argv[0] == "dpkg-query" and (
                word.startswith(("-f", "--showformat")) or argv[i - 1] in ("-f", "--showformat")
            ):
                continue  # `${Package}` is dpkg-query's own format syntax (always quoted)
            if word[:1] in ("*", "?", "[") or "$" in word or "`" in word:
                return _approval(
                    "unknown", "medium", f"`{word}` could expand to an option of `{argv[0]}`"
                )
        return policy(argv)

    return guarded


SYSTEM_POLICIES.update(
    {
        name: _no_late_options(policy)
        for name, policy in SYSTEM_POLICIES.items()
        if name not in FLAG_SENSITIVE and name not in SYSTEM_SPECS
    }
)

# Programs whose read-only use needs more than the default sandbox (see the
# module docstring); for helper A's `profiles.PROGRAM_PROFILES`.
NEEDS_NETWORK = frozenset(
    {"dig", "host", "nslookup", "ping", "ping6"}
)  # fmt: skip
NEEDS_HOST_NETNS = frozenset(
    {"ip", "ss", "netstat", "iptables", "ip6tables", "nft", "lsof", "ethtool"}
)
NEEDS_SYSTEM_BUS = frozenset(
    {"systemctl", "loginctl", "timedatectl", "hostnamectl", "localectl", "systemd-analyze"}
)
