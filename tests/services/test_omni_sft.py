"""The media-aware warm start of the tiny Omni thinker and ``harpo demo --omni``'s wiring (the
demo itself is not run here: it takes minutes; benchmarks/RESULTS.md has a run)."""

import json

import pytest
import torch

from services.tiny.omni_sft import MediaExample, collate, micro_batches


def _ex(task, prompt, response, media=None):
    return MediaExample(prompt, response, media or {}, task)


def test_micro_batches_group_rows_by_task_and_collate_pads_and_masks_the_prompt():
    image = {"pixel_values": torch.ones((16, 4)), "image_grid_thw": torch.tensor([[1, 4, 4]])}
    batch = [_ex("b", [1, 2], [3]), _ex("a", [4], [5, 6], image), _ex("b", [7, 8, 9], [10]),
             _ex("a", [11, 12], [13], image), _ex("b", [14], [15])]
    groups = micro_batches(batch, 2)
    assert [[ex.prompt[0] for ex in g] for g in groups] == [[4, 11], [1, 7], [14]]
    enc = collate(groups[0], pad_id=0)
    assert enc["input_ids"].tolist() == [[4, 5, 6], [11, 12, 13]]
    assert enc["labels"].tolist() == [[-100, 5, 6], [-100, -100, 13]]  # response tokens only
    assert enc["pixel_values"].shape == (32, 4)  # the two images' patches, one batch
    assert enc["image_grid_thw"].tolist() == [[1, 4, 4], [1, 4, 4]]
    left = collate(groups[1], pad_id=0, left=True)
    assert left["input_ids"].tolist() == [[0, 1, 2, 3], [7, 8, 9, 10]]
    assert left["attention_mask"].tolist() == [[0, 1, 1, 1], [1, 1, 1, 1]]
    with pytest.raises(ValueError, match="same kinds of media"):
        collate([batch[1], batch[0]], pad_id=0)


@pytest.fixture(scope="module")
def omni_train_examples(omni_assets):
    from services.tiny.omni_sft import media_examples

    examples, prompts = media_examples(omni_assets.model_dir, omni_assets.data_dir)
    return examples, prompts


def test_omni_warm_start_trains_on_media_inputs_is_deterministic_and_lowers_the_loss(
        omni_assets, omni_train_examples, tmp_path):
    from safetensors.torch import load_file

    from services.media_inputs import MediaInputs
    from services.model_loading import PROCESSOR_FILES
    from services.tiny.omni_sft import omni_greedy_eval, omni_sft

    examples, prompts = omni_train_examples
    assert len(examples) == len(prompts) == 7 * 6
    # the prompts carry their media's expanded placeholders, as the rollout worker builds them
    image = MediaInputs(omni_assets.model_dir).token_ids["image"]
    colour = next(ex for ex in examples if ex.task == "image_colour")
    assert colour.prompt.count(image) == 4 and "pixel_values" in colour.media
    assert not next(ex for ex in examples if ex.task == "parity").media

    settings = {"steps": 4, "batch_size": 14, "lr": 1e-2, "warmup_steps": 1, "seed": 3,
                "examples": examples}
    first = omni_sft(omni_assets.model_dir, omni_assets.data_dir, tmp_path / "a", **settings)
    again = omni_sft(omni_assets.model_dir, omni_assets.data_dir, tmp_path / "b", **settings)
    assert first["loss_last"] < first["loss_first"] - 0.5
    assert first["loss_first"] == again["loss_first"] and first["loss_last"] == again["loss_last"]
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(
        tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert {p for p in PROCESSOR_FILES if (tmp_path / "a" / p).is_file()} == {
        p for p in PROCESSOR_FILES if (omni_assets.model_dir / p).is_file()}
    other = omni_sft(omni_assets.model_dir, omni_assets.data_dir, tmp_path / "c",
                     **{**settings, "seed": 4, "steps": 1})
    assert other["loss_first"] != first["loss_first"]  # the seed draws other rows

    report = omni_greedy_eval(tmp_path / "a", omni_assets.data_dir, n_per_task=1,
                              max_new_tokens=4)
    assert sorted(report) == sorted(prompts.task_names)
    assert all(r["n"] == 1 and 0 <= r["accuracy"] <= 1 for r in report.values())


def test_saved_omni_warm_start_is_reused_only_with_the_demo_settings(tmp_path):
    from services.demo_omni import SFT_SETTINGS, saved_omni_sft_matches
    from services.tiny.omni_tasks import omni_suite_fingerprint

    (tmp_path / "model.safetensors").write_bytes(b"")
    metrics = {"stopped_early": False, "suite_fingerprint": omni_suite_fingerprint(),
               "settings": {"steps": 80, **SFT_SETTINGS}}
    (tmp_path / "sft_metrics.json").write_text(json.dumps(metrics))
    assert saved_omni_sft_matches(tmp_path, 80)
    assert not saved_omni_sft_matches(tmp_path, 81)
    (tmp_path / "sft_metrics.json").write_text(json.dumps({**metrics, "suite_fingerprint": "x"}))
    assert not saved_omni_sft_matches(tmp_path, 80)


def test_report_gains_a_modality_column_only_when_asked():
    from services.demo import format_report

    before = {m: {k: {"parity": 0.5, "image_colour": 0.25} for k in ("reward", "accuracy")}
              for m in ("greedy", "sampled")}
    types = {"parity": "classification", "image_colour": "classification"}
    text = format_report(before, before, {"parity": 1.0}, types).splitlines()
    # the text demo's table, as `harpo demo` printed it before --omni existed
    assert text[0] == (" " * 29 + "    sampled reward     greedy reward   greedy accuracy  factor")
    assert text[1].split() == ["task", "type", "before", "after", "before", "after", "before",
                               "after", "s_m"]
    assert len(text[1]) == 91 and text[3].startswith("image_colour  classification      0.250")
    omni = format_report(before, before, {"parity": 1.0}, types,
                         {"parity": "text", "image_colour": "text_image"}).splitlines()
    assert omni[1].split()[:3] == ["task", "type", "modality"] and len(omni[1]) == 91 + 12
    assert omni[3].split()[:3] == ["image_colour", "classification", "text_image"]
    assert omni[4].split()[:3] == ["parity", "classification", "text"]
    assert omni[0].index("sampled") == text[0].index("sampled") + 12


def test_demo_omni_flag_routes_to_the_omni_demo_with_its_own_workdir(monkeypatch, tmp_path):
    """The CLI wiring only: ``run_omni_demo`` is replaced by a recorder (the real demo takes
    minutes; its run is in benchmarks/RESULTS.md)."""
    import services.demo_omni as demo_omni
    from services.cli import build_parser, main

    assert build_parser().parse_args(["demo"]).omni is False
    assert build_parser().parse_args(["demo"]).workdir is None  # runs/demo, chosen at run time
    calls = []
    monkeypatch.setattr(demo_omni, "run_omni_demo",
                        lambda workdir, **kw: calls.append((workdir, kw)))
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--omni", "--steps", "3"]) == 0
    assert calls[0][0] == "runs/demo-omni"
    assert calls[0][1]["steps"] == 3 and calls[0][1]["sft_steps"] == demo_omni.SFT_STEPS
    assert calls[0][1]["eval_prompts"] == demo_omni.EVAL_PROMPTS == 50
    assert main(["demo", "--omni", "--eval-prompts", "7"]) == 0
    assert calls[1][1]["eval_prompts"] == 7
    assert demo_omni.omni_demo_config(tmp_path / "m", tmp_path / "d", tmp_path / "r", 2,
                                      eval_prompts=7).data.eval_prompts_per_task == 7
