"""The package's layering, checked on the source: op modules build on the fused-row framework and
the private launcher modules, never on each other, and the fused path keeps its own reduction
(the references' reduction helpers are the tests' oracle, so the fused path must not share
them)."""

import ast
import pathlib

import pytest

import fastkd

PACKAGE = pathlib.Path(fastkd.__file__).parent
OPS = PACKAGE / "ops"
OP_MODULES = sorted(p.stem for p in OPS.glob("*.py") if not p.stem.startswith("_"))


def _imports(path: pathlib.Path) -> list[tuple[int, str, list[str]]]:
    """(level, module, names) of every ``from ... import`` in ``path``."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            out.append((node.level, node.module or "", [a.name for a in node.names]))
    return out


@pytest.mark.parametrize("module", OP_MODULES)
def test_op_modules_do_not_import_each_other(module):
    for level, name, _ in _imports(OPS / f"{module}.py"):
        if level == 1:
            assert name.split(".")[0] not in OP_MODULES, f"ops/{module}.py imports .{name}"
        if level == 0 and name.startswith("fastkd.ops."):
            assert name.split(".")[2] not in OP_MODULES, f"ops/{module}.py imports {name}"


@pytest.mark.parametrize(
    "path",
    sorted(OPS.glob("*.py")) + sorted((PACKAGE / "ot").glob("*.py")),
    ids=lambda p: f"{p.parent.name}/{p.name}",
)
def test_fused_path_keeps_its_own_reduction(path):
    for _, name, names in _imports(path):
        if name.endswith("reference.kd_loss"):
            assert not {"reduce_rows", "reduce_total"} & set(names), (
                f"{path.name} imports the reference's reduction"
            )
