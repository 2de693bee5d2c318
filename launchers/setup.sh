#!/usr/bin/env bash
# Idempotent setup of the largebatch stack on a Debian machine (root, Python 3.11, CPU).
#   system packages (Open MPI, cmake, compilers) -> .venv -> torch, TF, tools
#   -> Horovod 0.28.1 wheel (built once from the patched sdist, cached outside the checkout)
#   -> pip install -e . -> verify -> ready stamp.
# Any failure prints one line with the reason and the log path and leaves no ready stamp.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${LARGEBATCH_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
TORCH_VERSION=2.13.0
TF_VERSION=2.21.0
HOROVOD_VERSION=0.28.1
CACHE="${LARGEBATCH_CACHE:-$HOME/.cache/largebatch}"
LOG_DIR="$CACHE/logs"
mkdir -p "$LOG_DIR"
LOG="$LOG_DIR/setup-$(date +%Y%m%d-%H%M%S)-$$.log"
STAMP="$VENV/.largebatch-ready"
PIP_PKGS=(mpi4py pyyaml pytest pytest-timeout hypothesis numpy tqdm matplotlib packaging pillow tensorboard)

say() { echo "[setup] $*"; }
die() { echo "[setup] FAILED: $1 (log: $LOG)" >&2; exit 1; }
run() { "$@" >>"$LOG" 2>&1; }

PYVER="$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')" \
  || die "no working $PYTHON found; install Python 3.11"
KEY="py${PYVER}-torch${TORCH_VERSION}-tf${TF_VERSION}-horovod${HOROVOD_VERSION}"
WHEEL_DIR="$CACHE/wheels/$KEY"
STAMP_TEXT="$KEY $(cat "$ROOT/setup.py" "$ROOT/pyproject.toml" "$ROOT/launchers/setup.sh" | sha1sum | cut -c1-12)"

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$STAMP_TEXT" ]]; then
  say "stack ready ($KEY), nothing to do"
  exit 0
fi
rm -f "$STAMP"
say "log: $LOG"

# 1. System packages: only what is missing; apt needs root.
need_apt=()
command -v mpirun >/dev/null 2>&1 || need_apt+=(openmpi-bin)
command -v mpicxx >/dev/null 2>&1 || need_apt+=(libopenmpi-dev)
command -v cmake >/dev/null 2>&1 || need_apt+=(cmake)
command -v g++ >/dev/null 2>&1 || need_apt+=(g++)
command -v make >/dev/null 2>&1 || need_apt+=(make)
# the multi-host test cluster (launchers/testcluster.py): one sshd per namespace host, started by
# the tests themselves; no system ssh service is started or enabled
[[ -x /usr/sbin/sshd ]] || need_apt+=(openssh-server)
# the throw-away Slurm of the tests (launchers/slurm_testbed.py): daemons started by the tests only
slurm_new=""
command -v slurmctld >/dev/null 2>&1 || { need_apt+=(slurmctld slurmd slurm-client libpmix2); slurm_new=1; }
command -v munged >/dev/null 2>&1 || { need_apt+=(munge); slurm_new=1; }
command -v ssh >/dev/null 2>&1 || need_apt+=(openssh-client)
command -v ip >/dev/null 2>&1 || need_apt+=(iproute2)
command -v nsenter >/dev/null 2>&1 || need_apt+=(util-linux)
if ((${#need_apt[@]})); then
  say "installing system packages: ${need_apt[*]}"
  SUDO=""; [[ $(id -u) -eq 0 ]] || SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  run $SUDO apt-get update || die "apt-get update failed"
  # policy-rc.d 101: packages are installed, their services (sshd, ...) are not started
  POLICY=/usr/sbin/policy-rc.d; made_policy=""
  if [[ ! -e $POLICY ]]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$POLICY" >/dev/null && $SUDO chmod +x "$POLICY" && made_policy=1
  fi
  run $SUDO apt-get install -y --no-install-recommends "${need_apt[@]}" \
    || { [[ -n $made_policy ]] && $SUDO rm -f "$POLICY"; die "apt-get install ${need_apt[*]} failed"; }
  [[ -n $made_policy ]] && $SUDO rm -f "$POLICY"
  # Debian enables the daemons for boot; the tests start their own, nothing else should
  if [[ -n $slurm_new ]]; then
    for svc in munge slurmctld slurmd; do $SUDO update-rc.d "$svc" disable >>"$LOG" 2>&1 || true; done
  fi
fi
for tool in mpirun mpicxx cmake g++; do
  command -v "$tool" >/dev/null 2>&1 || die "$tool still missing after the system-package step"
done

# 2. Virtual environment and Python packages.
if [[ ! -x "$VENV/bin/python" ]]; then
  say "creating $VENV"
  run "$PYTHON" -m venv "$VENV" || die "python -m venv failed"
fi
PY="$VENV/bin/python"
run "$PY" -m pip install -q --upgrade pip setuptools wheel || die "pip self-upgrade failed"
say "installing torch==$TORCH_VERSION tensorflow-cpu==$TF_VERSION and tools"
run "$PY" -m pip install "torch==$TORCH_VERSION" || die "pip install torch==$TORCH_VERSION failed"
run "$PY" -m pip install "tensorflow-cpu==$TF_VERSION" "${PIP_PKGS[@]}" \
  || die "pip install tensorflow-cpu==$TF_VERSION ${PIP_PKGS[*]} failed"

# 3. Horovod: a cached wheel, or build one from the patched sdist.
have_wheel() { compgen -G "$WHEEL_DIR/horovod-$HOROVOD_VERSION-*.whl" >/dev/null; }
if ! have_wheel; then
  say "building horovod $HOROVOD_VERSION (about 9 minutes on 2 cores; cached in $WHEEL_DIR)"
  BUILD="$(mktemp -d)"
  trap 'rm -rf "$BUILD"' EXIT
  run "$PY" -m pip download --no-deps --no-binary :all: -d "$BUILD" "horovod==$HOROVOD_VERSION" \
    || die "download of the horovod $HOROVOD_VERSION sdist failed"
  run tar -xzf "$BUILD/horovod-$HOROVOD_VERSION.tar.gz" -C "$BUILD" || die "unpacking the horovod sdist failed"
  "$PY" "$ROOT/launchers/patch_horovod.py" "$BUILD/horovod-$HOROVOD_VERSION" >>"$LOG" 2>&1 \
    || die "$(tail -n1 "$LOG")"
  (
    export HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITH_MPI=1 HOROVOD_WITH_GLOO=1
    export HOROVOD_WITHOUT_MXNET=1 HOROVOD_CPU_OPERATIONS=MPI MAKEFLAGS="-j$(nproc)"
    "$PY" -m pip wheel --no-build-isolation --no-deps -w "$BUILD/dist" "$BUILD/horovod-$HOROVOD_VERSION"
  ) >>"$LOG" 2>&1 || die "horovod build failed"
  mkdir -p "$WHEEL_DIR"
  # Copy then rename, so a crash never leaves a half-written wheel in the cache.
  for whl in "$BUILD"/dist/horovod-*.whl; do
    cp "$whl" "$WHEEL_DIR/.$(basename "$whl").tmp" && mv "$WHEEL_DIR/.$(basename "$whl").tmp" "$WHEEL_DIR/$(basename "$whl")"
  done
fi
say "installing cached horovod wheel from $WHEEL_DIR"
run "$PY" -m pip install --no-deps --force-reinstall "$WHEEL_DIR"/horovod-"$HOROVOD_VERSION"-*.whl \
  || die "installing the cached horovod wheel failed (delete $WHEEL_DIR to rebuild)"
# horovod's own runtime needs (its wheel was installed with --no-deps)
run "$PY" -m pip install cloudpickle psutil cffi || die "pip install of horovod's runtime dependencies failed"

# 4. The project itself.
run "$PY" -m pip install --no-deps --no-build-isolation -e "$ROOT" || die "pip install -e . failed"

# 5. Verify before marking ready.
CHECK="$("$VENV/bin/horovodrun" --check-build 2>>"$LOG")" || die "horovodrun --check-build failed"
echo "$CHECK" >>"$LOG"
for item in TensorFlow PyTorch MPI Gloo; do
  grep -Eq "\[X\] $item" <<<"$CHECK" || die "horovod was built without $item (delete $WHEEL_DIR to rebuild)"
done
echo "$STAMP_TEXT" >"$STAMP"
say "stack ready ($KEY)"
