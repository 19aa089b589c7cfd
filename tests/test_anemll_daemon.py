"""A real daemon serving every layout ANEMLL 0.3.5 makes, dropped as folders:
ours with the argmax head, ANEMLL's argmax-only head with update_mask
prefill, ANEMLL's monolithic folder, and a Hugging Face folder converted by
the daemon from a sidecar asking for a monolithic model with LUT groups and
an argmax function, served by its worker. Each
chat answers with the tokens the engine gives in-process; a sampled request
to the argmax-only model is refused with the fix, and the daemon goes on."""
from __future__ import annotations

import shutil

import pytest

from anemlld.runtime.engine import Engine
from anemlld.runtime.sampling import SamplingParams
from shared import protocol
from tests.anemll_folders import anemll_monolithic_folder
from tests.daemon_harness import Client, DaemonProcess, wait_for_state

CHAT = ({"role": "user", "content": "What does the tar command do?"},)
SIDECAR = """\
[convert]
context_length = 64
batch_size = 16
monolithic = true
argmax_in_model = true
lut_embeddings = "none"
lut_ffn = "4,8"
lut_lm_head = "6,0"
"""


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    d = DaemonProcess(tmp_path_factory.mktemp("home")).start()
    yield d
    assert d.stop() == 0, d.stderr()[-3000:]


def test_the_daemon_serves_each_anemll_layout_with_the_engines_tokens(daemon, tiny_models, tiny_argmax,
                                                                      tiny_anemll_argmax, tiny_monolithic, tmp_path):
    src = tiny_models["llama"]
    drop = daemon.settings.drop_dir
    folders = {"ours-argmax": tiny_argmax, "anemll-argmax": tiny_anemll_argmax,
               "anemll-mono": anemll_monolithic_folder(tiny_monolithic, tmp_path / "m")}
    for name, folder in folders.items():
        shutil.copytree(folder, drop / name)
    (drop / "tiny-mono-lut.anemll.toml").write_text(SIDECAR)
    shutil.copytree(src, drop / "tiny-mono-lut")
    with Client(daemon.settings, timeout=120) as c:
        for name in [*folders, "tiny-mono-lut"]:
            wait_for_state(c, name, ("ready", "loaded"))
            served = daemon.settings.models_dir / name if name == "tiny-mono-lut" else drop / name
            want = Engine(served, executor="portable").complete(messages=list(CHAT),
                                                                params=SamplingParams(max_tokens=12))
            events = c.stream(protocol.Generate, model=name, messages=CHAT, max_tokens=12, temperature=0.0)
            done = events[-1]
            assert done.event == "done", (name, done.data)
            got = [t for e in events if e.event == "token" for t in e.data["token_ids"]]
            assert got == want.token_ids and len(got) > 0, name
            assert done.data["predictions_per_token"] == (4.0 if name.endswith("argmax") else 1.0), name
        refused = c.request(protocol.Generate, model="anemll-argmax", messages=CHAT, max_tokens=4,
                            temperature=0.8)
        assert refused.event == "error" and "--argmax" in refused.data["message"], refused.data
        assert "re-convert the model without --argmax" in refused.data.get("hint", "")
        assert c.request(protocol.Hello).event == "hello"  # still serving
