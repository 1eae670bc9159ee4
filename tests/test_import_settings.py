"""``import gohgraph`` turns on PyTorch's huge-page allocation for large CPU tensors, but only
when it can still take effect (torch not imported yet) and never over the user's own setting."""

import os
import subprocess
import sys

PRINT_SETTING = "import os; {imports}; print(os.environ.get('THP_MEM_ALLOC_ENABLE'))"


def _setting_after(imports: str, env_value=None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if env_value is not None:
        env["THP_MEM_ALLOC_ENABLE"] = env_value
    result = subprocess.run([sys.executable, "-c", PRINT_SETTING.format(imports=imports)],
                            env=env, capture_output=True, text=True, check=True)
    return result.stdout.strip()


def test_gohgraph_first_enables_huge_pages():
    assert _setting_after("import gohgraph") == "1"


def test_an_explicit_setting_wins():
    assert _setting_after("import gohgraph", env_value="0") == "0"


def test_torch_first_leaves_the_environment_alone():
    # PyTorch has read the variable already; setting it now would only mislead
    assert _setting_after("import torch; import gohgraph") == "None"
