"""The torchrun fan-out and its tether (launchers/fanout.py, tether.py) on this machine, with a
stand-in for torchrun: one host failing stops the others, a signal stops every host, the end of
the tether's stdin stops (or, after a stop, kills) what it runs. The real thing across namespace
hosts is in test_multihost.py."""
import os
import shlex
import signal
import subprocess
import sys
import time

import pytest

from largebatch.launchers import fanout, preflight

# torchrun's stand-in: --nproc-per-node=2 fails after a moment with exit 3, any other count runs
# until SIGTERM; both log what happened to them
FAKE_TORCHRUN = """#!/bin/sh
trap 'echo "$1 stopped" >> "$LOG"; exit 143' TERM
echo "$1 started" >> "$LOG"
if [ "$1" = "--nproc-per-node=2" ]; then sleep 1; exit 3; fi
if [ "$FINISH" = "1" ]; then sleep 2; echo "$1 finished" >> "$LOG"; exit 0; fi
if [ "$IGNORE_TERM" = "1" ]; then trap '' TERM; fi
i=0
while [ $i -lt 300 ]; do sleep 0.1; i=$((i + 1)); done
"""


@pytest.fixture
def fake(tmp_path):
    script = tmp_path / "torchrun"
    script.write_text(FAKE_TORCHRUN)
    script.chmod(0o755)
    env = {**os.environ, "LOG": str(tmp_path / "log")}
    return script, env, tmp_path / "log"


def _wait_for_lines(path, count, limit=10):
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if path.exists() and len(path.read_text().splitlines()) >= count:
            return True
        time.sleep(0.1)
    return False


def _fanout(hosts, script, env, *flags):
    return subprocess.Popen([sys.executable, "-m", "largebatch.launchers.fanout", "-H", hosts, *flags, "--",
                             str(script)], env=env, stderr=subprocess.PIPE, text=True)


def test_elastic_a_host_that_fails_leaves_and_the_others_finish(fake):
    # torchrun --nnodes MIN:MAX: the other hosts' agents restart their ranks without it; exit 0
    script, env, log = fake
    proc = _fanout("localhost:1,127.0.0.1:2", script, {**env, "FINISH": "1"}, "--elastic")
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "largebatch: host 127.0.0.1: its torchrun exited with 3; the elastic job goes on without it" in err
    assert sorted(log.read_text().splitlines()) == ["--nproc-per-node=1 finished", "--nproc-per-node=1 started",
                                                    "--nproc-per-node=2 started"]


def test_a_host_that_fails_stops_the_others_and_names_itself(fake):
    script, env, log = fake
    proc = _fanout("localhost:1,127.0.0.1:2", script, env)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 3
    assert "largebatch: host 127.0.0.1: its torchrun exited with 3; stopping the job on the other hosts" in err
    assert sorted(log.read_text().splitlines()) == ["--nproc-per-node=1 started", "--nproc-per-node=1 stopped",
                                                    "--nproc-per-node=2 started"]


def test_sigterm_stops_every_host_and_a_second_signal_kills(fake):
    script, env, log = fake
    proc = _fanout("localhost:1,127.0.0.1:1", script, env)
    assert _wait_for_lines(log, 2)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=30)
    assert proc.returncode == 128 + signal.SIGTERM
    assert sorted(log.read_text().splitlines()) == ["--nproc-per-node=1 started"] * 2 + \
        ["--nproc-per-node=1 stopped"] * 2
    log.unlink()
    proc = _fanout("localhost:1", script, {**env, "IGNORE_TERM": "1"})     # a host that does not stop
    assert _wait_for_lines(log, 1)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=30)
    assert proc.returncode == 128 + signal.SIGTERM and time.monotonic() - started < 5


@pytest.mark.parametrize("stop_first", [False, True], ids=["launcher-gone", "stop-then-gone"])
def test_the_tether_stops_what_it_runs_when_its_stdin_ends(fake, stop_first):
    script, env, log = fake
    # launcher gone: SIGTERM (which the stand-in obeys); after a stop: SIGKILL (even if it would not obey)
    env = {**env, "IGNORE_TERM": "1"} if stop_first else env
    proc = subprocess.Popen([sys.executable, "-m", "largebatch.launchers.tether", "--", str(script), "x"],
                            env=env, stdin=subprocess.PIPE)
    assert _wait_for_lines(log, 1)
    if stop_first:
        proc.stdin.write(b"stop\n")
        proc.stdin.flush()
        time.sleep(0.5)
    proc.stdin.close()
    assert proc.wait(timeout=10) == (128 + signal.SIGKILL if stop_first else 143)
    assert log.read_text().splitlines() == (["x started"] if stop_first else ["x started", "x stopped"])


def test_remote_hosts_get_ssh_with_keepalives_the_directory_and_the_forwarded_environment():
    ssh = preflight.SSH(port=2222, identity="/keys/id", keepalive=30)
    environ = {"LARGEBATCH_FAULT": "kill:1:3", "OMP_NUM_THREADS": "4", "PYTHONPATH": "/src", "HOME": "/root",
               "MY_SETTING": "1"}
    commands = fanout.host_commands([("localhost", 2), ("node7", 4)], ["/venv/bin/torchrun", "--nnodes=2"],
                                    python="/venv/bin/python", ssh=ssh, environ=environ, env_names=["MY_SETTING"],
                                    cwd="/work dir")
    (local, here), (remote, there) = commands
    assert local == "localhost" and here == ["/venv/bin/python", "-m", "largebatch.launchers.tether", "--",
                                             "/venv/bin/torchrun", "--nproc-per-node=2", "--nnodes=2"]
    assert remote == "node7"
    assert there[:-2] == ["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=5", "-o", "ServerAliveInterval=10",
                          "-o", "ServerAliveCountMax=3", "-p", "2222", "-i", "/keys/id"]
    assert there[-2] == "node7"
    words = shlex.split(there[-1])
    assert words[:4] == ["cd", "/work dir", "&&", "exec"]
    assert words[4:10] == ["env", "LARGEBATCH_FAULT=kill:1:3", "MY_SETTING=1", "OMP_NUM_THREADS=4", "PYTHONPATH=/src",
                           "/venv/bin/python"]             # HOME is the host's own
    assert words[10:] == ["-m", "largebatch.launchers.tether", "--", "/venv/bin/torchrun", "--nproc-per-node=4",
                          "--nnodes=2"]
