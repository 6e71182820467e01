"""`read_file` and `list_dir`: read-only tools confined to the workspace.

Confinement is checked on the resolved path, so `..`, absolute paths and
symlinks that lead out of the workspace are all refused the same way.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath
from typing import Any, ClassVar

from runtime.tools.base import Assessment, Tool, ToolArgumentError, ToolResult
from runtime.tools.secrets import is_secret_path

DEFAULT_MAX_BYTES = 64 * 1024
MAX_DIR_ENTRIES = 500


class WorkspaceEscapeError(ToolArgumentError):
    """A path that leads outside the workspace."""


def resolve_in_workspace(workspace: Path, raw: object) -> Path:
    if not isinstance(raw, str) or not raw.strip():
        raise ToolArgumentError("'path' must be a non-empty string")
    if "\x00" in raw:
        raise ToolArgumentError("'path' must not contain NUL bytes")
    relative = PurePosixPath(raw.strip())
    if relative.is_absolute():
        raise WorkspaceEscapeError(f"{raw!r} is absolute; give a path inside the workspace")
    if ".." in relative.parts:
        raise WorkspaceEscapeError(f"{raw!r} leaves the workspace ('..' is not allowed)")
    root = workspace.resolve()
    target = (root / relative).resolve()
    if target != root and not target.is_relative_to(root):
        raise WorkspaceEscapeError(f"{raw!r} leads outside the workspace (through a symlink)")
    return target


def _is_secret(path: Path) -> bool:
    # The shell tool applies the same list to `cat` (runtime/tools/secrets.py).
    return is_secret_path(path)


class _WorkspaceTool(Tool):
    in_process_read: ClassVar[bool] = True

    def __init__(self, workspace: Path) -> None:
        self.workspace = Path(workspace)

    def _target(self, args: dict[str, Any], default: str | None = None) -> Path:
        return resolve_in_workspace(self.workspace, args.get("path", default))


class ReadFileTool(_WorkspaceTool):
    name: ClassVar[str] = "read_file"
    description: ClassVar[str] = "Read a text file inside the workspace."
    args_schema: ClassVar[dict[str, Any]] = {
        "type": "object",
        "properties": {
            "path": {"type": "string", "description": "path relative to the workspace"},
            "max_bytes": {"type": "integer", "description": f"default {DEFAULT_MAX_BYTES}"},
        },
        "required": ["path"],
    }

    def __init__(self, workspace: Path, *, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        super().__init__(workspace)
        self.max_bytes = max_bytes

    def assess(self, args: dict[str, Any]) -> Assessment:
        target = self._target(args)
        limit = args.get("max_bytes", self.max_bytes)
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
            raise ToolArgumentError("'max_bytes' must be a positive integer")
        if _is_secret(target):
            return Assessment(
                action_type="read",
                risk_level="high",
                requires_approval=True,
                reason=f"`{target.name}` looks like a secret (keys, tokens or credentials)",
            )
        return Assessment(reason="reading a file in the workspace is read-only")

    async def run(self, args: dict[str, Any], assessment: Assessment) -> ToolResult:
        target = self._target(args)
        limit = min(int(args.get("max_bytes", self.max_bytes)), self.max_bytes)
        shown = target.relative_to(self.workspace.resolve()).as_posix()
        if not target.is_file():
            return ToolResult(ok=False, error=f"{shown}: no such file", metadata={"path": shown})
        size = target.stat().st_size
        with target.open("rb") as handle:
            data = handle.read(limit)
        text = data.decode("utf-8", errors="replace")
        truncated = size > limit
        if truncated:
            text += f"\n[… file truncated: showing {limit} of {size} bytes]"
        return ToolResult(
            ok=True, output=text, metadata={"path": shown, "size": size, "truncated": truncated}
        )


class ListDirTool(_WorkspaceTool):
    name: ClassVar[str] = "list_dir"
    description: ClassVar[str] = "List a directory inside the workspace."
    args_schema: ClassVar[dict[str, Any]] = {
        "type": "object",
        "properties": {"path": {"type": "string", "description": "default: the workspace"}},
    }

    def assess(self, args: dict[str, Any]) -> Assessment:
        self._target(args, default=".")
        return Assessment(reason="listing a directory in the workspace is read-only")

    async def run(self, args: dict[str, Any], assessment: Assessment) -> ToolResult:
        target = self._target(args, default=".")
        shown = target.relative_to(self.workspace.resolve()).as_posix()
        if not target.is_dir():
            return ToolResult(
                ok=False, error=f"{shown}: no such directory", metadata={"path": shown}
            )
        lines = []
        with os.scandir(target) as entries:
            for entry in sorted(entries, key=lambda e: e.name)[:MAX_DIR_ENTRIES]:
                kind = (
                    "dir"
                    if entry.is_dir(follow_symlinks=False)
                    else "link"
                    if entry.is_symlink()
                    else "file"
                )
                size = entry.stat(follow_symlinks=False).st_size if kind == "file" else ""
                lines.append(f"{kind}\t{size}\t{entry.name}")
        return ToolResult(
            ok=True, output="\n".join(lines), metadata={"path": shown, "entries": len(lines)}
        )
