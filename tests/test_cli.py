"""The `largebatch` command: validate, run --dry-run (horovodrun, mpirun, srun), errors."""
import os
import shlex
import shutil
import subprocess
import sys

import pytest
import yaml

from largebatch import cli


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "exp.yaml").write_text("framework: torch\noptimizer: lars\nbatch: {per_worker: 16}\n")
    return tmp_path


def listing(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_no_arguments_prints_usage_and_exits_2(capsys):
    assert cli.main([]) == 2
    assert "usage: largebatch" in capsys.readouterr().err
    assert cli.main(["--help"]) == 0
    assert "largebatch {run,validate,sbatch,doctor,bench,report}" in capsys.readouterr().out


def test_validate_ok(workdir, capsys):
    assert cli.main(["validate", "exp.yaml", "--np", "2"]) == 0
    out = capsys.readouterr().out
    assert out == ("ok: exp: torch small_cnn on synthetic data, lars, global batch 32 = 16 per worker × 2 ranks × "
                   "1 accumulation, peak lr 0.0125 (linear from 0.1 at 256), poly 2 decay, 1 epoch\n")


def test_validate_print_gives_the_resolved_yaml(workdir, capsys):
    assert cli.main(["validate", "exp.yaml", "--print", "optimizer=lamb"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["optimizer"]["name"] == "lamb" and resolved["derived"]["global_batch"] == 16
    assert resolved["source"]["overrides"] == ["optimizer=lamb"]


def test_validate_errors_one_line_each_exit_2_nothing_written(workdir, capsys):
    before = listing(workdir)
    code = cli.main(["validate", "exp.yaml", "optimizer.trust_coefficient=abc", "batch.global=63", "--np", "2"])
    assert code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines() == [
        "optimizer.trust_coefficient: expected a number > 0, got 'abc'",
        "batch.global: expected batch.per_worker × launcher.np × batch.accumulation_steps = 16 × 2 × 1 = 32, got 63"]
    assert listing(workdir) == before


def test_run_with_a_bad_experiment_writes_nothing(workdir, capsys):
    before = listing(workdir)
    assert cli.main(["run", "exp.yaml", "schedule.warmup=linear"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "schedule.warmup: expected one of 'gradual', 'constant', 'none', got 'linear'"]
    assert listing(workdir) == before


def test_missing_experiment_file(workdir, capsys):
    assert cli.main(["run", "nope.yaml", "--dry-run"]) == 2
    assert capsys.readouterr().err == "nope.yaml: no such file\n"


def test_dry_run_horovodrun(workdir, capsys):
    before = listing(workdir)
    assert cli.main(["run", "exp.yaml", "--np", "2", "--dry-run", "launcher.threads_per_rank=1"]) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert len(lines) == 1
    words = shlex.split(lines[0])
    assert words[:5] == ["OMP_NUM_THREADS=1", "MKL_NUM_THREADS=1", "OPENBLAS_NUM_THREADS=1",
                         "TF_NUM_INTRAOP_THREADS=1", "TF_NUM_INTEROP_THREADS=1"]
    i = next(k for k, w in enumerate(words) if w.endswith("horovodrun"))
    argv = words
    assert argv[i + 1:i + 6] == ["-np", "2", "-H", "localhost:2", "--mpi"]
    program = argv[i + 6:]
    assert program[1:] == ["-m", "largebatch.runner", str(workdir / "exp.yaml"), "launcher.threads_per_rank=1",
                           "launcher.np=2", f"output.run_dir={workdir / 'runs' / 'exp'}"]
    assert "run dir:" in captured.err and "(not created: --dry-run)" in captured.err
    assert "threads per rank: 1 intra-op, 1 inter-op" in captured.err
    assert listing(workdir) == before


def test_dry_run_mpirun_equivalent(workdir, capsys):
    assert cli.main(["run", "exp.yaml", "--np", "4", "--launcher", "mpirun", "-H", "a:2,b:2", "--dry-run",
                     "launcher.cores_per_host=16", "launcher.binding=core"]) == 0
    argv = shlex.split(capsys.readouterr().out)
    assert argv[0].endswith("mpirun")
    assert argv[1:11] == ["--allow-run-as-root", "--tag-output", "-np", "4", "-H", "a:2,b:2",
                          "-bind-to", "core", "-map-by", "slot:PE=8"]
    joined = " ".join(argv)
    assert "-mca pml ob1 -mca btl ^openib" in joined
    assert "-x OMP_NUM_THREADS=8" in joined and "-x OMP_PROC_BIND=close" in joined
    assert "-m largebatch.runner" in joined and "launcher.type=mpirun" in joined


def test_dry_run_srun(workdir, capsys):
    assert cli.main(["run", "exp.yaml", "--np", "8", "--launcher", "srun", "--dry-run",
                     "launcher.ranks_per_host=4", "launcher.cores_per_host=32"]) == 0
    argv = shlex.split(capsys.readouterr().out)
    assert argv[0].endswith("srun")
    assert argv[1:6] == ["--ntasks=8", "--nodes=2", "--ntasks-per-node=4", "--cpus-per-task=8", "--cpu-bind=none"]
    assert argv[6] == "--mpi=pmix"          # the plugin that works with Open MPI 4.1 and Slurm 22.05
    assert argv[7].startswith("--export=ALL,") and "OMP_NUM_THREADS=8" in argv[7]


def test_run_dir_is_made_unique(workdir, capsys):
    (workdir / "runs" / "exp").mkdir(parents=True)
    assert cli.main(["run", "exp.yaml", "--dry-run"]) == 0
    assert f"output.run_dir={workdir / 'runs' / 'exp-2'}" in capsys.readouterr().out
    assert cli.main(["run", "exp.yaml", "--dry-run", "output.run_dir=here"]) == 0
    assert f"output.run_dir={workdir / 'here'}" in capsys.readouterr().out


def test_hostfile_flag(workdir, capsys):
    (workdir / "hosts").write_text("n1 slots=2\nn2 slots=2\n")
    assert cli.main(["run", "exp.yaml", "--hostfile", "hosts", "--dry-run"]) == 0
    argv = shlex.split(capsys.readouterr().out)
    i = next(k for k, w in enumerate(argv) if w.endswith("horovodrun"))
    assert argv[i + 1:i + 5] == ["-np", "4", "--hostfile", str(workdir / "hosts")]


@pytest.mark.skipif(shutil.which("srun") is not None, reason="srun is installed here")
def test_missing_launcher_executable(workdir, capsys):
    before = listing(workdir)
    assert cli.main(["run", "exp.yaml", "--launcher", "srun"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == \
        "launcher.type: 'srun' not found on PATH (install it, or choose another launcher.type)"
    assert listing(workdir) == before


@pytest.mark.parametrize("argv, message", [
    (["run", "exp.yaml", "--np", "0"], "--np: expected an integer > 0, got 0"),
    (["run", "exp.yaml", "--np", "two"],
     "largebatch run: argument --np: invalid int value: 'two' (see largebatch run --help)"),
    (["run", "exp.yaml", "--launcher", "jsrun"],
     "largebatch run: argument --launcher: invalid choice: 'jsrun' (choose from 'horovodrun', 'mpirun', 'srun') "
     "(see largebatch run --help)"),
    (["validate"], "largebatch validate: the following arguments are required: EXP.yaml, key.sub=value "
                   "(see largebatch validate --help)"),
    (["frob"], "largebatch: unknown command 'frob'; expected one of run, validate, sbatch, doctor, bench, report"),
])
def test_usage_errors_are_one_line_exit_2(workdir, capsys, argv, message):
    try:
        code = cli.main(argv)
    except SystemExit as exit_:        # argparse's own errors
        code = exit_.code
    assert code == 2
    assert capsys.readouterr().err.splitlines() == [message]


def test_bench_dispatches_to_largebatch_bench_main(monkeypatch):
    import types
    seen = []
    module = types.ModuleType("largebatch.bench")
    module.main = lambda argv: seen.append(argv) or 0
    monkeypatch.setitem(sys.modules, "largebatch.bench", module)
    import largebatch
    monkeypatch.setattr(largebatch, "bench", module, raising=False)
    assert cli.main(["bench", "scaling", "--np", "2"]) == 0
    assert seen == [["scaling", "--np", "2"]]


def test_doctor_is_dispatched(monkeypatch):
    from largebatch import doctor
    seen = []
    monkeypatch.setattr(doctor, "main", lambda argv: seen.append(argv) or 0)
    assert cli.main(["doctor", "--quick"]) == 0
    assert seen == [["--quick"]]


def test_console_entry_point_has_no_traceback(workdir):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [
        str(__import__("pathlib").Path(cli.__file__).resolve().parents[1]), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-m", "largebatch.cli", "validate", "exp.yaml", "optimizer.momentum=2"],
                          capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr == "optimizer.momentum: expected a number in [0, 1), got 2.0\n"
    assert proc.stdout == ""
