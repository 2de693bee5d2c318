"""horovodrun through largebatch.launchers.hvdrun: the same launch, its build check (an import of
horovod.tensorflow in a forked child, 3-4 s) answered from a cache keyed by Horovod's libraries."""
import json
import os
import subprocess
import sys
import types

import pytest

from largebatch.launchers import hvdrun


def test_the_check_runs_once_per_build(tmp_path):
    calls = []
    util = types.SimpleNamespace(mpi_built=lambda: calls.append("mpi") or True,
                                 gloo_built=lambda: calls.append("gloo") or False)
    lib = tmp_path / "horovod" / "torch" / "mpi_lib_v2.so"
    lib.parent.mkdir(parents=True)
    lib.write_bytes(b"x")
    cache = tmp_path / "cache" / "horovod-built.json"
    assert hvdrun._cached_answers(util, str(tmp_path / "horovod"), str(cache)) == {"mpi": True, "gloo": False}
    assert hvdrun._cached_answers(util, str(tmp_path / "horovod"), str(cache)) == {"mpi": True, "gloo": False}
    assert calls == ["mpi", "gloo"]                       # the second launch did not check
    assert json.loads(cache.read_text())["key"] == [[str(lib), 1, int(lib.stat().st_mtime)]]
    lib.write_bytes(b"rebuilt")                           # another build: checked again
    hvdrun._cached_answers(util, str(tmp_path / "horovod"), str(cache))
    assert calls == ["mpi", "gloo", "mpi", "gloo"]


def test_is_launcher():
    assert hvdrun.is_launcher(["/venv/bin/horovodrun", "-np", "2"])
    assert hvdrun.is_launcher([sys.executable, "-m", "largebatch.launchers.hvdrun", "-np", "2"])
    assert not hvdrun.is_launcher(["mpirun", "-np", "2"]) and not hvdrun.is_launcher([])


@pytest.mark.multirank
@pytest.mark.skipif(not os.path.exists(os.path.join(os.path.dirname(sys.executable), "horovodrun")),
                    reason="horovodrun not installed (make setup)")
def test_it_launches_as_horovodrun_does(tmp_path):
    env = dict(os.environ, LARGEBATCH_CACHE=str(tmp_path))
    argv = [*hvdrun.launcher(), "-np", "2", "-H", "localhost:2", "--gloo", sys.executable, "-c",
            "import os; print('rank', os.environ['HOROVOD_RANK'])"]
    for _ in range(2):                                     # the first checks and caches, the second reads
        out = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        assert sorted(line.split(":", 1)[-1] for line in out.stdout.splitlines()) == ["rank 0", "rank 1"]
    assert json.loads((tmp_path / "horovod-built.json").read_text())["built"] == {"mpi": True, "gloo": True}
