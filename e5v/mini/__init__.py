"""The mini world: a generated toy world of coloured shapes, in the real on-disk formats of the real datasets.

Scenes of one to three coloured shapes with captions, deterministic from a seed, become evaluation data
for every benchmark family (Flickr30K, COCO, CIRR, FashionIQ, STS), training data (NLI triplets,
image-caption pairs) and the pretraining data of the ``tiny_world`` backbone. The demo, the test suite
and the mini replication (``make replicate-mini``, docs/replication.md) run on it, offline and on a CPU,
through the same loaders, trainer and benchmarks as the real data.

* :mod:`e5v.mini.world`: the scenes: sampling, captions, rendering, paraphrases, contradictions, NLI
  triplets, STS pairs; training scenes held out from the evaluation ones.
* :mod:`e5v.mini.eval_data`: the evaluation data in each benchmark's real format
  (``python -m e5v.mini.eval_data --out data/mini``; ``suite=mini`` generates it on first use).
* :mod:`e5v.mini.mmeb_data`: MMEB-mini, 13 tasks in MMEB-eval's V1 parquet layout (classification, VQA,
  retrieval, visual grounding) with exact chance levels; part of the evaluation data (``mmeb/``).
* :mod:`e5v.mini.train_data`: the training data in the real formats (SimCSE NLI CSV, LLaVA-Pretrain
  pairs), read back through the real loaders (``data=mini_nli``, ``data=mini_pairs``).
* :mod:`e5v.mini.pretrain`: next-token pretraining of the tiny LLaVA-NeXT on the world, the ``tiny_world``
  backbone's folder (shipped, or built into the cache); the backbone's loader is
  :mod:`e5v.backbones.tiny_world`.
"""
