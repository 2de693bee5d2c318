"""The `largebatch` command: validate, run --dry-run (horovodrun, mpirun, srun), errors."""
import os
import shlex
import shutil
import subprocess
import sys

import pytest
import yaml

from largebatch.launchers import cli


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
    assert "largebatch {run,validate,sbatch,doctor,bench,report,plan}" in capsys.readouterr().out


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


def test_validate_print_lists_what_the_optimizer_adapts_and_decays(workdir, capsys):
    """After the YAML, as comments: each tensor of the built-in model, adapted or not, decayed or
    not; with the MLPerf exclusion on a BN-free net at a large lr, the warning the run prints."""
    assert cli.main(["validate", "exp.yaml", "--print", "optimizer.weight_decay=1e-4"]) == 0
    out = capsys.readouterr().out
    table = [line for line in out.splitlines() if line.startswith("#")]
    assert table[0] == ("# 8 trainable tensors of small_cnn (torch, with normalisation layers): 8 adapted by lars, "
                        "3 decayed (weight_decay 0.0001)")
    assert table[1].split() == ["#", "features.0.weight", "(32,", "3,", "3,", "3)", "adapted", "decayed"]
    assert table[2].split() == ["#", "features.1.weight", "(32,)", "adapted", "-"]
    assert yaml.safe_load(out)["optimizer"]["name"] == "lars"          # still one YAML document
    assert cli.main(["validate", "exp.yaml", "--print", "model.batch_norm=false", "schedule.base_lr=320",
                     "optimizer.exclude={adaptation: null, decay: null}"]) == 0
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("#")]
    assert table[0].startswith("# 6 trainable tensors of small_cnn (torch, no normalisation layers): 3 adapted")
    assert table[2].split() == ["#", "features.0.bias", "(32,)", "-", "-"]
    assert table[-1].startswith("# warning: LARS: 3 tensor(s) excluded from adaptation (features.0.bias, "
                                "features.4.bias, classifier.bias) step at the global rate 20,")   # 320 × 16/256


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
    i = words.index("largebatch.launchers.hvdrun")          # horovodrun, its build check cached
    assert words[i - 2:i] == [sys.executable, "-m"]
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


def test_dry_run_torchrun_across_hosts(workdir, capsys):
    """One torchrun per host, c10d rendezvous on the first, started by the fan-out over ssh."""
    assert cli.main(["run", "exp.yaml", "--launcher", "torchrun", "-H", "a:2,b:2", "--dry-run",
                     "launcher.cores_per_host=4", "launcher.ssh_port=2222", "launcher.rendezvous_port=29555",
                     "launcher.network_interface=eth1", "launcher.host_timeout=45"]) == 0
    captured = capsys.readouterr()
    words = shlex.split(captured.out)
    env = dict(w.split("=", 1) for w in words[:next(i for i, w in enumerate(words) if "=" not in w)])
    assert env["GLOO_SOCKET_IFNAME"] == "eth1" and env["LARGEBATCH_COLLECTIVE_TIMEOUT_S"] == "45"
    i = words.index("largebatch.launchers.fanout")
    assert words[i + 1:i + 9] == ["-H", "a:2,b:2", "--ssh-port", "2222", "--host-timeout", "45", "--python",
                                  sys.executable]
    torchrun = words[words.index("--") + 1:]
    assert torchrun[0].endswith("torchrun")
    assert torchrun[1:4] == ["--nnodes=2", "--rdzv-backend=c10d", "--rdzv-endpoint=a:29555"]
    assert torchrun[4].startswith("--rdzv-id=") and torchrun[5:8] == ["--max-restarts=0", "--no-python",
                                                                        sys.executable]
    assert "one torchrun per host (--nproc-per-node: a 2, b 2)" in captured.err
    assert "c10d rendezvous at a:29555" in captured.err


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
    i = argv.index("largebatch.launchers.hvdrun")
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
     "largebatch run: argument --launcher: invalid choice: 'jsrun' (choose from 'horovodrun', 'mpirun', 'srun', 'torchrun') "
     "(see largebatch run --help)"),
    (["validate"], "usage: largebatch validate EXP.yaml [options] [key.sub=value ...]: the experiment file is "
                   "required (see largebatch validate --help)"),
    (["run"], "usage: largebatch run EXP.yaml [options] [key.sub=value ...]: the experiment file is required "
              "(see largebatch run --help)"),
    (["run", "--np", "2"], "usage: largebatch run EXP.yaml [options] [key.sub=value ...]: the experiment file is "
                           "required (see largebatch run --help)"),
    (["run", "-np", "2", "exp.yaml"], "largebatch run: unrecognized argument -np (Horovod's spelling); use --np 2"),
    (["run", "exp.yaml", "-np", "4", "--dry-run"],
     "largebatch run: unrecognized argument -np (Horovod's spelling); use --np 4"),
    (["validate", "exp.yaml", "-np=3"], "largebatch validate: unrecognized argument -np (Horovod's spelling); use --np 3"),
    (["frob"], "largebatch: unknown command 'frob'; expected one of run, validate, sbatch, doctor, bench, report, plan"),
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
    module = types.ModuleType("largebatch.launchers.bench")
    module.main = lambda argv: seen.append(argv) or 0
    monkeypatch.setitem(sys.modules, "largebatch.launchers.bench", module)
    import largebatch
    monkeypatch.setattr(largebatch, "bench", module, raising=False)
    assert cli.main(["bench", "scaling", "--np", "2"]) == 0
    assert seen == [["scaling", "--np", "2"]]


def test_doctor_is_dispatched(monkeypatch):
    from largebatch.launchers import doctor
    seen = []
    monkeypatch.setattr(doctor, "main", lambda argv: seen.append(argv) or 0)
    assert cli.main(["doctor", "--quick"]) == 0
    assert seen == [["--quick"]]


def test_console_entry_point_has_no_traceback(workdir):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [
        str(__import__("pathlib").Path(cli.__file__).resolve().parents[1]), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-m", "largebatch.launchers.cli", "validate", "exp.yaml", "optimizer.momentum=2"],
                          capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr == "optimizer.momentum: expected a number in [0, 1), got 2.0\n"
    assert proc.stdout == ""


def test_help_names_exp_yaml_first(capsys):
    with pytest.raises(SystemExit):
        cli.main(["run", "--help"])
    assert capsys.readouterr().out.startswith("usage: largebatch run EXP.yaml [options] [key.sub=value ...]")


# ------------------------------------------------------------------------------ validate: the run shorthands
def test_validate_takes_launcher_hosts_and_hostfile(workdir, capsys):
    assert cli.main(["validate", "exp.yaml", "--launcher", "mpirun", "-H", "a:2,b:2", "--print"]) == 0
    la = yaml.safe_load(capsys.readouterr().out)["launcher"]
    assert la["type"] == "mpirun" and la["hosts"] == ["a:2", "b:2"]
    (workdir / "hosts").write_text("n1 slots=2\nn2 slots=2\n")
    assert cli.main(["validate", "exp.yaml", "--hostfile", "hosts", "--launcher", "srun"]) == 0
    assert "× 4 ranks" in capsys.readouterr().out
    assert cli.main(["validate", "exp.yaml", "--hosts", "a:2", "--np", "3"]) == 2
    assert capsys.readouterr().err.splitlines() == ["launcher.np: expected at most 2 (the slots in launcher.hosts), got 3"]


# ------------------------------------------------------------------------------ a run never overwrites another
def _fake_run(folder):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "summary.json").write_text('{"status": "completed"}\n')
    (folder / "metrics.csv").write_text("kind,step\n")


def test_an_explicit_run_dir_that_holds_a_run_is_refused(workdir, capsys):
    _fake_run(workdir / "old")
    before = listing(workdir)
    for extra in ([], ["--dry-run"]):
        assert cli.main(["run", "exp.yaml", "output.run_dir=old", *extra]) == 2
        assert capsys.readouterr().err.splitlines() == [
            f"output.run_dir: {workdir / 'old'} holds another run (summary.json); give this run a fresh "
            f"output.run_dir, or set train.resume=auto (or train.resume=PATH) to continue that one"]
    assert listing(workdir) == before
    # continuing it is explicit; a folder without a run (or just made by largebatch run) is used as it is
    assert cli.main(["run", "exp.yaml", "output.run_dir=old", "train.resume=auto", "--dry-run"]) == 0
    (workdir / "fresh").mkdir()
    (workdir / "fresh" / "launch.sh").write_text("#!/bin/sh\n")
    assert cli.main(["run", "exp.yaml", "output.run_dir=fresh", "--dry-run"]) == 0
    capsys.readouterr()


def test_resume_auto_continues_the_default_run_dir(workdir, capsys):
    _fake_run(workdir / "runs" / "exp")
    assert cli.main(["run", "exp.yaml", "--dry-run", "train.resume=auto"]) == 0
    assert f"output.run_dir={workdir / 'runs' / 'exp'}" in capsys.readouterr().out
    assert cli.main(["run", "exp.yaml", "--dry-run"]) == 0
    assert f"output.run_dir={workdir / 'runs' / 'exp-2'}" in capsys.readouterr().out


def test_sbatch_refuses_a_run_dir_that_holds_a_run_unless_it_resumes(workdir, capsys):
    _fake_run(workdir / "old")
    assert cli.main(["sbatch", "exp.yaml", "output.run_dir=old", "--dry-run"]) == 2
    assert capsys.readouterr().err.splitlines()[0].startswith(f"output.run_dir: {workdir / 'old'} holds another run")
    assert cli.main(["sbatch", "exp.yaml", "output.run_dir=old", "--dry-run", "--requeue"]) == 0


# ------------------------------------------------------------------------------ train.resume checked before launching
def _checkpoint(path, framework="torch", model="small_cnn"):
    from largebatch import checkpoint as core
    core.write(str(path), b"payload" * 100, {"framework": framework, "step": 4, "epoch": 1, "model": model,
                                              "model_signature": {"hash": "0123456789abcdef", "tensors": 6}})
    return path


def _truncate(path):
    path.write_bytes(path.read_bytes()[:-10])


def _flip(path):
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("make, expected", [
    (lambda p: _truncate(_checkpoint(p)), "truncated (payload has 690 of 700 bytes)"),
    (lambda p: _flip(_checkpoint(p)), "corrupted (payload SHA-256 does not match the manifest)"),
    (lambda p: p.write_bytes(b"PK\x03\x04 a zip file, say"), "not a largebatch checkpoint (bad header)"),
    (lambda p: p.write_bytes(b"LBC"), "truncated (3 bytes, not a complete header)"),
    (lambda p: _checkpoint(p, framework="keras"), "written by framework 'keras', this run is 'torch'"),
    (lambda p: _checkpoint(p, model="resnet50"), "from another model (model 'resnet50'; this run: model 'small_cnn')"),
])
def test_a_bad_resume_checkpoint_is_refused_before_launching(workdir, capsys, monkeypatch, make, expected):
    ck = workdir / "elsewhere" / "epoch-0001.pt"
    ck.parent.mkdir()
    make(ck)
    before = listing(workdir)
    monkeypatch.setattr(cli.subprocess, "Popen", lambda *a, **k: pytest.fail("launched"))
    for extra in ([], ["--dry-run"]):
        assert cli.main(["run", "exp.yaml", "--np", "2", f"train.resume={ck}", *extra]) == 2
        assert capsys.readouterr().err.splitlines() == [f"train.resume: checkpoint {ck}: {expected}"]
    assert listing(workdir) == before                         # no run directory, nothing written


def test_resume_auto_checks_the_newest_checkpoint_of_the_run_dir(workdir, capsys, monkeypatch):
    ckpts = workdir / "old" / "checkpoints"
    ckpts.mkdir(parents=True)
    _checkpoint(ckpts / "epoch-0001.pt")
    _truncate(_checkpoint(ckpts / "epoch-0002.pt"))
    monkeypatch.setattr(cli.subprocess, "Popen", lambda *a, **k: pytest.fail("launched"))
    assert cli.main(["run", "exp.yaml", "output.run_dir=old", "train.resume=auto"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"train.resume: checkpoint {ckpts / 'epoch-0002.pt'}: truncated (payload has 690 of 700 bytes)"]
    (ckpts / "epoch-0002.pt").unlink()
    assert cli.main(["run", "exp.yaml", "output.run_dir=old", "train.resume=auto", "--dry-run"]) == 0
    capsys.readouterr()


# ------------------------------------------------------------------------------ the relayed output
NOISE = ("WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
         "I0000 00:00:1796128113.966132   23005 port.cc:153] oneDNN custom operations are on. You may see "
         "slightly different numerical results due to floating-point round-off errors.\n"
         "I0000 00:00:1796128113.998869   23005 cpu_feature_guard.cc:227] This TensorFlow binary is optimized to "
         "use available CPU instructions in performance-critical operations.\n"
         "To enable the following instructions: AVX2 AVX512F FMA, in other operations, rebuild TensorFlow with "
         "the appropriate compiler flags.\n"
         "[1,1]<stderr>:I0000 00:00:1796128120.1   23007 service.cc:152] XLA service 0x55d initialized for platform "
         "Host (this does not guarantee that XLA will be used). Devices:\n"
         "2026-12-01 12:00:00.123456: W tensorflow/core/util/port.cc:113] an old-style warning line\n")


def _filtered(text, chunk=None, **kw):
    f = cli.OutputFilter(**kw)
    if chunk is None:
        return f.feed(text) + f.flush()
    return "".join(f.feed(text[i:i + chunk]) for i in range(0, len(text), chunk)) + f.flush()


@pytest.mark.parametrize("chunk", [None, 1, 7])
def test_relay_drops_tensorflow_noise_and_rank0_tags(chunk):
    mpi = NOISE + "[1,0]<stderr>:\rframe 0[1,0]<stderr>:\rframe 1[1,0]<stderr>:\n" \
                  "[1,0]<stdout>:run dir: /r (completed)[1,0]<stdout>:\n" \
                  "[1,1]<stderr>:rank 1 says hi\n" \
                  "[1,0]<stderr>:E0000 00:00:1.2   5 cuda.cc:1] an error line is kept\n"
    assert _filtered(mpi, chunk) == ("\rframe 0\rframe 1\nrun dir: /r (completed)\n[1,1]<stderr>:rank 1 says hi\n"
                                     "E0000 00:00:1.2   5 cuda.cc:1] an error line is kept\n")
    gloo = "[0]<stderr>:\r[0]<stderr>:frame 0\r[0]<stderr>:frame 1\n[0]<stdout>:Total: 3\n[1]<stdout>:x\n"
    assert _filtered(gloo, chunk) == "\rframe 0\rframe 1\nTotal: 3\n[1]<stdout>:x\n"


def test_relay_keeps_tensorflow_lines_when_asked():
    assert _filtered(NOISE, quiet_tf=False) == NOISE
    assert "oneDNN" in _filtered("[1,0]<stderr>:" + NOISE, quiet_tf=False)


def test_relay_passes_a_progress_frame_at_once():
    f = cli.OutputFilter()
    assert f.feed("[1,0]<stderr>:\rexp:  50%|#####     | 5/10") == "\rexp:  50%|#####     | 5/10"
    assert f.feed(" [00:01<00:01]") == " [00:01<00:01]"            # the rest of a line already shown
    assert f.feed("[1,0]<st") == ""                                   # maybe a tag: held back
    assert f.feed("derr>:\rexp: 60%") == "\rexp: 60%"


def test_launch_passes_progress_mode_and_quiets_tensorflow(workdir, capsys, monkeypatch):
    """A fake launcher that prints what horovodrun prints: the relay shows rank 0's lines only."""
    seen = {}
    real = subprocess.Popen
    script = ("import os, sys; sys.stderr.write(os.environ['NOISE']); "
              "sys.stdout.write('[1,0]<stdout>:run dir: x[1,0]<stdout>:\\n'); "
              "print(os.environ.get('LARGEBATCH_PROGRESS'), os.environ.get('TF_CPP_MIN_LOG_LEVEL'), "
              "os.environ.get('LARGEBATCH_TF_LOGS'))")

    def fake(argv, env, **kw):
        seen["env"] = env
        return real([sys.executable, "-c", script], env=dict(env, NOISE=NOISE), **kw)
    monkeypatch.setattr(cli.subprocess, "Popen", fake)
    monkeypatch.delenv("LARGEBATCH_TF_LOGS", raising=False)
    monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL", raising=False)
    monkeypatch.delenv("LARGEBATCH_PROGRESS", raising=False)
    assert cli.main(["run", "exp.yaml"]) == 0
    out, err = capsys.readouterr()
    assert "run dir: x\nlines 2 None\n" in out                         # capsys is not a terminal: plain lines
    assert "oneDNN" not in err and "cpu_feature_guard" not in err and "XLA service" not in err
    assert cli.main(["run", "exp.yaml", "--tf-logs"]) == 0
    out, err = capsys.readouterr()
    assert "lines None 1" in out and "oneDNN custom operations" in err and "XLA service" in err
    launch = (workdir / "runs" / "exp-2" / "launch.sh").read_text()
    assert "train.resume=auto" in launch and "output.run_dir=" in launch


AGENT_TRACEBACK = ("Traceback (most recent call last):\n  File \"/venv/bin/torchrun\", line 8, in <module>\n"
                   "    sys.exit(main())\n             ^^^^^^\n"
                   "torch.distributed.elastic.multiprocessing.api.SignalException: Process 3319 got signal: 15\n")


@pytest.mark.parametrize("piece", [7, 64, 10_000], ids=["7-byte chunks", "64-byte chunks", "one chunk"])
def test_after_our_stop_torchruns_signal_traceback_is_left_out(piece):
    """torchrun's agent reports the SIGTERM we sent as a traceback: left out once we stopped the
    job (whatever the chunks the pipe delivers), kept otherwise; what follows it is kept."""
    text = "epoch 3: eval loss 0.1\n" + AGENT_TRACEBACK + "after\n"
    stopping = []
    quiet, plain = cli.OutputFilter(stopping=stopping), cli.OutputFilter()
    stopping.append("SIGTERM")
    got = {"quiet": "", "plain": ""}
    for i in range(0, len(text), piece):
        got["quiet"] += quiet.feed(text[i:i + piece])
        got["plain"] += plain.feed(text[i:i + piece])
    got["quiet"] += quiet.flush()
    got["plain"] += plain.flush()
    assert got["quiet"] == "epoch 3: eval loss 0.1\nafter\n"
    assert got["plain"] == text


MPI_STOP_OUTPUT = (
    "mpirun: Forwarding signal 10 to job\n"
    "largebatch: rank 0 on vm: SIGUSR1: stopping after this step with a checkpoint (up to 15 s; again to stop at once)\n"
    "[1,1]<stderr>:largebatch: rank 1 on vm: SIGUSR1: stopping after this step with a checkpoint (up to 15 s; again "
    "to stop at once)[1,1]<stderr>:\n"
    "largebatch: SIGUSR1: stopped after step 22, checkpoint /r/checkpoints/epoch-0001.pt\n"
    "gradient noise scale B_simple ≈ 23 examples\n"
    "run dir: /r (stopped, 22 steps, loss 0.848)\n"
    "--------------------------------------------------------------------------\n"
    "Primary job  terminated normally, but 1 process returned\n"
    "a non-zero exit code. Per user-direction, the job has been aborted.\n"
    "--------------------------------------------------------------------------\n"
    "--------------------------------------------------------------------------\n"
    "mpirun detected that one or more processes exited with non-zero status, thus causing\n"
    "\n"
    "  Exit code:    138\n"
    "--------------------------------------------------------------------------\n")


def test_after_our_stop_the_launchers_own_stop_messages_are_left_out():
    """Issue 27 item 3: a Ctrl-C reads as a clean stop: mpirun's signal forwarding and job-end
    frames, and the ranks' SIGUSR1 lines, go; the closing block (closing_block) says it once.
    Without our stop (a crash) every line is kept."""
    quiet, plain = cli.OutputFilter(stopping=["SIGINT"]), cli.OutputFilter()
    assert quiet.feed(MPI_STOP_OUTPUT) + quiet.flush() == "gradient noise scale B_simple ≈ 23 examples\n"
    assert plain.feed(MPI_STOP_OUTPUT) + plain.flush() == MPI_STOP_OUTPUT


def test_srun_outside_an_allocation_is_one_line_and_writes_nothing(workdir, capsys, monkeypatch):
    """Issue 27 item 8: srun without a Slurm allocation would fail after the run dir is made."""
    bin_dir = workdir / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")
    (bin_dir / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    before = listing(workdir)
    assert cli.main(["run", "exp.yaml", "--launcher", "srun"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "launcher.type: 'srun' runs inside a Slurm allocation (salloc, or a batch script: largebatch sbatch); "
        "SLURM_JOB_ID is not set here")
    assert listing(workdir) == before


@pytest.mark.parametrize("asked", [["launcher.engine=torch.distributed"], ["launcher.type=torchrun"],
                                   ["launcher.type=torchrun", "launcher.engine=torch.distributed"]])
def test_sbatch_runs_torch_distributed_under_srun_when_asked(workdir, capsys, asked):
    """The batch script always starts the ranks with srun; each rank re-reads the YAML and is told
    that srun started it, with the torch.distributed engine."""
    assert cli.main(["sbatch", "exp.yaml", "--np", "2", "--nodes", "2", "--dry-run", *asked]) == 0
    program = next(line for line in capsys.readouterr().out.splitlines() if "largebatch.runner" in line).split()
    i = program.index("largebatch.runner")
    assert program[i + 2:i + 4] == ["launcher.type=srun", "launcher.engine=torch.distributed"]
    assert program.count("launcher.engine=torch.distributed") == 1
