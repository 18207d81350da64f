"""The denoising loop: cache method -> model on the active rows -> decoder -> cache method."""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch
from torch import Tensor

from dllm.cache.base import REGISTRY as CACHES
from dllm.cache.base import ActiveRequest, CacheMethod, StepOutcome, StepView
from dllm.metrics.timing import measure
from dllm.metrics.accounting import attention_pair_flops, kv_bytes_per_token, token_layer_flops
from dllm.models.compiled import CompileCost, bucket_rows
from dllm.models.transformer import KVStore, SelectedKeys, Transformer, take_rows

from .base import REGISTRY as DECODERS
from .base import DecodeContext, Decoder
from .layout import Layout, attention_rank, block_causal_mask, lay_out, shift_to_computing
from .verify import verification_confidence


@dataclass
class GenerationOutput:
    tokens: Tensor  # (B, G) response tokens
    nfe: int  # forwards (each over the active rows only)
    active_token_layers: float  # sum over forwards of active positions x layers (see LayerHook)
    total_token_layers: int  # the same for full forwards: nfe x B x T x layers (+ verification rows)
    seconds: float
    peak_mem_gb: float
    trace: list[Tensor] = field(default_factory=list)  # per step (B, T) bool active positions, if asked
    #: per forward, its active positions x layers summed over the batch (what the total adds up)
    token_layers_per_forward: list[float] = field(default_factory=list)
    #: per row, the response positions the model decoded (G unless stop_at_eos filled the rest with EOS)
    generated: list[int] | None = None
    #: per row, committed tokens a re-masking decoder took back (each counted every time)
    remasked: list[int] | None = None
    #: attention work: sum over forwards and layers of computed queries x attended keys, and the
    #: same with every position recomputed attending to every real key
    attention_pairs: float = 0.0
    total_attention_pairs: float = 0.0
    #: linear-layer + attention FLOPs of the forwards, and of the same forwards done in full
    flops: float = 0.0
    total_flops: float = 0.0
    #: the most K/V any forward attended to (summed over rows, layers averaged), in GB
    peak_kv_gb: float = 0.0
    #: compiled layers (net.compiled): wall time of the calls that compiled a new graph during this
    #: generation (left out of ``seconds``), the graphs compiled, and the token-layers computed only
    #: because active rows were padded to a bucket (not in ``active_token_layers``); and the graphs
    #: torch's CUDA-graph trees declined to record (under a CUDA-graph mode, 0 when every step replays)
    compile_seconds: float = 0.0
    recompiles: int = 0
    padded_token_layers: float = 0.0
    cudagraph_skips: int = 0

    @property
    def recompute_ratio(self) -> float:
        return self.active_token_layers / self.total_token_layers

    @property
    def ideal_speedup(self) -> float:
        return 1.0 / self.recompute_ratio


class IncompleteDecoding(RuntimeError):
    """A step could not commit what its schedule asks: the generation would keep [MASK] tokens."""


def check_committed(step: int, plan, transferred: Tensor, fresh: Tensor, decoder: Decoder, cache: CacheMethod,
                    stopped: Tensor) -> None:
    """Raise :class:`IncompleteDecoding` if a row (not stopped at EOS) committed fewer tokens than
    ``plan.n_transfer``.

    Only positions with a fresh prediction may be committed; a cache method that recomputes too
    few of them inside the decoder's window would otherwise end the generation with [MASK]
    tokens, which the tokenizer drops silently from the scored text.
    """
    committed = transferred.sum(1)
    short = ((committed < plan.n_transfer) & ~stopped).nonzero().flatten().tolist()
    if short:
        row = short[0]
        lo, hi = plan.commit_window
        raise IncompleteDecoding(
            f"step {step}: decoding={decoder.name!r} must commit {int(plan.n_transfer[row])} token(s) in batch row "
            f"{row}, but cache={cache.name!r} left {int(fresh[row, lo:hi].sum())} freshly predicted masked "
            f"position(s) in its window [{lo}, {hi}) (rows short: {short}); this combination would end with "
            "[MASK] tokens in the response"
        )


def pack(mask: Tensor) -> tuple[Tensor, Tensor]:
    """Indices (B, K) of each row's True entries, first ones first, K = the largest count.

    Returns the indices and a validity mask; short rows are padded with arbitrary indices that
    the caller must ignore (``valid`` False).
    """
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)
    width = int(mask.sum(1).max()) if mask.numel() else 0
    index = order[:, :width]
    return index, mask.gather(1, index)


MAX_CFG_SCALE = 1e4


def check_guidance(cfg_scale: float, cache: CacheMethod, decoder: Decoder) -> None:
    """Classifier-free guidance needs a full forward of both branches every step: no cache method
    defines how to cache the unconditional branch, and no re-masking decoder how to verify with it."""
    if isinstance(cfg_scale, bool) or not isinstance(cfg_scale, (int, float)) or not 0 <= cfg_scale <= MAX_CFG_SCALE:
        raise ValueError(f"decoding.cfg_scale={cfg_scale!r} must be a number in [0, {MAX_CFG_SCALE:g}] (0 = no guidance; "
                         "LLaDA's scales are 0 ... 3, a larger one overflows the guided logits)")
    if cfg_scale > 0 and decoder.block_causal:
        raise ValueError(f"decoding.cfg_scale={cfg_scale}: decoding={decoder.name!r} decodes block-diffusion models, "
                         "for which no guided form is defined here (LLaDA's guidance masks the prompt of a "
                         "bidirectional model); use cfg_scale: 0")
    if cfg_scale > 0 and not cache.full_every_step:
        raise ValueError(f"decoding.cfg_scale={cfg_scale} needs a full forward every step; cache={cache.name!r} "
                         "recomputes fewer rows (use cache=none)")
    if cfg_scale > 0 and decoder.remasks:
        raise ValueError(f"decoding.cfg_scale={cfg_scale}: decoding={decoder.name!r} re-masks tokens and its "
                         "verification has no guided form (use cfg_scale: 0)")


def check_remasked(remasked: Tensor, committed: Tensor, decoder: Decoder) -> None:
    """A decoder may only take back response tokens committed before this step."""
    bad = remasked & ~committed
    if bad.any():
        row, position = (int(i) for i in bad.nonzero()[0])
        raise RuntimeError(f"decoding={decoder.name!r} re-masked position {position} of batch row {row}, "
                           "which is not a response token committed before this step")


def stop_rows(x: Tensor, layout: Layout, eos: int, mask: int, block: int | None) -> Tensor:
    """(B,) bool: rows whose response is decoded up to and including its first EOS (and, with
    ``block`` set, up to the end of the block holding it; blocks start at the decoded region's
    start): nothing after it can change the answer."""
    B, T = x.shape
    cols = torch.arange(T, device=x.device)[None, :]
    response = cols >= layout.response_start[:, None]
    is_eos = (x == eos) & response
    first = torch.where(is_eos.any(1), is_eos.float().argmax(1), torch.full((B,), T, device=x.device))
    S = layout.region_start
    end = first + 1 if block is None else S + ((first - S) // block + 1) * block
    decoded_before_end = ((x == mask) & response & (cols < end[:, None])).sum(1) == 0
    return (first < T) & decoded_before_end


def check_block_causal(block_causal: bool, decoder: Decoder, cache: CacheMethod) -> None:
    """A block-diffusion model needs a decoder that decodes block by block with its attention block,
    and a cache method that knows finished blocks are exact; other models need the other decoders."""
    if block_causal != decoder.block_causal:
        fit = [n for n in DECODERS.names() if DECODERS.classes[n].block_causal == block_causal]
        kind = "block-diffusion (block-causal attention)" if block_causal else "bidirectional (LLaDA/Dream-style)"
        hint = " (a model preset's own decoding: +experiment=published)" if block_causal else ""
        raise ValueError(f"decoding={decoder.name!r} cannot decode a {kind} model (allowed: {fit}){hint}")
    if block_causal and not cache.block_causal:
        fit = [n for n in CACHES.names() if CACHES.classes[n].block_causal]
        raise ValueError(f"cache={cache.name!r} does not run on block-diffusion models (block-causal attention); "
                         f"allowed: {fit}")
    cache.check_attention(block_causal)


def kv_store(net: Transformer, role: str, batch: int, length: int, device: torch.device) -> KVStore:
    """A new generation's K/V store: the compiled stack's own (reused across generations, see
    :meth:`dllm.models.compiled.CompiledLayers.store`), else a new one."""
    if net.compiled is not None:
        return net.compiled.store(role, net.args, batch, length, device, net.dtype)
    return KVStore(net.args, batch, length, device, net.dtype)


def select_keys(store: KVStore, keys: Tensor | list[Tensor], real: Tensor, rows_valid: Tensor,
                n_layers: int) -> tuple[SelectedKeys, Tensor]:
    """The store view whose attention reads only ``keys`` (one (B, T) mask for every layer, or a
    list of one per layer), restricted to real positions; and the (n_layers, B) attended counts."""
    per_layer = isinstance(keys, (list, tuple))
    if per_layer and len(keys) != n_layers:
        raise ValueError(f"a cache method gave key sets for {len(keys)} layers; the model has {n_layers}")
    T = real.shape[1]
    packed = [pack(mask & real) for mask in (keys if per_layer else [keys])]
    index = [slots.masked_fill(~valid, T) for slots, valid in packed]
    valid = [valid for _, valid in packed]
    if not per_layer:
        index, valid = index * n_layers, valid * n_layers
    counts = torch.stack([v.sum(1) for v in valid])
    if ((counts == 0) & rows_valid.any(1)).any():
        raise ValueError("a cache method left a row with computed positions but no key to attend to")
    return SelectedKeys(store, index, valid), counts


def spread_attention(attention: list[Tensor], view: SelectedKeys, width: int) -> list[Tensor]:
    """Per-layer attention over the selected keys (B, A, K) laid onto positions (B, A, width)."""
    out = []
    for layer, probs in enumerate(attention):
        B, A, K = probs.shape
        slots = view.index[layer][:, None, :].expand(B, A, K)
        out.append(torch.zeros(B, A, width, dtype=probs.dtype, device=probs.device).scatter(2, slots, probs))
    return out


@torch.inference_mode()
def generate(
    net: Transformer,
    prompts: list[list[int]],
    decoder: Decoder,
    cache: CacheMethod,
    gen_length: int,
    generator: torch.Generator | None = None,
    record_trace: bool = False,
    stop_at_eos: bool = False,
    cfg_scale: float = 0.0,
) -> GenerationOutput:
    """Decode ``gen_length`` tokens after each prompt (a batch, left-padded here).

    ``stop_at_eos``: a row stops once its response is decoded up to and including its first EOS
    (for block decoders: to the end of that block); its later positions are filled with EOS, as
    the models were trained, and not counted as generated. The batch stops when every row has.

    ``cfg_scale`` > 0: LLaDA's classifier-free guidance. Every step also runs the rows with the
    prompt masked (the unconditional branch, its own K/V store) and decodes from
    ``uncond + (cfg_scale + 1) * (cond - uncond)``; it needs a full forward every step (cache=none).
    """
    args = net.args
    device = net.device
    decoder.check(gen_length)
    decoder.check_model(args.logit_shift)
    cache.check(decoder)
    check_guidance(cfg_scale, cache, decoder)
    block_causal = args.block_causal
    check_block_causal(block_causal, decoder, cache)
    layout = lay_out(prompts, gen_length, args.mask_token_id, args.pad_token_id, device,
                     decoder.block_length if block_causal else None)
    x, real = layout.x, layout.real
    B, T = x.shape
    if T > args.max_seq_len:
        raise ValueError(f"prompt + gen_length = {T} exceeds the model's max_seq_len={args.max_seq_len}")
    ctx = DecodeContext(B, layout.region_start, layout.region_length, args.mask_token_id, real, generator, device,
                        args.logit_shift, decoder.block_length if block_causal else None)
    decoder.start(ctx)
    cache.start(ctx)

    # Column T is the trash slot: padded rows of a ragged active set read and write there.
    x = torch.cat([x, torch.full((B, 1), args.mask_token_id, device=device)], dim=1)
    positions = torch.cat([(real.long().cumsum(1) - 1).clamp(min=0), torch.zeros(B, 1, dtype=torch.long, device=device)], 1)
    key_mask = torch.cat([real, torch.zeros(B, 1, dtype=torch.bool, device=device)], 1)[:, None, None, :]
    all_rows = torch.arange(T, device=device).expand(B, T)
    store = kv_store(net, "main", B, T, device)
    if cfg_scale > 0:  # the unconditional branch: the same sequence with its prompt masked
        prompt_cols = torch.arange(T + 1, device=device)[None, :] < ctx.prompt_length
        guidance_store = kv_store(net, "unconditional", B, T, device)
    branches = 2 if cfg_scale > 0 else 1  # a guided forward runs every row twice
    per_forward: list[float] = []
    full_total = 0  # what the same forwards cost with every position recomputed
    linear_flops, pair_flops = token_layer_flops(args), attention_pair_flops(args)
    real_keys = real.sum(1).double()  # (B,) keys a row attends to when nothing is left out
    attention_pairs = total_pairs = flops = total_flops = peak_kv_tokens = padded = 0.0
    compiled = net.compiled
    compiled_before = CompileCost() if compiled is None else compiled.cost
    trace: list[Tensor] = []
    stopped = torch.zeros(B, dtype=torch.bool, device=device)
    generated = torch.full((B,), gen_length, dtype=torch.long, device=device)
    remasked_count = torch.zeros(B, dtype=torch.long, device=device)
    # Re-masked positions whose stored K/V still describe the token taken back: recomputed in the
    # next forward whatever the cache method asks, so nothing reads the old token as real.
    stale = torch.zeros(B, T, dtype=torch.bool, device=device)
    response_cols = torch.arange(T, device=device)[None, :] >= layout.response_start[:, None]
    if block_causal:
        # A block's K/V are exact once computed with it and every earlier block final; the loop
        # computes each finished block's rows once more if needed, then never again.
        rank = attention_rank(real, decoder.block_length)
        exact = torch.zeros(B, T, dtype=torch.bool, device=device)

    with measure(device) as cost:
        for step in itertools.count():
            masked = x[:, :T] == args.mask_token_id
            plan = decoder.plan(step, masked)
            if plan is None:
                break
            view = StepView(step, plan, x[:, :T], masked)
            request: ActiveRequest = cache.select(view)
            hook = request.layer_hook
            if block_causal:
                window_rank = rank[:, plan.window[0], None]
            if request.full and hook is None and not block_causal:
                rows, rows_valid, write_index = all_rows, torch.ones_like(all_rows, dtype=torch.bool), None
                active = torch.ones_like(masked)
            else:
                active = torch.ones_like(masked) if request.full else torch.zeros_like(masked)
                if request.refresh is not None:
                    active |= request.refresh
                if request.predict is not None:
                    active |= shift_to_computing(request.predict, args.logit_shift)
                if plan.scheduled is not None:  # what the decoder fixed in advance is always predicted
                    active |= shift_to_computing(plan.scheduled, args.logit_shift)
                active |= stale
                if not request.full:
                    active &= real
                if block_causal:  # later blocks cannot change this step; earlier ones must be exact
                    active = (active | (~exact & (rank < window_rank))) & real & (rank <= window_rank)
                rows, rows_valid = pack(active)
                # A forward through the compiled step runs on a bucket's row count (a layer hook or a
                # key set runs eagerly: no padding); the padding rows write to the trash slot.
                if compiled is not None and hook is None and request.keys is None:
                    width = rows.shape[1]
                    rows, rows_valid = bucket_rows(rows, rows_valid, T)
                    padded += branches * B * (rows.shape[1] - width) * args.n_layers
                rows = write_index = rows.masked_fill(~rows_valid, T)
            if hook is not None:
                hook.begin(rows, rows_valid, stale.gather(1, rows.clamp(max=T - 1)) & rows_valid)
            attended, key_counts, step_mask = store, real_keys.expand(args.n_layers, B), key_mask
            if request.keys is not None:
                attended, key_counts = select_keys(store, request.keys, real, rows_valid, args.n_layers)
            if block_causal:
                step_mask = block_causal_mask(rank, key_mask, rows)
                row_keys = step_mask[:, 0].sum(-1).masked_fill(~rows_valid, 0).double()  # (B, A)
            hidden, attention = net.hidden(
                x.gather(1, rows), positions.gather(1, rows), step_mask, attended, write_index, cache.needs_attention, hook
            )
            if attention is not None and request.keys is not None:
                attention = spread_attention(attention, attended, T + 1)
            stale &= ~active
            if block_causal:
                first_masked = torch.where(masked, rank, T).min(1).values
                exact |= active & (rank < first_masked[:, None])
            if plan.verify is not None:
                verified = verification_confidence(net, x, positions, key_mask, store, plan.verify)

            # Logits only for rows that predict a masked position this step may unmask.
            lo, hi = plan.window
            target = (rows + args.logit_shift).clamp(max=T)
            wanted = rows_valid & (target >= lo) & (target < hi) & (x.gather(1, target) == args.mask_token_id)
            if request.commit is not None:  # column T: the trash slot, never committed
                wanted &= torch.cat([request.commit, torch.zeros_like(request.commit[:, :1])], 1).gather(1, target)
            wanted_rows, wanted_valid = pack(wanted)
            logits = net.output(take_rows(hidden, wanted_rows))
            if cfg_scale > 0:
                prompt_masked = torch.where(prompt_cols, args.mask_token_id, x)
                hidden_u, _ = net.hidden(prompt_masked.gather(1, rows), positions.gather(1, rows), key_mask, guidance_store, None)
                unconditional = net.output(take_rows(hidden_u, wanted_rows))
                logits = unconditional + (cfg_scale + 1) * (logits - unconditional)
            target = target.gather(1, wanted_rows).masked_fill(~wanted_valid, T)
            tokens, confidence = decoder.propose(logits, target)
            fresh_conf = torch.full((B, T + 1), float("nan"), dtype=torch.float64, device=device)
            fresh_conf = fresh_conf.scatter(1, target, confidence.double())[:, :T]
            proposal = x.scatter(1, target, tokens)[:, :T]
            score = decoder.priority(fresh_conf, masked).masked_fill(fresh_conf.isnan(), float("-inf"))
            transferred = decoder.select(score, plan)
            check_committed(step, plan, transferred, ~fresh_conf.isnan() & masked, decoder, cache, stopped)
            x[:, :T] = torch.where(transferred, proposal, x[:, :T])
            remasked = None
            if decoder.remasks and plan.verify is not None:
                remasked = decoder.remask(verified, transferred, plan)
            if remasked is not None:
                remasked = remasked & ~stopped[:, None]  # a row stopped at EOS is final
                check_remasked(remasked, ~masked & ~transferred & response_cols, decoder)
                x[:, :T] = x[:, :T].masked_fill(remasked, args.mask_token_id)
                remasked_count += remasked.sum(1)
                stale |= remasked
            if stop_at_eos:
                newly = stop_rows(x[:, :T], layout, args.eos_token_id, args.mask_token_id, decoder.stop_block) & ~stopped
                fill = (x[:, :T] == args.mask_token_id) & response_cols & newly[:, None]
                generated -= layout.response(fill).sum(1)
                x[:, :T] = x[:, :T].masked_fill(fill, args.eos_token_id)
                stopped |= newly

            cache.observe(view, StepOutcome(active, transferred, fresh_conf, rows, rows_valid, attention, remasked))
            token_layers = hook.token_layers if hook is not None else branches * int(rows_valid.sum()) * args.n_layers
            full_token_layers = branches * B * T * args.n_layers
            queries = hook.query_layers if hook is not None and hook.query_layers is not None else \
                rows_valid.sum(1) * args.n_layers
            keys_held = key_counts.double().mean(0)  # (B,) per row, averaged over layers
            pairs = branches * float((queries * keys_held).sum())
            if block_causal:  # each row attends to its block and the earlier ones only
                keys_held = row_keys.max(1).values
                pairs = float(row_keys.sum()) * args.n_layers
            full_pairs = branches * T * args.n_layers * float(real_keys.sum())
            if plan.verify is not None:  # the shadow rows, one per position of the window and row, in both
                width = plan.verify[1] - plan.verify[0]
                shadow = B * width * args.n_layers
                shadow_pairs = width * args.n_layers * float((real_keys + width).sum())
                token_layers, full_token_layers = token_layers + shadow, full_token_layers + shadow
                pairs, full_pairs = pairs + shadow_pairs, full_pairs + shadow_pairs
            per_forward.append(token_layers)
            full_total += full_token_layers
            attention_pairs += pairs
            total_pairs += full_pairs
            flops += token_layers * linear_flops + pairs * pair_flops
            total_flops += full_token_layers * linear_flops + full_pairs * pair_flops
            peak_kv_tokens = max(peak_kv_tokens, float(keys_held.sum()))
            if record_trace:
                trace.append(active.cpu())
            if stopped.all():
                break
    left = int((x[:, ctx.prompt_length : T] == args.mask_token_id).sum())
    if left:
        raise IncompleteDecoding(
            f"decoding={decoder.name!r} with cache={cache.name!r} ended with {left} [MASK] token(s) in the response"
        )
    compiling = CompileCost() if compiled is None else compiled.cost - compiled_before  # this generation's
    return GenerationOutput(
        tokens=layout.response(x[:, :T]),
        nfe=len(per_forward),
        active_token_layers=sum(per_forward),
        total_token_layers=full_total,
        seconds=cost.seconds - compiling.seconds,
        peak_mem_gb=cost.peak_mem_gb,
        trace=trace,
        token_layers_per_forward=per_forward,
        generated=generated.tolist(),
        remasked=remasked_count.tolist(),
        attention_pairs=attention_pairs,
        total_attention_pairs=total_pairs,
        flops=flops,
        total_flops=total_flops,
        peak_kv_gb=peak_kv_tokens * kv_bytes_per_token(args, net.dtype.itemsize) / 2**30,
        compile_seconds=compiling.seconds,
        recompiles=compiling.graphs,
        padded_token_layers=padded,
        cudagraph_skips=compiling.cudagraph_skips,
    )
