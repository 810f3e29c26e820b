"""The subset files of SentEval's STS12-16 test sets (``STS/STS1{2..6}-en-test/STS.input.<subset>.txt``).

One list for both sides of the layering (scripts -> eval -> e5v): the real loader
(:mod:`eval.loaders.senteval`) reads these files and the mini evaluation world
(:mod:`e5v.mini.eval_data`) writes them; ``e5v`` never imports ``eval``, so the list lives here.
"""

from __future__ import annotations

STS_SUBSETS: dict[str, tuple[str, ...]] = {
    "STS12": ("MSRpar", "MSRvid", "SMTeuroparl", "surprise.OnWN", "surprise.SMTnews"),
    "STS13": ("FNWN", "headlines", "OnWN"),
    "STS14": ("deft-forum", "deft-news", "headlines", "images", "OnWN", "tweet-news"),
    "STS15": ("answers-forums", "answers-students", "belief", "headlines", "images"),
    "STS16": ("answer-answer", "headlines", "plagiarism", "postediting", "question-question"),
}
