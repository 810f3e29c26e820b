"""Training batches (e5v.train.batches): a step's batches are the same whether DataLoader workers prepare them
(images decoded and preprocessed there) or the training process does, in any order of asking (resume)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from e5v.data.images import BadImageError
from e5v.data.nli import StepSampler
from e5v.train.batches import Chunk, ChunkPreparer, StepBatches


@pytest.fixture(scope="module")
def pairs_setup(tmp_path_factory, tiny_dir):
    from e5v.backbones import auto
    from e5v.mini.train_data import mini_image_caption_pairs
    from e5v.prompts import load_prompt

    root = tmp_path_factory.mktemp("pairs")
    from e5v.data.contrastive import as_rows

    data = as_rows(mini_image_caption_pairs(root / "pairs.json", root / "images", n_rows=64))
    backbone = auto.load("tiny", device="cpu")
    prompt = load_prompt(auto.default_prompt(backbone))
    return data, prompt, backbone.inputs()


def _same(a: list[Chunk], b: list[Chunk]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.rows, y.rows)
        assert len(x.batches) == len(y.batches)
        for bx, by in zip(x.batches, y.batches):
            assert bx.keys() == by.keys()
            for k in bx:
                assert torch.equal(bx[k], by[k]), k


@pytest.mark.parametrize("pack", [None, 0.0], ids=["padded", "packed"])
def test_image_caption_batches_identical_with_0_and_2_workers(pairs_setup, pack) -> None:
    data, prompt, inputs = pairs_setup
    prep = ChunkPreparer(data, prompt, inputs, pack_text=pack, pack_images=pack)
    sampler = StepSampler(len(data), 16, seed=3)  # 4 steps per epoch: steps 0-5 cross an epoch boundary
    here = StepBatches(prep, sampler, micro=8, num_workers=0)
    rng = torch.get_rng_state()
    workers = StepBatches(prep, sampler, micro=8, num_workers=2, stop=6)
    try:
        for step in range(6):
            chunks = workers.chunks(step)
            _same(chunks, here.chunks(step))
            assert [len(c.batches) for c in chunks] == [2, 2]  # images, captions per chunk of 8
            assert ("last_index" in chunks[0].batches[0]) == (pack is not None)
        # a resumed run asks for a later step first: the workers restart there, same batches
        resumed = StepBatches(prep, sampler, micro=8, num_workers=2, stop=6)
        _same(resumed.chunks(4), here.chunks(4))
        _same(resumed.chunks(2), here.chunks(2))  # and back (a benchmark re-running a step)
        resumed.close()
        _same(workers.chunks(6), here.chunks(6))  # past the stop: prepared in this process
    finally:
        workers.close()
    assert torch.equal(torch.get_rng_state(), rng)  # no draw from the global RNG (LoRA dropout, exact resume)


def test_bad_image_in_a_worker_is_raised_naming_the_file(pairs_setup, tmp_path: Path) -> None:
    from dataclasses import replace

    data, prompt, inputs = pairs_setup
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    sampler = StepSampler(len(data), 16, seed=3)
    victim = int(sampler.rows(1)[3])
    broken = replace(data, queries=[replace(q, image=str(bad)) if i == victim else q for i, q in enumerate(data.queries)])
    workers = StepBatches(ChunkPreparer(broken, prompt, inputs), sampler, micro=8,
                          num_workers=2, stop=3)
    try:
        workers.chunks(0)
        with pytest.raises(BadImageError, match=f"bad image {bad}"):
            workers.chunks(1)
    finally:
        workers.close()
