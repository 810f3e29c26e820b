"""The released training script's behaviour, reproduced where a faithful mode asks for it (issue 13, items
2-5): gradient scale, padding, sentence cut, schedule by epochs. Expected values are written out here from
the release's procedure (kongds/E5-V ft_llm.py), not computed by the code under test.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- 3. padding, bug for bug
def test_release_padding_matches_the_released_collator_and_mask() -> None:
    from e5v.train import release_padding

    eos = 9
    anchors = [[1, 5, 6], [1, 7]]  # BOS-prefixed rows of one micro batch
    positives = [[1, 2, 3, 4, 5, 6, 7, 8, 3], [1, 0, 4]]  # 9 tokens -> padded to 16; one real token of id 0
    negatives = [[1, 3], [1, 4, 4]]
    ids, mask = release_padding([anchors, positives, negatives], pad_id=eos)
    # anchors / negatives: EOS-padded to 8 (a multiple of 8), then EOS-padded to 16 (the longest group)
    # positives: padded with 0 (their -100 labels) to 16
    expected = torch.tensor([
        [eos] * 8 + [eos] * 5 + [1, 5, 6],
        [eos] * 8 + [eos] * 6 + [1, 7],
        [0] * 7 + [1, 2, 3, 4, 5, 6, 7, 8, 3],
        [0] * 13 + [1, 0, 4],
        [eos] * 8 + [eos] * 6 + [1, 3],
        [eos] * 8 + [eos] * 5 + [1, 4, 4],
    ])
    assert torch.equal(ids, expected)
    assert torch.equal(mask, (expected > 0).long())
    assert mask[0].sum() == 16  # anchors attend every EOS pad
    assert mask[2].tolist() == [0] * 7 + [1] * 9  # positives' pads are masked
    assert mask[3].tolist() == [0] * 13 + [1, 0, 1]  # ... and so is a real token of id 0, as released


def test_release_padding_extends_short_positives_with_attended_eos() -> None:
    from e5v.train import release_padding

    ids, mask = release_padding([[[1] * 10], [[1, 2]], [[1, 3]]], pad_id=9)
    # anchors 10 -> 16; positives 2 -> 8 with zeros, then 8 more EOS to reach 16 (attended)
    assert ids[1].tolist() == [9] * 8 + [0] * 6 + [1, 2]
    assert mask[1].tolist() == [1] * 8 + [0] * 6 + [1, 1]


# ---------------------------------------------------------------- 4. sentence cut, always decoded
def test_faithful_mode_always_decodes_the_sentence_fixed_mode_keeps_it() -> None:
    from e5v.backbones.tiny import build_tokenizer
    from e5v.prompts import load_prompt

    tok = build_tokenizer()
    p = load_prompt("e5v_llama3")
    s = "He is n't here , is he ?"
    assert "He isn't here, is he?\nSummary above sentence in one word:" in p.render_train(s, tok, mode="faithful")
    assert f"{s}\nSummary above sentence in one word:" in p.render_train(s, tok, mode="fixed")
    long = " ".join(["word"] * 60) + " ."
    cut = p.render_train(long, tok, mode="faithful")
    # cut to 32 tokens in both modes (+1: the template's "in one word")
    assert cut.count("word") == 33 and " ." not in cut
    assert p.render_train(long, tok, mode="fixed").count("word") == 33


def test_clean_up_spaces_is_transformers_4_table() -> None:
    from e5v.prompts import clean_up_spaces

    assert clean_up_spaces("a . b ? c ! d , I 'm you 're we 've it 's do n't x ' y") == \
        "a. b? c! d, I'm you're we've it's don't x'y"


# ---------------------------------------------------------------- 2. gradient scale
def test_gradient_scale_setting() -> None:
    from e5v.train import ConfigError, gradient_scale

    assert gradient_scale("exact", 32) == 1.0
    assert gradient_scale("release", 32) == 1 / 32
    assert gradient_scale(0.03125, 1) == 0.03125
    for bad in ("relase", 0, -1, 2.0, True):
        with pytest.raises(ConfigError, match="loss.gradient_scale"):
            gradient_scale(bad, 2)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_grads(rank: int, world: int, port: int, out: str) -> None:
    """One rank: a linear 'encoder' on this rank's rows; the gradient (averaged over ranks as DeepSpeed does)
    by our path with gradient_scale=release, and by the released code's procedure written out here."""
    import torch.distributed as dist

    from e5v import distributed as D
    from e5v.train.losses import info_nce_hard_negatives
    from e5v.train import gradient_scale

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    g = torch.Generator().manual_seed(0)
    enc = torch.nn.Linear(6, 5)
    with torch.no_grad():
        enc.weight.copy_(torch.randn(5, 6, generator=g))
        enc.bias.copy_(torch.randn(5, generator=g))
    x = torch.randn(3, 4 * world, 6, generator=g)  # (anchor/pos/neg, global batch, features): same on every rank
    local = x[:, rank * 4 : (rank + 1) * 4]

    def averaged() -> torch.Tensor:
        grad = torch.cat([enc.weight.grad.flatten(), enc.bias.grad.flatten()])
        dist.all_reduce(grad)
        enc.zero_grad()
        return grad / world

    # ours: local anchors against gathered candidates (gradients flow across ranks), times the scale
    a, p, n = (enc(local[k]) for k in range(3))
    loss, _ = info_nce_hard_negatives(a, D.gather_with_grad(p), D.gather_with_grad(n), 0.05, rank * 4)
    (loss * gradient_scale("release", world)).backward()
    ours = averaged()

    # the release: all_gather without grad, own slice replaced, loss over the WHOLE gathered batch per rank
    z = []
    for k in range(3):
        mine = enc(local[k])
        parts = [torch.zeros_like(mine) for _ in range(world)]
        dist.all_gather(parts, mine.detach().contiguous())
        parts[rank] = mine
        z.append(torch.cat(parts))
    cos = torch.nn.CosineSimilarity(dim=-1)
    logits = torch.cat([cos(z[0].unsqueeze(1), z[1].unsqueeze(0)), cos(z[0].unsqueeze(1), z[2].unsqueeze(0))], 1)
    torch.nn.functional.cross_entropy(logits / 0.05, torch.arange(4 * world)).backward()
    release = averaged()

    # the exact gradient: one process, the whole batch
    a, p, n = (enc(x[k]) for k in range(3))
    info_nce_hard_negatives(a, p, n, 0.05, 0)[0].backward()
    exact = torch.cat([enc.weight.grad.flatten(), enc.bias.grad.flatten()])
    if rank == 0:
        torch.save({"ours": ours, "release": release, "exact": exact}, out)
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_release_gradient_scale_equals_the_released_procedure(tmp_path: Path, world: int) -> None:
    import torch.multiprocessing as mp

    out = str(tmp_path / "grads.pt")
    sys.path.insert(0, str(REPO))
    mp.spawn(_rank_grads, args=(world, _free_port(), out), nprocs=world, join=True)
    g = torch.load(out, weights_only=True)
    assert g["exact"].abs().max() > 1e-3
    torch.testing.assert_close(g["ours"], g["release"], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(g["release"] * world, g["exact"], atol=1e-5, rtol=1e-5)  # full gradient / world


# ---------------------------------------------------------------- 5. schedule by epochs
def test_epochs_set_the_step_count_and_release_script_composes(tmp_path: Path) -> None:
    from e5v.config import compose
    from test_losses import lr_factor

    cfg = compose("train", ["experiment=release_script", "run_name=x"])
    assert cfg.trainer.epochs == 2 and cfg.trainer.attend_padding is True and cfg.loss.gradient_scale == "release"
    assert cfg.prompt.train_mode == "faithful" and cfg.trainer.global_batch == 768
    paper = compose("train", ["experiment=paper", "run_name=x"])
    assert paper.trainer.max_steps == 1000 and paper.trainer.epochs is None and paper.loss.gradient_scale == 0.03125
    # 275,601 NLI rows at 768: 358 full batches per epoch, 716 steps, lr 0 at the last one
    f = lr_factor(100, 2 * (275_601 // 768))
    assert f(50) == 0.5 and f(100) == 1.0 and f(716) == 0.0 and 0 < f(715) < 0.002


# ---------------------------------------------------------------- Mistral: the processor revision the release pins
def test_mistral_processor_revision_is_pinned_as_released(monkeypatch, tmp_path: Path) -> None:
    import shutil

    import transformers

    from e5v import Embedder
    from e5v.backbones import tiny
    from e5v.config import compose

    cfg = compose("embed", ["backbone=llava_next_mistral_7b"])
    assert cfg.backbone.processor_revision == "a1d521368f8d353afa4da2ed2bb1bf646ef1ff5f"
    assert cfg.backbone.revision is None  # the weights are not pinned, only the tokenizer / processor
    seen: list[object] = []
    real = transformers.AutoTokenizer.from_pretrained

    def spy(path, *args, **kwargs):
        seen.append(kwargs.get("revision"))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", spy)
    dst = tmp_path / "mistral"
    shutil.copytree(tiny.ensure_tiny(seed=0), dst)
    emb = Embedder.from_config(compose("embed", ["backbone=llava_next_mistral_7b", f"backbone.name_or_path={dst}",
                                                 "embedder.device=cpu"]))
    assert seen == ["a1d521368f8d353afa4da2ed2bb1bf646ef1ff5f"]
    assert emb.backbone.info["processor_revision"] == "a1d521368f8d353afa4da2ed2bb1bf646ef1ff5f"
