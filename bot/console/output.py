"""What the console writes, and how: styled with `rich` on a terminal, as written otherwise.

Three kinds of text, each with its own treatment:

- `markdown`: the agent's answers (and a direct command's result, whose output
  sits in a code fence). On a terminal they are rendered: code blocks, inline
  code, lists, bold, tables. The parser is configured as for Matrix
  (bot/matrix/format.py): raw HTML off, so `<file>` in an answer stays visible
  text instead of vanishing as a tag, and a single newline is a line break,
  because the model writes one answer for every surface.
- `inline`: the console's and the admin commands' own replies. They are line
  lists, not prose (`/duck rules`, `/duck task ID`): the lines are kept as
  written and only the `code spans` are styled.
- `line`: approval cards, progress lines and errors, always verbatim.

Styled output needs a terminal, and neither `NO_COLOR` (no-color.org: set and
not empty) nor `TERM=dumb`. Otherwise the text is written as it is, Markdown
source included: a pipe or a log gets exactly what the agent answered (the same
text Matrix sends as its plain `body`), the fences still say where a command's
output starts and ends, and no ANSI escape appears.

Whatever the mode, control characters are shown, never obeyed. A command's
output or a model's answer can hold escape sequences (retitling the terminal,
writing the clipboard, moving the cursor), a carriage return that draws over an
approval card's command, or a bidirectional override that shows it reversed;
each becomes a visible symbol before anything is written.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from rich.console import Console as RichConsole

# C0 controls other than tab and newline become their Control Pictures
# (U+2400 + code: ESC shows as ␛), DEL as ␡, C1 controls and the bidirectional
# embeddings, overrides and isolates as <U+XXXX>.
_VISIBLE: dict[int, str] = {
    code: chr(0x2400 + code) for code in range(0x20) if chr(code) not in "\t\n"
}
_VISIBLE[0x7F] = "\u2421"
for _code in [*range(0x80, 0xA0), *range(0x202A, 0x202F), *range(0x2066, 0x206A)]:
    _VISIBLE[_code] = f"<U+{_code:04X}>"

_CODE_SPAN = re.compile(r"`([^`\n]+)`")


def visible(text: str) -> str:
    """`text` with every control character replaced by a visible symbol (CRLF is a newline)."""
    return text.replace("\r\n", "\n").translate(_VISIBLE)


def wants_style(stream: TextIO, environ: Mapping[str, str] = os.environ) -> bool:
    """Style output to `stream` only on a terminal that has not asked for plain text."""
    if environ.get("NO_COLOR") or environ.get("TERM") == "dumb":
        return False
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


class Output:
    """Writes the console's text to `stream`, styled when `styled` (by default: `wants_style`)."""

    def __init__(
        self,
        stream: TextIO,
        *,
        styled: bool | None = None,
        environ: Mapping[str, str] = os.environ,
    ) -> None:
        self.stream = stream
        self.styled = wants_style(stream, environ) if styled is None else styled
        self._rich: RichConsole | None = None

    def line(self, text: str) -> None:
        """Verbatim text: cards, progress lines, errors."""
        self.stream.write(visible(text).rstrip("\n") + "\n")
        self.stream.flush()

    def inline(self, text: str) -> None:
        """Lines as written, with `code spans` styled on a terminal."""
        if not self.styled:
            self.line(text)
            return
        from rich.text import Text

        styled = Text()
        clean = visible(text).rstrip("\n")
        end = 0
        for match in _CODE_SPAN.finditer(clean):
            styled.append(clean[end : match.start()])
            styled.append(match.group(1), style="markdown.code")
            end = match.end()
        styled.append(clean[end:])
        self._console().print(styled)

    def markdown(self, text: str) -> None:
        """The agent's answer: rendered Markdown on a terminal, the source otherwise."""
        if not self.styled:
            self.line(text)
            return
        try:
            self._console().print(terminal_markdown(visible(text)))
        except Exception:
            # rich writes only once a whole answer is rendered: if it cannot render
            # one, nothing was written, and the reader gets the source instead.
            self.line(text)

    def _console(self) -> RichConsole:
        # Imported here: rich's console costs ~50 ms to import, its Markdown (with
        # pygments) ~20 ms more (python -X importtime). Only a console on a
        # terminal pays it, at its first styled line; a piped one never does.
        if self._rich is None:
            from rich.console import Console

            self._rich = Console(
                file=self.stream,
                force_terminal=True,
                # What we print is already decided: no rich markup (`[a]pprove`
                # is text), no :emoji: codes, no guessing at numbers to colour.
                markup=False,
                emoji=False,
                highlight=False,
            )
        return self._rich


def terminal_markdown(text: str) -> Any:
    """A rich `Markdown` of `text`, parsed the way bot/matrix/format.py parses it."""
    from markdown_it import MarkdownIt
    from rich.markdown import Markdown

    parser = MarkdownIt("commonmark", {"html": False, "linkify": False})
    parser.enable(["table", "strikethrough"])
    # An image's alt text and address stay text: a terminal shows no images.
    parser.disable("image")
    tokens = parser.parse(text)
    for token in tokens:
        if not token.children:
            continue
        # An autolink `<https://x>` is its own text: without its link tokens it
        # is not shown twice as "https://x (https://x)".
        token.children = [
            child
            for child in token.children
            if not (child.type in ("link_open", "link_close") and child.markup == "autolink")
        ]
        for child in token.children:
            if child.type == "softbreak":  # `breaks: True`, as on Matrix
                child.type = "hardbreak"
    # rich parses with its own parser (raw HTML on, soft breaks as spaces): give it
    # nothing to parse, then the tokens above. `parsed` is what it renders from.
    # hyperlinks=False prints a link as "label (address)": the reader sees where
    # it goes, where a terminal hyperlink would hide the address behind the label.
    markdown = Markdown("", hyperlinks=False)
    markdown.markup = text
    markdown.parsed = tokens
    return markdown
