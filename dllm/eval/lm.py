"""The lm-eval adapter: one ``LM`` subclass (registered as ``dllm``) around our native model.

- ``generate_until``: requests sorted by prompt length (longest first; results come back in
  the request order), batched by ``batch_size`` and left-padded by the denoising loop, generated
  with the configured decoder and cache method, cut at the model's stop tokens and at the
  request's ``until`` strings (lm-eval leaves the cut to the model; with ``cut_at_eos=False`` only at
  the ``until`` strings, special tokens dropped: :func:`text_past_eos`; with ``cut_at_until=False``
  not at the ``until`` strings, as Dream's ``escape_until=true``). The first batch is
  generated twice: once as an uncounted warm-up, once counted. Every counted batch feeds the
  :class:`~dllm.metrics.accounting.ThroughputMeter`; per-sample records are kept in
  ``self.records`` keyed by (task, doc_id) for the run's samples.jsonl.
- ``loglikelihood``: the masked-diffusion Monte Carlo estimate (LLaDA, Nie et al. 2025, eq. 6):
  for a continuation of L tokens draw l ~ U{1..L}, mask l random continuation positions, and
  take sum over masked positions of -log p(token | context, partially masked continuation)
  weighted L / l; average ``mc_num`` draws. A one-token continuation has one possible draw, so it
  is scored exactly by a single forward (MMLU's " A"/" B"/...). Draws come from a generator
  seeded with ``seed``: the same requests give the same numbers.
- ``loglikelihood_rolling`` (perplexity) is not defined for these models and raises.

Chat templates: the runner asks lm-eval to apply the tokenizer's chat template for instruct
models (``apply_chat_template=True``); contexts then arrive already templated (with BOS) and are
tokenised without adding special tokens again.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from dllm.decoding.layout import grid_width, prompt_room
from dllm.decoding.loop import GenerationOutput, generate
from dllm.metrics.accounting import ThroughputMeter
from dllm.models.tokenization import decode_responses, stop_token_ids
from dllm.pipeline import log_compiled

log = logging.getLogger(__name__)


def cut_at_stops(text: str, until: list[str]) -> str:
    """``text`` up to the first occurrence of any ``until`` string."""
    cut = len(text)
    for stop in until:
        if stop:
            at = text.find(stop)
            if at != -1:
                cut = min(cut, at)
    return text[:cut]


def text_past_eos(tokenizer, ids: list[int], until: list[str]) -> tuple[str, str]:
    """(answer, raw text) under LLaDA's ``eval_llada.py`` convention (Fast-dLLM's too): the ids are
    decoded with their special tokens, cut at the first ``until`` string, encoded again and decoded
    without special tokens. So the text a model wrote after an end-of-text token stays in the answer
    (an end-of-turn token that is also an ``until`` string, e.g. Qwen's ``<|im_end|>``, still cuts)."""
    raw = tokenizer.decode(ids, skip_special_tokens=False)
    return tokenizer.decode(tokenizer(cut_at_stops(raw, until))["input_ids"], skip_special_tokens=True), raw


@dataclass
class _Gen:
    index: int
    context: str
    ids: list[int]
    until: list[str]
    task: str | None
    doc_id: int | None


@dataclass
class _Row:
    """One forward row of a likelihood request: the context, then the continuation with some
    positions masked (``tail``); ``predict`` indexes into the tail, ``targets`` are the true ids."""

    request: int
    L: int
    ctx: torch.Tensor
    tail: list[int]
    predict: list[int]
    targets: list[int]
    is_draw: bool  # counts toward the Monte Carlo average
    is_full: bool  # the fully masked continuation: decides is_greedy

    @property
    def length(self) -> int:
        return len(self.ctx) + len(self.tail)


@register_model("dllm")
class DllmLM(LM):
    """lm-eval ``LM`` over a native LLaDA / Dream network, a decoder and a cache method.

    net: :class:`dllm.models.transformer.Transformer`; tokenizer: a transformers tokenizer;
    plan: :class:`dllm.pipeline.RunPlan` (decoder, cache, gen_length, device, dtype).
    chat: contexts arrive chat-templated (lm-eval's hook, see :meth:`apply_chat_template`).
    """

    def __init__(
        self,
        net,
        tokenizer,
        plan,
        batch_size: int = 1,
        chat: bool = False,
        seed: int = 0,
        mc_num: int = 1,
        cut_at_eos: bool = True,
        cut_at_until: bool = True,
        progress: bool = True,
        rank: int = 0,
        world_size: int = 1,
        timing_repeats: int = 1,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        if mc_num < 1:
            raise ValueError(f"mc_num={mc_num} must be >= 1")
        if timing_repeats < 1:
            raise ValueError(f"timing.repeats={timing_repeats} must be >= 1")
        self.net = net
        self.tokenizer = tokenizer
        self.plan = plan
        self.batch_size = int(batch_size)
        self.chat = bool(chat)
        self.seed = int(seed)
        self.mc_num = int(mc_num)
        self.cut_at_eos = bool(cut_at_eos)
        self.cut_at_until = bool(cut_at_until)
        self.timing_repeats = int(timing_repeats)
        self.progress = progress
        self._device = plan.device
        self._rank, self._world_size = int(rank), int(world_size)  # data parallel (dllm/eval/distributed.py)
        self.stop_ids = stop_token_ids(tokenizer, net.args)
        self.meter = ThroughputMeter()
        self.records: dict[tuple[str | None, int | None], list[dict]] = {}
        self._warmed_up = False
        self._batches = 0
        self._warned_sampling = False
        self._warned_likelihood_cache = False

    # ------------------------------------------------------------------ chat template hooks
    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "dllm")).replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return getattr(self.tokenizer, "chat_template", None)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        import jinja2

        kwargs = dict(tokenize=False, add_generation_prompt=add_generation_prompt)
        if not add_generation_prompt:
            kwargs["continue_final_message"] = True
        try:
            return self.tokenizer.apply_chat_template(chat_history, **kwargs)
        except jinja2.exceptions.TemplateError:
            # A template without a system role: fold the system prompt into the first user turn.
            if chat_history and chat_history[0]["role"] == "system":
                system, rest = chat_history[0]["content"], [dict(m) for m in chat_history[1:]]
                if rest and rest[0]["role"] == "user":
                    rest[0]["content"] = system + "\n\n" + rest[0]["content"]
                return self.tokenizer.apply_chat_template(rest, **kwargs)
            raise

    # ------------------------------------------------------------------ data parallel (lm-eval's hooks)
    def all_gather(self, tensor):
        if self.world_size == 1:
            return tensor
        import torch.distributed as dist

        parts = [torch.zeros_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor)
        return torch.stack(parts) if tensor.dim() == 0 else torch.cat(parts)

    def gather_object(self, obj, dst: int = 0):
        if self.world_size == 1:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world_size if self.rank == dst else None
        dist.gather_object(obj, out, dst=dst)
        return out

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()

    def _without_padding(self, requests) -> tuple[list, list[int]]:
        """With several ranks, lm-eval pads a rank's requests with extra copies of its last request
        (same object) so that all ranks run as many; a real request appears exactly ``repeats``
        times. The copies beyond that are answered from the first one, not generated (or counted
        in the speed totals) again. Returns the requests to run and, per input, the index of its answer."""
        if self.world_size == 1:
            return list(requests), list(range(len(requests)))
        keep, source, seen, first = [], [], {}, {}
        for req in requests:
            seen[id(req)] = seen.get(id(req), 0) + 1
            if id(req) in first and seen[id(req)] > getattr(req, "repeats", 1):
                source.append(first[id(req)])
            else:
                first.setdefault(id(req), len(keep))
                source.append(len(keep))
                keep.append(req)
        return keep, source

    # ------------------------------------------------------------------ tokenisation
    def encode(self, text: str) -> list[int]:
        # A templated context carries its special tokens (BOS included) as text already.
        return self.tokenizer(text, add_special_tokens=not self.chat)["input_ids"]

    def check_fits(self, sizes: list[tuple[int, int]], what: str) -> None:
        """Every ``what`` (prompt or context) fits: ``sizes`` are (its tokens, the room max_seq_len
        leaves it beside the answer). lm-eval's HF model would cut a longer one on the left, which
        silently changes the task (its few-shot examples, the question itself); here the run stops
        before it computes anything."""
        over = [(n, room) for n, room in sizes if n > room]
        if over:
            longest, room = max(over)
            raise ValueError(
                f"{len(over)} of {len(sizes)} {what}s do not fit model.max_seq_len={self.net.args.max_seq_len}: the "
                f"longest has {longest} tokens, where {room} are left beside the "
                f"{'answer (gen_length)' if what == 'prompt' else 'continuation'}; lower gen_length or task.n_shot, "
                "or use a model with a longer context")

    def check_batches_fit(self, batches: list[list[int]], block: int) -> None:
        """On a block-diffusion model, prompts that fit alone may not fit together: each batch (its
        prompts' token counts, as :meth:`generate_until` forms them) laid out beside ``gen_length``
        fits ``max_seq_len``, or the run stops before it generates anything."""
        wide = [(grid_width(batch, self.plan.gen_length, block), batch) for batch in batches]
        wide = [(width, batch) for width, batch in wide if width > self.net.args.max_seq_len]
        if wide:
            width, batch = max(wide)
            raise ValueError(
                f"{len(wide)} of {len(batches)} batches do not fit model.max_seq_len={self.net.args.max_seq_len}: "
                f"prompts of {min(batch)} to {max(batch)} tokens lay out {width} positions together (whole prompt "
                f"blocks of {block}, then each prompt's partial block and gen_length={self.plan.gen_length} in whole "
                "blocks); lower batch_size or gen_length")

    # ------------------------------------------------------------------ generation
    def generate_batch(self, prompts: list[list[int]], batch_index: int) -> GenerationOutput:
        """One batch through the denoising loop (the seam tests replace with scripted output).

        Each batch gets its own generator seeded from (seed, batch index), so the warm-up and
        the counted generation of the first batch are identical, and a batch's randomness
        (random remasking, sampling) does not depend on the batches before it.
        """
        generator = torch.Generator(device=self.plan.device).manual_seed(self.seed * 1_000_003 + batch_index)
        out = generate(self.net, prompts, self.plan.decoder, self.plan.cache, self.plan.gen_length, generator,
                       stop_at_eos=self.plan.stop_at_eos, cfg_scale=self.plan.cfg_scale)
        log_compiled(out, f"batch {batch_index}")
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        if not requests:
            return []
        requests, source = self._without_padding(requests)
        if len(source) > len(requests):
            answers = self.generate_until(requests, disable_tqdm)
            return [answers[i] for i in source]
        gen_length = self.plan.gen_length
        block = self.plan.decoder.block_length if self.net.args.block_causal else None
        items = []
        for i, req in enumerate(requests):
            context, gen_kwargs = req.args
            gen_kwargs = dict(gen_kwargs or {})
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            if gen_kwargs.get("do_sample") and not self._warned_sampling:
                log.warning("the task asks for sampling; decoding follows the decoding config instead")
                self._warned_sampling = True
            items.append(_Gen(i, context, self.encode(context), until, req.task_name, req.doc_id))
        room = prompt_room(self.net.args.max_seq_len, gen_length, block)
        self.check_fits([(len(item.ids), room) for item in items], "prompt")
        order = sorted(range(len(items)), key=lambda i: -len(items[i].ids))
        if block is not None:
            self.check_batches_fit([[len(items[i].ids) for i in order[start : start + self.batch_size]]
                                    for start in range(0, len(order), self.batch_size)], block)
        results: list[str | None] = [None] * len(items)
        bar = tqdm(total=len(items), desc="generate_until", disable=disable_tqdm or not self.progress)
        for start in range(0, len(order), self.batch_size):
            batch = [items[i] for i in order[start : start + self.batch_size]]
            prompts = [it.ids for it in batch]
            batch_index = self._batches
            self._batches += 1
            if not self._warmed_up:
                # Its own phase on the console: the first batch is generated twice, once untimed.
                bar.set_description(f"warm-up (batch of {len(batch)}, not timed)")
                out = self.generate_batch(prompts, batch_index)
                _, useful = decode_responses(self.tokenizer, out.tokens, self.stop_ids)
                self.meter.add_batch(out, useful, warmup=True, mask_token_id=self.net.args.mask_token_id)
                self._warmed_up = True
                bar.set_description("generate_until")
            out = self.generate_batch(prompts, batch_index)
            # Further timings of the same batch (same seed, same tokens): the spread of the speed.
            repeats = [self.generate_batch(prompts, batch_index).seconds for _ in range(self.timing_repeats - 1)]
            texts, useful = decode_responses(self.tokenizer, out.tokens, self.stop_ids)
            stats = self.meter.add_batch(out, useful, mask_token_id=self.net.args.mask_token_id, repeat_seconds=repeats)
            for it, row, raw, st in zip(batch, out.tokens.tolist(), texts, stats):
                until = it.until if self.cut_at_until else []
                if self.cut_at_eos:
                    text = cut_at_stops(raw, until)
                else:
                    text, raw = text_past_eos(self.tokenizer, row, until)
                results[it.index] = text
                self.records.setdefault((it.task, it.doc_id), []).append({
                    "prompt": it.context,
                    "prompt_tokens": len(it.ids),
                    "generation": text,
                    "raw_generation": raw,
                    "useful_tokens": st.useful_tokens,
                    "all_tokens": st.all_tokens,
                    "mask_tokens": st.mask_tokens,
                    "seconds": st.seconds,
                    "batch_nfe": out.nfe,
                    "batch_recompute_ratio": out.recompute_ratio,
                })
                self.cache_hook.add_partial("generate_until", requests[it.index].args, text)
            bar.update(len(batch))
            summary = self.meter.summary()
            if summary["throughput_useful_tok_s"] is not None:
                bar.set_postfix(tok_s=f"{summary['throughput_useful_tok_s']:.1f}", all_tok_s=f"{summary['throughput_all_tok_s']:.1f}")
        bar.close()
        return results  # type: ignore[return-value]

    # ------------------------------------------------------------------ likelihoods
    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Context and continuation token ids; the continuation is the tail of the joint encoding.

        When the joint encoding starts with the context's own encoding (a clean token boundary,
        e.g. a chat context ending in "assistant\\n" before "A"), that split is used as is.
        Otherwise lm-eval's TemplateLM rule applies: trailing context whitespace moves to the
        continuation (so " A" stays one token). lm-eval always moves it, which would make the
        chat case score a separate "\\n" token too: a constant for a causal LM, but a second
        masked token (and Monte Carlo noise) for a diffusion LM. An empty context becomes BOS/EOS.
        """
        if not context:
            cont = self.tokenizer(continuation, add_special_tokens=False)["input_ids"]
            prefix = self.tokenizer.bos_token_id
            if prefix is None:
                prefix = self.net.args.eos_token_id
            return [prefix], cont
        whole = self.encode(context + continuation)
        ctx = self.encode(context)
        if whole[: len(ctx)] == ctx and len(whole) > len(ctx):
            return ctx, whole[len(ctx) :]
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            continuation = context[-n_spaces:] + continuation
            context = context[:-n_spaces]
        whole = self.encode(context + continuation)
        ctx = self.encode(context)
        return ctx, whole[len(ctx) :]

    @torch.inference_mode()
    def _score_rows(self, rows: list[_Row]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """One full forward over a left-padded batch of rows (context + continuation variant); a
        block-diffusion model attends block-causally, as it generates (a one-token continuation
        is then scored exactly as Fast-dLLM v2's harness does: masked, after its context).

        Returns per row the log-softmax (float32, len(row.predict) x V) at the positions it
        predicts, and its argmax.
        """
        args = self.net.args
        device = self.plan.device
        width = max(row.length for row in rows)
        x = torch.full((len(rows), width), args.pad_token_id, dtype=torch.long)
        real = torch.zeros((len(rows), width), dtype=torch.bool)
        for r, row in enumerate(rows):
            start = width - row.length
            x[r, start : start + len(row.ctx)] = row.ctx
            x[r, start + len(row.ctx) :] = torch.tensor(row.tail)
            real[r, start:] = True
        x, real = x.to(device), real.to(device)
        positions = (real.long().cumsum(1) - 1).clamp(min=0)
        key_mask = real[:, None, None, :]
        if args.block_causal:  # block diffusion: blocks of the decoder's block_length from the first token
            rank = positions // self.plan.decoder.block_length
            key_mask = key_mask & (rank[:, None, None, :] <= rank[:, None, :, None])
        hidden, _ = self.net.hidden(x, positions, key_mask)
        out = []
        for r, row in enumerate(rows):
            # Dream (logit_shift 1) predicts position j from the hidden state at j - 1.
            first = width - len(row.tail) - args.logit_shift
            at = torch.tensor([first + j for j in row.predict], device=device)
            logp = torch.log_softmax(self.net.output(hidden[r, at]).float(), dim=-1)
            out.append((logp, logp.argmax(-1)))
        return out

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        if not requests:
            return []
        requests, source = self._without_padding(requests)
        if len(source) > len(requests):
            answers = self.loglikelihood(requests, disable_tqdm)
            return [answers[i] for i in source]
        if not self.plan.cache.full_every_step and not self._warned_likelihood_cache:
            # A likelihood is one full forward per draw: no cache acts on it, so the row's number is
            # cache=none's whatever its cache column says.
            self._warned_likelihood_cache = True
            log.warning("cache=%s does not act on log-likelihood scoring (multiple-choice tasks such as MMLU): each "
                        "likelihood is one full forward, so this accuracy is cache=none's", self.plan.cache.name)
        args = self.net.args
        gen = torch.Generator().manual_seed(self.seed)
        rows: list[_Row] = []
        n_draws = [0] * len(requests)
        contexts: dict[tuple[int, ...], torch.Tensor] = {}  # shared by a question's choices
        pairs = [self.encode_pair(*req.args) for req in requests]
        self.check_fits([(len(ctx), args.max_seq_len - len(cont)) for ctx, cont in pairs if cont], "context")
        for i, (ctx, cont) in enumerate(pairs):
            L = len(cont)
            if L == 0:
                continue
            ctx_t = contexts.setdefault(tuple(ctx), torch.tensor(ctx, dtype=torch.long))
            # The fully masked continuation: the exact (only) draw when L == 1, and the greedy check.
            rows.append(_Row(i, L, ctx_t, [args.mask_token_id] * L, list(range(L)), cont, L == 1, True))
            if L == 1:
                n_draws[i] = 1
                continue
            for _ in range(self.mc_num):
                n_mask = int(torch.randint(1, L + 1, (1,), generator=gen))
                picked = torch.randperm(L, generator=gen)[:n_mask].sort().values.tolist()
                tail = list(cont)
                for j in picked:
                    tail[j] = args.mask_token_id
                rows.append(_Row(i, L, ctx_t, tail, picked, [cont[j] for j in picked], True, False))
            n_draws[i] = self.mc_num
        totals = [0.0] * len(requests)
        greedy = [True] * len(requests)
        order = sorted(range(len(rows)), key=lambda r: -rows[r].length)
        bar = tqdm(total=len(rows), desc="loglikelihood", disable=disable_tqdm or not self.progress)
        for start in range(0, len(order), self.batch_size):
            chunk = [rows[r] for r in order[start : start + self.batch_size]]
            for row, (logp, argmax) in zip(chunk, self._score_rows(chunk)):
                target = torch.tensor(row.targets, device=logp.device)
                if row.is_draw:
                    # LLaDA's estimator: masked-token log-likelihood scaled by L / l.
                    totals[row.request] += float(logp.gather(1, target[:, None]).sum()) * row.L / len(row.predict)
                if row.is_full:
                    greedy[row.request] = bool((argmax == target).all())
            bar.update(len(chunk))
        bar.close()
        results = []
        for i, req in enumerate(requests):
            value = totals[i] / n_draws[i] if n_draws[i] else 0.0
            results.append((value, greedy[i]))
            self.records.setdefault((req.task_name, req.doc_id), []).append(
                {"context": req.args[0], "continuation": req.args[1], "choice_index": req.idx,
                 "logprob": value, "is_greedy": greedy[i], "mc_draws": n_draws[i]}
            )
            self.cache_hook.add_partial("loglikelihood", req.args, results[-1])
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        tasks = sorted({str(r.task_name) for r in requests}) or ["<unknown>"]
        raise NotImplementedError(
            f"task {', '.join(tasks)} asks for loglikelihood_rolling (perplexity), which the dllm "
            "model does not implement (a masked diffusion LM has no left-to-right likelihood); "
            "use generation or multiple-choice tasks"
        )
