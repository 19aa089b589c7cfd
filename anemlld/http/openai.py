"""The OpenAI dialect: `/v1/models`, `/v1/chat/completions`, `/v1/completions`,
as field mapping onto ``service.generate`` and event rewriting into OpenAI's
objects and Server-Sent Events (docs/http.md has every field)."""
from __future__ import annotations

import json
import secrets
import time
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from anemlld.http import bridge
from anemlld.http.bridge import ApiError, take
from anemlld.http.guard import error_body

SAMPLING = ("temperature", "top_p", "top_k", "seed", "presence_penalty", "frequency_penalty", "repetition_penalty")
COMMON = ("model", "max_tokens", "max_completion_tokens", "stream", "stream_options", "stop", "n", "user",
          "logprobs") + SAMPLING
CHAT_FIELDS = COMMON + ("messages", "tools", "tool_choice", "parallel_tool_calls", "response_format")
COMPLETION_FIELDS = COMMON + ("prompt", "echo", "best_of")
UNSUPPORTED = {
    "functions": "the deprecated functions field is not implemented; send tools instead",
    "function_call": "the deprecated function_call field is not implemented; send tool_choice instead",
    "parallel_tool_calls": "a reply forced to call a tool calls exactly one; false is not implemented",
    "logit_bias": "logit biases are not implemented",
    "logprobs": "log probabilities are not implemented",
    "top_logprobs": "log probabilities are not implemented",
    "n": "one choice per request only (n = 1)",
    "best_of": "one choice per request only (best_of = 1)",
    "echo": "echoing the prompt is not implemented",
    "suffix": "fill-in-the-middle (suffix) is not implemented",
    "audio": "audio output is not implemented", "modalities": "only text output is implemented",
    "prediction": "predicted outputs are not implemented",
    "reasoning_effort": "reasoning effort is not implemented",
    "service_tier": "service tiers do not exist on a local server",
    "store": "stored completions are not implemented", "metadata": "stored completions are not implemented",
    "web_search_options": "web search is not implemented",
    "min_p": "min_p sampling is not implemented (top_k, top_p, temperature are)",
}
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
FINISH = {"stop": "stop", "length": "length", "tool_calls": "tool_calls"}


def routes(service: Any, max_body: int) -> list[Route]:
    api = OpenAI(service, max_body)
    return [Route("/v1/models", api.list_models, methods=["GET"]),
            Route("/v1/models/{model:path}", api.get_model, methods=["GET"]),
            Route("/v1/chat/completions", api.chat, methods=["POST"]),
            Route("/v1/completions", api.completions, methods=["POST"])]


def error_response(error: ApiError) -> Response:
    return Response(error_body("/v1", error.status, error.message, error.param, error.code), error.status,
                    headers=error.headers, media_type="application/json")


class OpenAI:
    def __init__(self, service: Any, max_body: int):
        self.service, self.max_body = service, max_body

    # -- models ---------------------------------------------------------------------
    async def list_models(self, request: Request) -> Response:
        data = [self._model(m) for m in self.service.models() if m["state"] in ("ready", "loaded")]
        return JSONResponse({"object": "list", "data": data})

    async def get_model(self, request: Request) -> Response:
        try:
            name = bridge.model_name(request.path_params["model"])
            entry = self.service.servable(name)
            if entry.state not in ("ready", "loaded"):
                raise ApiError(404, f"model {name!r} is {entry.state}: it cannot be served", code="model_not_found")
            return JSONResponse(self._model(self.service.record(entry)))
        except Exception as e:
            return error_response(ApiError.of(e))

    def _model(self, record: dict[str, Any]) -> dict[str, Any]:
        details = self.service.details(record["name"])
        return {"id": record["name"], "object": "model", "created": int(details["modified_at"] or 0),
                "owned_by": "anemlld"}

    # -- generation -----------------------------------------------------------------
    async def chat(self, request: Request) -> Response:
        return await self._generate(request, chat=True)

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, chat=False)

    async def _generate(self, request: Request, chat: bool) -> Response:
        try:
            body = await bridge.read_json(request, self.max_body)
            req, stream_opts = self._request(body, chat)
            stream = bridge.start(self.service, req)
            first = await bridge.first_events(request, stream)
            error = bridge.failure(first)
            if error is not None:
                raise error
            reply = _Reply(req.id, req.model, chat, stream_opts["include_usage"])
            if stream_opts["stream"]:
                return StreamingResponse(self._sse(reply, bridge.relay(stream, first)),
                                         media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            text, done = await bridge.collect(request, stream, first)
            return JSONResponse(reply.whole(text, done))
        except bridge.ClientGone:
            return Response(status_code=499)  # nobody reads it
        except Exception as e:
            return error_response(ApiError.of(e))

    def _request(self, body: dict[str, Any], chat: bool):
        bridge.refuse_unknown(body, CHAT_FIELDS if chat else COMPLETION_FIELDS, unsupported=UNSUPPORTED)
        _refuse_unless_default(body)
        name = bridge.model_name(body.get("model"))
        fields: dict[str, Any] = {k: take(body, k, bridge.number_kind(k)) for k in SAMPLING}
        limits = {k: take(body, k, int) for k in ("max_tokens", "max_completion_tokens")}
        if None not in limits.values() and limits["max_tokens"] != limits["max_completion_tokens"]:
            raise ApiError(400, "max_tokens and max_completion_tokens disagree: send one of them",
                           param="max_completion_tokens", code="bad_request")
        shown = {"max_tokens": "max_completion_tokens" if limits["max_completion_tokens"] is not None
                 else "max_tokens", "format": "response_format"}
        fields["max_tokens"] = limits["max_completion_tokens"] if limits["max_completion_tokens"] is not None \
            else limits["max_tokens"]
        stop = body.get("stop")
        if stop is not None:
            fields["stop"] = [stop] if isinstance(stop, str) else stop
        if chat:
            fields["messages"] = _messages(body.get("messages"))
            fields["format"] = _response_format(body.get("response_format"))
            fields["tools"] = body.get("tools") or None
            fields["tool_choice"] = _tool_choice(body.get("tool_choice"))
        else:
            fields["prompt"] = _prompt(body.get("prompt"))
        stream = take(body, "stream", bool) or False
        opts = take(body, "stream_options", dict)
        if opts is not None:
            bridge.refuse_unknown(opts, ("include_usage",), "stream_options.")
            if not stream:
                raise ApiError(400, "stream_options is only allowed with stream: true", param="stream_options",
                               code="bad_request")
        include_usage = bool(take(opts or {}, "include_usage", bool, "stream_options."))
        rid = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        return (bridge.build_generate(rid, shown, model=name, **fields),
                {"stream": stream, "include_usage": include_usage})

    async def _sse(self, reply: "_Reply", batches):
        """Server-Sent Events exactly as OpenAI sends them."""
        started = False
        async for events in batches:
            if not any(kind != "progress" for kind, *_ in events):
                yield f": {bridge.progress_of(events) or 'keep-alive'}\n\n".encode()
                continue
            if not started:
                started = True
                yield _sse(reply.chunk(role=True))
            error = bridge.failure(events)
            text = bridge.text_of(events)
            if text:
                yield _sse(reply.chunk(text=text))
            if error is not None:
                yield _sse({"error": {"message": error.message, "type": "server_error", "param": None,
                                      "code": error.code}})
                return
            done = bridge.done_of(events)
            if done is not None:
                if done.get("tool_calls"):
                    yield _sse(reply.chunk(calls=done["tool_calls"]))
                yield _sse(reply.chunk(finish=FINISH.get(done["done_reason"], "stop")))
                if reply.include_usage:
                    yield _sse(reply.usage_chunk(done))
                yield b"data: [DONE]\n\n"
                return


class _Reply:
    """The objects of one answer: the same id and creation time in every chunk."""

    def __init__(self, rid: str, model: str, chat: bool, include_usage: bool):
        self.id = rid
        self.created = int(time.time())
        self.model, self.chat, self.include_usage = model, chat, include_usage

    def _base(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": "anemlld"}

    def chunk(self, text: str = "", role: bool = False, finish: str | None = None,
              calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
            if text:
                delta["content"] = text
            if calls:
                delta["tool_calls"] = [{"index": i, **call} for i, call in enumerate(tool_calls(calls))]
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            out = {**self._base("chat.completion.chunk"), "choices": [choice]}
        else:
            out = {**self._base("text_completion"),
                   "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}
        if self.include_usage:
            out["usage"] = None
        return out

    def usage_chunk(self, done: dict[str, Any]) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._base(obj), "choices": [], "usage": usage(done)}

    def whole(self, text: str, done: dict[str, Any]) -> dict[str, Any]:
        finish = FINISH.get(done.get("done_reason", "stop"), "stop")
        if self.chat:
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if done.get("tool_calls"):
                message.update(content=text or None, tool_calls=tool_calls(done["tool_calls"]))
            choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
            return {**self._base("chat.completion"), "choices": [choice], "usage": usage(done)}
        return {**self._base("text_completion"),
                "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
                "usage": usage(done)}


def usage(done: dict[str, Any]) -> dict[str, Any]:
    prompt, completion = int(done.get("prompt_tokens", 0)), int(done.get("completion_tokens", 0))
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": int(done.get("cached_tokens", 0))}}


def tool_calls(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The protocol's calls as OpenAI writes them: arguments as a JSON string."""
    return [{"id": c["id"], "type": "function",
             "function": {"name": c["name"], "arguments": json.dumps(c["arguments"], ensure_ascii=False)}}
            for c in calls]


def _sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def _refuse_unless_default(body: dict[str, Any]) -> None:
    """Fields we know, accepted only with the value that asks for nothing we lack."""
    defaults = {"n": 1, "best_of": 1, "logprobs": False, "echo": False}
    for key, default in defaults.items():
        if key in body and body[key] not in (None, default):
            raise ApiError(400, f"{key} = {json.dumps(body[key])} is not supported: {UNSUPPORTED[key]}",
                           param=key, code="unsupported_field")
    if body.get("parallel_tool_calls") not in (None, True):
        raise ApiError(400, f"parallel_tool_calls = false is not supported: {UNSUPPORTED['parallel_tool_calls']}",
                       param="parallel_tool_calls", code="unsupported_field")


def _response_format(value: Any) -> str | dict[str, Any] | None:
    """response_format as the protocol's format: None (text), "json" or the schema."""
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        bridge.refuse_unknown(value, ("type",), "response_format.")
        return None
    if kind == "json_object":
        bridge.refuse_unknown(value, ("type",), "response_format.")
        return "json"
    if kind == "json_schema":
        bridge.refuse_unknown(value, ("type", "json_schema"), "response_format.")
        spec = take(value, "json_schema", dict, "response_format.") or {}
        bridge.refuse_unknown(spec, ("name", "description", "schema", "strict"), "response_format.json_schema.")
        take(spec, "strict", bool, "response_format.json_schema.")  # the schema is always enforced
        schema = take(spec, "schema", dict, "response_format.json_schema.")
        if schema is None:
            raise ApiError(400, "response_format.json_schema.schema is missing: send the JSON schema the answer "
                           "must follow", param="response_format.json_schema.schema", code="bad_request")
        return schema
    raise ApiError(400, f"response_format.type must be text, json_object or json_schema, got "
                   f"{json.dumps(kind)}", param="response_format.type", code="bad_request")


def _tool_choice(value: Any) -> str | dict[str, str] | None:
    """tool_choice as the protocol's: auto, none, required or {"name": ...}."""
    if value is None or isinstance(value, str):
        return value
    fn = value.get("function") if isinstance(value, dict) and value.get("type") == "function" else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise ApiError(400, "tool_choice must be auto, none, required or {\"type\": \"function\", \"function\": "
                       "{\"name\": ...}}", param="tool_choice", code="bad_request")
    return {"name": fn["name"]}


def _messages(value: Any) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise ApiError(400, "messages must be a non-empty list of {role, content} objects", param="messages",
                       code="bad_request")
    out = []
    for i, m in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ApiError(400, f"{where} must be an object with role and content", param=where, code="bad_request")
        bridge.refuse_unknown(m, ("role", "content", "tool_calls", "tool_call_id"), f"{where}.", unsupported={
            "name": "participant names are not passed to chat templates; leave it out",
            "function_call": "the deprecated function_call is not implemented; send tool_calls",
            "refusal": "leave it out", "audio": "audio is not implemented"})
        role = m.get("role")
        if role == "function":
            raise ApiError(400, f"{where}.role 'function' is the deprecated form: send role 'tool'",
                           param=f"{where}.role", code="unsupported_field")
        if role not in ROLES:
            raise ApiError(400, f"{where}.role must be one of {', '.join(ROLES)}, got {json.dumps(role)}",
                           param=f"{where}.role", code="bad_request")
        message: dict[str, Any] = {"role": ROLES[role]}
        calls = m.get("tool_calls")
        if calls and role == "assistant":
            message["tool_calls"] = _earlier_calls(calls, f"{where}.tool_calls")
            message["content"] = "" if m.get("content") is None else _content(m.get("content"), where)
        else:
            message["content"] = _content(m.get("content"), where)
        if m.get("tool_call_id") is not None:
            message["tool_call_id"] = m["tool_call_id"]
        out.append(message)
    return out


def _earlier_calls(value: Any, where: str) -> list[dict[str, Any]]:
    """An assistant's calls from an earlier turn, arguments parsed for the chat template."""
    if not isinstance(value, list):
        raise ApiError(400, f"{where} must be a list of tool calls", param=where, code="bad_request")
    out = []
    for j, call in enumerate(value):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise ApiError(400, f"{where}[{j}] must be {{id, type: function, function: {{name, arguments}}}}",
                           param=f"{where}[{j}]", code="bad_request")
        try:
            args = json.loads(fn.get("arguments") or "{}") if isinstance(fn.get("arguments", ""), str) \
                else fn["arguments"]
        except ValueError:
            args = None
        if not isinstance(args, dict):
            raise ApiError(400, f"{where}[{j}].function.arguments must be a JSON object (as a string)",
                           param=f"{where}[{j}].function.arguments", code="bad_request")
        out.append({"id": str(call.get("id") or f"call_{j}"), "name": fn["name"], "arguments": args})
    return out


def _content(value: Any, where: str) -> str:
    """String content, or the list-of-parts form with text parts only."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        texts = []
        for j, part in enumerate(value):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text" or not isinstance(part.get("text"), str):
                what = f"a {kind!r} part" if kind else "a part that is not {type: text, text}"
                raise ApiError(400, f"{where}.content[{j}] is {what}: this model reads text only",
                               param=f"{where}.content", code="unsupported_field")
            texts.append(part["text"])
        return "\n".join(texts)
    raise ApiError(400, f"{where}.content must be a string or a list of text parts", param=f"{where}.content",
                   code="bad_request")


def _prompt(value: Any) -> str:
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
        return value[0]
    if isinstance(value, str):
        return value
    raise ApiError(400, "prompt must be a string (one prompt per request; token-id prompts are not supported)",
                   param="prompt", code="bad_request")
