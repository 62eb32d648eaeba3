"""AF3-Think (af3trt.think): the think/ variant against transformers + PEFT, loaded as users load it
(`load_state_dict(non_lora, strict=False)`, then `PeftModel.from_pretrained(model, CKPT,
subfolder="think")`), greedy, fp32, CPU, on the tiny checkpoint; safety of non_lora_trainables.bin;
what the merge refuses; engine dirs, CLI and Triton metadata of the think variant."""

import hashlib
import json
import os
import pickle
import shutil

import pytest
import torch

from af3trt.formats.manifest import Manifest, ManifestError
from af3trt.tiny import make_tiny_checkpoint
from af3trt.audio import synthetic_audio
from af3trt.think import (
    THINK_FILES, THINK_SUFFIX, ThinkError, files_digest, load_non_lora, open_checkpoint, variant_record,
)

from .test_parity import hf_generate
from .test_prompt import audio_turn

MAX_NEW = 12
LENGTHS = (1.3, 12.0, 47.5)  # seconds; 47.5 s spans two encoder windows


def suffixed(convs):
    """What the harnesses send: the last user turn's text + " " + the think instruction."""
    out = []
    for conv in convs:
        conv = [dict(m) for m in conv]
        last = max(i for i, m in enumerate(conv) if m["role"] == "user")
        content = conv[last]["content"]
        if isinstance(content, str):
            conv[last]["content"] = content + " " + THINK_SUFFIX
        else:
            items = [dict(it) for it in content]
            text = [it for it in items if it.get("type") == "text"][-1]
            text["text"] = text["text"] + " " + THINK_SUFFIX
            conv[last]["content"] = items
        out.append(conv)
    return out


def reference(tiny_dir, non_lora=True, lora=True):
    """transformers' AF3 with the think files applied as the issue's harness code does."""
    pytest.importorskip("transformers.models.audioflamingo3", reason="reference needs transformers >= 5")
    pytest.importorskip("peft", reason="the AF3-Think reference is transformers + PEFT (pip install -e .[dev])")
    from peft import PeftModel
    from transformers import AudioFlamingo3ForConditionalGeneration

    model = AudioFlamingo3ForConditionalGeneration.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    if non_lora:
        result = model.load_state_dict(torch.load(tiny_dir / "think" / "non_lora_trainables.bin", weights_only=True),
                                       strict=False)
        assert not result.unexpected_keys, result
    if lora:
        model = PeftModel.from_pretrained(model, str(tiny_dir), subfolder="think").eval()
    return model


@pytest.fixture(scope="module")
def hf_think(tiny_dir, hf):
    return reference(tiny_dir), hf[1]


@pytest.fixture(scope="module")
def think_pipe(tiny_dir):
    from af3trt.runtime import Pipeline

    return Pipeline.from_pretrained(tiny_dir, device="cpu", dtype="float32", variant="think")


@pytest.fixture(scope="module")
def think_engine_dir(tiny_dir, tmp_path_factory):
    """`af3trt build --variant think` on the tiny checkpoint (bf16 TensorRT-LLM checkpoint, ONNX encoder)."""
    from af3trt.cli import main

    out = tmp_path_factory.mktemp("think-engine") / "tiny-think"
    assert main(["build", "--model", str(tiny_dir), "--out", str(out), "--variant", "think", "--precision", "bf16",
                 "--max-batch-size", "2", "--max-audio-seconds", "60", "--max-text-tokens", "256",
                 "--max-new-tokens", "64"]) == 0
    return out


def think_copy(tiny_dir, root):
    """A checkpoint dir with the tiny base files (links) and its own copy of think/ to edit."""
    root.mkdir()
    for path in tiny_dir.iterdir():
        if path.is_file():
            (root / path.name).symlink_to(path)
    shutil.copytree(tiny_dir / "think", root / "think")
    return root


# ------------------------------------------------------------------------------- the tiny think/


def test_tiny_think_is_what_peft_writes_and_loads(tiny_dir, hf, tmp_path):
    pytest.importorskip("peft", reason="PEFT is the reference for the adapter layout (pip install -e .[dev])")
    from peft import LoraConfig, PeftModel, get_peft_model
    from peft.utils import get_peft_model_state_dict
    from safetensors import safe_open
    from transformers import AudioFlamingo3ForConditionalGeneration

    think = tiny_dir / "think"
    config = LoraConfig.from_pretrained(str(think))
    fresh = AudioFlamingo3ForConditionalGeneration.from_pretrained(tiny_dir, dtype=torch.float32)
    written = get_peft_model(fresh, config)
    written.save_pretrained(tmp_path / "peft")
    ours = json.loads((think / "adapter_config.json").read_text())
    theirs = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    theirs["base_model_name_or_path"] = ours["base_model_name_or_path"]  # PEFT writes the base model's path
    assert ours == theirs
    with safe_open(str(think / "adapter_model.safetensors"), "pt") as f:
        ours_shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        assert f.metadata() == {"format": "pt"}
    theirs_shapes = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(written).items()}
    assert ours_shapes == theirs_shapes and len(ours_shapes) == 2 * 7 * 2  # q k v o gate up down, 2 layers
    loaded = PeftModel.from_pretrained(
        AudioFlamingo3ForConditionalGeneration.from_pretrained(tiny_dir, dtype=torch.float32), str(tiny_dir),
        subfolder="think")
    with safe_open(str(think / "adapter_model.safetensors"), "pt") as f:
        for key, value in get_peft_model_state_dict(loaded).items():
            assert torch.equal(value, f.get_tensor(key)), key  # every tensor loaded, none left at PEFT's init


def test_tiny_think_is_deterministic_small_and_in_the_cache_key(tiny_dir, tmp_path):
    from af3trt.tiny import default_tiny_dir, tiny_think_key

    def digests(root):
        return {n: hashlib.sha256((root / "think" / n).read_bytes()).hexdigest() for n in THINK_FILES}

    again = make_tiny_checkpoint(tmp_path / "again", seed=0)
    assert digests(again) == digests(tiny_dir)
    other = make_tiny_checkpoint(tmp_path / "other", seed=1)
    assert digests(other)["adapter_model.safetensors"] != digests(tiny_dir)["adapter_model.safetensors"]
    assert digests(other)["non_lora_trainables.bin"] != digests(tiny_dir)["non_lora_trainables.bin"]
    mask = os.umask(0)
    os.umask(mask)
    assert {n: (again / "think" / n).stat().st_mode & 0o777 for n in THINK_FILES} == dict.fromkeys(
        THINK_FILES, 0o666 & ~mask)  # the files honour the umask
    size = sum((tiny_dir / "think" / n).stat().st_size for n in THINK_FILES)
    print(f"think/ holds {size} bytes")
    assert size < 400_000
    config = json.loads((tiny_dir / "config.json").read_text())
    assert config["af3trt_tiny_think"] == tiny_think_key() and tiny_think_key()[:8] in default_tiny_dir().name
    config["af3trt_tiny_think"] = "an older generator"
    (again / "config.json").write_text(json.dumps(config))
    with pytest.raises(FileExistsError, match="another generator"):
        make_tiny_checkpoint(again, seed=0)


def test_merged_weights_equal_peft_merge_and_unload(tiny_dir):
    from af3trt.checkpoint import hub_name

    merged = reference(tiny_dir).merge_and_unload().state_dict()
    ckpt = open_checkpoint(tiny_dir, "think")
    ours = {}
    for prefix in ("audio_tower.", "multi_modal_projector.", "language_model."):
        ours.update({prefix + k: v for k, v in ckpt.load(prefix).items()})
    worst = max((ours[hub_name(k)] - v).abs().max().item() for k, v in merged.items())
    print(f"max abs diff of merged weights vs PEFT merge_and_unload: {worst:.2e} (fp32)")
    assert set(map(hub_name, merged)) == set(ours) and worst <= 1e-6


# ---------------------------------------------------------------------- greedy tokens vs HF + PEFT


@pytest.mark.parametrize("seconds", LENGTHS)
def test_think_tokens_equal_transformers_peft(seconds, think_pipe, hf_think):
    convs = [[audio_turn(synthetic_audio(seconds, 21), "Describe the audio in detail.")]]
    ref = hf_generate(hf_think, suffixed(convs), MAX_NEW)
    results = think_pipe.generate(convs, do_sample=False, repetition_penalty=1.0, max_new_tokens=MAX_NEW)  # the think pipeline appends the suffix itself
    print(f"{seconds} s: HF+PEFT {ref} ours {[r.token_ids for r in results]} ({results[0].num_audio_tokens} audio tokens)")
    assert [r.token_ids for r in results] == ref


def test_think_tokens_equal_transformers_peft_batch_and_multi_turn(think_pipe, hf_think):
    convs = [[audio_turn(synthetic_audio(31.0, 5))],
             [audio_turn(synthetic_audio(3.0, 4)), {"role": "assistant", "content": "A voice."},
              {"role": "user", "content": "What is said?"}]]
    ref = hf_generate(hf_think, suffixed(convs), MAX_NEW)
    ours = [r.token_ids for r in think_pipe.generate(convs, do_sample=False, repetition_penalty=1.0, max_new_tokens=MAX_NEW)]
    print("HF+PEFT", ref, "ours", ours)
    assert ours == ref


def test_think_suffix_false_sends_the_prompt_as_given(tiny_dir, think_pipe, hf_think):
    from af3trt.runtime import Pipeline

    plain = Pipeline.from_pretrained(tiny_dir, device="cpu", dtype="float32", variant="think", think_suffix=False)
    convs = [[audio_turn(synthetic_audio(12.0, 21), "Describe the audio in detail.")]]
    ref = hf_generate(hf_think, convs, MAX_NEW)
    ours = plain.generate(convs, do_sample=False, repetition_penalty=1.0, max_new_tokens=MAX_NEW)[0].token_ids
    print("no suffix: HF+PEFT", ref, "ours", ours)
    assert [ours] == ref
    assert ours != think_pipe.generate(convs, do_sample=False, repetition_penalty=1.0, max_new_tokens=MAX_NEW)[0].token_ids


def test_neither_the_lora_nor_the_non_lora_part_is_ignored(tiny_dir, pipe, think_pipe, hf, hf_think):
    convs = suffixed([[audio_turn(synthetic_audio(12.0, 21), "Describe the audio in detail.")]])
    think = hf_generate(hf_think, convs, MAX_NEW)
    without_non_lora = hf_generate((reference(tiny_dir, non_lora=False), hf[1]), convs, MAX_NEW)
    non_lora_only = hf_generate((reference(tiny_dir, lora=False), hf[1]), convs, MAX_NEW)
    base = hf_generate(hf, convs, MAX_NEW)
    ours_base = [r.token_ids for r in pipe.generate(convs, do_sample=False, repetition_penalty=1.0, max_new_tokens=MAX_NEW)]
    ours_think = [r.token_ids for r in think_pipe.generate(convs, do_sample=False, repetition_penalty=1.0, max_new_tokens=MAX_NEW)]
    print(f"base {base}\nthink {think}\nLoRA without non-LoRA {without_non_lora}\nnon-LoRA only {non_lora_only}")
    assert ours_think == think and ours_base == base
    assert think != base and think != without_non_lora and non_lora_only != base


def test_the_suffix_ends_the_last_user_turn_once(think_pipe):
    ending = THINK_SUFFIX + "<|im_end|>\n<|im_start|>assistant\n"
    conv = [audio_turn(synthetic_audio(2.0, 3), "Describe it."), {"role": "assistant", "content": "A tone."},
            {"role": "user", "content": "Why?"}]
    text = think_pipe.prepare(conv)[0].text
    assert text.endswith("Why? " + ending) and text.count(THINK_SUFFIX) == 1
    assert think_pipe.prepare(suffixed([conv])[0])[0].text == text  # already there: not doubled
    audio_only = [{"role": "user", "content": [{"type": "audio", "audio": synthetic_audio(2.0, 3)}]}]
    assert think_pipe.prepare(audio_only)[0].text.endswith("<sound>" + ending)


# ------------------------------------------------------------------------ non_lora_trainables.bin


class _Payload:
    """Unpickling this runs `command` (what a hostile non_lora_trainables.bin would do)."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_a_malicious_pickle_is_refused_and_nothing_runs(writer, tiny_dir, tmp_path):
    marker = tmp_path / "executed"
    root = think_copy(tiny_dir, tmp_path / "ckpt")
    path = root / "think" / "non_lora_trainables.bin"
    payload = {"model.language_model.norm.weight": _Payload(f"touch {marker}")}
    path.unlink()
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(ThinkError, match=r"refused .*weights_only=True"):
        open_checkpoint(root, "think")
    assert not marker.exists()


@pytest.mark.parametrize("content, named", [
    ([torch.zeros(2)], "list"), ({"a": {"b": torch.zeros(2)}}, "'a': dict"), ({"a": 1.5}, "'a': float"),
    ({3: torch.zeros(2)}, "3: Tensor"), ({"a": [torch.zeros(2)]}, "'a': list"), ("weights", "str"),
])
def test_non_tensor_content_is_refused_naming_it(content, named, tmp_path):
    path = tmp_path / "non_lora_trainables.bin"
    torch.save(content, path)
    with pytest.raises(ThinkError, match=f"flat dict of str -> tensor.*{named}"):
        load_non_lora(path)


def test_non_lora_names_in_both_namings_and_unmatched_ones_reported(tiny_dir, tmp_path, caplog):
    root = think_copy(tiny_dir, tmp_path / "ckpt")
    path = root / "think" / "non_lora_trainables.bin"
    state = torch.load(path, weights_only=True)
    hub = {("multi_modal_projector." + k[len("model.multi_modal_projector."):] if "projector" in k else k): v
           for k, v in state.items()}
    hub["model.audio_tower.no_such_layer.weight"] = torch.zeros(2)
    hub["base_model.model.lm_head.weight"] = torch.zeros(2)
    path.unlink()
    torch.save(hub, path)
    with caplog.at_level("WARNING", logger="af3trt.think"):
        ckpt = open_checkpoint(root, "think")
    record = variant_record(ckpt)
    assert record["non_lora"]["applied"] == len(state) and record["non_lora"]["unmatched"] == 2
    assert "2 keys name no weight" in caplog.text and "no_such_layer" in caplog.text
    ref = open_checkpoint(tiny_dir, "think")
    assert torch.equal(ckpt.load("multi_modal_projector.")["linear_2.weight"],
                       ref.load("multi_modal_projector.")["linear_2.weight"])
    state["model.language_model.norm.weight"] = torch.zeros(3)
    path.unlink()
    torch.save(state, path)
    with pytest.raises(ThinkError, match=r"expected shape \(128,\).*got \(3,\)"):
        open_checkpoint(root, "think")


# ------------------------------------------------------------------------------ adapter refusals


@pytest.mark.parametrize("key, value, message", [
    ("use_dora", True, "DoRA is not implemented"), ("use_rslora", True, "rsLoRA"),
    ("fan_in_fan_out", True, "fan_in_fan_out"), ("rank_pattern", {"q_proj": 4}, "rank_pattern"),
    ("alpha_pattern", {"q_proj": 8}, "alpha_pattern"), ("modules_to_save", ["lm_head"], "modules_to_save"),
    ("layers_to_transform", [0], "layers_to_transform"), ("peft_type", "IA3", "expected peft_type 'LORA'"),
    ("bias", "all", "expected bias 'none'"), ("init_lora_weights", "pissa", "init_lora_weights"),
    ("init_lora_weights", False, "init_lora_weights"),
    ("some_future_option", {"on": True}, "unknown adapter setting some_future_option"),
    ("target_modules", ["q_proj"], "target_modules .* does not select"), ("r", 4, r"expected lora_A \(4,"),
])
def test_adapters_the_merge_does_not_implement_are_refused(key, value, message, tiny_dir, tmp_path):
    root = think_copy(tiny_dir, tmp_path / "ckpt")
    path = root / "think" / "adapter_config.json"
    config = json.loads(path.read_text())
    config[key] = value
    path.write_text(json.dumps(config))
    with pytest.raises(ThinkError, match=message):
        open_checkpoint(root, "think")


def test_adapter_weights_other_than_lora_pairs_are_refused(tiny_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    root = think_copy(tiny_dir, tmp_path / "ckpt")
    path = root / "think" / "adapter_model.safetensors"
    weights = load_file(str(path))
    weights["base_model.model.model.language_model.embed_tokens.lora_embedding_A"] = torch.zeros(8, 4)
    save_file(weights, str(path))
    with pytest.raises(ThinkError, match="expected only LoRA pairs.*lora_embedding_A"):
        open_checkpoint(root, "think")
    weights.pop("base_model.model.model.language_model.embed_tokens.lora_embedding_A")
    weights.pop("base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight")
    save_file(weights, str(path))
    with pytest.raises(ThinkError, match="expected a lora_A beside each lora_B"):
        open_checkpoint(root, "think")
    shutil.rmtree(root / "think")
    with pytest.raises(ThinkError, match="missing"):
        open_checkpoint(root, "think")
    with pytest.raises(ValueError, match=r"expected variant in \('base', 'think'\), got 'deep'"):
        open_checkpoint(tiny_dir, "deep")


# --------------------------------------------------------------------------- engine dir, CLI, Triton


def test_think_files_enter_every_stage_key(tiny_dir, tmp_path, think_engine_dir):
    from af3trt.build.engine_dir import _key, BuildOptions
    from af3trt.build.llm import EngineLimits
    from af3trt.checkpoint import Checkpoint

    base_fp, think = Checkpoint.open(tiny_dir).fingerprint(), open_checkpoint(tiny_dir, "think")
    manifest = Manifest.read(think_engine_dir)
    assert manifest.checkpoint["fingerprint"] == think.fingerprint() != base_fp
    assert manifest.variant["name"] == "think" and manifest.variant["adapter"] == files_digest(tiny_dir / "think")
    assert manifest.variant["non_lora"] == {"applied": 6, "unmatched": 0, "unmatched_names": [], "encoder": True}
    opts = BuildOptions(precision="bf16", variant="think", limits=EngineLimits(
        max_batch_size=2, max_audio_seconds=60.0, max_text_tokens=256, max_new_tokens=64))
    for name, entry in manifest.stages.items():  # a stage's key: checkpoint, flags and its upstream's outputs
        assert entry["key"] == _key(name, think.fingerprint(), opts, manifest.stages)
        assert entry["key"] != _key(name, base_fp, opts, manifest.stages), name
    missing = [e for e in manifest.stages.values() if "missing" in e]  # where tensorrt(_llm) is absent
    assert all(e["command"].endswith("--variant think") for e in missing)
    onnx_key = json.loads((think_engine_dir / "encoder" / "config.json").read_text())["onnx"]["checkpoint"]
    assert onnx_key["fingerprint"] == think.fingerprint()
    root = think_copy(tiny_dir, tmp_path / "ckpt")
    (root / "think" / "adapter_config.json").write_text(
        (root / "think" / "adapter_config.json").read_text().replace('"lora_dropout": 0.05', '"lora_dropout": 0.1'))
    assert open_checkpoint(root, "think").fingerprint() != think.fingerprint()  # every byte counts


def test_build_variant_think_answers_through_af3trt_run(think_engine_dir, tiny_dir, think_pipe, capsys):
    from af3trt.assets import SPEECH_WAV
    from af3trt.cli import main
    from af3trt.runtime import Pipeline

    capsys.readouterr()
    assert main(["run", "--model", str(think_engine_dir), "--audio", str(SPEECH_WAV), "--max-new-tokens", "8",
                 "--no-do-sample", "--json", "--device", "cpu", "--dtype", "float32"]) == 0
    engine = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(["run", "--model", str(tiny_dir), "--variant", "think", "--audio", str(SPEECH_WAV),
                 "--max-new-tokens", "8", "--no-do-sample", "--json"]) == 0
    ckpt = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(["run", "--model", str(tiny_dir), "--audio", str(SPEECH_WAV), "--max-new-tokens", "8", "--no-do-sample",
                 "--json"]) == 0
    base = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    conv = [audio_turn(str(SPEECH_WAV))]
    print(f"engine dir {engine['token_ids']} checkpoint dir {ckpt['token_ids']} base {base['token_ids']}")
    assert engine["num_audio_tokens"] == 144 and len(engine["token_ids"]) == 8
    assert ckpt["token_ids"] == think_pipe.generate(conv, do_sample=False, max_new_tokens=8)[0].token_ids != base["token_ids"]
    assert engine["token_ids"] == ckpt["token_ids"]  # bf16 TensorRT-LLM checkpoint, measured equal on this clip
    with pytest.raises(ManifestError, match="expected an engine dir of variant 'base', got 'think'"):
        Pipeline.from_pretrained(think_engine_dir, device="cpu", variant="base")
    plain = Pipeline.from_pretrained(think_engine_dir, device="cpu", think_suffix=False)
    assert plain.builder.user_suffix == "" and THINK_SUFFIX not in plain.prepare(conv)[0].text


def test_cli_variant_errors_name_what_differs(engine_dir, tiny_dir, tmp_path, capsys):
    from af3trt.cli import main

    assert main(["run", "--model", str(engine_dir), "--variant", "think", "--max-new-tokens", "2"]) == 2
    assert "expected an engine dir of variant 'think', got 'base'" in capsys.readouterr().err
    root = tmp_path / "no-think"
    root.mkdir()
    for path in tiny_dir.iterdir():
        if path.is_file():
            (root / path.name).symlink_to(path)
    assert main(["build", "--model", str(root), "--out", str(tmp_path / "out"), "--variant", "think"]) == 2
    assert "for variant 'think', missing ['adapter_config.json'" in capsys.readouterr().err
    assert main(["build", "--model", str(tiny_dir), "--out", str(engine_dir), "--variant", "think"]) == 2
    assert "got one of variant 'base'" in capsys.readouterr().err  # the base engine dir is left alone


def test_torch_encoder_on_a_think_engine_dir_reads_the_think_weights(think_engine_dir, pipe):
    from af3trt.runtime import Pipeline

    onnx = Pipeline.from_pretrained(think_engine_dir, device="cpu", dtype="float32")
    torch_enc = Pipeline.from_pretrained(think_engine_dir, device="cpu", dtype="float32", encoder="torch")
    prompts = onnx.prepare([audio_turn(synthetic_audio(4.0, 2))])
    (a,), _, _ = onnx.encode(prompts)
    (b,), _, _ = torch_enc.encode(prompts)
    (base,), _, _ = pipe.encode(prompts)
    err = ((a[0] - b[0]).abs().max() / b[0].abs().max()).item()
    print(f"ONNX vs torch encoder on the think engine dir: max relative diff {err:.2e}")
    assert onnx.encoder.name == "onnxruntime" and err <= 1e-4
    assert not torch.allclose(b[0], base[0], atol=1e-3)


def test_triton_repository_of_a_think_engine_dir_carries_the_variant(think_engine_dir, engine_dir, tmp_path,
                                                                      monkeypatch):
    from google.protobuf import json_format

    from af3trt.build.triton import write_repository

    from .test_triton import _import_model, _stub_backend_utils, parse_repository

    repo = write_repository(think_engine_dir, tmp_path / "repo", llm_backend="python", encoder_backend="torch")
    configs = parse_repository(repo.path)
    adapter = Manifest.read(think_engine_dir).variant["adapter"]
    for name in ("ensemble", "af3", "preprocessing", "audio_encoder", "tensorrt_llm", "postprocessing"):
        params = {k: v.string_value for k, v in configs[name].parameters.items()}
        assert params["variant"] == "think" and params["variant_adapter"] == adapter, name
    assert json.loads((repo.path / ".af3trt-repository").read_text())["variant"]["adapter"] == adapter
    base = parse_repository(write_repository(engine_dir, tmp_path / "base", llm_backend="python").path)
    assert base["ensemble"].parameters["variant"].string_value == "base"
    _stub_backend_utils(monkeypatch)
    models = {}
    for name in ("preprocessing", "audio_encoder"):
        config = json_format.MessageToDict(configs[name], preserving_proto_field_name=True)
        models[name] = _import_model(repo.path / name / "1" / "model.py", f"af3trt_think_{name}").TritonPythonModel()
        models[name].initialize({"model_config": json.dumps(config)})
    assert models["preprocessing"].builder.user_suffix == THINK_SUFFIX
    think_weight = open_checkpoint(Manifest.read(think_engine_dir).checkpoint["path"], "think").load(
        "multi_modal_projector.")["linear_2.weight"]
    served = models["audio_encoder"].encoder.module.projector.linear_2.weight
    assert torch.equal(served.detach().float(), think_weight.float())


@pytest.mark.parametrize("precision", ["int8_wo", "fp8"])
def test_quantized_think_builds_answer_through_af3trt_run(precision, think_engine_dir, tmp_path, capsys):
    from af3trt.assets import SPEECH_WAV
    from af3trt.cli import main

    out = tmp_path / precision
    shutil.copytree(think_engine_dir, out)  # the encoder stages are unchanged: skipped
    assert main(["build", "--model", Manifest.read(out).checkpoint["path"], "--out", str(out), "--variant", "think",
                 "--precision", precision, "--max-batch-size", "2", "--max-audio-seconds", "60",
                 "--max-text-tokens", "256", "--max-new-tokens", "64", "--calib-size", "2",
                 "--calib-max-tokens", "256"]) == 0
    manifest = Manifest.read(out)
    assert manifest.variant["name"] == "think" and manifest.precision["llm"] == precision
    cfg = json.loads((out / "llm" / "checkpoint" / "config.json").read_text())
    assert cfg["quantization"]["quant_algo"] == {"int8_wo": "W8A16", "fp8": "FP8"}[precision]
    capsys.readouterr()
    assert main(["run", "--model", str(out), "--audio", str(SPEECH_WAV), "--max-new-tokens", "6", "--json",
                 "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["num_audio_tokens"] == 144 and len(result["token_ids"]) == 6


@pytest.mark.triton_server
def test_tritonserver_serves_the_think_engine_dir(think_engine_dir, tmp_path):
    """A real tritonserver (nvidia-pytriton's binary, CPU) on the think engine dir's repository: the model
    config API shows the variant, and `af3` answers as the in-process think pipeline (suffix added)."""
    pytest.importorskip("pytriton", reason="the tritonserver binary comes from the nvidia-pytriton wheel")
    import tritonclient.http as httpclient

    from af3trt.assets import SPEECH_WAV
    from af3trt.build.triton import write_repository
    from af3trt.runtime import Pipeline
    from af3trt.serving.client import Af3Client
    from af3trt.serving.server import start_server

    repo = write_repository(think_engine_dir, tmp_path / "repo", llm_backend="python")
    expected = Pipeline.from_pretrained(think_engine_dir, device="cpu").generate(
        [audio_turn(str(SPEECH_WAV))], do_sample=False, max_new_tokens=8)[0].text
    with start_server(repo.path, startup_timeout_s=300, log_path=tmp_path / "tritonserver.log") as srv:
        params = httpclient.InferenceServerClient(srv.http_url).get_model_config("ensemble")["parameters"]
        got = Af3Client(srv.http_url, srv.grpc_url, timeout_s=120).generate(
            "Transcribe the input speech.", SPEECH_WAV, model="af3", do_sample=False, max_tokens=8)
    print(f"expected {expected!r}\ngot      {got!r}")
    assert params["variant"]["string_value"] == "think"
    assert params["variant_adapter"]["string_value"] == Manifest.read(think_engine_dir).variant["adapter"]
    assert got == expected
