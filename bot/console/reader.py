"""Reading the operator's lines: readline on a terminal, plain reads from a pipe.

On a terminal the console edits lines with the standard library's `readline`
(GNU readline, or libedit on macOS): cursor keys and the usual Emacs keys, a
history kept across sessions in a file, and Tab completion of the `/duck`
grammar (bot/console/completion.py).

Why readline and not prompt_toolkit: measured with `python -X importtime` on
the 2-core development machine, `import readline` takes about 1 ms and
`import prompt_toolkit` about 115 ms, an eighth of the whole console's start
(~0.9 s), for nothing the console needs: it handles one line at a time, so no
output arrives while the prompt is shown, and readline already gives editing,
history and completion. Where Python was built without readline the console
still works, without editing.

readline blocks the thread that reads, so each line is read in a daemon thread
while the event loop keeps serving the runtime (MCP sessions, the store's
background work). A daemon thread, because a Ctrl-C at the prompt ends the
console at once: an executor thread would keep the process alive until Enter.
The terminal's modes are saved at start and restored at close, since readline
leaves them changed when the process ends in the middle of a line.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any, TextIO

HISTORY_LENGTH = 1000

Completer = Callable[[str, str], list[str]]


def history_path(directory: Path, stem: str) -> Path:
    """Where the console keeps its history: beside the database, like the Matrix
    store (Settings.local_dir and local_stem)."""
    return directory / f"{stem}-console-history"


def _readline() -> ModuleType | None:
    try:
        import readline
    except ImportError:  # a Python built without it
        return None
    return readline


class LineReader:
    """Reads one line at a time; `read` returns None at end of input (Ctrl-D, EOF).

    `keep(line)` decides whether a line joins the history (the console leaves
    out lines holding a secret); `complete(before, word)` offers Tab completions.
    """

    def __init__(
        self,
        stdin: TextIO,
        stdout: TextIO,
        *,
        history_file: Path | None = None,
        keep: Callable[[str], bool] = lambda line: True,
        complete: Completer | None = None,
    ) -> None:
        self.stdin = stdin
        self.stdout = stdout
        self.history_file = history_file
        self.keep = keep
        self.complete = complete
        self.interactive = _isatty(stdin)
        # input() edits with readline only on the process's own terminal.
        on_terminal = self.interactive and stdin is sys.stdin and _isatty(sys.stdout)
        self._readline = _readline() if on_terminal else None
        self._saved_modes: list[Any] | None = None
        self._last: str | None = None
        self._matches: list[str] = []
        self.problem: str | None = None  # why the history could not be used, once

    def open(self) -> None:
        """Set up readline: terminal modes saved, history loaded, Tab bound."""
        rl = self._readline
        if rl is None:
            return
        self._saved_modes = _terminal_modes(self.stdin)
        rl.set_auto_history(False)  # `keep` decides, line by line
        rl.set_history_length(HISTORY_LENGTH)
        if self.history_file is not None:
            try:
                # Owner-only: the history holds what the operator typed.
                os.close(os.open(self.history_file, os.O_CREAT | os.O_APPEND, 0o600))
                rl.read_history_file(self.history_file)
                length = rl.get_current_history_length()
                self._last = rl.get_history_item(length) if length else None
            except OSError as exc:
                self.problem = f"Console history is off: {self.history_file}: {exc.strerror}"
                self.history_file = None
        if self.complete is not None:
            rl.set_completer_delims(" \t\n")
            rl.set_completer(self._completer)
            if "libedit" in (rl.__doc__ or ""):
                rl.parse_and_bind("bind ^I rl_complete")
            else:
                rl.parse_and_bind("tab: complete")

    def close(self) -> None:
        if self._saved_modes is not None:
            _restore_terminal_modes(self.stdin, self._saved_modes)

    async def read(self, prompt: str) -> str | None:
        if self._readline is None:
            if self.interactive:
                self.stdout.write(prompt)
                self.stdout.flush()
            line = await asyncio.to_thread(self.stdin.readline)
            return line if line else None
        try:
            line = await _in_daemon_thread(lambda: _input(prompt))
        except asyncio.CancelledError:  # Ctrl-C at the prompt ends the console
            self.stdout.write("\n")
            self.stdout.flush()
            raise
        if line is None:
            self.stdout.write("\n")  # Ctrl-D: the shell's prompt starts on a new line
            self.stdout.flush()
            return None
        self._remember(line)
        return line + "\n"

    def _remember(self, line: str) -> None:
        rl = self._readline
        assert rl is not None
        # A line typed with a leading space stays out, as in bash; so do repeats.
        if not line.strip() or line.startswith(" ") or line == self._last:
            return
        if not self.keep(line):
            return
        self._last = line
        rl.add_history(line)
        if self.history_file is not None:
            try:
                # Appended at once: a console that is killed keeps what it read.
                rl.append_history_file(1, self.history_file)
            except OSError as exc:
                self.problem = f"Console history is off: {self.history_file}: {exc.strerror}"
                self.history_file = None

    def _completer(self, word: str, state: int) -> str | None:
        rl = self._readline
        assert rl is not None and self.complete is not None
        if state == 0:
            before = rl.get_line_buffer()[: rl.get_begidx()]
            try:
                self._matches = self.complete(before, word)
            except Exception:  # readline swallows errors: no completion rather than none ever
                self._matches = []
        return self._matches[state] if state < len(self._matches) else None


def _input(prompt: str) -> str | None:
    try:
        return input(prompt)
    except EOFError:
        return None


async def _in_daemon_thread(read: Callable[[], str | None]) -> str | None:
    loop = asyncio.get_running_loop()
    future: asyncio.Future[str | None] = loop.create_future()

    def deliver(value: str | None, error: BaseException | None) -> None:
        if future.done():  # the console stopped waiting (Ctrl-C)
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(value)

    def body() -> None:
        # Ctrl-C is for the main thread, whose event loop turns it into the console's
        # end; delivered to this thread, it would wake nothing.
        with contextlib.suppress(AttributeError, OSError, ValueError):
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        value, error = None, None
        try:
            value = read()
        except BaseException as exc:
            error = exc
        with contextlib.suppress(RuntimeError):  # the loop has closed
            loop.call_soon_threadsafe(deliver, value, error)

    threading.Thread(target=body, name="console-input", daemon=True).start()
    return await future


def _terminal_modes(stream: TextIO) -> list[Any] | None:
    try:
        import termios
    except ImportError:  # not a POSIX system
        return None
    try:
        return termios.tcgetattr(stream.fileno())
    except (termios.error, OSError, ValueError):
        return None


def _restore_terminal_modes(stream: TextIO, modes: list[Any]) -> None:
    import termios

    with contextlib.suppress(termios.error, OSError, ValueError):
        termios.tcsetattr(stream.fileno(), termios.TCSADRAIN, modes)


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
