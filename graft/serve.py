"""`graft serve RUN`: talk to a trained run over OpenAI's chat-completions API (docs/serve.md).

Standard library HTTP only (`ThreadingHTTPServer`): one thread per connection parses and checks
its request, then generation runs one request at a time behind a lock (the others wait, none is
dropped). Every refused request gets a 4xx JSON error naming the problem, and the server goes on:
bodies are bounded before they are read, images are decoded only through graft's guards
(data/images.py, with the run's data.max_image_pixels / .max_image_bytes / .image_formats), only
`data:` URLs are accepted (nothing is fetched), and nothing is written to disk. A run that generates
text (a VLM) answers chat completions; a dual encoder answers embeddings and zero-shot rankings
(computed in graft/serve_embed.py).

    graft serve runs/demo --port 8000     # then open http://127.0.0.1:8000/
"""

from __future__ import annotations

import base64
import json
import random
import secrets
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from io import BytesIO
from pathlib import Path

import torch

from graft.data.samples import BadSample
from graft.data.world_source import make_world
from graft.designs import EMBEDS, GENERATES, design
from graft.serve_embed import Embedder, default_templates
from graft.serve_request import (
    MAX_INPUTS,
    MAX_TEMPLATES,
    BadRequest,
    Completion,
    check_inputs,
    check_number,
    check_stream,
    check_texts,
    check_url,
    conversation,
    decode_image,
)

MAX_BODY = 20 << 20  # bytes of a request body, judged from Content-Length before reading it
READ_S = 60  # seconds to receive a whole body; also each socket read or write (a stalled client)
FIELDS = ("model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "stream")
EMBED_FIELDS = ("model", "input", "encoding_format")
ZERO_SHOT_FIELDS = ("model", "image_url", "labels", "templates")
PAGE = Path(__file__).with_name("serve_page.html")


class Served:
    """A loaded run (graft.api.Run) behind a lock: checks requests against it and generates."""

    def __init__(self, run):
        self.run, self.name, self.lock = run, run.dir.path.name, threading.Lock()
        self.capabilities = sorted(design(run.cfg.model).capabilities)  # e.g. ["generates"] or ["embeds"]
        self.embedder = Embedder(run, self.lock) if EMBEDS in self.capabilities else None

    def check(self, body: dict, fields: tuple[str, ...], needs: str) -> None:
        """Refuse unknown fields, a run without the capability `needs`, another model's name."""
        unknown = sorted(set(body) - set(fields))
        if unknown:
            raise BadRequest(f"unknown field {unknown[0]!r} (supported: {', '.join(fields)})")
        if needs not in self.capabilities:
            does = {GENERATES: "generate text: no chat completions (it serves /v1/embeddings and /v1/graft/zero_shot)",
                    EMBEDS: "embed images and texts: no embeddings or zero-shot (it serves /v1/chat/completions)"}
            raise BadRequest(f"{self.name} is a {self.run.cfg.model} model, which does not {does[needs]}")
        if body.get("model") != self.name:
            raise BadRequest(f"model {body.get('model')!r} is not served here; this server serves {self.name!r}", 404)

    def parse(self, body: dict) -> Completion:
        """The chat-completion request `body` checked and encoded; raises BadRequest."""
        self.check(body, FIELDS, GENERATES)
        turns, question, urls = conversation(body.get("messages"))
        most = self.run.cfg.data.max_images
        if len(urls) > most:
            raise BadRequest(f"{len(urls)} images in the request; this model takes at most {most} (data.max_images)")
        proc, context = self.run.processor, self.run.cfg.lm.max_seq_len
        images = [decode_image(u, self.run.cfg.data) for u, _ in urls]
        try:
            ids = proc.prompt(question, len(images), (turns, []), [at for _, at in urls])
        except BadSample as e:  # a chat template that rewrites a prompt holding a control-token string
            raise BadRequest(f"the prompt cannot be encoded ({e})") from None
        if len(ids) >= context:
            raise BadRequest(f"the prompt is {len(ids)} tokens; the model's context (lm.max_seq_len) is {context}")
        room = context - len(ids)
        if body.get("max_tokens") is not None and body.get("max_completion_tokens") is not None:
            raise BadRequest("give max_tokens or max_completion_tokens, not both")
        key = "max_tokens" if body.get("max_tokens") is not None else "max_completion_tokens"
        pixels = [proc.pixels(img) for img in images]
        return Completion(
            ids, torch.stack(pixels) if pixels else torch.zeros(0, 3, proc.image_size, proc.image_size),
            check_number(body, key, int, 1, room, room), check_number(body, "temperature", float, 0, 2, 0.0),
            check_number(body, "top_p", float, 1e-6, 1, 1.0),
            check_number(body, "seed", int, 0, 2**63 - 1, secrets.randbits(63)), check_stream(body.get("stream")))

    def complete(self, req: Completion, on_text=None) -> tuple[str, int]:
        """(answer, new tokens) of a checked request, one request at a time; `on_text(delta)` sees
        the answer as it grows (whole characters only)."""
        model, tok = self.run.model, self.run.processor.tok
        device = next(model.parameters()).device
        new: list[int] = []
        sent = ""

        def on_token(ids: torch.Tensor) -> None:  # (1,)
            nonlocal sent
            if int(ids[0]) != tok.eos:
                new.append(int(ids[0]))
                text = tok.decode(new)
                if text.startswith(sent) and not text.endswith("\ufffd") and len(text) > len(sent):
                    on_text(text[len(sent):])
                    sent = text

        with self.lock:
            ids = model.generate(torch.tensor([req.ids], device=device), req.pixels.to(device), req.max_tokens,
                                 tok.eos, req.temperature, req.top_p,
                                 torch.Generator(device=device).manual_seed(req.seed), on_token if on_text else None)[0]
        text = tok.decode(ids)
        if on_text and text.startswith(sent) and len(text) > len(sent):
            on_text(text[len(sent):])
        return text, len(ids)

    def embeddings(self, body: dict) -> dict:
        """The /v1/embeddings response to `body`: each input's embedding, in order."""
        self.check(body, EMBED_FIELDS, EMBEDS)
        fmt = body.get("encoding_format", "float")
        if fmt not in ("float", "base64"):
            raise BadRequest(f"encoding_format must be 'float' or 'base64', got {fmt!r}")
        inputs = [v if kind == "text" else decode_image(v, self.run.cfg.data)
                  for kind, v in check_inputs(body.get("input"))]
        tokens = self.embedder.text_tokens([x for x in inputs if isinstance(x, str)])
        return {"object": "list", "data": self.embedder.embeddings(inputs, fmt == "base64"), "model": self.name,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    def zero_shot(self, body: dict) -> dict:
        """The /v1/graft/zero_shot response to `body`: its labels ranked for its image."""
        self.check(body, ZERO_SHOT_FIELDS, EMBEDS)
        url = check_url(body.get("image_url"), "image_url")
        labels = check_texts(body.get("labels"), "labels", MAX_INPUTS)
        if len(set(labels)) < len(labels):
            raise BadRequest("labels must be distinct")
        templates = default_templates(self.run.cfg) if body.get("templates") is None else check_texts(
            body["templates"], "templates", MAX_TEMPLATES)
        if not all("{}" in t for t in templates):
            raise BadRequest(f"each template must hold '{{}}' for the label, got {templates}")
        ranking = self.embedder.zero_shot(decode_image(url, self.run.cfg.data), labels, templates)
        return {"object": "graft.zero_shot", "model": self.name, "templates": templates, "labels": ranking}

    def random_scene(self) -> dict:
        """A random scene of the run's built-in world as a PNG data URL, and a question about it."""
        sample = make_world(self.run.cfg).sample("test", random.randrange(1_000_000))
        png = BytesIO()
        sample.image.save(png, format="PNG")
        return {"url": "data:image/png;base64," + base64.b64encode(png.getvalue()).decode(),
                "question": random.choice(sample.qa).question if sample.qa else ""}


def _chunk(head: dict, delta: dict, finish: str | None = None) -> bytes:
    event = {**head, "object": "chat.completion.chunk",
             "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return f"data: {json.dumps(event)}\n\n".encode()


class Handler(BaseHTTPRequestHandler):
    """The routes: GET / (the page), /v1/models, /v1/graft/random_scene; POST /v1/chat/completions,
    /v1/embeddings, /v1/graft/zero_shot."""

    served: Served  # set by make_server
    server_version = "graft"
    timeout = READ_S  # each socket read and write: a stalled client is dropped

    def do_GET(self) -> None:
        routes = {"/": lambda: self._send(200, PAGE.read_bytes(), "text/html; charset=utf-8"),
                  "/v1/models": lambda: self._json(200, {"object": "list", "data": [
                      {"id": self.served.name, "object": "model", "owned_by": "graft",
                       "capabilities": self.served.capabilities}]}),
                  "/v1/graft/random_scene": lambda: self._json(200, self.served.random_scene())}
        self._guarded(routes.get(self.path.split("?")[0]))

    def do_POST(self) -> None:
        routes = {"/v1/chat/completions": self._chat,
                  "/v1/embeddings": lambda: self._json(200, self.served.embeddings(self._body())),
                  "/v1/graft/zero_shot": lambda: self._json(200, self.served.zero_shot(self._body()))}
        self._guarded(routes.get(self.path))

    def _guarded(self, route) -> None:
        """Run `route`; whatever goes wrong becomes a JSON error and the server goes on."""
        try:
            if route is None:
                raise BadRequest(f"no such endpoint: {self.command} {self.path}", 404)
            route()
        except BadRequest as e:
            self._error(e.status, str(e))
        except OSError:  # the client went away (or stalled past READ_S): nothing to answer
            self.close_connection = True
        except Exception as e:  # a bug, not the request's fault: say so, keep serving
            self.log_error("%s: %s", type(e).__name__, e)
            self._error(500, f"internal error: {type(e).__name__}", "server_error")

    def _body(self) -> dict:
        """The JSON object of the body: Content-Length checked against MAX_BODY before reading, the
        whole body within READ_S seconds."""
        if "Transfer-Encoding" in self.headers or "Content-Length" not in self.headers:
            raise BadRequest("send the body with a Content-Length (chunked bodies are not accepted)", 411)
        try:
            length = int(self.headers["Content-Length"])
        except ValueError:
            raise BadRequest(f"Content-Length {self.headers['Content-Length']!r} is not a number") from None
        if not 0 <= length <= MAX_BODY:
            raise BadRequest(f"the body is {length} bytes; the limit is {MAX_BODY}", 413 if length > 0 else 400)
        data, deadline = bytearray(), time.monotonic() + READ_S
        while len(data) < length:
            chunk = self.rfile.read1(min(length - len(data), 1 << 20))
            if not chunk or time.monotonic() > deadline:
                self.close_connection = True
                raise BadRequest(f"the body ended or stalled after {len(data)} of {length} bytes", 408)
            data += chunk
        try:
            body = json.loads(data)
        except (ValueError, RecursionError) as e:  # RecursionError: nested thousands deep
            raise BadRequest(f"malformed JSON: {str(e)[:100]}") from None
        if not isinstance(body, dict):
            raise BadRequest("the body must be a JSON object")
        return body

    def _chat(self) -> None:
        req = self.served.parse(self._body())
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": self.served.name}
        if not req.stream:
            text, n = self.served.complete(req)
            self._json(200, {**head, "object": "chat.completion", "choices": [{
                "index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": _finish(req, n)}],
                "usage": {"prompt_tokens": len(req.ids), "completion_tokens": n, "total_tokens": len(req.ids) + n}})
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        self.close_connection = True  # the stream ends when the connection does
        self.wfile.write(_chunk(head, {"role": "assistant", "content": ""}))
        text, n = self.served.complete(req, lambda delta: self.wfile.write(_chunk(head, {"content": delta})))
        self.wfile.write(_chunk(head, {}, _finish(req, n)) + b"data: [DONE]\n\n")

    def _json(self, status: int, value: dict) -> None:
        self._send(status, json.dumps(value).encode(), "application/json")

    def _error(self, status: int, message: str, kind: str = "invalid_request_error") -> None:
        if getattr(self, "_sent", False):  # mid-stream: the status line is gone, only closing is left
            self.close_connection = True
            return
        self._json(status, {"error": {"message": message, "type": kind}})

    def _send(self, status: int, data: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def end_headers(self) -> None:
        self._sent = True
        super().end_headers()


def _finish(req: Completion, n: int) -> str:
    """OpenAI's finish_reason: "length" when max_tokens ran out before the end-of-sequence token."""
    return "length" if n == req.max_tokens else "stop"


class Server(ThreadingHTTPServer):
    """One thread per connection; a listen backlog for many clients at once (socketserver's default
    of 5 let the kernel reset connections beyond it while the machine was busy: 64 clients at once
    must all be queued and answered)."""

    request_queue_size = 256
    daemon_threads = True


def make_server(run, host: str = "127.0.0.1", port: int = 8000) -> ThreadingHTTPServer:
    """A server for `run` (graft.api.Run), bound but not yet serving (port 0: a free port)."""
    return Server((host, port), type("RunHandler", (Handler,), {"served": Served(run)}))


def serve(run, host: str, port: int) -> None:
    """Serve `run` until Ctrl-C."""
    with make_server(run, host, port) as server:
        print(f"graft serve: {server.RequestHandlerClass.served.name} at http://{host}:{server.server_address[1]}/ (Ctrl-C stops)", flush=True)
        server.serve_forever()
