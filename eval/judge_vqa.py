"""A visual-question-answering failure judge: a transformers ``image-text-to-text`` model asked each
category's yes/no question about a failure.

The model is ``eval.judge_options.vqa.model``: a hub id, a folder saved with ``save_pretrained``, or
``tiny`` (a random toy Llava, for tests and the offline demo, always reported as ``tiny``). It loads
through ``AutoProcessor`` + ``AutoModelForImageTextToText``, asks in the processor's chat template,
batched with left padding, greedy. Answers are parsed strictly (:func:`parse_yes_no`): the first word
must be yes or no; anything else is unknown, never a pass. Covers horses and quadrupeds too, for which
no offline keypoint model exists.
"""

from __future__ import annotations

import json
import logging
import os
import re
from importlib.metadata import version
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from t2i_curate.eval.judge import Judge
from t2i_curate.pipeline.core.errors import UserError

log = logging.getLogger(__name__)

# Each question asks about a failure, so "yes" means failed (P = 1.0) and "no" passed (P = 0.0).
VQA_QUESTIONS = {
    "human_limbs": "Does any person in this image have malformed hands, extra fingers or missing or extra "
                   "limbs? Answer yes or no.",
    "horses": "Does the horse in this image have malformed, extra or missing legs? Answer yes or no.",
    "quadrupeds": "Does the animal in this image have malformed, extra or missing legs? Answer yes or no.",
}
CONFIG_KEY = "eval.judge_options.vqa.model"
TINY_MARKER = "t2i_curate_tiny"  # set in the config of every tiny model this module builds
HUB_FILES = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.tiktoken"]  # what a load reads

_FIRST_WORD = re.compile(r"[\W_]*(\S*)")  # after leading punctuation/space: up to the next space
_TRAILING_PUNCT = re.compile(r"[\W_]+$")


def parse_yes_no(answer: str | None) -> bool | None:
    """True for yes, False for no, None for anything else. The first word (up to a space) after leading
    whitespace and punctuation, its trailing punctuation stripped, decides, case-insensitively:
    "Yes." and "**No**" parse; "Maybe", "", "yesterday", "yes/no", "Answer: yes" are None."""
    word = _TRAILING_PUNCT.sub("", _FIRST_WORD.match(answer or "").group(1)).lower()
    return True if word == "yes" else False if word == "no" else None


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def _looks_like_folder(model: str) -> bool:
    return model.startswith(("/", ".", "~")) or "\\" in model or model.count("/") != 1


def _check_folder(folder: Path, model: str) -> bool:
    """Refuse a folder that is not an image-text-to-text model with weights; True when it is tiny."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise UserError(f"{CONFIG_KEY}={model!r}: expected a model folder saved with save_pretrained "
                        f"(config.json), but {folder} has no config.json")
    cfg = json.loads(cfg_file.read_text())
    if cfg.get("model_type") not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        raise UserError(f"{CONFIG_KEY}={model!r}: expected an image-text-to-text model (e.g. llava, qwen2_vl, "
                        f"smolvlm); got model_type {cfg.get('model_type')!r}")
    if not weight_files(folder):
        raise UserError(f"{CONFIG_KEY}={model!r}: expected *.safetensors weights in {folder}; found none")
    return bool(cfg.get(TINY_MARKER))


def locate_model(model: str) -> Path | None:
    """The local folder of ``model`` (a folder, or a hub id in the Hugging Face cache), checked. None for
    ``tiny`` and for a hub id to download when the judge runs (online only). Raises a UserError naming
    ``model`` and the config key within seconds when it is not here: a missing folder, or a hub id not in
    the cache while HF_HUB_OFFLINE is set."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    from t2i_curate.pipeline.core.weights import WeightsMissingError

    if model == "tiny":
        return None
    path = Path(model).expanduser()
    if path.exists() or _looks_like_folder(model):
        if not path.is_dir():
            raise WeightsMissingError(f"{CONFIG_KEY}={model!r}: no such model folder; expected a folder saved "
                                      f"with save_pretrained or a hub id (org/name)")
        return path
    try:
        return Path(snapshot_download(model, local_files_only=True, allow_patterns=HUB_FILES))
    except HFValidationError as e:
        raise UserError(f"{CONFIG_KEY}={model!r}: expected a hub id (org/name) or a folder; {e}") from None
    except LocalEntryNotFoundError:
        if not _offline():
            return None
        raise WeightsMissingError(
            f"{CONFIG_KEY}={model!r}: not in the Hugging Face cache and HF_HUB_OFFLINE is set. Download it on a "
            f"machine with internet (huggingface-cli download {model}) or set {CONFIG_KEY} to a local folder"
        ) from None


def weight_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def _tiny_processor():
    """A word-level tokenizer over the questions' words, "yes", "no" and the image token; a 32 px CLIP
    image processor; combined into a LlavaProcessor with a USER/ASSISTANT chat template."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<s>", "</s>", "<image>"]
    words = {w for q in VQA_QUESTIONS.values() for w in re.findall(r"\w+|[^\w\s]", q.lower())}
    words |= {"yes", "no", "maybe", "user", "assistant", ":", "."}
    vocab = {w: i for i, w in enumerate(specials + sorted(words))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                        eos_token="</s>", extra_special_tokens={"image_token": "<image>"})
    template = ("{% for m in messages %}{{ m['role'] | upper }}: {% for c in m['content'] %}"
                "{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %} "
                "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}")
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=8, chat_template=template,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1)


def tiny_vqa_model(seed: int = 0):
    """``(processor, model)``: a randomly initialised LlavaForConditionalGeneration at toy size (a 2-layer
    CLIP vision tower and Llama), seeded, its config marked tiny; diffusers' test-pipeline recipe."""
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    processor = _tiny_processor()
    tok = processor.tokenizer
    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=16)
    text = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                       pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text, vision_feature_layer=-1,
                         image_token_index=tok.convert_tokens_to_ids("<image>"), image_seq_length=16)
    setattr(config, TINY_MARKER, True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config).eval()
    return processor, model


def save_tiny_vqa_model(folder: str | Path, seed: int = 0) -> Path:
    """Write :func:`tiny_vqa_model` to ``folder`` (config marked tiny, safetensors, processor, chat template)
    so that the judge loads it through the Auto classes like any saved model."""
    processor, model = tiny_vqa_model(seed)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return Path(folder)


def _load(folder: Path | None, device: str, dtype):
    """``(processor, model)`` from a local folder (``local_files_only``), or the tiny one for None."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    if folder is None:
        processor, model = tiny_vqa_model()
    else:
        processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
        model = AutoModelForImageTextToText.from_pretrained(folder, local_files_only=True, dtype=dtype)
    model = model.to(device=device, dtype=dtype).eval()
    tokenizer = getattr(processor, "tokenizer", processor)
    tokenizer.padding_side = "left"  # generation continues every prompt from its last token
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return processor, model


def _prompt(processor, question: str) -> str:
    """The question with one image, in the processor's chat template when it has one."""
    if getattr(processor, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    token = getattr(processor, "image_token", None) or "<image>"
    log.warning("vqa judge: the processor has no chat template; asking %r", f"{token}\\n{question}")
    return f"{token}\n{question}"


def _generate(processor, model, images: list, prompt: str, max_new_tokens: int) -> list[str]:
    """Greedy answers of one batch (one image per prompt), decoded without the prompt."""
    import torch

    inputs = processor(images=images, text=[prompt] * len(images), return_tensors="pt", padding=True)
    inputs = {k: v.to(model.device, dtype=model.dtype) if v.is_floating_point() else v.to(model.device)
              for k, v in inputs.items()}
    tokenizer = getattr(processor, "tokenizer", processor)
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                             pad_token_id=tokenizer.pad_token_id)
    if not model.config.is_encoder_decoder:
        out = out[:, inputs["input_ids"].shape[1]:]
    return [a.strip() for a in processor.batch_decode(out, skip_special_tokens=True)]


def _open_rgb(path: Path):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, UnidentifiedImageError) as e:  # counted as unknown, with the reason in the log
        log.warning("vqa judge: cannot read %s (%s); its answer is unknown", path, e)
        return None


class VQAJudge(Judge):
    """A transformers image-text-to-text model answers each category's yes/no question ("does it have
    malformed ...?"); yes = failed, no = passed, anything else = unknown."""

    name = "vqa"
    categories = tuple(VQA_QUESTIONS)
    validated = False
    description = ("a vision-language model (image-text-to-text) asked the category's yes/no question about a "
                   "failure, greedy; an answer whose first word is 'yes' counts as failed, 'no' as passed, "
                   "anything else as unknown")

    class Options(Judge.Options):
        model: str | None = None  # hub id, folder saved with save_pretrained, or "tiny" (random, for tests)
        max_new_tokens: int = Field(16, ge=1, le=512)  # only the first word decides; the rest is kept
        batch_size: int = Field(8, ge=1)
        dtype: Literal["auto", "fp32", "fp16", "bf16"] = "auto"  # auto: fp16 on CUDA, fp32 on CPU
        questions: dict[str, str] = Field(default_factory=dict)  # category -> question; "yes" must mean failed

        @field_validator("questions")
        @classmethod
        def _known_categories(cls, v: dict[str, str]) -> dict[str, str]:
            unknown = sorted(set(v) - set(VQA_QUESTIONS))
            if unknown:
                raise ValueError(f"unknown categories {unknown}; expected some of {', '.join(VQA_QUESTIONS)}")
            if any(not q.strip() for q in v.values()):
                raise ValueError("a question is empty")
            return v

    def __init__(self, bundle=None, labels=None, options=None, device: str = "cpu"):
        super().__init__(bundle, labels, options, device)
        if not self.options.model:
            raise UserError(f"the vqa judge needs a model: set {CONFIG_KEY} to a hub id or a folder of an "
                            f"image-text-to-text model (e.g. llava-hf/llava-onevision-qwen2-0.5b-ov-hf); got none")
        self.questions = {**VQA_QUESTIONS, **self.options.questions}
        self.folder = locate_model(self.options.model)  # None: tiny, or a hub id downloaded when it runs
        self.tiny = self.options.model == "tiny"
        if self.folder is not None:
            self.tiny = _check_folder(self.folder, self.options.model)
        self._loaded = None
        self._answers: list[str | None] = []

    def _dtype(self):
        import torch

        from t2i_curate.pipeline.core.devices import model_dtype

        if self.options.dtype == "auto":
            return model_dtype(torch.device(self.device).type)
        return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[self.options.dtype]

    def _model(self):
        """Load once, on first use (a hub id not yet cached downloads here, online only)."""
        if self._loaded is None:
            if self.folder is None and self.options.model != "tiny":
                from huggingface_hub import snapshot_download

                log.info("vqa judge: downloading %s", self.options.model)
                self.folder = Path(snapshot_download(self.options.model, allow_patterns=HUB_FILES))
                self.tiny = _check_folder(self.folder, self.options.model)
            self._loaded = _load(self.folder, self.device, self._dtype())
        return self._loaded

    def answers(self, paths: list[Path], question: str) -> list[str | None]:
        """The model's raw answer for each image, in batches of ``batch_size``; None for an unreadable image."""
        processor, model = self._model()
        prompt = _prompt(processor, question)
        out: list[str | None] = []
        for i in range(0, len(paths), self.options.batch_size):
            images = [_open_rgb(p) for p in paths[i:i + self.options.batch_size]]
            readable = [im for im in images if im is not None]
            got = iter(_generate(processor, model, readable, prompt, self.options.max_new_tokens) if readable else [])
            out += [next(got) if im is not None else None for im in images]
        return out

    def p_fail(self, category, rows, emb):
        if self.image_dir is None:
            log.warning("vqa judge: no image folder was given; skipped")
            return None
        self._answers = self.answers([Path(self.image_dir) / r["file"] for r in rows], self.questions[category])
        verdicts = [parse_yes_no(a) for a in self._answers]
        return [None if v is None else float(v) for v in verdicts], None

    def observations(self) -> dict[str, list]:
        return {"vqa_answer": list(self._answers)}

    def provenance(self) -> dict:
        """transformers and its version; the model (hub id or folder, ``tiny`` for a tiny one), its class and
        the sha256 of each weight file (``tiny`` for random weights); the questions asked."""
        from t2i_curate.pipeline.core.weights import weight_digest

        arch = type(self._loaded[1]).__name__ if self._loaded else ""
        if self.folder is not None:
            arch = arch or json.loads((self.folder / "config.json").read_text()).get("architectures", [""])[0]
        out = {"library": f"transformers {version('transformers')}", "architecture": arch,
               "questions": dict(self.questions)}
        if self.tiny:
            where = {"folder": str(self.folder)} if self.folder is not None else {}
            return {**out, "model": "tiny", **where, "models": {"random weights": "tiny"}}
        if self.folder is None:
            return {**out, "model": self.options.model, "models": {"not downloaded": "the judge did not run"}}
        return {**out, "model": self.options.model,
                "models": {p.name: weight_digest(p) for p in weight_files(self.folder)}}
