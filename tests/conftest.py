import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
# TensorFlow's C++ start-up chatter buries test output; child processes inherit this too
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
