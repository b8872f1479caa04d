"""What the OpenAI bench sends: the run's configuration (:class:`OpenAIBenchConfig`) and request i
of a run (:class:`RequestPlanner`), drawn from one seeded generator so a run is reproducible.

Every request streams (``stream: true`` with ``stream_options.include_usage``, so the usage chunk
gives the exact token counts), asks for ``max_tokens`` uniform in ``output_len`` with
``ignore_eos: true``, and sends either a prompt from ``prompts_file`` (in file order, cycling) or a
random one: token ids below ``vocab_size`` for ``/v1/completions`` (no tokenizer needed), words for
chat.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from .http1 import RequestSpec

SLO_KEYS = ("ttft_ms", "tpot_ms", "e2e_ms")
WORDS = ("the of and to in is it for on that with as was at by this be from or an are have not but what all "
         "were when we there can more if no out so up said about into than them could time only new some "
         "model serve token batch queue cache").split()


@dataclass(frozen=True)
class OpenAIBenchConfig:
    """One run. Exactly one of ``rate`` (open loop) or ``concurrency`` (closed loop); the run ends
    after ``num_requests`` requests or, without it, when ``duration_s`` is over (no new requests)."""

    model: str
    chat: bool = False
    rate: float | None = None
    concurrency: int | None = None
    num_requests: int | None = None
    duration_s: float | None = None
    input_len: tuple[int, int] = (32, 32)     # uniform in [min, max] (tokens; words for chat)
    output_len: tuple[int, int] = (128, 128)  # max_tokens, uniform in [min, max], EOS ignored
    prompts_file: str | None = None
    vocab_size: int = 256  # random prompt token ids are drawn below this: 256 fits any model
    temperature: float = 0.0
    seed: int = 0
    slos: dict[str, float] = field(default_factory=dict)  # SLO_KEYS -> bound in ms
    warmup_requests: int = 0
    timeout_s: float = 600.0
    api_key: str | None = None

    def __post_init__(self) -> None:
        if (self.rate is None) == (self.concurrency is None):
            raise ValueError("give exactly one of rate (open loop) or concurrency (closed loop)")
        if self.rate is not None and not self.rate > 0 or self.concurrency is not None and self.concurrency < 1:
            raise ValueError("rate must be > 0 and concurrency >= 1")
        if self.num_requests is None and self.duration_s is None:
            raise ValueError("give num_requests or duration_s")
        if self.num_requests is not None and self.num_requests < 1 or self.duration_s is not None and self.duration_s <= 0:
            raise ValueError("num_requests must be >= 1 and duration_s > 0")
        for name in ("input_len", "output_len"):
            lo, hi = getattr(self, name)
            if not 1 <= lo <= hi:
                raise ValueError(f"{name}: need 1 <= min <= max, got {lo}:{hi}")
        bad = sorted(set(self.slos) - set(SLO_KEYS))
        if bad:
            raise ValueError(f"slo: unknown key '{bad[0]}'; allowed: {', '.join(SLO_KEYS)}")
        if self.vocab_size < 1 or self.timeout_s <= 0 or self.warmup_requests < 0:
            raise ValueError("vocab_size >= 1, timeout_s > 0 and warmup_requests >= 0 are required")

    @property
    def path(self) -> str:
        return "/v1/chat/completions" if self.chat else "/v1/completions"


# -- what to send ---------------------------------------------------------------------------------
def load_prompts(path: str) -> list[str | list[int]]:
    """A text file (one prompt per line) or JSONL whose objects have a ``prompt`` (text or token ids)."""
    lines = [ln for ln in Path(path).read_text().splitlines() if ln.strip()]
    if not lines:
        raise ValueError(f"{path}: no prompts")
    if all(ln.lstrip().startswith("{") for ln in lines):
        prompts = []
        for i, ln in enumerate(lines, 1):
            p = json.loads(ln).get("prompt")
            if not p or not isinstance(p, (str, list)):
                raise ValueError(f"{path}:{i}: needs a non-empty 'prompt' (text or token ids)")
            prompts.append(p)
        return prompts
    return lines


@dataclass(frozen=True)
class PlannedRequest:
    spec: RequestSpec
    prompt_len: int  # tokens of a token-id prompt; 0 when the prompt is text (the usage chunk tells)
    max_tokens: int


class RequestPlanner:
    """Request i, drawn in index order from one seeded generator, so a run is reproducible."""

    def __init__(self, cfg: OpenAIBenchConfig) -> None:
        self.cfg = cfg
        self.rng = random.Random(cfg.seed + 1)
        self.prompts = load_prompts(cfg.prompts_file) if cfg.prompts_file else None
        self.headers = {"content-type": "application/json"}
        if cfg.api_key:
            self.headers["authorization"] = f"Bearer {cfg.api_key}"

    def plan(self, i: int) -> PlannedRequest:
        cfg, rng = self.cfg, self.rng
        max_tokens = rng.randint(*cfg.output_len)
        if self.prompts is not None:  # in file order, cycling
            prompt = self.prompts[i % len(self.prompts)]
        elif cfg.chat:
            prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(*cfg.input_len)))
        else:
            prompt = [rng.randrange(cfg.vocab_size) for _ in range(rng.randint(*cfg.input_len))]
        body: dict = {"model": cfg.model, "max_tokens": max_tokens, "ignore_eos": True, "stream": True,
                      "stream_options": {"include_usage": True}, "temperature": cfg.temperature}
        if cfg.chat:
            if not isinstance(prompt, str):
                raise ValueError("chat needs text prompts, not token ids")
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
        spec = RequestSpec("POST", cfg.path, orjson.dumps(body), self.headers)
        return PlannedRequest(spec, len(prompt) if isinstance(prompt, list) else 0, max_tokens)
