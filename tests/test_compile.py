"""Compiled layers (``compile: true``, dllm.models.compiled) give the eager tokens for every cache
method, pad active rows to buckets and account for it apart, and compile each graph once.

float32 on CPU (inductor). Compiled kernels round differently from eager ones (~1e-6), so the
comparison is of tokens, forwards and useful token-layers, on golden's peaked tiny models. Compiling
dominates the time here (seconds per graph): the models are shared by the whole module and the
graphs by the whole process (one code object), so each variant of the step compiles once.
"""
from __future__ import annotations

import pytest
import torch

from conftest import MASK_ID, random_prompts, tiny_args, tiny_net
from dllm.cache.base import build_cache, cache_names
from dllm.decoding.base import build_decoder
from dllm.decoding.loop import generate
from dllm.models.compiled import compile_layers, row_bucket
from dllm.models.packed import pack_linear_weights
from test_golden import CACHES, DECODERS, GEN_LENGTH, _build, _net

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = random_prompts([7, 4], seed=3)  # a left-padded batch of two
# Each method with the decoding its paper runs (scripts/bench.py METHODS), at golden's tiny settings.
PAPER_DECODER = {
    "none": "low_confidence", "dkv_decode": "low_confidence", "dkv_greedy": "random", "d2cache": "certainty_prior",
    "prefix": "low_confidence", "dual": "low_confidence", "dllm_cache": "low_confidence", "elastic": "threshold",
    "sparse_dllm": "low_confidence", "streaming": "low_confidence", "dpad": "low_confidence",
}
# Methods whose every forward takes the standard (compiled, bucketed) path: no layer hook, no key sets.
STANDARD = ("none", "dkv_decode", "dkv_greedy", "d2cache", "prefix", "dual")


def pair(make) -> tuple:
    """An eager and a compiled copy of the same model (``make()`` builds it deterministically)."""
    eager, compiled = make(), make()
    compile_layers(compiled)
    return eager, compiled


def packed(net):
    assert pack_linear_weights(net)  # as the pipeline runs a float32 model on CPU
    return net


@pytest.fixture(scope="module")
def nets() -> dict:
    """golden's tiny models of both families, prepacked, eager and compiled."""
    return {family: pair(lambda: packed(_net(family, torch.float32))) for family in ("llada", "dream")}


def run(net, cache: str, decoder: str, **kwargs):
    """One generation of golden's settings (``cache`` / ``decoder``: keys of its tables)."""
    return generate(net, PROMPTS, _build(DECODERS, decoder, build_decoder), _build(CACHES, cache, build_cache), GEN_LENGTH,
                    generator=torch.Generator().manual_seed(5), **kwargs)


def assert_same(eager_out, compiled_out, what: str) -> None:
    assert torch.equal(compiled_out.tokens, eager_out.tokens), f"{what}: compiled tokens differ"
    assert compiled_out.nfe == eager_out.nfe, what
    assert compiled_out.active_token_layers == eager_out.active_token_layers, what  # the useful rows only
    assert eager_out.padded_token_layers == 0 and eager_out.recompiles == 0 and eager_out.compile_seconds == 0


def test_a_repeated_generation_compiles_nothing_and_one_graph_runs_the_whole_stack(nets):
    """From a clean slate: ``none`` (full forwards only: one variant of the step) compiles exactly one
    graph, for both layers at once, and the same generation again compiles nothing. The compiled stack
    is called once per forward, not once per layer (each call pays dynamo's guard check)."""
    torch._dynamo.reset()
    eager, compiled = nets["llada"]
    step, calls = compiled.compiled.step, []
    compiled.compiled.step = lambda *args: calls.append(1) or step(*args)
    try:
        first, second = run(compiled, "none", "low_confidence"), run(compiled, "none", "low_confidence")
    finally:
        compiled.compiled.step = step
    assert first.recompiles == 1 and first.compile_seconds > 0
    assert second.recompiles == 0 and second.compile_seconds == 0
    assert first.seconds < first.compile_seconds  # the compile time is left out of the generation's time
    assert len(calls) == first.nfe + second.nfe and compiled.args.n_layers == 2
    assert_same(run(eager, "none", "low_confidence"), second, "none")


def test_a_size_equal_to_another_is_not_fixed_in_the_graph(nets):
    """Each dynamic size is its own symbol (no duck sizing): a first full forward of T = dim rows
    would otherwise have its row count tied to the model width, fixed in the graph, and the next
    prompt length would compile again."""
    torch._dynamo.reset()
    eager, compiled = nets["llada"]
    prompts = random_prompts([compiled.args.dim - GEN_LENGTH, 5], seed=4)  # T = dim
    first = generate(compiled, prompts, _build(DECODERS, "low_confidence", build_decoder), build_cache("none"),
                     GEN_LENGTH)
    second = run(compiled, "none", "low_confidence")  # T < dim
    assert first.recompiles == 1 and second.recompiles == 0
    assert_same(run(eager, "none", "low_confidence"), second, "none, T < dim")


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_every_cache_method_gives_the_eager_tokens(nets, family):
    eager, compiled = nets[family]
    ran = set()
    for key, params in CACHES.items():
        name = params.get("name", key)
        decoder = PAPER_DECODER[name]
        cache = _build(CACHES, key, build_cache)
        try:
            cache.check(_build(DECODERS, decoder, build_decoder))
            cache.check_model(eager.args.logit_shift)
        except ValueError:
            continue  # refused by name, eager and compiled alike
        assert_same(run(eager, key, decoder), run(compiled, key, decoder), f"{family}/{key}/{decoder}")
        ran.add(name)
    assert ran == set(cache_names())


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_block_causal_models_give_the_eager_tokens(family):
    """Row x key masks (B, 1, A, K): block diffusion with the caches that run on it."""
    eager, compiled = pair(lambda: packed(tiny_net(tiny_args(family, block_causal=True), seed=7, logit_scale=4.0,
                                                   silent_ids=(MASK_ID,))))
    for cache in ("none", "prefix", "dual"):
        outs = [generate(net, PROMPTS, build_decoder("block_diffusion", block_length=4, steps=4, threshold=0.4),
                         build_cache(cache), 13) for net in (eager, compiled)]
        assert_same(*outs, f"{family}/{cache}/block_diffusion")


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_bucket_padding_is_counted_apart(nets, family):
    """A compiled forward pads its A active rows to row_bucket(A, T) with trash-slot rows: B x (bucket -
    A) x layers token-layers per forward, counted in padded_token_layers, never in the active ones."""
    _, compiled = nets[family]
    B, T, L = len(PROMPTS), max(map(len, PROMPTS)) + GEN_LENGTH, compiled.args.n_layers
    padded = 0.0
    for cache in STANDARD:
        out = run(compiled, cache, PAPER_DECODER[cache], record_trace=True)
        widths = [int(active.sum(1).max()) for active in out.trace]
        assert out.padded_token_layers == sum(B * (row_bucket(a, T) - a) * L for a in widths), cache
        padded += out.padded_token_layers
    assert padded > 0


def recorded_graphs(monkeypatch) -> list[tuple[set[int], set[int]]]:
    """From now on, each graph inductor compiles: (its mutated input indices, its static input
    indices)."""
    from torch._inductor.output_code import CompiledFxGraph

    graphs = []
    post_compile = CompiledFxGraph.post_compile

    def recording(self, example_inputs, constants, graph_kwargs):
        graphs.append((set(self.mutated_input_idxs), set(graph_kwargs["static_input_idxs"])))
        return post_compile(self, example_inputs, constants, graph_kwargs)

    monkeypatch.setattr(CompiledFxGraph, "post_compile", recording)
    return graphs


def test_dense_weights_and_moe_experts_give_the_eager_tokens(monkeypatch):
    """Dense linear weights (as on GPU: inductor's own GEMMs) and an MoE FFN (its expert loop runs
    eagerly, each layer compiled in two parts around it). Compiling an MoE model leaves a dense
    model compiled after it whole: one graph writes every layer's K and V (a graph break in the loop
    over the layers would make dynamo skip that loop's code for good)."""
    moe = dict(n_experts=4, n_experts_per_token=2, ffn_dim=16, qk_norm=True)
    graphs = recorded_graphs(monkeypatch)
    for name, make in (("moe", lambda: packed(tiny_net(tiny_args("llada_moe", max_seq_len=64, **moe), seed=11,
                                                       logit_scale=4.0, silent_ids=(MASK_ID,)))),
                       ("dense", lambda: _net("llada", torch.float32))):
        eager, compiled = pair(make)
        graphs.clear()  # this model's graphs only
        for cache in ("none", "dual"):
            assert_same(run(eager, cache, "low_confidence"), run(compiled, cache, "low_confidence"), f"{name}/{cache}")
    assert {len(mutated) for mutated, _ in graphs} == {2 * compiled.args.n_layers}  # the dense model's


def test_the_store_outlives_the_generation_with_static_addresses(nets):
    """The compiled step writes into the same K/V tensors generation after generation (a CUDA graph
    replays on the addresses it was recorded with): a store per role, zeroed for the next generation
    of the same shape (as a new store is), replaced for another shape, its tensors marked as static
    addresses (CUDA-graph trees record a step that mutates static inputs only)."""
    eager, compiled = nets["llada"]
    layers = compiled.compiled
    assert_same(run(eager, "dual", "low_confidence"), run(compiled, "dual", "low_confidence"), "dual")
    _, used = layers.stores["main"]
    B, T = len(PROMPTS), max(map(len, PROMPTS)) + GEN_LENGTH
    assert used.k[0].shape[0] == B and used.length == T
    assert all(torch._dynamo.utils.get_static_address_type(t) == "unguarded" for t in used.k + used.v)
    assert all(t.abs().sum() > 0 for t in used.k + used.v)  # written by that generation
    with torch.inference_mode():  # as in a generation (its tensors are inference tensors)
        again = layers.store("main", compiled.args, B, T, torch.device("cpu"), compiled.dtype)
        assert again is used and all(not t.any() for t in again.k + again.v)  # the same tensors, zeroed
        longer = layers.store("main", compiled.args, B, T + 1, torch.device("cpu"), compiled.dtype)
    assert longer is not used and longer.length == T + 1 and layers.stores["main"][1] is longer
    # A guided generation's unconditional branch has its own store; the dirty ones leak nothing.
    guided = [run(net, "none", "low_confidence", cfg_scale=1.5) for net in (eager, compiled)]
    assert_same(*guided, "none, cfg_scale=1.5")
    assert {"main", "unconditional"} <= set(layers.stores)
    assert_same(run(eager, "dkv_decode", "low_confidence"), run(compiled, "dkv_decode", "low_confidence"), "dkv")


def test_a_cuda_graph_mode_gives_the_eager_tokens_and_counts_its_skips(nets, monkeypatch):
    """``mode="reduce-overhead"``: each forward starts a CUDA-graph-tree iteration and its outputs are
    copied out of the graphs' pool. On CPU there is no CUDA graph to record: the same tokens, and the
    graph that runs without one is counted in ``cudagraph_skips`` (on a GPU, 0 means every step
    replays). What the trees require before they record a graph is checked here too: every input the
    compiled step mutates (the store's K/V tensors) is a static input."""
    graphs = recorded_graphs(monkeypatch)
    eager, compiled = _net("llada", torch.float32), _net("llada", torch.float32)
    compile_layers(compiled, mode="reduce-overhead")
    assert compiled.compiled.cudagraphs and not nets["llada"][1].compiled.cudagraphs  # the default mode: none
    first, second = run(compiled, "none", "low_confidence"), run(compiled, "none", "low_confidence")
    assert_same(run(eager, "none", "low_confidence"), first, "none, reduce-overhead")
    assert first.cudagraph_skips == first.recompiles == 1  # one graph (full forwards), on CPU: no CUDA graph
    assert second.cudagraph_skips == 0 and torch.equal(first.tokens, second.tokens)
    assert len(graphs) == 1
    mutated, static = graphs[0]
    assert len(mutated) == 2 * compiled.args.n_layers and mutated <= static  # every layer's K and V


def test_row_buckets():
    """Powers of two and 1.5x them, capped at T; T itself for a full forward; never fewer rows."""
    assert sorted({row_bucket(n, 512) for n in range(1, 513)}) == [
        1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512]
    assert [row_bucket(n, 40) for n in (1, 5, 9, 17, 33, 40)] == [1, 6, 12, 24, 40, 40]
    for n in range(1, 300):
        bucket = row_bucket(n, 300)
        assert n <= bucket <= 300 and (bucket - n) < bucket / 3  # padding: under a third of the rows


def test_the_pipeline_compiles_after_loading_and_keys_compiled_runs_apart():
    from conftest import compose
    from dllm.eval.runner import run_settings
    from dllm.pipeline import checkpoint_identity, load_model_and_tokenizer, plan_run

    cfg = compose("compile=true", "device=cpu")
    plan = plan_run(cfg)
    assert plan.compile and plan_run(compose("device=cpu")).compile is False
    threads = torch.get_num_threads()
    net, _ = load_model_and_tokenizer(cfg, plan)  # sets the run's threads
    torch.set_num_threads(threads)
    assert net.compiled is not None  # compiling itself waits for the first forward
    eager = compose("device=cpu")
    without = compose("device=cpu", "~compile")  # a config from before the option existed
    settings = [run_settings(c, plan_run(c), checkpoint_identity(c)) for c in (eager, without, cfg)]
    assert settings[0] == settings[1] != settings[2]  # eager runs keep their old resume keys
    # the next run of a sweep in the same process compiles its own graphs (not reusing the last one's)
    for _ in range(2):
        net, _ = load_model_and_tokenizer(cfg, plan)
        torch.set_num_threads(threads)
        out = generate(net, PROMPTS, build_decoder("low_confidence", steps=8, block_length=8), build_cache("none"), 8)
        assert out.recompiles >= 1
