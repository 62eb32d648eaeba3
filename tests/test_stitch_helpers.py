"""runtime.stitch's request rules that the Triton preprocessing model shares: extra ids and the sampling seed."""

import numpy as np

from af3trt.runtime.generation import GenerationOptions
from af3trt.runtime.stitch import extra_id, extra_ids, request_seed


def test_extra_ids_repeat_each_audio_id_at_its_positions():
    is_audio = np.array([0, 1, 1, 0, 1, 1, 1, 0], dtype=bool)
    got = extra_ids(is_audio, [2, 3], ["ab" * 32, "cd" * 32])
    want = [0, extra_id("ab" * 32)] * 1 + [extra_id("ab" * 32), 0] + [extra_id("cd" * 32)] * 3 + [0]
    print(got.tolist(), want)
    assert got.dtype == np.int64 and got.tolist() == want
    assert extra_ids(np.zeros(3, bool), [], []).tolist() == [0, 0, 0]


def test_request_seed_is_the_callers_else_fresh_only_when_sampling():
    assert request_seed(GenerationOptions(do_sample=False)) is None
    assert request_seed(GenerationOptions(do_sample=False, seed=7)) == 7
    assert request_seed(GenerationOptions(do_sample=True, seed=7)) == 7
    seeds = {request_seed(GenerationOptions(do_sample=True)) for _ in range(4)}
    assert len(seeds) == 4 and all(0 <= s < 2**63 for s in seeds)
