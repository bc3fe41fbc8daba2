"""``--quantize int8|nf4``: the frozen backbone's block linears stored quantized (torchao).

Only the seven linear layers of each transformer block (``wq wk wv wo`` and ``w1 w2 w3``: all but
about 4% of LLaMA-7B's weights) are quantized. The embedding, the norms, the output layer and every
trainable Flipped-VQA part keep their dtype, and the losses are computed as without quantization:
a quantized linear dequantizes its weight for each matmul, so gradients still reach its input
(the adapters sit before and around these layers). Checkpoints hold the trainable weights only,
so they are the same files with or without ``--quantize`` and load either way.

* int8: weight-only, one scale per output row (torchao ``Int8WeightOnlyConfig``); CPU and GPU.
* nf4: 4-bit NormalFloat in blocks of 64 with quantized block scales (QLoRA's format; torchao
  ``NF4Tensor``). Meant for GPUs; it runs on the CPU too, slowly.

:func:`quantize_backbone` moves the blocks to the device one at a time and quantizes each there,
so a backbone staged on the CPU never has more than one full-precision block on the GPU.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import QUANTIZE_CHOICES as MODES
from .errors import FlipVQAError
from .model.llama import Transformer
from .quiet import quiet_loggers

log = logging.getLogger(__name__)

# The block linears that are quantized (names inside a TransformerBlock).
LINEARS = ("attention.wq", "attention.wk", "attention.wv", "attention.wo",
           "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")
# torchao's NF4 layout: 64 weights per block, the block scales quantized in groups of 256.
NF4_BLOCK, NF4_SCALER_BLOCK = 64, 256


def quantize_backbone(backbone: Transformer, mode: str, device: torch.device) -> None:
    """Quantize ``backbone``'s block linears in place, moving each block to ``device`` first; the
    rest of the backbone (embedding, norm, output, rotary table) is moved to ``device`` as is."""
    quantize = _quantizer(mode)
    for i, block in enumerate(backbone.layers):
        block.to(device)
        for name in LINEARS:
            parent, _, child = name.rpartition(".")
            linear = block.get_submodule(name)
            layer = quantize(linear.weight.detach(), f"layers.{i}.{name}")
            layer.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)
            setattr(block.get_submodule(parent), child, layer)
    for name, module in backbone.named_children():
        if name != "layers":
            module.to(device)
    backbone.inv_freq = backbone.inv_freq.to(device)
    log.info("--quantize %s: %d block linears quantized (%.0f MB of weights)", mode,
             len(LINEARS) * len(backbone.layers), weight_bytes(backbone) / 2**20)


class FrozenQuantizedLinear(nn.Module):
    """A linear layer with a frozen, quantized weight (and a frozen bias, kept as it is: Qwen2's q/k/v).

    Its backward pass keeps only the quantized weight and dequantizes it again for the input's
    gradient. (A torchao int8 weight in a plain ``F.linear`` saves its dequantized copy for the
    backward pass: every layer's full-precision weight would be alive during training.)"""

    def __init__(self, weight: Tensor, dequantize: Callable[[Tensor], Tensor]):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias: nn.Parameter | None = None
        self.dequantize = dequantize

    def forward(self, x: Tensor) -> Tensor:
        out = _FrozenLinear.apply(x, self.weight, self.dequantize)
        return out if self.bias is None else out + self.bias.to(out.dtype)


class _FrozenLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, dequantize: Callable[[Tensor], Tensor]) -> Tensor:
        ctx.weight, ctx.dequantize = weight, dequantize  # frozen: nothing changes it before backward
        return F.linear(x, weight)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad @ ctx.dequantize(ctx.weight).to(grad.dtype), None, None


def _quantizer(mode: str) -> Callable[[Tensor, str], FrozenQuantizedLinear]:
    """For ``mode``, the function that makes a quantized layer of a (frozen) linear weight."""
    if mode not in MODES:
        raise FlipVQAError(f"--quantize {mode}: choose one of {', '.join(MODES)}")
    quantize_, int8_config, to_nf4 = _import_torchao()
    if mode == "int8":
        config = int8_config()

        def int8(weight: Tensor, name: str) -> FrozenQuantizedLinear:
            linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
            linear.weight = nn.Parameter(weight, requires_grad=False)
            quantize_(linear, config)  # one scale per output row
            return FrozenQuantizedLinear(linear.weight.detach(), lambda w: w.dequantize())

        return int8

    def nf4(weight: Tensor, name: str) -> FrozenQuantizedLinear:
        if weight.numel() % (NF4_BLOCK * NF4_SCALER_BLOCK):
            raise FlipVQAError(f"--quantize nf4: {name} has {tuple(weight.shape)} weights, not a multiple of "
                               f"{NF4_BLOCK * NF4_SCALER_BLOCK} (NF4's block layout); use --quantize int8")
        return FrozenQuantizedLinear(to_nf4(weight, NF4_BLOCK, NF4_SCALER_BLOCK), lambda w: w.get_original_weight())

    return nf4


def _import_torchao():
    """torchao's ``quantize_``, ``Int8WeightOnlyConfig`` and ``to_nf4``, or one line saying which
    extra to install. Its import logs that optional CUDA kernels are absent (they are for other
    formats); that is kept out of the run's log."""
    try:
        with quiet_loggers():
            from torchao.quantization import Int8WeightOnlyConfig, quantize_
            try:
                from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4
            except ImportError:  # torchao < 0.15
                from torchao.dtypes.nf4tensor import to_nf4
    except ImportError as exc:
        raise FlipVQAError(f"--quantize needs torchao ({exc}): pip install 'flipvqa[quant]'") from None
    except Exception as exc:  # noqa: BLE001 - a torchao built for another torch fails in many ways
        raise FlipVQAError(f"--quantize: torchao does not import with torch {torch.__version__} ({exc}); "
                           f"pip install 'flipvqa[quant]' installs a matching one") from None
    return quantize_, Int8WeightOnlyConfig, to_nf4


def weight_bytes(module: nn.Module) -> int:
    """Bytes the parameters and buffers of ``module`` occupy, quantized ones at their stored size
    (a tensor subclass counts the plain tensors it is made of)."""
    seen: set[int] = set()
    total = 0
    for t in [*module.parameters(), *module.buffers()]:
        if id(t) not in seen:  # a tied output layer is the embedding
            seen.add(id(t))
            total += _tensor_bytes(t)
    return total


def _tensor_bytes(t: Tensor) -> int:
    flatten = getattr(type(t), "__tensor_flatten__", None)
    if flatten is None:
        return t.numel() * t.element_size()
    names, _ = t.__tensor_flatten__()
    return sum(_tensor_bytes(getattr(t, name)) for name in names)


__all__ = ["LINEARS", "MODES", "FrozenQuantizedLinear", "quantize_backbone", "weight_bytes"]
