#!/usr/bin/env bash
# The GPU check in one run, on a machine with a CUDA GPU, from the repository root:
#
#     bash bench/gpu_check.sh          # everything lands in $OUT (default ./gpu-check-out)
#
# It uses the machine's own Python and PyTorch (any version; Horovod and TensorFlow are not
# needed): largebatch is installed without dependencies into a scratch folder (pip --no-deps
# --no-index --target, or setup.py's package_dir laid out by hand when pip cannot build), then
# it runs the `gpu` tests (tests/test_gpu.py: first the eager paths, then fused=True, which
# compiles) and the GPU optimizer-cost benchmark (bench/torch_optimizer_cost.py --device cuda).
# The whole run stays within GPU_CHECK_BUDGET_S (default 345 s): tests get at most 240 s,
# the benchmark at most 180 s. $OUT gets gpu_check.log (versions, nvidia-smi, every step),
# gpu_tests_{eager,fused}.{log,xml} (junit) and bench/torch_optimizer_cost_cuda.{csv,json,png}.
#
# Without CUDA it stops at once: one line on stderr, exit code 3. Exit 0: tests passed and the
# benchmark measured every row; 1 otherwise (the last line says what failed).
#
# Environment: OUT, PYTHON (the interpreter; default: the first of python3, python, .venv/bin/python
# that imports torch), GPU_CHECK_BUDGET_S, GPU_CHECK_PLUMBING_ONLY=1 (test this script on a machine
# without CUDA: go on past the CUDA check; the tests then skip and the benchmark refuses).
set -u

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${OUT:-./gpu-check-out}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
BUDGET=${GPU_CHECK_BUDGET_S:-345}
T0=$(date +%s)
LOG="$OUT/gpu_check.log"
: > "$LOG"
export PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1

say() { echo "gpu_check: $*" | tee -a "$LOG"; }
fail() { local code=$1; shift; echo "gpu_check: FAIL: $*" >> "$LOG"; echo "gpu_check: FAIL: $*" >&2; exit "$code"; }
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
min() { if [ "$1" -lt "$2" ]; then echo "$1"; else echo "$2"; fi; }

# ---------------------------------------------------------------- a Python with torch, and CUDA
PY=""
for cand in "${PYTHON:-}" python3 python "$REPO/.venv/bin/python"; do
    [ -n "$cand" ] && command -v "$cand" >/dev/null 2>&1 || continue
    if timeout 120 "$cand" -c "import torch" >/dev/null 2>&1; then PY=$(command -v "$cand"); break; fi
done
[ -n "$PY" ] || fail 3 "no Python on this machine imports torch (tried \$PYTHON, python3, python, .venv/bin/python)"

CUDA_LINE=$(cd / && timeout 120 "$PY" - 2>&1 <<'EOF'
import torch
if not torch.cuda.is_available():
    build = torch.version.cuda or "none: a CPU-only build"
    print(f"no CUDA device: torch {torch.__version__} (CUDA {build}) at {torch.__file__} sees no GPU "
          f"(torch.cuda.is_available() is False)")
    raise SystemExit(3)
print(f"{torch.cuda.device_count()} CUDA device(s), the first: {torch.cuda.get_device_name(0)}")
EOF
)
rc=$?
if [ "$rc" -ne 0 ] && [ "${GPU_CHECK_PLUMBING_ONLY:-0}" != 1 ]; then
    [ "$rc" -eq 124 ] && fail 3 "torch.cuda.is_available() did not answer within 120 s ($PY)"
    fail 3 "$(printf '%s\n' "$CUDA_LINE" | tail -n 1)"
fi
say "$CUDA_LINE"
[ "$rc" -ne 0 ] && say "GPU_CHECK_PLUMBING_ONLY=1: going on without CUDA (tests will skip, the benchmark will refuse)"

# ---------------------------------------------------------------- versions
{
    echo "== $(date -u +%Y-%m-%dT%H:%M:%SZ)  repo $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?')  budget ${BUDGET}s"
    echo "== nvidia-smi"
    timeout 30 nvidia-smi 2>&1 || echo "(nvidia-smi not available)"
    echo "== python and packages ($PY)"
    (cd / && timeout 120 "$PY" - <<'EOF'
import importlib, platform, sys
print("python", sys.version.split()[0], platform.platform())
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn",
      torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None)
if torch.cuda.is_available():
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        print(f"device {i}: {p.name}, {p.total_memory / 2**30:.1f} GiB, sm {p.major}.{p.minor}")
for name in ("triton", "numpy", "pytest", "pytest_timeout", "yaml", "matplotlib", "horovod", "tensorflow"):
    try:
        if importlib.util.find_spec(name) is None:
            print(f"{name}: not installed")
            continue
        print(f"{name}:", getattr(importlib.import_module(name), "__version__", "?"))
    except Exception as err:                     # a broken package: say so, go on
        print(f"{name}: not importable ({type(err).__name__}: {err})")
EOF
    ) 2>&1
} | tee -a "$LOG"

# ---------------------------------------------------------------- install into a scratch folder
SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")
trap 'rm -rf "$SCRATCH"' EXIT
SITE="$SCRATCH/site"
mkdir -p "$SCRATCH/src" "$SITE"
# build from a copy, so that pip leaves no build/ or egg-info in the checkout
cp -r "$REPO/setup.py" "$REPO/pyproject.toml" "$REPO/README.md" "$REPO/largebatch" "$REPO/frameworks" "$REPO/launchers" "$SCRATCH/src/"
if timeout 120 "$PY" -m pip install --no-deps --no-build-isolation --no-index --disable-pip-version-check -q \
        --target "$SITE" "$SCRATCH/src" >> "$LOG" 2>&1; then
    say "installed largebatch (pip --no-deps --target) into $SITE"
else
    say "pip could not install largebatch (see the log); laying out setup.py's package_dir by hand"
    "$PY" - "$SCRATCH/src" "$SITE" >> "$LOG" 2>&1 <<'EOF' || fail 1 "could not lay out the package from setup.py"
import ast, pathlib, shutil, sys
src, site = map(pathlib.Path, sys.argv[1:])
call = next(n for n in ast.walk(ast.parse((src / "setup.py").read_text()))
            if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
mapping = ast.literal_eval(next(k.value for k in call.keywords if k.arg == "package_dir"))
for pkg, folder in sorted(mapping.items(), key=lambda kv: kv[0].count(".")):   # parents first
    shutil.copytree(src / folder, site.joinpath(*pkg.split(".")), dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("__pycache__"))
    print(f"{folder} -> {site.joinpath(*pkg.split('.'))}")
EOF
fi
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"

missing=$(cd "$SCRATCH" && "$PY" -c "import importlib.util as u
print(' '.join(m for m in ('numpy', 'pytest') if u.find_spec(m) is None))")
if [ -n "$missing" ]; then
    say "missing: $missing; asking pip (whatever index this machine reaches)"
    timeout 120 "$PY" -m pip install -q --disable-pip-version-check --target "$SITE" $missing >> "$LOG" 2>&1 \
        || fail 1 "$missing not installed and pip could not get them"
fi
(cd "$SCRATCH" && "$PY" -c "import largebatch, largebatch.torch as t; print('largebatch', largebatch.__version__,
    'from', largebatch.__file__, '; largebatch.torch from', t.__file__)") 2>&1 | tee -a "$LOG"
[ "${PIPESTATUS[0]}" -eq 0 ] || fail 1 "largebatch.torch does not import from $SITE (see $LOG)"
say "set-up took $(( $(date +%s) - T0 )) s"

# ---------------------------------------------------------------- the gpu tests
# From the scratch folder, so the checkout's ./largebatch (without its torch adapter) does not shadow
# the installed package; pytest.ini's addopts and timeout (pytest-timeout) are left out.
TESTS_END=$(( $(date +%s) + $(min 240 $(( $(left) - 150 ))) ))
run_tests() {   # $1 = eager|fused, $2 = -k expression
    local t=$(( TESTS_END - $(date +%s) ))
    if [ "$t" -lt 20 ]; then say "tests ($1): no time left, not run"; echo 124 > "$OUT/gpu_tests_$1.rc"; return; fi
    say "tests ($1): pytest tests/test_gpu.py -m gpu -k '$2' (timeout ${t}s)"
    (cd "$SCRATCH" && timeout -s INT -k 15 "$t" "$PY" -m pytest "$REPO/tests/test_gpu.py" -m gpu -k "$2" \
        --rootdir "$REPO" -c "$REPO/pytest.ini" -o addopts="" -p no:cacheprovider \
        -W ignore::pytest.PytestConfigWarning -ra -q --durations=10 --junitxml "$OUT/gpu_tests_$1.xml") \
        > "$OUT/gpu_tests_$1.log" 2>&1
    echo $? > "$OUT/gpu_tests_$1.rc"
    tail -n 40 "$OUT/gpu_tests_$1.log" | tee -a "$LOG"
}
run_tests eager "not fused"
run_tests fused "fused"

# ---------------------------------------------------------------- the GPU benchmark
T_BENCH=$(min 180 $(( $(left) - 5 )))
say "benchmark: bench/torch_optimizer_cost.py --device cuda (timeout ${T_BENCH}s)"
if [ "$T_BENCH" -ge 40 ]; then
    (cd "$SCRATCH" && timeout -k 10 "$T_BENCH" "$PY" "$REPO/bench/torch_optimizer_cost.py" --device cuda \
        --out "$OUT/bench" --budget-s $(( T_BENCH - 20 ))) > "$OUT/bench.log" 2>&1
    bench_rc=$?
    tee -a "$LOG" < "$OUT/bench.log"
else
    say "benchmark: no time left, not run"
    bench_rc=124
fi

# ---------------------------------------------------------------- verdict
eager_rc=$(cat "$OUT/gpu_tests_eager.rc")
fused_rc=$(cat "$OUT/gpu_tests_fused.rc")
summary() { grep -E "^(=+ )?[0-9]+ (passed|failed|skipped|error)|no tests ran|^=+ .* in [0-9.]+s" "$1" | tail -n 1; }
say "tests eager: rc $eager_rc, $(summary "$OUT/gpu_tests_eager.log")"
say "tests fused: rc $fused_rc, $(summary "$OUT/gpu_tests_fused.log")"
say "benchmark: rc $bench_rc; results in $OUT (took $(( $(date +%s) - T0 )) s)"
if [ "$eager_rc" -ne 0 ] || [ "$fused_rc" -ne 0 ] || [ "$bench_rc" -ne 0 ]; then
    echo "gpu_check: FAIL: tests eager rc $eager_rc, fused rc $fused_rc, benchmark rc $bench_rc (logs in $OUT)" | tee -a "$LOG" >&2
    exit 1
fi
say "OK"
