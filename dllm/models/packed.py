"""Prepacked linear weights for float32 inference on CPU (oneDNN's blocked weight layout).

Why: a cached denoising step runs every layer on a few dozen rows, where a GEMM is bound by
reading its weights rather than by arithmetic. MKL's float32 GEMM (torch's default on CPU) packs
panels of the weight matrix inside every call; oneDNN with the weights reordered once at load time
reads them as they lie. On the 2-core CPU of ``scripts/bench.py --preset cpu`` (8 layers, d 512,
ffn 1536) the layers' GEMMs over 32 rows take ~15 ms instead of 19-26 ms (a gap of ~4 ms per
forward at any small row count, about one more pass over the 110 MB of weights), over 512 rows
the same ~170 ms as MKL's. Every method, ``none`` included, runs on the same packed weights.

oneDNN builds (JIT-compiles) a GEMM kernel the first time it sees a row count for a weight
shape, ~0.5 ms each here, and keeps it in its primitive cache (ONEDNN_PRIMITIVE_CACHE_CAPACITY,
1024 by default): the first forwards over new row counts are a little slower, and the cache adds
to the process's resident memory. These are the ops torch's own inductor uses for CPU linears.

The packed weights replace the dense ones (no second copy in memory), so a packed model is for
inference only: no autograd, no ``state_dict`` of those weights, no ``.to()``. A tied LM head
gets its own packed copy (the embedding stays dense). Models on other devices or in other dtypes
are left as they are.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


def can_pack(device: torch.device, dtype: torch.dtype) -> bool:
    return device.type == "cpu" and dtype == torch.float32 and torch.backends.mkldnn.is_available()


def _packed_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


# The same oneDNN call as an op that torch.compile leaves opaque: inductor lowers
# ``mkldnn._linear_pointwise`` only for weights it froze into constants itself, whereas a compiled
# layer stack takes its (prepacked) weights as inputs (dllm.models.compiled). Defined through
# torch.library directly rather than ``torch.library.custom_op``, whose Python wrapper costs ~8 us
# per call (56 calls per forward of the cpu bench preset).
_LIBRARY = torch.library.Library("dllm", "DEF")
_LIBRARY.define("packed_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor")
_LIBRARY.impl("packed_linear", _packed_linear, "CompositeExplicitAutograd")


@torch.library.register_fake("dllm::packed_linear")
def _(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))  # a packed weight keeps its (out, in) shape


class PackedLinear(nn.Module):
    """``y = x Wᵀ + b`` with W held in oneDNN's layout (any number of leading dims in x)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # Plain attributes, not buffers: an opaque oneDNN tensor has no place in a state_dict.
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), None)
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: Tensor) -> Tensor:
        if torch.compiler.is_compiling():  # a compiled layer stack: see _LIBRARY
            return torch.ops.dllm.packed_linear.default(x, self.packed, self.bias)
        return _packed_linear(x, self.packed, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def pack_linear_weights(net: nn.Module) -> bool:
    """Replace every ``nn.Linear`` of ``net`` by a :class:`PackedLinear`, in place, where
    :func:`can_pack` allows it (a float32 model on CPU); returns whether it did."""
    weight = next(net.parameters())
    if not can_pack(weight.device, weight.dtype):
        return False
    for module in list(net.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, name, PackedLinear(child))
    return True
