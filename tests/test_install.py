"""Installing largebatch into an environment that has PyTorch and nothing else (no TensorFlow,
Keras, Horovod, MPI bindings or matplotlib): the package installs with pip from pyproject.toml,
``largebatch doctor`` says what is usable and exits 0, ``largebatch run --launcher torchrun``
trains two ranks, and ``largebatch report`` says in one line what the PNGs need.

The environment is a fresh venv; the torch-only packages come from this test environment's own
installations (linked into a folder on its path, as pip would have unpacked them), so the test
needs no network and no wheel downloads."""
import os
import shutil
import subprocess
import sys
import venv
from importlib.metadata import distribution
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# largebatch[torch]'s runtime: torch and what it requires, and the core's own dependencies
TORCH_ONLY = ("torch", "numpy", "PyYAML", "tqdm", "pillow", "filelock", "fsspec", "jinja2", "MarkupSafe", "mpmath",
              "networkx", "sympy", "typing_extensions")


def _link_distributions(names, site):
    """Link each distribution's top-level files and folders (its .dist-info included) into ``site``."""
    site.mkdir()
    for name in names:
        dist = distribution(name)
        top = {Path(str(f)).parts[0] for f in dist.files or () if not str(f).startswith("..")}
        for part in top:
            source = Path(dist.locate_file(part))
            if source.exists() and not (site / part).exists():
                (site / part).symlink_to(source)


@pytest.fixture(scope="module")
def torch_only(tmp_path_factory):
    """(venv's bin folder, environment) of a fresh venv with torch only and largebatch pip-installed."""
    base = tmp_path_factory.mktemp("torch_only")
    env_dir = base / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    _link_distributions(TORCH_ONLY, base / "torch_site")
    (site / "torch_only.pth").write_text(str(base / "torch_site") + "\n")
    # torch's console script, as pip would have written it for this venv
    torchrun = env_dir / "bin" / "torchrun"
    torchrun.write_text(f"#!{python}\nimport sys\nfrom torch.distributed.run import main\nsys.exit(main())\n")
    torchrun.chmod(0o755)
    # build from a copy of the sources, so that nothing is written into the checkout
    src = base / "src"
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("largebatch", "frameworks", "launchers"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    env = {"PATH": f"{env_dir / 'bin'}:/usr/bin:/bin", "HOME": str(base), "PYTHONUNBUFFERED": "1",
           "PIP_DISABLE_PIP_VERSION_CHECK": "1", "TMPDIR": str(base), "OMP_NUM_THREADS": "1"}
    # the wheel is built here (this environment has the build tools), then installed there
    wheel = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                            "-w", str(base / "dist"), str(src)], capture_output=True, text=True, timeout=300,
                           env={**os.environ, "TMPDIR": str(base)})
    assert wheel.returncode == 0, wheel.stdout[-2000:] + wheel.stderr[-2000:]
    (built,) = (base / "dist").glob("largebatch-*.whl")
    pip = subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", str(built)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert pip.returncode == 0, pip.stdout[-2000:] + pip.stderr[-2000:]
    return env_dir / "bin", env, base


def _run(bin_dir, env, cwd, *args, timeout=300):
    return subprocess.run([str(bin_dir / "largebatch"), *args], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=timeout)


def test_the_torch_only_environment_has_no_tensorflow_horovod_or_matplotlib(torch_only):
    bin_dir, env, _ = torch_only
    code = ("import importlib.util as u; print([m for m in ('torch', 'tensorflow', 'keras', 'horovod', 'matplotlib') "
            "if u.find_spec(m)])")
    out = subprocess.run([str(bin_dir / "python"), "-c", code], capture_output=True, text=True, env=env).stdout
    assert out.strip() == "['torch']"


def test_doctor_in_a_torch_only_environment_says_what_is_usable(torch_only):
    bin_dir, env, base = torch_only
    proc = _run(bin_dir, env, base, "doctor")
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert "engines usable  torch + torchrun\n" in out
    assert "note: tensorflow not installed: Keras runs unavailable (pip install 'largebatch[keras]')" in out
    assert "note: horovod not installed: horovodrun, mpirun and srun launches unavailable" in out
    assert "PROBLEM" not in out and out.rstrip().endswith("stack OK (usable: torch + torchrun)")


@pytest.mark.multirank
def test_a_torch_only_environment_trains_two_ranks_under_torchrun_and_reports(torch_only):
    bin_dir, env, base = torch_only
    work = base / "work"
    work.mkdir()
    proc = _run(bin_dir, env, work, "run", str(ROOT / "examples" / "synthetic_torch.yaml"), "--np", "2",
                "--launcher", "torchrun", "output.run_dir=run")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "run dir: " in out and "(completed, 64 steps" in out
    # the ranks ran this environment's largebatch, not the checkout's
    assert "Traceback" not in out
    assert "largebatch: output.tensorboard: no event file: the tensorboard package is not installed" in out
    report = _run(bin_dir, env, work, "report", "run")
    assert report.returncode == 2
    assert report.stderr.strip() == ("largebatch report: the PNGs need matplotlib, which is not installed (pip install "
                                     "matplotlib, or largebatch[report]); --no-plots prints the summary alone")
    summary = _run(bin_dir, env, work, "report", "run", "--no-plots")
    assert summary.returncode == 0 and "synthetic_torch" in summary.stdout, summary.stdout + summary.stderr
