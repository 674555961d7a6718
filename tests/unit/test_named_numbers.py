"""Every limit, interval and batch size in the application has a name.

The test reads the application modules' syntax trees and fails on a bare number in a call, a
comparison or a slice (``chunk_size=2000``, ``len(code) > 64``, ``timedelta(seconds=30)``,
``text[:150]``) unless the number is in the short allow-list below or is itself the value of a
name (``EXPORT_CHUNK_ROWS = 2000``, a setting). A new unnamed limit fails it: give the number a
name, and where it was measured, a comment saying so.
"""

from __future__ import annotations

import ast
from http import HTTPStatus
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("accounts", "audit", "config", "core", "protocols", "recognition", "workers")

# Numbers that are never a limit, so need no name: none, one, the last one, a pair or a half;
# a half (rounding to the nearest, the centre of a range); per cent; bytes in a KiB and KiB in a
# MiB (a limit of 1024 still wants a name: the scan cannot tell); the largest 8-bit pixel value,
# the scale of every 8-bit image.
ALLOWED = {0, 1, -1, 2, 0.5, 100, 1024, 255}
# An HTTP status code where the code says it is one: the code is its own name. That is compared
# with something called status (``exc.status in (403, 404)``), in a ``status=``/``status_code=``/
# ``responses=`` argument, a ``"status"`` entry or a collection named ``statuses``; anywhere else
# a 200 or a 300 is a limit like any other.
HTTP_STATUSES = {status.value for status in HTTPStatus}
STATUS_KEYWORDS = {"status", "status_code", "responses"}


def _called_status(node: ast.expr) -> bool:
    name = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else ""
    return "status" in name


def _says_status(node: ast.AST) -> bool:
    if isinstance(node, ast.Compare):
        return any(_called_status(side) for side in (node.left, *node.comparators))
    if isinstance(node, ast.keyword):
        return node.arg in STATUS_KEYWORDS
    if isinstance(node, ast.Dict):
        return any(isinstance(key, ast.Constant) and key.value == "status" for key in node.keys)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
        return isinstance(node.func.value, ast.Name) and node.func.value.id == "statuses"
    return False


# A field's width (``max_length=64``): the keyword names it, the migrations and the schema record it.
NAMING_KEYWORDS = {"max_length"}
# Modules whose numbers draw a picture (a synthetic scan, the demo phantom): shape, not limits.
DRAWINGS = {"workers/engine/synthetic.py", "workers/management/commands/seed_demo.py"}


def application_modules() -> list[Path]:
    found = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            relative = path.relative_to(ROOT).as_posix()
            if "migrations" not in path.parts and relative not in DRAWINGS:
                found.append(path)
    return found


def _is_name(target: ast.expr) -> bool:
    """``LIMIT = …``, ``LOW, HIGH = …`` or ``SETTING["KEY"] = …``: the number is the value of a name."""
    if isinstance(target, ast.Tuple):
        return all(_is_name(element) for element in target.elts)
    while isinstance(target, ast.Subscript):
        target = target.value
    return isinstance(target, ast.Name) and target.id.isupper()


def _value(node: ast.expr) -> int | float | None:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        inner = _value(node.operand)
        return None if inner is None else -inner
    return None


def bare_numbers(tree: ast.AST) -> list[tuple[int, int | float]]:
    """(line, number) for each number inside a call, a comparison or a slice that has no name."""
    found: list[tuple[int, int | float]] = []

    def visit(node: ast.AST, inside: bool, status: bool = False) -> None:
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if all(_is_name(target) for target in targets):
                return
        if isinstance(node, ast.keyword) and node.arg in NAMING_KEYWORDS:
            return
        if isinstance(node, ast.arguments):  # a default is a limit too: ``def f(limit=50)``
            positional = [*node.posonlyargs, *node.args]
            pairs = [*zip(positional[len(positional) - len(node.defaults) :], node.defaults, strict=True)]
            pairs += [(arg, default) for arg, default in zip(node.kwonlyargs, node.kw_defaults, strict=True) if default]
            for arg, default in pairs:
                visit(default, True, status or arg.arg in STATUS_KEYWORDS)
            return
        value = _value(node) if isinstance(node, ast.expr) else None
        if value is not None:
            if inside and value not in ALLOWED and not (status and value in HTTP_STATUSES):
                found.append((node.lineno, value))
            return
        inside = inside or isinstance(node, (ast.Call, ast.Compare, ast.Slice))
        status = status or _says_status(node)
        for child in ast.iter_child_nodes(node):
            visit(child, inside, status)

    visit(tree, False)
    return found


def test_the_scan_finds_an_unnamed_limit():
    tree = ast.parse(
        "LIMIT = 64\n"
        "CACHES['default']['TIMEOUT'] = 300\n"
        "name = models.CharField(max_length=64)\n"
        "rows.iterator(chunk_size=2000)\n"
        "if len(code) > LIMIT or status == 404: pass\n"
        "sleep(-3.5)\n"
        "Response(body, status=201)\n"
        "serializers.IntegerField(max_value=200)\n"
        "if len(name) > 400 or response.status_code != 200: pass\n"
        "label = text[:150]\n"
        "def page(rows, size=25, *, status=200, wait=0.25): pass\n"
    )
    assert bare_numbers(tree) == [(4, 2000), (6, -3.5), (8, 200), (9, 400), (10, 150), (11, 25), (11, 0.25)]


def test_every_limit_has_a_name():
    offenders = [
        f"{path.relative_to(ROOT)}:{line}: {value!r}"
        for path in application_modules()
        for line, value in bare_numbers(ast.parse(path.read_text()))
    ]
    assert not offenders, "numbers without a name (a module-level CONSTANT or a setting):\n" + "\n".join(offenders)
