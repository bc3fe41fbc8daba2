"""flipvqa: Flipped-VQA (LLaMA-based multiple-choice video question answering)."""

__version__ = "0.1.0"
