"""`risk` is the pure core: it must import neither the gateway, nor gRPC / protobuf, nor the Redis or Postgres
clients. Checked on the source (every import statement, also inside functions, and import_module calls)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import risk

RISK_DIR = Path(risk.__file__).parent
FORBIDDEN_ROOTS = ("gateway", "grpc", "redis", "asyncpg")
FORBIDDEN_PACKAGES = ("google.protobuf", "google.rpc")


def forbidden(module: str) -> bool:
    root = module.split(".")[0]
    if root in FORBIDDEN_ROOTS or root.startswith("grpc_"):
        return True
    return any(module == p or module.startswith(p + ".") for p in FORBIDDEN_PACKAGES)


def imported_modules(source: str) -> list[str]:
    """Every module a source imports: `import a.b`, `from a import b` (as a and a.b), `import_module("a")`."""
    names: list[str] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names += [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        elif isinstance(node, ast.Call) and _is_dynamic_import(node.func) and node.args:
            if isinstance(arg := node.args[0], ast.Constant) and isinstance(arg.value, str):
                names.append(arg.value)
    return names


def _is_dynamic_import(func: ast.expr) -> bool:
    name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
    return name in ("import_module", "__import__")


def violations(source: str) -> list[str]:
    return [name for name in imported_modules(source) if forbidden(name)]


@pytest.mark.parametrize("path", sorted(RISK_DIR.rglob("*.py")), ids=lambda p: p.name)
def test_risk_module_imports_nothing_forbidden(path: Path) -> None:
    assert violations(path.read_text(encoding="utf-8")) == []


def test_the_scan_sees_the_risk_modules() -> None:
    scanned = {p.name for p in RISK_DIR.rglob("*.py")}
    assert {"model.py", "keys.py", "policy.py", "geo.py", "engine.py"} <= scanned


@pytest.mark.parametrize(
    "source",
    [
        "import grpc",
        "import grpc.aio as aio",
        "import grpc_status.rpc_status",
        "from gateway import keys",
        "from gateway.service import RedemptionService",
        "import os, redis.asyncio",
        "from asyncpg import Pool",
        "from google.protobuf import message",
        "from google import protobuf",
        "from google.rpc import status_pb2",
        "def later():\n    import gateway.settings\n",
        "import importlib\nimportlib.import_module('redis')",
        "__import__('grpc')",
    ],
)
def test_the_check_fails_on_a_forbidden_import(source: str) -> None:
    assert violations(source)


@pytest.mark.parametrize(
    "source",
    [
        "import math",
        "import shapely\nfrom shapely.geometry import Polygon",
        "from risk import keys\nfrom risk.model import Rule",
        "from . import geo",
        "import redistribute",
        "import gateways_of_the_world",
        "from google_crc32c import value",
    ],
)
def test_the_check_passes_allowed_imports(source: str) -> None:
    assert violations(source) == []


def test_importing_risk_loads_none_of_them() -> None:
    """The import graph at run time, transitive imports included (a fresh interpreter)."""
    code = (
        "import sys, risk.engine, risk.policy, risk.geo\n"
        "print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in ('gateway', 'grpc', 'redis', 'asyncpg')"
        " or m.startswith('google.protobuf'))))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""
