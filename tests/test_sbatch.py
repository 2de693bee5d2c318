"""sbatch scripts from an experiment (largebatch.launchers.sbatch): the text, pure functions."""
from pathlib import Path
import shlex
import subprocess

import pytest
import yaml

from largebatch.config import load

from largebatch.launchers import sbatch

BASE = {
    "name": "lars small",
    "framework": "torch",
    "model": "small_cnn",
    "data": {"kind": "synthetic", "samples": 256, "val_samples": 64, "image_size": 16},
    "batch": {"per_worker": 8},
    "optimizer": {"name": "lars"},
    "train": {"steps": 8},
    "output": {"checkpoint_every": 0},
    "launcher": {"np": 4, "cores_per_host": 8},
}


def experiment(tmp_path, overrides=(), **launcher):
    doc = {**BASE, "launcher": {**BASE["launcher"], **launcher}}
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(doc))
    return load(str(path), list(overrides))


def sbatch_options(text):
    return [shlex.split(line[len("#SBATCH "):])[0] for line in text.splitlines() if line.startswith("#SBATCH ")]


def srun_argv(text):
    """The srun command of the script as argv (continuation lines joined)."""
    joined = text.replace("\\\n", " ")
    line = next(l for l in joined.splitlines() if l.lstrip().startswith("srun "))
    return shlex.split(line)


def test_default_script_has_the_header_the_layout_and_the_rank_program(tmp_path):
    exp = experiment(tmp_path)
    run_dir = tmp_path / "runs" / "r1"
    text = sbatch.batch_script(exp, str(run_dir), ["train.seed=3"])
    assert text.startswith("#!/bin/bash\n")
    assert sbatch_options(text) == [
        "--job-name=lars_small", "--nodes=1", "--ntasks-per-node=4", "--cpus-per-task=2",
        f"--output={run_dir}/slurm-%j.out", "--open-mode=append", "--signal=TERM@120", "--no-requeue"]
    argv = srun_argv(text)
    assert argv[0] == "srun"
    assert "--ntasks=4" in argv and "--nodes=1" in argv and "--ntasks-per-node=4" in argv
    assert "--cpus-per-task=2" in argv and "--cpu-bind=none" in argv and "--mpi=pmix" in argv
    export = next(a for a in argv if a.startswith("--export="))
    assert export.startswith("--export=ALL,") and "OMP_NUM_THREADS=2" in export
    i = argv.index("-m")
    assert argv[i + 1] == "largebatch.runner"
    assert argv[i + 2:] == [str(tmp_path / "exp.yaml"), "train.seed=3", f"output.run_dir={run_dir}"]
    assert text.rstrip().endswith('exit "$rc"')
    assert "scontrol requeue" not in text


def test_the_script_is_valid_bash(tmp_path):
    for requeue in (False, True):
        text = sbatch.batch_script(experiment(tmp_path), str(tmp_path / "run"), requeue=requeue, time="1:00:00")
        script = tmp_path / "job.sh"
        script.write_text(text)
        assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0


def test_nodes_spread_the_experiment_ranks_and_the_thread_plan_follows(tmp_path):
    text = sbatch.batch_script(experiment(tmp_path), str(tmp_path / "run"), nodes=2)
    opts = sbatch_options(text)
    assert "--nodes=2" in opts and "--ntasks-per-node=2" in opts and "--cpus-per-task=4" in opts
    argv = srun_argv(text)
    assert "--ntasks=4" in argv and "--ntasks-per-node=2" in argv and "--cpus-per-task=4" in argv
    assert not any(a.startswith("--nodelist") for a in argv)      # Slurm chose the nodes
    assert not any(a.startswith("launcher.np=") for a in argv)     # np (and the global batch) kept


def test_layout_from_hosts_or_ranks_per_host(tmp_path):
    text = sbatch.batch_script(experiment(tmp_path, hosts="a:2,b:2"), str(tmp_path / "run"))
    assert {"--nodes=2", "--ntasks-per-node=2"} <= set(sbatch_options(text))
    assert not any(a.startswith("--nodelist") for a in srun_argv(text))
    text = sbatch.batch_script(experiment(tmp_path, type="srun", ranks_per_host=1), str(tmp_path / "run"))
    assert {"--nodes=4", "--ntasks-per-node=1", "--cpus-per-task=8"} <= set(sbatch_options(text))


@pytest.mark.parametrize("nodes, message", [(3, "multiple of the nodes"), (5, "at most launcher.np"),
                                            (0, "positive integer"), ("2", "positive integer")])
def test_bad_node_counts_are_refused(tmp_path, nodes, message):
    with pytest.raises(ValueError, match=message):
        sbatch.batch_script(experiment(tmp_path), str(tmp_path / "run"), nodes=nodes)


@pytest.mark.parametrize("value", ["30", 30, "30:00", "1:30:00", "2-0", "2-12:00", "1-00:30:00"])
def test_time_formats_slurm_accepts(tmp_path, value):
    text = sbatch.batch_script(experiment(tmp_path), str(tmp_path / "run"), time=value, signal_grace=10)
    assert f"--time={value}" in sbatch_options(text)


@pytest.mark.parametrize("value", ["1h", "1:2:3:4", "", "-5", True, "30 min"])
def test_bad_times_are_refused(tmp_path, value):
    with pytest.raises(ValueError, match="time"):
        sbatch.batch_script(experiment(tmp_path), str(tmp_path / "run"), time=value)


def test_signal_grace(tmp_path):
    exp = experiment(tmp_path)
    assert "--signal=TERM@300" in sbatch_options(sbatch.batch_script(exp, "r", signal_grace=300))
    for off in (None, 0):
        assert not any(o.startswith("--signal") for o in sbatch_options(sbatch.batch_script(exp, "r", signal_grace=off)))
    with pytest.raises(ValueError, match="not shorter than the time limit"):
        sbatch.batch_script(exp, "r", time="2", signal_grace=120)       # 2 minutes
    for bad in (-1, 70000, 1.5, "60"):
        with pytest.raises(ValueError, match="signal_grace"):
            sbatch.batch_script(exp, "r", signal_grace=bad)


def test_requeue_resumes_and_requeues_on_the_requeue_exit_code(tmp_path):
    exp = experiment(tmp_path)
    text = sbatch.batch_script(exp, str(tmp_path / "run"), ["train.seed=1"], requeue=True)
    assert "--requeue" in sbatch_options(text) and "--no-requeue" not in sbatch_options(text)
    argv = srun_argv(text)
    assert argv[-3:] == ["train.seed=1", "train.resume=auto", f"output.run_dir={tmp_path / 'run'}"]
    assert f'if [ "$rc" -eq {sbatch.REQUEUE_EXIT_CODE} ]; then' in text
    assert 'scontrol requeue "${SLURM_JOB_ID}"' in text
    # a resume the user chose is kept
    argv = srun_argv(sbatch.batch_script(exp, "run", ["train.resume=/ck/step-8.pt"], requeue=True))
    assert "train.resume=/ck/step-8.pt" in argv and "train.resume=auto" not in argv


def test_mpi_plugin_default_and_launcher_args_win(tmp_path):
    argv = srun_argv(sbatch.batch_script(experiment(tmp_path), "run"))
    assert [a for a in argv if a.startswith("--mpi")] == ["--mpi=pmix"]
    argv = srun_argv(sbatch.batch_script(experiment(tmp_path), "run", mpi=None))
    assert not any(a.startswith("--mpi") for a in argv)
    argv = srun_argv(sbatch.batch_script(experiment(tmp_path, args="--mpi=pmi2 --overlap"), "run"))
    assert [a for a in argv if a.startswith("--mpi")] == ["--mpi=pmi2"] and "--overlap" in argv


def test_site_options(tmp_path):
    text = sbatch.batch_script(experiment(tmp_path), "run", partition="knl", account="proj 1", exclusive=True,
                               cpus_per_task=16, extra_sbatch=["--mem=0", "--constraint=quad"])
    opts = sbatch_options(text)
    assert {"--partition=knl", "--account=proj 1", "--exclusive", "--cpus-per-task=16", "--mem=0",
            "--constraint=quad"} <= set(opts)
    assert "#SBATCH '--account=proj 1'" in text               # quoted as one word
    assert "--cpus-per-task=16" in srun_argv(text) and "--cpus-per-task=2" not in srun_argv(text)
    with pytest.raises(ValueError, match="cpus_per_task"):
        sbatch.batch_script(experiment(tmp_path), "run", cpus_per_task=0)


def test_gloo_controller_is_refused(tmp_path):
    with pytest.raises(ValueError, match="launcher.controller"):
        sbatch.batch_script(experiment(tmp_path, controller="gloo"), "run")


def test_job_names():
    assert sbatch.job_name("my exp/1") == "my_exp_1"
    assert sbatch.job_name("resnet50-8k.v2") == "resnet50-8k.v2"
    assert sbatch.job_name("///") == "largebatch"


def test_largebatch_sbatch_command_prints_writes_and_refuses(tmp_path, capsys, monkeypatch):
    from largebatch.launchers import cli
    monkeypatch.chdir(tmp_path)
    example = str(Path(__file__).resolve().parent.parent / "examples" / "synthetic_torch.yaml")
    run_dir = tmp_path / "runs" / "job"
    assert cli.main(["sbatch", example, "--nodes", "2", "--time", "10", "--dry-run",
                     f"output.run_dir={run_dir}"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("#!/bin/bash\n") and "#SBATCH --nodes=2\n" in text and "#SBATCH --time=10\n" in text
    assert "--mpi=pmix" in text and not run_dir.exists()                       # a dry run writes nothing
    assert cli.main(["sbatch", example, f"output.run_dir={run_dir}"]) == 0
    assert (run_dir / "job.sbatch").read_text().startswith("#!/bin/bash\n")
    assert cli.main(["sbatch", example, "--time", "1:x", "--dry-run"]) == 2
    assert capsys.readouterr().err.strip().endswith(
        "largebatch sbatch: time: expected minutes, HH:MM:SS or D-HH:MM:SS, got '1:x'")
