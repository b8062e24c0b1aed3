"""`graft serve` (graft/serve.py, graft/serve_embed.py): the OpenAI client and plain HTTP against a
server in a thread, for the session's 5-step `tiny` run and a 2-step tiny `clip` run. Greedy answers
must equal `graft.api.Run.generate`'s, embeddings and zero-shot rankings the model's own
`encode_text` / `encode_image` / `similarity`; every bad request gets a 4xx JSON error and the server
still answers afterwards."""

import base64
import http.client
import io
import json
import struct
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import torch

import graft
from graft.cli import parser
from graft.data.shapes import ShapesWorld
from graft.eval.zero_shot import TEMPLATES
from graft.models.vlm import sample
from graft.serve import MAX_BODY, make_server
from tests.torchrun_runs import ONE, QUIET, TINY, here

PROMPT = "what color is the circle?"


@pytest.fixture(scope="module")
def run(shared_run):
    """The `one_process` run of conftest.py (tiny, 5 steps), loaded."""
    return graft.load(shared_run("tiny_one_process", lambda out: here(*TINY, "--out", str(out), *ONE)))


def _serving(run):
    server = make_server(run, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


@pytest.fixture(scope="module")
def url(run):
    server, address = _serving(run)
    yield address
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


def scene(index: int):
    return ShapesWorld(24, 3, 4, 0).sample("test", index).image


def data_url(image) -> str:
    png = io.BytesIO()
    image.save(png, format="PNG")
    return "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()


def message(text: str, *urls: str) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


def request(url: str, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    """(status, body as JSON or text) of one plain HTTP request."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.request(method, path, body=body, headers=headers or {})
    res = conn.getresponse()
    data = res.read().decode()
    conn.close()
    return res.status, json.loads(data) if res.getheader("Content-Type") == "application/json" else data


def chat(url: str, **body):
    return request(url, "POST", "/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"})


def test_models_page_and_cli(url, run):
    status, models = request(url, "GET", "/v1/models")
    assert status == 200 and models == {"object": "list", "data": [
        {"id": run.dir.path.name, "object": "model", "owned_by": "graft", "capabilities": ["generates"]}]}
    status, page = request(url, "GET", "/")
    assert status == 200 and all(p in page for p in ("/v1/chat/completions", "/v1/models", "/v1/graft/random_scene",
                                                "/v1/graft/zero_shot", "capabilities"))
    status, drawn = request(url, "GET", "/v1/graft/random_scene")
    assert status == 200 and drawn["url"].startswith("data:image/png;base64,")
    args = parser().parse_args(["serve", "runs/x", "--port", "0"])
    assert (args.dir, args.host, args.port) == ("runs/x", "127.0.0.1", 0)


def test_greedy_and_streamed_answers_equal_generate(client, run):
    name = run.dir.path.name
    for index in range(3):
        expected = run.generate(scene(index), PROMPT, max_new_tokens=12)
        got = client.chat.completions.create(model=name, messages=message(PROMPT, data_url(scene(index))),
                                             max_tokens=12)
        assert got.choices[0].message.content == expected
        assert got.choices[0].finish_reason in ("stop", "length") and got.usage.prompt_tokens > 9
        assert got.usage.total_tokens == got.usage.prompt_tokens + got.usage.completion_tokens
        chunks = list(client.chat.completions.create(model=name, messages=message(PROMPT, data_url(scene(index))),
                                                     max_tokens=12, stream=True))
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
        assert chunks[-1].choices[0].finish_reason == got.choices[0].finish_reason


def test_stream_ends_with_done(url, run):
    status, text = chat(url, model=run.dir.path.name, messages=message(PROMPT, data_url(scene(0))), stream=True,
                        max_tokens=4)
    events = [e.removeprefix("data: ") for e in text.strip().split("\n\n")]
    assert status == 200 and events[-1] == "[DONE]"
    assert json.loads(events[-2])["choices"][0]["finish_reason"] in ("stop", "length")


def test_sampling_is_reproducible_with_a_seed(client, run):
    ask = lambda **kw: client.chat.completions.create(
        model=run.dir.path.name, messages=message(PROMPT, data_url(scene(1))), max_tokens=16, **kw
    ).choices[0].message.content
    first = ask(temperature=1.5, top_p=0.95, seed=7)
    assert first == ask(temperature=1.5, top_p=0.95, seed=7)
    sampled = {ask(temperature=1.5, seed=s) for s in range(4)}
    assert sampled != {ask()}  # temperature changes the answer (of a 5-step model, surely)


def _bomb() -> str:
    """A PNG whose header claims 100000 x 100000 pixels (and whose data would not fill it)."""
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    chunk = lambda kind, data: (struct.pack(">I", len(data)) + kind + data
                                + struct.pack(">I", zlib.crc32(kind + data)))
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b"")
    return "data:image/png;base64," + base64.b64encode(png).decode()


def _bad_requests(name: str, image: str) -> list[tuple[dict, int, str]]:
    """(request, status, a word of its error message)."""
    good = {"model": name, "messages": message(PROMPT, image)}
    return [
        ({**good, "frequency_penalty": 0.5}, 400, "frequency_penalty"),
        ({**good, "model": "gpt-4"}, 404, "not served"),
        ({**good, "messages": message(PROMPT, "data:image/png;base64," + base64.b64encode(b"hello").decode())},
         400, "image_unreadable"),
        ({**good, "messages": message(PROMPT, "data:image/png;base64,@@@")}, 400, "base64"),
        ({**good, "messages": message(PROMPT, _bomb())}, 400, "image_too_large"),
        ({**good, "messages": message(PROMPT, "https://example.com/cat.png")}, 400, "nothing is fetched"),
        ({**good, "messages": message(PROMPT, *[image] * 9)}, 400, "at most 8 (data.max_images)"),
        ({**good, "messages": message("red " * 500, image)}, 400, "lm.max_seq_len"),
        ({**good, "max_tokens": 0}, 400, "max_tokens"),
        ({**good, "max_tokens": 10**6}, 400, "max_tokens"),
        ({**good, "max_tokens": True}, 400, "max_tokens"),
        ({**good, "temperature": "hot"}, 400, "temperature"),
        ({**good, "top_p": 0}, 400, "top_p"),
        ({**good, "stream": "yes"}, 400, "stream"),
        ({**good, "messages": [{"role": "system", "content": "be brief"}, *good["messages"]]}, 400, "system"),
        ({**good, "messages": []}, 400, "messages"),
        ({**good, "messages": [{"role": "user", "content": [{"type": "audio"}]}]}, 400, "content[0]"),
    ]


def test_bad_requests_get_4xx_json_and_the_server_goes_on(url, run):
    name, image = run.dir.path.name, data_url(scene(2))
    expected = run.generate(scene(2), PROMPT, max_new_tokens=6)
    raw = [  # (method, path, body, headers, status, word)
        ("POST", "/v1/chat/completions", b"{not json", {}, 400, "malformed JSON"),
        ("POST", "/v1/chat/completions", b"[1, 2]", {}, 400, "JSON object"),
        ("POST", "/v1/chat/completions", b"[" * 100_000, {}, 400, "malformed JSON"),
        ("POST", "/v1/chat/completions", None, {"Content-Length": str(MAX_BODY + 1)}, 413, "limit"),
        ("POST", "/v1/chat/completions", None, {"Transfer-Encoding": "chunked"}, 411, "Content-Length"),
        ("POST", "/v1/embeddings", json.dumps({"model": name, "input": "a red circle"}).encode(), {}, 400,
         "does not embed images and texts"),
        ("POST", "/v1/graft/zero_shot", json.dumps({"model": name, "image_url": {"url": image},
                                                    "labels": ["red circle"]}).encode(), {}, 400, "does not embed"),
        ("POST", "/v1/nope", b"{}", {}, 404, "no such endpoint"),
        ("GET", "/nope", None, {}, 404, "no such endpoint"),
    ]
    bad = [("POST", "/v1/chat/completions", json.dumps(b).encode(), {}, s, w) for b, s, w in _bad_requests(name, image)]
    for method, path, body, headers, status, word in raw + bad:
        got, answer = request(url, method, path, body, headers)
        assert (got, answer["error"]["type"]) == (status, "invalid_request_error"), (path, body and body[:80], answer)
        assert word in answer["error"]["message"], answer
        status, good = chat(url, model=name, messages=message(PROMPT, image), max_tokens=6)
        assert status == 200 and good["choices"][0]["message"]["content"] == expected


def test_sixty_four_concurrent_requests_queue_and_all_get_their_answer(url, run):
    name = run.dir.path.name
    expected = [run.generate(scene(i % 4), PROMPT, max_new_tokens=8) for i in range(4)]
    ask = lambda i: chat(url, model=name, messages=message(PROMPT, data_url(scene(i % 4))), max_tokens=8)
    with ThreadPoolExecutor(64) as pool:
        answers = list(pool.map(ask, range(64)))
    assert [(s, a["choices"][0]["message"]["content"]) for s, a in answers] == [(200, expected[i % 4]) for i in range(64)]


def test_several_images_go_where_their_parts_are(client, run):
    """Two images between text parts: the answer is the model's greedy one for the prompt with each
    image's placeholders at its part's place (Processor.prompt's offsets), not at the start."""
    proc, model = run.processor, run.model
    first, second = "the first:", "and the second. what color is the circle?"
    parts = [{"type": "text", "text": first}, {"type": "image_url", "image_url": {"url": data_url(scene(0))}},
             {"type": "text", "text": second}, {"type": "image_url", "image_url": {"url": data_url(scene(1))}}]
    question = first + "\n" + second
    ids = proc.prompt(question, 2, at=[len(first), len(question)])
    assert ids.count(proc.tok.image) == 2 * proc.num_image_tokens and ids != proc.prompt(question, 2)
    pixels = torch.stack([proc.pixels(scene(0)), proc.pixels(scene(1))])
    with torch.no_grad():
        new = model.generate(torch.tensor([ids]), pixels, max_new_tokens=6, eos_id=proc.tok.eos)[0]
    got = client.chat.completions.create(model=run.dir.path.name, messages=[{"role": "user", "content": parts}],
                                         max_tokens=6)
    assert got.choices[0].message.content == proc.tok.decode(new)
    assert got.usage.prompt_tokens == len(ids)


def test_text_only_and_earlier_turns_reach_the_prompt(url, run):
    name = run.dir.path.name
    status, alone = chat(url, model=name, messages=[{"role": "user", "content": PROMPT}], max_tokens=3)
    assert status == 200 and alone["choices"][0]["message"]["role"] == "assistant"
    history = [{"role": "user", "content": "how many shapes?"}, {"role": "assistant", "content": "2"},
               {"role": "user", "content": PROMPT}]
    status, later = chat(url, model=name, messages=history, max_tokens=3)
    assert status == 200 and later["usage"]["prompt_tokens"] > alone["usage"]["prompt_tokens"] + 4
    twice = [history[0], history[0]]
    assert chat(url, model=name, messages=twice)[0] == 400  # user, user: not alternating
    pictured = [*message("how many shapes?", data_url(scene(0))), *history[1:]]
    status, answer = chat(url, model=name, messages=pictured)
    assert status == 400 and "only the last user message" in answer["error"]["message"]


def test_nucleus_sampling_draws_only_from_the_top_mass():
    logits = torch.tensor([[0.0, 0.0, 1.0, -1.0]] * 64)  # p(2) = 0.48: alone in a nucleus of top_p 0.4
    assert sample(logits, 1.0, 0.4, torch.Generator().manual_seed(0)).eq(2).all()
    drawn = sample(logits, 1.0, 1.0, torch.Generator().manual_seed(0))
    assert set(drawn.tolist()) > {2} and drawn.equal(sample(logits, 1.0, 1.0, torch.Generator().manual_seed(0)))


# ---- a dual encoder: /v1/embeddings and /v1/graft/zero_shot ----------------------------------------

TINY_DUAL = [f"--set={part}.{key}={value}" for part in ("vision", "text")
             for key, value in (("hidden_size", 32), ("layers", 1), ("intermediate_size", 64))]
LABELS = ["red circle", "blue square", "green triangle", "yellow circle", "red square"]


@pytest.fixture(scope="module")
def dual(tmp_path_factory):
    """A `clip` run of 2 tiny steps, loaded, and the address of a server for it."""
    out = tmp_path_factory.mktemp("serve") / "clip_run"
    here("train", "clip", "--out", str(out), *QUIET, *TINY_DUAL, "--set", "train.steps=2", "--set", "train.batch_size=8")
    run = graft.load(out)
    server, address = _serving(run)
    yield run, address
    server.shutdown()
    server.server_close()


@torch.no_grad()
def _expected_ranking(run, image, labels, templates):
    """(labels best first, similarities, probabilities) from the model itself: per label the mean of
    the normalised embeddings of its prompts, renormalised (CLIP's ensemble), against the image."""
    model, proc = run.model, run.processor
    text = model.encode_text(**proc.texts([t.format(label) for label in labels for t in templates]))
    text = torch.nn.functional.normalize(text.view(len(labels), len(templates), -1).mean(1), dim=-1)
    sims = model.similarity(model.encode_image(proc.pixels(image)[None]), text)[0]
    order = sims.argsort(descending=True).tolist()
    probs = torch.softmax(model.logit_scale.exp().clamp(max=100) * sims, 0)
    return [labels[i] for i in order], sims[order].tolist(), probs[order].tolist()


def zero_shot(url: str, **body):
    return request(url, "POST", "/v1/graft/zero_shot", json.dumps(body).encode(), {"Content-Type": "application/json"})


def test_zero_shot_ranks_labels_as_the_models_similarity_does(dual):
    run, url = dual
    name = run.dir.path.name
    assert request(url, "GET", "/v1/models")[1]["data"][0]["capabilities"] == ["embeds"]
    for index, templates in ((0, None), (1, None), (2, ["{}"]), (3, ["a photo of a {}.", "a large {}"])):
        image = scene(index)
        status, got = zero_shot(url, model=name, image_url={"url": data_url(image)}, labels=LABELS,
                                **({"templates": templates} if templates else {}))
        labels, sims, probs = _expected_ranking(run, image, LABELS, templates or TEMPLATES)
        assert status == 200 and got["templates"] == (templates or TEMPLATES)
        assert [r["label"] for r in got["labels"]] == labels
        assert [r["similarity"] for r in got["labels"]] == pytest.approx(sims, abs=1e-5)
        assert [r["probability"] for r in got["labels"]] == pytest.approx(probs, abs=1e-5)
    status, answer = chat(url, model=name, messages=message(PROMPT))
    assert status == 400 and "does not generate text" in answer["error"]["message"]


@torch.no_grad()
def test_embeddings_equal_the_models_normalised_outputs(dual):
    run, url = dual
    name, model, proc = run.dir.path.name, run.model, run.processor
    texts = ["a small red circle", "a large blue square to the left of a green triangle", "x"]
    expected = torch.nn.functional.normalize(model.encode_text(**proc.texts(texts)), dim=-1)
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    got = client.embeddings.create(model=name, input=texts)  # the client asks for base64 floats
    assert [e.index for e in got.data] == [0, 1, 2] and got.usage.prompt_tokens > len(texts)
    assert torch.tensor([e.embedding for e in got.data]) == pytest.approx(expected, abs=1e-6)
    one = client.embeddings.create(model=name, input=texts[0], encoding_format="float")
    assert torch.tensor(one.data[0].embedding) == pytest.approx(expected[0], abs=1e-5)
    images = [scene(0), scene(1)]
    pictured = torch.nn.functional.normalize(model.encode_image(torch.stack([proc.pixels(i) for i in images])), dim=-1)
    status, mixed = request(url, "POST", "/v1/embeddings", json.dumps({"model": name, "input": [
        {"image_url": {"url": data_url(images[0])}}, texts[1], {"image_url": {"url": data_url(images[1])}}]}).encode())
    assert status == 200 and mixed["object"] == "list" and mixed["model"] == name
    rows = torch.tensor([d["embedding"] for d in mixed["data"]])
    assert rows == pytest.approx(torch.stack([pictured[0], expected[1], pictured[1]]), abs=1e-5)
    assert rows.norm(dim=-1) == pytest.approx(torch.ones(3), abs=1e-5)


def test_bad_embedding_and_zero_shot_requests_get_4xx(dual):
    run, url = dual
    name, image = run.dir.path.name, data_url(scene(0))
    good = {"model": name, "image_url": {"url": image}, "labels": LABELS}
    embed = lambda **body: request(url, "POST", "/v1/embeddings", json.dumps({"model": name, **body}).encode())
    cases = [  # (response, status, a word of its error message)
        (embed(input="red", dimensions=8), 400, "dimensions"),
        (embed(input="red", user="me"), 400, "'user'"),
        (embed(input=[]), 400, "input"),
        (embed(input=[""]), 400, "input[0]"),
        (embed(input=[[1, 2, 3]]), 400, "input[0]"),
        (embed(input=["x"] * 65), 400, "1 to 64"),
        (embed(input="x" * 2001), 400, "2000"),
        (embed(input=[{"image_url": {"url": "https://example.com/a.png"}}]), 400, "nothing is fetched"),
        (embed(input=[{"image_url": {"url": _bomb()}}]), 400, "image_too_large"),
        (embed(input=[{"image": image}]), 400, "image_url"),
        (embed(input="red", encoding_format="int8"), 400, "encoding_format"),
        (embed(input="red", model="gpt"), 404, "not served"),
        (zero_shot(url, **{**good, "labels": []}), 400, "labels"),
        (zero_shot(url, **{**good, "labels": ["red", "red"]}), 400, "distinct"),
        (zero_shot(url, **{**good, "labels": "red circle"}), 400, "labels"),
        (zero_shot(url, **{**good, "templates": ["a photo"]}), 400, "{}"),
        (zero_shot(url, **{**good, "templates": ["{}"] * 9}), 400, "templates"),
        (zero_shot(url, **{**good, "image_url": image}), 400, "image_url"),
        (zero_shot(url, **{**good, "image_url": {"url": "data:image/png;base64,@@"}}), 400, "base64"),
        (zero_shot(url, **{**good, "top_k": 3}), 400, "top_k"),
    ]
    for (status, answer), expected, word in cases:
        assert (status, answer["error"]["type"]) == (expected, "invalid_request_error"), answer
        assert word in answer["error"]["message"], answer
    assert zero_shot(url, **good)[0] == 200 and embed(input="red")[0] == 200
