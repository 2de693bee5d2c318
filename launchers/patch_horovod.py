"""Apply the two source fixes Horovod 0.28.1 needs to build against torch >= 2.1 / TF >= 2.16.

Run with any Python 3 (stdlib only) on an unpacked horovod sdist:

    python launchers/patch_horovod.py path/to/horovod-0.28.1

Why (see docs/install.md):
1. C++17: torch >= 2.1 headers need it; horovod 0.28.1 asks for C++14
   (upstream issues #3941, #3996, #4014; fixed on master by PR #3998, never released).
2. The XLA custom-call op is dropped from CPU builds: TF 2.21's XLA headers include
   highwayhash, which the TF wheel does not ship; the op only does anything on GPU builds.

Every replacement must match exactly once. If the sdist's text has moved on, the script
stops with a one-line reason and changes nothing, rather than half-patching the tree.
"""
import sys
from pathlib import Path

CXX14 = "set(CMAKE_CXX_STANDARD 14)"
CXX17 = "set(CMAKE_CXX_STANDARD 17)"
XLA_LINE = 'list(APPEND TF_SOURCES "${PROJECT_SOURCE_DIR}/horovod/tensorflow/xla_mpi_ops.cc")'

# (relative path, old text, new text)
FIXES = [
    ("CMakeLists.txt", CXX14, CXX17),
    ("horovod/torch/CMakeLists.txt", CXX14, CXX17),
    ("horovod/tensorflow/CMakeLists.txt", XLA_LINE, "# xla_mpi_ops.cc dropped by largebatch (CPU build, see docs/install.md)"),
]


def plan(root: Path):
    """Return [(path, new_text)] or raise SystemExit with a one-line reason."""
    edits = []
    for rel, old, new in FIXES:
        path = root / rel
        if not path.is_file():
            raise SystemExit(f"patch_horovod: {path} not found; expected an unpacked horovod 0.28.1 sdist")
        text = path.read_text()
        count = text.count(old)
        if count != 1:
            raise SystemExit(
                f"patch_horovod: {rel}: expected exactly one line {old!r}, found {count}; "
                "the sdist changed, re-check the fixes in docs/install.md")
        edits.append((path, text.replace(old, new)))
    return edits


def main(argv):
    if len(argv) != 2:
        raise SystemExit("usage: patch_horovod.py HOROVOD_SOURCE_DIR")
    edits = plan(Path(argv[1]))
    for path, text in edits:
        path.write_text(text)
    print(f"patch_horovod: applied {len(edits)} fixes in {argv[1]}")


if __name__ == "__main__":
    main(sys.argv)
