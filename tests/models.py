"""Tiny real models for tests, built in temporary folders (never shipped)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

# y = x @ W + b, exact in float32 for small integers
W = np.array([[1, 0, 2], [0, 1, 0], [1, 1, 1], [0, 0, 3]], dtype=np.float32)  # (4, 3)
B = np.array([0.5, -1.0, 2.0], dtype=np.float32)


def affine_module():
    import torch

    lin = torch.nn.Linear(4, 3)
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(W.T))
        lin.bias.copy_(torch.from_numpy(B))
    return lin.eval()


def expected(x: np.ndarray) -> np.ndarray:
    return x @ W + B


def write_model(repo: Path, name: str, backend: str, yaml_text: str, versions=(1,)) -> Path:
    """Write ``repo/name`` holding the affine model for ``backend`` ('onnx' | 'torch')."""
    import torch

    from rtserve.export.torch_export import export_onnx, export_pt2

    mdir = repo / name
    mdir.mkdir(parents=True, exist_ok=True)
    (mdir / "model.yaml").write_text(yaml_text)
    ex = torch.zeros(2, 4)
    for v in versions:
        if backend == "onnx":
            export_onnx(affine_module(), ex, mdir / str(v) / "model.onnx", ["x"], ["y"])
        else:
            export_pt2(affine_module(), ex, mdir / str(v) / "model.pt2", ["x"], ["y"])
    return mdir


def _slow_graph(width: int, depth: int):
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
    nodes, prev = [], "x"
    for i in range(depth):
        nodes.append(helper.make_node("MatMul", [prev, "w"], [f"m{i}"]))
        nodes.append(helper.make_node("Tanh", [f"m{i}"], [f"t{i}" if i < depth - 1 else "y"]))
        prev = f"t{i}"
    graph = helper.make_graph(
        nodes, "slow",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", width])],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def write_slow_onnx(path: Path, width: int = 1024, batch_seconds: float = 0.25) -> Path:
    """An ONNX model y = tanh-chain of MatMuls on (B, width), tiny on disk (one shared weight), deep
    enough that a batch of 64 rows holds an instance busy for about ``batch_seconds`` on one thread
    of *this* machine: the depth is calibrated here, so the deadline and queue tests hold on fast
    and slow machines alike."""
    import time

    import onnx
    import onnxruntime as ort

    probe_depth = 20
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(_slow_graph(width, probe_depth).SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])
    x = np.ones((64, width), np.float32)
    sess.run(None, {"x": x})
    t0 = time.perf_counter()
    for _ in range(3):
        sess.run(None, {"x": x})
    per_layer = (time.perf_counter() - t0) / 3 / probe_depth
    depth = int(min(2000, max(50, batch_seconds / per_layer)))
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(_slow_graph(width, depth), str(path))
    return path


AFFINE_YAML = """\
backend: {backend}
device: cpu
max_batch_size: 8
batching:
  max_queue_delay_ms: 1
  max_queue_size: 64
  priority_levels: 2
backend_options:
  intra_op_threads: 1
"""

SLOW_YAML = """\
backend: onnx
device: cpu
max_batch_size: 64
batching:
  max_queue_size: {queue}
backend_options:
  intra_op_threads: 1
"""


LM_TEXT = ["The quick brown fox jumps over the lazy dog.", "Héllo wörld, ça va? Ünïcödé ☃ snow ✓ done.",
           "def serve(model): return model.infer(batch)", "rtserve batches requests in real time."] * 20
LM_CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
                    "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def write_text_lm(path: Path, max_position_embeddings: int = 256, chat_template: str = LM_CHAT_TEMPLATE) -> Path:
    """A tiny Llama checkpoint with a byte-level BPE tokenizer trained here and a chat template."""
    import json

    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    path.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(LM_TEXT, trainers.BpeTrainer(vocab_size=320, special_tokens=["<s>", "</s>"],
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": {"content": "</s>"}, "chat_template": chat_template}))
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=112,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=max_position_embeddings, tie_word_embeddings=True,
                                   eos_token_id=1)
    m = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
    m.save_pretrained(path, safe_serialization=True)
    return path


def write_random_llama(path: Path, std: float = 0.2, seed: int = 0, **config):
    """A tiny Llama checkpoint with random weights drawn N(0, std) (peaked enough that differences
    show), saved with transformers' ``save_pretrained``; returns the transformers model."""
    import torch
    import transformers

    torch.manual_seed(seed)
    cfg = dict(vocab_size=97, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=256)
    ref = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**cfg, **config})).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, std)
    ref.save_pretrained(path, safe_serialization=True)
    return ref


def write_tiny_bert(path: Path, **config) -> Path:
    """A random BertModel (vocabulary 40, 2 layers of width 32) with a word-level tokenizer: enough
    for an embedding model to load and run, never to mean anything."""
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    path.mkdir(parents=True, exist_ok=True)
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]"] + [f"w{i}" for i in range(36)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path / "tokenizer.json"))
    torch.manual_seed(0)
    cfg = dict(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
               intermediate_size=64, max_position_embeddings=64)
    transformers.BertModel(transformers.BertConfig(**{**cfg, **config})).save_pretrained(path, safe_serialization=True)
    return path


def set_weight(path: Path, name: str, index: int, value: float) -> None:
    """Overwrite element ``index`` (of the flattened tensor) of ``name`` in ``path``'s model.safetensors."""
    from safetensors.torch import load_file, save_file

    f = path / "model.safetensors"
    tensors = load_file(str(f))
    tensors[name].view(-1)[index] = value
    save_file(tensors, str(f), metadata={"format": "pt"})


# -- chat templates with tools, and a scripted LM that answers with a fixed text -------------------
HERMES_CHAT_TEMPLATE = (
    "{% if tools %}<|system|>You may call functions. Their signatures:\n<tools>\n"
    "{% for t in tools %}{{ t | tojson }}\n{% endfor %}</tools>\nCall one as <tool_call>{\"name\": ..., "
    "\"arguments\": {...}}</tool_call>{{ eos_token }}{% endif %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' and m['tool_calls'] %}<|assistant|>{{ m['content'] or '' }}"
    "{% for c in m['tool_calls'] %}<tool_call>{\"name\": \"{{ c['function']['name'] }}\", \"arguments\": "
    "{% if c['function']['arguments'] is string %}{{ c['function']['arguments'] }}{% else %}"
    "{{ c['function']['arguments'] | tojson }}{% endif %}}</tool_call>{% endfor %}{{ eos_token }}"
    "{% elif m['role'] == 'tool' %}<|tool|><tool_response>{{ m['content'] }}</tool_response>{{ eos_token }}"
    "{% else %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
LLAMA3_CHAT_TEMPLATE = (  # tests "tools is not none", as Llama 3.1's template does
    "{% if tools is not none %}<|system|>Environment: ipython. To call a function answer with <|python_tag|>{\"name\": "
    "function name, \"parameters\": arguments}. Functions:\n{% for t in tools %}{{ t['function'] | tojson(indent=2) }}"
    "\n{% endfor %}{{ eos_token }}{% endif %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' and m['tool_calls'] %}<|assistant|><|python_tag|>"
    "{% for c in m['tool_calls'] %}{\"name\": \"{{ c['function']['name'] }}\", \"parameters\": "
    "{{ c['function']['arguments'] | tojson }}}{% if not loop.last %}; {% endif %}{% endfor %}{{ eos_token }}"
    "{% elif m['role'] == 'tool' %}<|ipython|>{{ m['content'] }}{{ eos_token }}"
    "{% else %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")

MISTRAL_CHAT_TEMPLATE = (
    "{% if tools %}[AVAILABLE_TOOLS]{{ tools | tojson }}[/AVAILABLE_TOOLS]{% endif %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' and m['tool_calls'] %}[TOOL_CALLS]{{ m['tool_calls'] | map(attribute='function') "
    "| list | tojson }}{{ eos_token }}"
    "{% elif m['role'] == 'tool' %}[TOOL_RESULTS]{{ m['content'] }}[/TOOL_RESULTS]"
    "{% else %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")


def write_scripted_lm(path: Path, chat_template: str, script: list[str], special: tuple[str, ...] = ()) -> Path:
    """A tiny Llama checkpoint that, after ``<|assistant|>``, greedily writes the pieces of ``script``
    (each an added token) and then its end-of-sequence token, whatever came before: every layer
    adds zero to the residual stream, so the logits depend only on the current token, and the
    unembedding maps each piece's embedding to the next piece. ``special``: pieces that are
    special tokens (skipped when decoding unless kept, as ``<|python_tag|>`` is)."""
    import json

    import torch
    import transformers
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    path.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(LM_TEXT, trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    pieces = ["<|assistant|>"] + [p for p in script if p not in special]
    tok.add_tokens([AddedToken(p, normalized=False) for p in dict.fromkeys(pieces)])
    tok.add_special_tokens([AddedToken(p, normalized=False, special=True) for p in special])
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "chat_template": chat_template}))
    chain = [tok.token_to_id(p) for p in ["<|assistant|>", *script, "</s>"]]
    assert len(set(chain)) == len(chain), "script pieces must be distinct"
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=112,
                                   num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=1024, tie_word_embeddings=False, eos_token_id=1)
    m = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" not in name:
                p.zero_()
        emb = m.model.embed_tokens.weight
        emb.normal_(0, 1)
        for a, b in zip(chain, chain[1:]):  # logits of b: 30 x the (normalized) embedding of a
            m.lm_head.weight[b] += 30 * emb[a] / emb[a].norm()
    m.save_pretrained(path, safe_serialization=True)
    return path
