"""The architecture, checked: imports point one way, and no module outgrows its room.

Each module of relay/ sits in a layer; a module may import its own layer and the layers below,
never one above (the store imports no HTTP code, the API neither the poller nor the deliverer).
The simulator imports nothing else of relay. A new module must be given its layer here.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

RELAY = Path(__file__).resolve().parent.parent / "relay"
MAX_LINES = 450

# Lowest first. Pure helpers sit low so anything may use them.
LAYERS: tuple[frozenset[str], ...] = tuple(
    frozenset(names.split())
    for names in (
        "relay relay.errors relay.ids relay.simulator relay.metrics",
        "relay.outages relay.logs relay.cached",
        "relay.config relay.addresses relay.retry relay.schedule relay.signing relay.ratelimit"
        " relay.statuses relay.secretbox relay.quota relay.metadata"
        " relay.batching relay.hostslots",
        "relay.models relay.database relay.migrate",
        "relay.schemas",
        "relay.store",
        "relay.upstream relay.eventstream relay.creator relay.ssecreate relay.resolver"
        " relay.sender",
        "relay.health relay.signals relay.hints relay.draining relay.poller relay.deliverer"
        " relay.sweeps relay.streams",
        "relay.worker",
        "relay.http relay.auth relay.guards",
        "relay.api relay.probes relay.openapi relay.intake relay.dashboard relay.admin",
        "relay.idempotency relay.proxy_request relay.proxy",
        "relay.app",
        "relay.cli_ops",
        "relay.cli",
    )
)
# The API's side and the worker's side are siblings: the API only queues work through the store
# (and kicks a drain through callbacks app.py wires), it never imports what does the work.
API_SIDE = frozenset(
    [
        "relay.http",
        "relay.auth",
        "relay.guards",
        "relay.api",
        "relay.probes",
        "relay.openapi",
        "relay.intake",
        "relay.dashboard",
        "relay.admin",
        "relay.idempotency",
        "relay.proxy_request",
        "relay.proxy",
    ]
)
WORKER_SIDE = frozenset(
    [
        "relay.draining",
        "relay.poller",
        "relay.deliverer",
        "relay.sender",
        "relay.hostslots",
        "relay.worker",
        "relay.sweeps",
        "relay.streams",
    ]
)
HTTP_LIBRARIES = frozenset({"aiohttp", "starlette", "httpx", "uvicorn", "yarl"})


def _module_name(path: Path) -> str:
    parts = path.relative_to(RELAY.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _room(module: str) -> str:
    """The unit the layer table names: a package (relay.store) or a flat module."""
    for package in ("relay.store", "relay.simulator", "relay.migrations"):
        if module == package or module.startswith(package + "."):
            return package
    return module


def _layer(module: str) -> int:
    room = _room(module)
    for index, names in enumerate(LAYERS):
        if room in names:
            return index
    raise AssertionError(f"{room} has no layer in tests/test_layers.py: give it one")


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            # `from relay import store` imports relay.store
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


SOURCES = sorted(p for p in RELAY.rglob("*.py") if "migrations" not in p.parts)


def _relay_modules(imports: set[str]) -> set[str]:
    known = {_module_name(p) for p in SOURCES}
    return {name for name in imports if name in known and name != "relay"}


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(RELAY.parent)))
def test_imports_point_down_only(path: Path) -> None:
    """No module imports one of a higher layer, the API's side nothing of the worker's side,
    and the simulator only itself."""
    module = _module_name(path)
    imported = _relay_modules(_imports(path))
    if _room(module) == "relay.simulator":
        outside = {name for name in imported if _room(name) != "relay.simulator"}
        assert not outside, f"the simulator imports relay modules: {sorted(outside)}"
        return
    own = _layer(module)
    upward = sorted(name for name in imported if _layer(name) > own)
    assert not upward, f"{module} (layer {own}) imports higher layers: {upward}"
    if _room(module) in API_SIDE:
        workers = sorted(name for name in imported if _room(name) in WORKER_SIDE)
        assert not workers, f"{module} (the API's side) imports the worker's side: {workers}"


@pytest.mark.parametrize(
    "path",
    [p for p in SOURCES if _room(_module_name(p)) == "relay.store"],
    ids=lambda p: p.name,
)
def test_the_store_imports_no_http_code(path: Path) -> None:
    """The store talks to the database only."""
    top_level = {name.split(".")[0] for name in _imports(path)}
    assert not top_level & HTTP_LIBRARIES


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(RELAY.parent)))
def test_no_module_outgrows_its_room(path: Path) -> None:
    """Every file under relay/ stays under 450 lines."""
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.name} has {lines} lines"


def test_the_readme_layout_names_every_module() -> None:
    """README's Layout table says what each module owns: a new module gets its line there."""
    readme = (RELAY.parent / "README.md").read_text()
    layout = readme.split("### Layout", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"`([\w/]+)(?:\.py)?`", layout))
    missing = [
        str(path.relative_to(RELAY))
        for path in sorted(RELAY.rglob("*.py"))
        if path.name != "__init__.py"
        and path.stem not in named
        and f"{path.parent.name}/{path.stem}" not in named
    ]
    assert missing == [], f"README's Layout does not name: {missing}"
