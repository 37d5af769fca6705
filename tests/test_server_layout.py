"""The local API's package stays small and thin: no module over 450 lines, routes apart."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import engine.server

SERVER = Path(engine.server.__file__).parent
LIMIT = 450


def test_every_server_module_is_under_the_limit() -> None:
    sizes = {str(p.relative_to(SERVER)): len(p.read_text().splitlines())
             for p in sorted(SERVER.rglob("*.py"))}
    assert "app.py" in sizes and any(name.startswith("routes/") for name in sizes)
    assert {name: n for name, n in sizes.items() if n >= LIMIT} == {}
    assert sizes["app.py"] < LIMIT // 3  # the app only wires


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_the_job_queue_knows_nothing_of_http() -> None:
    import engine.jobqueue

    found = _imports(Path(engine.jobqueue.__file__))
    assert not {n for n in found if n.split(".")[0] in ("fastapi", "starlette", "uvicorn")
                or n.startswith("engine.server")}
    code = ("import sys, engine.jobqueue; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('fastapi', 'starlette', 'uvicorn') or m.startswith('engine.server')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, check=True)
    assert out.stdout.strip() == "[]"


def test_routes_are_routers_and_the_app_only_wires() -> None:
    for path in sorted((SERVER / "routes").glob("*.py")):
        if path.name != "__init__.py":
            assert "APIRouter" in path.read_text(), path
    app = (SERVER / "app.py").read_text()
    assert "@app." not in app and ".get(\"/" not in app and ".post(\"/" not in app
