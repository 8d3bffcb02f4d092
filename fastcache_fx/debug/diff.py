"""Compare two graph dumps (``explain --dump``) or two export manifests (JSON).

Graph dumps are compared as a unified diff (their node names are canonical, so only real
changes show). Manifests are compared key by key, recursively, and each differing leaf is
reported as ``field.path: A_value -> B_value`` (values as JSON; ``<absent>`` for a missing
key). Lists of plain values (shapes, block names) are leaves; lists holding dicts or lists
are compared item by item (``blocks[2].name``). Two directories are compared file by file.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from .explain import unified_diff

ABSENT = "<absent>"


@dataclass
class DiffResult:
    """What ``diff_paths`` found: ``kind`` is "text", "manifest" or "directory"; ``lines`` the
    report lines (unified diff lines, or ``path: A -> B`` lines); ``same`` when nothing differs."""

    kind: str
    lines: list[str] = field(default_factory=list)

    @property
    def same(self) -> bool:
        return not self.lines

    def text(self) -> str:
        return "".join(ln if ln.endswith("\n") else ln + "\n" for ln in self.lines)


_MISSING = object()


def _show(v) -> str:
    return ABSENT if v is _MISSING else json.dumps(v, sort_keys=True, default=str)


def _is_leaf_list(v) -> bool:
    return isinstance(v, list) and not any(isinstance(x, (dict, list)) for x in v)


def diff_values(a, b, path: str = "") -> list[str]:
    """Differing leaves of two JSON values as ``path: A -> B`` lines (dict keys in sorted order).

    Returns:
        [] when ``a == b``.
    """
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            out += diff_values(a.get(k, _MISSING), b.get(k, _MISSING), f"{path}.{k}" if path else str(k))
        return out
    if isinstance(a, list) and isinstance(b, list) and not (_is_leaf_list(a) and _is_leaf_list(b)):
        out = []
        for i in range(max(len(a), len(b))):
            out += diff_values(a[i] if i < len(a) else _MISSING, b[i] if i < len(b) else _MISSING, f"{path}[{i}]")
        return out
    if a is not _MISSING and b is not _MISSING and a == b and type(a) is type(b):
        return []
    return [f"{path or '<root>'}: {_show(a)} -> {_show(b)}"]


def diff_manifests(a: dict, b: dict) -> list[str]:
    """``diff_values`` of two manifests (dicts loaded from JSON)."""
    return diff_values(a, b)


def _load_json(p: Path):
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}: not valid JSON ({e})") from None


def diff_paths(a: str | os.PathLike, b: str | os.PathLike, context: int = 3) -> DiffResult:
    """Compare two files or two directories.

    ``.json`` files are compared as manifests, anything else as text (unified diff). For
    directories, files with the same relative path are compared, and a file present on one side
    only is reported as ``only in A: name`` / ``only in B: name``.

    Raises:
        FileNotFoundError: a path does not exist.
        ValueError: a file and a directory, or a .json file that does not parse.
    """
    pa, pb = Path(a), Path(b)
    for p in (pa, pb):
        if not p.exists():
            raise FileNotFoundError(f"{p}: no such file or directory")
    if pa.is_dir() != pb.is_dir():
        raise ValueError(f"cannot compare a directory with a file: {pa}, {pb}")
    if pa.is_dir():
        lines = []
        fa = {p.relative_to(pa) for p in pa.rglob("*") if p.is_file()}
        fb = {p.relative_to(pb) for p in pb.rglob("*") if p.is_file()}
        for rel in sorted(fa | fb):
            if rel not in fb:
                lines.append(f"only in A: {rel}")
            elif rel not in fa:
                lines.append(f"only in B: {rel}")
            else:
                sub = diff_paths(pa / rel, pb / rel, context)
                if not sub.same:
                    lines += ([f"== {rel}"] if sub.kind == "manifest" else []) + sub.lines
        return DiffResult("directory", lines)
    if pa.suffix == ".json" and pb.suffix == ".json":
        return DiffResult("manifest", diff_manifests(_load_json(pa), _load_json(pb)))
    text = unified_diff(pa.read_text(), pb.read_text(), str(pa), str(pb), context)
    return DiffResult("text", text.splitlines(keepends=True))
