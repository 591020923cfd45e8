import pytest

from shared.config import Config, LlmConfig, VadConfig
from shared.errors import ConfigError, ModelNotFound
from shared.models import HUB_DEFAULTS, describe, resolve


def test_auto_finds_the_shipped_packs():
    found = {role: resolve(role) for role in ("vad", "stt", "llm", "tts")}
    assert found["vad"].path.name == "silero_vad.onnx" and found["vad"].format == "onnx"
    assert (found["stt"].path / "model.bin").exists() and found["stt"].format == "ctranslate2"
    assert found["llm"].path.suffix == ".gguf" and found["llm"].format == "gguf"
    piper = found["tts"]  # the offline default: Piper's joe; Kokoro's pack when asked
    assert piper.format == "piper" and piper.extras["config"].name == piper.path.name + ".json"
    kokoro = resolve("tts", "kokoro-int8")
    assert kokoro.format == "onnx" and kokoro.extras["voices"].suffix == ".npz"
    assert describe(piper)["voices"] == ["joe"] and "jm_kumo" in describe(kokoro)["voices"]
    for model in found.values():
        assert model.source.startswith("pack:")
        assert describe(model)["size_mb"] > 1


def test_the_chat_model_runs_as_q8_0_made_once_from_the_shipped_q4_1(tmp_path, monkeypatch):
    """llama.cpp's Q8_0 kernels are faster on x86 than Q4_1's: the shipped Q4_1 file is
    requantized once into moi's cache, and it is the same model: its next-token scores on a
    prompt follow the Q4_1 file's (correlation > 0.99, the same top token)."""
    import numpy as np
    from llama_cpp import Llama

    monkeypatch.setenv("MOI_CACHE", str(tmp_path))
    made = resolve("llm")
    assert made.name.endswith("Q8_0") and made.path.is_relative_to(tmp_path) and made.format == "gguf"
    stamp = made.path.stat().st_mtime_ns
    assert resolve("llm").path == made.path and made.path.stat().st_mtime_ns == stamp  # made once
    assert not list(made.path.parent.glob("*.part"))
    shipped = resolve("llm", "smollm2-135m-q4")
    assert shipped.name.endswith("Q4_1") and shipped.path.stat().st_size < made.path.stat().st_size

    def scores(path):
        llm = Llama(model_path=str(path), n_ctx=256, n_threads=1, logits_all=True, verbose=False)
        tokens = llm.tokenize(b"The capital of France is")
        llm.eval(tokens)
        return np.array(llm.scores[len(tokens) - 1])

    q8, q4 = scores(made.path), scores(shipped.path)
    assert np.corrcoef(q8, q4)[0, 1] > 0.99 and q8.argmax() == q4.argmax()


def test_a_local_path_is_taken_as_is(tmp_path):
    model = resolve("llm", str(resolve("llm").path))
    assert model.source == "path" and model.format == "gguf"
    whisper = resolve("stt", str(resolve("stt").path))
    assert whisper.source == "path" and whisper.format == "ctranslate2"
    # a Piper voice is its .onnx with the .onnx.json beside it, as file or as folder
    for given in (resolve("tts", "piper-joe").path, resolve("tts", "piper-joe").path.parent):
        piper = resolve("tts", str(given))
        assert piper.source == "path" and piper.format == "piper" and piper.extras["config"].exists()


def test_missing_things_name_the_fix(tmp_path):
    with pytest.raises(ModelNotFound, match="does not exist"):
        resolve("stt", str(tmp_path / "nope"))
    with pytest.raises(ModelNotFound, match=r"moi models --download --llm"):
        resolve("llm", "HuggingFaceTB/SmolLM2-1.7B-Instruct")  # not cached, and no network here
    with pytest.raises(ModelNotFound, match="unknown model 'whisper-huge'"):
        resolve("stt", "whisper-huge")
    with pytest.raises(ModelNotFound, match="unknown model role"):
        resolve("music")
    bogus = tmp_path / "weights.bin"
    bogus.write_bytes(b"x")
    with pytest.raises(ModelNotFound, match=".gguf or .onnx"):
        resolve("llm", str(bogus))
    onnx = tmp_path / "kokoro.onnx"
    onnx.write_bytes(b"x")
    with pytest.raises(ModelNotFound, match=r"voices\*\.npz .* kokoro\.onnx\.json"):
        resolve("tts", str(onnx))


def test_hub_ids_stay_the_production_default():
    assert HUB_DEFAULTS["stt"].startswith("Systran/faster-whisper")
    assert HUB_DEFAULTS["llm"].startswith("HuggingFaceTB/SmolLM2")
    assert HUB_DEFAULTS["tts"] == "hexgrad/Kokoro-82M"


def test_config_layers_env_then_overrides():
    cfg = Config.load(env={"MOI_LLM_MAX_TOKENS": "32", "MOI_VAD_THRESHOLD": "0.6", "MOI_STT_LANGUAGE": "none"})
    assert cfg.llm.max_tokens == 32 and cfg.vad.threshold == 0.6 and cfg.stt.language is None
    cfg = Config.load(env={"MOI_LLM_MAX_TOKENS": "32"}, llm__max_tokens=8, tick_ms=20)
    assert cfg.llm.max_tokens == 8 and cfg.tick_ms == 20
    assert Config.load(env={}) == Config() and Config().vad == VadConfig() and Config().llm == LlmConfig()
    assert Config.load(env={"MOI_STT_WORD_TIMESTAMPS": "yes"}).stt.word_timestamps is True


def test_config_errors_are_clear():
    with pytest.raises(ConfigError, match="MOI_LLM_MAX_TOKENS='many' is not a valid int"):
        Config.load(env={"MOI_LLM_MAX_TOKENS": "many"})
    with pytest.raises(ConfigError, match="unknown config option"):
        Config.load(env={}, llm__colour="red")


def test_moi_models_lists_the_voices_and_whole_paths():
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    env = {**os.environ, "COLUMNS": "80"}
    r = subprocess.run([sys.executable, "-m", "local.cli", "models"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "tts voices (--voice, MOI_TTS_VOICE): joe" in r.stdout
    assert "…" not in r.stdout  # nothing cut short at 80 columns
    paths = {line.split(": ", 1)[0]: line.split(": ", 1)[1] for line in r.stdout.splitlines()
             if line.split(": ", 1)[0] in ("vad", "stt", "llm", "tts")}
    assert paths["vad"] == str(resolve("vad").path) and paths["llm"] == str(resolve("llm").path)  # whole
