"""Import boundaries from ARCHITECTURE.md: heavy dependencies stay in their one module and load only when used."""

import subprocess
import sys

import pytest

HEAVY = ("highway_env", "ray", "hydra", "matplotlib", "torch", "onnxruntime")


@pytest.mark.parametrize(("module", "allowed"), [
    ("drive_mbrl", ()),
    ("drive_mbrl.types", ()),
    ("drive_mbrl.config", ()),
    ("drive_mbrl.evaluate", ()),
    ("drive_mbrl.tracking", ()),
    ("drive_mbrl.data", ()),
    ("drive_mbrl.cli", ()),
    ("drive_mbrl.onboard", ()),
    ("drive_mbrl.features", ()),
    ("drive_mbrl.planning", ("torch",)),
    ("drive_mbrl.policy", ("torch",)),
    ("drive_mbrl.distill", ("torch",)),
    ("drive_mbrl.imagination", ("torch",)),
    ("drive_mbrl.rllib", ("torch", "ray")),
    ("drive_mbrl.replay", ()),
    ("drive_mbrl.plots", ()),
])
def test_importing_a_module_pulls_in_no_heavy_dependency(module, allowed):
    code = (f"import sys, {module}; heavy = {HEAVY!r}; allowed = {allowed!r}; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy and m.split('.')[0] not in allowed))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", f"{module} imports {out.strip()}"
