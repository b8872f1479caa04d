"""lm-evaluation-harness against `rtserve serve` (``local-completions``: echo, logprobs, several
prompts per request) and against transformers in process (``hf``) on the same tiny checkpoint: per
document loglikelihoods within 1e-3 and equal accuracy, on a multiple-choice task and a
loglikelihood-rolling task whose data this test writes. Nothing is downloaded."""
from __future__ import annotations

import json
import os

import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # before datasets is imported: nothing from a hub
os.environ.setdefault("HF_HUB_OFFLINE", "1")
lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("transformers")

from models import write_text_lm  # noqa: E402
from servers import start_server  # noqa: E402

pytestmark = [pytest.mark.timeout(180), pytest.mark.slow]

QUESTIONS = [("The quick brown", ["fox", "dog", "cat"], 0), ("def serve(model): return", ["model", "batch", "the"], 0),
             ("rtserve batches requests in", ["real time", "a queue", "order"], 0),
             ("Héllo wörld, ça", ["va", "ne", "sera"], 0), ("jumps over the lazy", ["dog", "fox", "brown"], 0),
             ("snow ✓", ["done", "over", "fox"], 0), ("model.infer(", ["batch)", "model)", "dog)"], 1),
             ("The lazy", ["dog.", "fox.", "model."], 2)]
TEXTS = ["The quick brown fox jumps over the lazy dog.", "rtserve batches requests in real time.",
         "def serve(model): return model.infer(batch)", "Héllo wörld, ça va? Ünïcödé ☃ snow ✓ done.",
         "A sentence the tokenizer has not seen, with words like zebra and quartz."]
MC_TASK = """task: rt_mc
dataset_path: json
dataset_kwargs: {{data_files: {{test: {path}}}}}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
target_delimiter: " "
metric_list:
  - metric: acc
"""
ROLLING_TASK = """task: rt_rolling
dataset_path: json
dataset_kwargs: {{data_files: {{test: {path}}}}}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmeval")
    ckpt = write_text_lm(root / "repo" / "lm" / "1")
    # transformers' AutoTokenizer (lm-eval's) takes special tokens as strings, not {"content": ...}
    cfg = json.loads((ckpt / "tokenizer_config.json").read_text())
    (ckpt / "tokenizer_config.json").write_text(json.dumps({**cfg, "eos_token": "</s>"}))
    (root / "repo" / "lm" / "model.yaml").write_text(
        "backend: llm\ndevice: cpu\nengine:\n  num_blocks: 256\n  block_size: 4\n  max_model_len: 256\n")
    tasks = root / "tasks"
    tasks.mkdir()
    mc, rolling = root / "mc.jsonl", root / "rolling.jsonl"
    mc.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in QUESTIONS))
    rolling.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    (tasks / "rt_mc.yaml").write_text(MC_TASK.format(path=mc))
    (tasks / "rt_rolling.yaml").write_text(ROLLING_TASK.format(path=rolling))
    return root, ckpt, tasks


def evaluate(model, model_args: dict, tasks) -> dict:
    """``model``: lm-eval's model name (with ``model_args``) or an ``LM`` instance."""
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=["rt_mc", "rt_rolling"],
                                   task_manager=TaskManager(include_path=str(tasks)), log_samples=True,
                                   batch_size=4, random_seed=0, numpy_random_seed=0, torch_random_seed=0)


def per_doc(out: dict, task: str) -> dict[int, list[float]]:
    return {s["doc_id"]: [r[0] if isinstance(r, (list, tuple)) else r for r in s["filtered_resps"]]
            for s in out["samples"][task]}


def test_lm_eval_through_the_server_matches_hf(setup):
    root, ckpt, tasks = setup
    with start_server(root / "repo", root, "--log-level", "warning") as srv:
        # tokenizer_backend huggingface with the checkpoint's tokenizer: lm-eval tokenizes and sends
        # token ids. add_bos_token: lm-eval's hf model encodes with the tokenizer's special tokens
        # (<s> here), its API models without them unless told: the same tokens are scored only with it
        served = evaluate("local-completions", {
            "base_url": srv.url + "/v1/completions", "model": "lm", "tokenizer_backend": "huggingface",
            "tokenizer": str(ckpt), "add_bos_token": True, "max_length": 256, "max_retries": 1,
            "num_concurrent": 1}, tasks)
        # tokenizer_backend left at its default ("auto"): lm-eval finds /tokenizer_info and tokenizes
        # through the server's /tokenize and /detokenize (its "remote" backend). That backend never
        # adds a BOS (lm-eval ignores add_bos_token there), so it equals the local tokenizer without it.
        # custom_prefix_token_id: the remote backend takes `bos_token_id or eos_token_id` for the rolling
        # windows' prefix, and this tokenizer's <s> is id 0 (falsy): name it, as the hf backend finds it
        from lm_eval.models.openai_completions import LocalCompletionsAPI

        lm = LocalCompletionsAPI(base_url=srv.url + "/v1/completions", model="lm", max_length=256, max_retries=1,
                                 num_concurrent=1, batch_size=4, custom_prefix_token_id=0)
        assert lm.tokenizer_backend == "remote" and (lm.tokenizer.bos_token, lm.tokenizer.bos_token_id) == ("<s>", 0)
        remote = evaluate(lm, {}, tasks)
        no_bos = evaluate("local-completions", {
            "base_url": srv.url + "/v1/completions", "model": "lm", "tokenizer_backend": "huggingface",
            "tokenizer": str(ckpt), "max_length": 256, "max_retries": 1, "num_concurrent": 1}, tasks)
    for task in ("rt_mc", "rt_rolling"):
        ours, remote_values = per_doc(no_bos, task), per_doc(remote, task)
        assert remote_values.keys() == ours.keys()
        for doc, values in remote_values.items():
            # the two runs meet different prefix-cache states and batch shapes: float32 rounding differs
            assert values == pytest.approx(ours[doc], abs=1e-5), (task, doc)
    hf = evaluate("hf", {"pretrained": str(ckpt), "dtype": "float32", "device": "cpu", "max_length": 256}, tasks)
    for task in ("rt_mc", "rt_rolling"):
        ours, theirs = per_doc(served, task), per_doc(hf, task)
        assert ours.keys() == theirs.keys() and len(ours) == (len(QUESTIONS) if task == "rt_mc" else len(TEXTS))
        for doc, values in ours.items():
            assert values == pytest.approx(theirs[doc], abs=1e-3), (task, doc)
    assert served["results"]["rt_mc"]["acc,none"] == hf["results"]["rt_mc"]["acc,none"]
    assert served["results"]["rt_rolling"]["word_perplexity,none"] == pytest.approx(
        hf["results"]["rt_rolling"]["word_perplexity,none"], rel=1e-3)
