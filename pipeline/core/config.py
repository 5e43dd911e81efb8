"""Run configuration: one YAML file per run, validated into typed models.

``load_config(path_or_preset, overrides)`` is the only config loader. Unknown
keys and wrong types raise :class:`ConfigError` naming the key and the file.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from t2i_curate.pipeline.core.errors import UserError
from t2i_curate.pipeline.core.io import as_path

PRESET_DIR = Path(__file__).resolve().parents[2] / "configs"


class ConfigError(UserError):
    """A config file or override is invalid; the message names key and file."""


def _identifier(v: str, what: str) -> str:
    """A name that selection writes into the decisions' ``rule`` column: letters, digits, '_', '-', '.'."""
    if not v.replace("_", "").replace("-", "").replace(".", "").isalnum():
        raise ValueError(f"{what} names use letters, digits, '_', '-', '.'; got {v!r}")
    return v


def _identifier_ok(v: str) -> bool:
    return v.isascii() and v.replace("_", "").replace("-", "").replace(".", "").isalnum()


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class InputConfig(_Strict):
    # "demo" means: the built-in procedurally generated demo, served on loopback.
    urls: str = "demo"
    format: Literal["auto", "parquet", "csv", "jsonl", "tsv"] = "auto"
    url_col: str = "URL"
    caption_col: str | None = "TEXT"
    # None: carry every other input column; a list: carry only those.
    extra_columns: list[str] | None = None
    demo_size: int = Field(600, ge=20)
    # urls a folder or glob of parts (pipeline/parts.py): an unreadable part is listed in the funnel
    # instead of stopping the run (not in the fingerprint: it never changes what is downloaded)
    skip_bad_parts: bool = False


class DownloadConfig(_Strict):
    image_size: int = Field(512, ge=8)
    resize_mode: Literal["no", "border", "keep_ratio", "keep_ratio_largest", "center_crop"] = (
        "keep_ratio"
    )
    resize_only_if_bigger: bool = True
    encode_format: Literal["jpg", "png", "webp"] = "jpg"
    encode_quality: int = Field(95, ge=1, le=100)
    samples_per_shard: int = Field(100, ge=1)
    processes: int = Field(2, ge=1)
    threads: int = Field(16, ge=1)
    timeout: float = Field(10.0, gt=0)
    retries: int = Field(0, ge=0)
    distributor: Literal["multiprocessing", "pyspark", "ray"] = "multiprocessing"
    user_agent_token: str | None = None
    # img2dataset's opt-out handling; kept on by default (politeness).
    disallowed_header_directives: list[str] = Field(
        default_factory=lambda: ["noai", "noimageai", "noindex", "noimageindex"]
    )
    min_image_size: int = Field(0, ge=0)
    max_aspect_ratio: float = Field(float("inf"), gt=0)
    # URL safety: only these schemes are fetched (file://, data:, ftp:// ... end `failed`), and
    # hosts that are literal loopback / private / link-local addresses or `localhost` are refused
    # unless allowed. None: allowed only for the built-in demo (input.urls: demo, served on 127.0.0.1),
    # never for a user's URL list, even with the demo preset. Hostnames resolving to private
    # addresses are not checked.
    allowed_schemes: list[str] = Field(default_factory=lambda: ["http", "https"])
    allow_private_addresses: bool | None = None
    # decompression bombs: images whose header declares more pixels are refused before decoding
    # (Pillow's default limit); OpenCV in img2dataset's workers gets it as OPENCV_IO_MAX_IMAGE_PIXELS
    max_image_pixels: int = Field(89_478_485, ge=1)


class ModelsConfig(_Strict):
    # "real": the LAION / OpenAI models of MODELS.md (every preset but the demo).
    # "tiny": toy-sized models with seeded random weights (the offline demo and tests only).
    preset: Literal["tiny", "real"] = "real"
    cache_dir: str | None = None  # default: $CURATE_WEIGHTS or ~/.cache/t2i-curate
    similarity_clip: str = "ViT-B-32/openai"
    aesthetic_clip: str = "ViT-L-14/openai"
    aesthetic_head: Literal["v2", "v1"] = "v2"
    nsfw_clip: str = "ViT-L-14/openai"  # the LAION NSFW detector exists for ViT-L-14 and ViT-B-32
    # text scorer (PP-OCRv4, real with every preset): the longer side, in px, the detector sees
    # (images resized up or down to it; cost grows with its square), and whether to also
    # recognise the text (the `text` column; NULL when off, the default, for speed)
    text_side: int = Field(320, ge=32, le=2048)
    text_recognition: bool = False
    # local files that replace the weight source of a model (name -> path)
    local_weights: dict[str, str] = Field(default_factory=dict)


class ScoreConfig(_Strict):
    # scorer names (filters/*.py, one file each); checked against the scorers before any work
    scorers: list[str] = Field(default_factory=lambda: ["resolution"])
    batch_size: int = Field(32, ge=1)
    # DataLoader processes decoding ahead of the models (per scoring process); 0: in-process
    decode_workers: int = Field(0, ge=0)
    # "exact": full decode, then the reference transforms (LAION's scripts' inputs, to float rounding).
    # "fast": JPEG draft decoding to the smallest scale still >= the largest model input, then the
    # same transforms; faster on large JPEGs, inputs differ slightly (see bench/README.md).
    # "gpu": JPEGs decoded with nvJPEG and resized/cropped/normalised on the CUDA device; other images
    # and other inputs as "exact" (score/gpu_decode.py). Refused without CUDA.
    decode: Literal["exact", "fast", "gpu"] = "exact"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    save_embeddings: bool = True
    models: ModelsConfig = Field(default_factory=ModelsConfig)


class Rule(_Strict):
    """A named keep-predicate in DuckDB SQL over the sample columns."""

    name: str
    keep: str
    description: str = ""

    @field_validator("name")
    @classmethod
    def _identifier(cls, v: str) -> str:
        return _identifier(v, "rule")


class DedupConfig(_Strict):
    """Exact deduplication among the samples every rule keeps (README "Deduplication")."""

    # same normalised URL or same downloaded bytes (sha256): one sample kept, others dropped `duplicate`
    exact: bool = True
    # DuckDB ORDER BY over the sample columns: the first copy is kept (`key` breaks ties). This
    # default falls back to `key` when the run has no aesthetic_score column (no aesthetic scorer).
    keep_order: str = Field("aesthetic_score DESC NULLS LAST, key", min_length=1)
    # near duplicates (filters/dedup.py, filters/semdedup.py), after the rules and exact dedup
    phash: PhashDedupConfig = Field(default_factory=lambda: PhashDedupConfig())
    semantic: SemanticDedupConfig = Field(default_factory=lambda: SemanticDedupConfig())


class PhashDedupConfig(_Strict):
    """Rule `near_duplicate_phash`: pHashes (the phash scorer) at most max_distance bits apart."""

    enabled: bool | Literal["auto"] = "auto"  # auto: on when the run has a phash column
    # 4 of 64 bits: re-encoded / resized copies measure 0-2, unrelated photos ~32 (see filters/dedup.py)
    max_distance: int = Field(4, ge=0, le=16)


class SemanticDedupConfig(_Strict):
    """Rule `semantic_duplicate` (SemDeDup): k-means on the saved CLIP embeddings, then cosine >= threshold
    within each cluster."""

    # off by default: no published LAION subset applied it, and the presets reproduce those. auto: on when
    # the saved embeddings come from a real CLIP (never tiny ones); true with tiny embeddings runs and
    # records `tiny` in the decisions' provenance
    enabled: bool | Literal["auto"] = False
    threshold: float = Field(0.95, gt=0, le=1)  # SemDeDup's 1 - eps
    clusters: int | None = Field(None, ge=1)  # None: ceil(sqrt(candidates))
    iterations: int = Field(10, ge=1)  # k-means passes over the embeddings (stops early when stable)
    seed: int = 0
    chunk_rows: int = Field(16384, ge=1)  # embeddings in memory at once (per chunk / cluster group)


DedupConfig.model_rebuild()


class SelectConfig(_Strict):
    rules: list[Rule] = Field(default_factory=list)
    dedup: DedupConfig = Field(default_factory=DedupConfig)

    @field_validator("rules")
    @classmethod
    def _unique(cls, v: list[Rule]) -> list[Rule]:
        names = [r.name for r in v]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"rule names must be unique; repeated: {sorted(dup)}")
        for reserved in ("duplicate", "near_duplicate_phash", "semantic_duplicate"):
            if reserved in names:
                raise ValueError(f"rule name {reserved!r} is reserved for deduplication (select.dedup)")
        return v


class WriteConfig(_Strict):
    samples_per_shard: int = Field(200, ge=1)
    # aspect buckets (pipeline/buckets.py): None (no bucket columns), a named list ("sdxl", "sd1") or
    # [[width, height], ...]; each written sample gets the bucket nearest its aspect ratio (log-ratio)
    buckets: str | list[tuple[int, int]] | None = None
    # one bucket per curated shard (the manifest names each shard's bucket); needs `buckets`
    group_by_bucket: bool = False

    @field_validator("buckets")
    @classmethod
    def _known_buckets(cls, v):
        if v is not None:
            from t2i_curate.pipeline.core.buckets import resolve_buckets

            resolve_buckets(v)  # a ValueError names the known lists, or the bad entry
        return v

    @model_validator(mode="after")
    def _grouping_needs_buckets(self):
        if self.group_by_bucket and self.buckets is None:
            raise ValueError("write.group_by_bucket needs a bucket list: set write.buckets (e.g. sdxl)")
        return self


class Blocklist(_Strict):
    """A removal list (pipeline/blocklist.py): url / domain lists apply before download, image-hash lists
    (md5, sha256, phash) at select; a listed row ends `dropped` with rule `blocklist:<name>`."""

    name: str
    path: str  # .parquet (one column, or `column`), else text: one entry a line, '#' starts a comment
    kind: Literal["url", "domain", "md5", "sha256", "phash"]
    max_distance: int = Field(0, ge=0, le=63)  # phash only: Hamming distance still counted as a match
    column: str | None = None  # parquet lists with several columns: the one to read
    # the list file's sha256: refused before any work when the file differs. A run folder's config.yaml
    # records it for every list (prepare_run), so a url / domain list edited after download is noticed.
    sha256: str | None = Field(None, pattern="^[0-9a-f]{64}$")

    @field_validator("name")
    @classmethod
    def _identifier(cls, v: str) -> str:
        return _identifier(v, "blocklist")

    @model_validator(mode="after")
    def _distance_for_phash(self):
        if self.max_distance and self.kind != "phash":
            raise ValueError(f"blocklist {self.name!r}: max_distance applies to kind phash only, not {self.kind}")
        return self


class EvalConfig(_Strict):
    # "tiny": a random pipeline built in code (offline, numbers not meaningful);
    # otherwise a diffusers hub id or a local folder.
    model: str = "tiny"
    tag: str | None = None  # folder name under eval/; default derived from model (or the images folder)
    # images made elsewhere (`curate eval --images DIR --prompts FILE`): measured instead of sampling
    images: str | None = None
    prompts: str | None = None  # jsonl or csv: file, prompt, and optionally id, category, occupation
    suites: list[str] = Field(default_factory=lambda: ["people", "horses", "occupations", "general"])
    max_prompts_per_suite: int | None = Field(None, ge=1)
    samples_per_prompt: int = Field(2, ge=1)
    steps: int = Field(25, ge=1)
    guidance: float = Field(7.5, ge=0)
    height: int = Field(512, ge=8)
    width: int = Field(512, ge=8)
    scheduler: str | None = None  # a diffusers scheduler class name, e.g. DPMSolverMultistepScheduler
    batch_size: int = Field(4, ge=1)
    seed: int = 0
    dtype: Literal["auto", "fp32", "fp16", "bf16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # reference set for FID/KID: "run" (this run's curated shards), a folder of images, or a .tar glob
    reference: str = "run"
    max_reference: int = Field(5000, ge=2)
    inception_weights: str | None = None  # torch-fidelity's weights-inception-2015-12-05-6726825d.pth
    # how images reach the FID/KID features (eval/fid.py): "torch-fidelity" (pytorch-fid compatible: no
    # crop, the network's own resize), "clean" (clean-fid), "legacy-crop" (centre crop, as before protocols)
    fid_protocol: Literal["torch-fidelity", "clean", "legacy-crop"] = "torch-fidelity"
    # retired: never had an effect (images reached the network at 299 px already); only false is accepted
    fid_antialias: bool = False
    feature_clip: str = "ViT-L-14/openai"  # CLIP features for FID when no Inception weights
    clip_score_model: str = "ViT-L-14/openai"
    # the CLIPs of CLIP score, FID features and judges: "auto" = tiny only for the tiny pipeline
    models: Literal["auto", "tiny", "real"] = "auto"
    labels: str | None = None  # csv: image_id, category, failed (yes/no)
    # failure judges (eval/judge_*.py, one file each); checked against them when eval starts
    judges: list[str] = Field(default_factory=lambda: ["clip_contrast", "probe", "hands", "pose"])
    # per-judge settings, validated by the judge's own Options (eval/judge_<name>.py), e.g. vqa: {model: ...}
    judge_options: dict[str, dict[str, Any]] = Field(default_factory=dict)
    # faces, hands and people found in every image (MediaPipe; ~40 img/s on one CPU core), for eval_judgements
    census: bool = True
    bias_reference: str | None = None  # csv: occupation, attribute, value, share
    # the curated run the model was trained on (a run folder or a run name under runs_dir): the eval report
    # shows its concept coverage (`curate coverage RUN`, pipeline/coverage.py) next to the failure rates
    training_run: str | None = None

    @field_validator("fid_antialias")
    @classmethod
    def _antialias_retired(cls, v: bool) -> bool:
        if v:
            raise ValueError("eval.fid_antialias is retired (it never changed a score); choose how images are "
                             "resized with eval.fid_protocol: torch-fidelity, clean or legacy-crop")
        return v


class RayConfig(_Strict):
    address: str | None = None  # an existing cluster ("auto", "ray://host:10001"); None starts a local one
    num_cpus: int | None = None  # CPUs of a local instance (None: all)
    gpus_per_worker: float = Field(0.0, ge=0)  # GPUs for each scoring / sampling task; fractions allowed
    # score on a pool of model actors fed by CPU decode tasks (score/ray_actors.py, docs/cluster.md)
    score_actors: bool = False
    # model actors: None = the cluster's GPUs / gpus_per_worker (1 on a cluster without GPUs)
    actors: int | None = Field(None, ge=1)


class RunConfig(_Strict):
    name: str = "demo"  # the run folder's name under runs_dir: a name, never a path (_run_name)
    runs_dir: str = "runs"
    executor: Literal["local", "ray"] = "local"
    workers: int = Field(2, ge=1)
    input: InputConfig = Field(default_factory=InputConfig)
    download: DownloadConfig = Field(default_factory=DownloadConfig)
    score: ScoreConfig = Field(default_factory=ScoreConfig)
    select: SelectConfig = Field(default_factory=SelectConfig)
    write: WriteConfig = Field(default_factory=WriteConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    blocklists: list[Blocklist] = Field(default_factory=list)

    @field_validator("name")
    @classmethod
    def _run_name(cls, v: str) -> str:
        """Letters, digits, '-', '_', '.', not '.' or '..', no separator: the run folder stays in runs_dir."""
        if not v or v in (".", "..") or v.startswith(".") or not _identifier_ok(v):
            raise ValueError(f"a run name uses letters, digits, '-', '_' and '.' (not first), with no path "
                             f"separator; got {v!r}")
        return v

    @field_validator("blocklists")
    @classmethod
    def _unique_lists(cls, v: list[Blocklist]) -> list[Blocklist]:
        names = [b.name for b in v]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"blocklist names must be unique; repeated: {dup}")
        return v

    @property
    def run_dir(self) -> Path:
        """``runs_dir/name``: a local path, or a ``UPath`` when ``runs_dir`` is an fsspec URL (``s3://...``)."""
        return as_path(self.runs_dir) / self.name

    def fingerprint(self) -> str:
        """Hash of the settings that change downloads (not parallelism or paths).

        Scoring, selection, writing and eval settings may change in the same run folder: the
        score stage re-scores a shard whose scorer settings differ, and the later stages redo
        their work, so changing scorers never forces a new download.
        """
        d = self.model_dump(mode="json", include={"input", "download"})
        for k in ("processes", "threads", "distributor"):
            d["download"].pop(k)
        d["input"].pop("skip_bad_parts")  # parts: a folder / glob may grow; pipeline/parts.py checks each part
        if d["download"]["allow_private_addresses"] is None:  # unset: what the URL guard applies
            d["download"]["allow_private_addresses"] = self.input.urls == "demo"
        pre = [b for b in self.blocklists if b.kind in ("url", "domain")]
        if pre:  # lists applied before download, by content (no lists: no key, fingerprints unchanged)
            from t2i_curate.pipeline.core.io import sha256_file

            def digest(b: Blocklist) -> str | None:
                p = Path(b.path).expanduser()
                return b.sha256 or (sha256_file(p) if p.is_file() else None)

            d["blocklists"] = [{**b.model_dump(mode="json", exclude={"path", "max_distance"}), "sha256": digest(b)}
                               for b in pre]
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    # top-level sections a run folder's fingerprint leaves out (listed for the refusal message)
    REDOABLE: ClassVar[tuple[str, ...]] = ("score", "select", "write", "eval", "ray", "workers", "executor", "runs_dir", "name")


def resolve_preset(name_or_path: str) -> Path:
    """A path to an existing file, or a preset name from ``configs/``."""
    p = as_path(name_or_path)  # a local file, or a config on an object store (a run folder's config.yaml)
    if p.is_file():
        return p
    for cand in (PRESET_DIR / name_or_path, PRESET_DIR / f"{name_or_path}.yaml"):
        if cand.is_file():
            return cand
    known = sorted(q.stem for q in PRESET_DIR.glob("*.yaml"))
    raise ConfigError(
        f"config {name_or_path!r}: expected a YAML file or a preset name; "
        f"no such file, and known presets are: {', '.join(known)}"
    )


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config: {e}") from e
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at top level, got {type(data).__name__}")
    return data


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def _load_with_bases(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A preset may say ``base: other-preset`` and override parts of it."""
    if path.resolve() in seen:
        raise ConfigError(f"{path}: 'base' chain loops: {[str(s) for s in seen]}")
    data = _read_yaml(path)
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"{path}: key 'base': expected a preset name, got {base!r}")
    parent = _load_with_bases(resolve_preset(base), seen + (path.resolve(),))
    # A rule list in the child extends the parent's rules, named rules replace.
    child_rules = data.get("select", {}).get("rules") if isinstance(data.get("select"), dict) else None
    merged = _merge(parent, data)
    if child_rules is not None and isinstance(parent.get("select", {}).get("rules"), list):
        rules = {r["name"]: r for r in parent["select"]["rules"] if isinstance(r, dict)}
        for r in child_rules:
            if isinstance(r, dict) and "name" in r:
                rules[r["name"]] = r
        merged["select"]["rules"] = list(rules.values())
    return merged


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` with the value parsed as YAML (so 3, true, [a, b] work)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected dotted.key=value")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {item!r}: empty key segment")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: value is not valid YAML: {e}") from e
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    out = copy.deepcopy(data)
    for item in overrides:
        parts, value = parse_override(item)
        node = out
        for p in parts[:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {item!r}: {p!r} is not a section")
            node = nxt
        node[parts[-1]] = value
    return out


def _format_errors(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(x) for x in e["loc"])
        if e["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key")
        else:
            got = e.get("input")
            got_s = repr(got) if not isinstance(got, dict) else "a mapping"
            lines.append(f"  {key}: {e['msg']} (got {got_s[:80]})")
    return f"{source}: invalid config\n" + "\n".join(lines)


def load_config(path_or_preset: str | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load a YAML config (or preset name), apply dotted overrides, validate."""
    overrides = overrides or []
    if path_or_preset:
        path = resolve_preset(path_or_preset)
        data = _load_with_bases(path)
        source = str(path)
    else:
        data, source = {}, "<defaults>"
    data = apply_overrides(data, overrides)
    if overrides:
        source += f" (with overrides {' '.join(overrides)})"
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, source)) from None


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
