"""Media decoding, the decode cache, HBA media columns and bad media, on real encoded bytes
(Pillow, soundfile and PyAV write every file used here)."""

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from harpo_core.data import DataColumns, load_prompts
from harpo_core.media import MediaCache, MediaError, MediaLimits, decode
from harpo_core.media_check import BadMediaError, row_media, screen_media


def png(rgb=(200, 20, 20), size=(40, 30)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, rgb).save(buf, format="PNG")
    return buf.getvalue()


def tone(rate=16_000, seconds=0.25, freq=440.0, fmt="FLAC") -> bytes:
    import soundfile as sf

    t = np.arange(int(rate * seconds)) / rate
    buf = io.BytesIO()
    sf.write(buf, (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32), rate, format=fmt)
    return buf.getvalue()


def aac_in_mp4(rate=16_000) -> bytes:
    import av

    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as c:
        stream = c.add_stream("aac", rate=rate)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, rate // 4), np.float32), format="fltp",
                                           layout="mono")
        frame.sample_rate = rate
        for packet in [*stream.encode(frame), *stream.encode()]:
            c.mux(packet)
    return buf.getvalue()


def clip(n_frames=8, fps=4, size=32) -> bytes:
    import av

    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as c:
        stream = c.add_stream("mpeg4", rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for k in range(n_frames):
            frame = np.zeros((size, size, 3), np.uint8)
            frame[8:16, 3 * k:3 * k + 8] = 255  # a square moving right
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                c.mux(packet)
        for packet in stream.encode():
            c.mux(packet)
    return buf.getvalue()


# --- decoders ------------------------------------------------------------------------------


def test_image_decodes_to_rgb_and_is_shrunk_to_the_pixel_bound():
    img = decode("image", png(size=(40, 30)))
    assert img.shape == (30, 40, 3) and img.dtype == np.uint8
    assert tuple(img[5, 5]) == (200, 20, 20)
    small = decode("image", png(size=(400, 300)), MediaLimits(max_image_pixels=1200))
    assert small.shape[0] * small.shape[1] <= 1200 and abs(small.shape[1] / small.shape[0]
                                                            - 4 / 3) < 0.1


@pytest.mark.parametrize("data", [b"\x89PNG\r\n\x1a\n" + b"junk" * 20, png()[:60]],
                         ids=["garbage", "truncated"])
def test_corrupt_image_is_a_media_error(data):
    with pytest.raises(MediaError, match=r"corrupt or unreadable image \(\d+ bytes\)"):
        decode("image", data)


def test_audio_is_resampled_to_the_processor_rate_keeping_its_pitch():
    wave = decode("audio", tone(rate=22_050, seconds=0.5, freq=1000.0))
    assert wave.dtype == np.float32 and abs(wave.size - 8000) <= 1
    peak_hz = np.argmax(np.abs(np.fft.rfft(wave))) * 16_000 / wave.size
    assert abs(peak_hz - 1000.0) < 5


def test_audio_below_the_minimum_rate_is_refused():
    with pytest.raises(MediaError, match=r"audio sample rate 4000 Hz is below the minimum 8000 "
                                         r"Hz \(data.min_audio_sample_rate\)"):
        decode("audio", tone(rate=4000))


def test_audio_over_the_length_limit_is_refused():
    with pytest.raises(MediaError, match=r"audio clip of 2.00 s exceeds "
                                         r"data.max_audio_seconds=1.5"):
        decode("audio", tone(seconds=2.0), MediaLimits(max_audio_seconds=1.5))


def test_unsupported_audio_codec_and_corrupt_audio_say_what_soundfile_reads():
    for data in (aac_in_mp4(), tone()[:30]):
        with pytest.raises(MediaError, match=r"corrupt audio or unsupported audio codec .*"
                                             r"soundfile reads WAV, FLAC, OGG"):
            decode("audio", data)


def test_video_frames_are_sampled_at_the_configured_rate_and_bounded():
    data = clip(n_frames=8, fps=4)  # 2 s
    frames = decode("video", data, MediaLimits(video_fps=2.0))
    assert frames.shape == (4, 32, 32, 3)
    xs = [int(np.argmax(f[:, :, 0].mean(axis=0))) for f in frames]
    assert xs == sorted(xs) and xs[-1] > xs[0]  # the motion survives sampling
    assert decode("video", data, MediaLimits(video_fps=4.0, max_video_frames=3)).shape[0] == 3


def test_video_over_the_length_limit_is_refused():
    with pytest.raises(MediaError, match=r"video clip of 2.00 s exceeds "
                                         r"data.max_video_seconds=1.0"):
        decode("video", clip(n_frames=8, fps=4), MediaLimits(max_video_seconds=1.0))


def test_corrupt_or_streamless_video_is_a_media_error():
    data = clip()
    with pytest.raises(MediaError, match="unsupported or unreadable video codec"):
        decode("video", data[: len(data) // 2])
    with pytest.raises(MediaError, match="corrupt or unreadable video"):
        decode("video", b"\x00\x00\x00\x18ftypmp42" + b"\xff" * 64)
    with pytest.raises(MediaError, match=r"video has no video stream \(streams: \['audio'\]\)"):
        decode("video", aac_in_mp4())


# --- cache ---------------------------------------------------------------------------------


def test_cache_decodes_each_content_once_and_evicts_least_recent():
    frame_bytes = 32 * 32 * 3
    cache = MediaCache(MediaLimits(video_fps=4.0), max_bytes=int(9.5 * frame_bytes))
    video = clip(n_frames=8, fps=4)  # 8 frames: 8 * frame_bytes
    first = cache.get("video", video)
    again = cache.get("video", bytes(video))  # equal content, another object
    assert again is first and (cache.hits, cache.misses) == (1, 1)
    assert not first.flags.writeable
    cache.get("image", png(size=(32, 32)))  # 1 frame's worth: fits beside the video
    cache.get("image", png(rgb=(0, 0, 255), size=(32, 32)))  # over the bound: video evicted
    assert len(cache) == 2 and cache.nbytes == 2 * frame_bytes
    cache.get("video", video)
    assert cache.misses == 4
    with pytest.raises(MediaError):
        cache.get("image", b"junk")
    with pytest.raises(MediaError):
        cache.get("image", b"junk")  # the error is cached: no second decode
    assert cache.misses == 5 and cache.hits == 2


# --- HBA media columns ---------------------------------------------------------------------


def hba_rows(task, images=None, audios=None, videos=None, n=None):
    n = n or len(images or audios or videos)
    return {"problem": [f"{task} {i}" for i in range(n)], "answer": ["a"] * n, "task": [task] * n,
            "images": images or [[]] * n, "audios": audios or [[]] * n,
            "videos": videos or [[]] * n}


def write_hba(path, *parts, types=None):
    data = {k: sum((p[k] for p in parts), []) for k in parts[0]}
    schema = pa.schema([(k, (types or {}).get(k, pa.list_(pa.binary())) if k in
                         ("images", "audios", "videos") else pa.string()) for k in data])
    path.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(data, schema=schema), path / "train-00000-of-00001.parquet")


def test_hba_media_stay_in_arrow_with_modality_counts(tmp_path):
    write_hba(tmp_path, hba_rows("pic", images=[[png()], [png(), png()]]),
              hba_rows("talk", audios=[[tone()], []]))
    ps = load_prompts(tmp_path, columns=DataColumns.hba(), default_task_type="classification")
    assert isinstance(ps.media, pa.Table) and ps.media.num_rows == 4
    assert ps.modalities() == ["text_image", "text_image", "text_audio", "text"]
    assert ps.modality_counts() == {"pic": {"text_image": 2},
                                    "talk": {"text": 1, "text_audio": 1}}
    picked = ps.select([2, 1])
    assert picked.media_items(1)["image"] == [png(), png()]
    assert picked.where(0) == "train-00000-of-00001.parquet, row 2"
    assert ps.media_items(3) == {"image": [], "video": [], "audio": []}


def test_media_references_are_read_relative_to_the_data_dir(tmp_path):
    (tmp_path / "media").mkdir()
    (tmp_path / "media" / "a.png").write_bytes(png())
    write_hba(tmp_path, hba_rows("pic", images=[["media/a.png"], ["media/gone.png"]]),
              types={"images": pa.list_(pa.string())})
    ps = load_prompts(tmp_path, columns=DataColumns.hba(), default_task_type="classification")
    cache = MediaCache()
    assert row_media(ps, 0, cache)["image"][0].shape == (30, 40, 3)
    with pytest.raises(BadMediaError, match=r"train-00000-of-00001.parquet, row 1 \(task 'pic'\):"
                                            r" image 0: media file .*gone.png does not exist"):
        row_media(ps, 1, cache)


def test_a_media_column_of_the_wrong_type_is_refused(tmp_path):
    write_hba(tmp_path, hba_rows("pic", images=[[1], [2]]),
              types={"images": pa.list_(pa.int64())})
    with pytest.raises(ValueError, match=r"media column 'images' holds int64 items, expected "
                                         r"bytes \(raw media\) or strings"):
        load_prompts(tmp_path, columns=DataColumns.hba(), default_task_type="classification")


@pytest.fixture()
def bad_media_set(tmp_path):
    write_hba(tmp_path,
              hba_rows("pic", images=[[png()], [b"not an image"], [png()]]),
              hba_rows("tone", audios=[[tone(rate=4000)], [tone()]]),
              hba_rows("clip", videos=[[clip(fps=4, n_frames=8)]]))
    return load_prompts(tmp_path, columns=DataColumns.hba(), default_task_type="classification")


def test_bad_media_raise_names_row_task_and_item(bad_media_set):
    with pytest.raises(BadMediaError, match=r"^train-00000-of-00001.parquet, row 1 \(task 'pic'\)"
                                            r": image 0: corrupt or unreadable image"):
        screen_media(bad_media_set, on_bad_media="raise")


def test_bad_media_skip_drops_and_counts_per_task(bad_media_set):
    screen = screen_media(bad_media_set, MediaLimits(max_video_seconds=1.0),
                          on_bad_media="skip")
    assert screen.skipped == {"clip": 1, "pic": 1, "tone": 1}
    assert screen.prompts.prompts == ["pic 0", "pic 2", "tone 1"]
    assert "data.max_video_seconds=1.0" in screen.first_error["clip"]
    assert "below the minimum 8000 Hz" in screen.first_error["tone"]
    assert screen.decoded_items == 3


def test_on_bad_media_policy_is_checked(bad_media_set):
    with pytest.raises(ValueError, match=r"on_bad_media must be one of \('raise', 'skip'\), "
                                         r"got 'ignore'"):
        screen_media(bad_media_set, on_bad_media="ignore")


def test_bytes_and_references_do_not_mix_across_files(tmp_path):
    def shard(name, images, item_type):
        pq.write_table(pa.table({"problem": ["p"] * len(images), "answer": ["a"] * len(images),
                                 "task": ["pic"] * len(images),
                                 "images": pa.array(images, pa.list_(item_type))}),
                       tmp_path / name)

    shard("train-00000-of-00003.parquet", [[png()]], pa.binary())
    shard("train-00001-of-00003.parquet", [[]], pa.string())  # no media: takes bytes
    load = lambda: load_prompts(tmp_path, columns=DataColumns.hba(),  # noqa: E731
                                default_task_type="classification")
    shard("train-00002-of-00003.parquet", [[]], pa.binary())
    assert load().media.column("image").type == pa.list_(pa.binary())
    shard("train-00002-of-00003.parquet", [["a.png"]], pa.string())
    with pytest.raises(ValueError, match=r"media column for images in .* holds raw bytes in some "
                                         r"files and path references in others"):
        load()
