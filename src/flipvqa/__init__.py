"""flipvqa: Flipped-VQA (LLaMA-based multiple-choice video question answering).

"The reference", in comments throughout the package, is the authors' code (mlvlab/Flipped-VQA);
docs/faithfulness.md writes out what it computes, where flipvqa does the same, and every departure.
"""

__version__ = "0.1.0"
