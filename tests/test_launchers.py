"""Thread arithmetic, hostfiles and launch command lines (largebatch.launchers)."""
import sys
import shlex

import pytest


from largebatch.launchers import threads
from largebatch import hostfile  # noqa: E402
from largebatch.launchers import command


# ------------------------------------------------------------------------------ thread rule
@pytest.mark.parametrize("cores, ranks, expected", [
    (64, 1, 64), (64, 2, 32), (64, 4, 16), (64, 16, 4), (64, 64, 1),
    (68, 4, 17),       # Xeon Phi 7250: 68 cores, 4 ranks
    (72, 8, 9), (56, 3, 18),   # floor: 56/3 = 18.67
    (2, 2, 1), (2, 4, 1),      # oversubscribed: never below 1
    (1, 1, 1),
])
def test_threads_per_rank_is_floor_of_cores_over_ranks_at_least_one(cores, ranks, expected):
    assert threads.threads_per_rank(cores, ranks) == expected


@pytest.mark.parametrize("bad", [(0, 1), (4, 0), (-1, 2)])
def test_threads_per_rank_rejects_nonsense(bad):
    with pytest.raises(ValueError, match="must be >= 1"):
        threads.threads_per_rank(*bad)


@pytest.mark.parametrize("t, expected", [(1, 1), (2, 1), (3, 1), (4, 2), (16, 2), (64, 2)])
def test_interop_threads_one_or_two(t, expected):
    assert threads.interop_threads(t) == expected


def test_thread_env_names_every_library_and_pins_only_when_bound():
    env = threads.thread_env(8, 2)
    assert env == {"OMP_NUM_THREADS": "8", "MKL_NUM_THREADS": "8", "OPENBLAS_NUM_THREADS": "8",
                   "TF_NUM_INTRAOP_THREADS": "8", "TF_NUM_INTEROP_THREADS": "2"}
    bound = threads.thread_env(8, 2, "core")
    assert bound["OMP_PROC_BIND"] == "close" and bound["OMP_PLACES"] == "cores"
    assert "OMP_PROC_BIND" not in threads.thread_env(8, 2, "socket")


def test_plan_threads_per_host_and_exported_minimum():
    plan = threads.plan_threads([("a", 4), ("b", 2)], cores_per_host=64)
    assert plan.per_host == [("a", 4, 16), ("b", 2, 32)]
    assert plan.threads == 16 and plan.interop == 2
    assert plan.env["OMP_NUM_THREADS"] == "16"
    assert plan.cores_source == "launcher.cores_per_host"
    assert plan.notes == []


def test_plan_threads_explicit_values_win_and_oversubscription_is_noted():
    plan = threads.plan_threads([("a", 4)], cores_per_host=8, threads=4, interop=1)
    assert (plan.threads, plan.interop) == (4, 1)
    assert plan.notes == ["a: 4 ranks × 4 threads = 16 threads on 8 cores (oversubscribed)"]
    plan = threads.plan_threads([("a", 16)], cores_per_host=8)
    assert plan.threads == 1
    assert plan.notes == ["a: 16 ranks on 8 cores is oversubscribed; expect poor scaling"]


def test_plan_threads_auto_cores_notes_remote_hosts(monkeypatch):
    monkeypatch.setattr(threads, "detect_cores", lambda: (32, 64))
    plan = threads.plan_threads([("localhost", 4)])
    assert plan.cores_per_host == 32 and plan.threads == 8 and plan.notes == []
    assert plan.cores_source == "this machine (32 physical cores)"
    plan = threads.plan_threads([("node17", 4)])
    assert plan.notes == ["launcher.cores_per_host is auto: assuming every host has this machine's 32 physical "
                          "cores (each rank re-checks its own host)"]


CPUINFO_HT = "\n\n".join(
    f"processor\t: {cpu}\nphysical id\t: {cpu // 8}\ncore id\t\t: {cpu % 4}\nsiblings\t: 8\n"
    for cpu in range(16))   # 2 sockets × 4 cores × 2 hyper-threads


def test_physical_cores_counts_cores_not_hyperthreads(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text(CPUINFO_HT)
    assert threads.physical_cores(range(16), cpuinfo=str(path)) == 8
    assert threads.physical_cores(range(8), cpuinfo=str(path)) == 4     # one socket's CPUs
    assert threads.physical_cores([0, 4], cpuinfo=str(path)) == 1       # two siblings of one core
    assert threads.physical_cores(range(3), cpuinfo=str(tmp_path / "missing")) == 3


def test_physical_cores_without_topology_counts_logical(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text("processor\t: 0\n\nprocessor\t: 1\n")
    assert threads.physical_cores([0, 1], cpuinfo=str(path)) == 2


@pytest.mark.parametrize("env, expected", [
    ({"OMPI_COMM_WORLD_LOCAL_SIZE": "4"}, 4),
    ({"HOROVOD_LOCAL_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_SIZE": "4"}, 2),
    ({"MPI_LOCALNRANKS": "8"}, 8),
    ({"SLURM_STEP_TASKS_PER_NODE": "4(x2),2", "SLURM_NODEID": "2"}, 2),
    ({"SLURM_STEP_TASKS_PER_NODE": "4(x2),2", "SLURM_NODEID": "1"}, 4),
    ({"SLURM_TASKS_PER_NODE": "16"}, 16),
    ({}, None),
    ({"OMPI_COMM_WORLD_LOCAL_SIZE": "x"}, None),
])
def test_local_size_from_launcher_environment(env, expected):
    assert threads.local_size_from_env(env) == expected


def test_rank_threads_on_the_ranks_own_host():
    env = {"OMPI_COMM_WORLD_LOCAL_SIZE": "4"}
    assert threads.rank_threads(env=env, cores=64) == (16, 2, "64 cores / 4 ranks on this host")
    assert threads.rank_threads(env=env, cores=64, cores_per_host=8) == (2, 1, "8 cores / 4 ranks on this host")
    assert threads.rank_threads(env=env, cores=64, threads=3, interop=2) == (3, 2, "launcher.threads_per_rank")
    # bound to its own cores: use them all
    assert threads.rank_threads(env=env, cores=6, binding="core") == (6, 2, "bound to 6 cores")
    # not under a launcher: one rank on the host
    assert threads.rank_threads(env={}, cores=2)[0] == 2


# ------------------------------------------------------------------------------ hosts
def test_parse_hosts_forms():
    assert [str(h) for h in hostfile.parse_hosts("a:4,b:2")] == ["a:4", "b:2"]
    assert [str(h) for h in hostfile.parse_hosts(["a:4", "b"])] == ["a:4", "b:1"]
    assert [str(h) for h in hostfile.parse_hosts("node-01.cluster:8")] == ["node-01.cluster:8"]


@pytest.mark.parametrize("spec, message", [
    ("a:x", "host 'a': expected slots to be an integer > 0, got 'x'"),
    ("a:0", "host 'a': expected slots to be an integer > 0, got '0'"),
    ("a:2,,b:2", "expected 'host:slots[,host:slots...]', got 'a:2,,b:2' (empty host name)"),
    ("a:2,a:2", "host 'a' is listed twice; give it once with all its slots"),
    ("a b:2", "expected 'host:slots[,host:slots...]', got 'a b:2'"),
    (3, "expected 'host:slots[,host:slots...]' or a list of 'host:slots', got 3"),
])
def test_parse_hosts_errors(spec, message):
    with pytest.raises(ValueError) as err:
        hostfile.parse_hosts(spec)
    assert str(err.value) == message


def test_parse_hostfile(tmp_path):
    path = tmp_path / "hosts"
    path.write_text("# cluster\nnode1 slots=4\n\nnode2 slots=2 max_slots=8  # comment\nnode3\n")
    assert [str(h) for h in hostfile.parse_hostfile(path)] == ["node1:4", "node2:2", "node3:1"]


@pytest.mark.parametrize("text, message", [
    ("node1:4\n", "line 1: expected 'hostname slots=N', got 'node1:4'"),
    ("node1 slots=four\n", "line 1: expected slots to be an integer > 0, got 'four'"),
    ("node1 cpus=4\n", "line 1: expected 'hostname slots=N', got 'node1 cpus=4'"),
    ("# nothing\n", "expected at least one 'hostname slots=N' line, got none"),
])
def test_parse_hostfile_errors(tmp_path, text, message):
    path = tmp_path / "hosts"
    path.write_text(text)
    with pytest.raises(ValueError) as err:
        hostfile.parse_hostfile(path)
    assert str(err.value) == message


def test_place_ranks_fills_hosts_in_order():
    hosts = hostfile.parse_hosts("a:4,b:4,c:4")
    assert hostfile.place_ranks(6, hosts) == [("a", 4), ("b", 2)]
    assert hostfile.place_ranks(12, hosts) == [("a", 4), ("b", 4), ("c", 4)]
    assert hostfile.hosts_arg(hostfile.place_ranks(6, hosts)) == "a:4,b:2"
    with pytest.raises(ValueError, match="expected at most 12 ranks"):
        hostfile.place_ranks(13, hosts)


# ------------------------------------------------------------------------------ commands
PROGRAM = ["/venv/bin/python", "-m", "largebatch.runner", "/exp.yaml", "output.run_dir=/runs/x"]


def plan(placed, cores=16, binding="none", per_rank=None):
    return threads.plan_threads(placed, cores_per_host=cores, binding=binding, threads=per_rank)


def test_horovodrun_command():
    placed = [("a", 2), ("b", 2)]
    cmd = command.horovodrun_command(PROGRAM, np=4, placed=placed, plan=plan(placed))
    assert cmd.argv[:3] == [sys.executable, "-m", "largebatch.launchers.hvdrun"]     # horovodrun's own code
    assert cmd.argv[3:] == ["-np", "4", "-H", "a:2,b:2", "--mpi", *PROGRAM]
    assert cmd.env["OMP_NUM_THREADS"] == "8" and cmd.env["TF_NUM_INTEROP_THREADS"] == "2"
    line = cmd.shell()
    assert line.startswith("OMP_NUM_THREADS=8 MKL_NUM_THREADS=8 ")
    # 2 ranks x 8 threads take the 16 cores: Open MPI is told to yield when idle
    assert "OMPI_MCA_mpi_yield_when_idle=1" in shlex.split(line)[:6]
    assert shlex.split(line)[6:] == cmd.argv


def test_horovodrun_gloo_binding_nic_and_extra_args():
    placed = [("localhost", 2)]
    cmd = command.horovodrun_command(PROGRAM, np=2, placed=placed, plan=plan(placed, 8, "core"), controller="gloo",
                                     binding="core", network_interface="ib0", extra_args=["--verbose"],
                                     env={"NCCL_DEBUG": "INFO"})
    assert cmd.argv[3:] == ["-np", "2", "-H", "localhost:2", "--gloo", "--network-interfaces", "ib0",
                            "--binding-args=-bind-to core -map-by slot:PE=4", "--verbose", *PROGRAM]
    assert cmd.env["NCCL_DEBUG"] == "INFO"


def test_mpirun_command_is_what_horovodrun_builds():
    placed = [("a", 2), ("b", 2)]
    environ = {"PATH": "/venv/bin:/usr/bin", "LD_LIBRARY_PATH": "/opt/lib", "HOME": "/root"}
    cmd = command.mpirun_command(PROGRAM, np=4, placed=placed, plan=plan(placed), environ=environ)
    assert cmd.env == {}
    assert cmd.argv[1:] == [
        "--allow-run-as-root", "--tag-output", "-np", "4", "-H", "a:2,b:2",
        "-bind-to", "none", "-map-by", "slot",
        "-mca", "pml", "ob1", "-mca", "btl", "^openib",
        "-mca", "mpi_yield_when_idle", "1",          # ours: 2 ranks x 8 threads take the 16 cores
        "-x", "PATH", "-x", "LD_LIBRARY_PATH",
        "-x", "OMP_NUM_THREADS=8", "-x", "MKL_NUM_THREADS=8", "-x", "OPENBLAS_NUM_THREADS=8",
        "-x", "TF_NUM_INTRAOP_THREADS=8", "-x", "TF_NUM_INTEROP_THREADS=2", *PROGRAM]
    assert "'^openib'" in cmd.shell()          # quoted for the shell


@pytest.mark.parametrize("binding, args", [
    ("none", ["-bind-to", "none", "-map-by", "slot"]),
    ("core", ["-bind-to", "core", "-map-by", "slot:PE=8"]),
    ("socket", ["-bind-to", "socket", "-map-by", "socket", "-rank-by", "core"]),
    ("numa", ["-bind-to", "numa", "-map-by", "numa", "-rank-by", "core"]),
])
def test_mpi_binding_args(binding, args):
    assert command.mpi_binding_args(binding, 8) == args


def test_mpirun_network_interface_hostfile_and_large_cluster(tmp_path):
    path = tmp_path / "hosts"
    path.write_text("".join(f"n{i} slots=1\n" for i in range(64)))
    placed = [(f"n{i}", 1) for i in range(64)]
    cmd = command.mpirun_command(PROGRAM, np=64, placed=placed, plan=plan(placed), hostfile=str(path),
                                 network_interface="eth0", environ={})
    argv = cmd.argv
    assert argv[5:7] == ["-hostfile", str(path)]
    assert "-mca plm_rsh_no_tree_spawn true -mca plm_rsh_num_concurrent 64" in " ".join(argv)
    assert "-mca btl_tcp_if_include eth0 -x NCCL_SOCKET_IFNAME=eth0" in " ".join(argv)


def test_srun_command():
    placed = [("n1", 4), ("n2", 4)]
    cmd = command.srun_command(PROGRAM, np=8, placed=placed, hosts_given=True, plan=plan(placed, 64, "core"),
                               binding="core")
    assert cmd.argv[1:] == [
        "--ntasks=8", "--nodes=2", "--ntasks-per-node=4", "--nodelist=n1,n2", "--cpus-per-task=16",
        "--cpu-bind=cores", "--mpi=pmix", "--export=ALL,OMP_NUM_THREADS=16,MKL_NUM_THREADS=16,OPENBLAS_NUM_THREADS=16,"
        "TF_NUM_INTRAOP_THREADS=16,TF_NUM_INTEROP_THREADS=2,OMP_PROC_BIND=close,OMP_PLACES=cores", *PROGRAM]
    placed = [("node0", 4), ("node1", 4)]
    cmd = command.srun_command(PROGRAM, np=8, placed=placed, ranks_per_host=4, plan=plan(placed, 64))
    assert cmd.argv[1:5] == ["--ntasks=8", "--nodes=2", "--ntasks-per-node=4", "--cpus-per-task=16"]


def test_build_command_from_a_launcher_section():
    la = {"type": "horovodrun", "hosts": ["a:2"], "hostfile": None, "ranks_per_host": None, "controller": "mpi",
          "cores_per_host": 8, "threads_per_rank": None, "interop_threads": None, "binding": "none",
          "network_interface": None, "env": {}, "args": []}
    cmd = command.build_command(la, {"np": 2, "placement": [["a", 2]]}, PROGRAM)
    assert cmd.argv[3:7] == ["-np", "2", "-H", "a:2"] and cmd.threads.threads == 4
    la.update(type="srun", hosts=None)
    cmd = command.build_command(la, {"np": 8, "placement": [["localhost", 8]]}, PROGRAM,
                                environ={"SLURM_JOB_NUM_NODES": "2"})
    assert cmd.threads.per_host == [("node0", 4, 2), ("node1", 4, 2)]


def test_open_mpi_yields_when_the_ranks_take_every_core():
    """mpi_yield_when_idle=1 exactly when ranks x threads fill the cores, for the MPI controller
    (horovodrun --mpi: the environment; mpirun: -mca), unless the user set it."""
    full, spare = [("localhost", 2)], [("localhost", 1)]
    key = "OMPI_MCA_mpi_yield_when_idle"
    assert command.horovodrun_command(PROGRAM, np=2, placed=full, plan=plan(full, 2)).env[key] == "1"
    assert key not in command.horovodrun_command(PROGRAM, np=2, placed=full, plan=plan(full, 2), controller="gloo").env
    assert key not in command.horovodrun_command(PROGRAM, np=1, placed=spare, plan=plan(spare, 2, per_rank=1)).env
    assert command.horovodrun_command(PROGRAM, np=2, placed=full, plan=plan(full, 2), env={key: "0"}).env[key] == "0"
    argv = command.mpirun_command(PROGRAM, np=2, placed=full, plan=plan(full, 2), environ={}).argv
    assert argv[argv.index("mpi_yield_when_idle") - 1:argv.index("mpi_yield_when_idle") + 2] == [
        "-mca", "mpi_yield_when_idle", "1"]
    assert "mpi_yield_when_idle" not in command.mpirun_command(PROGRAM, np=2, placed=full, plan=plan(full, 2),
                                                                environ={key: "0"}).argv
    assert "mpi_yield_when_idle" not in command.mpirun_command(PROGRAM, np=1, placed=spare,
                                                                plan=plan(spare, 2, per_rank=1), environ={}).argv
