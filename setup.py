"""pnapo_jax: PNAPO preference optimization for rectified-flow text-to-image models in JAX."""

from setuptools import find_packages, setup

setup(
    name="pnapo_jax",
    version="0.1.0",
    description="Prior Noise-Aware Preference Optimization (PNAPO) for FLUX-class models in JAX/Flax.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["pnapo_jax", "pnapo_jax.*"]),
    package_data={"pnapo_jax": ["assets/*", "assets/*/*"]},
    install_requires=[
        "jax>=0.7",
        "flax>=0.11",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "ml_collections>=1.0",
        "grain>=0.2.10",
        "tensorflow-datasets>=4.9.8",
        "array_record>=0.7",
        "transformers>=4.50",
        "safetensors>=0.7",
        "huggingface_hub>=0.30",
        "absl-py>=2.0",
        "etils[epath]>=1.5",
        "numpy>=1.26",
        "tqdm>=4.66",
        "tensorboardX>=2.6",
        "matplotlib>=3.8",
        "pillow>=10",
    ],
    extras_require={
        # Test-only ground truth (PyTorch CPU, diffusers); never needed for training.
        "dev": [
            "torch==2.13.0",
            "diffusers>=0.35",
            "peft>=0.15",  # diffusers' load_lora_weights, to check our LoRA export
            "pytest>=8",
            "pytest-xdist>=3.5",
            "ruff>=0.6",
            "nbclient>=0.10",  # tests/test_notebooks.py executes notebooks/ in a kernel
            "nbformat>=5.10",
            "ipykernel>=6.29",
        ],
        # The AOT fit check's compile-only TPU target (no TPU needed). Not in `dev`: with libtpu installed, every
        # JAX process on a machine without TPU chips probes for one and prints libtpu's errors.
        "aot": ["libtpu==0.0.42.*"],
        "tpu": ["jax[tpu]==0.10.2", "etils[epath-gcs]"],  # gcsfs for gs:// workdirs
        # NVIDIA GPUs (CUDA 12 wheels, cuDNN included): configs/flux_gpu.py's cuDNN flash attention.
        "gpu": ["jax[cuda12]==0.10.2"],
    },
)
