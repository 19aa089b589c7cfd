"""``anemlld verify``: KL divergence from the reference beside perplexity and
top-1 agreement, on tiny conversions with and without LUT."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from anemlld.convert import pipeline
from anemlld.runtime.verify import kl_divergence, verify
from shared.options import ConvertOptions

TEXT = ("The shell reads a line of input, splits it into words, and looks up the first word as a command. "
        "Files are organized in a single tree rooted at the slash directory.")


def convert(src: Path, out: Path, ffn) -> Path:
    pipeline.convert(src, out, ConvertOptions.from_mapping(
        {"context_length": 64, "batch_size": 16, "chunks": 2, "lut_embeddings": "none", "lut_ffn": ffn,
         "lut_lm_head": "none"}))
    return out


@pytest.fixture(scope="module")
def folders(tiny_models, tiny_argmax, tmp_path_factory) -> dict[str, Path]:
    """No LUT (the session's argmax-head conversion: verify reads its logits) and LUT 4 FFN."""
    return {"none": tiny_argmax, "4": convert(tiny_models["llama"], tmp_path_factory.mktemp("verify") / "lut4", 4)}


def test_kl_divergence_is_torchs_kl_div_of_the_two_softmaxes():
    rng = np.random.default_rng(0)
    ref, ours = rng.normal(size=(5, 50)) * 3, rng.normal(size=(5, 50)) * 3
    want = torch.nn.functional.kl_div(torch.log_softmax(torch.tensor(ours), -1), torch.log_softmax(
        torch.tensor(ref), -1), reduction="none", log_target=True).sum(-1).numpy()
    np.testing.assert_allclose(kl_divergence(ref, ours), want, rtol=1e-9, atol=1e-12)
    assert np.allclose(kl_divergence(ref, ref), 0)


def test_verify_reports_kl_small_without_lut_and_larger_with_lut_4(folders, tiny_models):
    plain = verify(folders["none"], reference=tiny_models["llama"], text=TEXT, executor="portable")
    lut4 = verify(folders["4"], reference=tiny_models["llama"], text=TEXT, executor="portable")
    assert 0 <= plain.kl_divergence < 1e-3 and plain.greedy_agreement > 0.9  # fp16 rounding only
    assert lut4.kl_divergence > 10 * plain.kl_divergence
    assert plain.as_dict()["kl_divergence"] == round(plain.kl_divergence, 7) > 0


def test_verify_json_carries_kl_divergence(folders, tiny_models, tmp_path, capsys):
    from anemlld.cli import main

    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    assert main(["verify", str(folders["none"]), "--reference", str(tiny_models["llama"]), "--text", str(text),
                 "--executor", "portable", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert 0 <= report["kl_divergence"] < 1e-3 and report["greedy_agreement"] > 0.9


def test_verify_refuses_an_argmax_only_head_naming_what_to_verify_instead(tiny_anemll_argmax, tiny_models):
    from shared.errors import BadInput

    with pytest.raises(BadInput, match="returns only its argmax") as info:
        verify(tiny_anemll_argmax, reference=tiny_models["llama"], text=TEXT, executor="portable")
    assert "without --argmax" in info.value.hint
