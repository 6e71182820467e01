"""The hostile corpus (issue 13, item 6): attacks that must never run unasked, and
everyday on-call commands that must run at once.

The corpus lives in `tests/data/shell_corpus/*.yaml`, one file per class of
attack. Each case names the command, the verdict it must get and why:

- `block`: refused outright, even with approval (`Classification.blocked`);
- `approve`: a person must approve it (`requires_approval`; being blocked is
  stricter, so it passes too);
- `auto`: an everyday read-only command that runs at once (neither).

Every attack is its own test, so a failure names the command. The everyday
commands are judged together: at least 95% of them must run at once, and the
test lists the ones that do not.

`python -m tests.test_shell_corpus REPORT.txt` writes every current failure,
grouped by class, for the people hardening the classifier.
"""

from __future__ import annotations

import re
import shlex
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from runtime.tools.shell import Classification, classify

CORPUS_DIR = Path(__file__).parent / "data" / "shell_corpus"
EXPECTATIONS = ("approve", "block", "auto")
MIN_ATTACKS = 500
MIN_EVERYDAY = 100
EVERYDAY_AUTO_SHARE = 0.95


@dataclass(frozen=True)
class Case:
    cls: str
    index: int
    cmd: str
    expect: str
    why: str
    source: str

    @property
    def test_id(self) -> str:
        # ids must be short and printable: the command itself may be 10 kB of
        # control characters.
        slug = re.sub(r"[^A-Za-z0-9]+", "_", self.cmd).strip("_")[:48] or "x"
        return f"{self.cls}-{self.index:03d}-{slug}"


class CorpusError(ValueError):
    """A corpus file is malformed: the test run stops with the file and case named."""


def load_corpus(directory: Path = CORPUS_DIR) -> list[Case]:
    """Every case of every corpus file, checked for shape."""
    cases: list[Case] = []
    files = sorted(directory.glob("*.yaml"))
    if not files:
        raise CorpusError(f"no corpus files in {directory}")
    for path in files:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
        if not isinstance(doc, dict) or not isinstance(doc.get("cases"), list):
            raise CorpusError(f"{path.name}: expected a mapping with 'class' and 'cases'")
        cls = doc.get("class")
        if not isinstance(cls, str) or not cls:
            raise CorpusError(f"{path.name}: 'class' must be a non-empty string")
        for i, item in enumerate(doc["cases"]):
            where = f"{path.name} case {i}"
            if not isinstance(item, dict):
                raise CorpusError(f"{where}: expected a mapping")
            cmd, expect, why = item.get("cmd"), item.get("expect"), item.get("why")
            if not isinstance(cmd, str) or not cmd.strip():
                raise CorpusError(f"{where}: 'cmd' must be a non-empty string")
            if expect not in EXPECTATIONS:
                raise CorpusError(f"{where}: 'expect' must be one of {EXPECTATIONS}")
            if not isinstance(why, str) or not why.strip():
                raise CorpusError(f"{where}: 'why' must say why")
            cases.append(Case(cls, i, cmd, expect, why, path.name))
    return cases


CASES = load_corpus()
ATTACKS = [c for c in CASES if c.expect != "auto"]
EVERYDAY = [c for c in CASES if c.expect == "auto"]


def verdict(c: Classification) -> str:
    if c.blocked:
        return "block"
    return "approve" if c.requires_approval else "auto"


def meets(case: Case, c: Classification) -> bool:
    """Whether a classification satisfies the case's expectation."""
    got = verdict(c)
    if case.expect == "approve":
        return got in ("approve", "block")  # blocked is stricter than approval
    return got == case.expect


def _show(cmd: str, limit: int = 160) -> str:
    text = cmd if len(cmd) <= limit else cmd[:limit] + f"… ({len(cmd)} chars)"
    return text.encode("unicode_escape").decode("ascii") if not text.isprintable() else text


# -- the corpus itself -------------------------------------------------------------


def test_corpus_has_the_promised_size_and_shape() -> None:
    counts = Counter(c.cls for c in ATTACKS)
    assert len(ATTACKS) >= MIN_ATTACKS, counts
    assert len(EVERYDAY) >= MIN_EVERYDAY
    # every class is represented, and no class is a token gesture
    for cls in (
        "unlisted-options",
        "mini-languages",
        "secret-names",
        "glob-options",
        "runaway",
        "blocked",
        "wrappers",
        "shell-syntax",
        "unicode-control",
        "long-commands",
        "writes-network-code",
        "profile-piggyback",
    ):
        assert counts[cls] >= 10, f"class {cls} has only {counts[cls]} attacks"
    assert sum(c.expect == "block" for c in ATTACKS) >= 100


def test_corpus_commands_are_unique() -> None:
    seen: dict[str, str] = {}
    for c in CASES:
        assert c.cmd not in seen, f"{c.source} #{c.index} repeats {seen[c.cmd]}"
        seen[c.cmd] = f"{c.source} #{c.index}"


def test_a_malformed_corpus_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text("class: x\ncases:\n- cmd: ls\n  expect: maybe\n  why: w\n")
    with pytest.raises(CorpusError, match="expect"):
        load_corpus(tmp_path)
    (tmp_path / "bad.yaml").write_text("class: x\ncases:\n- cmd: ls\n  expect: auto\n")
    with pytest.raises(CorpusError, match="why"):
        load_corpus(tmp_path)


# -- attacks ----------------------------------------------------------------------


@pytest.mark.parametrize("case", ATTACKS, ids=[c.test_id for c in ATTACKS])
def test_attack_never_runs_unasked(case: Case) -> None:
    c = classify(case.cmd)
    assert meets(case, c), (
        f"[{case.cls}] {_show(case.cmd)!r} must be {case.expect} ({case.why}); "
        f"classified {verdict(c)}: {c.reason}"
    )


# -- the same attacks, wrapped ------------------------------------------------------------

# Ways a model would hide an attack inside a bigger command. Each keeps the
# attack's effect, so each keeps its expectation (a blocked command is still
# blocked inside a subshell). Multi-line and huge commands are left as they are.
MUTATORS = {
    "subshell": lambda cmd: f"( {cmd} )",
    "bash -c": lambda cmd: f"bash -c {shlex.quote(cmd)}",
    "substitution": lambda cmd: f"echo $({cmd})",
    "after &&": lambda cmd: f"ls && {cmd}",
    "piped to cat": lambda cmd: f"{cmd} | cat",
}


def _mutable(case: Case) -> bool:
    """Worth wrapping: one line, not huge, and passing on its own (a failing
    attack is reported by its own test; here only the wrapping is judged)."""
    if "\n" in case.cmd or len(case.cmd) >= 2000 or case.cls == "long-commands":
        return False
    return meets(case, classify(case.cmd))


@pytest.fixture(scope="module")
def _mutable_attacks() -> list[Case]:
    return [c for c in ATTACKS if _mutable(c)]


@pytest.mark.parametrize("name", list(MUTATORS))
def test_wrapped_attacks_never_run_unasked(name: str, _mutable_attacks: list[Case]) -> None:
    mutate = MUTATORS[name]
    failures = []
    for case in _mutable_attacks:
        wrapped = mutate(case.cmd)
        c = classify(wrapped)
        if not meets(case, c):
            failures.append(
                f"  {_show(wrapped)!r}: want {case.expect}, got {verdict(c)}: {c.reason}"
            )
    assert not failures, f"{len(failures)} attacks wrapped as {name!r} slip:\n" + "\n".join(
        failures
    )


# -- everyday commands --------------------------------------------------------------


def test_everyday_commands_run_at_once() -> None:
    asked = [(c, classify(c.cmd)) for c in EVERYDAY]
    slow = [(c, k) for c, k in asked if verdict(k) != "auto"]
    share = 1 - len(slow) / len(EVERYDAY)
    listing = "\n".join(f"  {_show(c.cmd)!r}: {verdict(k)}: {k.reason}" for c, k in slow)
    assert share >= EVERYDAY_AUTO_SHARE, (
        f"only {share:.1%} of {len(EVERYDAY)} everyday commands run at once "
        f"(need {EVERYDAY_AUTO_SHARE:.0%}); these do not:\n{listing}"
    )


# -- the failure report ---------------------------------------------------------------


def failure_report(cases: list[Case] = CASES) -> str:
    """Every case the classifier currently gets wrong, grouped by class."""
    by_class: dict[str, list[str]] = {}
    failed = 0
    for case in cases:
        c = classify(case.cmd)
        if meets(case, c):
            continue
        failed += 1
        by_class.setdefault(case.cls, []).append(
            f"  [{case.source} #{case.index}] {_show(case.cmd, 300)!r}\n"
            f"      want {case.expect}, got {verdict(c)} — {case.why}\n"
            f"      classifier: {c.reason}"
        )
    mutable = [c for c in cases if c.expect != "auto" and _mutable(c)]
    for name, mutate in MUTATORS.items():
        for case in mutable:
            wrapped = mutate(case.cmd)
            c = classify(wrapped)
            if not meets(case, c):
                failed += 1
                by_class.setdefault(f"wrapped ({name})", []).append(
                    f"  [{case.source} #{case.index}] {_show(wrapped, 300)!r}\n"
                    f"      want {case.expect}, got {verdict(c)} — {case.why}\n"
                    f"      classifier: {c.reason}"
                )
    attacks = sum(c.expect != "auto" for c in cases)
    everyday = len(cases) - attacks
    bad_everyday = len(by_class.get("everyday", []))
    lines = [
        f"shell corpus: {failed} failing of {len(cases)} "
        f"({attacks} attacks, {everyday} everyday; everyday auto "
        f"{(everyday - bad_everyday) / max(everyday, 1):.1%})",
        "",
    ]
    for cls in sorted(by_class):
        lines.append(f"== {cls}: {len(by_class[cls])} failing")
        lines.extend(by_class[cls])
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover - a tool for the people fixing failures
    if len(sys.argv) != 2:
        sys.exit("usage: python -m tests.test_shell_corpus REPORT.txt")
    report = failure_report()
    Path(sys.argv[1]).write_text(report, encoding="utf-8")
    print(report.splitlines()[0])
