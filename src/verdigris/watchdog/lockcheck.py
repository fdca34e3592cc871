"""A static check for principle 4: no lock is taken while a guard of the same lock is held.

For each Python module it finds the places a lock is taken:

* ``with L.read():`` / ``with L.write():`` (and ``async with``): the read or write side of an RW lock;
* ``with L:`` (and ``async with``) where ``L`` was made by ``threading.Lock/RLock/Condition/Semaphore``,
  ``asyncio.Lock/Condition/Semaphore``, or its last name contains ``lock``, ``mutex`` or ``cond``:
  an exclusive lock; ``L.acquire()`` too;

where ``L`` is an attribute path (``self._lock``, keyed by the enclosing class) or a module global.
A ``Condition(L)`` is the same lock as ``L``. It then reports, as ``file:line: message``, every place where
``L`` is taken again while a guard of ``L`` is held, either directly inside the ``with`` block or through
calls to functions and methods of the same module (``f()``, ``self.m()``, ``cls.m()``, ``Class.m()``),
followed transitively. Taking the read side twice is allowed; read→write, write→anything and an exclusive
lock taken twice are reported. An ``RLock`` taken twice is allowed (that is what it is for).

It is intra-module and name-based: calls through other modules, callbacks and aliases other than
``Condition(L)`` are not followed. Functions defined inside a ``with`` block (callbacks, lambdas) are not
treated as running there.

``python -m verdigris.watchdog.lockcheck PATH...`` exits 1 when it finds anything, 2 on a file it cannot
parse, 0 otherwise. A line ending in ``# lockcheck: ok`` is not reported.
"""

from __future__ import annotations

import ast
import re
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

Mode = Literal["read", "write", "exclusive"]

_LOCK_CTORS = {"Lock", "RLock", "Condition", "Semaphore", "BoundedSemaphore", "RWLock", "AsyncRWLock"}
_REENTRANT_CTORS = {"RLock"}
_LOCKY_NAME = re.compile(r"(lock|mutex|cond)", re.IGNORECASE)
_SUPPRESS = "# lockcheck: ok"


@dataclass(frozen=True, slots=True)
class Finding:
    path: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.message}"


@dataclass(frozen=True, slots=True)
class _Acq:
    """One acquisition: the lock key, its mode, where, and the call chain that leads there."""

    key: str
    shown: str
    mode: Mode
    line: int
    via: tuple[str, ...] = ()


@dataclass
class _Func:
    qualname: str
    cls: str | None
    node: ast.FunctionDef | ast.AsyncFunctionDef
    direct: list[_Acq] = field(default_factory=list)
    calls: list[tuple[str, int]] = field(default_factory=list)


def _dotted(node: ast.expr) -> str | None:
    """``a.b.c`` for a Name/Attribute chain, else None."""
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return None


def _ctor_name(node: ast.expr) -> str | None:
    if isinstance(node, ast.Call):
        name = _dotted(node.func)
        if name is not None:
            return name.rsplit(".", 1)[-1]
    return None


def _conflicts(held: Mode, wanted: Mode) -> bool:
    return not (held == "read" and wanted == "read")


class _Module:
    def __init__(self, path: str, tree: ast.Module, source_lines: Sequence[str]) -> None:
        self.path = path
        self.tree = tree
        self.lines = source_lines
        self.funcs: dict[str, _Func] = {}
        self.classes: set[str] = set()
        self.known: set[str] = set()
        """Lock keys known from their constructor."""
        self.reentrant: set[str] = set()
        self.alias: dict[str, str] = {}
        """``Condition(L)`` key → ``L`` key."""
        self._memo: dict[str, list[_Acq]] = {}
        self._collect()

    # -- lock identity

    @staticmethod
    def _key(path: str, cls: str | None) -> str:
        head = path.split(".", 1)[0]
        if cls is not None and head in ("self", "cls"):
            return f"{cls}:{path.split('.', 1)[1] if '.' in path else ''}"
        return path

    def _resolve(self, key: str) -> str:
        seen = set()
        while key in self.alias and key not in seen:
            seen.add(key)
            key = self.alias[key]
        return key

    # -- collection

    def _collect(self) -> None:
        for node in self.tree.body:
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                self._add_func(node.name, None, node)
            elif isinstance(node, ast.ClassDef):
                self.classes.add(node.name)
                for item in node.body:
                    if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef):
                        self._add_func(f"{node.name}.{item.name}", node.name, item)
        # Lock constructors: module globals and attributes assigned anywhere in a class.
        for cls, assign in self._assignments():
            ctor = _ctor_name(assign.value)
            if ctor not in _LOCK_CTORS:
                continue
            for target in assign.targets:
                name = _dotted(target)
                if name is None:
                    continue
                key = self._key(name, cls)
                self.known.add(key)
                if ctor in _REENTRANT_CTORS:
                    self.reentrant.add(key)
                if ctor == "Condition" and isinstance(assign.value, ast.Call) and assign.value.args:
                    inner = _dotted(assign.value.args[0])
                    if inner is not None:
                        self.alias[key] = self._key(inner, cls)
        for fn in self.funcs.values():
            self._scan(fn)

    def _assignments(self) -> Iterator[tuple[str | None, ast.Assign]]:
        for node in self.tree.body:
            if isinstance(node, ast.Assign):
                yield None, node
            elif isinstance(node, ast.ClassDef):
                for sub in ast.walk(node):
                    if isinstance(sub, ast.Assign):
                        yield node.name, sub

    def _add_func(self, qual: str, cls: str | None, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        self.funcs[qual] = _Func(qual, cls, node)

    def _lock_of(self, expr: ast.expr, cls: str | None) -> tuple[str, str, Mode] | None:
        """``(key, shown, mode)`` if ``expr`` (a with-item) takes a lock."""
        if isinstance(expr, ast.Call) and isinstance(expr.func, ast.Attribute):
            meth = expr.func.attr
            if meth in ("read", "write"):
                target = _dotted(expr.func.value)
                if target is not None and not expr.args:
                    mode: Mode = "read" if meth == "read" else "write"
                    return self._resolve(self._key(target, cls)), target, mode
            return None
        target = _dotted(expr)
        if target is None:
            return None
        key = self._key(target, cls)
        if key in self.known or _LOCKY_NAME.search(target.rsplit(".", 1)[-1]):
            return self._resolve(key), target, "exclusive"
        return None

    def _callee(self, call: ast.Call, cls: str | None) -> str | None:
        name = _dotted(call.func)
        if name is None:
            return None
        parts = name.split(".")
        if len(parts) == 1 and parts[0] in self.funcs:
            return parts[0]
        if len(parts) == 2:
            head, meth = parts
            if head in ("self", "cls") and cls is not None:
                q = f"{cls}.{meth}"
                return q if q in self.funcs else None
            if head in self.classes:
                q = f"{head}.{meth}"
                return q if q in self.funcs else None
        return None

    def _body_nodes(self, stmts: Iterable[ast.AST]) -> Iterator[ast.AST]:
        """Every node under ``stmts``, not descending into nested functions, lambdas or classes."""
        stack = list(stmts)
        while stack:
            node = stack.pop()
            yield node
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda | ast.ClassDef):
                    continue
                stack.append(child)

    def _scan(self, fn: _Func) -> None:
        for node in self._body_nodes(fn.node.body):
            if isinstance(node, ast.With | ast.AsyncWith):
                for item in node.items:
                    got = self._lock_of(item.context_expr, fn.cls)
                    if got is not None:
                        fn.direct.append(_Acq(got[0], got[1], got[2], item.context_expr.lineno))
            elif isinstance(node, ast.Call):
                if (
                    isinstance(node.func, ast.Attribute)
                    and node.func.attr == "acquire"
                    and (got := self._lock_of(node.func.value, fn.cls)) is not None
                ):
                    fn.direct.append(_Acq(got[0], got[1], "exclusive", node.lineno))
                callee = self._callee(node, fn.cls)
                if callee is not None:
                    fn.calls.append((callee, node.lineno))

    # -- transitive acquisitions

    def acquisitions(self, qual: str, _active: frozenset[str] = frozenset()) -> list[_Acq]:
        """Every lock ``qual`` may take, directly or through same-module calls (one entry per lock+mode)."""
        memo = self._memo
        if qual in memo:
            return memo[qual]
        fn = self.funcs[qual]
        out: dict[tuple[str, Mode], _Acq] = {}
        for acq in fn.direct:
            out.setdefault((acq.key, acq.mode), acq)
        active = _active | {qual}
        for callee, line in fn.calls:
            if callee in active:
                continue
            for acq in self.acquisitions(callee, active):
                via = (f"{callee}() (line {line})", *acq.via)
                out.setdefault((acq.key, acq.mode), _Acq(acq.key, acq.shown, acq.mode, acq.line, via))
        result = list(out.values())
        if not _active:
            memo[qual] = result
        return result

    # -- checking

    def check(self) -> list[Finding]:
        found: list[Finding] = []
        for fn in self.funcs.values():
            self._check_block(fn, fn.node.body, [], found)
        return found

    def _report(self, found: list[Finding], line: int, held: _Acq, acq: _Acq, through: str = "") -> None:
        if line - 1 < len(self.lines) and self.lines[line - 1].rstrip().endswith(_SUPPRESS):
            return
        if held.mode == acq.mode == "exclusive" and held.key in self.reentrant:
            return
        what = {"read": "read side", "write": "write side", "exclusive": "lock"}
        chain = f" via {' → '.join(acq.via)}" if acq.via else ""
        where = f" at line {acq.line}" if through else ""
        found.append(
            Finding(
                self.path,
                line,
                f"{acq.shown}: {what[acq.mode]} taken{through}{chain}{where} while the "
                f"{what[held.mode]} of {held.shown} taken at line {held.line} is held "
                f"(deadlock-prone: principle 4)",
            )
        )

    def _check_block(
        self, fn: _Func, stmts: Sequence[ast.stmt], held: list[_Acq], found: list[Finding]
    ) -> None:
        for stmt in stmts:
            self._check_stmt(fn, stmt, held, found)

    def _check_stmt(self, fn: _Func, stmt: ast.stmt, held: list[_Acq], found: list[Finding]) -> None:
        if isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            return
        if isinstance(stmt, ast.With | ast.AsyncWith):
            pushed = 0
            for item in stmt.items:
                self._check_calls(fn, item.context_expr, held, found)
                got = self._lock_of(item.context_expr, fn.cls)
                if got is None:
                    continue
                acq = _Acq(got[0], got[1], got[2], item.context_expr.lineno)
                for h in held:
                    if h.key == acq.key and _conflicts(h.mode, acq.mode):
                        self._report(found, acq.line, h, acq)
                held.append(acq)
                pushed += 1
            self._check_block(fn, stmt.body, held, found)
            del held[len(held) - pushed :]
            return
        # Expressions of this statement (not its nested statements), then nested statement blocks.
        for name, value in ast.iter_fields(stmt):
            if isinstance(value, list) and value and all(isinstance(v, ast.stmt) for v in value):
                self._check_block(fn, value, held, found)
            elif isinstance(value, list):
                for v in value:
                    if isinstance(v, ast.ExceptHandler | ast.match_case):
                        self._check_block(fn, v.body, held, found)
                    elif isinstance(v, ast.expr):
                        self._check_calls(fn, v, held, found)
            elif isinstance(value, ast.expr) and name != "annotation":
                self._check_calls(fn, value, held, found)

    def _check_calls(self, fn: _Func, expr: ast.expr, held: list[_Acq], found: list[Finding]) -> None:
        if not held:
            return
        for node in self._body_nodes([expr]):
            if not isinstance(node, ast.Call):
                continue
            if isinstance(node.func, ast.Attribute) and node.func.attr == "acquire":
                got = self._lock_of(node.func.value, fn.cls)
                if got is not None:
                    acq = _Acq(got[0], got[1], "exclusive", node.lineno)
                    for h in held:
                        if h.key == acq.key:
                            self._report(found, node.lineno, h, acq)
            callee = self._callee(node, fn.cls)
            if callee is None:
                continue
            for acq in self.acquisitions(callee):
                for h in held:
                    if h.key == acq.key and _conflicts(h.mode, acq.mode):
                        via = (f"{callee}() (line {node.lineno})", *acq.via)
                        self._report(
                            found,
                            node.lineno,
                            h,
                            _Acq(acq.key, acq.shown, acq.mode, acq.line, via),
                            through=" again",
                        )


def check_source(source: str, path: str = "<string>") -> list[Finding]:
    """Findings for one module's source. SyntaxError propagates."""
    tree = ast.parse(source, filename=path)
    return sorted(_Module(path, tree, source.splitlines()).check(), key=lambda f: (f.path, f.line, f.message))


def iter_python_files(paths: Iterable[str | Path]) -> Iterator[Path]:
    for p in paths:
        path = Path(p)
        if path.is_dir():
            yield from sorted(q for q in path.rglob("*.py") if "__pycache__" not in q.parts)
        else:
            yield path


def check_paths(paths: Iterable[str | Path]) -> tuple[list[Finding], list[str]]:
    """Findings over every ``.py`` file under ``paths``, and the errors of files that could not be read."""
    findings: list[Finding] = []
    errors: list[str] = []
    for path in iter_python_files(paths):
        try:
            source = path.read_text(encoding="utf-8")
            findings.extend(check_source(source, str(path)))
        except (OSError, UnicodeDecodeError, SyntaxError) as e:
            errors.append(f"{path}: cannot check: {e}")
    return findings, errors


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print("usage: python -m verdigris.watchdog.lockcheck PATH...", file=sys.stderr)
        return 0 if args else 2
    findings, errors = check_paths(args)
    for f in findings:
        print(f)
    for e in errors:
        print(e, file=sys.stderr)
    if errors:
        return 2
    return 1 if findings else 0


if __name__ == "__main__":
    raise SystemExit(main())
