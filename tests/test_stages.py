"""The stage registry (af3trt.build.stages) and the manifest's typed stage records (formats.manifest.StageRecord)."""

import json
import shlex

from af3trt.build.engine_dir import BuildOptions
from af3trt.build.stages import BUILD_FLAGS, GROUPS, STAGES, rebuild_command
from af3trt.cli import build_parser
from af3trt.formats.manifest import STAGE_NAMES, Manifest, StageRecord


def test_registry_order_groups_and_upstreams():
    assert tuple(STAGES) == STAGE_NAMES and GROUPS == ("encoder", "llm")
    for stage in STAGES.values():
        assert stage.upstream is None or list(STAGES).index(stage.upstream) < list(STAGES).index(stage.name)
        assert (stage.requires is None) == (stage.needs is None)


def test_the_finishing_command_parses_back_to_the_same_options():
    """rebuild_command's flags are `af3trt build` options: the line, parsed by the CLI, asks for what was built."""
    o = BuildOptions(precision="int8_wo", tp_size=1, encoder_precision="bf16", encoder_input="audio",
                     calib_audio="/audio", calib_size=3, stages=("llm",), variant="think", target_sm=89)
    argv = shlex.split(rebuild_command("/ckpt", ".", o))[1:]
    args = build_parser().parse_args(argv)
    for flag in BUILD_FLAGS:
        got = getattr(args, flag.field.removeprefix("limits."))
        want = flag.value(o)
        assert (tuple(got.split(",")) if flag.field == "stages" else got) == want, flag


def test_stage_record_is_a_read_only_view_of_its_json():
    built = {"key": "k", "checkpoint": "c", "path": "llm/checkpoint", "vocab_size": 640,
             "outputs": {"llm/checkpoint/config.json": {"size": 1, "sha256": "x"}}}
    left = {"key": "k", "checkpoint": "c", "path": "llm/engine", "missing": "tensorrt_llm is not installed here",
            "needs": "TensorRT-LLM", "command": "af3trt build ...", "manual": "bash llm/build_engine.sh", "argv": []}
    for data in (built, left):
        record = StageRecord.read(data)
        assert record.record() == data and dict(record) == data and record == data
        assert record["path"] == data["path"] and record.get("absent") is None
    assert StageRecord.read(built).built and "missing" not in StageRecord.read(built)
    assert not StageRecord.read(left).built and "missing" in StageRecord.read(left)
    assert StageRecord.read(built).facts == {"vocab_size": 640}


def test_manifest_round_trips_its_stage_records(tmp_path):
    m = Manifest(checkpoint={"fingerprint": "c"}, model={}, limits={}, precision={},
                 stages={"llm_checkpoint": {"key": "k", "checkpoint": "c", "path": "llm/checkpoint", "vocab_size": 7}})
    m.write(tmp_path)
    back = Manifest.read(tmp_path)
    assert isinstance(back.stages["llm_checkpoint"], StageRecord) and back.stages == m.stages
    assert json.loads((tmp_path / "manifest.json").read_text())["stages"]["llm_checkpoint"]["vocab_size"] == 7
    assert back.engine_vocab_size() == 7
