"""The compiled layer stack (``compile: true``) and the row buckets it runs on.

What is compiled: the loop of :meth:`Transformer.hidden` over the layers, i.e. each layer's standard
computation, :meth:`Block.forward` (attention with the K/V store write, the FFN), as one function
of tensors: the layers (under torch.compile their weights are graph inputs, so the graphs serve any
model of the same structure), the rows' hidden states, RoPE tables and key mask, the store's K/V
tensors and the slots to write. One call per forward, not one per layer: each call of a compiled
function pays dynamo's guard check and wrappers (~0.2 ms on a 2-core CPU, and the host time of a
GPU step), so a per-layer call would pay it n_layers times. Dynamic shapes: batch, rows and
sequence length are symbols, so new prompt lengths or batch sizes reuse the graphs; a graph is
compiled per variant of the step (slots given or all of them, attention rows asked or not, a
per-key or a row x key mask, size-1 dimensions, the model's structure).

What stays eager: forwards through a :class:`LayerHook` (dLLM-Cache, Elastic-Cache, Sparse-dLLM's
full forwards) or over a key set (:class:`SelectedKeys`: Sparse-dLLM, Streaming-dLLM and DPad when
they prune keys), WINO's verification rows, the embedding and LM head, ``Transformer.forward``
(likelihoods), and the experts of an MoE FFN (a loop over experts that follows the routing, with a
host sync: a graph break). Dynamo cannot resume a graph break inside the loop over the layers, so
an MoE model's layers are compiled one by one instead (``Block.forward``, two graphs around the
expert loop), called from an eager loop.

Buckets: the denoising loop pads a compiled forward's active rows up to :func:`row_bucket` of
their count, with rows that write to the store's trash slot, so the step sees a small fixed set of
row counts: a CUDA graph (``mode="reduce-overhead"``) is recorded per shape, and oneDNN builds a
GEMM kernel per row count on CPU.

CUDA graphs (``mode="reduce-overhead"``, torch's CUDA-graph trees) replay a recorded step on the
addresses it was recorded with, and record only steps that mutate nothing but static inputs. The
step writes into the K/V store, so the store is a static input: :meth:`CompiledLayers.store` keeps
one store per role that outlives the generation (zeroed for the next one of the same shape) and
marks its tensors with ``torch._dynamo.mark_static_address``. A replay's outputs live in the
graphs' memory pool and the next replay overwrites them, so under CUDA graphs a forward's outputs
are copied out before they are returned.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import Tensor, nn

from .transformer import Block, KVStore, ModelArgs, MoEFeedForward, Transformer, write_kv


# torch._dynamo.config.recompile_limit, set below, is named cache_size_limit before torch 2.7.
MIN_TORCH = "2.7"


def check_torch_version() -> None:
    """Refuse a torch too old for :func:`compile_layers` (before a model is built), naming the one found."""
    if torch.torch_version.TorchVersion(torch.__version__) < MIN_TORCH:
        raise ValueError(f"compile=true needs torch >= {MIN_TORCH} (installed: {torch.__version__}); "
                         "upgrade torch or run eagerly (compile=false)")


def row_bucket(n: int, total: int) -> int:
    """The row count a compiled forward of ``n`` active rows (per batch row) computes: the next of
    1, 2, 3, 4, 6, 8, 12, 16, 24, ... (powers of two and 1.5x them), capped at ``total`` (the
    sequence length T, a full forward's count). About 2 log2(T) buckets, and padding is under a
    third of the rows computed (powers of two alone would allow half)."""
    power = 1 << max(n - 1, 0).bit_length()  # the smallest power of two >= n (1 for n = 0)
    between = power * 3 // 4
    return min(between if power >= 4 and n <= between else power, total)


def bucket_rows(rows: Tensor, rows_valid: Tensor, total: int) -> tuple[Tensor, Tensor]:
    """``rows`` / ``rows_valid`` (B, A) padded with invalid rows at slot ``total`` (the trash slot)
    to ``row_bucket(A, total)`` columns."""
    B, A = rows.shape
    extra = row_bucket(A, total) - A
    if not extra:
        return rows, rows_valid
    return (torch.cat([rows, rows.new_full((B, extra), total)], 1),
            torch.cat([rows_valid, rows_valid.new_zeros((B, extra))], 1))


class LayerKV:
    """One layer's K/V store tensors behind the store interface :class:`Attention` calls (the layer
    number is ignored: the tensors are that layer's)."""

    def __init__(self, k: Tensor, v: Tensor) -> None:
        self.k, self.v = k, v

    def write(self, layer: int, index: Tensor | None, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        write_kv(self.k, self.v, index, k, v)
        return self.k, self.v

    def key_mask(self, layer: int, key_mask: Tensor) -> Tensor:
        return key_mask


def layers_step(layers: nn.ModuleList, h: Tensor, cos: Tensor, sin: Tensor, key_mask: Tensor, k: list[Tensor],
                v: list[Tensor], index: Tensor | None, want_attention: bool, forward: Callable = Block.__call__
                ) -> tuple[Tensor, list[Tensor] | None]:
    """:meth:`Block.forward` (or ``forward``, a compiled copy of it) of every layer in turn on the
    store's tensors: the last hidden states (before the final norm) and, if asked, each layer's
    head-averaged attention rows."""
    attention = []
    for block, k_layer, v_layer in zip(layers, k, v):
        h, head_mean = forward(block, h, cos, sin, key_mask, LayerKV(k_layer, v_layer), 0, index, want_attention)
        attention.append(head_mean)
    return h, attention if want_attention else None


def graphs_compiled() -> int:
    """Graphs torch.compile has produced in this process so far."""
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def cudagraphs_skipped() -> int:
    """Times torch's CUDA-graph trees have declined to record a compiled graph in this process (at
    compile time, e.g. a CPU graph or a mutated non-static input, or at run time, e.g. too many
    re-recordings); each is logged with its reason on a GPU."""
    return torch._dynamo.utils.counters["inductor"]["cudagraph_skips"]


@dataclass(frozen=True)
class CompileCost:
    """What compiling has cost: a stack's running total, or the difference over one generation."""

    seconds: float = 0.0  # wall time of the calls that compiled a new graph
    graphs: int = 0  # graphs compiled
    cudagraph_skips: int = 0  # graphs that run without CUDA graphs (:func:`cudagraphs_skipped`)

    def __add__(self, other: CompileCost) -> CompileCost:
        return CompileCost(self.seconds + other.seconds, self.graphs + other.graphs,
                           self.cudagraph_skips + other.cudagraph_skips)

    def __sub__(self, other: CompileCost) -> CompileCost:
        return CompileCost(self.seconds - other.seconds, self.graphs - other.graphs,
                           self.cudagraph_skips - other.cudagraph_skips)


@dataclass
class CompiledLayers:
    """The compiled layer stack, what compiling it has cost so far (the loop reads the difference
    over a generation), and the K/V stores it writes into."""

    step: Callable
    cudagraphs: bool = False  # torch.compile's mode records CUDA graphs (reduce-overhead, max-autotune)
    cost: CompileCost = CompileCost()
    stores: dict[str, tuple[tuple, KVStore]] = field(default_factory=dict)  # role -> (shape key, store)

    def store(self, role: str, args: ModelArgs, batch: int, length: int, device: torch.device,
              dtype: torch.dtype) -> KVStore:
        """The K/V store of a generation's ``role`` (the loop has "main" and, with guidance,
        "unconditional"): the previous one of that role, zeroed (as a new store is), if its shape is
        the same, else a new one whose tensors are marked as static addresses. So the compiled step
        writes into the same tensors generation after generation, as a CUDA graph replay needs."""
        key = (args.n_layers, args.n_kv_heads, args.head_dim, batch, length, torch.device(device), dtype)
        kept_key, store = self.stores.pop(role, (None, None))
        if kept_key == key:
            for tensor in store.k + store.v:
                tensor.zero_()
        else:
            del store  # freed before its replacement is allocated
            store = KVStore(args, batch, length, device, dtype)
            for tensor in store.k + store.v:
                torch._dynamo.mark_static_address(tensor)
        self.stores[role] = key, store
        return store

    def __call__(self, layers: nn.ModuleList, h: Tensor, cos: Tensor, sin: Tensor, key_mask: Tensor, k: list[Tensor],
                 v: list[Tensor], index: Tensor | None, want_attention: bool) -> tuple[Tensor, list[Tensor] | None]:
        if self.cudagraphs:
            # One forward is one iteration of the CUDA-graph trees (an MoE stack's compiled parts are
            # its nodes, chained through their outputs).
            torch.compiler.cudagraph_mark_step_begin()
        graphs, skips, start = graphs_compiled(), cudagraphs_skipped(), time.perf_counter()
        h, attention = self.step(layers, h, cos, sin, key_mask, k, v, index, want_attention)
        new = graphs_compiled() - graphs
        # a call that compiled counts its wall time (its one forward's run included)
        self.cost += CompileCost(time.perf_counter() - start if new else 0.0, new, cudagraphs_skipped() - skips)
        if self.cudagraphs:  # the next replay overwrites a replay's outputs; methods keep attention rows
            h, attention = h.clone(), None if attention is None else [rows.clone() for rows in attention]
        return h, attention


def compile_layers(net: Transformer, mode: str = "default") -> None:
    """Run ``net``'s layers through a compiled :func:`layers_step` (``mode``: torch.compile's; inductor
    on CPU), and have the denoising loop pad active rows to :func:`row_bucket` (``net.compiled``)."""
    check_torch_version()
    import torch._dynamo  # ~1.5 s to import: only where something is compiled
    import torch._inductor
    import torch.fx.experimental._config

    experts = [module for module in net.modules() if isinstance(module, MoEFeedForward)]
    for module in experts:
        # Its expert loop follows the routing (host sync for the counts): run it eagerly rather
        # than let torch.compile specialise on every count pattern.
        module.forward = torch.compiler.disable(module.forward)
    # One code object serves every compiled model of the process: its variants (step kinds x model
    # structures, e.g. a test session's tiny models) would exceed the default of 8 graphs.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    # A symbol per dynamic size. Duck sizing gives sizes that are equal at the first trace one symbol,
    # and a size tied to a weight's is then fixed: a full forward with T = dim rows, or batch =
    # n_kv_heads, would fix the rows (or the batch) to that number, and the next length compile again.
    torch.fx.experimental._config.use_duck_shape = False
    cudagraphs = torch._inductor.list_mode_options(mode).get("triton.cudagraphs", False)
    if experts:
        # The eager expert loop is a graph break, and dynamo cannot resume one inside the loop over
        # the layers: it would skip layers_step (for good: every later model of the process too, the
        # dense ones included). So an MoE model compiles Block.forward, in two graphs around the
        # expert loop, called layer by layer from the eager loop.
        step = partial(layers_step, forward=torch.compile(Block.forward, mode=mode, dynamic=True))
    else:
        step = torch.compile(layers_step, mode=mode, dynamic=True)
    net.compiled = CompiledLayers(step, cudagraphs=cudagraphs)
