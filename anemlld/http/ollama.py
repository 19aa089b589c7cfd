"""The Ollama dialect: `/`, `/api/version`, `/api/tags`, `/api/show`, `/api/ps`,
`/api/chat`, `/api/generate`, as field mapping onto the service and event
rewriting into Ollama's NDJSON objects (docs/http.md has every field).

Ollama names models ``name:tag``; a model here is ``name`` and answers to
``name:latest`` too, which is how it is listed."""
from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
import time
from datetime import datetime, timezone
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from anemlld.http import bridge
from anemlld.http.bridge import ApiError, take
from anemlld.runtime.tools import form_of

# Several Ollama clients refuse a server older than this (VS Code's provider
# asks for at least 0.6.4); it is the oldest version whose API we cover.
OLLAMA_VERSION = "0.6.4"
OPTIONS = {"temperature": "temperature", "top_k": "top_k", "top_p": "top_p", "num_predict": "max_tokens",
           "seed": "seed", "stop": "stop", "repeat_penalty": "repetition_penalty",
           "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty"}
# Options that tune llama.cpp's runner (threads, GPU layers, memory mapping) and
# change nothing in the answer: accepted, no effect on the Neural Engine.
RUNNER_OPTIONS = ("num_thread", "num_gpu", "main_gpu", "num_batch", "use_mmap", "use_mlock", "numa", "low_vram",
                  "vocab_only", "f16_kv")
UNSUPPORTED_OPTIONS = {k: "this sampler is not implemented (temperature, top_k, top_p, repeat_penalty, "
                       "presence_penalty, frequency_penalty are)"
                       for k in ("min_p", "typical_p", "tfs_z", "mirostat", "mirostat_tau", "mirostat_eta",
                                 "repeat_last_n", "penalize_newline", "num_keep", "num_gqa")}
UNSUPPORTED = {"images": "this model reads text only",
               "suffix": "fill-in-the-middle (suffix) is not implemented",
               "template": "the model's own chat template is used; overriding it is not implemented",
               "context": "the deprecated context array is not implemented; send the conversation with /api/chat "
                          "(its shared prefix is cached, so it is not prefilled again)",
               "think": "thinking mode is not implemented", "logprobs": "log probabilities are not implemented",
               "top_logprobs": "log probabilities are not implemented"}
CHAT_FIELDS = ("model", "messages", "stream", "options", "keep_alive", "format", "tools", "think")
GENERATE_FIELDS = ("model", "prompt", "system", "stream", "raw", "options", "keep_alive", "format", "images",
                   "suffix", "template", "context", "think")
ROLES = ("system", "user", "assistant", "tool")


def routes(service: Any, max_body: int) -> list[Route]:
    api = Ollama(service, max_body)
    return [Route("/", api.root, methods=["GET", "HEAD"]),
            Route("/api/version", api.version, methods=["GET"]),
            Route("/api/tags", api.tags, methods=["GET"]),
            Route("/api/ps", api.ps, methods=["GET"]),
            Route("/api/show", api.show, methods=["POST"]),
            Route("/api/chat", api.chat, methods=["POST"]),
            Route("/api/generate", api.generate, methods=["POST"])]


def error_response(error: ApiError) -> Response:
    return JSONResponse({"error": error.message}, error.status, headers=error.headers)


class Ollama:
    def __init__(self, service: Any, max_body: int):
        self.service, self.max_body = service, max_body

    async def root(self, request: Request) -> Response:
        return PlainTextResponse("Ollama is running")  # the text clients probe for

    async def version(self, request: Request) -> Response:
        return JSONResponse({"version": OLLAMA_VERSION})

    # -- models ---------------------------------------------------------------------
    async def tags(self, request: Request) -> Response:
        models = [self._listing(m) for m in self.service.models() if m["state"] in ("ready", "loaded")]
        return JSONResponse({"models": models})

    async def ps(self, request: Request) -> Response:
        out = []
        for loaded in self.service.ps():
            listing = self._listing(self.service.record(self.service.entry(loaded["name"])))
            expires = loaded.get("expires_at")
            out.append({**listing, "size": loaded.get("size_bytes") or listing["size"], "size_vram": 0,
                        "expires_at": _iso(expires if expires is not None else _NEVER),
                        "context_length": loaded.get("context_length")})
        return JSONResponse({"models": out})

    async def show(self, request: Request) -> Response:
        try:
            body = await bridge.read_json(request, self.max_body)
            bridge.refuse_unknown(body, ("model", "name", "verbose"))
            name = bridge.model_name(body.get("model", body.get("name")))
            info = self.service.details(name)
            self.service.servable(name)
            params, arch = info["params"], info["architecture"] or "unknown"
            gen = info["generation_config"]
            parameters = "\n".join(f"{k} {gen[g]}" for k, g in (("temperature", "temperature"), ("top_k", "top_k"),
                                                                 ("top_p", "top_p"), ("num_predict", "max_new_tokens"),
                                                                 ("repeat_penalty", "repetition_penalty"))
                                   if g in gen and (k != "temperature" or gen.get("do_sample")))
            model_info = {"general.architecture": arch, f"{arch}.context_length": params.get("context_length"),
                          "anemll.batch_size": params.get("batch_size"), "anemll.num_chunks": params.get("num_chunks"),
                          "anemll.lut_embeddings": params.get("lut_embeddings"),
                          "anemll.lut_ffn": params.get("lut_ffn"), "anemll.lut_lmhead": params.get("lut_lmhead"),
                          "anemll.split_lm_head": params.get("split_lm_head")}
            return JSONResponse({"license": "", "modelfile": "", "parameters": parameters,
                                 "template": info["chat_template"], "details": self._details(info),
                                 "model_info": model_info,
                                 "capabilities": ["completion"] + (["tools"] if form_of(info["chat_template"]) else []),
                                 "modified_at": _iso(info["modified_at"] or 0)})
        except Exception as e:
            return error_response(ApiError.of(e))

    def _listing(self, record: dict[str, Any]) -> dict[str, Any]:
        info = self.service.details(record["name"])
        name = f"{record['name']}:latest"
        digest = hashlib.sha256(f"{record['name']}\0{record.get('source')}\0{info['modified_at']}".encode())
        return {"name": name, "model": name, "modified_at": _iso(info["modified_at"] or 0),
                "size": record.get("size_bytes") or 0, "digest": digest.hexdigest(), "details": self._details(info)}

    @staticmethod
    def _details(info: dict[str, Any]) -> dict[str, Any]:
        arch, params = info["architecture"] or "unknown", info["params"]
        lut = params.get("lut_ffn")
        return {"parent_model": "", "format": "coreml", "family": arch, "families": [arch], "parameter_size": "",
                "quantization_level": f"LUT{lut}" if lut not in (None, "none") else "F16"}

    # -- generation -----------------------------------------------------------------
    async def chat(self, request: Request) -> Response:
        return await self._generate(request, chat=True)

    async def generate(self, request: Request) -> Response:
        return await self._generate(request, chat=False)

    async def _generate(self, request: Request, chat: bool) -> Response:
        t0 = time.perf_counter()
        try:
            body = await bridge.read_json(request, self.max_body)
            bridge.refuse_unknown(body, CHAT_FIELDS if chat else GENERATE_FIELDS, unsupported=UNSUPPORTED)
            _refuse_set(body)
            shown_name = body.get("model")
            name = bridge.model_name(shown_name)
            keep_alive = bridge.duration(body.get("keep_alive"), "keep_alive")
            stream_on = take(body, "stream", bool)
            stream_on = True if stream_on is None else stream_on
            if body.get("messages" if chat else "prompt") in (None, [], ""):
                return await self._load_or_unload(name, shown_name, keep_alive, chat)
            fields = self._options(body, name)
            fields["format"] = _format(body.get("format"))
            if chat:
                fields["messages"] = _messages(body.get("messages"))
                fields["tools"] = take(body, "tools", list) or None
            else:
                fields.update(_prompt(body))
            req = bridge.build_generate("ollama-" + secrets.token_hex(8), {v: f"options.{k}" for k, v in OPTIONS.items()},
                                        model=name, keep_alive=keep_alive, **fields)
            stream = bridge.start(self.service, req)
            first = await bridge.first_events(request, stream)
            error = bridge.failure(first)
            if error is not None:
                raise error
            reply = _Reply(shown_name, chat, t0)
            if stream_on:
                return StreamingResponse(self._ndjson(reply, bridge.relay(stream, first)),
                                         media_type="application/x-ndjson")
            text, done = await bridge.collect(request, stream, first)
            return JSONResponse(reply.final(done, text))
        except bridge.ClientGone:
            return Response(status_code=499)
        except Exception as e:
            return error_response(ApiError.of(e))

    def _options(self, body: dict[str, Any], name: str) -> dict[str, Any]:
        options = take(body, "options", dict) or {}
        bridge.refuse_unknown(options, tuple(OPTIONS) + RUNNER_OPTIONS + ("num_ctx",), "options.",
                              unsupported=UNSUPPORTED_OPTIONS)
        fields: dict[str, Any] = {}
        for key, ours in OPTIONS.items():
            value = take(options, key, list if key == "stop" else bridge.number_kind(ours), "options.")
            if value is not None:
                fields[ours] = value
        num_ctx = take(options, "num_ctx", int, "options.")
        if num_ctx is not None or fields.get("max_tokens") in (-1, -2):  # only then: it reads meta.yaml
            context = self.service.details(name)["params"].get("context_length")
            if num_ctx is not None and context is not None and num_ctx > int(context):
                raise ApiError(400, f"options.num_ctx {num_ctx} is larger than the context {name} was converted "
                               f"for ({context}): re-convert it with context_length = {num_ctx} in its "
                               f"anemll.toml, or ask for at most {context}", param="options.num_ctx",
                               code="context_overflow")
            if fields.get("max_tokens") in (-1, -2) and context is not None:
                fields["max_tokens"] = int(context)  # -1 "until done", -2 "fill the context": both end there
        return fields

    async def _load_or_unload(self, name: str, shown: str, keep_alive: float | None, chat: bool) -> Response:
        """An empty prompt loads the model; with keep_alive 0 it unloads it."""
        if keep_alive == 0:
            self.service.unload(name)
            reason = "unload"
        else:
            await asyncio.to_thread(self.service.load, name, keep_alive)
            reason = "load"
        out: dict[str, Any] = {"model": shown, "created_at": _iso(time.time())}
        out.update({"message": {"role": "assistant", "content": ""}} if chat else {"response": ""})
        out.update(done=True, done_reason=reason)
        return JSONResponse(out)

    async def _ndjson(self, reply: "_Reply", batches):
        async for events in batches:
            text = bridge.text_of(events)
            if text:
                yield _line(reply.part(text))
            error = bridge.failure(events)
            if error is not None:
                yield _line({"error": error.message})
                return
            done = bridge.done_of(events)
            if done is not None:
                if done.get("tool_calls"):
                    yield _line(reply.part("", done["tool_calls"]))
                yield _line(reply.final({**done, "tool_calls": None}))
                return


class _Reply:
    def __init__(self, model: str, chat: bool, t0: float):
        self.model, self.chat, self.t0 = model, chat, t0

    def _content(self, text: str, calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        if not self.chat:
            return {"response": text}
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if calls:  # Ollama's form: arguments as an object
            message["tool_calls"] = [{"function": {"name": c["name"], "arguments": c["arguments"]}} for c in calls]
        return {"message": message}

    def part(self, text: str, calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        return {"model": self.model, "created_at": _iso(time.time()), **self._content(text, calls), "done": False}

    def final(self, done: dict[str, Any], text: str = "") -> dict[str, Any]:
        ns = 1_000_000
        reason = done.get("done_reason", "stop")
        return {"model": self.model, "created_at": _iso(time.time()), **self._content(text, done.get("tool_calls")),
                "done": True, "done_reason": "stop" if reason == "tool_calls" else reason,  # as Ollama says it
                "total_duration": int((time.perf_counter() - self.t0) * 1e9),
                "load_duration": int(float(done.get("load_ms", 0)) * ns),
                "prompt_eval_count": int(done.get("prompt_tokens", 0)),
                "prompt_eval_duration": int(float(done.get("prefill_ms", 0)) * ns),
                "eval_count": int(done.get("completion_tokens", 0)),
                "eval_duration": int(float(done.get("decode_ms", 0)) * ns)}


_NEVER = datetime(2318, 1, 1, tzinfo=timezone.utc).timestamp()  # what Ollama shows for keep_alive -1


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat().replace("+00:00", "Z")


def _line(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


def _refuse_set(body: dict[str, Any]) -> None:
    """Known fields accepted only when they ask for nothing: false, empty or absent."""
    for key in ("images", "suffix", "template", "context", "think"):
        if body.get(key) not in (None, False, "", []):
            raise ApiError(400, f"{key} is not supported: {UNSUPPORTED[key]}", param=key, code="unsupported_field")


def _messages(value: Any) -> list[dict[str, str]]:
    if not isinstance(value, list):
        raise ApiError(400, "messages must be a list of {role, content} objects", param="messages")
    out = []
    for i, m in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ApiError(400, f"{where} must be an object with role and content", param=where)
        bridge.refuse_unknown(m, ("role", "content", "images", "tool_calls", "thinking"), f"{where}.")
        for key in ("images", "thinking"):
            if m.get(key) not in (None, [], ""):
                why = {"images": "this model reads text only", "thinking": "thinking mode is not implemented"}[key]
                raise ApiError(400, f"{where}.{key} is not supported: {why}", param=f"{where}.{key}")
        role, content = m.get("role"), m.get("content", "")
        if role not in ROLES:
            raise ApiError(400, f"{where}.role must be one of {', '.join(ROLES)}, got {json.dumps(role)}",
                           param=f"{where}.role")
        if not isinstance(content, str):
            raise ApiError(400, f"{where}.content must be a string", param=f"{where}.content")
        message: dict[str, Any] = {"role": role, "content": content}
        if m.get("tool_calls") and role == "assistant":
            message["tool_calls"] = _earlier_calls(m["tool_calls"], f"{where}.tool_calls")
        out.append(message)
    return out


def _earlier_calls(value: Any, where: str) -> list[dict[str, Any]]:
    """An assistant's calls from an earlier turn: ``{"function": {"name", "arguments": {...}}}``."""
    if not isinstance(value, list):
        raise ApiError(400, f"{where} must be a list of tool calls", param=where)
    out = []
    for j, call in enumerate(value):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or \
                not isinstance(fn.get("arguments", {}), dict):
            raise ApiError(400, f"{where}[{j}] must be {{function: {{name, arguments (an object)}}}}",
                           param=f"{where}[{j}]")
        out.append({"id": f"call_{j}", "name": fn["name"], "arguments": fn.get("arguments", {})})
    return out


def _format(value: Any) -> str | dict[str, Any] | None:
    """Ollama's format: "json", a JSON schema, or absent/empty for text."""
    if value in (None, ""):
        return None
    if value == "json" or isinstance(value, dict):
        return value
    raise ApiError(400, f"format must be \"json\" or a JSON schema (an object), got {json.dumps(value)[:60]}",
                   param="format")


def _prompt(body: dict[str, Any]) -> dict[str, Any]:
    """/api/generate: the prompt through the chat template (with ``system``),
    or as it is with ``raw: true``."""
    prompt = take(body, "prompt", str)
    system = take(body, "system", str)
    if take(body, "raw", bool):
        if system:
            raise ApiError(400, "system cannot be used with raw: true (a raw prompt is sent as it is)",
                           param="system")
        return {"prompt": prompt}
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return {"messages": messages}

