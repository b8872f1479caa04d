"""Structured outputs through clients nobody here wrote: ``instructor`` (JSON-schema and tools modes)
and ``langchain-openai``'s ``with_structured_output`` (its default, json_schema, and function
calling), against the real server on loopback, on a tiny random checkpoint. Whatever the weights,
constrained decoding makes the answer parse and validate (bounded fields, so it also ends)."""
from __future__ import annotations

from typing import Literal

import pytest

openai = pytest.importorskip("openai")
pydantic = pytest.importorskip("pydantic")
pytest.importorskip("transformers")

from servers import start_server  # noqa: E402
from models import write_text_lm  # noqa: E402

pytestmark = pytest.mark.timeout(240)
ENGINE = "engine:\n  num_blocks: 256\n  block_size: 8\n  max_model_len: 256\n"


class Pet(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=8)
    kind: Literal["cat", "dog", "bird"]
    age: int = pydantic.Field(ge=0, le=30)


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    repo = tmp_path_factory.mktemp("clientsrepo")
    write_text_lm(repo / "lm" / "1")
    (repo / "lm" / "model.yaml").write_text("backend: llm\ndevice: cpu\n" + ENGINE)
    with start_server(repo, repo.parent, "--log-level", "warning") as srv:
        yield srv.url


MESSAGES = [{"role": "user", "content": "Describe a pet."}]


@pytest.mark.parametrize("mode", ["JSON_SCHEMA", "TOOLS"])
def test_instructor(url, mode):
    instructor = pytest.importorskip("instructor")
    client = instructor.from_openai(openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0),
                                    mode=getattr(instructor.Mode, mode))
    pet = client.chat.completions.create(model="lm", response_model=Pet, messages=MESSAGES, max_retries=0,
                                         max_tokens=120, temperature=0.7, seed=3)
    assert isinstance(pet, Pet) and pet.kind in ("cat", "dog", "bird") and 0 <= pet.age <= 30


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_langchain_with_structured_output(url, method):
    lc = pytest.importorskip("langchain_openai")
    llm = lc.ChatOpenAI(base_url=url + "/v1", api_key="unused", model="lm", max_tokens=120, temperature=0.7,
                        max_retries=0, seed=5)
    pet = llm.with_structured_output(Pet, method=method).invoke("Describe a pet.")
    assert isinstance(pet, Pet) and len(pet.name) <= 8
