"""The per-channel policy file (DUCKLM_POLICY_FILE, issue #20): load and validate.

One TOML or YAML file with a `default` section and one section per channel or
room, each setting the workspace, approvers, admins, schedulers, four-eyes risk
and the tools that may be used there (docs/policy.md). Validation is pydantic
with unknown keys forbidden, and every error names its line and key:

    policy.toml:12: channels."slack:C1".approvers[0]: not a user id: 'bob' (…)

tomllib gives lines only for syntax errors, so the lines of keys are found by a
small scan of the text (`_toml_lines`); YAML nodes carry their marks. Nothing
here knows the environment: bot/policy.py lays the sections over the
DUCKLM_* settings. Imports stay light (no shell parser): `ducklm policy check`
should answer as fast as Python starts.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, ValidationError

# The built-in tools (runtime/tools: shell, files), by name; a test checks this
# list against ToolGateway.default so it cannot drift. MCP tools are named
# `mcp__<server>__<tool>` (runtime/tools/mcp/tool.py); `mcp__<server>__*`
# allows all of one server's tools.
BUILTIN_TOOLS = ("shell_exec_safe", "read_file", "list_dir")
_MCP_TOOL = re.compile(r"mcp__[A-Za-z0-9_-]+__(\*|[A-Za-z0-9_-]+)")

# As runtime/settings.py checks DUCKLM_APPROVERS and friends: platform-qualified ids.
_USER = re.compile(r"slack:[UW][A-Z0-9]+|matrix:@[^\s:]+:[^\s:]+(:\d+)?")
_TEAM = re.compile(r"[TE][A-Z0-9]+")
# `slack:C…` (or `slack:T…/C…`: that channel in that workspace) or `matrix:!room…`.
_SECTION = re.compile(r"slack:(?:(?P<team>[TE][A-Z0-9]+)/)?(?P<slack>[CGD][A-Z0-9]+)|matrix:!\S+")

RISKS = ("low", "medium", "high", "critical", "off")
# The most approvers a quorum may ask for (more is a typo, not a policy).
MAX_QUORUM = 10


def _user(value: str) -> str:
    value = value.strip()
    if not _USER.fullmatch(value):
        raise ValueError(
            f"not a user id: {value!r} (use slack:U… or matrix:@user:server, as in "
            "DUCKLM_APPROVERS)"
        )
    return value


def _tool(value: str) -> str:
    value = value.strip()
    if value not in BUILTIN_TOOLS and not _MCP_TOOL.fullmatch(value):
        raise ValueError(
            f"no tool is called {value!r} (built-in tools: {', '.join(BUILTIN_TOOLS)}; "
            "MCP tools: mcp__<server>__<tool> or mcp__<server>__*)"
        )
    return value


def _team(value: str) -> str:
    value = value.strip()
    if not _TEAM.fullmatch(value):
        raise ValueError(f"not a Slack workspace id: {value!r} (use T… or E… for a grid)")
    return value


def _yaml_off(value: object) -> object:
    # YAML 1.1 reads a bare `off` as false: that is what it means here.
    return "off" if value is False else value


def _risk(value: str) -> str:
    value = value.strip().lower()
    if value not in RISKS:
        raise ValueError(f"must be one of {', '.join(RISKS)}")
    return value


def _quorum_risk(value: str) -> str:
    value = value.strip().lower()
    if value not in RISKS[:-1]:
        raise ValueError(f"not a risk level: {value!r} (use {', '.join(RISKS[:-1])})")
    return value


def _quorum_count(value: int) -> int:
    if not 1 <= value <= MAX_QUORUM:
        raise ValueError(f"a quorum counts 1 to {MAX_QUORUM} approvers, not {value}")
    return value


def _escalate_after(value: object) -> object:
    """`30m`, `2h`, a number of seconds, or `off` (no escalation in this section)."""
    if value is False:  # YAML 1.1 reads a bare `off` as false
        return "off"
    if isinstance(value, int | float) and not isinstance(value, bool):
        if value <= 0:
            raise ValueError("must be above 0 seconds (or `off`)")
        return float(value)
    if isinstance(value, str):
        if value.strip().lower() in ("off", "none"):
            return "off"
        from runtime.settings import parse_duration

        return parse_duration(value)
    raise ValueError(f"must be a duration such as 30m or 2h, or off, not {_shown(value)}")


def _section_key(value: str) -> str:
    if not _SECTION.fullmatch(value):
        raise ValueError(
            f"not a channel: {value!r} (use slack:C… (a channel id), slack:T…/C… (that "
            "channel in one workspace) or matrix:!room:server (a room id, not an alias))"
        )
    return value


User = Annotated[str, AfterValidator(_user)]
ToolName = Annotated[str, AfterValidator(_tool)]
Risk = Annotated[str, BeforeValidator(_yaml_off), AfterValidator(_risk)]
Team = Annotated[str, AfterValidator(_team)]
SectionKey = Annotated[str, AfterValidator(_section_key)]
QuorumRisk = Annotated[str, AfterValidator(_quorum_risk)]
QuorumCount = Annotated[int, AfterValidator(_quorum_count)]
EscalateAfter = Annotated[float | Literal["off"], BeforeValidator(_escalate_after)]


class Section(BaseModel):
    """What one section sets; a key left out keeps what the level above says
    (the environment for `default`, `default` for a channel). Lists replace."""

    model_config = ConfigDict(extra="forbid", strict=True)

    workspace: str | None = None
    approvers: list[User] | None = None
    admins: list[User] | None = None
    schedulers: list[User] | None = None
    four_eyes_risk: Risk | None = None
    tools: list[ToolName] | None = None
    # Issue #20, part 2: distinct approvers per risk level (`{ high = 2 }`), and
    # who is called in (`escalate_to`) when an approval waits `escalate_after`.
    quorum: dict[QuorumRisk, QuorumCount] | None = None
    escalate_after: EscalateAfter | None = None
    escalate_to: list[User] | None = None


class ChannelSection(Section):
    # The Slack workspace the channel belongs to: the section applies only when
    # the bot is installed there (a shared channel keeps its id in every org).
    team: Team | None = None


class PolicyDocument(BaseModel):
    """The file's top level (parse_policy validates its sections one by one)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    default: Section = Section()
    channels: dict[SectionKey, ChannelSection] = {}


@dataclass(frozen=True)
class ChannelRule:
    """One channel section, resolved: where it applies and what it sets."""

    name: str  # the section's key as written, e.g. `slack:C123`
    platform: str
    channel: str
    team: str | None  # Slack only: the installing workspace it applies in
    section: Section
    workspace: Path | None  # absolute; None when the section leaves it to default


@dataclass(frozen=True)
class PolicyFile:
    path: Path
    default: Section
    default_workspace: Path | None
    channels: tuple[ChannelRule, ...] = field(default_factory=tuple)

    def summary(self) -> list[str]:
        """What `ducklm policy check` prints for a valid file."""
        lines = [f"{self.path}: valid, {len(self.channels)} channel section(s)"]
        keys = [k for k in Section.model_fields if getattr(self.default, k) is not None]
        lines.append(
            f"  default: sets {', '.join(keys) or 'nothing'} (the rest: DUCKLM_* settings)"
        )
        for rule in self.channels:
            where = f" (workspace {rule.team})" if rule.team else ""
            keys = [k for k in Section.model_fields if getattr(rule.section, k) is not None]
            lines.append(f"  {rule.name}{where}: sets {', '.join(keys) or 'nothing'}")
        return lines


class PolicyFileError(Exception):
    """Every problem of a policy file, one line each, `file:line: key: message`."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


# -- locating keys in the text --------------------------------------------------

Loc = tuple[str | int, ...]

_BARE = re.compile(r"[A-Za-z0-9_-]+")


def _toml_keys(text: str, at: int) -> tuple[list[str], int]:
    """Parse a dotted TOML key starting at `at`: its parts and where it ends."""
    parts: list[str] = []
    i = at
    while True:
        while i < len(text) and text[i] in " \t":
            i += 1
        if i < len(text) and text[i] == '"':
            j, out = i + 1, []
            while j < len(text) and text[j] != '"':
                if text[j] == "\\" and j + 1 < len(text):
                    j += 1
                out.append(text[j])
                j += 1
            parts.append("".join(out))
            i = j + 1
        elif i < len(text) and text[i] == "'":
            j = text.find("'", i + 1)
            j = len(text) if j < 0 else j
            parts.append(text[i + 1 : j])
            i = j + 1
        else:
            match = _BARE.match(text, i)
            if not match:
                return parts, i
            parts.append(match.group())
            i = match.end()
        while i < len(text) and text[i] in " \t":
            i += 1
        if i < len(text) and text[i] == ".":
            i += 1
            continue
        return parts, i


def _toml_lines(text: str) -> dict[Loc, int]:
    """Key path -> line for every table header, `key = value` line and item of
    an array. Good enough for error messages: keys inside an inline table report
    the line of the key that holds them."""
    lines: dict[Loc, int] = {}
    table: list[str] = []
    array: Loc = ()  # the key of the multi-line value being read
    items = [0]  # how many items of that array were seen (_scan counts in place)
    depth = 0
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if depth > 0:
            depth = _scan(stripped, depth, array, items, number, lines)
            continue
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.startswith("["):
            inner = 2 if stripped.startswith("[[") else 1
            parts, _ = _toml_keys(stripped, inner)
            table = parts
            lines.setdefault(tuple(table), number)
            continue
        parts, end = _toml_keys(stripped, 0)
        if parts and stripped[end : end + 1] == "=":
            array, items = (*table, *parts), [0]
            lines.setdefault(array, number)
            depth = _scan(stripped[end + 1 :], 0, array, items, number, lines)
    return lines


def _scan(
    text: str, depth: int, array: Loc, items: list[int], number: int, lines: dict[Loc, int]
) -> int:
    """Follow the brackets of a value over one line, outside strings and
    comments; an item that starts at depth 1 of an array gets this line.
    Returns the depth at the end of the line (0: the value is complete)."""
    quote, i, previous = "", 0, "["
    while i < len(text):
        ch = text[i]
        if quote:
            if ch == "\\" and quote == '"':
                i += 1
            elif ch == quote:
                quote = ""
        elif ch == "#":
            break
        elif ch in "]}":
            depth -= 1
        elif not ch.isspace() and ch != ",":
            # An item starts at depth 1 after `[`, `,` or the start of a line.
            if depth == 1 and previous in "[,":
                lines.setdefault((*array, items[0]), number)
                items[0] += 1
            if ch in "\"'":
                quote = ch
            elif ch in "[{":
                depth += 1
        if not ch.isspace() and not quote:
            previous = ch
        elif quote and ch == quote:
            previous = ch
        i += 1
    return max(depth, 0)


def _yaml_lines(node: Any, path: Loc = (), lines: dict[Loc, int] | None = None) -> dict[Loc, int]:
    import yaml

    lines = {} if lines is None else lines
    lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            child = (*path, str(key.value))
            lines.setdefault(child, key.start_mark.line + 1)
            _yaml_lines(value, child, lines)
            # The value's own line would hide the key's: keep the key's.
            lines[child] = key.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _yaml_lines(item, (*path, index), lines)
    return lines


def _yaml_duplicates(node: Any, path: Loc = ()) -> Iterator[tuple[Loc, int]]:
    """Keys given twice in one mapping (PyYAML keeps the last silently)."""
    import yaml

    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key, value in node.value:
            name = str(key.value)
            if name in seen:
                yield (*path, name), key.start_mark.line + 1
            seen.add(name)
            yield from _yaml_duplicates(value, (*path, name))
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            yield from _yaml_duplicates(item, (*path, index))


def key_text(loc: Loc) -> str:
    """`('channels', 'slack:C1', 'approvers', 0)` -> `channels."slack:C1".approvers[0]`."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
            continue
        name = part if _BARE.fullmatch(part) else '"' + part.replace('"', '\\"') + '"'
        out += f".{name}" if out else name
    return out or "(top level)"


def _line_of(lines: dict[Loc, int], loc: Loc) -> int:
    for end in range(len(loc), -1, -1):
        if loc[:end] in lines:
            return lines[loc[:end]]
    return 1


def _message(error: Any) -> tuple[Loc, str]:
    """A pydantic error as (key path, sentence)."""
    loc = tuple(part for part in error["loc"] if part != "[key]")
    kind = error["type"]
    if kind == "extra_forbidden":
        name = str(loc[-1]) if loc else ""
        model = {1: PolicyDocument, 2: Section}.get(len(loc), ChannelSection)
        allowed = sorted(model.model_fields)
        return loc, f"unknown key {name!r} (allowed here: {', '.join(allowed)})"
    message = str(error["msg"]).removeprefix("Value error, ")
    if kind in ("string_type", "list_type", "dict_type", "model_type"):
        wanted = {
            "string_type": "a string",
            "list_type": "a list",
            "dict_type": "a table of risk = count"
            if loc and loc[-1] == "quorum"
            else "a table of sections",
            "model_type": "a table (section)",
        }[kind]
        message = f"must be {wanted}, not {_shown(error.get('input'))}"
    return loc, message


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:59] + "…"


# -- loading -----------------------------------------------------------------------


def _format_of(path: Path, text: str) -> Literal["toml", "yaml"]:
    suffix = path.suffix.lower()
    if suffix == ".toml":
        return "toml"
    if suffix in (".yaml", ".yml"):
        return "yaml"
    # By content: TOML's first statement is a [table] or a `key = value`.
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        return "toml" if re.match(r"\[|[\"'A-Za-z0-9_.-]+\s*=", stripped) else "yaml"
    return "toml"


def _parse(path: Path, text: str) -> tuple[Any, dict[Loc, int], list[str]]:
    """The raw data, the line of each key, and syntax errors (then data is None)."""
    shown = str(path)
    if _format_of(path, text) == "toml":
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            # "Expected '=' after a key in a key/value pair (at line 3, column 5)"
            found = re.search(r"\(at line (\d+), column \d+\)", str(exc))
            # "… (at end of document)": the last line.
            line = found.group(1) if found else str(max(1, len(text.splitlines())))
            reason = re.sub(r"\s*\(at (line \d+, column \d+|end of document)\)", "", str(exc))
            return None, {}, [f"{shown}:{line}: TOML syntax error: {reason}"]
        return data, _toml_lines(text), []
    import yaml

    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        line = mark.line + 1 if mark is not None else 1
        problem = getattr(exc, "problem", None) or str(exc)
        return None, {}, [f"{shown}:{line}: YAML syntax error: {problem}"]
    if node is None:
        return {}, {}, []
    duplicates = [
        f"{shown}:{line}: {key_text(loc)}: given twice" for loc, line in _yaml_duplicates(node)
    ]
    return data, _yaml_lines(node), duplicates


class _Collector:
    """Errors as `file:line: key: message`, in the order of their lines."""

    def __init__(self, shown: str, lines: dict[Loc, int], found: list[str]) -> None:
        self.shown, self.lines, self.errors = shown, lines, list(found)

    def add(self, loc: Loc, message: str) -> None:
        self.errors.append(f"{self.shown}:{_line_of(self.lines, loc)}: {key_text(loc)}: {message}")

    def validate(self, model: type[BaseModel], data: Any, at: Loc) -> Any:
        try:
            return model.model_validate(data)
        except ValidationError as exc:
            for error in exc.errors():
                loc, message = _message({**error, "loc": (*at, *error["loc"])})
                self.add(loc, message)
            return None

    def workspace(self, base: Path, value: str | None, loc: Loc) -> Path | None:
        """A section's workspace: relative to the policy file's directory, and it
        must be a directory that exists (a typo must not make tools run elsewhere)."""
        if value is None:
            return None
        where = (base / Path(value).expanduser()).resolve()
        if not where.is_dir():
            self.add(loc, f"{where} {'is not a directory' if where.exists() else 'does not exist'}")
        return where


def parse_policy(text: str, path: Path) -> PolicyFile:
    """Validate a policy file's text (`path` names it in errors and anchors
    relative workspaces). Raises PolicyFileError with every problem found:
    each section is validated on its own, so one bad section hides no other."""
    data, lines, found = _parse(path, text)
    if data is None:
        raise PolicyFileError(found)
    out = _Collector(str(path), lines, found)
    if not isinstance(data, dict):
        out.add((), "must be a table of sections (default, channels)")
        raise PolicyFileError(out.errors)
    for key in data:
        if key not in PolicyDocument.model_fields:
            out.add((str(key),), _message({"loc": (key,), "type": "extra_forbidden"})[1])
    base = path.parent.resolve()
    raw_default = data.get("default", {})
    default = out.validate(Section, raw_default, ("default",))
    default_workspace = out.workspace(base, _raw_workspace(raw_default), ("default", "workspace"))
    channels = data.get("channels", {})
    if not isinstance(channels, dict):
        out.add(("channels",), f"must be a table of sections, not {_shown(channels)}")
        channels = {}
    rules = []
    placed: dict[tuple[str, str, str | None], str] = {}
    for name, raw in channels.items():
        name = str(name)
        try:
            _section_key(name)
        except ValueError as exc:
            out.add(("channels", name), str(exc))
            continue
        section = out.validate(ChannelSection, raw, ("channels", name))
        workspace = out.workspace(base, _raw_workspace(raw), ("channels", name, "workspace"))
        if section is None:
            continue
        platform, _, channel = name.partition(":")
        team = section.team
        if platform == "slack" and "/" in channel:
            in_name, _, channel = channel.partition("/")
            if team is not None and team != in_name:
                out.add(
                    ("channels", name, "team"),
                    f"{team!r} is not the workspace in the section's name ({in_name})",
                )
            team = in_name
        if platform != "slack" and team is not None:
            out.add(("channels", name, "team"), "only Slack channels belong to a workspace")
        where = (platform, channel, team)
        if where in placed:
            out.add(("channels", name), f"the same channel as section {placed[where]!r}")
        placed[where] = name
        rules.append(ChannelRule(name, platform, channel, team, section, workspace))
    if out.errors:
        raise PolicyFileError(sorted(out.errors, key=_line_number))
    return PolicyFile(path, default or Section(), default_workspace, tuple(rules))


def _raw_workspace(section: object) -> str | None:
    """A section's workspace as written, checked even when the rest of its
    section is invalid (so one pass reports every problem)."""
    value = section.get("workspace") if isinstance(section, dict) else None
    return value if isinstance(value, str) else None


def _line_number(error: str) -> int:
    found = re.match(r".*?:(\d+): ", error)
    return int(found.group(1)) if found else 0


def load_policy_file(path: Path) -> PolicyFile:
    """Read and validate DUCKLM_POLICY_FILE; a missing or unreadable file is an
    error like any other (the bot must not start on rights it cannot read)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PolicyFileError([f"{path}: no such file (DUCKLM_POLICY_FILE)"]) from None
    except IsADirectoryError:
        raise PolicyFileError([f"{path}: is a directory, not a policy file"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise PolicyFileError([f"{path}: cannot be read: {reason}"]) from None
    return parse_policy(text, path)
