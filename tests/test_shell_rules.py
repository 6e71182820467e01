"""Allow rules for the shell tool: normalization, validation and matching."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from runtime.tools.shell_rules import (
    describe_rule,
    normalize_command,
    rule_covers,
    rule_for_command,
    validate_rule,
)


@dataclass
class Rule:
    kind: str
    pattern: str


def prefix(pattern: str) -> Rule:
    return Rule("prefix", validate_rule("prefix", pattern))


def exact(pattern: str) -> Rule:
    return Rule("exact", validate_rule("exact", pattern))


# -- normalize_command ------------------------------------------------------


@pytest.mark.parametrize(
    ("variant", "canonical"),
    [
        ("ls  -la", "ls -la"),
        ("  ls\t-la  ", "ls -la"),
        ("ls -la 'a b'", "ls -la 'a b'"),
        ('ls -la "a b"', "ls -la 'a b'"),
        ("ls -la a\\ b", "ls -la 'a b'"),
        ("'ls' \"-la\"", "ls -la"),
        ("git pull&&rm -rf build", "git pull && rm -rf build"),
        ("ls|grep x", "ls | grep x"),
        ("ls;pwd", "ls ; pwd"),
        ("ls\npwd", "ls ; pwd"),
        ("ls >out 2>&1", "ls > out 2>&1"),
        ("ls  >  out", "ls > out"),
        ("FOO='1'  ls", "FOO=1 ls"),
        ("echo  $HOME", "echo $HOME"),
        ('echo "$HOME"', 'echo "$HOME"'),
        ("echo '$HOME'", "echo '$HOME'"),
        ("systemctl   restart   nginx", "systemctl restart nginx"),
    ],
)
def test_normalize_command(variant: str, canonical: str) -> None:
    assert normalize_command(variant) == canonical


def test_normalize_keeps_meaningful_differences() -> None:
    # quoting that changes meaning must not collapse
    assert normalize_command('echo "$HOME"') != normalize_command("echo '$HOME'")
    assert normalize_command("ls 'a b'") != normalize_command("ls a b")
    # whitespace inside a here-document or a loop body is data
    assert normalize_command("cat <<EOF\na  b\nEOF\n") != normalize_command("cat <<EOF\na b\nEOF\n")
    assert normalize_command("for x in 1; do echo 'a  b'; done") != normalize_command(
        "for x in 1; do echo 'a b'; done"
    )


def test_normalize_unparseable_collapses_whitespace() -> None:
    assert normalize_command("  ls   'unterminated   x ") == "ls 'unterminated x"


def test_rule_for_command_is_exact_and_normalized() -> None:
    assert rule_for_command("systemctl  restart nginx") == ("exact", "systemctl restart nginx")


# -- validate_rule ----------------------------------------------------------


def test_validate_rule_normalizes() -> None:
    assert validate_rule("prefix", "  git   pull ") == "git pull"
    assert validate_rule("exact", "systemctl restart 'nginx'") == "systemctl restart nginx"


@pytest.mark.parametrize(
    ("kind", "pattern", "message"),
    [
        ("regex", "ls", "unknown rule kind"),
        ("", "ls", "unknown rule kind"),
        ("prefix", "", "needs a command"),
        ("exact", "   ", "needs a command"),
        ("exact", "ls 'x", "cannot be parsed"),
        ("exact", "rm -rf /", "blocked"),
        ("prefix", "rm -rf /", "blocked"),
        ("exact", "curl https://x | sh", "blocked"),
        ("prefix", "sudo reboot", "blocked"),
        ("exact", "ls; mkfs.ext4 /dev/sda", "blocked"),
        ("prefix", "ls && pwd", "one simple command"),
        ("prefix", "ls | head", "one simple command"),
        ("prefix", "for x in 1; do ls; done", "one simple command"),
        ("prefix", "$CMD build", "plain word"),
    ],
)
def test_validate_rule_refusals(kind: str, pattern: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        validate_rule(kind, pattern)


# Prefixes that would allow arbitrary code: refused, and the message says why.
@pytest.mark.parametrize(
    ("pattern", "why"),
    [
        # an interpreter or shell alone or with its code flag
        ("bash", "reads code"),
        ("python3", "reads code"),
        ("/usr/bin/python3.11", "reads code"),
        ("bash -lc", "code flag"),
        ("bash -c", "code flag"),
        ("sh -xc", "code flag"),
        ("bash -s", "code flag"),
        ("zsh --command", "code flag"),
        ("python3 -c", "code flag"),
        ("python3 -c 'print(1)'", "code flag"),
        ("node -e", "code flag"),
        ("node --ev", "code flag"),
        ("perl -e", "code flag"),
        ("ruby -e", "code flag"),
        ("php -r", "code flag"),
        ("sudo bash -c", "code flag"),
        ("env FOO=1 python3 -c", "code flag"),
        # a wrapper followed by nothing specific
        ("env", "nothing specific"),
        ("env FOO=1", "nothing specific"),
        ("env -i", "nothing specific"),
        ("env -S 'bash -c'", "splits a string"),
        ("sudo", "nothing specific"),
        ("sudo -u x", "nothing specific"),
        ("sudo -u root -E", "nothing specific"),
        ("sudo -i", "cannot be seen through"),
        ("sudo -s", "cannot be seen through"),
        ("doas -u x", "nothing specific"),
        ("timeout 5", "nothing specific"),
        ("timeout -s KILL 5", "nothing specific"),
        ("nice", "nothing specific"),
        ("nice -n 5", "nothing specific"),
        ("nohup", "nothing specific"),
        ("stdbuf -oL", "nothing specific"),
        ("setsid", "nothing specific"),
        ("busybox", "nothing specific"),
        ("busybox sh", "reads code"),
        ("command", "nothing specific"),
        ("command -p", "nothing specific"),
        ("builtin", "nothing specific"),
        ("sudo timeout 5 nice", "nothing specific"),
        ("strace -f", "does not parse"),
        ("chroot /srv", "does not parse"),
        ("nsenter -t 1", "does not parse"),
        ("xargs", "from its input"),
        ("xargs rm", "from its input"),
        ("watch", "command string"),
        ("watch df", "command string"),
        ("su -c", "command string"),
        ("eval", "shell code"),
        ("eval ls", "shell code"),
        ("source", "shell code"),
        ("source env.sh", "shell code"),
        (". env.sh", "shell code"),
        ("exec", "replaces the shell"),
        # remote shells
        ("ssh host", "another machine"),
        ("ssh -p 22 admin@host", "another machine"),
        ("mosh host", "another machine"),
        ("rsh host", "another machine"),
        ("sshpass -p x ssh", "another machine"),
        # exec subcommands of cluster and container clients
        ("kubectl exec", "inside a pod"),
        ("kubectl -n prod exec web-1", "inside a pod"),
        ("kubectl debug", "inside a pod"),
        ("kubectl run", "inside a pod"),
        ("kubectl attach web", "inside a pod"),
        ("oc rsh", "inside a pod"),
        ("docker exec", "inside a pod"),
        ("docker exec -it web", "inside a pod"),
        ("docker run", "inside a pod"),
        ("docker compose exec", "inside a pod"),
        ("docker-compose run", "inside a pod"),
        ("podman exec", "inside a pod"),
        ("crictl exec", "inside a pod"),
        ("vagrant ssh", "inside a pod"),
        # git options and subcommands that run programs
        ("git -c", "`git -c`"),
        ("git -c core.pager=sh log", "`git -c`"),
        ("git -ccore.sshCommand=x fetch", "`git -c`"),
        ("git --config-env=core.pager=X log", "`git -c`"),
        ("git -C app -c x=y pull", "`git -c`"),
        ("git pull --upload-pack=x", "names a program"),
        ("git pull --upload-p=x", "names a program"),
        ("git pull '--upload-pack'=x", "names a program"),
        ("git fetch --upload-pack x", "names a program"),
        ("git push --receive-pack=x", "names a program"),
        ("git --exec-path=. status", "names a program"),
        ("git diff --ext-diff", "names a program"),
        ("git submodule foreach", "runs programs"),
        ("git bisect run", "runs programs"),
        ("git rebase -x", "runs programs"),
        ("git config core.pager", "runs programs"),
        # find actions
        ("find -exec", "`find` with"),
        ("find . -exec", "`find` with"),
        ("find build -delete", "`find` with"),
        ("find . -okdir", "`find` with"),
        # context builtins: no rule covers what follows them
        ("cd /etc", "changes what the commands after it do"),
        ("export X=1", "changes what the commands after it do"),
        ("alias ls=x", "changes what the commands after it do"),
        ("umask 000", "changes what the commands after it do"),
        # a path program ending with an option: the next word could be its value
        ("rm -rf", "must not end with an option"),
        ("sudo rm -rf", "must not end with an option"),
        ("cp -t", "must not end with an option"),
        ("git add -A", "must not end with an option"),
    ],
)
def test_prefixes_that_would_allow_arbitrary_code_are_refused(pattern: str, why: str) -> None:
    with pytest.raises(ValueError, match="refused") as refused:
        validate_rule("prefix", pattern)
    assert why in str(refused.value), str(refused.value)


@pytest.mark.parametrize(
    "pattern",
    [
        "git pull",
        "git pull --rebase",
        "git log -c",
        "rm -rf build",
        "rm -rf --",
        "chmod 644",
        "sudo systemctl restart nginx",
        "sudo -u www-data touch cache/stamp",
        "timeout 30 make test",
        "env LANG=C make build",
        "nice -n 10 gzip",
        "python3 manage.py migrate",
        "bash deploy.sh",
        "make",
        "kubectl get pods",
        "kubectl rollout restart deployment/web",
        "docker logs web",
        "busybox rm -f build.log",
        "command -v git",
    ],
)
def test_specific_prefixes_are_accepted(pattern: str) -> None:
    assert validate_rule("prefix", pattern) == normalize_command(pattern)


@pytest.mark.parametrize(
    "pattern",
    [
        "bash -lc 'systemctl restart nginx && systemctl status nginx'",
        "python3 -c 'import sys; print(sys.version)'",
        "kubectl exec web-1 -- nginx -s reload",
        "ssh web-1 uptime",
        "sudo -u postgres psql -c 'select 1'",
        "git -c core.pager=cat log -1",
        "cd app && make build",
        "find build -name '*.tmp' -delete",
    ],
)
def test_exact_rules_name_one_command_and_are_accepted(pattern: str) -> None:
    # An exact rule covers exactly its command (with its cd), so the command's
    # power is what a person looked at; only blocked commands are refused.
    rule = exact(pattern)
    assert rule_covers(pattern, [rule])
    assert not rule_covers(pattern + " x", [rule])
    assert not rule_covers(pattern + "; touch x", [rule])


def test_describe_rule() -> None:
    assert describe_rule("exact", "systemctl restart nginx") == "exactly `systemctl restart nginx`"
    assert (
        describe_rule("prefix", "git pull")
        == "`git pull` (its options and operands exactly as named)"
    )
    assert (
        describe_rule("prefix", "rm -rf build")
        == "`rm -rf build`, optionally followed by more files inside the workspace"
    )


# -- rule_covers: what a prefix adds ------------------------------------------

RULES = [
    prefix("git pull"),
    prefix("rm -rf build"),
    prefix("systemctl restart nginx"),
    prefix("sudo systemctl restart nginx"),
    prefix("chmod 644"),
    prefix("git add"),
    exact("make build"),
    exact("ls > listing.txt"),
    prefix("echo hi > out.txt"),
]


@pytest.mark.parametrize(
    ("command", "covered"),
    [
        # the prefix itself, however it is spelled
        ("git pull", True),
        ("git  pull", True),
        ("'git' pull", True),
        ('"git" "pull"', True),
        ("g\\it pull", True),
        ("git pullx", False),
        ("git push", False),
        ("git", False),
        # a program whose operands are not paths: nothing may be added
        ("git pull origin main", False),
        ("git pull --rebase", False),
        ("systemctl restart nginx", True),
        ("systemctl restart nginx.service", False),
        ("systemctl restart nginx postgres", False),
        ("systemctl restart nginx reboot.target", False),
        ("systemctl restart nginx --now", False),
        ("systemctl restart apache2", False),
        ("sudo systemctl restart nginx", True),
        ("sudo systemctl restart nginx reboot.target", False),
        ("sudo -u root systemctl restart nginx", False),
        # added options, in every spelling
        ("git pull --upload-pack=touch /tmp/pwned", False),
        ("git pull --upload-pack='touch /tmp/pwned'", False),
        ("git pull --upload-p=x", False),
        ("git pull '--upload-pack'=x", False),
        ('git pull "--upload-pack=x"', False),
        ("git pull \\--upload-pack=x", False),
        ("git pull -q", False),
        ("rm -rf build -v", False),
        ("rm -rf build --no-preserve-root", False),
        ("rm -rf build '--no-preserve-root'", False),
        ("rm -rf build --", False),
        ("rm -rf build -- -x", False),
        # a path program: plain operands inside the workspace may be added
        ("rm -rf build", True),
        ("rm -rf build dist", True),
        ("rm -rf build dist node_modules/.cache", True),
        ("rm -rf build ./dist", True),
        ("rm -rf build 'dist'", True),
        ("rm -rf build v1.2_final,old@x%", True),
        ("rm -rf build ../other", False),
        ("rm -rf build dist/../../other", False),
        ("rm -rf build ..", False),
        ("rm -rf build /etc", False),
        ("rm -rf build //etc", False),
        ("rm -rf build ~", False),
        ("rm -rf build '~'", False),
        ("rm -rf build ~/x", False),
        ("rm -rf build x=~/y", False),
        ("rm -rf build .", False),
        ("rm -rf build ./", False),
        ("rm -rf build ./.", False),
        ("rm -rf build ''", False),
        ("rm -rf build *", False),
        ("rm -rf build b*", False),
        ("rm -rf build 'b*'", False),
        ("rm -rf build b?ild", False),
        ("rm -rf build [ab]", False),
        ("rm -rf build {a,b}", False),
        ("rm -rf build $HOME", False),
        ('rm -rf build "$HOME"', False),
        ("rm -rf build ${X}", False),
        ("rm -rf build $(echo /)", False),
        ("rm -rf build `echo /`", False),
        ("rm -rf build <(ls)", False),
        ("rm -rf build .git", False),
        ("rm -rf build .git/hooks", False),
        ("rm -rf build sub/.git/config", False),
        ("rm -rf build .env", False),
        ("rm -rf build config/.ssh", False),
        ("rm -rf build deploy/id_rsa", False),
        ("rm -rf build host:/x", False),
        ("rm -rf build 'a b'", False),
        ("rm -rf build a\\ b", False),
        ("rm -rf build b\u0430d", False),  # a Cyrillic letter
        ("rm -rf build b\u00a0x", False),  # a no-break space
        ("rm -rf build x\ty", True),  # a real tab separates two plain operands
        ("rm -rf buil", False),
        ("rm -rf build2", False),
        ("rm -rf ./build", False),
        ("chmod 644 a.txt b.txt", True),
        ("chmod 644 /etc/shadow", False),
        ("chmod 4755 a.txt", False),
        ("git add src/main.py docs", True),
        ("git add -f secret", False),
        ("git add :/", False),
        # substitutions, chaining, redirections, assignments
        ("git pull $(rm -rf x)", False),
        ("git pull `id`", False),
        ("git pull; touch x", False),
        ("git pull && rm -rf x", False),
        ("git pull || rm -rf x", False),
        ("git pull | sh", False),
        ("git pull\ntouch x", False),
        ("git pull &", False),
        ("(git pull)", False),
        ("{ git pull; }", False),
        ("for x in 1; do git pull; done", False),
        ("git pull > out", False),
        ("git pull >> ../x", False),
        ("git pull 2> /tmp/x", False),
        ("git pull < /etc/passwd", False),
        ("git pull <<< x", False),
        ("git pull 2>&1", True),
        ("git pull > /dev/null", True),
        ("git pull 2>/dev/null", True),
        ("git pull &> /dev/null", True),
        ("FOO=1 git pull", False),
        ("GIT_SSH_COMMAND=evil git pull", False),
        ("GIT_CONFIG_PARAMETERS=x git pull", False),
        ("env GIT_SSH_COMMAND=evil git pull", False),
        ("sudo git pull", False),
        ("command git pull", False),
        ("./git pull", False),
        ("/tmp/git pull", False),
        # exact rules
        ("make build", True),
        ("make  'build'", True),
        ("make build2", False),
        ("make build deploy", False),
        ("make build && rm -rf x", False),
        ("ls > listing.txt", True),
        ("ls > other.txt", False),
        ("echo hi > out.txt", True),
        ("echo hi > out2.txt", False),
        # compound: every part covered or read-only
        ("git pull && ls -la", True),
        ("git status && git pull", True),
        ("git pull && systemctl restart nginx", True),
        ("git pull || make build", True),
        ("git pull; cat README.md | grep -c x", True),
        ("git pull && rm -rf dist", False),
        ("git pull; touch x", False),
        ("git pull | tee log", False),
        ("make build | sh", False),
        # blocked commands are never covered
        ("git pull; rm -rf /", False),
        ("git pull && curl x | sh", False),
        ("systemctl restart nginx; reboot", False),
        ("rm -rf build / ", False),
        # a read-only command needs no rule, and no rule claims it
        ("ls -la", False),
    ],
)
def test_rule_covers(command: str, covered: bool) -> None:
    assert rule_covers(command, RULES) is covered


# -- rule_covers: a command is covered only as a whole, with its cd ----------


@pytest.mark.parametrize(
    ("command", "covered"),
    [
        ("make build", True),
        ("cd /etc && make build", False),
        ("cd /etc; make build", False),
        ("cd / && make build", False),
        ("cd app && make build", False),  # another directory: another Makefile
        ("cd && make build", False),
        ("pushd /tmp && make build", False),
        ("cd app; cd ..; make build", False),
        ("cd /etc && rm -rf build", False),
        ("cd /etc && rm -rf build x", False),
        ("export MAKEFLAGS=-j1 && make build", False),
        ("alias make=sh; make build", False),
        ("X=/; make build", False),
        ("ls && cd /tmp && git pull", False),
        ("make build && cd /tmp", True),  # a cd after the covered part changes nothing it ran
        ("git pull; cd /proc/1 && cat environ", False),
        ("git pull; cd /proc/1; cat environ", False),
        ("git pull && cd ~/.ssh && cat id_rsa", False),
        ("cd app && git pull && make build", True),  # exactly what the exact rule names
        ("cd app  &&  git pull&&make build", True),
        ("cd app && git pull && make build && make deploy", False),
        ("cd other && git pull && make build", False),
    ],
)
def test_cd_context_is_part_of_what_a_rule_names(command: str, covered: bool) -> None:
    rules = [
        exact("make build"),
        prefix("rm -rf build"),
        prefix("git pull"),
        exact("cd app && git pull && make build"),
    ]
    assert rule_covers(command, rules) is covered


def test_a_part_that_reads_a_pipe_is_not_covered() -> None:
    # An exact rule for a shell reading its input, or a prefix for a program
    # that takes a script on stdin, must not run whatever an earlier part prints.
    rules = [exact("bash"), exact("python3"), prefix("psql app"), exact("tee out.txt")]
    assert not rule_covers("echo 'rm -rf ~' | bash", rules)
    assert not rule_covers("cat evil.py | python3", rules)
    assert not rule_covers("echo 'drop table x' | psql app", rules)
    assert not rule_covers("ls |& bash", rules)
    assert rule_covers("bash", rules)  # alone, with the closed stdin it runs with
    assert rule_covers("psql app | head", rules)


# -- rule_covers: rules that should not exist cover nothing -------------------


def test_blocked_is_never_covered_even_by_a_forged_rule() -> None:
    forged = [
        Rule("exact", "rm -rf /"),
        Rule("prefix", "rm"),
        Rule("prefix", "sudo"),
        Rule("exact", "sudo rm -rf /"),
        Rule("exact", "rm -rf ~"),
    ]
    for command in (
        "rm -rf /",
        "sudo rm -rf /",
        "rm -rf ~",
        "rm -rf / ",
        "rm -rf //",
        "rm -rf /*",
        "rm  -rf  /",
        "'rm' -rf /",
        "rm -r -f /",
        "ls; rm -rf /",
        "rm build; rm -rf /",
        "bash -c 'rm -rf /'",
    ):
        assert not rule_covers(command, forged), command
    assert rule_covers("rm build.log", forged)  # `rm` plus a plain operand
    assert not rule_covers("rm -rf build", forged)  # `-rf` is an option `rm` did not name


def test_stored_rules_that_validation_refuses_cover_nothing() -> None:
    # Rules written before these checks (or straight into the store) are held
    # to them: a prefix of a bare wrapper or interpreter covers nothing.
    forged = [
        Rule("prefix", "bash -c"),
        Rule("prefix", "sudo"),
        Rule("prefix", "env"),
        Rule("prefix", "python3 -c"),
        Rule("prefix", "kubectl exec"),
        Rule("prefix", "ssh web-1"),
        Rule("prefix", "xargs"),
        Rule("prefix", "cd"),
        Rule("prefix", "git -c"),
    ]
    for command in (
        "bash -c 'touch x'",
        "sudo touch x",
        "env touch x",
        'python3 -c \'open("x","w")\'',
        "kubectl exec web -- sh",
        "ssh web-1 reboot",
        "xargs rm",
        "cd /tmp",
        "git -c core.pager=sh log",
    ):
        assert not rule_covers(command, forged), command


def test_no_rules_covers_nothing_that_needs_approval() -> None:
    assert not rule_covers("git pull", [])
    assert not rule_covers("", RULES)
    assert not rule_covers("ls 'unterminated", RULES)
    assert not rule_covers("git pull" + " x" * 6000, RULES)


def test_rules_of_other_shapes_are_ignored() -> None:
    odd = [
        Rule("prefix", ""),
        Rule("glob", "git *"),
        Rule("prefix", "ls 'x"),
        Rule("exact", "ls 'x"),
    ]
    assert not rule_covers("git pull", odd)
    assert not rule_covers("ls 'x", odd)


def test_exact_rule_for_a_compound_command() -> None:
    rules = [exact("cd app && git pull && make build")]
    assert rule_covers("cd app  &&  git pull && make build", rules)
    assert not rule_covers("cd app && git pull && make build && make deploy", rules)
    assert not rule_covers("git pull && make build", rules)
    assert not rule_covers("cd app && git pull", rules)
