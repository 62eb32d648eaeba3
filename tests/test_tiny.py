import hashlib
import json

import pytest

from af3trt.spec import ModelSpec
from af3trt.tiny import make_tiny_checkpoint


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_deterministic(tiny_dir, tmp_path):
    again = make_tiny_checkpoint(tmp_path / "again", seed=0)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert digest(tiny_dir / name) == digest(again / name), name
    other = make_tiny_checkpoint(tmp_path / "other", seed=1)
    assert digest(other / "model.safetensors") != digest(tiny_dir / "model.safetensors")
    with pytest.raises(FileExistsError, match="expected seed 1"):
        make_tiny_checkpoint(tiny_dir, seed=1)


def test_layout_and_dims(tiny_dir):
    config = json.loads((tiny_dir / "config.json").read_text())
    spec = ModelSpec.from_config(config)
    assert spec.text.hidden_size % 128 == 0 and spec.text.intermediate_size % 128 == 0
    assert spec.audio.num_mel_bins == 128 and spec.audio.max_source_positions == 1500
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json", "chat_template.jinja", "preprocessor_config.json"):
        assert (tiny_dir / name).is_file(), name


def test_transformers_loads_it(tiny_dir, hf):
    model, processor = hf
    from transformers import AudioFlamingo3ForConditionalGeneration

    _, info = AudioFlamingo3ForConditionalGeneration.from_pretrained(tiny_dir, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    tok = processor.tokenizer
    assert tok.convert_ids_to_tokens(model.config.audio_token_id) == "<sound>"
    for special in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<sound>"):
        assert len(tok(special, add_special_tokens=False)["input_ids"]) == 1
    assert processor.feature_extractor.feature_size == 128
    assert tok.decode(tok("Hello world, 123!")["input_ids"]) == "Hello world, 123!"


def test_spec_errors():
    with pytest.raises(ValueError, match="model_type 'audioflamingo3'"):
        ModelSpec.from_config({"model_type": "qwen2"})
    with pytest.raises(ValueError, match="audio_config"):
        ModelSpec.from_config({"model_type": "audioflamingo3", "text_config": {}})
