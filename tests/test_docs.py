"""The docs' command blocks run as written (issue 13 §4: "docs that fail when copied").

Every fenced block of README.md and docs/*.md tagged ``bash``, ``console``, ``python`` or ``yaml``
is collected; what can run on this machine runs:

- ``bash`` / ``console`` shell lines (``\\`` continuations joined, ``# comments`` dropped):
  lines starting with ``largebatch`` (or ``.venv/bin/largebatch``) run from the repository root;
  ``largebatch run`` / ``largebatch sbatch`` lines get ``--dry-run`` unless they have it. Every
  other line, and every ``largebatch`` line that needs what this machine lacks, must be listed in
  ``SKIP`` with its reason: a new line that is neither runnable nor listed fails the test, so the
  list stays complete and visible. ``exp.yaml`` / ``EXP.yaml`` stand for the reader's own file:
  here, docs/experiments.md's "shortest useful file" (``STAND_IN``).
- ``console`` transcripts: ``$ `` lines are commands, run with bash in a fresh folder, and the
  lines after each are its expected output (stdout and stderr together; ``...`` in an expected
  line matches anything). ``$ cat FILE`` followed by the file's text writes that file first.
- ``python`` blocks compile, and every name they use must be bound in the block (imported,
  assigned) or be one of ``PLACEHOLDERS`` (the reader's model and data): a snippet that uses
  ``os`` without importing it fails. A block with no free names and no ``...`` is a complete
  program: it runs in a subprocess (under ``horovodrun -np 2`` if it imports Horovod).
- ``yaml`` blocks that are whole experiments (a top-level ``framework`` key) pass
  ``largebatch validate`` in a folder where the files they name exist.

Also: every ``examples/*.yaml`` validates (ImageNet paths replaced by a small class-folder tree).
"""
import ast
import builtins
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BIN = Path(sys.executable).parent
LARGEBATCH = str(BIN / "largebatch")

# Shell lines that do not run here: a prefix of the (joined, comment-free) line -> why.
SKIP = {
    "make demo": "sets up the stack and trains; the setup is checked by test_stack.py, the demo's run by test_run_e2e.py",
    "make test": "runs the whole test suite, this file included",
    "bash bench/gpu_check.sh": "needs a GPU",
    "salloc ": "needs Slurm (tests/test_slurm.py runs it where a Slurm testbed can be built)",
    "largebatch sbatch exp.yaml --np 2 --nodes 2 --time 4:00:00 --requeue --submit": "needs Slurm (sbatch)",
    "largebatch run EXP.yaml -H n1:4,n2:4": "needs the hosts n1 and n2",
    "largebatch doctor -H n1:4,n2:4": "needs the hosts n1 and n2",
    "largebatch report runs/": "needs finished runs (tests/test_report.py makes and plots them)",
    "largebatch plan runs/": "needs a finished run that measured the noise scale (tests/test_plan.py)",
    ".venv/bin/python -m largebatch.launchers.testcluster": "needs root, network namespaces and sshd "
                                                             "(tests/test_multihost.py)",
}

# Lines expected to fail until a change outside the docs lands: prefix -> what is missing.
PENDING = {}

# Free names a snippet may use: what the reader's own script already has.
PLACEHOLDERS = {"model", "loader", "sampler", "dataset", "steps", "steps_per_epoch", "x", "y",
                "x_shard", "y_shard"}

STAND_IN_NAMES = ("exp.yaml", "EXP.yaml")
PROGRAM_TIMEOUT = 120


def _blocks():
    """(doc, line, language, text) of every fenced block."""
    out = []
    for path in DOCS:
        text = path.read_text()
        for m in re.finditer(r"^```([\w-]*)[ \t]*\n(.*?)^```[ \t]*$", text, re.S | re.M):
            out.append((path.relative_to(ROOT).as_posix(), text[:m.start()].count("\n") + 1, m.group(1), m.group(2)))
    return out


BLOCKS = _blocks()


def _stand_in():
    """docs/experiments.md's first yaml block: the shortest useful experiment file."""
    for doc, _, lang, text in BLOCKS:
        if doc == "docs/experiments.md" and lang == "yaml":
            return text
    raise AssertionError("docs/experiments.md has no yaml block (the stand-in for exp.yaml)")


def _shell_lines(text):
    """Joined, comment-free command lines of a bash block."""
    lines, current = [], ""
    for raw in text.splitlines():
        current += raw.rstrip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        words = shlex.split(current, comments=True)
        if words:
            lines.append(" ".join(shlex.quote(w) if re.search(r"[\s'\"]", w) else w for w in words))
        current = ""
    return lines


def _match(prefixes, line):
    return next((reason for prefix, reason in prefixes.items() if line.startswith(prefix)), None)


def _shell_cases():
    cases = []
    for doc, line, lang, text in BLOCKS:
        if lang == "bash":
            for cmd in _shell_lines(text):
                cases.append(pytest.param(cmd, id=f"{doc}:{line}:{cmd[:60]}"))
        elif lang == "console":
            continue                           # transcripts: test_console_transcript
    return cases


def _is_largebatch(words):
    return bool(words) and words[0] in ("largebatch", ".venv/bin/largebatch")


def _env():
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1",
               OMPI_MCA_btl_vader_single_copy_mechanism="none", OMP_NUM_THREADS="1")
    env["PATH"] = os.pathsep.join([str(BIN), env.get("PATH", "")])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def test_skip_list_is_small_and_used():
    lines = [c.values[0] for c in _shell_cases()]
    assert len(SKIP) <= 12, "the skip list should stay short: make more doc lines runnable instead"
    for prefix in list(SKIP) + list(PENDING):
        assert any(line.startswith(prefix) for line in lines), f"SKIP/PENDING entry {prefix!r} matches no doc line"


@pytest.mark.parametrize("cmd", _shell_cases())
def test_shell_line(cmd, tmp_path):
    reason = _match(SKIP, cmd)
    if reason is not None:
        pytest.skip(reason)
    words = shlex.split(cmd)
    assert _is_largebatch(words), (f"{cmd!r}: a doc shell line that is not a largebatch command; "
                                   "make it one, or add it to SKIP with the reason it cannot run here")
    pending = _match(PENDING, cmd)
    stand_in = tmp_path / "exp.yaml"
    stand_in.write_text(_stand_in())
    argv = [LARGEBATCH] + [str(stand_in) if w in STAND_IN_NAMES else w for w in words[1:]]
    if argv[1] in ("run", "sbatch") and "--dry-run" not in argv:
        argv.append("--dry-run")
    proc = subprocess.run(argv, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=60)
    out = (proc.stdout + proc.stderr)[-3000:]
    if pending is not None:
        if proc.returncode != 0:
            pytest.xfail(f"pending: {pending}")
        return
    assert proc.returncode == 0, f"{' '.join(argv)} exited {proc.returncode}:\n{out}"
    assert "Traceback" not in out, out


def _transcripts():
    """(id, [(command, expected output lines, file text for `cat`)]) of every console block."""
    out = []
    for doc, line, lang, text in BLOCKS:
        if lang != "console":
            continue
        steps, current = [], None
        for raw in text.splitlines():
            if raw.startswith("$ "):
                current = [raw[2:], []]
                steps.append(current)
            elif current is None:
                raise AssertionError(f"{doc}:{line}: a console block must start with a `$ ` command line")
            else:
                current[1].append(raw)
        out.append(pytest.param(steps, id=f"{doc}:{line}"))
    return out


def _expected_matches(expected, got):
    if len(expected) != len(got):
        return False
    for e, g in zip(expected, got):
        pattern = ".*".join(re.escape(part) for part in e.split("..."))
        if not re.fullmatch(pattern, g):
            return False
    return True


@pytest.mark.parametrize("steps", _transcripts())
def test_console_transcript(steps, tmp_path):
    for command, expected in steps:
        cat = re.fullmatch(r"cat (\S+)", command)
        if cat:                                       # the transcript shows the file: write it
            (tmp_path / cat.group(1)).write_text("\n".join(expected) + "\n")
            continue
        words = shlex.split(command)
        reason = _match(SKIP, command)
        if reason is not None:
            pytest.skip(reason)
        assert _is_largebatch(words), f"{command!r}: a transcript command that is not a largebatch command"
        proc = subprocess.run(["bash", "-c", "exec 2>&1\n" + command], cwd=tmp_path, env=_env(),
                              capture_output=True, text=True, timeout=60)
        got = proc.stdout.rstrip("\n").splitlines()
        assert _expected_matches(expected, got), (
            f"$ {command}\n--- the doc shows ---\n" + "\n".join(expected) + "\n--- it prints ---\n" + "\n".join(got))


# ---------------------------------------------------------------------------------------------
# python blocks
# ---------------------------------------------------------------------------------------------
def _free_names(tree):
    bound, used = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            (used if isinstance(node.ctx, ast.Load) else bound).add(node.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                bound.add((alias.asname or alias.name).split(".")[0])
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            bound.add(node.name)
    return used - bound - set(dir(builtins))


def _has_ellipsis(tree):
    return any(isinstance(n, ast.Constant) and n.value is Ellipsis for n in ast.walk(tree))


def _python_cases():
    return [pytest.param(text, id=f"{doc}:{line}") for doc, line, lang, text in BLOCKS if lang == "python"]


@pytest.mark.parametrize("source", _python_cases())
def test_python_block(source, tmp_path):
    tree = ast.parse(source)                                       # a SyntaxError fails here
    free = _free_names(tree)
    unknown = sorted(free - PLACEHOLDERS)
    assert not unknown, (f"the snippet uses {', '.join(unknown)} without importing or defining it "
                         f"(placeholders allowed: {', '.join(sorted(PLACEHOLDERS))})")
    if free or _has_ellipsis(tree):
        return                                                     # a fragment of the reader's script
    script = tmp_path / "snippet.py"
    script.write_text(source)
    uses_horovod = any(isinstance(n, (ast.Import, ast.ImportFrom)) and any(
        (getattr(n, "module", None) or a.name).startswith("horovod") for a in n.names) for n in ast.walk(tree))
    if uses_horovod:
        cmd = [str(BIN / "horovodrun"), "-np", "2", "-H", "localhost:2", sys.executable, str(script)]
    else:
        cmd = [sys.executable, str(script)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=PROGRAM_TIMEOUT)
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}:\n{(proc.stdout + proc.stderr)[-4000:]}"


def test_some_python_block_is_a_complete_program():
    complete = [p for p in _python_cases()
                if not _free_names(ast.parse(p.values[0])) and not _has_ellipsis(ast.parse(p.values[0]))]
    assert complete, "no python block in the docs is a complete program any more"


# ---------------------------------------------------------------------------------------------
# yaml blocks and the examples
# ---------------------------------------------------------------------------------------------
def _experiment_yaml_cases():
    cases = []
    for doc, line, lang, text in BLOCKS:
        if lang == "yaml":
            data = yaml.safe_load(text)
            if isinstance(data, dict) and "framework" in data:
                cases.append(pytest.param(text, id=f"{doc}:{line}"))
    return cases


def _validate(path, *overrides, cwd):
    proc = subprocess.run([LARGEBATCH, "validate", str(path), *overrides], cwd=cwd, env=_env(),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"largebatch validate {path} {' '.join(overrides)}:\n{proc.stdout}{proc.stderr}"
    return proc.stdout


@pytest.mark.parametrize("text", _experiment_yaml_cases())
def test_experiment_yaml_block_validates(text, tmp_path):
    data = yaml.safe_load(text)
    script = (data.get("launcher") or {}).get("host_discovery_script") if isinstance(data.get("launcher"), dict) else None
    folder = tmp_path / "exp"
    folder.mkdir()
    if script:                                     # the discovery script the YAML names, next to it
        target = folder / script
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text("#!/bin/sh\necho localhost:2\n")
        target.chmod(0o755)
    path = folder / "exp.yaml"
    path.write_text(text)
    _validate(path, cwd=folder)


def _fake_imagenet(root):
    for split in ("train", "val"):
        for cls in ("n01440764", "n01443537"):
            (root / split / cls).mkdir(parents=True)
    return root


@pytest.mark.parametrize("example", sorted(p.name for p in (ROOT / "examples").glob("*.yaml")))
def test_example_validates(example, tmp_path):
    data = yaml.safe_load((ROOT / "examples" / example).read_text())
    section = {k: (v if isinstance(v, dict) else {}) for k, v in data.items()}
    overrides = []
    if section.get("data", {}).get("kind") == "folder":        # ImageNet: two class folders here
        fake = _fake_imagenet(tmp_path / "imagenet")
        overrides = [f"data.path={fake / 'train'}", f"data.val_path={fake / 'val'}"]
        for key in ("data", "model"):
            if section.get(key, {}).get("num_classes") is not None:
                overrides.append(f"{key}.num_classes=2")
    if "label_smoothing" in str(data.get("train")) and not _has_key("train", "label_smoothing"):
        pytest.xfail("train.label_smoothing is not in largebatch/config.py's schema yet (issue 13 §6)")
    _validate(ROOT / "examples" / example, *overrides, cwd=tmp_path)


def _has_key(section, key):
    from largebatch import config
    return key in config.SCHEMA.get(section, {})


def test_largebatch_on_path():
    assert shutil.which("largebatch", path=str(BIN)), "the venv has no largebatch entry point (pip install -e .)"


def test_every_doc_page_is_linked_from_the_readme():
    readme = (ROOT / "README.md").read_text()
    unlinked = [p.name for p in DOCS[1:] if f"(docs/{p.name})" not in readme]
    assert unlinked == []


def test_the_optimizer_key_table_is_the_registry():
    """docs/experiments.md's optimizer table: each key's 'used by' column and the name list are
    what largebatch.registry says."""
    from largebatch import registry
    text = (ROOT / "docs" / "experiments.md").read_text()
    table = text[text.index("### optimizer"):text.index("### schedule")]
    rows = {m.group(1): m.group(2).strip() for m in re.finditer(r"^\| `(\w+)` \[[^\]]*\]+ \| ([^|]*) \|", table, re.M)}
    names = registry.names()
    for key in registry.HYPERPARAMETERS:
        users = [n for n in names if key in registry.get(n).keys]
        written = names if rows[key] == "all" else tuple(u.strip() for u in rows[key].split(","))
        assert sorted(written) == sorted(users), key
    assert all(f"`{n}`" in table.split("\n")[3] for n in names)


def test_make_demo_ends_by_saying_how_to_use_the_commands():
    """After `make demo` a new user's shell has no `largebatch` on PATH: the demo says to activate
    the venv, and the README says it where the commands start."""
    out = subprocess.run(["make", "-n", "-s", "demo", "VENV=/nonexistent"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60).stdout
    assert "activate it first:  . /nonexistent/bin/activate" in out
    assert "largebatch report runs/synthetic_torch" in out
    assert "**activate it** (`. .venv/bin/activate`)" in (ROOT / "README.md").read_text()
