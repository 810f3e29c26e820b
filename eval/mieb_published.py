"""Published MIEB(lite) scores of royokong/e5-v (facts, not code), shown beside ours by ``eval.mieb``.

royokong/e5-v on MIEB(lite) as published in mteb's results repository (github.com/embeddings-
benchmark/results, commit f4cc6c8b365a3c779dbc708d6affe0b0355b2ddf,
results/royokong__e5-v/0c1f22679417b3ae925d779442221c40cd1861ab/<Task>.json): produced by mteb's own
E5-V wrapper (mteb/models/model_implementations/e5_v.py: Llama-3 wrapper, text/image 'in one word'
prompts, '[INST] <image> Modify this image with "{}" Describe modified image in one word: [/INST]'
for every image+text input) under mteb 1.14-1.16. score = mean main_score (x100) over the entries of
the task's eval split in mteb 2.26; same_dataset_revision = the result's dataset revision equals the
one mteb 2.26 pins (mostly not: mteb moved the datasets to its own organisation since).
"""

from __future__ import annotations

MODEL = "royokong/e5-v"
MODEL_REVISION = "0c1f22679417b3ae925d779442221c40cd1861ab"
SOURCE = "https://github.com/embeddings-benchmark/results/tree/f4cc6c8b365a3c779dbc708d6affe0b0355b2ddf/results/royokong__e5-v/0c1f22679417b3ae925d779442221c40cd1861ab"

# task -> (score x100, mteb version of the result, its dataset revision equals the one mteb 2.26 pins)
E5V_MIEB_LITE: dict[str, tuple[float, str, bool]] = {
    "Country211": (10.64, "1.14.15", False),
    "DTD": (72.24, "1.14.15", False),
    "EuroSAT": (87.51, "1.14.15", False),
    "GTSRB": (80.02, "1.14.15", False),
    "OxfordPets": (79.91, "1.14.15", True),
    "PatchCamelyon": (72.39, "1.14.15", False),
    "RESISC45": (89.1, "1.14.15", False),
    "SUN397": (72.64, "1.14.15", False),
    "ImageNetDog15Clustering": (36.73, "1.14.15", False),
    "TinyImageNetClustering": (66.64, "1.14.15", False),
    "CIFAR100ZeroShot": (60.63, "1.14.15", False),
    "Country211ZeroShot": (7.21, "1.14.15", False),
    "FER2013ZeroShot": (58.44, "1.14.15", False),
    "FGVCAircraftZeroShot": (7.8, "1.14.15", False),
    "Food101ZeroShot": (60.69, "1.14.15", False),
    "OxfordPetsZeroShot": (32.6, "1.14.15", True),
    "StanfordCarsZeroShot": (26.08, "1.14.15", True),
    "BLINKIT2IMultiChoice": (71.89, "1.14.15", False),
    "CVBenchCount": (39.21, "1.14.15", False),
    "CVBenchRelation": (59.69, "1.14.15", False),
    "CVBenchDepth": (48.5, "1.14.15", False),
    "CVBenchDistance": (43.83, "1.14.15", False),
    "AROCocoOrder": (41.3, "1.14.15", False),
    "AROFlickrOrder": (36.12, "1.14.15", False),
    "AROVisualAttribution": (74.54, "1.14.15", False),
    "AROVisualRelation": (59.2, "1.14.15", False),
    "Winoground": (11.75, "1.16.5", True),
    "ImageCoDe": (13.21, "1.14.15", False),
    "STS13VisualSTS": (78.18, "1.14.15", False),
    "STS15VisualSTS": (84.22, "1.14.15", False),
    "VisualSTS17Multilingual": (40.52, "1.14.15", True),
    "VisualSTS-b-Multilingual": (51.98, "1.14.15", True),
    "CIRRIT2IRetrieval": (28.33, "1.14.15", False),
    "CUB200I2IRetrieval": (42.87, "1.14.15", True),
    "Fashion200kI2TRetrieval": (2.04, "1.14.15", False),
    "HatefulMemesI2TRetrieval": (62.5, "1.14.15", False),
    "InfoSeekIT2TRetrieval": (6.42, "1.14.15", False),
    "NIGHTSI2IRetrieval": (22.38, "1.14.15", False),
    "OVENIT2TRetrieval": (6.9, "1.14.15", False),
    "RP2kI2IRetrieval": (59.22, "1.14.15", False),
    "VidoreDocVQARetrieval": (34.73, "1.14.15", False),
    "VidoreInfoVQARetrieval": (69.22, "1.14.15", False),
    "VidoreTabfquadRetrieval": (81.37, "1.16.5", False),
    "VidoreTatdqaRetrieval": (29.32, "1.16.5", False),
    "VidoreShiftProjectRetrieval": (42.47, "1.14.15", False),
    "VidoreSyntheticDocQAAIRetrieval": (78.91, "1.16.5", False),
    "VisualNewsI2TRetrieval": (8.4, "1.14.15", False),
    "VQA2IT2TRetrieval": (6.96, "1.14.15", False),
    "WebQAT2ITRetrieval": (49.63, "1.14.15", False),
    "WITT2IRetrieval": (49.96, "1.14.15", True),
    "XM3600T2IRetrieval": (66.59, "1.14.15", False),
}
