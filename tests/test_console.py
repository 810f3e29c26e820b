"""e5v.console: a quiet console, everything in the run's log file (make demo, e5v-train, e5v-eval).

The probe runs in a subprocess (the console helper takes over file descriptors 1 and 2 and the root
logger): known third-party noise (DeepSpeed's CPU notice through its own stdout handler, peft's
FutureWarning, a subprocess's compiler output, W&B's summary) lands in the log file and not on the
console; a real warning or error, from us or from a library, still reaches the console; verbose shows all.
The full demo's line count is checked in tests/test_demo.py (slow tier)."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

PROBE = textwrap.dedent(r'''
    import logging, subprocess, sys, warnings
    from e5v import console

    console.setup(sys.argv[1], verbose=sys.argv[2] == "1", level=logging.WARNING)
    # DeepSpeed's logger as deepspeed builds it: its own stdout handler, no propagation
    ds = logging.getLogger("DeepSpeed")
    ds.propagate = False
    ds.addHandler(logging.StreamHandler(sys.stdout))
    console.echo("[1/2] stage one")
    with console.captured("stage one"):
        ds.warning("Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it.")
        warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning)
        print("wandb: Run summary:")
        subprocess.run([sys.executable, "-c", "import sys; print('gcc -O3 -c shm.cpp'); "
                        "print('[2/2] c++ -o shm.so', file=sys.stderr)"], check=True)
        logging.getLogger("compilers.C.base").info("gcc -fPIC -c test.c")
        logging.getLogger("e5v.train").info("training batches: text padded")
        bar = console.progress(total=2, desc="stage bar")
        bar.update(2)
        bar.close()
        # real problems: from us, from a library, a Python warning, DeepSpeed's own error
        logging.getLogger("e5v.data.nli").warning("skipped 3 bad row(s) in bad.csv")
        logging.getLogger("transformers.modeling_utils").warning("Some weights were not initialized: lm_head")
        warnings.warn("a real user-facing problem", UserWarning)
        ds.error("Setting accelerator to CPU failed badly")
    long_msg = "Token indices sequence length is longer than ... will result in indexing errors"
    tok_log = logging.getLogger("transformers.tokenization_utils_base")
    with console.expected_long_inputs():
        tok_log.warning("inside: " + long_msg)
    tok_log.warning("outside: " + long_msg)
    try:
        with console.captured("a failing stage"):
            print("partial output of the failing stage")
            raise RuntimeError("stage failed")
    except RuntimeError:
        pass
    print("after the failure: console again", flush=True)
    console.echo("[2/2] done")
    console.close()
''')

NOISE = ["Setting accelerator to CPU. If", "is_gradient_checkpointing", "wandb: Run summary", "gcc -O3 -c shm.cpp",
         "[2/2] c++ -o shm.so", "gcc -fPIC -c test.c", "inside: Token indices", "partial output of the failing"]
REAL = ["[1/2] stage one", "stage bar", "skipped 3 bad row(s)", "Some weights were not initialized",
        "a real user-facing problem", "Setting accelerator to CPU failed badly", "outside: Token indices",
        "after the failure: console again", "[2/2] done"]


def _probe(tmp_path: Path, verbose: bool) -> tuple[str, str]:
    log = tmp_path / "run" / "demo.log"
    p = subprocess.run([sys.executable, "-c", PROBE, str(log), "1" if verbose else "0"], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout + p.stderr, log.read_text()


def test_quiet_console_keeps_noise_in_the_log_and_shows_real_problems(tmp_path: Path) -> None:
    console, log = _probe(tmp_path, verbose=False)
    for text in NOISE:
        assert text not in console, (text, console)
        assert text in log, (text, log)
    for text in REAL:
        assert text in console, (text, console)
    assert "training batches" not in console and "training batches" in log  # our INFO detail: the log (demo)
    assert "---- output of stage one ----" in log


def test_verbose_shows_everything_and_still_writes_the_log(tmp_path: Path) -> None:
    console, log = _probe(tmp_path, verbose=True)
    for text in NOISE + REAL:
        assert text in console, (text, console)
    for text in ("Setting accelerator to CPU. If", "skipped 3 bad row(s)", "[2/2] done"):
        assert text in log, (text, log)


def test_without_a_session_nothing_changes(capfd) -> None:
    from e5v import console

    assert console.active() is None
    with console.captured("no session"):
        print("still on stdout")
    console.echo("echo prints")
    out = capfd.readouterr().out
    assert "still on stdout" in out and "echo prints" in out


def test_embedder_truncation_keeps_its_warning_and_drops_transformers(embedder, caplog) -> None:
    """transformers' "will result in indexing errors" comes from the Embedder tokenizing the whole prompt
    before it shortens the text itself: only the Embedder's own warning is left."""
    from e5v import Embedder

    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    tok_log = logging.getLogger("transformers.tokenization_utils_base")
    handler = Keep()
    tok_log.addHandler(handler)
    try:
        emb = Embedder(embedder.backbone, embedder.prompt)
        limit = emb.tokenizer.model_max_length
        long = " ".join(["a large red circle next to a small blue square"] * (limit // 8))
        emb.tokenizer.deprecation_warnings.pop("sequence-length-is-longer-than-the-specified-maximum", None)
        with caplog.at_level(logging.WARNING, logger="e5v.embedder"):
            emb.text_prompts([long])
        assert emb.last_truncated == [0] and "had their text shortened" in caplog.text
        assert not any("indexing errors" in m for m in seen), seen
        # the same tokenizer called elsewhere (training does not truncate) still warns
        emb.tokenizer.deprecation_warnings.pop("sequence-length-is-longer-than-the-specified-maximum", None)
        emb.tokenizer(long)
        assert any("indexing errors" in m for m in seen), seen
    finally:
        tok_log.removeHandler(handler)
