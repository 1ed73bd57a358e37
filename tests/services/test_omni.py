"""Omni foundations (issue 17): ``harpo init-tiny --omni``, the tiny Qwen2.5-Omni thinker's
forward pass with image, audio and video, the synthetic omni suite, and HBA-format loading
through the run config (``data.format: hba``) with its modality report and bad-media policy."""

import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from harpo_core.media import MediaCache, MediaLimits
from harpo_core.media_check import BadMediaError, row_media
from services.config import ConfigError, parse_config
from services.tiny.omni_tasks import (
    COLOURS,
    DIRECTIONS,
    PITCHES,
    omni_suite_fingerprint,
    write_omni_suite,
)

# omni_assets (harpo init-tiny --omni): session fixture in conftest.py, shared with
# test_omni_e2e.py


def omni_config(data_dir, **data):
    return parse_config({
        "model": {"path": "unused"},
        "data": {"path": str(data_dir), "format": "hba", "video_fps": 4.0, **data},
    })


# --- the tiny model ------------------------------------------------------------------------


def test_tiny_omni_forward_with_text_image_audio_and_video(omni_assets):
    from transformers import (
        AutoFeatureExtractor,
        AutoImageProcessor,
        AutoTokenizer,
        Qwen2_5OmniThinkerForConditionalGeneration,
    )

    from services.omni_inputs import omni_inputs
    from services.tiny.omni_tasks import _image_colour, _video_motion

    d = omni_assets.model_dir
    tokenizer = AutoTokenizer.from_pretrained(d)
    assert (tokenizer.image_token, tokenizer.audio_bos_token) == ("<|IMAGE|>", "<|audio_bos|>")
    images = AutoImageProcessor.from_pretrained(d)
    features = AutoFeatureExtractor.from_pretrained(d)
    assert features.sampling_rate == 16_000 and features.feature_size == 128
    model = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(d).eval()
    assert sum(p.numel() for p in model.parameters()) < 1_000_000

    rng = np.random.default_rng(0)
    image, video = _image_colour(rng).images[0], _video_motion(rng).videos[0]
    tone = np.sin(np.arange(8000) / 16_000 * 2 * np.pi * 440).astype(np.float32)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "audio"},
                                             {"type": "video"},
                                             {"type": "text", "text": "What is shown?"}]}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def last_logits(image, tone, video):
        inputs = omni_inputs(tokenizer, images, features, text, images=[image], audios=[tone],
                             videos=[video], video_fps=4.0)
        with torch.no_grad():
            return inputs, model(**inputs).logits[0, -1]

    inputs, base = last_logits(image, tone, video)
    ids = inputs["input_ids"][0]
    cfg = model.config
    assert (ids == cfg.image_token_id).sum() == inputs["image_grid_thw"].prod() // 4
    assert (ids == cfg.video_token_id).sum() == inputs["video_grid_thw"].prod() // 4
    assert (ids == cfg.audio_token_id).sum() == 12  # 0.5 s -> 50 mel frames -> 12 tokens
    assert torch.isfinite(base).all() and base.shape == (len(tokenizer),)
    # every medium reaches the output: changing any one changes the next-token logits
    for changed in ((255 - image, tone, video), (image, -tone[::-1].copy(), video),
                    (image, tone, video[::-1].copy())):
        assert not torch.allclose(last_logits(*changed)[1], base, atol=1e-6)


def test_processor_loads_where_torchvision_does(omni_assets):
    """``AutoProcessor`` builds ``Qwen2_5OmniProcessor`` only with torchvision (its video
    processor needs it); on this CPU machine it is absent and the error says so."""
    from transformers import AutoProcessor

    try:
        import torchvision  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="Torchvision"):
            AutoProcessor.from_pretrained(omni_assets.model_dir)
    else:
        processor = AutoProcessor.from_pretrained(omni_assets.model_dir)
        assert type(processor).__name__ == "Qwen2_5OmniProcessor"


def test_video_patches_match_the_image_processor_for_a_still_video(omni_assets):
    from transformers import AutoImageProcessor

    from services.omni_inputs import video_patches

    images = AutoImageProcessor.from_pretrained(omni_assets.model_dir)
    frame = np.random.default_rng(1).integers(0, 256, (70, 90, 3), dtype=np.uint8)
    patches, grid = video_patches(np.stack([frame, frame]), images)
    expected = images(images=[frame], return_tensors="np")
    assert grid.tolist() == expected["image_grid_thw"][0].tolist()
    np.testing.assert_allclose(patches, expected["pixel_values"], atol=1e-5)


def test_init_tiny_omni_reuses_a_complete_set_and_refuses_a_foreign_dir(omni_assets, tmp_path):
    from services.tiny.omni_model import init_tiny_omni

    root = omni_assets.model_dir.parent
    stamp = (omni_assets.model_dir / "model.safetensors").stat().st_mtime_ns
    assert init_tiny_omni(root, n_train_per_task=6, n_test_per_task=3).model_dir == \
        omni_assets.model_dir
    assert (omni_assets.model_dir / "model.safetensors").stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="made with other arguments"):
        init_tiny_omni(root, n_train_per_task=7, n_test_per_task=3)
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="is not empty and was not built by init-tiny --omni"):
        init_tiny_omni(tmp_path)


# --- the synthetic suite -------------------------------------------------------------------


def test_omni_suite_is_deterministic(tmp_path):
    tasks = ["image_colour", "audio_pitch", "video_motion", "sentiment"]
    a = write_omni_suite(tmp_path / "a", n_train_per_task=3, n_test_per_task=1, tasks=tasks)
    b = write_omni_suite(tmp_path / "b", n_train_per_task=3, n_test_per_task=1, tasks=tasks)
    assert pq.read_table(a["train"][0]).equals(pq.read_table(b["train"][0]))
    assert omni_suite_fingerprint(tasks=tasks) == omni_suite_fingerprint(tasks=tasks)
    assert omni_suite_fingerprint(seed=1) != omni_suite_fingerprint(seed=0)
    assert len(omni_suite_fingerprint()) == 16


def _read_label(task: str, media: dict) -> str | None:
    """The answer, recovered from the decoded media alone."""
    if task == "image_colour":
        img = media["image"][0].astype(float)
        fg = img[np.abs(img - 128).sum(-1) > 60].mean(0)
        return min(COLOURS, key=lambda c: np.abs(fg - COLOURS[c]).sum())
    if task == "image_shape":
        mask = media["image"][0].mean(-1) > 128
        ys, xs = np.nonzero(mask)
        fill = mask.sum() / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1))
        return "square" if fill > 0.92 else "disc" if fill > 0.65 else "triangle"
    if task == "audio_pitch":
        wave = media["audio"][0]
        peak = np.argmax(np.abs(np.fft.rfft(wave))) * 16_000 / wave.size
        return min(PITCHES, key=lambda p: abs(np.log(PITCHES[p] / peak)))
    if task == "video_motion":
        frames = media["video"][0].mean(-1)
        centres = [np.argwhere(f > 128).mean(0) for f in (frames[0], frames[-1])]
        dy, dx = centres[1] - centres[0]
        return (("right" if dx > 0 else "left") if abs(dx) > abs(dy)
                else ("down" if dy > 0 else "up"))
    return None


def test_omni_suite_answers_are_recoverable_from_the_media(omni_assets):
    from harpo_core.data import DataColumns, load_prompts

    prompts = load_prompts(omni_assets.data_dir, "train", columns=DataColumns.hba(),
                           default_task_type="classification")
    cache = MediaCache(MediaLimits(video_fps=4.0))
    checked = dict.fromkeys(("image_colour", "image_shape", "audio_pitch", "video_motion"), 0)
    for row in range(len(prompts)):
        task = prompts.task_names[prompts.task_codes[row]]
        label = _read_label(task, row_media(prompts, row, cache))
        if label is not None:
            assert label == prompts.answers[row], (task, row)
            checked[task] += 1
    assert checked == dict.fromkeys(checked, 6)
    assert set(DIRECTIONS) >= {a for a, t in zip(prompts.answers, prompts.task_codes)
                               if prompts.task_names[t] == "video_motion"}


# --- HBA through the run config ------------------------------------------------------------


def test_hba_split_reports_tasks_by_modality(omni_assets):
    from services.media_data import format_modality_counts, load_media_split
    from services.prompts import load_split

    split = load_media_split(omni_config(omni_assets.data_dir), "test")
    assert split.modality_counts == {
        "audio_pitch": {"text_audio": 3}, "image_colour": {"text_image": 3},
        "image_shape": {"text_image": 3}, "parity": {"text": 3}, "sentiment": {"text": 3},
        "video_motion": {"text_video": 3}, "weather_qa": {"text": 3}}
    assert split.skipped == dict.fromkeys(split.modality_counts, 0)
    assert split.prompts.task_types[split.prompts.task_names.index("weather_qa")] == "qa"
    table = format_modality_counts(split.modality_counts)
    assert table.splitlines()[0].split() == ["task", "text", "text_audio", "text_image",
                                             "text_video"]
    assert load_split(omni_config(omni_assets.data_dir), "test").prompts == split.prompts.prompts


@pytest.fixture()
def damaged_copy(omni_assets, tmp_path):
    """The omni test split with one image and one video replaced by junk bytes."""
    shutil.copytree(omni_assets.data_dir, tmp_path / "data")
    path = tmp_path / "data" / "test-00000-of-00001.parquet"
    table = pq.read_table(path)
    tasks = table.column("task").to_pylist()
    images, videos = table.column("images").to_pylist(), table.column("videos").to_pylist()
    bad_image, bad_video = tasks.index("image_shape"), tasks.index("video_motion")
    images[bad_image], videos[bad_video] = [b"junk"], [videos[bad_video][0][:200]]
    for name, values in (("images", images), ("videos", videos)):
        table = table.set_column(table.schema.get_field_index(name), name,
                                 pa.array(values, pa.list_(pa.binary())))
    pq.write_table(table, path)
    return tmp_path / "data", bad_image


def test_bad_media_in_a_split_raise_or_are_skipped_and_counted(damaged_copy):
    from services.media_data import load_media_split

    data_dir, bad_image = damaged_copy
    with pytest.raises(BadMediaError, match=rf"test-00000-of-00001.parquet, row {bad_image} "
                                            r"\(task 'image_shape'\): image 0: corrupt"):
        load_media_split(omni_config(data_dir), "test")
    from services.preflight import PreflightError, load_data

    with pytest.raises(PreflightError, match=rf"row {bad_image} \(task 'image_shape'\)"):
        load_data(omni_config(data_dir), "test")  # before Ray starts, as `harpo train` does
    split = load_media_split(omni_config(data_dir, on_bad_media="skip"), "test")
    assert {t: n for t, n in split.skipped.items() if n} == {"image_shape": 1, "video_motion": 1}
    assert split.modality_counts["image_shape"] == {"text_image": 2}


def test_task_types_map_tasks_of_data_without_a_task_type_column(tmp_path):
    from services.media_data import load_media_split

    pq.write_table(pa.table({"problem": ["p", "q"], "answer": ["a", "b"], "task": ["x", "y"],
                             "images": pa.array([[], []], pa.list_(pa.binary()))}),
                   tmp_path / "train-00000-of-00001.parquet")
    split = load_media_split(omni_config(tmp_path, task_types={"x": "qa", "y": "classification"}),
                             "train")
    assert split.prompts.task_types == ("qa", "classification")
    assert split.modality_counts == {"x": {"text": 1}, "y": {"text": 1}}
    with pytest.raises(ValueError, match=r"task_type 'regression' of task 'x' is not allowed"):
        load_media_split(omni_config(tmp_path, task_types={"x": "regression", "y": "qa"}),
                         "train")
    with pytest.raises(ValueError, match=r"default_task_type has no entry for task\(s\) \['y'\]"):
        load_media_split(omni_config(tmp_path, task_types={"x": "qa"}), "train")


@pytest.mark.parametrize("data, message", [
    ({"format": "webdataset"}, r"data.format: Input should be 'columns' or 'hba' \(got "
                               r"'webdataset'\)"),
    ({"on_bad_media": "ignore"}, r"data.on_bad_media: Input should be 'raise' or 'skip'"),
    ({"min_audio_sample_rate": 22_050}, r"data: min_audio_sample_rate \(22050\) must not exceed "
                                        r"audio_sample_rate \(16000\)"),
    ({"video_fps": 0}, r"data.video_fps: Input should be greater than 0"),
    ({"max_video_frames": 0},
     r"data.max_video_frames: Input should be greater than or equal to 1 \(got 0\)"),
    ({"max_audio_seconds": -1}, r"data.max_audio_seconds: Input should be greater than 0"),
    ({"max_video_seconds": 0}, r"data.max_video_seconds: Input should be greater than 0"),
    ({"max_image_pixels": 0},
     r"data.max_image_pixels: Input should be greater than or equal to 1 \(got 0\)"),
    ({"audio_sample_rate": 0},
     r"data.audio_sample_rate: Input should be greater than or equal to 1 \(got 0\)"),
    ({"media_cache_mb": 0},
     r"data.media_cache_mb: Input should be greater than or equal to 1 \(got 0\)"),
    ({"task_types": ["qa"]}, r"data.task_types: Input should be a valid dictionary"),
])
def test_bad_media_fields_are_named(tmp_path, data, message):
    with pytest.raises(ConfigError, match=message):
        omni_config(tmp_path, **data)


def test_tiny_qwen2_vl_forward_with_image_and_video(tmp_path):
    from transformers import AutoImageProcessor, AutoTokenizer, Qwen2VLForConditionalGeneration

    from services.omni_inputs import QWEN2_VL_MEDIA_TOKENS, omni_inputs
    from services.tiny.omni_model import build_tiny_qwen2_vl
    from services.tiny.omni_tasks import _image_colour, _video_motion

    d = build_tiny_qwen2_vl(tmp_path / "vl", texts=["a small corpus", "What is shown?"])
    tokenizer, images = AutoTokenizer.from_pretrained(d), AutoImageProcessor.from_pretrained(d)
    model = Qwen2VLForConditionalGeneration.from_pretrained(d).eval()
    rng = np.random.default_rng(0)
    image, video = _image_colour(rng).images[0], _video_motion(rng).videos[0]
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "video"},
                                      {"type": "text", "text": "What is shown?"}]}],
        tokenize=False, add_generation_prompt=True)
    assert "<|vision_start|><|image_pad|><|vision_end|>" in text

    def last_logits(image, video):
        inputs = omni_inputs(tokenizer, images, None, text, images=[image], videos=[video],
                             video_fps=4.0, tokens=QWEN2_VL_MEDIA_TOKENS,
                             mm_token_type_ids=True)
        inputs.pop("video_second_per_grid")
        with torch.no_grad():
            return model(**inputs).logits[0, -1]

    base = last_logits(image, video)
    assert torch.isfinite(base).all()
    assert not torch.allclose(last_logits(255 - image, video), base, atol=1e-6)
    assert not torch.allclose(last_logits(image, video[::-1].copy()), base, atol=1e-6)

    # the pipeline's path (issue 17 e2e): the same media through MediaInputs, HF generate and
    # the learner's forward (the model's own M-RoPE from mm_token_type_ids): log-probs agree
    from harpo_core.data import PromptSet
    from services.chat import tokenize_prompts
    from services.learner_forward import PolicyLogprobs
    from services.media_inputs import MediaInputs, MediaRows, media_counts, media_prompts
    from services.rollout.backend import SamplingParams
    from services.rollout.hf_backend import HFBackend
    from services.tiny.omni_tasks import encode_mp4, encode_png

    binary = pa.list_(pa.binary())
    prompts = PromptSet(
        prompts=["What is shown?"], answers=["a"], task_codes=[0], task_names=("t",),
        task_types=("classification",), datasets=["d"],
        media=pa.table({"image": pa.array([[encode_png(image)]], binary),
                        "video": pa.array([[encode_mp4(video)]], binary),
                        "source_file": ["x"], "source_row": [0]}))
    rows, media = MediaRows.of(prompts), MediaInputs(d, MediaLimits(video_fps=4.0))
    built = media_prompts(media, rows, [0], tokenize_prompts(tokenizer, prompts.prompts,
                                                             media_counts(prompts)))
    assert "mm_token_type_ids" in built[0].inputs
    gen, seen = HFBackend(str(d)).generate_media(
        built, SamplingParams(n=2, max_new_tokens=4, temperature=1.0, top_p=1.0), seed=0,
        placeholders=tuple(media.token_ids.values()))
    policy, tensors = PolicyLogprobs(model), media.tensors(rows, 0)[0]
    for r in range(2):
        full = torch.tensor([seen[0] + gen.token_ids[r, :gen.lengths[r]].tolist()])
        scored = torch.zeros_like(full)
        scored[0, len(seen[0]):] = 1
        with torch.no_grad():
            logprobs = policy(full, torch.ones_like(full), scored,
                              **media.model_kwargs(full, tensors))[0][0, len(seen[0]):]
        assert (logprobs - torch.from_numpy(gen.logprobs[r, :gen.lengths[r]])).abs().max() < 1e-4
