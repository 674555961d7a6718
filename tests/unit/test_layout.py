"""The house's layout, read from the source: who may import whom.

Every import counts, those inside functions too: a function-level import only hides a cycle.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("accounts", "audit", "config", "core", "recognition", "workers")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            if "migrations" not in path.parts:
                found[module_name(path)] = path
    return found


MODULES = project_modules()


def resolve(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    is_package = MODULES[module].name == "__init__.py"
    base = base[: len(base) - node.level + (1 if is_package else 0)]
    return ".".join([*base, node.module] if node.module else base)


def runtime_nodes(tree: ast.AST):
    """Every node, but those under ``if TYPE_CHECKING:`` (imports for annotations only: they
    never run, so they make no cycle)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            yield from (child for other in node.orelse for child in [other, *runtime_nodes(other)])
            continue
        yield node
        yield from runtime_nodes(node)


def imports(module: str) -> list[tuple[str, str | None]]:
    """(module imported, name imported from it or None) for every import in the module that runs."""
    tree = ast.parse(MODULES[module].read_text())
    found = []
    for node in runtime_nodes(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = resolve(module, node)
            for alias in node.names:
                if f"{target}.{alias.name}" in MODULES:  # a submodule, not a name
                    found.append((f"{target}.{alias.name}", None))
                else:
                    found.append((target, alias.name))
    return found


def owner(target: str) -> str | None:
    """The project module an import lands in (a name inside a module counts for the module)."""
    while target and target not in MODULES:
        target = target.rpartition(".")[0]
    return target or None


def graph() -> dict[str, set[str]]:
    edges = defaultdict(set)
    for module in MODULES:
        for target, _ in imports(module):
            landed = owner(target)
            if landed and landed != module and MODULES[landed].name != "__init__.py":
                edges[module].add(landed)
    return edges


def test_there_is_no_import_cycle():
    edges = graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt) :] + [nxt] if nxt in path else [node, nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for module in sorted(MODULES):
        if module not in state:
            visit(module, [module])
    assert not cycles, "\n".join(" → ".join(cycle) for cycle in cycles)


def test_no_private_name_is_imported_across_modules():
    crossings = [
        f"{module} imports {name} from {target}"
        for module in MODULES
        for target, name in imports(module)
        if name and name.startswith("_") and not name.startswith("__") and owner(target)
    ]
    assert not crossings, "\n".join(crossings)


def test_recognition_reaches_workers_only_by_task_name():
    reaching = [
        f"{module} imports {target}"
        for module in MODULES
        if module.startswith("recognition")
        for target, _ in imports(module)
        if target == "workers" or target.startswith("workers.")
    ]
    assert not reaching, "\n".join(reaching)


def test_the_engine_is_free_of_django_and_of_the_apps():
    forbidden = ("django", "rest_framework", "celery", "channels", "accounts", "recognition", "config", "workers.")
    reaching = [
        f"{module} imports {target}"
        for module in MODULES
        if module.startswith("workers.engine")
        for target, _ in imports(module)
        if any(target == name.rstrip(".") or target.startswith(name.rstrip(".") + ".") for name in forbidden)
        and not target.startswith("workers.engine")
    ]
    assert not reaching, "\n".join(reaching)


def test_core_sits_below_every_app():
    """The shared kernel imports no app and nothing of config/ (settings only through
    django.conf, which is Django's, not ours)."""
    reaching = [
        f"{module} imports {target}"
        for module in MODULES
        if module.startswith("core")
        for target, _ in imports(module)
        if target.split(".")[0] in ("accounts", "audit", "config", "recognition", "workers")
    ]
    assert not reaching, "\n".join(reaching)


# config/ is wiring: what Django, the ASGI server and drf-spectacular are pointed at by name
# (settings, urls, asgi/wsgi and the server's thread pool, the command that starts it, the
# OpenAPI schema class and hook). Anything the apps share goes to core/ instead.
CONFIG_WIRING = {
    "config",
    "config.asgi",
    "config.asgi_threads",
    "config.openapi",
    "config.urls",
    "config.webserver",
    "config.wsgi",
}


def test_config_holds_wiring_only():
    extra = sorted(
        module
        for module in MODULES
        if (module == "config" or module.startswith("config."))
        and module not in CONFIG_WIRING
        and not module.startswith("config.settings")
    )
    assert not extra, f"not wiring, belongs in core/: {extra}"


def test_no_app_imports_config():
    """The apps reach the settings through django.conf and the shared kernel in core/; config/
    names them (INSTALLED_APPS, urls), never the other way round."""
    found = [
        line
        for below in ("accounts", "audit", "core", "recognition", "workers")
        for line in reaching(below, ("config",))
    ]
    assert not found, "\n".join(found)


def reaching(below: str, above: tuple[str, ...]) -> list[str]:
    """Every import in ``below``'s modules that lands in one of the ``above`` packages."""
    return [
        f"{module} imports {target}"
        for module in MODULES
        if module == below or module.startswith(below + ".")
        for target, _ in imports(module)
        if target.split(".")[0] in above
    ]


def test_accounts_never_imports_recognition():
    """People and hospitals sit below the clinical records: what reads both (the access log's
    patient and study filters) is the audit app's, above the two."""
    found = reaching("accounts", ("recognition",))
    assert not found, "\n".join(found)


def test_the_audit_app_sits_above_every_app():
    """audit/ reads the log accounts writes and recognition's records; nothing imports it (the
    URL includes and INSTALLED_APPS name it as text)."""
    found = [
        line
        for below in ("accounts", "config", "core", "recognition", "workers")
        for line in reaching(below, ("audit",))
    ]
    assert not found, "\n".join(found)


def test_the_check_sees_the_imports_it_judges():
    """The walker finds a function-level import and resolves relative ones (so the tests above
    cannot pass by reading nothing)."""
    assert ("workers.runner", "inference_run") in imports("workers.tasks")  # inside a task function
    assert "recognition.models" in graph()["recognition.services.images"]  # from ..models import
    assert "workers.engine.handler" not in graph()["workers.engine.backends"]  # for annotations only
    assert "recognition.models" in graph()["audit.lookups"]  # what the accounts test refuses, seen
    assert reaching("audit", ("recognition",))
    assert "core.errors" in graph()["recognition.services.images"]  # the kernel, seen from an app
    assert "config.asgi_threads" in graph()["config.asgi"]  # what test_no_app_imports_config refuses, seen
    assert len(MODULES) > 50


def functions(module: str):
    """Every function of the module (methods and nested ones too)."""
    tree = ast.parse(MODULES[module].read_text())
    return [node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)]


def called(node: ast.AST) -> str | None:
    """The name a call calls (``f(...)`` or ``x.f(...)``), or None for anything else."""
    if not isinstance(node, ast.Call):
        return None
    return getattr(node.func, "id", None) or getattr(node.func, "attr", None)


def keywords(call: ast.Call) -> dict[str, str]:
    return {keyword.arg: ast.unparse(keyword.value) for keyword in call.keywords if keyword.arg}


# "get it for this hospital, else a logged 404" written out by hand, where the helper cannot
# serve: each with its reason
OWN_404 = {
    # the hospital itself, named by slug in X-Tenant or the switcher: not a row of a hospital
    ("accounts.selectors", "membership_resolve"),
    # a platform auditor reads across hospitals (no membership), and a read is logged in the
    # chain of the entry's own hospital, success and denial alike
    ("audit.selectors", "access_log_entry_get"),
    # a model version is platform-wide, not a hospital's row: the hospital's allowances are read
    # to decide whether it may name one, and one it may not is a 404 like an absent version
    ("recognition.services.registry", "version_allowed"),
}


def test_tenant_objects_are_reached_through_the_access_helper():
    """accounts.access.tenant_object_get is the one "this hospital's row, else a logged 404": a
    function that scopes a read to a hospital (``for_tenant``, ``filter(tenant=…)``) or logs a
    denied attempt on an object, and makes a 404 (raised, or returned for a caller to raise), is
    a new copy of it."""
    copies = []
    for module in MODULES:
        if module == "accounts.access":
            continue
        for function in functions(module):
            nodes = list(ast.walk(function))
            makes_404 = any(called(node) in ("NotFound", "Http404") for node in nodes)  # raised or returned
            scoped = any(
                called(node) == "for_tenant"
                or (called(node) in ("filter", "get") and {"tenant", "tenant_id"} & set(keywords(node)))
                for node in nodes
            )
            logs_denied = any(
                called(node) in ("access_event_record", "member_action_record")
                and "DENIED" in keywords(node).get("outcome", "").upper()
                and "target_id" in keywords(node)
                for node in nodes
            )
            if makes_404 and (scoped or logs_denied) and (module, function.name) not in OWN_404:
                copies.append(f"{module}.{function.name} (line {function.lineno})")
    assert not copies, "use accounts.access.tenant_object_get:\n" + "\n".join(copies)


def test_the_access_helper_check_sees_its_users():
    """The check above reads the functions that reach rows through the helper (so it cannot pass
    by reading nothing), and each of the five kinds of rows goes through it."""
    users = {
        f"{module}.{function.name}"
        for module in MODULES
        for function in functions(module)
        if any(called(node) == "tenant_object_get" for node in ast.walk(function))
    }
    assert {
        "recognition.selectors.image_get",
        "recognition.selectors.study_get",
        "recognition.selectors.review_get",
        "recognition.job_selectors.batch_job_get",
        "accounts.selectors.membership_get",
    } <= users


def member_shaped(found: dict[str, str]) -> bool:
    """``user=x.user, tenant=x.tenant``: the same member's user and hospital."""
    user, tenant = found.get("user", ""), found.get("tenant", "")
    return user.endswith(".user") and tenant.endswith(".tenant") and user[: -len(".user")] == tenant[: -len(".tenant")]


def test_a_members_action_is_recorded_through_one_wrapper():
    """``access_event_record(user=m.user, tenant=m.tenant, …)`` is accounts.access.member_action_record;
    accounts.services keeps the writer itself and ``require`` (below the helper, it cannot use it)."""
    copies = [
        f"{module} line {node.lineno}"
        for module in MODULES
        if module not in ("accounts.access", "accounts.services")
        for node in ast.walk(ast.parse(MODULES[module].read_text()))
        if called(node) == "access_event_record" and member_shaped(keywords(node))
    ]
    assert not copies, "use accounts.access.member_action_record:\n" + "\n".join(copies)


def pushed_kinds() -> set[str]:
    """The message types accounts.events.PUSHED defines."""
    for node in ast.walk(ast.parse(MODULES["accounts.events"].read_text())):
        if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", None) == "PUSHED":
            return set(ast.literal_eval(node.value))
    raise AssertionError("accounts.events has no PUSHED")


def test_push_messages_are_defined_in_one_module():
    """A message for the browsers (``{"type": "result.ready", …}``) is built in accounts.events
    only: elsewhere a dict with a dotted string "type" is a new copy of one."""
    kinds = pushed_kinds()
    assert {"result.ready", "heatmap.ready", "study.updated", "job.progress"} <= kinds
    copies = [
        f"{module} line {node.lineno}: {ast.unparse(node)[:80]}"
        for module in MODULES
        if module != "accounts.events"
        for node in ast.walk(ast.parse(MODULES[module].read_text()))
        if isinstance(node, ast.Dict)
        for key, value in zip(node.keys, node.values, strict=True)
        if isinstance(key, ast.Constant)
        and key.value == "type"
        and isinstance(value, ast.Constant)
        and (value.value in kinds or value.value == "access.revoked")
    ]
    assert not copies, "define it in accounts.events:\n" + "\n".join(copies)


def test_the_consumer_forwards_every_pushed_message_through_one_method():
    """Each type PUSHED names has its handler on the events consumer, and that handler is
    ``forward`` (Channels calls the method named after the type, dots as underscores)."""
    tree = ast.parse(MODULES["recognition.consumers"].read_text())
    (consumer,) = [node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == "EventsConsumer"]
    aliases: dict[str, str] = {}
    for node in consumer.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Name):
            aliases.update({target.id: node.value.id for target in node.targets if isinstance(target, ast.Name)})
    methods = {node.name for node in consumer.body if isinstance(node, ast.FunctionDef)}
    for kind in pushed_kinds():
        handler = kind.replace(".", "_")
        assert aliases.get(handler) == "forward", f"{kind}: {handler} is not forward"
        assert handler not in methods, f"{kind} has a method of its own"
