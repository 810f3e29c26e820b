"""The package works from its built wheel, without the checkout (issue 15, item 3): the Hydra configs ship
inside ``e5v/configs`` (the checkout's top-level ``configs/`` links to them), so a user who ``pip install``s
the wheel can compose any config, e.g. the Mistral prompt, and embed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_top_level_configs_is_the_package_copy() -> None:
    from e5v.config import config_dir

    assert (REPO / "configs").resolve() == config_dir().resolve() == (REPO / "e5v" / "configs").resolve()


def test_built_wheel_embeds_with_the_mistral_prompt_from_outside_the_checkout(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                        str(wheels), str(REPO)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    (wheel,) = wheels.glob("e5v-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "e5v/configs/embed.yaml" in names and "e5v/configs/prompt/e5v_mistral.yaml" in names
    assert "e5v/configs/prompt/bodies/e5v_mistral.yaml" in names and "e5v/configs/backbone/tiny.yaml" in names
    mini = {f"e5v/mini/{m}.py" for m in ("__init__", "world", "eval_data", "mmeb_data", "train_data", "pretrain")}
    assert mini <= set(names), sorted(mini - set(names))  # the mini world ships (the demo and tiny_world need it)

    # a fresh environment: the wheel installed, third-party packages borrowed from this venv's site-packages
    # (a plain path entry: the checkout's editable-install hook there is not run)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "borrowed.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    p = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "-q", str(wheel)],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]

    script = (
        "import e5v, numpy as np\n"
        "from e5v import Embedder\n"
        f"assert {str(REPO)!r} not in e5v.__file__, e5v.__file__\n"
        "emb = Embedder.from_pretrained('tiny', prompt='e5v_mistral', device='cpu')\n"
        "print(repr(emb.prompt.render('text', 'a dog')))\n"
        "v = emb.encode_text(['a dog', 'a cat'])\n"
        "assert v.shape[0] == 2 and np.isfinite(v).all()\n"
        "print('OK', e5v.__file__)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "E5V_CONFIG_DIR")}
    env.update(HF_HUB_OFFLINE="1", E5V_CACHE=str(tmp_path / "cache"))
    p = subprocess.run([str(py), "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "'[INST] a dog\\nSummary above sentence in one word: [/INST]'" in p.stdout, p.stdout
    assert "OK" in p.stdout and str(site) in p.stdout
