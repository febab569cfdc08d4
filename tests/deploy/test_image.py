"""The container image, checked without Docker: the project's wheel is built for real and inspected, the Dockerfile,
.dockerignore and the runtime lock file are parsed.
"""

from __future__ import annotations

import ast
import json
import re
import shlex
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.deploy.manifests import (
    BASE,
    ROOT,
    all_containers,
    render,
)

DEV_TOOLS = {"pytest", "ruff", "mypy", "locust", "hypothesis", "hatchling", "grpcio-tools", "py-spy", "buf-bin"}


# ---------------------------------------------------------------------------------------------------------------
# The container image: the wheel, the Dockerfile, .dockerignore, the runtime lock
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    """The project's wheel, built the way the Dockerfile builds it."""
    out = tmp_path_factory.mktemp("wheel")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet", "-w", str(out), "."],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    [built] = out.glob("redemption_gateway-*.whl")
    return zipfile.ZipFile(built)


def test_wheel_has_the_runtime_files_and_no_dev_stack_or_tests(wheel: zipfile.ZipFile) -> None:
    names = set(wheel.namelist())
    assert not [n for n in names if n.startswith(("gateway/dev/", "tests/", "loadtest/", "scripts/"))]
    lua = {path.name for path in (ROOT / "gateway" / "lua").glob("*.lua")}
    assert lua and {f"gateway/lua/{name}" for name in lua} <= names
    migrations = {path.name for path in (ROOT / "gateway" / "db" / "migrations").glob("*.sql")}
    assert migrations and {f"gateway/db/migrations/{name}" for name in migrations} <= names
    generated = {
        str(path.relative_to(ROOT))
        for path in (ROOT / "gateway" / "pb").rglob("*")
        if path.suffix in (".py", ".pyi") and "__pycache__" not in path.parts
    }
    assert any(name.endswith("_pb2.py") for name in generated) and any(
        name.endswith("_pb2_grpc.py") for name in generated
    )
    assert generated <= names
    assert {"gateway/cli.py", "risk/engine.py"} <= names
    [entry_points] = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    assert "rgw = gateway.cli:main" in wheel.read(entry_points).decode()


def test_no_module_in_the_wheel_imports_the_dev_stack(wheel: zipfile.ZipFile) -> None:
    offenders = []
    for name in wheel.namelist():
        if not name.endswith(".py"):
            continue
        for node in ast.walk(ast.parse(wheel.read(name), filename=name)):
            modules = []
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                modules = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
            if any(m == "gateway.dev" or m.startswith("gateway.dev.") for m in modules):
                offenders.append(name)
    assert offenders == [], "the image has no gateway.dev"


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with comments dropped and continuation lines joined."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        instruction, _, arguments = (pending + line).strip().partition(" ")
        instructions.append((instruction.upper(), arguments.strip()))
        pending = ""
    assert not pending, "the Dockerfile ends in a continuation line"
    return instructions


def dockerfile_stages() -> list[tuple[str, str, list[tuple[str, str]]]]:
    """(image, stage name, instructions) per FROM, with ARG defaults given before the first FROM substituted."""
    args: dict[str, str] = {}
    stages: list[tuple[str, str, list[tuple[str, str]]]] = []
    for instruction, arguments in dockerfile_instructions():
        if instruction == "ARG" and not stages:
            name, _, default = arguments.partition("=")
            args[name] = default
        elif instruction == "FROM":
            words = arguments.split()
            words = [w for w in words if not w.startswith("--platform")]
            image = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args[m.group(1) or m.group(2)], words[0])
            assert len(words) == 3 and words[1].upper() == "AS", f"unnamed stage: FROM {arguments}"
            stages.append((image, words[2], []))
        else:
            assert stages or instruction in ("ARG",), instruction
            stages[-1][2].append((instruction, arguments))
    return stages


def test_dockerfile_is_multi_stage_and_the_runtime_gets_only_the_venv() -> None:
    stages = dockerfile_stages()
    assert len(stages) >= 2
    names = [name for _, name, _ in stages]
    image, _, instructions = stages[-1]
    assert image == "python:3.11-slim"
    assert all(stage_image == "python:3.11-slim" for stage_image, _, _ in stages), "the venv needs the same Python"
    copies = [args for instruction, args in instructions if instruction in ("COPY", "ADD")]
    assert copies, "the runtime stage copies the venv"
    for args in copies:
        words = args.split()
        assert words[0].startswith("--from=") and words[0].removeprefix("--from=") in names[:-1], args
        assert words[1:] == ["/opt/venv", "/opt/venv"], args
    runs = " ".join(args for instruction, args in instructions if instruction == "RUN")
    assert not re.search(r"\bpip\b|\buv\b|apt-get install", runs), "nothing is installed into the runtime stage"


def test_dockerfile_builder_installs_hash_checked_locks_and_the_wheel() -> None:
    stages = dockerfile_stages()
    builder = " ".join(args for _, _, instructions in stages[:-1] for i, args in instructions if i == "RUN")
    installs = [shlex.split(cmd) for cmd in re.split(r"&&|;", builder) if re.search(r"\bpip\b.*\binstall\b", cmd)]
    locked = [words for words in installs if "-r" in words]
    assert {words[words.index("-r") + 1] for words in locked} == {"requirements.lock", "requirements-runtime.lock"}
    assert all("--require-hashes" in words for words in locked)
    # The runtime venv gets the runtime lock only (the dev lock is for the throw-away build venv).
    runtime = [w for w in locked if "/opt/venv/bin/python" in w]
    assert [w[w.index("-r") + 1] for w in runtime] == ["requirements-runtime.lock"]
    assert re.search(r"pip wheel --no-deps --no-build-isolation", builder)
    assert re.search(r"--python /opt/venv/bin/python install --no-deps /wheels/\*\.whl", builder)
    assert "--group" not in builder and "-e ." not in builder


def test_dockerfile_runs_rgw_as_a_numeric_non_root_user() -> None:
    instructions = dockerfile_stages()[-1][2]
    users = [args for instruction, args in instructions if instruction == "USER"]
    assert users, "no USER: the image would run as root"
    user, _, group = users[-1].partition(":")
    assert user.isdigit() and int(user) > 0, "USER must be numeric (runAsNonRoot can only verify a number)"
    assert not group or (group.isdigit() and int(group) > 0)
    # The Kubernetes manifests run as that very user.
    for _, template, container in all_containers(render(BASE)):
        context = {**template["spec"].get("securityContext", {}), **container.get("securityContext", {})}
        assert context["runAsUser"] == int(user)
    commands = dict((i, a) for i, a in instructions if i in ("ENTRYPOINT", "CMD"))
    assert json.loads(commands["ENTRYPOINT"]) == ["rgw"]
    assert json.loads(commands["CMD"]) == ["serve"]
    exposed = {int(port.split("/")[0]) for i, a in instructions if i == "EXPOSE" for port in a.split()}
    assert exposed >= {50051, 9108}
    all_args = " ".join(a for _, _, stage in dockerfile_stages() for i, a in stage if i in ("COPY", "ADD"))
    assert "gateway/dev" not in all_args and "tests" not in all_args.split()


def dockerignored(path: str) -> bool:
    """Whether Docker leaves `path` out of the build context (last matching pattern wins; a pattern that matches a
    parent directory matches everything under it)."""
    excluded = False
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        pattern = line.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negated = pattern.startswith("!")
        pattern = pattern.removeprefix("!").strip("/")
        regex = "".join(
            ".*" if part == "**" else "[^/]*" if part == "*" else "[^/]" if part == "?" else re.escape(part)
            for part in re.split(r"(\*\*|\*|\?)", pattern)
        )
        parts = path.split("/")
        if any(re.fullmatch(regex, "/".join(parts[:i])) for i in range(1, len(parts) + 1)):
            excluded = not negated
    return excluded


def test_dockerignore_sends_only_what_the_build_copies() -> None:
    for path in (
        "tests/conftest.py",
        "gateway/dev/run.py",
        ".venv/bin/python",
        ".git/HEAD",
        "loadtest/run_loadtest.py",
        "deploy/k8s/base/kustomization.yaml",
        ".local/code-keys",
        "gateway/__pycache__/cli.cpython-311.pyc",
    ):
        assert dockerignored(path), path
    copied = [
        args.split()[:-1]
        for _, _, stage in dockerfile_stages()
        for instruction, args in stage
        if instruction in ("COPY", "ADD") and not args.startswith("--from")
    ]
    for sources in copied:
        for source in sources:
            paths = (
                [source]
                if (ROOT / source).is_file()
                else [str(p.relative_to(ROOT)) for p in (ROOT / source).rglob("*.py")]
            )
            assert paths
            for path in paths:
                if "/dev/" not in path and "__pycache__" not in path:
                    assert not dockerignored(path), f"{path} is copied but not in the build context"
    assert not dockerignored("gateway/lua/redeem.lua") and not dockerignored("gateway/db/migrations/0001_x.sql")


def lock_pins(path: Path) -> dict[str, str]:
    text = path.read_text()
    pins = dict(re.findall(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", text, flags=re.MULTILINE))
    # Every pinned requirement has hashes (pip --require-hashes).
    blocks = re.split(r"\n(?=[A-Za-z0-9])", text.strip())
    assert all("--hash=sha256:" in block for block in blocks), f"{path.name}: a requirement without hashes"
    return {canonicalize_name(name): version for name, version in pins.items()}


def test_runtime_lock_has_the_runtime_dependencies_only() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    runtime = lock_pins(ROOT / "requirements-runtime.lock")
    full = lock_pins(ROOT / "requirements.lock")
    dependencies = {canonicalize_name(Requirement(r).name) for r in project["project"]["dependencies"]}
    dev = {canonicalize_name(Requirement(r).name) for r in project["dependency-groups"]["dev"]}
    assert dependencies <= set(runtime)
    assert not (dev | DEV_TOOLS) & set(runtime), (dev | DEV_TOOLS) & set(runtime)
    # The image runs the very versions the tests run.
    assert {name: full.get(name) for name in runtime} == runtime
    assert "requirements-runtime.lock" in (ROOT / "Makefile").read_text().split("\nlock:", 1)[1].split("\n\n")[0]


def test_wheel_leaves_out_gateway_dev_but_the_editable_install_keeps_it() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["build-system"]["build-backend"] == "hatchling.build"
    assert "gateway/dev" in project["tool"]["hatch"]["build"]["targets"]["wheel"]["exclude"]
    import gateway.dev.run  # noqa: F401 - `make run` and the test fixtures need it
