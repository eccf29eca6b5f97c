"""Typed configuration, one model per stage, flowing from the Prefect form down to the loops.

Every model is a pydantic ``BaseModel``: Prefect renders it as the UI form, the flow validates it
at its edge, the DDP worker receives it as JSON and every checkpoint and MLflow run records it.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.json_schema import JsonDict

from visionpipe.models import HEAD, check_backbone

CompileMode = Literal["default", "reduce-overhead", "max-autotune-no-cudagraphs"]


class _Config(BaseModel):
    # Unknown keys are a typo in a form or a JSON file: refuse them instead of ignoring them.
    model_config = ConfigDict(extra="forbid")


class DataConfig(_Config):
    """What to ingest and how to split it."""

    source: str = Field(
        "digits",
        description="'digits' (bundled, offline), 'cifar10' (downloaded), an ImageFolder "
        "directory, or an ImageFolder under s3://bucket/prefix.",
    )
    name: str | None = Field(None, description="Dataset name; derived from the source if empty.")
    image_size: int = Field(
        32, ge=8, le=1024,
        # Digits are 8x8; 32 is the smallest size at which ResNet's 32x downsampling still
        # leaves a 1x1 map for the pooling layer.
        description="Side of the square image the models see.",
    )
    seed: int = Field(0, description="Seed of the stratified split.")
    val_fraction: float = Field(0.15, gt=0, lt=0.5)
    test_fraction: float = Field(0.2, gt=0, lt=0.5)
    min_per_class: int = Field(
        5, ge=3, description="Each class needs one image per split at least; refuse fewer."
    )
    max_per_class: int | None = Field(
        None, ge=3, description="Keep at most this many images per class (quick runs, tests)."
    )
    recipe: Literal["auto", "small", "photo"] = Field(
        "auto", description="'small': images stretched to image_size squares, pad-4 crops and "
        "flips (digits, CIFAR); 'photo': ImageNet's RandomResizedCrop for training, short side "
        "resized to resize_size and a center crop for evaluation and serving; 'auto': photo when "
        "the median short side of the images is at least 2 x image_size.")
    resize_size: int | None = Field(
        None, ge=8, le=4096, description="Photo recipe: the short side evaluation and serving "
        "resize to before the center crop. Empty: round(image_size / 0.875), 256 for 224.")
    prepared_copy: bool | None = Field(
        None, description="Photo recipe: keep the training images resized once (short side "
        "prepared_short_side, JPEG quality 90) in one memory-mapped file per dataset version, "
        "read by every epoch and run. Empty: when the originals hold at least twice its pixels.")
    prepared_short_side: int | None = Field(
        None, ge=8, le=4096, description="Short side of the prepared copy's images (a cap: "
        "smaller originals keep their size). Empty: resize_size.")

    @property
    def eval_resize_size(self) -> int:
        """The photo recipe's evaluation short side: ``resize_size``, or image_size / 0.875."""
        return self.resize_size or round(self.image_size / 0.875)

    @property
    def dataset_name(self) -> str:
        if self.name:
            return self.name
        src = self.source.rstrip("/")
        return src.rsplit("/", 1)[-1] or "dataset"


class WeightsConfig(_Config):
    """Where the pretrained backbone weights come from."""

    uri: str = Field(
        "torchvision:resnet50.IMAGENET1K_V2",
        # In backticks: the Prefect UI renders descriptions as markdown, where a bare <arch>
        # is an HTML tag and vanishes from the form.
        description="`torchvision:<arch>.<WEIGHTS>`, `https://...`, `s3://...`, `file://...` "
        "or `models:/<name>@<alias>`.",
    )
    sha256: str | None = Field(
        None, description="Expected full sha256; torchvision's file-name prefix is checked if empty."
    )
    on_unavailable: Literal["fail", "random-init"] = Field(
        "fail", description="What to do when no source answers: fail, or train from random init."
    )
    attempts: int = Field(4, ge=1, le=10, description="Download attempts on network errors.")
    timeout_s: float = Field(30.0, gt=0)

    @field_validator("sha256")
    @classmethod
    def _hex_digest(cls, value: str | None) -> str | None:
        return full_sha256(value)


def full_sha256(value: str | None) -> str | None:
    """``value`` as a lower-case full sha256 (None when empty); an error for anything else."""
    if value is None or value == "":
        return None
    value = value.lower()
    if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
        raise ValueError("sha256 must be 64 hex digits (the full digest, not a prefix)")
    return value


def weights_arch_mismatch(uri: str, arch: str) -> str | None:
    """What is wrong when ``uri`` names torchvision weights of another architecture than ``arch``.

    Checked by the form (``PipelineConfig``) and again by ``fetch_weights`` before a download;
    other URIs carry no architecture in their name, so ``check_state_dict_keys`` checks them.
    """
    if not uri.startswith("torchvision:"):
        return None
    weights_arch = uri.split(":", 1)[1].split(".", 1)[0]
    if weights_arch == arch:
        return None
    return (f"weights {uri!r} are for {weights_arch} but finetune.arch is {arch!r}. Fix: use "
            f"torchvision:{arch}.<WEIGHTS> or set finetune.arch to {weights_arch!r}.")


class PhotoAugmentConfig(_Config):
    """Training augmentation of the photo recipe: torchvision's references/classification options."""

    scale: tuple[float, float] = Field(
        (0.08, 1.0), description="RandomResizedCrop: the crop's share of the image's area.")
    ratio: tuple[float, float] = Field(
        (3 / 4, 4 / 3), description="RandomResizedCrop: the crop's aspect ratio range.")
    hflip: float = Field(0.5, ge=0, le=1, description="Probability of a horizontal flip.")
    trivial_augment: bool = Field(False, description="TrivialAugmentWide on each image.")
    random_erasing: float = Field(0.0, ge=0, le=1, description="Probability of RandomErasing.")
    mixup_alpha: float = Field(0.0, ge=0, description="MixUp's Beta(alpha, alpha); 0 is off.")
    cutmix_alpha: float = Field(0.0, ge=0, description="CutMix's Beta(alpha, alpha); 0 is off.")

    @field_validator("scale", "ratio")
    @classmethod
    def _ordered(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not 0 < value[0] <= value[1]:
            raise ValueError(f"expected 0 < low <= high, got {value}; e.g. (0.08, 1.0)")
        return value


class Phase(_Config):
    """One fine-tuning phase: which modules train, for how long, at what learning rate."""

    name: str
    trainable: list[str] = Field(
        description="Module name prefixes that train; '@head' is the new classifier whatever "
        "the model calls it (fc, classifier.1, heads.head...); ['*'] unfreezes everything."
    )
    epochs: int = Field(gt=0)
    lr: float = Field(gt=0, description="Learning rate of the head (modules named by head_modules).")
    backbone_lr_fraction: float = Field(
        0.1, gt=0, le=1, description="Backbone learning rate as a fraction of lr."
    )
    warmup_epochs: float = Field(0.0, ge=0)


def _default_phases() -> list[Phase]:
    # AdamW rates. The head phase is cheap (cached features); the full phase gives the backbone
    # half the head's rate: enough to adapt ImageNet features to small grey digits, or to train
    # a randomly initialised backbone when no weights were reachable (then the head phase is skipped).
    return [
        Phase(name="head", trainable=[HEAD], epochs=2, lr=2e-3),
        Phase(name="full", trainable=["*"], epochs=4, lr=2e-3, backbone_lr_fraction=0.5,
              warmup_epochs=0.5),
    ]


class OptimConfig(_Config):
    """Optimizer and loss settings shared by both candidates."""

    optimizer: Literal["sgd", "adamw"] = "sgd"
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(1e-4, ge=0)
    label_smoothing: float = Field(0.0, ge=0, lt=1)


class FastPathConfig(_Config):
    """Speed switches. Empty means: on when the run has a CUDA device, off on the CPU, except
    ``channels_last``, which is faster on both (docs/benchmarks.md)."""

    autocast_bf16: bool | None = Field(None, description="bf16 autocast for forward and loss.")
    channels_last: bool | None = Field(
        None, description="NHWC memory format for convolutions. Empty: on, on the CPU too, where "
        "oneDNN's convolutions measured faster with it at the default batches; at small batches "
        "ResNet-50 can be slower, so set false there (figures: docs/benchmarks.md).")
    cudnn_benchmark: bool | None = Field(None, description="Let cuDNN pick the fastest kernels.")
    data_on_device: bool | None = Field(
        None, description="Keep small datasets on the GPU as uint8; augment and normalise there."
    )
    compile: bool | None = Field(
        None, description="torch.compile the training step. Empty: the fine-tune compiles on a "
        "GPU when it trains at least compile_min_images images (epochs x training images), "
        "a run long enough for the compile time to pay for itself; GoogLeNet under DDP "
        "compiles only when this is true (figures: docs/benchmarks.md).",
    )
    compile_min_images: int = Field(
        1_000_000, ge=0, description="The fine-tune's run length (images) from which an empty "
        "'compile' compiles; set above the break-even measured for ResNet-50 on a GPU "
        "(docs/benchmarks.md).")
    compile_mode: CompileMode | None = Field(
        None, description="torch.compile's mode. Empty: 'reduce-overhead' (CUDA graphs) for "
        "the single-process fine-tune, where it measured fastest, most of all on small images, "
        "whose steps are too short for the host to keep the GPU busy; 'default' under DDP and "
        "with gradient accumulation, whose buffers CUDA graph replays would overwrite. "
        "'max-autotune-no-cudagraphs' searches kernels for minutes longer "
        "(figures: docs/benchmarks.md).")
    static_graph: bool | None = Field(
        None, description="DDP static_graph: valid because every step uses the same parameters."
    )
    streaming: bool | None = Field(
        None, description="Read the images batch by batch (DataLoader workers, pinned memory, "
        "persistent workers) instead of holding each split in memory. Empty: when the training "
        "split's decoded images exceed memory_limit_gb.")
    memory_limit_gb: float = Field(
        4.0, gt=0, description="Largest training split (as uint8 pixels) held in memory.")
    num_workers: int | None = Field(
        None, ge=0, description="Decoding workers of the streaming path; empty: the cores, "
        "at most 8, less one.")
    decode_on_device: bool = Field(
        False, description="Streaming: the workers only read the JPEGs and the GPU decodes them "
        "(torchvision.io.decode_jpeg on CUDA), for when the CPU cannot decode fast enough. Their "
        "pixels differ slightly from the CPU decoder's; other files are decoded as in memory.")


class LaunchConfig(_Config):
    """How torchrun starts the DDP worker; multi-node is configuration, not a rewrite.

    With ``nnodes`` above 1 (or a range ``min:max`` whose max is above 1) the GoogLeNet task
    starts one flow run of ``node_deployment`` per node; each launches torchrun with a c10d
    rendezvous at ``rdzv_endpoint``, which node 0 hosts.
    """

    nproc_per_node: int | None = Field(
        None, ge=1, description="Processes per node. Empty: the visible GPUs; without GPUs, 2 "
        "for GoogLeNet, 1 (a plain process, no torchrun) for the fine-tune and the style network."
    )
    nnodes: str = Field("1", description="Node count or elastic range 'min:max'.")
    backend: Literal["auto", "nccl", "gloo"] = Field(
        "auto", description="Process group backend: NCCL when GPUs are visible, else gloo.")
    rdzv_backend: Literal["c10d"] = "c10d"
    rdzv_endpoint: str = Field(
        "127.0.0.1:0",
        description="host:port of the rendezvous; port 0 picks a free port (one node only). "
        "Several nodes need a fixed port on node 0's host; '{rdzv_id}' is replaced by the "
        "rendezvous id, e.g. 'vp-{rdzv_id}-0.visionpipe-ddp.visionpipe.svc:29400' for the "
        "Kubernetes headless service.",
    )
    rdzv_id: str | None = Field(
        None, description="Base of the multi-node rendezvous id; the task run's id and the "
        "attempt number always follow it, so neither a retry nor a later run meets another's "
        "world.")
    rdzv_timeout_s: float = Field(
        300.0, gt=0, description="How long nodes wait for each other: the pre-flight wait for "
        "the endpoint and for node 0's token, and torchrun's rendezvous join timeout.")
    max_restarts: int = Field(0, ge=0)
    timeout_s: float = Field(1800.0, gt=0, description="The task kills the launch after this.")
    node_deployment: str = Field(
        "ddp-node/ddp-node", description="The deployment whose flow runs are the nodes.")
    node_job_variables: dict[str, Any] = Field(
        default_factory=dict,
        description="Job variables of each node run; '{rdzv_id}' and '{node_index}' in string "
        "values are replaced, e.g. {'rdzv_hostname': 'vp-{rdzv_id}-{node_index}'} on Kubernetes.",
    )
    shared_dir: str | None = Field(
        None, description="Checkpoint root that every node reaches: a mounted volume or an "
        "s3:// prefix. Empty: the state folder, which only nodes on one host share.")

    @field_validator("nnodes")
    @classmethod
    def _nnodes(cls, value: str) -> str:
        parts = value.split(":")
        if len(parts) > 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise ValueError("nnodes must be a positive count or a 'min:max' range, e.g. '2:4'")
        if int(parts[0]) > int(parts[-1]):
            raise ValueError(f"nnodes range {value!r} has min above max; write 'min:max', e.g. '2:4'")
        return value

    @property
    def node_range(self) -> tuple[int, int]:
        """(min, max) nodes; a plain count is both."""
        parts = [int(p) for p in self.nnodes.split(":")]
        return parts[0], parts[-1]

    @property
    def multinode(self) -> bool:
        return self.node_range[1] > 1

    @model_validator(mode="after")
    def _fixed_port_for_nodes(self) -> LaunchConfig:
        if self.multinode:
            host, sep, port = self.rdzv_endpoint.rpartition(":")
            if not sep or not host or not port.isdigit() or int(port) == 0:
                raise ValueError(
                    f"rdzv_endpoint {self.rdzv_endpoint!r} with nnodes {self.nnodes!r}: every node "
                    "must reach the rendezvous at one fixed host:port on node 0's host, "
                    "e.g. '10.0.0.5:29400'")
        return self


def _one_node(launch: LaunchConfig) -> LaunchConfig:
    if launch.multinode:
        raise ValueError(
            f"nnodes {launch.nnodes!r}: this stage runs on one node (all the GPUs of one "
            "worker); set nnodes to '1'. Training across nodes is googlenet.launch's")
    return launch


# The launch of a stage that trains on the GPUs of one worker (the fine-tune, the style
# network): its ranks share that host's checkpoint folder.
OneNodeLaunch = Annotated[LaunchConfig, AfterValidator(_one_node)]


def _long_launch() -> LaunchConfig:
    # A whole fine-tune or style training runs in one launch: not GoogLeNet's 30 minutes.
    return LaunchConfig(timeout_s=24 * 3600.0)


class FinetuneConfig(_Config):
    """Transfer learning of a torchvision backbone with a new head."""

    arch: str = Field(
        "resnet50", description="Any torchvision classification model by name "
        "(torchvision.models.list_models()), e.g. resnet50, efficientnet_b0, convnext_tiny, "
        "vit_b_16; its classifier (fc, classifier or heads) is replaced by the new head.",
        examples=["resnet50", "resnet18", "efficientnet_b0", "convnext_tiny", "vit_b_16"])
    phases: list[Phase] = Field(default_factory=_default_phases)
    batch_size: int = Field(64, gt=0)
    optim: OptimConfig = Field(
        default_factory=lambda: OptimConfig(optimizer="adamw", weight_decay=0.01)
    )
    augment: bool = Field(False, description="Random crops of training images.")
    photo: PhotoAugmentConfig = Field(default_factory=PhotoAugmentConfig, description="Photo recipe's training augmentation.")
    cache_frozen_features: bool = Field(
        True, description="In a head-only phase without augmentation, compute the frozen "
        "backbone's features once instead of every epoch (same head, a fraction of the time).",
    )
    grad_accumulation: int = Field(
        1, ge=1, description="Batches per optimizer step (set to 2 after an out-of-memory retry)."
    )
    early_stopping_patience: int = Field(
        3, ge=1, description="Stop a phase after this many epochs without a better val score, "
        "counted in the second half of the phase only: in the first, its rate is high and "
        "from scratch its val score is still noise."
    )
    scratch_min_steps: int = Field(
        0, ge=0, description="From random init (no weights reachable), a phase that trains "
        "everything runs at least this many optimizer steps, its epochs raised up to 5x: a "
        "random backbone needs hundreds of steps where a pretrained one adapts in tens, and a "
        "small folder's epoch is a handful. 0 (the default): the phase's own epochs; 150 "
        "measured no clear gain for 3.4x the time (docs/photo-accuracy.md).",
    )
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    fast: FastPathConfig = Field(default_factory=FastPathConfig)
    launch: OneNodeLaunch = Field(
        default_factory=_long_launch,
        description="How many processes fine-tune: empty nproc_per_node is one per visible GPU "
        "(on a CPU-only host, one plain process: no torchrun). Two or more start the fine-tune "
        "worker with torchrun, as GoogLeNet's; the gloo backend runs them on the CPU. One node "
        "only: its ranks share this host's checkpoint folder. The global batch is batch_size x "
        "processes and the phases' rates are used as given (not scaled with it).")

    @field_validator("arch")
    @classmethod
    def _known_backbone(cls, arch: str) -> str:
        check_backbone(arch)
        return arch

    @field_validator("phases")
    @classmethod
    def _phases_named_once(cls, phases: list[Phase]) -> list[Phase]:
        if not phases:
            raise ValueError("at least one phase is needed, e.g. head then full")
        names = [p.name for p in phases]
        if len(set(names)) != len(names):
            raise ValueError(f"phase names must be unique, got {names}")
        return phases


class GoogLeNetConfig(_Config):
    """GoogLeNet (Inception v1) from scratch, trained with DistributedDataParallel."""

    enabled: bool = True
    epochs: int = Field(5, gt=0)
    batch_size: int = Field(32, gt=0, description="Per process.")
    grad_accumulation: int = Field(1, ge=1, description="Batches per optimizer step.")
    lr: float | None = Field(
        None, gt=0, description="Peak SGD rate. Empty: the linear scaling rule, 0.1 x global batch "
        "(batch_size x processes x grad_accumulation) / 256: 0.0125 for one process of 32, 0.025 "
        "for the quickstart's two. A fixed 0.05 was 4x that at one process of 32 and made the "
        "training loss rise after warm-up on photo-like images (docs/photo-accuracy.md).")
    warmup_epochs: float = Field(
        1.0, ge=0, description="Linear warm-up, in epochs; at least min(50 steps, a tenth of "
        "the run), as an epoch of a small dataset is a handful of steps.")
    optim: OptimConfig = Field(default_factory=lambda: OptimConfig(label_smoothing=0.1))
    aux_weight: float = Field(0.3, ge=0, description="Weight of each auxiliary loss in training.")
    small_input_stem: bool = Field(
        True,
        description="Drop the stem's first max-pool (it has no weights, so the state dict stays "
        "torchvision's): a 32x32 image then reaches the last inception blocks as 2x2, not 1x1.",
    )
    early_stopping_patience: int = Field(
        3, ge=1, description="Stop after this many epochs without a better val top-1, counted "
        "in the second half of the run only (the fine-tune's rule).")
    sync_batchnorm: bool = False
    augment: bool = False
    photo: PhotoAugmentConfig = Field(default_factory=PhotoAugmentConfig, description="Photo recipe's training augmentation.")
    seed: int = 0
    fast: FastPathConfig = Field(default_factory=FastPathConfig)
    launch: LaunchConfig = Field(default_factory=LaunchConfig)


class EvalConfig(_Config):
    batch_size: int = Field(256, gt=0)


# MLflow's rule for registered model aliases (mlflow/utils/validation.py in MLflow 3.17), kept
# here because MLflow's own validators are private: letters, digits, '_' and '-' (\w is Unicode
# there too), at most 255 characters, and neither 'latest' nor v<digits>, which MLflow reserves
# for the newest version and for version numbers.
_ALIAS_CHARACTERS = re.compile(r"[\w\-]+")
_ALIAS_VERSION = re.compile(r"[vV]\d+")
_ALIAS_MAX_LENGTH = 255
# The same rules in the JSON schema, so that the Prefect UI refuses a bad alias before a run
# starts (its server checks the schema with Python's re; the message quotes the pattern, the
# field's description says it in words, the validator below names the fix).
ALIAS_SCHEMA: JsonDict = {"pattern": r"^[\w-]{1,255}$", "not": {"pattern": r"^((?i:latest)|[vV][0-9]+)$"}}


def mlflow_alias_problem(alias: str) -> str | None:
    """What MLflow's registry would refuse in ``alias``, with the fix; None if it is accepted."""
    fix = "Fix: choose another alias, e.g. 'champion'."
    if not alias:
        return f"Registered model alias name cannot be empty. {fix}"
    if not _ALIAS_CHARACTERS.fullmatch(alias):
        return (f"Invalid alias name: {alias!r}. Names may only contain alphanumerics, "
                f"underscores (_), and dashes (-). {fix}")
    if len(alias) > _ALIAS_MAX_LENGTH:
        return (f"Registered model alias name has {len(alias)} characters, more than MLflow's "
                f"{_ALIAS_MAX_LENGTH}. {fix}")
    if alias.lower() == "latest":
        return f"'latest' alias name (case insensitive) is reserved. {fix}"
    if _ALIAS_VERSION.fullmatch(alias):
        return f"Version alias name {alias!r} is reserved (it reads as a version number). {fix}"
    return None


def _mlflow_alias(alias: str) -> str:
    # Checked in the form rather than when the gate sets it, after all the training.
    problem = mlflow_alias_problem(alias)
    if problem is not None:
        raise ValueError(problem)
    return alias


MlflowAlias = Annotated[str, AfterValidator(_mlflow_alias)]


class RegistryConfig(_Config):
    """Where candidates are registered and when the champion alias moves."""

    model_name: str | None = Field(None, description="Registered model; `<dataset>-classifier` if empty.")
    champion_metric: Literal["top1", "macro_f1"] = "top1"
    alias: MlflowAlias = Field(
        "champion", description="The alias the gate moves; letters, digits, _ and -, not "
        "`latest` or `v<number>` (MLflow reserves those).", json_schema_extra=ALIAS_SCHEMA)
    min_score: float | None = Field(
        None, ge=0, le=1, description="Quality floor on today's test split: a candidate below "
        "it never becomes the champion, not even the first one. Empty: strictly above chance "
        "(1 / number of classes); 0: no floor.")
    min_improvement: float = Field(
        0.0, ge=0, le=1, description="A candidate replaces the champion only if it beats the "
        "champion's score by more than this (a tie always keeps the champion).")
    promote_random_init: bool = Field(
        False, description="Let a fine-tuned candidate whose pretrained weights were unreachable "
        "(weights.on_unavailable=random-init) become the champion. GoogLeNet, trained from "
        "scratch by design, is not concerned.")
    on_class_change: Literal["replace", "shared-classes"] = Field(
        "replace", description="When the champion was trained on other classes than today's "
        "dataset (a class added, removed or renamed): 'replace' promotes the candidate (if it "
        "passes the floor), since the champion cannot predict today's classes; "
        "'shared-classes' compares both on the test images of the classes they share, "
        "with a warning.")


class RetentionConfig(_Config):
    """What the state folder keeps after each run (``visionpipe.retention``)."""

    enabled: bool = Field(True, description="Run the retention step at the end of the flow.")
    keep_flow_runs: int = Field(
        5, ge=0, description="Checkpoints of this many newest flow runs that ended stay; runs "
        "in progress always stay.")
    dataset_max_age_days: float = Field(
        30, gt=0, description="A dataset version not used for this long goes, unless it is "
        "the newest of its dataset, a kept flow run's, or a champion's.")
    abandoned_after_hours: float = Field(
        48, gt=0, description="A flow run that started this long ago and never finished (its "
        "process was killed) no longer counts as in progress.")


class PipelineConfig(_Config):
    """Parameters of the ``train-image-classifiers`` flow (the Prefect UI form)."""

    experiment: str = "visionpipe"
    data: DataConfig = Field(default_factory=DataConfig)
    weights: WeightsConfig = Field(default_factory=WeightsConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    googlenet: GoogLeNetConfig = Field(default_factory=GoogLeNetConfig)
    evaluation: EvalConfig = Field(default_factory=EvalConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    retention: RetentionConfig = Field(default_factory=RetentionConfig)

    @model_validator(mode="after")
    def _weights_match_arch(self) -> PipelineConfig:
        mismatch = weights_arch_mismatch(self.weights.uri, self.finetune.arch)
        if mismatch is not None:
            raise ValueError(mismatch)
        check_backbone(self.finetune.arch, self.data.image_size)  # a ViT's patches must tile it
        return self

    @property
    def model_name(self) -> str:
        return self.registry.model_name or f"{self.data.dataset_name}-classifier"


def quickstart() -> PipelineConfig:
    """The offline configuration ``make run`` uses: digits, random init when hubs are unreachable."""
    return PipelineConfig(weights=WeightsConfig(on_unavailable="random-init"))


# --- Style transfer: the train-style-transfer and stylize-image flows -----------------------

StyleLossNetwork = Literal["vgg16", "vgg19"]
BUNDLED_STYLE = "bundled:waves"


class StyleLossConfig(_Config):
    """The perceptual loss (Johnson et al. 2016) both style flows optimise, read from a frozen
    pretrained VGG: content is one layer's features, style the Gram matrices of several layers."""

    network: StyleLossNetwork = Field(
        "vgg16", description="The loss network; its weights are weights.uri's.")
    content_layer: str = Field("relu2_2", description="Layer whose features carry the content.")
    style_layers: list[str] = Field(
        default_factory=lambda: ["relu1_2", "relu2_2", "relu3_3", "relu4_3"],
        description="Layers whose Gram matrices carry the style (vgg19: e.g. relu3_4, relu4_4).")
    content_weight: float = Field(1e5, ge=0, description="Weight of the content loss.")
    style_weight: float = Field(1e10, ge=0, description="Weight of the style loss (its Gram "
                                "matrices are divided by channels x height x width).")
    tv_weight: float = Field(1e3, ge=0, description="Weight of the total variation loss "
                             "(mean squared difference of neighbouring pixels, smoothness).")
    style_size: int | None = Field(
        None, ge=16, le=4096, description="Short side the style image is resized to before its "
        "Gram matrices are taken. Empty: the content images' size.")

    @field_validator("style_layers")
    @classmethod
    def _some_style(cls, layers: list[str]) -> list[str]:
        if not layers:
            raise ValueError("style_layers needs at least one layer, e.g. ['relu1_2', 'relu2_2']")
        return layers

    @model_validator(mode="after")
    def _known_layers(self) -> StyleLossConfig:
        from visionpipe.style.loss import check_layers  # torchvision's layer list, once

        check_layers(self.network, [self.content_layer, *self.style_layers])
        return self


class StyleTrainConfig(_Config):
    """The feed-forward image transformation network and how it trains."""

    epochs: int = Field(2, gt=0)
    batch_size: int = Field(4, gt=0)
    lr: float = Field(1e-3, gt=0, description="Adam's learning rate.")
    channels: int = Field(32, ge=2, le=256, description="Width of the first convolution "
                          "(Johnson et al.: 32; the deeper ones are 2x and 4x).")
    residual_blocks: int = Field(5, ge=1, le=16)
    autocast_bf16: bool | None = Field(
        None, description="The GPU fast path: bf16 autocast of the network and the loss network "
        "(Gram matrices in float32) and channels-last images. Empty: on with CUDA, off on the CPU "
        "(where bf16 is slower).")
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    launch: OneNodeLaunch = Field(
        default_factory=_long_launch,
        description="Empty nproc_per_node: one process per visible GPU (one plain process on a "
        "CPU-only host); two or more: torchrun starts the style worker, DDP as GoogLeNet's. The "
        "global batch is batch_size x processes; lr is used as given.")


class StyleRegistryConfig(_Config):
    """Where the stylisation network is registered, and when its alias moves."""

    model_name: str | None = Field(None, description="Registered model; `<style>-stylizer` if empty.")
    alias: MlflowAlias = Field(
        "champion", description="The alias the gate moves (one per style, since each style is "
        "its own registered model); letters, digits, _ and -, not `latest` or `v<number>`.",
        json_schema_extra=ALIAS_SCHEMA)
    heldout_images: int = Field(
        64, ge=1, description="Test-split images the gate scores both candidate and champion on.")
    promote_random_init: bool = Field(
        False, description="Let a network trained against a randomly initialised loss network "
        "(weights.on_unavailable=random-init, the VGG weights unreachable) hold the alias.")


def _style_data() -> DataConfig:
    return DataConfig(image_size=64)


def _vgg_weights() -> WeightsConfig:
    return WeightsConfig(uri="torchvision:vgg16.IMAGENET1K_V1")


class StyleConfig(_Config):
    """Parameters of the train-style-transfer flow (the Prefect UI form)."""

    experiment: str = "visionpipe-style"
    data: DataConfig = Field(default_factory=_style_data,
                             description="The content images, and the size they train at.")
    style_image: str = Field(
        BUNDLED_STYLE, description="The style image: `file://...`, `https://...`, `s3://...`, or "
        f"`{BUNDLED_STYLE}` (a pattern shipped with visionpipe, offline).")
    style_sha256: str | None = Field(
        None, description="Expected sha256 of the style image; its bytes are hashed and cached "
        "under the digest either way.")
    style_name: str | None = Field(
        None, description="Name of the style; the style image's file name without extension if "
        "empty.")
    weights: WeightsConfig = Field(default_factory=_vgg_weights,
                                   description="The loss network's pretrained weights.")
    loss: StyleLossConfig = Field(default_factory=StyleLossConfig)
    train: StyleTrainConfig = Field(default_factory=StyleTrainConfig)
    registry: StyleRegistryConfig = Field(default_factory=StyleRegistryConfig)
    retention: RetentionConfig = Field(default_factory=RetentionConfig)

    @field_validator("style_sha256")
    @classmethod
    def _hex_digest(cls, value: str | None) -> str | None:
        return full_sha256(value)

    @model_validator(mode="after")
    def _weights_match_network(self) -> StyleConfig:
        mismatch = weights_arch_mismatch(self.weights.uri, self.loss.network)
        if mismatch is not None:
            raise ValueError(mismatch.replace("finetune.arch", "loss.network"))
        return self

    @property
    def style(self) -> str:
        if self.style_name:
            return self.style_name
        name = self.style_image.rstrip("/").rsplit("/", 1)[-1].rsplit(":", 1)[-1]
        return name.rsplit(".", 1)[0] or "style"

    @property
    def model_name(self) -> str:
        return self.registry.model_name or f"{self.style}-stylizer"


class GatysConfig(_Config):
    """One picture, optimised pixel by pixel against one style (Gatys et al. 2016)."""

    steps: int = Field(200, gt=0, description="Optimizer steps (L-BFGS: iterations).")
    optimizer: Literal["lbfgs", "adam"] = "lbfgs"
    lr: float = Field(1.0, gt=0, description="L-BFGS's step size, or Adam's rate (e.g. 0.02).")
    image_size: int = Field(256, ge=16, le=2048, description="Short side of the content image.")
    loss: StyleLossConfig = Field(default_factory=lambda: StyleLossConfig(
        content_layer="relu4_2", style_layers=["relu1_1", "relu2_1", "relu3_1", "relu4_1",
                                               "relu5_1"], network="vgg19", content_weight=1.0,
        style_weight=1e6, tv_weight=0.0))
    weights: WeightsConfig = Field(default_factory=lambda: WeightsConfig(
        uri="torchvision:vgg19.IMAGENET1K_V1"), description="The loss network's weights.")
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"

    @model_validator(mode="after")
    def _weights_match_network(self) -> GatysConfig:
        mismatch = weights_arch_mismatch(self.weights.uri, self.loss.network)
        if mismatch is not None:
            raise ValueError(mismatch.replace("finetune.arch", "loss.network"))
        return self
