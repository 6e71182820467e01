"""`ducklm console` on a pseudo-terminal, as an operator at a terminal runs it.

The console is a subprocess whose controlling terminal is a pty (100 columns,
TERM=xterm-256color), so readline edits the lines, rich styles the answers and
Ctrl-C is a signal from the terminal, as in real use. Keys are typed into the
pty's master side and the screen is read back from it.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import pty
import re
import stat
import struct
import sys
import termios
from pathlib import Path

from tests.conftest import ACTION, THINKER
from tests.fakes.openai_server import FakeModelServer, Text
from tests.test_console import CLI_TIMEOUT, cli_env

SGR = re.compile(r"\x1b\[([\d;]*)m")

ANSWER = """\
The disks are **fine**:
- `/` at 40%
- `/home` at 70%

```
$ df -h /home
/dev/sdb1  70%
```"""
SECRET = "sk-console-test-0123456789abcdef"  # the model API key: a literal the runtime redacts


def _controlling_terminal() -> None:
    """In the child, after setsid: the pty on fd 0 becomes its controlling terminal."""
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


class PtyConsole:
    def __init__(self, tmp_path: Path, **env: str) -> None:
        self.tmp_path = tmp_path
        # An empty inputrc: a developer's own (vi mode, coloured completion) is not the test's.
        (tmp_path / "inputrc").write_text("")
        self.env = cli_env(
            tmp_path, TERM="xterm-256color", INPUTRC=str(tmp_path / "inputrc"), **env
        )
        if "NO_COLOR" not in env:  # the developer's own preference is not the test's
            self.env.pop("NO_COLOR", None)
        self.raw = bytearray()
        self.mark = 0
        self.changed = asyncio.Event()
        self.eof = False
        self.master = -1
        self.process: asyncio.subprocess.Process | None = None

    async def __aenter__(self) -> PtyConsole:
        self.master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 100, 0, 0))
        self.modes = termios.tcgetattr(self.master)
        try:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "bot.cli",
                "console",
                stdin=slave,
                stdout=slave,
                stderr=asyncio.subprocess.PIPE,
                cwd=self.tmp_path,
                env=self.env,
                start_new_session=True,
                preexec_fn=_controlling_terminal,
            )
        finally:
            os.close(slave)
        os.set_blocking(self.master, False)
        asyncio.get_running_loop().add_reader(self.master, self._readable)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.process is not None
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
            await self.process.wait()
        self._stop_reading()
        os.close(self.master)

    def _readable(self) -> None:
        try:
            data = os.read(self.master, 65536)
        except BlockingIOError:
            return
        except OSError:  # EIO: the console has exited and closed the terminal
            data = b""
        if not data:
            self._stop_reading()
        self.raw += data
        self.changed.set()

    def _stop_reading(self) -> None:
        if not self.eof:
            self.eof = True
            asyncio.get_running_loop().remove_reader(self.master)

    @property
    def screen(self) -> str:
        return self.raw.decode("utf-8", "replace").replace("\r\n", "\n")

    async def expect(self, text: str) -> str:
        """Wait (bounded) until `text` appears after what was already read; return up to it."""

        async def seen() -> str:
            while True:
                index = self.screen.find(text, self.mark)
                if index >= 0:
                    start, self.mark = self.mark, index + len(text)
                    return self.screen[start : self.mark]
                if self.eof:
                    raise AssertionError(f"console ended without {text!r}:\n{self.screen}")
                self.changed.clear()
                await self.changed.wait()

        try:
            return await asyncio.wait_for(seen(), CLI_TIMEOUT)
        except TimeoutError:
            raise AssertionError(f"no {text!r} within {CLI_TIMEOUT} s:\n{self.screen}") from None

    async def send(self, keys: str) -> str:
        """At the next prompt, type `keys` and Enter; return what the console shows up to the
        prompt after it."""
        await self.expect("\n> ")
        os.write(self.master, keys.encode() + b"\r")
        shown = await self.expect("\n> ")
        self.mark -= len("\n> ")  # the prompt is the next send's to wait for
        return shown

    async def leave(self) -> int:
        """Type `exit` at the next prompt; the console's exit code."""
        await self.expect("\n> ")
        os.write(self.master, b"exit\r")
        return await self.exit_code()

    def press(self, keys: bytes) -> None:
        os.write(self.master, keys)

    async def exit_code(self) -> int:
        assert self.process is not None and self.process.stderr is not None
        try:
            return await asyncio.wait_for(self.process.wait(), CLI_TIMEOUT)
        except TimeoutError:
            self.process.kill()
            await self.process.wait()
            err = (await self.process.stderr.read()).decode(errors="replace")
            raise AssertionError(
                f"console still running after {CLI_TIMEOUT} s:\n{self.screen}\n{err}"
            ) from None


def styles_before(shown: str, text: str) -> set[str]:
    """The SGR parameters in force where `text` starts."""
    params: set[str] = set()
    for match in SGR.finditer(shown[: shown.index(text)]):
        codes = set(match.group(1).split(";"))
        params = set() if codes <= {"0", ""} else params | codes
    return params


async def test_a_terminal_shows_rendered_markdown_and_keeps_the_approval_flow(
    tmp_path: Path, model_server: FakeModelServer
) -> None:
    model_server.set_default(ACTION, Text('{"actions": []}'))
    model_server.set_default(THINKER, Text(ANSWER))
    model = {
        "DUCKLM_MODEL_BASE_URL": model_server.base_url,
        "DUCKLM_MODEL_API_KEY": SECRET,
        "DUCKLM_THINKER_MODEL": THINKER,
        "DUCKLM_ACTION_MODEL": ACTION,
    }
    async with PtyConsole(tmp_path, **model) as console:
        shown = await console.send("how are the disks?")
        text = SGR.sub("", shown)
        assert "… writing the answer" in text  # progress lines as before
        assert "```" not in text and "**" not in text and "`" not in text
        assert "1" in styles_before(shown, "fine")  # bold
        assert "36" in styles_before(shown, "/home")  # inline code
        assert "•" in text
        # the fence became a code block: on a background, the command line kept
        assert any(p.startswith(("4", "10")) for p in styles_before(shown, "/dev/sdb1"))
        assert "$ df -h /home" in text

        shown = await console.send("run echo hi-from-the-pty")
        text = SGR.sub("", shown)
        assert "  … shell_exec_safe echo hi-from-the-pty" in text
        assert "```" not in text and "hi-from-the-pty\n" in text and "(exit 0" in text

        # the approval card is verbatim, the decision letters work as in a pipe
        shown = await console.send("run touch pty.txt")
        assert "Approval needed (medium risk, write):\n  $ touch pty.txt\n" in shown
        assert "[a]pprove / [d]eny [reason] / a[l]ways" in shown
        shown = await console.send("a")
        assert "… shell_exec_safe touch pty.txt" in shown
        assert (tmp_path / "workspace" / "pty.txt").exists()

        # redaction as before: the key never reaches the screen
        shown = await console.send(f"run echo {SECRET}")
        assert "[REDACTED" in shown and SECRET not in shown.replace(f"run echo {SECRET}", "")

        # a line typed with a leading space runs, and stays out of the history
        assert "No approvals are pending." in await console.send(" /duck approvals")

        # Tab completes the /duck grammar
        shown = await console.send("/duck rul\t")
        assert "/duck rules" in shown and "No rules." in shown
        assert await console.leave() == 0

    history = tmp_path / "ducklm-console-history"
    assert stat.S_IMODE(history.stat().st_mode) == 0o600
    # every line as entered (the Tab-completed one in full), except the one holding
    # a secret, the one with a leading space and `exit`
    assert history.read_text().splitlines() == [
        "how are the disks?",
        "run echo hi-from-the-pty",
        "run touch pty.txt",
        "a",
        "/duck rules",
    ]

    # the next session recalls the history with the up arrow
    async with PtyConsole(tmp_path, **model) as console:
        shown = await console.send("\x1b[A")
        assert "No rules." in shown
        assert await console.leave() == 0


async def test_no_color_on_a_terminal_writes_plain_text(tmp_path: Path) -> None:
    async with PtyConsole(tmp_path, NO_COLOR="1") as console:
        shown = await console.send("run echo plain-please")
        assert not SGR.search(console.screen)
        assert "```\n$ echo plain-please\nplain-please\n```\n(exit 0" in shown
        assert await console.leave() == 0


async def test_ctrl_c_at_the_prompt_ends_the_console_and_restores_the_terminal(
    tmp_path: Path,
) -> None:
    async with PtyConsole(tmp_path) as console:
        await console.expect("\n> ")
        console.press(b"half a li")
        await console.expect("half a li")
        console.press(b"\x03")
        assert await console.exit_code() == 130
        assert termios.tcgetattr(console.master) == console.modes
        assert "Traceback" not in console.screen
        assert console.process is not None and console.process.stderr is not None
        assert b"Traceback" not in await console.process.stderr.read()


async def test_a_history_file_that_cannot_be_used_is_said_once_and_the_console_works(
    tmp_path: Path,
) -> None:
    (tmp_path / "ducklm-console-history").mkdir()  # in the way of the file
    async with PtyConsole(tmp_path) as console:
        shown = await console.send("run echo still-here")
        assert "still-here" in shown
        assert console.screen.count("Console history is off:") == 1
        assert "ducklm-console-history: Is a directory" in console.screen
        assert await console.leave() == 0
