"""Chat templates with tool support for the tiny test models, written in the
two tool-call syntaxes anemlld reads (anemlld.runtime.tools): Hermes-style
``<tool_call>`` as Qwen's templates write it, and Llama 3.1's JSON form. Both
keep the demo tokenizer's Llama 3 turn markers, so ``<|eot_id|>`` still ends
a turn."""
from __future__ import annotations

from pathlib import Path

HERMES = """{{- bos_token }}
{%- if tools %}<|start_header_id|>system<|end_header_id|>

{% if messages[0].role == 'system' %}{{ messages[0].content | trim }}

{% endif %}# Tools

You may call one or more functions. Their signatures are within <tools></tools>:
<tools>
{% for tool in tools %}{{ tool | tojson }}
{% endfor %}</tools>

For each call, return a JSON object with the function name and arguments within <tool_call></tool_call> tags:
<tool_call>
{"name": <function-name>, "arguments": <args-json-object>}
</tool_call><|eot_id|>
{%- endif %}
{%- for message in messages %}
{%- if message.role == 'system' and tools %}
{%- elif message.role == 'assistant' and message.tool_calls %}<|start_header_id|>assistant<|end_header_id|>

{{ message.content }}{% for call in message.tool_calls %}<tool_call>
{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}
</tool_call>{% endfor %}<|eot_id|>
{%- elif message.role == 'tool' %}<|start_header_id|>user<|end_header_id|>

<tool_response>
{{ message.content }}
</tool_response><|eot_id|>
{%- else %}<|start_header_id|>{{ message.role }}<|end_header_id|>

{{ message.content | trim }}<|eot_id|>
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>

{% endif %}"""

LLAMA3 = """{{- bos_token }}
{%- for message in messages %}
{%- if message.role == 'assistant' and message.tool_calls %}<|start_header_id|>assistant<|end_header_id|>

{% set call = message.tool_calls[0].function %}{{ '{"name": "' + call.name + '", "parameters": ' + call.arguments | tojson + '}' }}<|eot_id|>
{%- elif message.role == 'tool' %}<|start_header_id|>ipython<|end_header_id|>

{{ message.content }}<|eot_id|>
{%- else %}<|start_header_id|>{{ message.role }}<|end_header_id|>

{% if tools and loop.last and message.role == 'user' %}Given the following functions, respond with a JSON for a function call with its proper arguments that best answers the given prompt.

Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}. Do not use variables.

{% for tool in tools %}{{ tool | tojson }}

{% endfor %}{% endif %}{{ message.content | trim }}<|eot_id|>
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>

{% endif %}"""


def use_template(folder: Path, template: str) -> Path:
    """Give a Hugging Face folder ``template`` as its chat template."""
    (folder / "chat_template.jinja").write_text(template)
    return folder
