from setuptools import setup

setup(
    name="largebatch",
    version="0.1.0",
    description="Layer-wise adaptive rate scaling (LARS, LARC, LAMB, CLARS) and the large-batch "
                "recipe for PyTorch and Keras 3 on Horovod",
    python_requires=">=3.9",
    packages=["largebatch", "largebatch.config", "largebatch.torch", "largebatch.keras", "largebatch.launchers", "largebatch.runner"],
    package_dir={
        "largebatch": "largebatch",
        "largebatch.torch": "frameworks/torch",
        "largebatch.keras": "frameworks/keras",
        "largebatch.launchers": "launchers",
        "largebatch.runner": "launchers/runner",        # the per-rank runner sits above the adapters
    },
    install_requires=["numpy", "pyyaml", "tqdm", "pillow"],
    extras_require={"torch": ["torch>=2.1"], "keras": ["tensorflow>=2.16"], "test": ["pytest", "hypothesis"]},
    entry_points={"console_scripts": ["largebatch=largebatch.launchers.cli:main"]},
)
