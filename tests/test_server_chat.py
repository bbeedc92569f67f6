"""A captioner in the family answers OpenAI's ``/v1/chat/completions`` (issue 22 §1): through the
stock ``openai`` SDK against a real ``blipitm serve`` holding a matching model (the default) and
a captioner; the captions equal ``blipitm.load_captioner(that checkpoint)`` in process (beam,
sampled with a seed, with a prompt), streaming, the model kinds kept apart, a Batch API job of
captions, and the refusals of bad input naming the field."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from PIL import Image

import blipitm
from blipitm.testing.make_checkpoint import make_checkpoint
from server_helpers import ServerProcess, cli_server, data_uri, png_bytes
from test_batch_api import answers, jsonl, line, wait_done

OPERATOR = "chat-operator-key"
AUTH = {"Authorization": f"Bearer {OPERATOR}"}
PNG = png_bytes((200, 40, 40), (48, 40))
IMAGE = data_uri(PNG)


@pytest.fixture(scope="module")
def cap_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("chat-cap"), preset="tiny", seed=5,
                           task="caption")  # fmt: skip


@pytest.fixture(scope="module")
def server(
    tiny_ckpt: Path, cap_ckpt: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("chat-conf")
    models = root / "models.toml"
    models.write_text(
        f'[[model]]\nsource = "{tiny_ckpt}"\nname = "blip"\n\n'
        f'[[model]]\nsource = "{cap_ckpt}"\nname = "blip-caption"\naliases = ["cap"]\n'
    )
    flags = ["--models-file", str(models), "--api-key", OPERATOR, "--max-wait-ms", "1"]
    with cli_server(tiny_ckpt, *flags, "--batch-dir", str(root / "batches")) as s:
        yield s


@pytest.fixture(scope="module")
def captioner(cap_ckpt: Path) -> blipitm.Captioner:
    """The in-process reference: the checkpoint as the server loads it."""
    return blipitm.load_captioner(cap_ckpt)


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=OPERATOR, max_retries=0)


def user(*parts: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"role": "user", "content": list(parts)}]


def image_part(url: str = IMAGE) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


def post(server: ServerProcess, body: dict[str, Any], path: str = "/v1/chat/completions") -> Any:
    return httpx.post(server.url + path, json=body, headers=AUTH, timeout=60)


def reference(captioner: blipitm.Captioner, **settings: Any) -> blipitm.CaptionResult:
    (result,) = captioner.caption(Image.open(io.BytesIO(PNG)), **settings)
    return result


def test_the_openai_sdk_gets_the_captioners_beams(
    client: openai.OpenAI, captioner: blipitm.Captioner
) -> None:
    done = client.chat.completions.create(model="blip-caption", messages=user(image_part()), n=2)
    want = reference(captioner, num_beams=3, num_captions=2)
    assert [c.message.content for c in done.choices] == want.captions
    assert [c.finish_reason for c in done.choices] == want.finish_reasons
    assert done.model == "blip-caption" and done.object == "chat.completion"
    assert done.usage is not None
    image_tokens = captioner.info.image_tokens
    assert done.usage.prompt_tokens == want.prompt_tokens + image_tokens
    assert done.usage.completion_tokens == sum(want.tokens)
    assert done.usage.total_tokens == done.usage.prompt_tokens + done.usage.completion_tokens


def test_sampling_with_a_seed_and_a_prompt_equals_the_library(
    client: openai.OpenAI, captioner: blipitm.Captioner
) -> None:
    got = [
        client.chat.completions.create(
            model="cap",
            messages=user(image_part()),
            temperature=0.7,
            top_p=0.8,
            seed=11,
            n=3,
            max_tokens=6,
        )
        for _ in range(2)
    ]
    want = reference(captioner, sample=True, temperature=0.7, top_p=0.8, seed=11, num_captions=3,
                     max_length=len(captioner.prompt_ids()) + 6)  # fmt: skip
    for done in got:
        assert [c.message.content for c in done.choices] == want.captions
    prompted = client.chat.completions.create(
        model="cap",
        messages=user({"type": "text", "text": "a photo of"}, image_part()),
        max_tokens=5,
        extra_body={"num_beams": 2, "min_tokens": 2},
    )
    prompt_tokens = len(captioner.prompt_ids("a photo of"))
    want = reference(captioner, prompt="a photo of", num_beams=2, max_length=prompt_tokens + 5,
                     min_length=prompt_tokens + 2)  # fmt: skip
    assert prompted.choices[0].message.content == want.captions[0]
    assert prompted.choices[0].finish_reason == want.finish_reasons[0]


def test_streaming_sends_the_same_captions_then_the_usage(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(model="cap", messages=user(image_part()), n=2)
    chunks = list(
        client.chat.completions.create(
            model="cap",
            messages=user(image_part()),
            n=2,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = {0: "", 1: ""}
    reasons = {}
    for chunk in chunks:
        for choice in chunk.choices:
            text[choice.index] += choice.delta.content or ""
            if choice.finish_reason is not None:
                reasons[choice.index] = choice.finish_reason
    assert [text[0], text[1]] == [c.message.content for c in whole.choices]
    assert [reasons[0], reasons[1]] == [c.finish_reason for c in whole.choices]
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage


def test_each_route_serves_only_its_kind_of_model(server: ServerProcess) -> None:
    """A request that names no model goes to the default of the route's kind; a model of the
    other kind is a 400 naming the ones that serve the route."""
    cards = {c["id"]: c for c in httpx.get(server.url + "/v1/models", headers=AUTH).json()["data"]}
    assert (cards["blip"]["kind"], cards["blip-caption"]["kind"]) == ("itm", "caption")
    assert post(server, {"messages": user(image_part())}).json()["model"] == "blip-caption"
    r = post(server, {"model": "blip", "messages": user(image_part())})
    assert r.status_code == 400 and r.json()["error"]["code"] == "unsupported_model"
    assert "'blip-caption'" in r.json()["error"]["message"]
    r = post(server, {"model": "cap", "input": ["a dog"]}, "/v1/embeddings")
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"
    assert "'blip'" in r.json()["error"]["message"]
    assert post(server, {"input": ["a dog"]}, "/v1/embeddings").json()["model"] == "blip"


@pytest.mark.parametrize(
    ("change", "status", "param"),
    [
        ({"messages": [{"role": "user", "content": "describe it"}]}, 400, "messages[0].content"),
        ({"messages": [{"role": "system", "content": "hi"}]}, 400, "messages"),
        ({"messages": user(image_part(), image_part())}, 400, "messages[0].content"),
        (
            {"messages": user(image_part("data:image/png;base64,AAAA"))},
            400,
            "messages[0].content[0].image_url.url",
        ),
        ({"messages": []}, 422, "messages"),
        ({"max_tokens": 0}, 422, "max_tokens"),
        ({"max_tokens": 10_000}, 400, "max_tokens"),
        ({"n": 0}, 422, "n"),
        ({"n": 5, "num_beams": 2}, 400, "n"),
        ({"temperature": -1}, 422, "temperature"),
        ({"temperature": 1, "num_beams": 3}, 400, "num_beams"),
        ({"top_p": 0}, 422, "top_p"),
        ({"stop": ["."]}, 400, "stop"),
        ({"logprobs": True}, 400, "logprobs"),
        ({"frequency_penalty": 0.5}, 400, "frequency_penalty"),
        (
            {
                "messages": user({"type": "text", "text": "a " * 40}, image_part()),
                "max_tokens": 500,
            },
            400,
            "max_tokens",
        ),
    ],
)
def test_bad_requests_name_the_field(
    server: ServerProcess, change: dict[str, Any], status: int, param: str
) -> None:
    r = post(server, {"model": "cap", "messages": user(image_part()), **change})
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param, r.text


def test_a_batch_of_captions_answers_as_online(
    server: ServerProcess, client: openai.OpenAI
) -> None:
    bodies = {
        "beam": {"model": "cap", "messages": user(image_part()), "n": 2},
        "sampled": {"model": "cap", "messages": user(image_part()), "temperature": 1, "seed": 3},
        "streamed": {"model": "cap", "messages": user(image_part()), "stream": True},
        "two-images": {"model": "cap", "messages": user(image_part(), image_part())},
    }
    url = "/v1/chat/completions"
    upload = client.files.create(
        file=("chat.jsonl", jsonl([line(k, b, url) for k, b in bodies.items()])), purpose="batch"
    )
    batch = wait_done(
        client,
        client.batches.create(input_file_id=upload.id, endpoint=url, completion_window="24h").id,
    )
    assert batch.status == "completed"
    assert batch.request_counts is not None and batch.request_counts.failed == 2
    out = answers(client, batch.output_file_id)
    for name in ("beam", "sampled"):
        online = post(server, bodies[name]).json()
        body = out[name]["response"]["body"]
        assert body["choices"] == online["choices"] and body["usage"] == online["usage"]
    failed = answers(client, batch.error_file_id)
    streamed = failed["streamed"]["response"]
    assert streamed["status_code"] == 400 and streamed["body"]["error"]["param"] == "stream"
    two = failed["two-images"]["response"]["body"]["error"]
    assert two["code"] == "unsupported_input" and json.dumps(two)
