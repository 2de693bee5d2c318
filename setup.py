"""The package layout (the metadata, dependencies and extras are in pyproject.toml): the
adapters and launchers live outside ``largebatch/`` in the checkout and install under it."""
from setuptools import setup

setup(
    packages=["largebatch", "largebatch.config", "largebatch.torch", "largebatch.keras", "largebatch.launchers",
              "largebatch.runner"],
    package_dir={
        "largebatch": "largebatch",
        "largebatch.torch": "frameworks/torch",
        "largebatch.keras": "frameworks/keras",
        "largebatch.launchers": "launchers",
        "largebatch.runner": "launchers/runner",        # the per-rank runner sits above the adapters
    },
)
