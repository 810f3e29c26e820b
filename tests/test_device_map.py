"""QLoRA device placement: each launched process loads its quantised model onto ITS GPU (no GPU needed).

The trainer asks for a bare ``cuda``; under torchrun/deepspeed every rank must land on ``LOCAL_RANK``
(the release: ``device_map={"": LOCAL_RANK}``), not all on GPU 0.
"""

from __future__ import annotations

import pytest
import torch

from e5v.backbones.llava_next import quantized_device_map


@pytest.mark.parametrize("local_rank", ["0", "1", "3", "7"])
def test_bare_cuda_follows_the_launchers_local_rank(local_rank: str) -> None:
    assert quantized_device_map(torch.device("cuda"), {"LOCAL_RANK": local_rank}) == {"": int(local_rank)}


def test_ranks_of_one_node_get_distinct_gpus() -> None:
    maps = [quantized_device_map(torch.device("cuda"), {"LOCAL_RANK": str(r), "RANK": str(8 + r)}) for r in range(4)]
    assert [m[""] for m in maps] == [0, 1, 2, 3]  # LOCAL_RANK, not the global RANK


def test_without_a_launcher_and_explicit_index() -> None:
    assert quantized_device_map(torch.device("cuda"), {}) == {"": 0}
    assert quantized_device_map(torch.device("cuda"), {"LOCAL_RANK": ""}) == {"": 0}
    assert quantized_device_map(torch.device("cuda:2"), {"LOCAL_RANK": "5"}) == {"": 2}  # explicit wins


def test_reads_the_process_environment_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOCAL_RANK", "6")
    assert quantized_device_map(torch.device("cuda")) == {"": 6}


def test_bad_values_fail_loudly() -> None:
    with pytest.raises(ValueError, match="LOCAL_RANK='x'"):
        quantized_device_map(torch.device("cuda"), {"LOCAL_RANK": "x"})
    with pytest.raises(ValueError, match="negative"):
        quantized_device_map(torch.device("cuda"), {"LOCAL_RANK": "-1"})
    with pytest.raises(ValueError, match="CUDA"):
        quantized_device_map(torch.device("cpu"), {"LOCAL_RANK": "1"})


class _Captured(Exception):
    pass


def test_load_passes_it_for_quantised_models(monkeypatch: pytest.MonkeyPatch, tiny_dir) -> None:  # noqa: ANN001
    """``load(device="cuda", quantize="4bit")`` on rank 3 asks transformers for GPU 3 (CUDA faked, load stopped)."""
    import transformers

    from e5v.backbones import llava_next

    seen: dict = {}

    def fake_from_pretrained(path, **kw):  # noqa: ANN001, ANN202
        seen.update(kw)
        raise _Captured

    monkeypatch.setattr(llava_next, "resolve_device", lambda d: torch.device("cuda"))
    monkeypatch.setattr(llava_next, "quantization_config", lambda *a: "bnb-config")
    monkeypatch.setattr(transformers.LlavaNextForConditionalGeneration, "from_pretrained", fake_from_pretrained)
    monkeypatch.setenv("LOCAL_RANK", "3")
    with pytest.raises(_Captured):
        llava_next.load(str(tiny_dir), dtype="float16", device="cuda", quantize="4bit", attn_implementation="sdpa")
    assert seen["device_map"] == {"": 3} and seen["quantization_config"] == "bnb-config"
