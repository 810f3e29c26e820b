"""MIEB through mteb, offline: mteb's image task types run end to end through our encoder on local data
(mteb's mock task classes, filled with more rows), and their scores equal metrics computed here from
embeddings taken straight from our Embedder; the ``eval.mieb`` runner writes mteb's files plus a table."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

mteb = pytest.importorskip("mteb")

N = 8  # rows per local task: enough for ranks and correlations to mean something, a few seconds on CPU


def _images(n: int, seed: int) -> list:
    from conftest import make_image

    return [make_image(24 + 5 * i, 40 - 2 * i, seed=seed + i) for i in range(n)]


def _captions(n: int) -> list[str]:
    colours = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white", "grey", "pink"]
    shapes = ["circle", "square", "star", "triangle", "cross", "ring", "heart", "moon", "arrow", "leaf"]
    return [f"a {colours[i]} {shapes[(3 * i) % 10]}" for i in range(n)]


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return a @ b.T


def _rank_metrics(sim: np.ndarray, gold: list[int]) -> tuple[float, float]:
    """(nDCG@10, recall@1) with one relevant document per query (rel 1): written here, not mteb's."""
    ndcg, r1 = [], []
    for q, g in enumerate(gold):
        rank = 1 + int((sim[q] > sim[q, g]).sum())  # no ties among random-image cosines
        ndcg.append(1 / math.log2(rank + 1) if rank <= 10 else 0.0)
        r1.append(float(rank == 1))
    return float(np.mean(ndcg)), float(np.mean(r1))


def _retrieval_task(base: type, queries: dict, corpus: dict, gold: list[int]) -> object:
    from datasets import Dataset

    from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData

    class Local(base):  # the mock's metadata (type, category, modalities), our rows
        def load_data(self, num_proc=None, **kwargs) -> None:  # noqa: ANN001
            n_doc = len(next(iter(corpus.values())))
            rel = {f"q{q}": {f"d{d}": int(d == g) for d in range(n_doc)} for q, g in enumerate(gold)}
            split = RetrievalSplitData(
                queries=Dataset.from_dict({"id": [f"q{i}" for i in range(len(gold))], **queries}),
                corpus=Dataset.from_dict({"id": [f"d{i}" for i in range(n_doc)], **corpus}),
                relevant_docs=rel,
                top_ranked=None,
            )
            self.dataset = {"default": {"test": split}}
            self.data_loaded = True

    return Local()


def _scores(model, task) -> dict:  # noqa: ANN001
    res = mteb.evaluate(model, task, cache=None, encode_kwargs={"batch_size": 4}, show_progress_bar=False)
    return res.task_results[0].scores["test"][0]


def _scores_and_predictions(model, task, folder) -> tuple[dict, object]:  # noqa: ANN001
    """Scores plus mteb's saved predictions (retrieval: every query-document similarity; VisualSTS: the
    cosines; zero-shot: class probabilities): what the metric was computed from, compared number by number."""
    res = mteb.evaluate(model, task, cache=None, encode_kwargs={"batch_size": 4}, show_progress_bar=False,
                        prediction_folder=folder)
    name = res.task_results[0].task_name
    pred = json.loads((folder / f"{name}_predictions.json").read_text())["default"]["test"]
    return res.task_results[0].scores["test"][0], pred


def _as_matrix(pred: dict, n_q: int, n_d: int) -> np.ndarray:
    return np.array([[pred[f"q{q}"][f"d{d}"] for d in range(n_d)] for q in range(n_q)])


def test_i2t_retrieval_equals_ranks_from_our_embeddings(embedder, tmp_path) -> None:
    from mteb.mocks.mock_tasks import MockAny2AnyRetrievalI2TTask

    from e5v.integrations.mteb_encoder import E5VEncoder

    imgs, caps = _images(N, seed=10), _captions(N)
    gold = [(3 * q + 1) % N for q in range(N)]  # query q's caption sits at corpus row gold[q]
    task = _retrieval_task(MockAny2AnyRetrievalI2TTask, {"image": imgs}, {"text": [caps[gold.index(d)] for d in range(N)]}, gold)
    s, pred = _scores_and_predictions(E5VEncoder("tiny", embedder=embedder), task, tmp_path)
    docs = [caps[gold.index(d)] for d in range(N)]
    sim = _cos(embedder.encode_image(imgs), embedder.encode_text(docs))  # `image` and `text` prompts
    np.testing.assert_allclose(_as_matrix(pred, N, N), sim, atol=1e-5)
    ndcg, r1 = _rank_metrics(sim, gold)
    assert s["ndcg_at_10"] == pytest.approx(ndcg, abs=1e-4)
    assert s["recall_at_1"] == pytest.approx(r1, abs=1e-4)
    assert s["main_score"] == s["ndcg_at_10"]


def test_it2i_queries_use_the_composed_prompt(embedder, tmp_path) -> None:
    """image+text queries (CIRR-like, MIEB's it2i / VisionCentricQA) -> one `cirr_query` prompt per row; a
    per-task override changes it, and the score follows the prompt actually used."""
    from mteb.mocks.mock_tasks import MockMultiChoiceTask

    from e5v.integrations.mteb_encoder import E5VEncoder

    ref, tgt, caps = _images(N, seed=30), _images(N, seed=50), _captions(N)
    gold = [(q + 2) % N for q in range(N)]
    task = _retrieval_task(MockMultiChoiceTask, {"image": ref, "text": caps}, {"image": tgt}, gold)
    s, pred = _scores_and_predictions(E5VEncoder("tiny", embedder=embedder), task, tmp_path)
    q = embedder.encode_interleaved(list(zip(ref, caps)), template="cirr_query")
    sim = _cos(q, embedder.encode_image(tgt))
    np.testing.assert_allclose(_as_matrix(pred, N, N), sim, atol=1e-5)
    ndcg, _ = _rank_metrics(sim, gold)
    assert s["ndcg_at_10"] == pytest.approx(ndcg, abs=1e-4)

    over = E5VEncoder("tiny", embedder=embedder, interleaved_templates={"VisionCentricQA": "fashioniq_query"})
    with pytest.raises(ValueError, match="category"):  # proof the override is what reaches the Embedder
        _scores(over, _retrieval_task(MockMultiChoiceTask, {"image": ref, "text": caps}, {"image": tgt}, gold))


def test_zero_shot_classification_equals_argmax_cosine(embedder, tmp_path) -> None:
    from datasets import Dataset, DatasetDict
    from mteb.mocks.mock_tasks import MockZeroShotClassificationTask

    from e5v.integrations.mteb_encoder import E5VEncoder

    labels_text = ["a photo of a cat", "a photo of a dog", "a photo of a car"]
    imgs = _images(N, seed=70)
    labels = [i % 3 for i in range(N)]

    class Local(MockZeroShotClassificationTask):
        def load_data(self, num_proc=None, **kwargs) -> None:  # noqa: ANN001
            self.dataset = DatasetDict({"test": Dataset.from_dict({"image": imgs, "label": labels})})
            self.data_loaded = True

        def get_candidate_labels(self) -> list[str]:
            return labels_text

    s, probs = _scores_and_predictions(E5VEncoder("tiny", embedder=embedder), Local(), tmp_path)
    cos = _cos(embedder.encode_image(imgs), embedder.encode_text(labels_text))
    # the probabilities are a softmax of scaled cosines: log-ratios / cosine differences = one constant
    logp = np.log(np.array(probs))
    ratio = (logp[:, 0] - logp[:, 1:].T).T / (cos[:, 0] - cos[:, 1:].T).T
    assert np.ptp(ratio) < 1e-3 * abs(ratio.mean())
    pred = cos.argmax(1)
    ours = float(np.mean(pred == np.array(labels)))
    assert s["accuracy"] == pytest.approx(ours, abs=1e-6)


class _ColourStub:
    """The tiny embedder with hand-made embeddings: an image -> one-hot of its strongest RGB channel, a text ->
    one-hot of the colour word it names. Scores through mteb then have hand-computed values."""

    WORDS = ("red", "green", "blue")

    def __init__(self, inner) -> None:  # noqa: ANN001
        self.inner = inner

    def __getattr__(self, name: str):  # noqa: ANN204
        return getattr(self.inner, name)

    def _hot(self, idx: list[int]) -> np.ndarray:
        out = np.full((len(idx), self.inner.dim), 0.01, dtype=np.float32)
        out[np.arange(len(idx)), idx] = 1.0
        return out

    def encode_image(self, images, **kw):  # noqa: ANN001, ANN201
        return self._hot([int(np.asarray(im.convert("RGB")).reshape(-1, 3).mean(0).argmax()) for im in images])

    def encode_text(self, texts, **kw):  # noqa: ANN001, ANN201
        return self._hot([next(i for i, w in enumerate(self.WORDS) if w in t) for t in texts])


def test_zero_shot_hand_computed_with_colour_embeddings(embedder) -> None:
    """8 solid images (colours known), gold labels right for 5 of them: accuracy must be exactly 5/8."""
    from datasets import Dataset, DatasetDict
    from mteb.mocks.mock_tasks import MockZeroShotClassificationTask
    from PIL import Image

    from e5v.integrations.mteb_encoder import E5VEncoder

    rgb = [(200, 10, 10), (10, 200, 10), (10, 10, 200)]
    colour = [0, 1, 2, 0, 1, 2, 2, 1]  # each image's true colour
    labels = [0, 1, 2, 1, 1, 0, 2, 0]  # rows 3, 5, 7 labelled wrongly
    imgs = [Image.new("RGB", (16 + i, 16), rgb[c]) for i, c in enumerate(colour)]

    class Local(MockZeroShotClassificationTask):
        def load_data(self, num_proc=None, **kwargs) -> None:  # noqa: ANN001
            self.dataset = DatasetDict({"test": Dataset.from_dict({"image": imgs, "label": labels})})
            self.data_loaded = True

        def get_candidate_labels(self) -> list[str]:
            return [f"a photo of something {w}" for w in _ColourStub.WORDS]

    s = _scores(E5VEncoder("tiny", revision="stub", embedder=_ColourStub(embedder)), Local())
    assert s["accuracy"] == pytest.approx(5 / 8, abs=1e-9)


def test_visual_sts_equals_spearman_of_image_cosines(embedder, tmp_path) -> None:
    import datasets
    from datasets import Dataset, DatasetDict
    from mteb.mocks.mock_tasks import MockVisualSTSTask
    from scipy.stats import spearmanr

    from e5v.integrations.mteb_encoder import E5VEncoder

    a, b = _images(N, seed=90), _images(N, seed=110)
    gold = [0.5 * i for i in range(N)]

    class Local(MockVisualSTSTask):
        def load_data(self, num_proc=None, **kwargs) -> None:  # noqa: ANN001
            d = DatasetDict({"test": Dataset.from_dict({"sentence1": a, "sentence2": b, "score": gold})})
            self.dataset = d.cast_column("sentence1", datasets.Image()).cast_column("sentence2", datasets.Image())
            self.data_loaded = True

    s, pred = _scores_and_predictions(E5VEncoder("tiny", embedder=embedder), Local(), tmp_path)
    cos = np.diag(_cos(embedder.encode_image(a), embedder.encode_image(b)))
    np.testing.assert_allclose(pred["cosine_scores"], cos, atol=1e-5)
    assert s["cosine_spearman"] == pytest.approx(spearmanr(cos, gold).statistic, abs=1e-4)


def test_prompt_plan_per_task_type(embedder) -> None:
    from types import SimpleNamespace as NS

    from e5v.integrations.mteb_encoder import E5VEncoder

    enc = E5VEncoder("tiny", embedder=embedder, interleaved_templates={"WebQAT2ITRetrieval": "cirr_gallery"})
    plan = enc.templates_for
    assert plan(NS(name="STS12", type="STS")) == {"text": "sts", "image": "image", "image+text": "cirr_query"}
    assert plan(NS(name="STS13VisualSTS", type="VisualSTS(eng)"))["image"] == "image"
    assert plan(NS(name="CIFAR100ZeroShot", type="ZeroShotClassification"))["text"] == "text"
    assert plan(NS(name="WebQAT2ITRetrieval", type="Any2AnyRetrieval"))["image+text"] == "cirr_gallery"
    assert plan(NS(name="CIRRIT2IRetrieval", type="Any2AnyRetrieval"))["image+text"] == "cirr_query"
    assert "Modify this image" in enc.prompt_plan(NS(name="CIRRIT2IRetrieval", type="Any2AnyRetrieval"))["image+text"]
    assert enc.revision != E5VEncoder("tiny", embedder=embedder).revision  # the override is part of the identity
    with pytest.raises(KeyError, match="no body 'nope'"):
        E5VEncoder("tiny", embedder=embedder, interleaved_template="nope")


def test_blank_caption_with_image_is_an_image_row(embedder) -> None:
    from types import SimpleNamespace as NS

    from e5v.integrations.mteb_encoder import E5VEncoder

    imgs = _images(2, seed=5)
    out = E5VEncoder("tiny", embedder=embedder).encode(
        [{"image": imgs, "text": ["  ", "a red star"]}], task_metadata=NS(name="T", type="Any2AnyRetrieval"),
        hf_split="test", hf_subset="default")
    np.testing.assert_allclose(out[0], embedder.encode_image(imgs[:1])[0], atol=1e-5)
    np.testing.assert_allclose(out[1], embedder.encode_interleaved([(imgs[1], "a red star")])[0], atol=1e-5)


def test_every_mieb_task_type_runs_on_mteb_mocks(embedder) -> None:
    """mteb's own mock tasks, one per MIEB task type (linear probe, clustering, zero-shot, any2any both
    ways, multiple choice, compositionality, VisualSTS): each completes with a score in its range."""
    from mteb.mocks.mock_tasks import classification as c
    from mteb.mocks.mock_tasks import clustering as cl
    from mteb.mocks.mock_tasks import pair_classification as pc
    from mteb.mocks.mock_tasks import retrieval as r
    from mteb.mocks.mock_tasks import sts, zeroshot_classification as z

    from e5v.integrations.mteb_encoder import E5VEncoder

    tasks = [c.MockImageClassificationTask(), cl.MockImageClusteringTask(), z.MockZeroShotClassificationTask(),
             r.MockAny2AnyRetrievalI2TTask(), r.MockAny2AnyRetrievalT2ITask(), r.MockMultiChoiceTask(),
             pc.MockImageTextPairClassificationTask(), sts.MockVisualSTSTask()]
    res = mteb.evaluate(E5VEncoder("tiny", embedder=embedder), tasks, cache=None, show_progress_bar=False)
    got = {tr.task_name: tr.get_score() for tr in res.task_results}
    assert len(got) == len(tasks)
    assert math.isnan(got.pop("MockVisualSTS"))  # its two gold scores are equal (0.5, 0.5): Spearman undefined
    for name, v in got.items():
        assert 0.0 <= v <= 1.0, (name, v)


# ------------------------------------------------------------------------------------------- eval.mieb
class _Counting:
    def __init__(self, inner) -> None:  # noqa: ANN001
        self.inner, self.n = inner, 0

    def __getattr__(self, name: str):  # noqa: ANN204
        return getattr(self.inner, name)

    def encode_image(self, images, **kw):  # noqa: ANN001, ANN201
        self.n += len(images)
        return self.inner.encode_image(images, **kw)

    def encode_text(self, texts, **kw):  # noqa: ANN001, ANN201
        self.n += len(texts)
        return self.inner.encode_text(texts, **kw)


def test_runner_writes_mteb_files_and_table_and_resumes(embedder, tmp_path) -> None:
    from mteb.mocks.mock_tasks import MockAny2AnyRetrievalI2TTask

    from e5v.integrations.mteb_encoder import E5VEncoder
    from eval import mieb

    imgs, caps = _images(N, seed=10), _captions(N)
    gold = list(range(N))
    task = _retrieval_task(MockAny2AnyRetrievalI2TTask, {"image": imgs}, {"text": caps}, gold)
    spy = _Counting(embedder)
    enc = E5VEncoder("tiny", embedder=spy)
    res = mieb.evaluate(enc, [task], tmp_path / "run", benchmark="local", batch_size=4)
    assert spy.n == 2 * N
    ndcg, _ = _rank_metrics(_cos(embedder.encode_image(imgs), embedder.encode_text(caps)), gold)
    row = res["tasks"][0]
    assert row["task"] == "MockAny2AnyRetrievalI2T" and row["main_score"] == "ndcg_at_10"
    assert row["score"] == pytest.approx(100 * ndcg, abs=1e-2)
    assert res["summary"]["mean_task"] == pytest.approx(row["score"], abs=1e-3)
    assert res["summary"]["per_type"] == {"Any2AnyRetrieval": pytest.approx(row["score"], abs=1e-3)}

    on_disk = json.loads((tmp_path / "run" / "results.json").read_text())
    assert on_disk["versions"]["mteb"] == mteb.__version__
    assert on_disk["run"]["mteb_revision"] == enc.revision and enc.revision.startswith("sha256-")
    mteb_file = tmp_path / "run" / "mteb" / "results" / "e5v__tiny" / enc.revision / "MockAny2AnyRetrievalI2T.json"
    assert mteb_file.is_file() and on_disk["mteb_results_dir"] == str(mteb_file.parent)
    assert json.loads(mteb_file.read_text())["scores"]["test"][0]["ndcg_at_10"] == pytest.approx(ndcg, abs=1e-4)
    md = (tmp_path / "run" / "results.md").read_text()
    assert f"| MockAny2AnyRetrievalI2T | Any2AnyRetrieval | ndcg_at_10 | {row['score']:.2f} |" in md
    assert "cirr_query" in md and enc.revision in md

    assert row["published"] is None and row["diff"] is None  # no published number for a local task

    class Broken(MockAny2AnyRetrievalI2TTask):
        metadata = MockAny2AnyRetrievalI2TTask.metadata.model_copy(update={"name": "BrokenI2T"})

        def load_data(self, num_proc=None, **kwargs) -> None:  # noqa: ANN001
            raise RuntimeError("torn parquet file")

    again = mieb.evaluate(enc, [task, Broken()], tmp_path / "run", benchmark="local", batch_size=4)
    assert spy.n == 2 * N  # resumed: the first task's result is read back, nothing re-encoded
    assert again["tasks"][0]["score"] == row["score"]
    assert again["tasks"][1]["score"] is None and again["summary"]["mean_task"] is None
    assert "torn parquet file" in again["failed"][0]["error"]
    assert again["failed"][0]["task"] == "BrokenI2T" and [r["task"] for r in again["tasks"]][1] == "BrokenI2T"
    assert "FAILED BrokenI2T: " in (tmp_path / "run" / "results.md").read_text()


def test_published_column_and_means() -> None:
    from eval import mieb
    from eval.mieb_published import E5V_MIEB_LITE

    rows = [{"task": "CUB200I2IRetrieval", "type": "Any2AnyRetrieval", "score": 40.0},
            {"task": "STS13VisualSTS", "type": "VisualSTS(eng)", "score": 80.0},
            {"task": "STS15VisualSTS", "type": "VisualSTS(eng)", "score": 70.0}]
    mieb.add_published(rows)
    assert E5V_MIEB_LITE["CUB200I2IRetrieval"][0] == 42.87  # hit@1 0.42872 in mteb's results repository
    assert rows[0]["diff"] == pytest.approx(40.0 - 42.87) and rows[0]["published_same_dataset_revision"] is True
    s = mieb.summarise(rows)
    assert s["per_type"] == {"Any2AnyRetrieval": 40.0, "VisualSTS(eng)": 75.0}
    assert s["mean_task"] == pytest.approx(190 / 3, abs=1e-4) and s["mean_type"] == 57.5
    assert s["mean_task_published"] == pytest.approx((42.87 + 78.18 + 84.22) / 3, abs=1e-4)
    assert set(E5V_MIEB_LITE) == {t.metadata.name for t in mieb.resolve_tasks()}  # one number per MIEB(lite) task


def test_missing_datasets_fail_before_the_model_loads(tmp_path, monkeypatch) -> None:
    from eval import mieb
    from eval.loaders import MissingDatasetError

    hub, ds = tmp_path / "hub", tmp_path / "datasets"
    monkeypatch.setattr(mieb, "hub_cache_dir", lambda: hub)
    monkeypatch.setattr(mieb, "datasets_cache_dir", lambda: ds)

    import e5v.integrations.mteb_encoder as me

    def no_load(*a, **k):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("the model must not load before the data check")

    monkeypatch.setattr(me.E5VEncoder, "__init__", no_load)
    tasks = ["CUB200I2IRetrieval", "STS13VisualSTS"]
    with pytest.raises(MissingDatasetError) as err:
        mieb.main(["run", "--model", "tiny", "--tasks", ",".join(tasks), "--out", str(tmp_path / "out")])
    msg = str(err.value)
    assert "2 of 2" in msg and "CUB200I2IRetrieval" in msg and "mteb/cub200_retrieval@ad08c1307b15" in msg
    assert "make data-mieb" in msg and "\n" not in msg

    refs = mieb.dataset_refs(mieb.resolve_tasks(tasks=tasks))
    snap = hub / f"datasets--{refs[0]['repo'].replace('/', '--')}" / "snapshots" / refs[0]["revision"]
    snap.mkdir(parents=True)
    (snap / "README.md").write_text("x")
    arrow = ds / refs[1]["repo"].replace("/", "___") / "default" / "0.0.0" / "abc"
    arrow.mkdir(parents=True)
    (arrow / "data-test.arrow").write_bytes(b"x")
    assert [r["task"] for r in mieb.check_cached(mieb.resolve_tasks(tasks=tasks))] == tasks


def test_mieb_lite_task_list_and_types() -> None:
    """The benchmark `make eval-mieb` runs: 51 tasks in mteb 2.26, every one with a pinned dataset revision."""
    from eval import mieb

    tasks = mieb.resolve_tasks()
    refs = mieb.dataset_refs(tasks)
    assert len(refs) == len(tasks) == 51
    assert all(len(r["revision"]) == 40 for r in refs)
    types = {str(t.metadata.type) for t in tasks}
    assert {"ImageClassification", "ImageClustering", "ZeroShotClassification", "Any2AnyRetrieval",
            "VisionCentricQA", "Compositionality", "VisualSTS(eng)", "DocumentUnderstanding"} <= types


def test_cli_run_builds_the_encoder_from_a_model_name(tiny_dir, tmp_path, monkeypatch) -> None:
    """`python -m eval.mieb run --model tiny ...` (what `make eval-mieb ARGS=...` runs): data check, encoder
    from the model name, mteb files + results table in --out."""
    from mteb.mocks.mock_tasks import MockAny2AnyRetrievalI2TTask

    from eval import mieb

    imgs, caps = _images(4, seed=10), _captions(4)
    task = _retrieval_task(MockAny2AnyRetrievalI2TTask, {"image": imgs}, {"text": caps}, [0, 1, 2, 3])
    seen = {}
    monkeypatch.setattr(mieb, "resolve_tasks", lambda benchmark, names: seen.setdefault("names", names) and [task])
    monkeypatch.setattr(mieb, "cached", lambda repo, rev, *a: seen.setdefault("checked", repo) is not None)
    assert mieb.main(["run", "--model", "tiny", "--device", "cpu", "--tasks", "MockAny2AnyRetrievalI2T",
                      "--batch-size", "2", "--out", str(tmp_path / "o")]) == 0
    assert seen == {"names": ["MockAny2AnyRetrievalI2T"], "checked": "NA"}
    res = json.loads((tmp_path / "o" / "results.json").read_text())
    rev = res["run"]["mteb_revision"]
    assert res["run"]["model"] == "tiny" and rev.startswith("sha256-") and res["run"]["batch_size"] == 2
    assert (tmp_path / "o" / "mteb" / "results" / "e5v__tiny" / rev / "MockAny2AnyRetrievalI2T.json").is_file()
    assert 0.0 <= res["tasks"][0]["score"] <= 100.0


def test_prepare_loads_every_task_and_reports_failures(monkeypatch, capsys) -> None:
    from eval import mieb

    calls = []

    class T:
        def __init__(self, name: str, fail: bool = False) -> None:
            from types import SimpleNamespace

            self.metadata = SimpleNamespace(name=name, tasks=None, dataset={"path": f"org/{name}", "revision": "x"})
            self.fail = fail

        def load_data(self) -> None:
            calls.append(self.metadata.name)
            if self.fail:
                raise ConnectionError("hub unreachable\nmore detail")

        def unload_data(self) -> None:
            calls.append("unload")

    tasks = [T("A"), T("B", fail=True), T("C")]
    rows = mieb.prepare(tasks, log=lambda _: None)
    assert calls == ["A", "unload", "B", "unload", "C", "unload"]  # one at a time: a split never all in memory
    assert [r["status"] for r in rows] == ["ok", "error: ConnectionError: hub unreachable", "ok"]
    monkeypatch.setattr(mieb, "resolve_tasks", lambda benchmark, names: tasks)
    assert mieb.main(["prepare"]) == 1
    assert "2/3 task datasets cached" in capsys.readouterr().out


def test_unknown_task_or_benchmark_is_one_config_error() -> None:
    from e5v.errors import ConfigError
    from eval import mieb

    with pytest.raises(ConfigError, match=r"--tasks CUB200I2IRetrieval,NoSuchTask: .*NoSuchTask"):
        mieb.resolve_tasks(tasks=["CUB200I2IRetrieval", "NoSuchTask"])
    with pytest.raises(ConfigError, match=r"--benchmark MIEB\(nope\)"):
        mieb.resolve_tasks("MIEB(nope)")


def _solid(colours: list[int]) -> list:
    from PIL import Image

    rgb = [(200, 10, 10), (10, 200, 10), (10, 10, 200)]
    return [Image.new("RGB", (16 + i % 5, 16), rgb[c]) for i, c in enumerate(colours)]


def test_linear_probe_and_clustering_hand_computed_with_colour_embeddings(embedder) -> None:
    """Linear probe (MIEB's ImageClassification) and ImageClustering through mteb with embeddings that separate
    the three colours perfectly: the probe predicts each test image's colour, so accuracy = share of test labels
    equal to the colour (4/6 here); k-means recovers the colour partition, so NMI = NMI(labels, colours)."""
    from datasets import Dataset, DatasetDict
    from mteb.mocks.mock_tasks.classification import MockImageClassificationTask
    from mteb.mocks.mock_tasks.clustering import MockImageClusteringTask
    from sklearn.metrics import normalized_mutual_info_score

    from e5v.integrations.mteb_encoder import E5VEncoder

    train_c = [0, 1, 2] * 5
    test_c = [2, 0, 1, 1, 2, 0]
    test_y = [2, 0, 1, 0, 2, 2]  # rows 3 and 5 labelled against their colour

    class Probe(MockImageClassificationTask):
        def load_data(self, num_proc=None, **kwargs) -> None:  # noqa: ANN001
            self.dataset = DatasetDict({
                "train": Dataset.from_dict({"image": _solid(train_c), "label": train_c}),
                "test": Dataset.from_dict({"image": _solid(test_c), "label": test_y})})
            self.data_loaded = True

    # 30 images: on a handful of points mteb's MiniBatchKMeans (one k-means++ init) can merge two colours
    clu_c = [i % 3 for i in range(30)]
    clu_y = [c if i % 7 else (c + 1) % 3 for i, c in enumerate(clu_c)]  # every 7th labelled as the next colour

    class Clusters(MockImageClusteringTask):
        def load_data(self, num_proc=None, **kwargs) -> None:  # noqa: ANN001
            self.dataset = DatasetDict({"test": Dataset.from_dict({"image": _solid(clu_c), "label": clu_y})})
            self.data_loaded = True

    enc = E5VEncoder("tiny", revision="stub", embedder=_ColourStub(embedder))
    assert _scores(enc, Probe())["accuracy"] == pytest.approx(4 / 6, abs=1e-9)
    nmi = _scores(enc, Clusters())["nmi"]
    assert nmi == pytest.approx(normalized_mutual_info_score(clu_y, clu_c), abs=1e-6) and nmi < 0.9



def test_compositionality_winoground_style_hand_computed(embedder) -> None:
    """MIEB's Compositionality (Winoground-style: 2 images x 2 captions per sample, image i belongs to caption i)
    with the colour embeddings: samples 1, 3 and 5 are matched, 2 and 4 swapped -> text, image and group
    accuracy exactly 3/5. (With the random `tiny` weights every image prefers the same caption: all 0.)"""
    from datasets import Dataset, DatasetDict
    from mteb.mocks.mock_tasks.pair_classification import MockImageTextPairClassificationTask

    from e5v.integrations.mteb_encoder import E5VEncoder

    w = _ColourStub.WORDS
    pairs = [(0, 1), (0, 1), (2, 0), (1, 2), (1, 0)]  # the two images' colours per sample
    swapped = [False, True, False, True, False]  # captions given in the wrong order
    im0, im1 = _solid([a for a, _ in pairs]), _solid([b for _, b in pairs])
    c0 = [f"a {w[b if sw else a]} square" for (a, b), sw in zip(pairs, swapped)]
    c1 = [f"a {w[a if sw else b]} square" for (a, b), sw in zip(pairs, swapped)]

    class Wino(MockImageTextPairClassificationTask):
        images_column_names = ["image_0", "image_1"]
        texts_column_names = ["caption_0", "caption_1"]

        def load_data(self, num_proc=None, **kwargs) -> None:  # noqa: ANN001
            self.dataset = DatasetDict({"test": Dataset.from_dict(
                {"image_0": im0, "image_1": im1, "caption_0": c0, "caption_1": c1})})
            self.data_loaded = True

    s = _scores(E5VEncoder("tiny", revision="stub", embedder=_ColourStub(embedder)), Wino())
    assert (s["text_acc"], s["image_acc"], s["accuracy"]) == pytest.approx((0.6, 0.6, 0.6), abs=1e-6)
