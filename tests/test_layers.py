"""The layers stay apart: contract/ is shared by training and serving, which never import each
other; the client library and bench/ stay out of the server's and the tests' way."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# package -> top-level packages of this project it must not import
FORBIDDEN = {
    "contract": {"training", "serving", "classifier_client", "bench", "testkit", "tests"},
    "training": {"serving", "classifier_client", "bench", "testkit", "tests"},
    "serving": {"training", "classifier_client", "bench", "testkit", "tests"},
    "classifier_client": {"training", "contract", "bench", "testkit", "tests"},
    "bench": {"tests"},
    "testkit": {"tests", "bench", "stage"},
    "stage": {"tests", "bench", "training", "classifier_client"},
}


def imported_packages(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.add(node.module.split(".")[0])
    return out


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_imports_across_layers(package):
    bad = {str(p.relative_to(ROOT)): sorted(imported_packages(p) & FORBIDDEN[package])
           for p in (ROOT / package).rglob("*.py") if "gen" not in p.parts}
    assert not {k: v for k, v in bad.items() if v}, bad


def test_the_gateway_runs_without_the_training_package():
    import subprocess
    import sys

    code = ("import sys; sys.modules.update(training=None, tensorflow=None, keras=None); "
            "import serving.__main__, serving.backends.tfserving")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
