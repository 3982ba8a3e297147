"""The training configuration: one typed dataclass, every knob documented once.

It is filled from the dataclass defaults, then a TOML file (``--config``), then command-line flags
(every field is a flag: ``batch_size`` is ``--batch-size``). The resolved configuration is written to
the run folder and stored in every checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def knob(default: Any, help: str) -> Any:
    """A field with its one-line documentation (shown by ``--help`` and written into config.toml)."""
    if isinstance(default, list | dict):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    # --- model -----------------------------------------------------------------------------------
    model: str = knob("resnet20", "registered model name (`resnetlab list`)")
    plain: bool = knob(False, "train the model's plain twin (the same network without shortcuts)")
    zero_init_residual: bool = knob(False, "start every residual block as its shortcut (last BN at zero)")
    grad_checkpointing: bool = knob(False, "recompute activations in backward: memory ~ sqrt(depth)")
    init_weights: str = knob(
        "",
        "start from these weights (run folder or model.safetensors); a classifier of another size is "
        "replaced by a fresh one",
    )
    model_args: dict = knob(
        {}, "extra constructor arguments of the model, e.g. depth=32 width=128 norm=batch shortcut=B"
    )

    # --- data ------------------------------------------------------------------------------------
    data: str = knob(
        "digits",
        "digits | cifar10 | cifar100 | synthetic[:CxHxW[:CLASSES[:IMAGES]]] | a path to an image "
        "folder, a .tar(.gz) of one, or a CIFAR archive",
    )
    data_root: str = knob("", "where cifar10/cifar100 are looked for and downloaded (default: cache)")
    download: bool = knob(False, "download cifar10/cifar100 from the official address if missing")
    val_fraction: float = knob(0.1, "fraction of the training split held out for validation (stratified)")
    split_seed: int = knob(0, "seed of the validation split (independent of --seed)")
    train_fraction: float = knob(1.0, "train on this stratified fraction of the remaining training images")
    image_size: int = knob(0, "resize image folders to this size (shorter side, centre crop); 0 = native")
    skip_bad_images: bool = knob(False, "skip (and list) image files that fail to decode instead of stopping")
    augment: Literal["auto", "none", "flip", "crop", "crop+flip"] = knob(
        "auto", "training augmentation; auto = crop+flip for natural images, none for digits and synthetic"
    )
    crop_padding: int = knob(4, "pixels of padding around images for the random crop")
    alternate_flip: bool = knob(
        False, "flip each training image in every other epoch (from a random start) instead of at random"
    )
    min_image_size: int = knob(
        0, "progressive resizing: train the first epochs on images scaled down to this size, growing to full size"
    )
    resize_until: float = knob(0.75, "progressive resizing: fraction of the epochs after which images are full size")
    pad_mode: Literal["reflect", "zeros"] = knob("reflect", "padding for the random crop")
    workers: int = knob(2, "DataLoader worker processes for image folders streamed from disk")

    # --- optimisation ----------------------------------------------------------------------------
    epochs: int = knob(30, "passes over the training split")
    batch_size: int = knob(128, "images per optimisation step (all processes together)")
    optimizer: Literal["sgd", "adamw"] = knob("sgd", "SGD with momentum, or AdamW")
    lr: float = knob(0.1, "peak learning rate")
    momentum: float = knob(0.9, "SGD momentum (AdamW: beta1)")
    nesterov: bool = knob(True, "Nesterov momentum for SGD")
    weight_decay: float = knob(5e-4, "L2 weight decay (decoupled for AdamW)")
    decay_norm_and_bias: bool = knob(False, "also decay normalisation weights and biases")
    schedule: Literal["cosine", "linear", "step", "onecycle", "constant"] = knob(
        "cosine", "learning-rate schedule, stepped every iteration (linear: straight down to 0)"
    )
    warmup_epochs: float = knob(1.0, "linear warm-up from 0 (cosine, linear, step, constant)")
    milestones: list[float] = knob(
        [0.5, 0.75], "step schedule: fractions of training at which the rate is divided by 10"
    )
    label_smoothing: float = knob(0.0, "label smoothing of the cross-entropy loss")
    grad_clip: float = knob(0.0, "clip the gradient norm to this value; 0 = off")
    ema_decay: float = knob(0.0, "keep an exponential moving average of the weights; 0 = off")
    eval_flip: bool = knob(False, "validate on each image and its mirror image, averaging the logits")
    eval_translate: int = knob(
        0, "validate also on each image shifted by N pixels up-left and down-right (weighing half); 0 = off"
    )
    eval_every: int = knob(1, "validate every N epochs (and after the last); other epochs record no validation")

    # --- hardware --------------------------------------------------------------------------------
    device: str = knob("auto", "auto | cpu | cuda | cuda:N")
    amp: Literal["none", "bf16", "fp16"] = knob(
        "none", "mixed precision: bf16 (CUDA, or CPUs with AVX-512 BF16), or fp16 with a scaler (CUDA)"
    )
    channels_last: bool = knob(False, "NHWC memory format (faster convolutions on most hardware)")
    compile: bool = knob(False, "torch.compile the model")
    threads: int = knob(0, "CPU threads for PyTorch; 0 = PyTorch's default")
    sync_bn: bool = knob(False, "synchronise batch-norm statistics across processes (torchrun)")

    # --- run -------------------------------------------------------------------------------------
    seed: int = knob(0, "seed of initialisation, data order and augmentation")
    out: str = knob("", "run folder (default: runs/<time>-<model>-<data>)")
    keep_checkpoints: int = knob(2, "checkpoints kept in the run folder (the newest)")

    def validate(self) -> None:
        """Raise :class:`UserError` naming the first flag with an impossible value."""
        checks = [
            (self.epochs >= 1, "--epochs must be >= 1"),
            (self.batch_size >= 1, "--batch-size must be >= 1"),
            (0 <= self.val_fraction < 1, "--val-fraction must be in [0, 1)"),
            (0 < self.train_fraction <= 1, "--train-fraction must be in (0, 1]"),
            (self.image_size >= 0, "--image-size must be >= 0"),
            (self.crop_padding >= 0, "--crop-padding must be >= 0"),
            (self.min_image_size >= 0, "--min-image-size must be >= 0"),
            (0 < self.resize_until <= 1, "--resize-until must be in (0, 1]"),
            (self.workers >= 0, "--workers must be >= 0"),
            (self.lr > 0 and math.isfinite(self.lr), "--lr must be a positive number"),
            (0 <= self.momentum < 1, "--momentum must be in [0, 1)"),
            (self.weight_decay >= 0, "--weight-decay must be >= 0"),
            (self.warmup_epochs >= 0, "--warmup-epochs must be >= 0"),
            (all(0 < m < 1 for m in self.milestones), "--milestones must be fractions in (0, 1)"),
            (0 <= self.label_smoothing < 1, "--label-smoothing must be in [0, 1)"),
            (self.grad_clip >= 0, "--grad-clip must be >= 0"),
            (0 <= self.ema_decay < 1, "--ema-decay must be in [0, 1)"),
            (0 <= self.threads <= 4096, "--threads must be between 0 and 4096"),
            (self.keep_checkpoints >= 1, "--keep-checkpoints must be >= 1"),
            (self.eval_every >= 1, "--eval-every must be >= 1"),
            (self.eval_translate >= 0, "--eval-translate must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                value = getattr(self, message.split()[0][2:].replace("-", "_"))
                raise UserError(f"{message}, got {_toml_value(value)}")
        for f in dataclasses.fields(self):
            choices = _choices(f)
            if choices and getattr(self, f.name) not in choices:
                raise UserError(f"--{_flag(f.name)} must be one of {', '.join(choices)}, got {getattr(self, f.name)!r}")

    def with_absolute_paths(self) -> TrainConfig:
        """The same settings with the data, data root and initial weights as absolute paths where they
        name existing files, so that the run folder's config finds them from any working directory
        (``resnetlab eval RUN``, ``--resume RUN``)."""
        from ..data.prepare import DATA_NAMES

        def absolute(path: str) -> str:
            return str(Path(path).expanduser().resolve()) if path and Path(path).expanduser().exists() else path

        data = self.data if self.data.split(":")[0] in DATA_NAMES else absolute(self.data)
        return dataclasses.replace(
            self, data=data, data_root=absolute(self.data_root), init_weights=absolute(self.init_weights)
        )


# --- TOML and flags -------------------------------------------------------------------------------


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _hints() -> dict[str, Any]:
    return typing.get_type_hints(TrainConfig)


def _choices(f: dataclasses.Field) -> tuple[str, ...]:
    hint = _hints()[f.name]
    return typing.get_args(hint) if typing.get_origin(hint) is Literal else ()


def _coerce(name: str, value: Any, where: str) -> Any:
    """Check a TOML value against the field's type (ints are accepted for floats)."""
    hint = _hints()[name]
    base = str if typing.get_origin(hint) is Literal else hint
    if hint is dict:
        if not isinstance(value, dict):
            raise UserError(f"{where}: {name} must be a table, e.g. {{ depth = 32 }}, got {value!r}")
        return dict(value)
    if typing.get_origin(hint) is list:
        if not isinstance(value, list) or not all(isinstance(v, int | float) for v in value):
            raise UserError(f"{where}: {name} must be a list of numbers, got {value!r}")
        return [float(v) for v in value]
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, base) or (base is int and isinstance(value, bool)):
        raise UserError(f"{where}: {name} must be {base.__name__}, got {value!r}")
    return value


def load_toml(path: str | Path) -> dict[str, Any]:
    """Field values from a TOML file; unknown keys and wrong types are errors naming the file."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"--config {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"--config {path}: cannot read it ({err})") from None
    except tomllib.TOMLDecodeError as err:
        raise UserError(f"--config {path}: not valid TOML ({err})") from None
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {}
    for key, value in raw.items():
        if key not in names:
            raise UserError(f"--config {path}: unknown setting {key!r}")
        values[key] = _coerce(key, value, f"--config {path}")
    return values


def to_toml(config: TrainConfig) -> str:
    """The configuration as TOML, one documented line per field."""
    lines = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        lines.append(f"# {f.metadata['help']}")
        lines.append(f"{f.name} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else ("nan" if math.isnan(value) else f"{value:+}")
    if isinstance(value, str):
        return json.dumps(value)  # JSON string escapes are valid TOML basic-string escapes
    return str(value)


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per field; unset flags stay absent from the namespace (so the TOML file can set them)."""
    group = parser.add_argument_group("configuration (every field of TrainConfig; TOML keys use _)")
    for f in dataclasses.fields(TrainConfig):
        hint = _hints()[f.name]
        kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "dest": f.name}
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        help_text = f.metadata["help"]
        if "(default:" not in help_text:  # a few say in words what an empty default means
            help_text += f" (default: {_toml_value(default) if default != '' else 'none'})"
        if hint is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(hint) is list:
            kwargs.update(type=float, nargs="+", metavar="X")
        elif hint is dict:
            kwargs.update(type=_key_value, nargs="+", metavar="KEY=VALUE", action=_MergeDict)
        elif typing.get_origin(hint) is Literal:
            kwargs.update(choices=typing.get_args(hint))
        else:
            kwargs.update(type=hint, metavar=hint.__name__.upper())
        group.add_argument(f"--{_flag(f.name)}", help=help_text, **kwargs)


def _key_value(text: str) -> tuple[str, Any]:
    """``depth=32`` -> ("depth", 32); values are read as JSON (numbers, true/false) or else as text."""
    key, sep, raw = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(raw)
    except json.JSONDecodeError:
        return key, raw


class _MergeDict(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None) -> None:  # noqa: ANN001
        merged = dict(getattr(namespace, self.dest, None) or {})
        merged.update(values)
        setattr(namespace, self.dest, merged)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Defaults, then ``args.config`` (a TOML file) if given, then the flags given on the command line."""
    values: dict[str, Any] = {}
    if getattr(args, "config", None):
        values.update(load_toml(args.config))
    for f in dataclasses.fields(TrainConfig):
        if hasattr(args, f.name):
            given = getattr(args, f.name)
            values[f.name] = {**values.get(f.name, {}), **given} if isinstance(given, dict) else given
    config = TrainConfig(**values)
    try:
        config.validate()
    except UserError as err:
        name = str(err).split()[0][2:].replace("-", "_")
        if getattr(args, "config", None) and not hasattr(args, name):  # the value came from the file
            raise UserError(f"--config {args.config}: {err}") from None
        raise
    return config


def given_flags(args: argparse.Namespace) -> list[str]:
    """The configuration flags present on the command line."""
    return [f"--{_flag(f.name)}" for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)]


def config_from_toml_text(text: str, where: str) -> TrainConfig:
    """Rebuild a configuration saved by :func:`to_toml` (in a run folder or checkpoint)."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise UserError(f"{where}: not valid TOML ({err})") from None
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: _coerce(k, v, where) for k, v in raw.items() if k in names}
    return TrainConfig(**values)
