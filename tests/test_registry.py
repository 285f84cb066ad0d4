"""The layout contract: one home per technique, a core that names none, registration as the only wiring."""

import ast
import dataclasses
import pathlib
from typing import ClassVar

import pytest
import torch
import torch.nn as nn

import effcompile
from effcompile.config import PASS_CONFIGS, PassConfig, config_from_dict, register_config
from effcompile.passes import JOINT_PASSES, PASSES, JointPass, JointResult, ModelPass, register_joint_pass, register_pass
from effcompile.plan import Action, PlanRow

ROOT = pathlib.Path(__file__).resolve().parents[1]
TECHNIQUES = ("decorrelation", "randomized_vjp", "greedy_stages", "sample_selection")


def _code_strings_and_imports(path: pathlib.Path):
    """String constants that are not docstrings, and imported module names, of one source file."""
    tree = ast.parse(path.read_text())
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docstrings.add(id(first.value))
    strings = [n.value for n in ast.walk(tree)
               if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings]
    imports = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    imports += [alias.name for n in ast.walk(tree) if isinstance(n, ast.Import) for alias in n.names]
    return strings, imports


def test_every_technique_is_registered_from_its_own_folder():
    assert set(PASS_CONFIGS) == set(PASSES) == set(TECHNIQUES)
    for name in TECHNIQUES:
        folder = ROOT / "passes" / name
        for required in ("__init__.py", "README.md", "config.py", "rewrite.py"):
            assert (folder / required).is_file(), f"passes/{name}/{required}"
        assert PASS_CONFIGS[name].__module__ == f"effcompile.passes.{name}.config"
        assert type(PASSES[name]).__module__ == f"effcompile.passes.{name}.rewrite"
        assert getattr(effcompile, PASS_CONFIGS[name].__name__) is PASS_CONFIGS[name]
    assert [p.name for p in JOINT_PASSES] == ["row_sparse_backward", "randomized_vjp"]  # exact first, then sampled


def test_the_core_names_no_technique():
    """No technique name in the core's code (docstrings may give examples) and no import of a technique."""
    offenders = []
    for path in sorted((ROOT / "effcompile").rglob("*.py")):
        strings, imports = _code_strings_and_imports(path)
        offenders += [f"{path.relative_to(ROOT)}: string {s!r}" for s in strings if any(t in s for t in TECHNIQUES)]
        offenders += [f"{path.relative_to(ROOT)}: imports {m}" for m in imports
                      if any(m.startswith(f"effcompile.passes.{t}") or m == t for t in TECHNIQUES)]
    assert offenders == []


def test_no_technique_or_benchmark_module_in_the_core():
    names = {p.stem for p in (ROOT / "effcompile").rglob("*.py")}
    forbidden = {"sketch", "selection", "stage_runtime", "transport", "replay", "aux_heads", "suite"}
    assert not names & forbidden and not [n for n in names if "bench" in n]
    installed = [p for root in ("effcompile", "passes", "models") for p in (ROOT / root).rglob("*.py")]
    assert not [p for p in installed if "bench" in p.stem or p.stem == "suite"]
    assert (ROOT / "benchmarks" / "__main__.py").is_file()


def test_private_torch_imports_only_in_compat():
    offenders = []
    for root in ("effcompile", "passes", "models"):
        for path in sorted((ROOT / root).rglob("*.py")):
            if path.name == "_compat.py":
                continue
            source = path.read_text()
            _, imports = _code_strings_and_imports(path)
            offenders += [f"{path.relative_to(ROOT)}: {m}" for m in imports if m.startswith("torch._")]
            offenders += [f"{path.relative_to(ROOT)}: {attr}" for attr in ("torch._dynamo", "torch._inductor",
                                                                           "_ConvNd", "torch._functorch")
                          if attr in source.replace('"torch._inductor', "").replace("'torch._inductor", "")]
    assert offenders == []


# ------------------------------------------------------------------ a fifth technique, wired by registration only
@dataclasses.dataclass(frozen=True)
class _Scale(PassConfig):
    """Multiplies every planned linear weight's gradient by ``factor`` (a test technique)."""

    name: ClassVar[str] = "test_scale"
    factor: float = 2.0

    def __post_init__(self):
        if not self.factor > 0:
            self._fail("factor", "a real number > 0")


class _ScalePass(ModelPass):
    config_type = _Scale
    onnx_scope_suffixes = ("_test_scale",)

    def plan(self, model, captured, config):
        return [PlanRow(layer=c.layer, pass_name=self.name, action=Action.REWRITE, op=c.uses[0].op)
                for c in captured.layers]

    def apply(self, model, rows, config):
        for row in rows:
            weight = model.get_parameter(f"{row.layer}.weight")
            weight.register_hook(lambda grad, f=config.factor: grad * f)
        model.__dict__["_test_scaled"] = True
        return len(rows)

    def is_applied(self, model):
        return bool(model.__dict__.get("_test_scaled"))

    def fold(self, model):
        model.__dict__.pop("_test_scaled", None)
        return 0

    def refusals(self, model, configs):
        return [PlanRow(layer="<root>", pass_name=self.name, action=Action.REFUSE, reason="factor 3 is refused")
                for c in configs if c.name == self.name and c.factor == 3.0]


class _CountingJointPass(JointPass):
    name, order = "test_count", 99

    def __call__(self, graph):
        return JointResult(sum(1 for n in graph.nodes if n.op == "call_function"))

    def sources(self):
        return [__file__]


@pytest.fixture
def fifth_technique():
    register_config(_Scale)
    register_pass(_ScalePass())
    register_joint_pass(_CountingJointPass())
    yield
    PASSES.pop("test_scale")
    PASS_CONFIGS.pop("test_scale")
    JOINT_PASSES[:] = [p for p in JOINT_PASSES if p.name != "test_count"]


def test_a_fifth_technique_is_wired_everywhere_by_registration(fifth_technique):
    from effcompile.cli import build_configs
    from effcompile.passes.joint import JOINT_PASS, recording

    torch.manual_seed(0)
    model, reference = nn.Sequential(nn.Linear(4, 3)), nn.Sequential(nn.Linear(4, 3))
    reference.load_state_dict(model.state_dict())
    x = torch.randn(8, 4)
    assert build_configs("test_scale", ["test_scale.factor=4"]) == [_Scale(factor=4.0)]  # the CLI knows it
    assert config_from_dict(_Scale(1.5).to_dict()) == _Scale(1.5)
    with pytest.raises(effcompile.plan.PlanRefused, match="factor 3 is refused"):
        effcompile.transform(model, _Scale(3.0), example_inputs=(x,))
    effcompile.transform(model, _Scale(4.0), example_inputs=(x,))
    assert [row.action for row in effcompile.report(model)] == [Action.REWRITE]
    with recording() as log:
        torch.compile(model, backend="effcompile_aot_eager")(x).sum().backward()
    reference(x).sum().backward()
    torch.testing.assert_close(model[0].weight.grad, 4 * reference[0].weight.grad)  # the technique's effect
    assert log and log[-1]["test_count"].rewrites > 0  # its joint pass ran inside the backend
    with_it = JOINT_PASS.uuid()
    JOINT_PASSES[:] = [p for p in JOINT_PASSES if p.name != "test_count"]
    assert JOINT_PASS.uuid() != with_it  # its declared sources are part of the compile cache key
