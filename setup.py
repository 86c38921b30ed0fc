"""hf_moe_mt: sparse Mixture-of-Experts encoder-decoder for multilingual MT, transformers-compatible."""
from setuptools import find_packages, setup

setup(
    name="hf_moe_mt",
    version="0.1.0",
    description="DeepSpeed-MoE / Z-code M3 style sparse MoE translation models for Hugging Face transformers",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["hf_moe_mt", "hf_moe_mt.*"]),
    package_data={"hf_moe_mt.tools": ["*.md"], "hf_moe_mt": ["configs/*.yaml"]},
    install_requires=[
        "torch>=2.4",
        "transformers>=5.24,<6",
        "accelerate>=1.0",
        "datasets>=3.0",
        "tokenizers>=0.20",
        "safetensors>=0.4",
        "sacrebleu>=2.4",
        "huggingface_hub>=0.30",
        "pyyaml>=6.0",
        "tqdm",
        "matplotlib>=3.7",
    ],
    extras_require={
        "deepspeed": ["deepspeed>=0.16"],
        # parameterized, httpx: imported by transformers' common model tests (tests/conformance)
        "dev": ["pytest>=8.0", "deepspeed>=0.16", "tensorboard>=2.14", "parameterized", "httpx", "peft>=0.17"],
    },
    entry_points={"console_scripts": ["hf-moe-mt=hf_moe_mt.cli:main"]},
)
