"""Redaction: secrets are replaced by `[REDACTED:<kind>]` before tool output
reaches chat, the model or the audit log.

Two sources of "secret":

- **The bot's own credentials**, matched literally (every token, key and
  password it holds, plus ones learnt at run time such as the Matrix access
  token a login returns: `Redactor.add_literal`). A few cheap encodings of each
  are matched too, because a command can print a credential without printing
  it verbatim: base64 (standard and URL-safe, at each of the three byte
  alignments, so a token inside `base64("user:" + token)` is still found),
  percent-encoding and JSON string escaping. Literals shorter than
  `MIN_LITERAL` characters are ignored: redacting "admin" everywhere would
  destroy ordinary output and protect nothing.
- **Well-known secret formats**, from Yelp's `detect-secrets` plugins: their
  compiled denylist regexes are used directly (the plugins' `analyze_line`
  API yields values, not positions, and goes through settings and
  verification machinery we do not want on every tool call). A few formats
  the plugins miss are added here, each named below with why.

Left out on purpose: the high-entropy string plugins (every sha256, git sha,
uuid and base64 blob in a log would be "a secret", so the output the bot
exists to read would be unreadable), and plugins whose patterns hit ordinary
words (Artifactory's `AP[0-9A-F]…` matches upper-case identifiers) or need
context this layer has not got (IBM, Cloudant, SoftLayer: keyword-plus-host
heuristics). Mailchimp and Telegram are left out too: each cost a millisecond
or more per 64 KiB for tokens a chat-ops host rarely prints.

The pass is built to be cheap on 64 KiB of output (bench/redaction.py): each
pattern is skipped unless a literal it cannot match without occurs in the
text, case-insensitive patterns run on a lower-cased copy, the keyword
assignment patterns are tried only where a keyword is followed by `:`/`=`,
private-key headers and the literals are found with `str.find`, and text
already redacted is remembered (events record the same output again).
"""

from __future__ import annotations

import base64
import json
import re
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from detect_secrets.filters.heuristic import is_not_alphanumeric_string, is_templated_secret
from detect_secrets.plugins import keyword as ds_keyword
from detect_secrets.plugins.aws import AWSKeyDetector
from detect_secrets.plugins.azure_storage_key import AzureStorageKeyDetector
from detect_secrets.plugins.basic_auth import BasicAuthDetector
from detect_secrets.plugins.discord import DiscordBotTokenDetector
from detect_secrets.plugins.github_token import GitHubTokenDetector
from detect_secrets.plugins.gitlab_token import GitLabTokenDetector
from detect_secrets.plugins.jwt import JwtTokenDetector
from detect_secrets.plugins.npm import NpmDetector
from detect_secrets.plugins.openai import OpenAIDetector
from detect_secrets.plugins.private_key import PrivateKeyDetector
from detect_secrets.plugins.pypi_token import PypiTokenDetector
from detect_secrets.plugins.sendgrid import SendGridDetector
from detect_secrets.plugins.slack import SlackDetector
from detect_secrets.plugins.square_oauth import SquareOAuthDetector
from detect_secrets.plugins.stripe import StripeDetector
from detect_secrets.plugins.twilio import TwilioKeyDetector

from runtime.tools.base import ToolResult

MIN_LITERAL = 8
# Redacted outputs are remembered (by value; a str caches its hash) so the same
# 64 KiB text recorded again in an event is not scanned twice. Short strings
# are cheaper to scan than to remember.
_CLEAN_CACHE = 32
_CLEAN_MIN_CHARS = 512
# Short strings (event fields: tool names, reasons, commands) repeat a lot;
# their redactions are remembered outright, up to this many.
_SHORT_CACHE = 4096
PLACEHOLDER = "[REDACTED:{kind}]"
# Metadata keys the redactor writes itself; never scanned.
COUNT_KEY = "redacted"
KINDS_KEY = "redacted_kinds"


@dataclass(frozen=True)
class Redaction:
    """The redacted text, how many secrets were replaced, and their kinds (sorted, unique)."""

    text: str
    count: int
    kinds: tuple[str, ...]


@dataclass(frozen=True)
class _Pattern:
    kind: str
    regex: re.Pattern[str]
    # Which group is the secret (0: the whole match). Keeping the rest shows
    # the reader *what* was hidden: `https://deploy:[REDACTED:basic-auth]@host`.
    group: int = 0
    # A literal the pattern cannot match without; the regex runs only when it
    # occurs. None: always run.
    trigger: str | None = None
    # Case-insensitive patterns run case-sensitively on a lower-cased copy of
    # the text (same length, so the same positions): Python's IGNORECASE
    # search is several times slower. `trigger` is then lower case too.
    fold: bool = False

    def __post_init__(self) -> None:
        if self.fold:
            folded = re.compile(self.regex.pattern, self.regex.flags & ~re.IGNORECASE)
            object.__setattr__(self, "regex", folded)


def _jwt_span(text: str, start: int, end: int) -> int | None:
    """detect-secrets' JWT regex ends lazily (it stops before the signature).
    Keep only formally valid tokens (header and payload decode to JSON), as the
    plugin does, then take the signature too."""
    if not JwtTokenDetector.is_formally_valid(text[start:end].rstrip(".")):
        return None
    tail = _JWT_TAIL.match(text, end)
    return tail.end() if tail else end


_JWT_TAIL = re.compile(r"[A-Za-z0-9_\-+/=]*")

# PEM private keys (and PGP/PuTTY private keys) are redacted as a whole block,
# from detect-secrets' header up to the matching end line, or to the end of
# the text when the output was cut short (half a key is still a key). The JSON
# of a GCP service-account file holds the same block with `\n` escapes, so it
# is caught the same way.
_BLOCK_END = {
    "PuTTY-User-Key-File-2": re.compile(r"Private-MAC:[^\n]*"),
    "BEGIN PGP PRIVATE KEY BLOCK": re.compile(r"-----END PGP PRIVATE KEY BLOCK-----"),
}
_PEM_END = re.compile(r"-----END [A-Z0-9 ]*PRIVATE KEY-----")
_PEM_HEADERS = re.compile("|".join(p.pattern for p in PrivateKeyDetector.denylist))
# Where a header can start: each detect-secrets header begins with one of these.
_HEADER_STARTS = ("BEGIN ", "PuTTY-User-Key-File-")


def _plugin(detector: type, index: int = 0) -> re.Pattern[str]:
    return list(detector.denylist)[index]  # type: ignore[attr-defined]


# Keyword assignments (`password=…`, `passwd: …`, `secret = "…"`, `api_key: …`):
# detect-secrets' config-file patterns (no quotes required), with the group of
# each that is the value. Run only on lines that hold one of the keywords.
_KEYWORD_FORWARD: tuple[tuple[re.Pattern[str], int], ...] = tuple(
    (regex, group)
    for regex, group in ds_keyword.CONFIG_DENYLIST_REGEX_TO_GROUP.items()
    if regex is not ds_keyword.PRECEDED_BY_EQUAL_COMPARISON_SIGNS_QUOTES_REQUIRED_REGEX
)
# `"value" == password`: the keyword comes after the value.
_KEYWORD_COMPARED = ds_keyword.PRECEDED_BY_EQUAL_COMPARISON_SIGNS_QUOTES_REQUIRED_REGEX
_KEYWORD_START = re.compile(ds_keyword.DENYLIST_REGEX)
# What must follow a keyword for any forward pattern to match: closing quotes
# or brackets, spaces, then `:`, `=` or `!=`.
_ASSIGNED = re.compile(r"""[]'"]{0,2}\s*[:=!]""")
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")

_PATTERNS: tuple[_Pattern, ...] = (
    # Cloud keys.
    _Pattern("aws-access-key", _plugin(AWSKeyDetector, 0)),
    _Pattern("aws-secret-key", _plugin(AWSKeyDetector, 1), group=1, trigger="aws", fold=True),
    # The same key unquoted (`aws_secret_access_key = …` in ~/.aws/credentials, `env`):
    # the plugin wants quotes, and the keyword patterns want a value that starts
    # with a word character, which a base64 key need not (`+xmu…`).
    _Pattern(
        "aws-secret-key",
        re.compile(
            r"aws.{0,20}?(?:key|secret|token).{0,20}?[=:]\s*([0-9a-zA-Z/+]{40})(?![0-9a-zA-Z/+=])"
        ),
        group=1,
        trigger="aws",
        fold=True,
    ),
    _Pattern("azure-storage-key", _plugin(AzureStorageKeyDetector), trigger="AccountKey="),
    # Azure SAS tokens: the signature is what grants access (not in detect-secrets).
    _Pattern(
        "azure-sas-signature",
        re.compile(r"[?&]sig=([A-Za-z0-9%+/=]{20,})"),
        group=1,
        trigger="sig=",
    ),
    # Chat and forge tokens.
    _Pattern("slack-token", _plugin(SlackDetector, 0), trigger="xox", fold=True),
    _Pattern("slack-webhook", _plugin(SlackDetector, 1), trigger="hooks.slack.com"),
    # App-level (xapp-) and rotating (xoxe) tokens, which SlackDetector does not know.
    _Pattern("slack-token", re.compile(r"xapp-\d+-[A-Za-z0-9-]{10,}"), trigger="xapp-"),
    _Pattern(
        "slack-token", re.compile(r"xoxe(?:\.xox[a-z])?-\d+-[A-Za-z0-9-]{10,}"), trigger="xoxe"
    ),
    _Pattern("github-token", _plugin(GitHubTokenDetector), trigger="gh"),
    # Fine-grained personal access tokens (not in GitHubTokenDetector).
    _Pattern("github-token", re.compile(r"github_pat_[A-Za-z0-9_]{22,}"), trigger="github_pat_"),
    *(
        _Pattern("gitlab-token", pattern, trigger=trigger)
        for pattern, trigger in zip(
            GitLabTokenDetector.denylist,
            ("gl", "GR1348941", "glcbt-", "glimt-", "glptt-", "glagent-", "gloas-"),
            strict=True,
        )
    ),
    # Matrix access tokens as Synapse issues them (not in detect-secrets).
    _Pattern("matrix-token", re.compile(r"syt_[A-Za-z0-9+/=_-]{10,}"), trigger="syt_"),
    _Pattern("discord-token", _plugin(DiscordBotTokenDetector)),
    # Payment, mail and package registries.
    _Pattern("stripe-key", _plugin(StripeDetector), trigger="k_live_"),
    *(_Pattern("twilio-key", p) for p in TwilioKeyDetector.denylist),
    _Pattern("sendgrid-key", _plugin(SendGridDetector), trigger="SG."),
    _Pattern("square-secret", _plugin(SquareOAuthDetector), trigger="sq0csp-"),
    _Pattern("npm-token", _plugin(NpmDetector), group=1, trigger="_authToken"),
    _Pattern("pypi-token", _plugin(PypiTokenDetector, 0), trigger="pypi-"),
    _Pattern("pypi-token", _plugin(PypiTokenDetector, 1), trigger="pypi-"),
    _Pattern("openai-key", _plugin(OpenAIDetector), trigger="T3BlbkFJ"),
    # Credentials in URLs and headers.
    _Pattern("basic-auth", _plugin(BasicAuthDetector), group=1, trigger="://"),
    # `Authorization: Bearer …` as `curl -v` or a proxy log prints it (not in detect-secrets).
    _Pattern(
        "authorization",
        re.compile(
            r"authorization\s*[:=]\s*[\"']?(?:bearer|basic|token|bot|apikey)\s+"
            r"([a-z0-9._~+/=-]{8,})",
        ),
        group=1,
        trigger="authorization",
        fold=True,
    ),
)
_JWT = _Pattern("jwt", _plugin(JwtTokenDetector), trigger="eyJ")


def _encodings(value: str) -> set[str]:
    """Cheap encodings a command could print a credential in (see the module doc)."""
    found = {value, quote(value, safe=""), json.dumps(value)[1:-1]}
    raw = value.encode()
    for shift in range(3):
        encoded = base64.b64encode(b"\0" * shift + raw).decode().rstrip("=")
        # Only the characters made of the value's own bits: those before
        # depend on what precedes it, those after on what follows.
        first = -(-8 * shift // 6)
        last = (8 * (shift + len(raw))) // 6
        core = encoded[first:last]
        if len(core) >= MIN_LITERAL:
            found.add(core)
            found.add(core.replace("+", "-").replace("/", "_"))
    return {item for item in found if len(item) >= MIN_LITERAL}


def secret_fields(settings: Any) -> dict[str, str]:
    """Every secret a settings model holds, keyed by its environment name.

    A field counts when its name says it is a credential (token, password,
    passphrase, secret, key), so a setting added later (for instance
    MATRIX_STORE_PASSPHRASE) is redacted without anyone remembering to list it.
    """
    found: dict[str, str] = {}
    fields = getattr(type(settings), "model_fields", {})
    for name, info in fields.items():
        if not _SECRET_FIELD.search(name):
            continue
        value = getattr(settings, name, None)
        if hasattr(value, "get_secret_value"):
            value = value.get_secret_value()
        if isinstance(value, str) and value:
            alias = info.validation_alias
            env = getattr(alias, "choices", [alias])[0] if alias else name
            found[str(env)] = value
    return found


_SECRET_FIELD = re.compile(r"token|password|passphrase|secret|api_key|private_key", re.IGNORECASE)


class Redactor:
    """Replaces secrets in text by `[REDACTED:<kind>]`. One per process, shared by
    every gateway and the loop; credentials learnt at run time are added with
    `add_literal` and apply to everything redacted from then on."""

    def __init__(self, literals: Mapping[str, str | None] | None = None) -> None:
        # value -> kind; every encoding of a literal maps to the literal's kind.
        self._literals: dict[str, str] = {}
        self._clean: OrderedDict[str, None] = OrderedDict()
        self._short: dict[str, Redaction] = {}
        for kind, value in (literals or {}).items():
            self.add_literal(value, kind)

    @classmethod
    def from_settings(cls, settings: Any) -> Redactor:
        return cls(secret_fields(settings))

    @property
    def literal_count(self) -> int:
        return len(self._literals)

    def add_literal(self, value: str | None, kind: str = "credential") -> bool:
        """Redact `value` (and its encodings) from now on. Returns False when it
        is too short to redact safely (shorter than MIN_LITERAL) or empty."""
        if not value or len(value.strip()) < MIN_LITERAL:
            return False
        label = _kind_label(kind)
        # Longest first, so a literal that contains another wins the overlap.
        merged = dict(self._literals)
        for encoded in _encodings(value.strip()):
            merged.setdefault(encoded, label)
        self._literals = dict(sorted(merged.items(), key=lambda item: -len(item[0])))
        # What was clean before may hold the new literal.
        self._clean.clear()
        self._short.clear()
        return True

    # -- text ---------------------------------------------------------------

    def redact(self, text: str) -> Redaction:
        if not text:
            return Redaction(text, 0, ())
        if len(text) < _CLEAN_MIN_CHARS:
            known = self._short.get(text)
            if known is None:
                if len(self._short) >= _SHORT_CACHE:
                    self._short.clear()
                known = self._short[text] = self._redact(text)
            return known
        return self._redact(text)

    def _redact(self, text: str) -> Redaction:
        remember = len(text) >= _CLEAN_MIN_CHARS
        if remember and text in self._clean:
            self._clean.move_to_end(text)
            return Redaction(text, 0, ())
        spans = self._spans(text)
        if not spans:
            if remember:
                self._remember(text)
            return Redaction(text, 0, ())
        out: list[str] = []
        kinds: set[str] = set()
        position = 0
        count = 0
        for start, end, kind in _merge(spans):
            out.append(text[position:start])
            out.append(PLACEHOLDER.format(kind=kind))
            kinds.add(kind)
            count += 1
            position = end
        out.append(text[position:])
        redacted = "".join(out)
        if len(redacted) >= _CLEAN_MIN_CHARS:
            self._remember(redacted)
        return Redaction(redacted, count, tuple(sorted(kinds)))

    def _remember(self, clean: str) -> None:
        self._clean[clean] = None
        if len(self._clean) > _CLEAN_CACHE:
            self._clean.popitem(last=False)

    def _spans(self, text: str) -> list[tuple[int, int, str]]:
        spans: list[tuple[int, int, str]] = []
        for literal, kind in self._literals.items():
            start = text.find(literal)
            while start != -1:
                spans.append((start, start + len(literal), kind))
                start = text.find(literal, start + len(literal))
        folded = _lower(text)
        for pattern in _PATTERNS:
            searched = folded if pattern.fold else text
            if pattern.trigger is not None and pattern.trigger not in searched:
                continue
            for match in pattern.regex.finditer(searched):
                start, end = match.span(pattern.group)
                if start != end and start >= 0:
                    spans.append((start, end, pattern.kind))
        if _JWT.trigger and _JWT.trigger in text:
            for match in _JWT.regex.finditer(text):
                end = _jwt_span(text, match.start(), match.end())
                if end is not None:
                    spans.append((match.start(), end, _JWT.kind))
        spans.extend(_private_key_spans(text))
        spans.extend(_keyword_spans(text, folded))
        return spans

    # -- structures -----------------------------------------------------------

    def redact_value(self, value: Any) -> tuple[Any, int, set[str]]:
        """Redact every string inside JSON-like data (dicts, lists, tuples).
        Returns the redacted copy (the input is not changed), the count, the kinds."""
        if isinstance(value, str):
            found = self.redact(value)
            return found.text, found.count, set(found.kinds)
        if isinstance(value, Mapping):
            total, kinds, copy = 0, set(), {}
            for key, item in value.items():
                if key in (COUNT_KEY, KINDS_KEY):
                    copy[key] = item
                    continue
                copy[key], count, found = self.redact_value(item)
                total += count
                kinds |= found
            return copy, total, kinds
        if isinstance(value, list | tuple):
            total, kinds, items = 0, set(), []
            for item in value:
                redacted, count, found = self.redact_value(item)
                items.append(redacted)
                total += count
                kinds |= found
            return (items if isinstance(value, list) else tuple(items)), total, kinds
        return value, 0, set()

    def redact_result(self, result: ToolResult) -> ToolResult:
        """A tool result with output, error and metadata redacted; the metadata
        says how many secrets were replaced (`redacted`) and their kinds."""
        output = self.redact(result.output)
        error = self.redact(result.error) if result.error else None
        metadata, count, kinds = self.redact_value(result.metadata)
        total = output.count + (error.count if error else 0) + count
        if not total:
            return result
        kinds |= set(output.kinds) | set(error.kinds if error else ())
        metadata[COUNT_KEY] = int(result.metadata.get(COUNT_KEY) or 0) + total
        metadata[KINDS_KEY] = sorted(kinds | set(result.metadata.get(KINDS_KEY) or ()))
        return result.model_copy(
            update={
                "output": output.text,
                "error": error.text if error else result.error,
                "metadata": metadata,
            }
        )


def _kind_label(kind: str) -> str:
    """`SLACK_BOT_TOKEN` -> `slack-bot-token`: one spelling for every kind."""
    return re.sub(r"[^a-z0-9]+", "-", kind.lower()).strip("-") or "credential"


def _merge(spans: Iterable[tuple[int, int, str]]) -> list[tuple[int, int, str]]:
    """Overlapping spans become one (the earliest's kind): one secret, one placeholder."""
    merged: list[tuple[int, int, str]] = []
    for start, end, kind in sorted(spans, key=lambda s: (s[0], -s[1])):
        if merged and start < merged[-1][1]:
            last = merged[-1]
            merged[-1] = (last[0], max(last[1], end), last[2])
        else:
            merged.append((start, end, kind))
    return merged


def _placeholder_value(value: str) -> bool:
    """detect-secrets' own filters for values that are not secrets: templates
    (`{x}`, `<x>`, `${x}`) and masks (`********`). Showing them helps the reader."""
    value = value.strip()
    return is_templated_secret(value) or is_not_alphanumeric_string(value)


def _lower(text: str) -> str:
    """Lower case with every character at the same position. `str.lower` is
    fast but can lengthen a few non-ASCII letters (İ); then only ASCII is folded."""
    folded = text.lower()
    return folded if len(folded) == len(text) else text.translate(_ASCII_LOWER)


def _private_key_spans(text: str) -> list[tuple[int, int, str]]:
    """Whole key blocks. The headers are found with `str.find` (a search with
    detect-secrets' alternation of headers is slow on 64 KiB) and checked with
    the plugin's patterns; the block starts at the header's dashes."""
    if "PRIVATE KEY" not in text and "PuTTY-User-Key-File" not in text:
        return []
    spans: list[tuple[int, int, str]] = []
    for marker in _HEADER_STARTS:
        position = text.find(marker)
        while position != -1:
            header = _PEM_HEADERS.match(text, position)
            if header is None:
                position = text.find(marker, position + 1)
                continue
            start = position
            while start > 0 and text[start - 1] == "-" and position - start < 5:
                start -= 1
            ender = next(
                (regex for name, regex in _BLOCK_END.items() if name in header.group(0)),
                _PEM_END,
            )
            end = ender.search(text, header.end())
            stop = end.end() if end else len(text)
            spans.append((start, stop, "private-key"))
            position = text.find(marker, stop)
    return spans


def _keyword_spans(text: str, folded: str) -> list[tuple[int, int, str]]:
    """`password=…` and friends. detect-secrets' patterns are case-insensitive
    alternations, slow to search 64 KiB with; so the keywords are found first
    in the lower-cased copy (same length, so same positions) with a
    case-sensitive search, and each pattern is then only tried at those places,
    bounded to the line (their value class would otherwise run across lines)."""
    spans: list[tuple[int, int, str]] = []
    for hit in _KEYWORD_START.finditer(folded):
        line_end = text.find("\n", hit.end())
        line_end = len(text) if line_end == -1 else line_end
        line_start = text.rfind("\n", 0, hit.start()) + 1
        if (
            not _ASSIGNED.match(folded, hit.end(), line_end)
            and ";" not in text[hit.end() : line_end]
        ):
            # "Failed password for …": no assignment follows the keyword. Every
            # forward pattern needs one (or, in code, a quoted value and a `;`).
            if "==" not in text[line_start:line_end]:
                continue
        for regex, group in _KEYWORD_FORWARD:
            match = regex.match(text, hit.start(), line_end)
            if match is not None:
                if _placeholder_value(match.group(group)):
                    break
                spans.append((*match.span(group), "secret-value"))
                break
        if "==" in text[line_start:line_end]:
            match = _KEYWORD_COMPARED.search(text, line_start, line_end)
            if match is not None:
                spans.append((*match.span(2), "secret-value"))
    return [
        (start, end, kind)
        for start, end, kind in spans
        if start < end and not text.startswith("[REDACTED:", start)
    ]
