"""Sample a diffusers text-to-image pipeline over prompts into PNG files + one parquet row each.

Each image has its own CPU generator seeded from (seed, prompt id, sample
index), so images do not depend on batch size or order. Finished images are
skipped on a rerun; each PNG is written atomically.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

from t2i_curate.pipeline.core.config import EvalConfig
from t2i_curate.pipeline.core.io import atomic_path, write_parquet

log = logging.getLogger(__name__)


def image_seed(seed: int, prompt_id: str, index: int) -> int:
    h = hashlib.sha256(f"{seed}:{prompt_id}:{index}".encode()).digest()
    return int.from_bytes(h[:8], "little") & (2**63 - 1)


def _tiny_tokenizer():
    """A CLIPTokenizer from a character-level vocab written here (no hub)."""
    from transformers import CLIPTokenizer

    d = Path(tempfile.mkdtemp(prefix="tiny-tok-"))
    vocab = {"<|startoftext|>": 0, "!": 1, "<|endoftext|>": 2}
    for c in map(chr, range(33, 127)):
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    (d / "vocab.json").write_text(json.dumps(vocab))
    (d / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(d / "vocab.json"), str(d / "merges.txt"), model_max_length=77)


def tiny_pipeline():
    """A random Stable Diffusion pipeline at toy size (diffusers' own test recipe), seeded."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(4, 8), layers_per_block=1, sample_size=32, in_channels=4, out_channels=4,
        cross_attention_dim=8, norm_num_groups=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))
    vae = AutoencoderKL(
        block_out_channels=(4, 8), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=2,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"))
    text = CLIPTextModel(CLIPTextConfig(
        bos_token_id=0, eos_token_id=2, pad_token_id=1, hidden_size=8, intermediate_size=16,
        num_attention_heads=2, num_hidden_layers=2, vocab_size=256, layer_norm_eps=1e-5))
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text, tokenizer=_tiny_tokenizer(), unet=unet,
        scheduler=DDIMScheduler(clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                                beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
        safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)


def resolve_device_dtype(ecfg: EvalConfig):
    import torch

    from t2i_curate.pipeline.core.devices import model_dtype, pick_device

    device = pick_device(ecfg.device)
    if ecfg.dtype == "auto":
        dtype = model_dtype(device)
    else:
        dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[ecfg.dtype]
    return device, dtype


def load_pipeline(ecfg: EvalConfig):
    """``(pipeline, description)``: the tiny pipeline, or any diffusers text-to-image checkpoint."""
    device, dtype = resolve_device_dtype(ecfg)
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # its progress chatter; ours goes through tqdm
    if ecfg.model == "tiny":
        pipe = tiny_pipeline()
    else:
        from diffusers import AutoPipelineForText2Image

        try:
            pipe = AutoPipelineForText2Image.from_pretrained(ecfg.model, torch_dtype=dtype)
        except OSError as e:
            from t2i_curate.pipeline.core.weights import WeightsMissingError

            raise WeightsMissingError(
                f"eval.model {ecfg.model!r}: cannot load the pipeline ({e}). Give a local folder saved with "
                f"save_pretrained, or a hub id on a machine with internet (unset HF_HUB_OFFLINE)") from None
    if ecfg.scheduler:
        import diffusers

        cls = getattr(diffusers, ecfg.scheduler, None)
        if cls is None:
            from t2i_curate.pipeline.core.errors import UserError

            raise UserError(f"eval.scheduler {ecfg.scheduler!r}: expected a diffusers scheduler class name, "
                            f"e.g. DPMSolverMultistepScheduler")
        pipe.scheduler = cls.from_config(pipe.scheduler.config)
    pipe = pipe.to(device, dtype) if ecfg.model == "tiny" else pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe, device, dtype


def plan_images(prompts: list[dict], ecfg: EvalConfig) -> list[dict[str, Any]]:
    out = []
    for p in prompts:
        for i in range(ecfg.samples_per_prompt):
            out.append({"image_id": f"{p['id']}_{i}", "prompt_id": p["id"], "sample_index": i,
                        "category": p["category"], "prompt": p["prompt"], "seed": image_seed(ecfg.seed, p["id"], i),
                        "occupation": p.get("occupation"), "expected_hands": p.get("expected_hands")})
    return out


_PIPE: dict[str, Any] = {}  # one pipeline per worker process


def _generate(ecfg: EvalConfig, batch: list[dict], images_dir: Path) -> list[dict]:
    """Generate one batch with one generator per image; write PNGs; return metadata rows."""
    import torch

    key = ecfg.model_dump_json()
    if key not in _PIPE:
        _PIPE.clear()
        _PIPE[key] = load_pipeline(ecfg)
    pipe, device, dtype = _PIPE[key]
    gens = [torch.Generator("cpu").manual_seed(r["seed"]) for r in batch]
    t = time.perf_counter()
    out = pipe([r["prompt"] for r in batch], num_inference_steps=ecfg.steps, guidance_scale=ecfg.guidance,
               height=ecfg.height, width=ecfg.width, generator=gens, output_type="pil")
    per = (time.perf_counter() - t) / len(batch)
    rows = []
    for r, img in zip(batch, out.images, strict=True):
        with atomic_path(images_dir / f"{r['image_id']}.png") as tmp:
            img.save(tmp, format="PNG")
        rows.append({**r, "file": f"images/{r['image_id']}.png", "model": ecfg.model,
                     "scheduler": type(pipe.scheduler).__name__, "steps": ecfg.steps, "guidance": ecfg.guidance,
                     "dtype": str(dtype).replace("torch.", ""), "device": device, "height": ecfg.height,
                     "width": ecfg.width, "seconds": per, "tiny_model": ecfg.model == "tiny"})
    return rows


def _sample_chunk(ecfg_json: str, images_dir: str, item: tuple) -> list[dict]:
    """A Ray task: generate one chunk of the plan (item = (index, tuple of plan rows as tuples))."""
    ecfg = EvalConfig.model_validate_json(ecfg_json)
    plan = [dict(r) for r in item[1]]
    rows = []
    for i in range(0, len(plan), ecfg.batch_size):
        rows += _generate(ecfg, plan[i : i + ecfg.batch_size], Path(images_dir))
    return rows


def _made_by(old: dict | None, planned: dict, ecfg: EvalConfig) -> bool:
    """Was the saved image made by the model and settings planned now (model, seed, steps, guidance, size)?"""
    if old is None:
        return False
    want = {"model": ecfg.model, "seed": planned["seed"], "steps": ecfg.steps, "guidance": ecfg.guidance,
            "height": ecfg.height, "width": ecfg.width, "prompt": planned["prompt"]}
    return all(old.get(k) == v for k, v in want.items())


def sample(ecfg: EvalConfig, prompts: list[dict], out_dir: Path, executor: str = "local", workers: int = 1,
           ray_cfg=None) -> Path:
    """Generate every planned image not already on disk; write ``eval_images.parquet``; return it.

    ``executor="ray"`` shards the plan into chunks run as Ray tasks (GPU per task from
    ``ray.gpus_per_worker``); images are identical either way (one seed per image).
    """
    import pyarrow as pa
    from tqdm import tqdm

    images_dir = out_dir / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    plan = plan_images(prompts, ecfg)
    meta_path = out_dir / "eval_images.parquet"
    old = {}
    if meta_path.exists():
        import pyarrow.parquet as pq

        old = {r["image_id"]: r for r in pq.read_table(meta_path).to_pylist()}
    # an image is reused only when it was made by these settings; any other image is made again
    current = {r["image_id"]: r for r in plan if (images_dir / f"{r['image_id']}.png").exists()
               and _made_by(old.get(r["image_id"]), r, ecfg)}
    todo = [r for r in plan if r["image_id"] not in current]
    rows = {k: old[k] for k in current}
    if todo and executor == "ray":
        from functools import partial

        from t2i_curate.pipeline.executors.shards import map_shards

        n_chunks = max(1, min(len(todo), 2 * workers))
        chunks = [(i, tuple(tuple(sorted(r.items())) for r in todo[i::n_chunks])) for i in range(n_chunks)]
        res = map_shards(partial(_sample_chunk, ecfg.model_dump_json(), str(images_dir)), chunks,
                         workers=workers, executor="ray", desc="sample", ray_cfg=ray_cfg,
                         gpus=ray_cfg.gpus_per_worker if ray_cfg is not None else 0.0)
        res.raise_if_failed("sample")
        for chunk_rows in res.results.values():
            rows.update({r["image_id"]: r for r in chunk_rows})
    elif todo:
        with tqdm(total=len(todo), desc="sample", unit="img") as bar:
            for i in range(0, len(todo), ecfg.batch_size):
                for r in _generate(ecfg, todo[i : i + ecfg.batch_size], images_dir):
                    rows[r["image_id"]] = r
                bar.update(min(ecfg.batch_size, len(todo) - i))
                # keep the table current, so a killed run loses at most one batch of metadata
                write_parquet(meta_path, pa.Table.from_pylist([rows[k] for k in sorted(rows)]))
    planned = {r["image_id"] for r in plan}
    write_parquet(meta_path, pa.Table.from_pylist([rows[k] for k in sorted(rows) if k in planned]))
    return meta_path
