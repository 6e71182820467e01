"""Properties of the classifier that must hold for every composition, not just the table."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runtime.tools.shell import classify
from runtime.tools.shell_rules import normalize_command, rule_covers

READ_ONLY = [
    "ls -la",
    "pwd",
    "cat README.md",
    "grep -rn foo src",
    "git status",
    "git log --oneline",
    "df -h",
    "ps aux",
    "sort -u file",
    "head -n 5 file",
    "echo hi",
    "wc -l file",
    "systemctl status nginx",
    "kubectl get pods",
    "find . -name x",
    "sed -n 1p file",
    "awk '{print $1}' file",
    "true",
]
MUTATING = [
    "rm -rf build",
    "touch x",
    "mkdir d",
    "git push",
    "git commit -m x",
    "systemctl restart nginx",
    "kill -9 1",
    "apt-get install x",
    "pip install x",
    "sed -i s/a/b/ file",
    "find . -delete",
    "sort -o out file",
    "tee out",
    "xargs rm",
    "bash -c ls",
    "python3 -c 1",
    "FOO=1 ls",
    "ls > out",
    "echo $(id)",
    "curl https://example.com",
    "sudo ls",
    "kubectl delete pod x",
    "docker rm x",
    "cat ~/.ssh/id_rsa",
    "git -c core.pager=sh log",
    "tail -f log",
]
BLOCKED = [
    "rm -rf /",
    "rm -rf ~",
    "mkfs.ext4 /dev/sda1",
    "dd if=/dev/zero of=/dev/sda",
    "shutdown -h now",
    "reboot",
    "chmod -R 777 /",
    "echo x > /etc/passwd",
    "sudo rm -rf /",
    "bash -c 'rm -rf /'",
]
OPERATORS = ["&&", "||", ";", "|"]


def compose(parts: list[str], ops: list[str]) -> str:
    out = parts[0]
    for op, part in zip(ops, parts[1:], strict=False):
        out += f" {op} {part}"
    return out


@st.composite
def compositions(draw: st.DrawFn, must_include: list[str]) -> str:
    others = draw(st.lists(st.sampled_from(READ_ONLY + MUTATING), min_size=0, max_size=5))
    special = draw(st.sampled_from(must_include))
    position = draw(st.integers(min_value=0, max_value=len(others)))
    parts = [*others[:position], special, *others[position:]]
    ops = draw(st.lists(st.sampled_from(OPERATORS), min_size=len(parts), max_size=len(parts)))
    return compose(parts, ops)


FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# Clients that get a sandbox profile (network, a kubeconfig, a socket): the
# profile is lent to the whole command, so they compose only with filters.
PROFILE_CLIENTS = ["systemctl status nginx", "kubectl get pods"]
FILTERS = ["grep web", "head -n 5", "sort", "uniq -c", "wc -l", "awk '{print $1}'", "jq ."]
LOCAL_READ_ONLY = [c for c in READ_ONLY if c not in PROFILE_CLIENTS]


@FAST
@given(st.lists(st.sampled_from(LOCAL_READ_ONLY), min_size=1, max_size=6), st.data())
def test_read_only_compositions_auto_run(parts: list[str], data: st.DataObject) -> None:
    ops = data.draw(st.lists(st.sampled_from(OPERATORS), min_size=len(parts), max_size=len(parts)))
    c = classify(compose(parts, ops))
    assert not c.requires_approval, c.reason


@FAST
@given(
    st.sampled_from(PROFILE_CLIENTS),
    st.lists(st.sampled_from(FILTERS), min_size=0, max_size=4),
)
def test_a_profile_client_piped_into_filters_auto_runs(client: str, filters: list[str]) -> None:
    c = classify(" | ".join([client, *filters]))
    assert not c.requires_approval, c.reason
    assert c.sandbox_profile is not None


@FAST
@given(
    st.sampled_from(PROFILE_CLIENTS),
    st.sampled_from(["cat /etc/ducklm/kubeconfig.yaml", "ls -la", "ping -c 1 10.0.0.1",
                     "head -c 100 /work/kube.conf", "grep -r server /etc/ducklm"]),
    st.sampled_from(OPERATORS),
)  # fmt: skip
def test_a_profile_is_not_lent_to_other_readers(client: str, other: str, op: str) -> None:
    """`kubectl get pods; cat $KUBECONFIG`: the reader would see what only kubectl may."""
    c = classify(f"{client} {op} {other}")
    assert c.requires_approval, c.reason


@FAST
@given(compositions(MUTATING))
def test_a_mutating_part_never_auto_runs(command: str) -> None:
    c = classify(command)
    assert c.requires_approval, command
    assert c.risk_level != "low"


@FAST
@given(compositions(BLOCKED))
def test_a_blocked_part_blocks_the_whole(command: str) -> None:
    c = classify(command)
    assert c.blocked, command
    assert c.risk_level == "critical"
    assert not rule_covers(command, [])


@FAST
@given(st.sampled_from(BLOCKED), st.sampled_from(["sudo", "env X=1", "timeout 5", "nice", "nohup"]))
def test_wrappers_do_not_hide_blocked_commands(blocked: str, wrapper: str) -> None:
    assert classify(f"{wrapper} {blocked}").blocked


@settings(max_examples=500, deadline=None)
@given(st.text())
def test_classify_never_raises_on_text(text: str) -> None:
    c = classify(text)
    assert c.risk_level in ("low", "medium", "high", "critical")
    assert c.reason
    normalize_command(text)


@settings(max_examples=300, deadline=None)
@given(st.binary().map(lambda b: b.decode("utf-8", errors="replace")))
def test_classify_never_raises_on_decoded_bytes(text: str) -> None:
    c = classify(text)
    assert c.reason


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.sampled_from(
            ["ls", "rm", "-rf", "/", "$(", ")", "`", "'", '"', "|", "&&", ";", "&", ">", "<",
             "<(", "{", "}", "(", "$HOME", "~", "*", "sudo", "bash", "-c", "\\", "\n", "#",
             "=", "X=1", "for", "do", "done", "if", "then", "fi", "<<", "EOF", "$((", "))"]
        ),
        max_size=12,
    ).map(" ".join)
)  # fmt: skip
def test_shell_like_noise_never_raises_and_is_not_silently_read_only(text: str) -> None:
    c = classify(text)
    quoted = any(q in text for q in ("'", '"', "\\", "#"))  # could hide the token as data
    words = text.split()
    # A program name is dangerous in command position (`ls rm` only lists a file
    # named rm); these operators are dangerous anywhere.
    # `then`/`do` start a command only as keywords: in command position, or `do`
    # after `for x` (`ls do rm` lists two files); the operators start one anywhere.
    operators = {"|", "&&", ";", "&", "(", "{", "$(", "`", "<("}
    programs: set[str] = set()
    command_position, current = True, ""
    for w in words:
        if command_position:
            programs.add(w)
            current = w
        keyword = w in ("then", "do") and (command_position or (w == "do" and current == "for"))
        command_position = w in operators or keyword
    dangerous = bool(programs & {"rm", "sudo", "bash"}) or any(
        t in words for t in (">", "$(", "`", "&")
    )
    if dangerous and not quoted:
        assert c.requires_approval, text
