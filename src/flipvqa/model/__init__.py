"""The LLaMA backbone and the Flipped-VQA wrapper around it."""

from .flipped import FlipConfig, FlippedVQA
from .llama import ModelArgs, Transformer

__all__ = ["FlipConfig", "FlippedVQA", "ModelArgs", "Transformer"]
